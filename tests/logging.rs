//! The log on stderr: JSON lines by default when stderr is no terminal, text
//! for a person with `--log-format text`, Pingora's start-up chatter kept out
//! of the info level, no source paths of other crates in either format, and
//! every line written before a graceful stop ends the process.

mod common;

use std::time::Duration;

use common::demo::Demo;
use common::*;

impl Demo {
    /// Logs in as the demo user and makes one chat call with `request_id`.
    async fn chat(&self, request_id: &str) {
        let url = |p: &str| format!("http://127.0.0.1:{}{p}", self.port);
        let token = login_at(&url("/auth"), "temporary_user", "default_password").await;
        let resp = client()
            .post(url("/chatCompletion"))
            .bearer_auth(&token)
            .header("x-request-id", request_id)
            .body(user("hello \"log\"\nline two"))
            .send()
            .await
            .expect("chat");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body");
    }

    /// Waits until a log line satisfies `found`; returns the whole log.
    async fn wait_for_line(&self, found: impl Fn(&str) -> bool) -> String {
        poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || std::future::ready(self.log()),
            |log| log.lines().any(&found),
        )
        .await
    }
}

/// The log without the demo's banner (which it prints on stderr first).
fn log_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.is_empty() && !l.starts_with(' ') && !l.starts_with('='))
        .collect()
}

/// No line names a file inside a crate's source (cargo registry or git checkout).
fn assert_no_source_paths(log: &str) {
    for line in log.lines() {
        assert!(
            !line.contains(".cargo/") && !line.contains("log.file") && !line.contains(".rs\""),
            "a source path in: {line}"
        );
    }
}

#[tokio::test]
async fn json_lines_are_the_default_off_a_terminal() {
    let demo = Demo::start_logging(&[], "info");
    demo.chat("json-default-1").await;
    let log = demo.wait_for_line(|l| l.contains("json-default-1")).await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 2, "{log}");
    for v in &lines {
        assert!(v["timestamp"].is_string(), "{v}");
        assert!(v["level"].is_string(), "{v}");
        assert!(v["fields"]["message"].is_string(), "{v}");
        assert!(v["target"].is_string(), "{v}");
    }
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "chatgate starting" && v["level"] == "INFO"),
        "{log}"
    );
    let access = lines
        .iter()
        .find(|v| v["target"] == "access" && v["fields"]["request_id"] == "json-default-1")
        .unwrap_or_else(|| panic!("no access line in:\n{log}"));
    let f = &access["fields"];
    assert_eq!(f["request_id"], "json-default-1", "{f}");
    assert_eq!(f["message"], "request", "{f}");
    assert_eq!(f["route"], "/chatCompletion", "{f}");
    assert_eq!(f["status"], 200, "{f}");
    assert_eq!(f["attempts"], 1, "{f}");
    assert!(f["duration_ms"].as_f64().is_some(), "{f}");
    // Every line but the banner is JSON.
    assert!(
        log_lines(&log).iter().all(|l| l.starts_with('{')),
        "a line that is not JSON:\n{log}"
    );
    // Pingora's start-up chatter is debug, not info.
    assert!(
        !log.contains("Bootstrap starting") && !log.contains("Starting service"),
        "{log}"
    );
    assert_no_source_paths(&log);
}

#[tokio::test]
async fn text_lines_are_for_a_person() {
    let demo = Demo::start_logging(&["--log-format", "text"], "info");
    demo.chat("text-format-1").await;
    let log = demo.wait_for_line(|l| l.contains("text-format-1")).await;
    let lines = log_lines(&log);
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        assert!(!line.starts_with('{'), "a JSON line: {line}");
        assert!(!line.contains('\u{1b}'), "colour off a terminal: {line}");
    }
    let starting = lines
        .iter()
        .find(|l| l.contains("chatgate starting"))
        .unwrap_or_else(|| panic!("no start line in:\n{log}"));
    assert!(starting.contains("INFO"), "{starting}");
    let access = lines
        .iter()
        .find(|l| l.contains("request_id=text-format-1"))
        .unwrap_or_else(|| panic!("no access line in:\n{log}"));
    assert!(
        access.contains("INFO") && access.contains("access"),
        "{access}"
    );
    assert!(access.contains("status=200"), "{access}");
    assert!(
        !log.contains("Bootstrap starting") && !log.contains("Starting service"),
        "{log}"
    );
    assert_no_source_paths(&log);
}

#[tokio::test]
async fn pingora_start_up_lines_are_debug_lines() {
    let demo = Demo::start_logging(&["--log-format", "json"], "debug");
    let log = demo.wait_for_line(|l| l.contains("Bootstrap done")).await;
    let bootstrap: serde_json::Value = log
        .lines()
        .find(|l| l.contains("Bootstrap done"))
        .map(|l| serde_json::from_str(l).expect("json"))
        .unwrap_or_else(|| panic!("no Pingora start-up line at debug:\n{log}"));
    assert_eq!(bootstrap["level"], "DEBUG", "{bootstrap}");
    assert!(
        bootstrap["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("pingora")),
        "{bootstrap}"
    );
    assert_no_source_paths(&log);
}

#[tokio::test]
async fn a_graceful_stop_keeps_every_line_and_the_dropped_count_is_exported() {
    let mut demo = Demo::start_logging(&[], "info");
    let metrics = client()
        .get(format!("http://127.0.0.1:{}/metrics", demo.admin))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics
            .lines()
            .any(|l| l == "chatgate_log_lines_dropped_total 0"),
        "{metrics}"
    );
    demo.chat("last-before-stop").await;
    assert!(demo.stop(), "the demo did not stop:\n{}", demo.log());
    let log = demo.log();
    assert!(log.contains("last-before-stop"), "{log}");
    // The last line of all, written after the server stopped.
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("chatgate stopped")),
        "{log}"
    );
}
