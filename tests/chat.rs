//! Chat routes end to end: request validation and rewrite, the JSON reply,
//! byte-exact SSE framing, failures before and after the first byte,
//! keep-alives, cancellation and retries — real gateway, real Redis, the
//! built-in simulator over sockets.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures::StreamExt;
use serde_json::json;

const SYSTEM_PROMPT: &str = "You are the openEuler community assistant, your name is XiaoZhi.";

async fn setup(sim_flags: &[&str]) -> Stack {
    let sim = Simulator::start(sim_flags);
    let upstreams = upstream_block("main", &[sim.addr()], "");
    Stack::start(vec![sim], upstreams, seed_routes("main"), "").await
}

/// The SSE body for these `data` texts in text mode, with the empty first and last events.
fn sse_text(parts: &[&str]) -> String {
    let mut out = String::from("event: message\ndata: \n\n");
    for p in parts {
        out += "event: message\n";
        for line in p.split('\n') {
            out += &format!("data: {line}\n");
        }
        out += "\n";
    }
    out + "event: message\ndata: \n\n"
}

#[tokio::test]
async fn chat_completion_echoes_with_system_prompt_and_case_insensitive_keys() {
    let s = setup(&[]).await;
    let body = r#"[{"Role":"user","Content":"What is your name."}]"#;
    let resp = s.post("/chatCompletion", body).await;
    let (status, reply) = json_reply(resp).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"message": "What is your name."}));

    let seen = s.sim().requests().await;
    let last = seen.last().expect("the simulator saw the request");
    assert_eq!(last["path"], "/v1/chat/completions");
    assert_eq!(last["body"]["model"], "test-model");
    assert_eq!(last["body"]["stream"], false);
    assert_eq!(
        last["body"]["messages"],
        json!([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is your name."}])
    );
    let headers = &last["headers"];
    assert_eq!(headers["host"], s.sim().addr());
    assert!(headers.get("accept-encoding").is_none(), "{headers}");
    assert!(headers.get("cookie").is_none(), "{headers}");
    assert!(
        !headers.to_string().contains(&s.token),
        "the client's JWT went upstream"
    );

    // A client system message replaces the route's prompt.
    let body =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]);
    let (status, _) = json_reply(s.post("/chatCompletion", body.to_string()).await).await;
    assert_eq!(status, 200);
    let seen = s.sim().requests().await;
    assert_eq!(seen.last().expect("request")["body"]["messages"], body);
}

#[tokio::test]
async fn invalid_bodies_get_400_naming_index_and_field() {
    let s = setup(&[]).await;
    let cases = [
        ("not json", "Invalid request: body is not valid JSON"),
        (
            r#"{"role":"user","content":"x"}"#,
            "Invalid request: body must be a JSON array of messages",
        ),
        ("[]", "Invalid request: at least one message is required"),
        (
            r#"[{"role":"user","content":"a"},{"role":"robot","content":"b"}]"#,
            "Invalid request: messages[1].role",
        ),
        (
            r#"[{"role":"user","content":5}]"#,
            "Invalid request: messages[0].content must be a string",
        ),
        (
            r#"[{"role":"user"}]"#,
            "Invalid request: messages[0].content is missing",
        ),
        (
            r#"[{"role":"user","content":"a"}, 7]"#,
            "Invalid request: messages[1] must be an object",
        ),
    ];
    let before = s.sim().stats().await["chat_requests"].as_u64();
    for (body, expected) in cases {
        let (status, reply) = json_reply(s.post("/chatCompletion", body).await).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(
            error_message(&reply).starts_with(expected),
            "{body}: {reply}"
        );
    }
    assert_eq!(
        s.sim().stats().await["chat_requests"].as_u64(),
        before,
        "a bad request reached the upstream"
    );
}

#[tokio::test]
async fn bodies_of_every_size_are_forwarded_intact_and_oversize_is_413() {
    let s = setup(&[]).await;
    for size in [100usize, 60 << 10, 900 << 10] {
        let filler: String = "你好 abc ".chars().cycle().take(size / 2).collect();
        let history = json!([
            {"role": "user", "content": filler},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "last question"}
        ]);
        let text = history.to_string();
        let (status, reply) = json_reply(s.post("/chatCompletion", text.clone()).await).await;
        assert_eq!(status, 200, "size {size}: {reply}");
        assert_eq!(reply["message"], "last question");
        let seen = s.sim().requests().await;
        let body = &seen.last().expect("request")["body"];
        assert_eq!(
            body["messages"][1]["content"], filler,
            "size {size}: history altered"
        );
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(4));
    }
    let big = user(&"x".repeat(2 << 20));
    let (status, reply) = json_reply(s.post("/chatCompletion", big).await).await;
    assert_eq!(
        (status, error_message(&reply)),
        (413, "Invalid request: body exceeds 1048576 bytes")
    );
}

