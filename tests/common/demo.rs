//! A running `chatgate demo` (in-memory user, built-in simulator) on free ports.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{chatgate_bin, free_port, wait_for_port};

/// `chatgate demo` with its gateway, admin listener and simulator on free ports,
/// killed on drop.
pub struct Demo {
    /// The gateway's port.
    pub port: u16,
    /// The admin listener's port.
    pub admin: u16,
    child: Child,
}

impl Demo {
    /// Starts the demo and waits until all three listeners accept connections.
    pub fn start() -> Demo {
        let (port, admin, sim) = (free_port(), free_port(), free_port());
        let child = Command::new(chatgate_bin())
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--simulator-listen", &format!("127.0.0.1:{sim}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo");
        for p in [port, admin, sim] {
            assert!(
                wait_for_port(p, Duration::from_secs(20)),
                "demo did not start"
            );
        }
        Demo { port, admin, child }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
