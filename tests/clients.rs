//! Real clients against `chatgate demo`: the seed document's Python flow
//! (`requests`, form login, three-turn Chinese conversation, JSON and SSE), and
//! the same stream read by a standard SSE library (sseclient-py).

mod common;

use std::process::Command;

use common::demo::Demo;

#[test]
fn seed_python_client_works_against_the_demo() {
    let demo = Demo::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", demo.port))
        .output()
        .expect("python3 must be installed (scripts/install-deps.sh installs it with requests)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "seed client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("message: 请介绍一下 openEuler。\n它是什么？"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[test]
fn standard_sse_library_reads_the_stream_with_every_line_break() {
    let demo = Demo::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sse_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", demo.port))
        .output()
        .expect(
            "python3 must be installed (scripts/install-deps.sh installs it with sseclient-py)",
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SSE library client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Six reply chunks between the empty first and last events; the text is the
    // seed's last question echoed back.
    assert!(
        stdout.contains(r#"seed: {"events": 8, "text": "请介绍一下 openEuler。\n它是什么？"}"#),
        "{stdout}"
    );
    // Every bare "\n" and "\n\n" token survives a conforming SSE parser.
    assert!(
        stdout.contains(r#"newlines: {"events": 16, "text": "First paragraph.\n\nSecond paragraph,\nline two.\n\nThird paragraph.\n\nLast line."}"#),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