#[tokio::test]
async fn stream_framing_is_byte_exact() {
    let s = setup(&[]).await;
    let resp = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=5\nHello, XiaoZhi."),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h.get("content-type").map(|v| v.to_str().unwrap_or("")),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(
        h.get("cache-control").map(|v| v.to_str().unwrap_or("")),
        Some("no-cache")
    );
    assert_eq!(
        h.get("x-accel-buffering").map(|v| v.to_str().unwrap_or("")),
        Some("no")
    );
    let text = resp.text().await.expect("body");
    assert_eq!(text, sse_text(&["Hello", ", Xia", "oZhi."]));

    let seen = s.sim().requests().await;
    let body = &seen.last().expect("request")["body"];
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn stream_splits_line_breaks_and_keeps_multibyte_text() {
    let s = setup(&[]).await;
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunks=1 reply=text:a\\nb\\r\\nc"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(text, "event: message\ndata: \n\nevent: message\ndata: a\ndata: b\ndata: c\n\nevent: message\ndata: \n\n");

    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim reply=multibyte chunk_size=1"),
        )
        .await
        .text()
        .await
        .expect("body");
    let joined: String = text
        .split("\n\n")
        .filter_map(|ev| ev.strip_prefix("event: message\ndata: "))
        .collect();
    assert!(joined.contains("你好"), "{text}");
    assert!(text.ends_with("event: message\ndata: \n\n"));
}

/// A `\r\n` that the upstream sends in two chunks is one line break for the client: the
/// `\n` opening the next chunk is not a second one (issue 17).
#[tokio::test]
async fn a_crlf_split_across_upstream_chunks_stays_one_line_break() {
    let s = setup(&[]).await;
    // chunk_size=4: "abc\r" then "\nd".
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=4 reply=text:abc\\r\\nd"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(
        text,
        "event: message\ndata: \n\nevent: message\ndata: abc\ndata: \n\n\
         event: message\ndata: d\n\nevent: message\ndata: \n\n"
    );
    // chunk_size=1: the "\n" is a chunk of its own and adds nothing, not even an empty event.
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=1 reply=text:a\\r\\nb"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(
        text,
        "event: message\ndata: \n\nevent: message\ndata: a\n\n\
         event: message\ndata: \ndata: \n\nevent: message\ndata: b\n\n\
         event: message\ndata: \n\n"
    );
}

#[tokio::test]
async fn json_data_format_keeps_bare_newline_tokens() {
    let sim = Simulator::start(&[]);
    let upstreams = upstream_block("main", &[sim.addr()], "");
    let routes = "  - path: /chatCompletionStream\n    kind: chat_stream\n    upstream: main\n    model: m\n    data_format: json\n".to_string();
    let s = Stack::start(vec![sim], upstreams, routes, "").await;
    let text = s
        .post("/chatCompletionStream", user("#sim reply=newlines"))
        .await
        .text()
        .await
        .expect("body");
    assert!(text.starts_with("event: message\ndata: \"\"\n\n"), "{text}");
    assert!(text.ends_with("event: message\ndata: \"\"\n\n"), "{text}");
    let mut joined = String::new();
    for ev in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = ev
            .strip_prefix("event: message\ndata: ")
            .unwrap_or_else(|| panic!("bad event {ev:?}"));
        assert!(!data.contains('\n'));
        joined += &serde_json::from_str::<String>(data).expect("JSON string literal");
    }
    assert!(joined.contains("\n\n"), "paragraph breaks lost: {joined:?}");
    assert!(
        text.contains("data: \"\\n\"\n"),
        "no bare newline token event: {text}"
    );
}

