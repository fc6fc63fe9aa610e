//! Fuzzes the chat body parser: any bytes either fail with a `MessagesError` or give at
//! least one message, which the rewrite then turns into valid JSON.
#![no_main]

use chatgate::chat::{build_openai_body, parse_messages, UpstreamRequestSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(messages) = parse_messages(data) else {
        return;
    };
    assert!(!messages.is_empty());
    let params = serde_json::Map::new();
    let body = build_openai_body(
        &messages,
        &UpstreamRequestSpec {
            model: "m",
            system_prompt: Some("sys"),
            params: &params,
            stream: true,
            include_usage: true,
        },
    );
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
    assert!(parsed.is_ok(), "rewrite produced invalid JSON");
});
