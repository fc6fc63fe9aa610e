//! Ports for the library's own tests, which start servers (redis-server, the
//! simulator) from parallel test threads: the kernel may offer a just-released
//! port again, so a port is never handed out twice in one test process.

use std::net::TcpListener;
use std::sync::Mutex;

/// A free loopback port, never 6379 and never one handed out before.
pub(crate) fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if port != 6379 && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
