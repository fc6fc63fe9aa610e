//! The one `redis-server` launcher of the tests: the library's unit tests use it,
//! and `tests/common` includes this file too, so both start Redis the same way
//! (`redis-server` from `PATH`, on a private port, nothing saved to disk);
//! each side uses part of it.

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `redis-server` on `port` with nothing saved to disk, its files in `dir`.
pub fn redis_server(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A private `redis-server` on its own port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    cluster: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a fresh, empty server on `port`; with `cluster`, as a Redis Cluster node.
    pub fn start_on(port: u16, cluster: bool) -> Self {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            cluster,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = redis_server(self.port, self.dir.path());
        if self.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (an outage).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (data is gone: nothing is saved).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