#[tokio::test]
async fn upstream_failures_before_the_reply_are_500() {
    let s = setup(&[]).await;
    let (status, reply) =
        json_reply(s.post("/chatCompletion", user("#sim status=400")).await).await;
    assert_eq!(status, 500);
    assert_eq!(
        error_message(&reply),
        "Failed with chatbot.ChatCompletion: upstream returned 400 Bad Request: simulated 400"
    );
    let (status, reply) = json_reply(
        s.post("/chatCompletionStream", user("#sim status=404"))
            .await,
    )
    .await;
    assert_eq!(status, 500);
    assert!(error_message(&reply)
        .starts_with("Failed with chatbot.ChatCompletion: upstream returned 404"));

    // Nothing listens: connect error after the retries.
    let port = free_port();
    let upstreams = upstream_block("main", &[format!("127.0.0.1:{port}")], "    retries: 1\n");
    let dead = Stack::start(Vec::new(), upstreams, seed_routes("main"), "").await;
    let (status, reply) = json_reply(dead.post("/chatCompletion", user("hi")).await).await;
    assert_eq!(status, 500);
    assert!(
        error_message(&reply)
            .starts_with("Failed with chatbot.ChatCompletion: cannot connect to upstream"),
        "{reply}"
    );
}

#[tokio::test]
async fn failures_after_the_first_event_end_with_an_error_event() {
    let s = setup(&[]).await;
    for (directive, cause) in [
        (
            "#sim chunk_size=2 error_after=2",
            "simulated mid-stream failure",
        ),
        (
            "#sim chunk_size=2 cut_after=2",
            "upstream connection failed",
        ),
    ] {
        let text = s
            .post(
                "/chatCompletionStream",
                user(&format!("{directive}\nabcdefgh")),
            )
            .await
            .text()
            .await
            .expect("body");
        let expected_start = "event: message\ndata: \n\nevent: message\ndata: ab\n\nevent: message\ndata: cd\n\nevent: error\ndata: {\"errorMessage\": \"Failed with chatbot.ChatCompletion: ";
        assert!(text.starts_with(expected_start), "{directive}: {text}");
        assert!(text.contains(cause), "{directive}: {text}");
        assert!(text.ends_with("\"}\n\n"), "{directive}: {text}");
        assert_eq!(
            text.matches("data: \n").count(),
            1,
            "{directive}: closing empty event after an error"
        );
    }
}

