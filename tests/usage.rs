//! Issue 12 item 4, usage on every stream: `kind: openai` streams always ask the upstream
//! for usage and remove the chunk the client did not ask for, the client's `max_tokens`
//! drives the token reservation, and streams whose upstream never sends usage are
//! counted by chatgate and marked `source="estimated"`.

mod common;

use std::time::Duration;

use chatgate::chat::token_count;
use common::*;
use futures::StreamExt;
use serde_json::json;

const OPENAI_ROUTE: &str =
    "  - path: /v1/chat/completions\n    kind: openai\n    upstream: main\n    models: [test-model]\n";
const OPENAI_PATH: &str = "/v1/chat/completions";
const USER: &str = "temporary_user";

async fn stack(sim_flags: &[&str], openai_extra: &str, extra: &str) -> Stack {
    let sim = Simulator::start(sim_flags);
    let upstreams = upstream_block("main", &[sim.addr()], "");
    let routes = seed_routes("main") + OPENAI_ROUTE + openai_extra;
    Stack::start(vec![sim], upstreams, routes, extra).await
}

/// The whole body of a reply, read piece by piece.
async fn body_of(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.expect("piece"));
    }
    String::from_utf8(body).expect("utf-8 body")
}

/// The body with the simulator's per-response id and timestamp replaced by `N`.
fn normalize(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some((i, len)) = ["\"id\":\"chatcmpl-sim", "\"created\":"]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
        .min()
    {
        out.push_str(&rest[..i + len]);
        rest = rest[i + len..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out + rest
}

/// The SSE events of a body, each with its blank line.
fn events(body: &str) -> Vec<&str> {
    body.split_inclusive("\n\n").collect()
}

fn is_usage_chunk(event: &str) -> bool {
    event.contains("\"choices\":[],\"usage\":")
}

/// The `usage` of the usage chunk among `body`'s events.
fn usage_of(body: &str) -> (f64, f64) {
    let event = events(body)
        .into_iter()
        .find(|e| is_usage_chunk(e))
        .unwrap_or_else(|| panic!("no usage chunk in {body}"));
    let chunk: serde_json::Value =
        serde_json::from_str(event.trim().trim_start_matches("data: ")).expect("usage json");
    (
        chunk["usage"]["prompt_tokens"].as_f64().expect("prompt"),
        chunk["usage"]["completion_tokens"]
            .as_f64()
            .expect("completion"),
    )
}

fn tokens(m: &Metrics, route: &str, kind: &str, source: &str) -> f64 {
    m.sum(
        "chatgate_tokens_total",
        &[("route", route), ("kind", kind), ("source", source)],
    )
}

/// The metrics once `route` has answered `requests` requests (metrics follow the reply).
async fn metrics_after(gw: &Gateway, route: &str, requests: f64) -> Metrics {
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || gw.metrics(),
        |m| m.sum("chatgate_requests_total", &[("route", route)]) >= requests,
    )
    .await
}

/// Today's row of `users usage`: requests, prompt, completion, total, estimated; polled
/// until it counts `requests` (usage is written in batches).
async fn usage_today(gw: &Gateway, requests: u64) -> Vec<u64> {
    poll(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            let out = gw.users(&["usage", USER, "--days", "1"], None);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.lines()
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .skip(1)
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<u64>>()
        },
        |row| row.first().is_some_and(|&r| r >= requests),
    )
    .await
}

#[tokio::test]
async fn openai_stream_without_include_usage_is_charged_and_gets_no_usage_chunk() {
    let s = stack(&[], "", "").await;
    let content = "#sim chunk_size=3 chunk_delay_ms=20\nCount every token of this answer";
    let body = json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": content}],
        "stream": true
    });
    let via = body_of(s.post(OPENAI_PATH, body.to_string()).await).await;

    // The upstream was asked for usage although the client was not.
    let sent = s.sim().requests().await;
    let last = sent.last().expect("upstream request");
    assert_eq!(last["include_usage"], true, "{last}");
    assert_eq!(
        last["body"]["stream_options"],
        json!({"include_usage": true})
    );

    // The client's stream is the upstream's, byte for byte, without the usage chunk.
    let direct = client()
        .post(format!("http://{}/v1/chat/completions", s.sim().addr()))
        .body(last["body"].to_string())
        .send()
        .await
        .expect("direct");
    let direct = body_of(direct).await;
    let without_usage: String = events(&direct)
        .into_iter()
        .filter(|e| !is_usage_chunk(e))
        .collect();
    assert_ne!(without_usage, direct, "the simulator sent no usage chunk");
    assert_eq!(normalize(&via), normalize(&without_usage));
    assert!(!via.contains("\"usage\""), "{via}");
    assert!(via.ends_with("data: [DONE]\n\n"));

    // Its tokens are counted as the upstream reported them, in metrics and usage.
    let (prompt, completion) = usage_of(&direct);
    let m = metrics_after(&s.gw, OPENAI_PATH, 1.0).await;
    assert_eq!(tokens(&m, OPENAI_PATH, "prompt", "upstream"), prompt);
    assert_eq!(
        tokens(&m, OPENAI_PATH, "completion", "upstream"),
        completion
    );
    assert_eq!(tokens(&m, OPENAI_PATH, "prompt", "estimated"), 0.0);
    let row = usage_today(&s.gw, 1).await;
    assert_eq!(
        row,
        vec![
            1,
            prompt as u64,
            completion as u64,
            (prompt + completion) as u64,
            0
        ]
    );

    // A client that asks for usage still gets its chunk.
    let mut asking = body.clone();
    asking["stream_options"] = json!({"include_usage": true});
    let via = body_of(s.post(OPENAI_PATH, asking.to_string()).await).await;
    assert_eq!(usage_of(&via), (prompt, completion));
    let m = metrics_after(&s.gw, OPENAI_PATH, 2.0).await;
    assert_eq!(tokens(&m, OPENAI_PATH, "prompt", "upstream"), 2.0 * prompt);
}

