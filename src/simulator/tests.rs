//! End-to-end tests: a real simulator server on a free 127.0.0.1 port, spoken to with raw
//! HTTP/1.1 over `std::net::TcpStream`, so framing is checked byte by byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use super::stats::unix_ms;
use super::{run_standalone, SimOptions};

/// Starts a simulator with `options` in a background thread; returns its address.
fn start(options: SimOptions) -> String {
    let port = crate::test_ports::free_port();
    let addr = format!("127.0.0.1:{port}");
    let listen = addr.clone();
    std::thread::spawn(move || run_standalone(&listen, options, &super::SimTls::default()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "simulator did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    addr
}

#[derive(Debug)]
struct Response {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    /// Decoded body (chunked framing removed).
    body: Vec<u8>,
    /// Body bytes as they came off the wire.
    raw_body: Vec<u8>,
    /// The body ended properly (length reached or the terminating zero chunk seen).
    complete: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

fn send_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    stream
}

fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = send_request(addr, method, path, headers, body);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // Read to EOF; a reset after a cut simply ends the data.
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let raw_body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next().expect("status line")[9..12]
        .parse()
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let (body, complete) = if chunked {
        decode_chunked(&raw_body)
    } else {
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("length"))
            .unwrap_or(raw_body.len());
        (
            raw_body[..length.min(raw_body.len())].to_vec(),
            raw_body.len() >= length,
        )
    };
    Response {
        status,
        headers,
        body,
        raw_body,
        complete,
    }
}

/// Decodes chunked framing; the flag says whether the zero-size last chunk was seen.
fn decode_chunked(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]).into_owned();
        let size = usize::from_str_radix(size_text.trim(), 16).expect("chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return (body, raw == b"\r\n");
        }
        if raw.len() < size + 2 {
            body.extend_from_slice(&raw[..size.min(raw.len())]);
            return (body, false);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn chat(addr: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let body = serde_json::to_vec(body).expect("serialise");
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", "/v1/chat/completions", &all, &body)
}

fn stats(addr: &str) -> Value {
    request(addr, "GET", "/_sim/stats", &[], b"").json()
}

fn user(content: &str, stream: bool) -> Value {
    json!({
        "model": "sim-test",
        "stream": stream,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    })
}

#[test]
fn cli_defaults_match_default_and_flags_parse() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: SimOptions,
    }
    let parsed = Cli::try_parse_from(["sim"]).expect("no flags").options;
    assert_eq!(parsed, SimOptions::default());

    let parsed = Cli::try_parse_from([
        "sim",
        "--chunk-size=2",
        "--role-chunk=off",
        "--reply=lorem:10",
        "--require-key=a",
        "--require-key=b",
        "--fail-first=2",
        "--name=east",
    ])
    .expect("flags")
    .options;
    assert_eq!(parsed.chunk_size, 2);
    assert!(!parsed.role_chunk);
    assert_eq!(parsed.reply, super::reply::ReplySpec::Lorem(10));
    assert_eq!(parsed.require_key, ["a", "b"]);
    assert_eq!(parsed.fail_first, 2);
    assert_eq!(parsed.name.as_deref(), Some("east"));
    assert!(
        !format!("{parsed:?}").contains("\"a\""),
        "keys are redacted"
    );
    assert!(Cli::try_parse_from(["sim", "--chunk-size=0"]).is_err());
}

#[test]
fn non_stream_echo() {
    let addr = start(SimOptions {
        name: Some("one".into()),
        ..SimOptions::default()
    });
    let response = chat(&addr, &[], &user("Hello there", false));
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-sim-name"), Some("one"));
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "sim-test");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "Hello there"})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // prompt: 9 + 11 chars → 5 tokens; completion: "Hell|o th|ere" → 3 chunks.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
    );
}

