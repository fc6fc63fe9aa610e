//! No key material reaches a client or a log line: an upstream that answers
//! with the key it was sent (whole, as some compatible servers do, or masked,
//! as OpenAI does) for 401, 403, 429 and 500, on every route kind, and in a
//! mid-stream error event.

mod common;

use common::*;
use serde_json::json;

/// Shaped like an OpenAI project key.
const SHAPED_KEY: &str = "sk-proj-Q3v8LmT2xWc9RbN4kJ7hY1pZ5sD6fG0a";
/// A vLLM `--api-key` an operator made up: no credential shape at all.
const PLAIN_KEY: &str = "oe7Vq-k42Zt-9wXr-m3Lp";

fn routes(upstream: &str, prefix: &str) -> String {
    format!(
        "  - path: {prefix}/chat\n    kind: chat\n    upstream: {upstream}\n    model: test-model\n  - path: {prefix}/stream\n    kind: chat_stream\n    upstream: {upstream}\n    model: test-model\n  - path: {prefix}/v1/chat/completions\n    kind: openai\n    upstream: {upstream}\n    model: test-model\n"
    )
}

/// The request body for a route kind, carrying simulator directives.
fn body(kind: &str, directive: &str) -> String {
    let text = format!("#sim {directive}\nhello");
    if kind == "openai" {
        json!({"model": "test-model", "stream": true,
               "messages": [{"role": "user", "content": text}]})
        .to_string()
    } else {
        user(&text)
    }
}

fn fragments(key: &str) -> Vec<String> {
    // Any 6 characters of the key in a row, and the masked forms' visible ends.
    let mut out: Vec<String> = (0..=key.len() - 6)
        .map(|i| key[i..i + 6].to_string())
        .collect();
    out.push(format!("{}****", &key[..4]));
    out
}

#[tokio::test]
async fn upstream_error_texts_never_carry_the_key() {
    let sim = Simulator::start(&[]);
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block(
        "shaped",
        &[sim.addr()],
        "    api_keys_env: CG_SHAPED_KEY\n    retries: 0\n",
    ) + &upstream_block(
        "plain",
        &[sim.addr()],
        "    api_keys_env: CG_PLAIN_KEY\n    retries: 0\n",
    );
    cfg.routes = routes("shaped", "/shaped") + &routes("plain", "/plain");
    cfg.env = vec![
        ("CG_SHAPED_KEY".into(), SHAPED_KEY.into()),
        ("CG_PLAIN_KEY".into(), PLAIN_KEY.into()),
        // Debug logs include every failed upstream attempt with its cause.
        ("RUST_LOG".into(), "debug".into()),
    ];
    let gw = Gateway::start(cfg);
    gw.add_user("temporary_user", "default_password");
    let token = login(&gw, "temporary_user", "default_password").await;

    let mut replies = String::new();
    for (prefix, key) in [("/shaped", SHAPED_KEY), ("/plain", PLAIN_KEY)] {
        for kind in ["chat", "stream", "openai"] {
            let path = match kind {
                "openai" => format!("{prefix}/v1/chat/completions"),
                _ => format!("{prefix}/{kind}"),
            };
            for quote in ["whole", "masked"] {
                for status in [401, 403, 429, 500] {
                    let resp = client()
                        .post(gw.url(&path))
                        .header("authorization", format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .body(body(kind, &format!("status={status} quote_key={quote}")))
                        .send()
                        .await
                        .expect("chat");
                    assert_eq!(resp.status(), 500, "{path} {status} {quote}");
                    let text = resp.text().await.expect("body");
                    let value: serde_json::Value =
                        serde_json::from_str(&text).expect("JSON error body");
                    let message = value["errorMessage"].as_str().expect("errorMessage");
                    match status {
                        401 => assert_eq!(
                            message,
                            "Failed with chatbot.ChatCompletion: upstream rejected the gateway's credentials (401 Unauthorized)"
                        ),
                        403 => assert_eq!(
                            message,
                            "Failed with chatbot.ChatCompletion: upstream rejected the gateway's credentials (403 Forbidden)"
                        ),
                        _ => {
                            // The rest of the upstream's message is still passed on.
                            assert!(
                                message.contains("Incorrect API key provided: [redacted]")
                                    && message.contains(&format!("upstream returned {status}")),
                                "{path} {status} {quote}: {message}"
                            );
                        }
                    }
                    replies.push_str(&text);
                }
                // Mid-stream: the upstream's error event quotes the key after the first bytes.
                if kind == "stream" {
                    let resp = client()
                        .post(gw.url(&path))
                        .header("authorization", format!("Bearer {token}"))
                        .body(body(kind, &format!("error_after=1 quote_key={quote}")))
                        .send()
                        .await
                        .expect("stream");
                    assert_eq!(resp.status(), 200);
                    let text = resp.text().await.expect("stream body");
                    assert!(
                        text.contains("event: error\ndata: {\"errorMessage\": \"Failed with chatbot.ChatCompletion: upstream error: Incorrect API key provided: [redacted]"),
                        "{path} {quote}: {text}"
                    );
                    replies.push_str(&text);
                }
            }
        }
        // The simulator did see the key, so the texts above were built from it.
        let seen = sim.requests().await;
        assert!(seen
            .iter()
            .any(|r| r["headers"]["authorization"] == format!("Bearer {key}")));
    }

    let log = gw.log();
    assert!(
        log.contains("upstream attempt failed"),
        "no attempt was logged at debug level:\n{log}"
    );
    for key in [SHAPED_KEY, PLAIN_KEY] {
        for piece in fragments(key) {
            assert!(!replies.contains(&piece), "a reply holds {piece:?}");
            assert!(!log.contains(&piece), "the log holds {piece:?}");
        }
    }
}
