//! The example chat page (examples/browser) end to end: Debian's headless Chromium,
//! driven by playwright-core, loads the page from another origin, logs in and streams
//! replies from a real gateway through CORS, in both `data_format` modes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const USER: &str = "browser_user";
const PASSWORD: &str = "browser-password-1";
/// The simulator's `newlines` reply (see src/simulator/reply.rs), as one string.
const NEWLINES_REPLY: &str =
    "First paragraph.\n\nSecond paragraph,\nline two.\n\nThird paragraph.\n\nLast line.";
/// The same reply as fetch-event-source hands it over on a `text` route: it joins a
/// chunk's data lines only after non-empty data, so the bare "\n" and "\n\n" chunks
/// become "" and the chunk "\nLast" loses its leading break. Only " paragraph.\n"
/// (break at the end of a chunk) survives. This is why `data_format: json` exists.
const NEWLINES_REPLY_TEXT_MODE: &str =
    "First paragraph.Second paragraph,line two.Third paragraph.\nLast line.";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser")
}

/// Runs a command in `dir` and fails the test with its output when it fails.
fn run_in(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (scripts/install-deps.sh): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs the page's npm packages when missing (a failed fetch fails the test),
/// then bundles it with esbuild into dist/.
fn build_page() -> PathBuf {
    let dir = browser_dir();
    if !dir.join("node_modules/.package-lock.json").exists() {
        run_in(&dir, "npm", &["ci", "--no-audit", "--no-fund"]);
    }
    run_in(&dir, "npm", &["run", "build"]);
    dir.join("dist")
}

/// `python3 -m http.server` serving a directory on a port, killed on drop.
struct StaticServer {
    child: Child,
}

impl StaticServer {
    fn start(port: u16, dir: &Path) -> StaticServer {
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 must be installed");
        let server = StaticServer { child };
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "static server did not start"
        );
        server
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: `<target dir>/browser-artifacts`.
fn artifacts_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("browser-artifacts")
}

/// Two stream routes on one upstream, one per data format.
fn stream_routes(upstream: &str) -> String {
    let route = |path: &str, format: &str| {
        format!("  - path: {path}\n    kind: chat_stream\n    upstream: {upstream}\n    model: test-model\n    data_format: {format}\n")
    };
    route("/chatCompletionStream", "text") + &route("/chatCompletionStreamJson", "json")
}

fn page_url(page_port: u16, gateway: &Gateway, path: &str, format: &str) -> String {
    format!(
        "http://127.0.0.1:{page_port}/index.html?gateway={}&path={path}&format={format}",
        gateway.url("")
    )
}

#[test]
fn example_page_streams_from_another_origin_in_both_formats() {
    let dist = build_page();
    let sim = Simulator::start(&[]);
    let redis = Redis::start();
    let (page_port, foreign_port) = (free_port(), free_port());
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.routes = stream_routes("main");
    cfg.extra = format!("cors:\n  allowed_origins: [\"http://127.0.0.1:{page_port}\"]\n");
    let gw = Gateway::start(cfg);
    gw.add_user(USER, PASSWORD);
    // The page is served from its own port: a different origin than the gateway's.
    let _page = StaticServer::start(page_port, &dist);
    // The same page on an origin the gateway does not allow.
    let _foreign = StaticServer::start(foreign_port, &dist);

    let out_dir = artifacts_dir();
    let pages = [
        page_url(page_port, &gw, "/chatCompletionStream", "text"),
        page_url(page_port, &gw, "/chatCompletionStreamJson", "json"),
        page_url(foreign_port, &gw, "/chatCompletionStreamJson", "json"),
    ];
    let out = Command::new("node")
        .current_dir(browser_dir())
        .arg("e2e.mjs")
        .args(["--user", USER, "--password", PASSWORD])
        .arg("--out")
        .arg(&out_dir)
        .args(["--say", "你好，你是谁？"])
        .args(["--say", "#sim reply=newlines\n请分段回答。"])
        .args(&pages)
        .output()
        .expect("node must be installed (scripts/install-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "e2e.mjs failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let results: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("e2e.mjs prints one JSON object per page"))
        .collect();
    assert_eq!(results.len(), 3, "{stdout}");
    for r in &results {
        println!("screenshot: {}", r["screenshot"].as_str().unwrap_or("?"));
    }

    let (text, json, foreign) = (&results[0], &results[1], &results[2]);
    for (r, second_reply) in [(text, NEWLINES_REPLY_TEXT_MODE), (json, NEWLINES_REPLY)] {
        assert_eq!(r["status"], "Done.", "{r}");
        assert_eq!(
            r["replies"],
            serde_json::json!(["你好，你是谁？", second_reply]),
            "{r}"
        );
        assert_eq!(r["problems"], serde_json::json!([]), "{r}");
        // The whole conversation as the page shows it (the #sim line is part of the
        // user's message, so it is shown too).
        assert_eq!(
            r["transcript"],
            format!(
                "You:你好，你是谁？\nAssistant:你好，你是谁？\nYou:#sim reply=newlines\n请分段回答。\nAssistant:{second_reply}"
            ),
            "{r}"
        );
    }

    // From an origin not in cors.allowed_origins the browser refuses the answer.
    assert_eq!(
        foreign["status"], "Login failed: Failed to fetch",
        "{foreign}"
    );
    assert_eq!(foreign["replies"], serde_json::json!([]), "{foreign}");
    assert!(
        foreign["problems"].to_string().contains("CORS policy"),
        "{foreign}"
    );
}