#[test]
fn stream_framing_bytes() {
    let addr = start(SimOptions::default());
    let response = chat(&addr, &[], &user("#sim chunk_size=5\nHello, wörld", true));
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.header("content-length"), None);
    assert!(response.complete);
    assert!(response.raw_body.ends_with(b"\r\n0\r\n\r\n"));

    let text = response.text();
    let created = text
        .split("\"created\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("created");
    let head = format!(
        r#"data: {{"id":"chatcmpl-sim1","object":"chat.completion.chunk","created":{created},"model":"sim-test","choices":"#
    );
    let content = |t: &str| {
        format!(r#"{head}[{{"index":0,"delta":{{"content":"{t}"}},"finish_reason":null}}]}}"#)
            + "\n\n"
    };
    let expected = [
        format!(r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":""}},"finish_reason":null}}]}}"#) + "\n\n",
        content("Hello"),
        content(", wör"),
        content("ld"),
        format!(r#"{head}[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}"#) + "\n\n",
        // prompt: 9 + 30 chars (directive included) → 10 tokens; 3 chunks.
        format!(r#"{head}[],"usage":{{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}}}}"#) + "\n\n",
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    assert_eq!(text, expected);
    let snap = stats(&addr);
    assert_eq!(
        (
            snap["streams_started"].as_u64(),
            snap["streams_completed"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[test]
fn status_knob_from_headers() {
    let addr = start(SimOptions::default());
    let response = chat(
        &addr,
        &[("x-sim-status", "429"), ("x-sim-retry-after", "7")],
        &user("hi", true),
    );
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("7"));
    assert_eq!(
        response.json(),
        json!({"error": {"message": "simulated 429", "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
    );
    assert_eq!(stats(&addr)["streams_started"], 0);
}

#[test]
fn cut_after_drops_the_connection_mid_stream() {
    let addr = start(SimOptions::default());
    let response = chat(
        &addr,
        &[],
        &user("#sim cut_after=1 chunk_size=2 role_chunk=off\nabcdef", true),
    );
    assert_eq!(response.status, 200);
    assert!(!response.complete, "no chunked terminator after a cut");
    let text = response.text();
    assert!(text.contains(r#""delta":{"content":"ab"}"#));
    assert!(!text.contains(r#""content":"cd""#));
    assert!(!text.contains("[DONE]"));
}

#[test]
fn error_after_sends_the_error_event() {
    let addr = start(SimOptions::default());
    let response = chat(
        &addr,
        &[],
        &user("#sim error_after=0 role_chunk=off\nabc", true),
    );
    assert!(response.complete);
    assert_eq!(
        response.text(),
        "data: {\"error\":{\"message\":\"simulated mid-stream failure\",\"type\":\"server_error\"}}\n\n"
    );
}

/// Opens a stream, reads its first bytes, closes the socket, and returns when it closed.
fn open_and_abandon(addr: &str, content: &str) -> u64 {
    let body = serde_json::to_vec(&user(content, true)).expect("serialise");
    let mut stream = send_request(addr, "POST", "/v1/chat/completions", &[], &body);
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).expect("first bytes");
    assert!(n > 0);
    drop(stream);
    unix_ms()
}

fn wait_for_cancel(addr: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let snap = stats(addr);
        if snap["streams_cancelled"] == 1 || Instant::now() > deadline {
            return snap;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn closing_the_client_mid_stream_counts_a_cancel_at_once() {
    let addr = start(SimOptions::default());
    // 5 s between chunks: only immediate detection can see the close within 100 ms.
    let closed_at = open_and_abandon(&addr, "#sim chunk_delay_ms=5000 chunk_size=1\nabc");
    let snap = wait_for_cancel(&addr);
    assert_eq!(snap["streams_cancelled"], 1);
    assert_eq!(snap["streams_completed"], 0);
    assert_eq!(snap["active_streams"], 0);
    let seen_at = snap["last_cancel_unix_ms"].as_u64().expect("ms");
    assert!(
        seen_at.saturating_sub(closed_at) <= 100,
        "cancel seen {} ms after close",
        seen_at - closed_at
    );
}

#[test]
fn closing_the_client_during_the_first_byte_delay_counts_a_cancel() {
    let addr = start(SimOptions::default());
    let body = serde_json::to_vec(&user("#sim first_byte_delay_ms=5000\nabc", true)).expect("json");
    let stream = send_request(&addr, "POST", "/v1/chat/completions", &[], &body);
    // Wait until the simulator has the request, then leave.
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats(&addr)["active_streams"] != 1 {
        assert!(Instant::now() < deadline, "stream never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stream);
    let closed_at = unix_ms();
    let snap = wait_for_cancel(&addr);
    assert_eq!(snap["streams_cancelled"], 1);
    let seen_at = snap["last_cancel_unix_ms"].as_u64().expect("ms");
    assert!(seen_at.saturating_sub(closed_at) <= 100);
}

#[test]
fn bad_json_and_bad_knobs_are_400() {
    let addr = start(SimOptions::default());
    let response = request(&addr, "POST", "/v1/chat/completions", &[], b"{not json");
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["type"], "invalid_request_error");
    let response = chat(&addr, &[("x-sim-chunk-sise", "3")], &user("hi", false));
    assert_eq!(response.status, 400);
    assert_eq!(
        response.json()["error"]["message"],
        "unknown simulator knob `chunk_sise`"
    );
}

#[test]
fn keys_rate_limits_and_fail_first() {
    let addr = start(SimOptions {
        require_key: vec!["good".into()],
        rate_limited_key: vec!["slow".into()],
        fail_first: 1,
        ..SimOptions::default()
    });
    let bad = chat(
        &addr,
        &[("Authorization", "Bearer nope")],
        &user("hi", false),
    );
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"]["message"], "Incorrect API key provided");
    let slow = chat(
        &addr,
        &[("Authorization", "Bearer slow")],
        &user("hi", false),
    );
    assert_eq!(slow.status, 429);
    assert_eq!(slow.header("retry-after"), Some("1"));
    assert_eq!(slow.json()["error"]["message"], "Rate limit reached");
    let first = chat(
        &addr,
        &[("Authorization", "Bearer good")],
        &user("hi", false),
    );
    assert_eq!(first.status, 503);
    let second = chat(
        &addr,
        &[("Authorization", "Bearer good")],
        &user("hi", false),
    );
    assert_eq!(second.status, 200);
    request(&addr, "POST", "/_sim/reset", &[], b"");
    let again = chat(
        &addr,
        &[("Authorization", "Bearer good")],
        &user("hi", false),
    );
    assert_eq!(again.status, 503, "reset re-arms --fail-first");
}

#[test]
fn request_log_stats_and_reset() {
    let addr = start(SimOptions::default());
    let big = "x".repeat(900 * 1024);
    let body = user(&big, false);
    let sent = serde_json::to_vec(&body).expect("json");
    let response = chat(
        &addr,
        &[("Authorization", "Bearer k"), ("X-Extra", "1")],
        &body,
    );
    assert_eq!(response.status, 200);

    let log = request(&addr, "GET", "/_sim/requests", &[], b"").json();
    let entry = &log[0];
    assert_eq!(entry["method"], "POST");
    assert_eq!(entry["path"], "/v1/chat/completions");
    assert_eq!(entry["body"], body);
    assert_eq!(entry["body_bytes"], sent.len());
    assert_eq!(entry["headers"]["authorization"], "Bearer k");
    assert_eq!(entry["headers"]["content-length"], sent.len().to_string());
    assert_eq!(entry["headers"]["x-extra"], "1");
    assert_eq!(entry["headers"]["host"], addr.as_str());

    let snap = stats(&addr);
    assert_eq!(
        (snap["requests"].as_u64(), snap["chat_requests"].as_u64()),
        (Some(1), Some(1))
    );
    let reset = request(&addr, "POST", "/_sim/reset", &[], b"");
    assert_eq!(reset.status, 200);
    assert_eq!(
        request(&addr, "GET", "/_sim/requests", &[], b"").text(),
        "[]"
    );
    assert_eq!(stats(&addr)["chat_requests"], 0);
}

#[test]
fn health_models_and_unknown_paths() {
    let addr = start(SimOptions::default());
    let health = request(&addr, "GET", "/health", &[], b"");
    assert_eq!(
        (health.status, health.text().as_str()),
        (200, r#"{"status":"ok"}"#)
    );
    let models = request(&addr, "GET", "/v1/models", &[], b"");
    assert_eq!(models.json()["data"][0]["id"], "simulated");
    let missing = request(&addr, "GET", "/nope", &[], b"");
    assert_eq!(missing.status, 404);
    let wrong = request(&addr, "GET", "/v1/chat/completions", &[], b"");
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("POST")));
}

#[test]
fn oversized_body_is_413() {
    let addr = start(SimOptions::default());
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        super::service::MAX_BODY_BYTES + 1
    );
    stream.write_all(head.as_bytes()).expect("head");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let response = parse_response(&raw);
    assert_eq!(response.status, 413);
    assert_eq!(
        response.json()["error"]["message"],
        "Request body exceeds 16777216 bytes."
    );
}

/// Reads exactly one response from a kept-alive connection.
fn read_one(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed before the response ended");
        raw.extend_from_slice(&buf[..n]);
        if raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let response = parse_response(&raw);
            if response.complete {
                return response;
            }
        }
    }
}

#[test]
fn connections_are_kept_alive_after_completions_and_streams() {
    let addr = start(SimOptions::default());
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for (round, streaming) in [false, true, false, true].into_iter().enumerate() {
        let body = serde_json::to_vec(&user(&format!("round {round}"), streaming)).expect("json");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("head");
        stream.write_all(&body).expect("body");
        let response = read_one(&mut stream);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
        assert!(response.text().contains(&format!("{round}")));
    }
    assert_eq!(stats(&addr)["chat_requests"], 4);
}

#[test]
fn stream_usage_off_omits_usage_even_when_asked_and_the_log_shows_the_ask() {
    let addr = start(SimOptions {
        stream_usage: false,
        ..SimOptions::default()
    });
    let stream = chat(&addr, &[], &user("hello", true)).text();
    assert!(stream.ends_with("data: [DONE]\n\n"), "{stream}");
    assert!(!stream.contains("usage"), "{stream}");
    // Whole replies keep their usage, as llama.cpp's server does.
    assert!(chat(&addr, &[], &user("hello", false)).json()["usage"].is_object());
    // A request header turns it back on for one request.
    let asked = chat(&addr, &[("x-sim-stream-usage", "on")], &user("hello", true)).text();
    assert!(asked.contains("\"usage\":{"), "{asked}");
    let mut unasked = user("hello", true);
    unasked["stream_options"] = json!({});
    chat(&addr, &[], &unasked);
    let log = request(&addr, "GET", "/_sim/requests", &[], b"").json();
    let asks: Vec<&Value> = log
        .as_array()
        .expect("log")
        .iter()
        .map(|r| &r["include_usage"])
        .collect();
    assert_eq!(
        asks,
        [&json!(true), &json!(true), &json!(true), &json!(false)]
    );
}