#[tokio::test]
async fn idle_upstream_times_out_and_silence_gets_keepalives() {
    let sim = Simulator::start(&[]);
    let upstreams = upstream_block("main", &[sim.addr()], "")
        .replace("idle_timeout: 5s", "idle_timeout: 1500ms");
    let routes = "  - path: /chatCompletionStream\n    kind: chat_stream\n    upstream: main\n    model: m\n    keepalive_interval: 300ms\n".to_string();
    let s = Stack::start(vec![sim], upstreams, routes, "").await;

    // Slow but alive: keep-alive comments between events, complete answer.
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=3 chunk_delay_ms=700\nabcdef"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains(": keep-alive\n\n"), "{text}");
    assert_eq!(
        text.replace(": keep-alive\n\n", ""),
        sse_text(&["abc", "def"])
    );

    // Stalled: an error event once the idle timeout passes.
    let started = Instant::now();
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=3 stall_after=1\nabcdef"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains("event: error\n"), "{text}");
    assert!(text.contains("timed out"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_at_once() {
    let s = setup(&[]).await;
    let body = user("#sim chunk_size=1 chunk_delay_ms=200\nabcdefghijklmnopqrstuvwxyz");
    let request = format!(
        "POST /chatCompletionStream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        s.token,
        body.len(),
        body
    );
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.gw.port)).expect("connect");
    sock.write_all(request.as_bytes()).expect("send");
    let mut buf = [0u8; 4096];
    let mut seen = String::new();
    while !seen.contains("data: b") {
        let n = sock.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early: {seen}");
        seen += &String::from_utf8_lossy(&buf[..n]);
    }
    let closed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    drop(sock);
    let stats = poll(
        Duration::from_secs(3),
        Duration::from_millis(20),
        || s.sim().stats(),
        |stats| stats["streams_cancelled"].as_u64() == Some(1),
    )
    .await;
    assert_eq!(
        stats["streams_cancelled"].as_u64(),
        Some(1),
        "upstream never cancelled: {stats}"
    );
    let at = stats["last_cancel_unix_ms"].as_u64().unwrap_or(0);
    assert!(
        at.saturating_sub(closed_at) < 100,
        "upstream cancelled {} ms after the client left",
        at - closed_at
    );
    assert_eq!(stats["active_streams"], 0);
}

#[tokio::test]
async fn retries_move_to_the_next_endpoint_before_the_first_byte() {
    // One endpoint answers 503 to its first requests, one refuses connections, one works.
    let failing = Simulator::start(&["--fail-first", "100", "--name", "failing"]);
    let healthy = Simulator::start(&["--name", "healthy"]);
    let refused = format!("127.0.0.1:{}", free_port());
    let upstreams = upstream_block(
        "main",
        &[failing.addr(), refused, healthy.addr()],
        "    retries: 2\n",
    );
    let s = Stack::start(vec![failing, healthy], upstreams, seed_routes("main"), "").await;
    for i in 0..6 {
        let (status, reply) =
            json_reply(s.post("/chatCompletion", user(&format!("q{i}"))).await).await;
        assert_eq!(
            (status, reply["message"].as_str()),
            (200, Some(format!("q{i}").as_str())),
            "{reply}"
        );
        let text = s
            .post("/chatCompletionStream", user(&format!("s{i}")))
            .await
            .text()
            .await
            .expect("body");
        assert_eq!(text, sse_text(&[&format!("s{i}")]));
    }
    assert!(
        s.sims[0].stats().await["chat_requests"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the failing endpoint was never tried"
    );

    // 429 with a key pool: the throttled key is rested, the other key serves.
    let sim = Simulator::start(&[
        "--require-key",
        "sk-good",
        "--require-key",
        "sk-limited",
        "--rate-limited-key",
        "sk-limited",
    ]);
    let upstreams = upstream_block(
        "main",
        &[sim.addr()],
        "    api_keys_env: TEST_UPSTREAM_KEYS\n    retries: 1\n",
    );
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstreams;
    cfg.routes = seed_routes("main");
    cfg.env = vec![("TEST_UPSTREAM_KEYS".into(), "sk-limited,sk-good".into())];
    let gw = Gateway::start(cfg);
    gw.add_user("u", "p");
    let token = login(&gw, "u", "p").await;
    for _ in 0..4 {
        let resp = client()
            .post(gw.url("/chatCompletion"))
            .header("authorization", format!("Bearer {token}"))
            .body(user("keyed"))
            .send()
            .await
            .expect("chat");
        assert_eq!(json_reply(resp).await.0, 200);
    }
    let seen = sim.requests().await;
    let keys: Vec<String> = seen
        .iter()
        .map(|r| {
            r["headers"]["authorization"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        keys.iter().filter(|k| *k == "Bearer sk-limited").count(),
        1,
        "{keys:?}"
    );
    let log = gw.log();
    assert!(
        !log.contains("sk-limited") && !log.contains("sk-good"),
        "an API key reached the log"
    );
}

#[tokio::test]
async fn no_retry_after_the_first_byte() {
    let failing = Simulator::start(&[]);
    let healthy = Simulator::start(&[]);
    let upstreams = upstream_block(
        "main",
        &[failing.addr(), healthy.addr()],
        "    retries: 2\n",
    );
    let s = Stack::start(vec![failing, healthy], upstreams, seed_routes("main"), "").await;
    let text = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=2 cut_after=1\nabcdef"),
        )
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains("event: error"), "{text}");
    let total = s.sims[0].stats().await["chat_requests"]
        .as_u64()
        .unwrap_or(0)
        + s.sims[1].stats().await["chat_requests"]
            .as_u64()
            .unwrap_or(0);
    assert_eq!(
        total, 1,
        "the request was retried after bytes went to the client"
    );
}

#[tokio::test]
async fn stream_events_arrive_as_they_are_produced() {
    let s = setup(&[]).await;
    let resp = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=4 chunk_delay_ms=300\naaaabbbbcccc"),
        )
        .await;
    let started = Instant::now();
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut seen = String::new();
    while let Some(chunk) = stream.next().await {
        seen += &String::from_utf8_lossy(&chunk.expect("chunk"));
        for token in ["aaaa", "bbbb", "cccc"] {
            if seen.contains(token) && arrivals.iter().all(|(t, _)| *t != token) {
                arrivals.push((token, started.elapsed()));
            }
        }
    }
    assert_eq!(arrivals.len(), 3, "{seen}");
    // Each token arrives on its own, not all at the end: the gaps follow the upstream's.
    assert!(
        arrivals[2].1 - arrivals[0].1 >= Duration::from_millis(450),
        "{arrivals:?}"
    );
}
