//! A running `chatgate demo` (in-memory user, built-in simulator) on free ports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{chatgate_bin, free_port, wait_for_port};

/// `chatgate demo` with its gateway, admin listener and simulator on free ports,
/// killed on drop.
pub struct Demo {
    /// The gateway's port.
    pub port: u16,
    /// The admin listener's port.
    pub admin: u16,
    child: Child,
    /// Where its stderr goes ([`Demo::start_logging`]), and the folder holding it.
    log: Option<(PathBuf, tempfile::TempDir)>,
}

impl Demo {
    /// Starts the demo and waits until all three listeners accept connections.
    pub fn start() -> Demo {
        Self::spawn(&[], None)
    }

    /// [`Demo::start`] with extra arguments, `RUST_LOG=rust_log` and its stderr in
    /// a file ([`Demo::log`]); `CHATGATE_LOG_FORMAT` is not passed on.
    pub fn start_logging(args: &[&str], rust_log: &str) -> Demo {
        Self::spawn(args, Some(rust_log))
    }

    fn spawn(args: &[&str], rust_log: Option<&str>) -> Demo {
        let (port, admin, sim) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(chatgate_bin());
        cmd.args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--simulator-listen", &format!("127.0.0.1:{sim}")])
            .args(args)
            .stdout(Stdio::null());
        let log = rust_log.map(|level| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("demo.log");
            let file = std::fs::File::create(&path).expect("log file");
            cmd.env("RUST_LOG", level)
                .env_remove("CHATGATE_LOG_FORMAT")
                .stderr(file);
            (path, dir)
        });
        if log.is_none() {
            cmd.stderr(Stdio::null());
        }
        let child = cmd.spawn().expect("spawn demo");
        let demo = Demo {
            port,
            admin,
            child,
            log,
        };
        for p in [port, admin, sim] {
            assert!(
                wait_for_port(p, Duration::from_secs(20)),
                "demo did not start:\n{}",
                demo.log()
            );
        }
        demo
    }

    /// Its stderr so far (empty unless started with [`Demo::start_logging`]).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|(path, _)| std::fs::read_to_string(path).ok())
            .unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit; true if it exited within 15 s.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill(2) on the pid of a child this harness owns.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