#[tokio::test]
async fn the_clients_max_tokens_drive_the_token_reservation() {
    // 1000 tokens a minute on the route; without a client bound a call reserves ~10 + body/4.
    let s = stack(
        &[],
        "    rate_limits: {tokens_per_minute: 1000}\n",
        "rate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0\n  completion_estimate: 10\n",
    )
    .await;
    let request = |content: &str, bound: serde_json::Value| {
        let mut body = json!({
            "model": "test-model",
            "messages": [{"role": "user", "content": content}],
            "stream": true
        });
        if let serde_json::Value::Object(fields) = bound {
            body.as_object_mut().expect("object").extend(fields);
        }
        s.post(OPENAI_PATH, body.to_string())
    };
    // One slow stream is under way: 300 x 2 = 600 tokens reserved for its answer.
    let slow = "#sim chunk_delay_ms=150 chunk_size=1\nabcdefghij";
    let mut first = request(slow, json!({"max_tokens": 300, "n": 2})).await;
    assert_eq!(first.status(), 200);
    let _ = first.chunk().await;
    // Another such call would overshoot the minute's tokens: refused before the upstream.
    let seen = s.sim().stats().await["chat_requests"].as_u64();
    let refused = request("hi", json!({"max_completion_tokens": 600})).await;
    let (status, reply) = json_reply(refused).await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(s.sim().stats().await["chat_requests"].as_u64(), seen);
    // A call without a bound reserves the small default and fits.
    let unbounded = request("hi", json!({})).await;
    assert_eq!(unbounded.status(), 200);
    let _ = body_of(unbounded).await;
    while first.chunk().await.ok().flatten().is_some() {}
}

#[tokio::test]
async fn streams_without_upstream_usage_are_counted_and_marked_estimated() {
    // Like llama.cpp's server: usage in whole replies, never in streams.
    let s = stack(&["--stream-usage", "off"], "", "").await;
    let answer = "The quick brown fox jumps over the lazy dog. 你好，世界！";
    let content = format!("#sim chunk_size=5 reply=text:{answer}");

    let chat = s.post("/chatCompletionStream", user(&content)).await;
    assert_eq!(chat.status(), 200);
    let text = body_of(chat).await;
    assert!(text.contains("event: message"), "{text}");
    let chat_sent = s.sim().requests().await.last().expect("request")["body"].clone();
    assert_eq!(chat_sent["stream_options"], json!({"include_usage": true}));

    let openai = json!({
        "model": "test-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        "stream": true
    });
    let via = body_of(s.post(OPENAI_PATH, openai.to_string()).await).await;
    assert!(!via.contains("\"usage\""), "{via}");
    let openai_sent = s.sim().requests().await.last().expect("request")["body"].clone();

    // chatgate counted what the upstream received and what it streamed.
    let completion = token_count::count(answer) as f64;
    metrics_after(&s.gw, "/chatCompletionStream", 1.0).await;
    let m = metrics_after(&s.gw, OPENAI_PATH, 1.0).await;
    for (route, sent) in [
        ("/chatCompletionStream", &chat_sent),
        (OPENAI_PATH, &openai_sent),
    ] {
        let prompt = token_count::prompt_tokens(sent.to_string().as_bytes()) as f64;
        assert!(prompt > 10.0, "{route}: {prompt}");
        assert_eq!(
            tokens(&m, route, "prompt", "estimated"),
            prompt,
            "{route}\n{}",
            m.text
        );
        assert_eq!(tokens(&m, route, "completion", "estimated"), completion);
        assert_eq!(tokens(&m, route, "completion", "upstream"), 0.0);
    }
    let log = s.gw.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"target\":\"access\"") && l.contains("/chatCompletionStream"))
        .collect();
    assert!(
        access
            .iter()
            .any(|l| l.contains("\"tokens_estimated\":true")),
        "{access:?}"
    );
    let row = usage_today(&s.gw, 2).await;
    assert_eq!(row.len(), 5, "{row:?}");
    assert_eq!(
        row[4], row[3],
        "every token of the day was estimated: {row:?}"
    );

    // Whole replies carry usage: counted from the upstream, as before.
    let reply = s.post("/chatCompletion", user("hello there")).await;
    assert_eq!(reply.status(), 200);
    let m = metrics_after(&s.gw, "/chatCompletion", 1.0).await;
    assert!(tokens(&m, "/chatCompletion", "prompt", "upstream") > 0.0);
    assert_eq!(tokens(&m, "/chatCompletion", "prompt", "estimated"), 0.0);
}
