//! A private Prometheus server (Debian's `prometheus` package) on a free port that
//! scrapes given targets every second and evaluates rule files every second, its
//! data in a temporary directory; killed on drop. Also runs `promtool`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{client, free_port, kill};

/// Where the package puts the binaries: both must be on `PATH`.
const MISSING: &str =
    "not installed: scripts/install-deps.sh installs Debian's `prometheus` package (prometheus and promtool)";

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` of each `host:port` in `targets` (job
    /// `chatgate`) with `rule_files` loaded, and waits until it is ready.
    pub async fn start(targets: &[String], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let quoted = |items: Vec<String>| {
            items
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules = quoted(rule_files.iter().map(|p| p.display().to_string()).collect());
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: [{rules}]\nscrape_configs:\n  - job_name: chatgate\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            quoted(targets.to_vec())
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus {MISSING} ({e})"));
        let mut prom = Prometheus { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client()
                .get(prom.url("/-/ready"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return prom;
            }
            if !matches!(prom.child.try_wait(), Ok(None)) || Instant::now() > deadline {
                kill(&mut prom.child);
                panic!("prometheus did not get ready; log:\n{}", prom.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path (`/api/v1/rules`, ...) and returns the JSON answer.
    pub async fn api(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.url(path))
            .send()
            .await
            .expect("prometheus request")
            .json()
            .await
            .expect("prometheus json")
    }

    /// Evaluates `expr` now (`/api/v1/query`) and returns the whole answer,
    /// `{"status": "success" | "error", ...}`.
    pub async fn query(&self, expr: &str) -> serde_json::Value {
        client()
            .post(self.url("/api/v1/query"))
            .form(&[("query", expr)])
            .send()
            .await
            .expect("prometheus query")
            .json()
            .await
            .expect("prometheus json")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Runs `promtool` with `args` in `dir`.
pub fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("promtool {MISSING} ({e})"))
}
