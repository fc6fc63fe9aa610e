//! Cost of the request rewrite (parse the client's message array, write the OpenAI body)
//! for a single message and for a 500 KiB conversation history.

use std::hint::black_box;

use chatgate::chat::{build_openai_body, parse_messages, UpstreamRequestSpec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Map, Value};

/// A client body of alternating user/assistant messages, about `target` bytes long.
fn history_body(target: usize) -> Vec<u8> {
    let text = "Explain how \"openEuler\" schedules tasks,\nwith an example. 你好 😀 ";
    let mut messages = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < target {
        let content = text.repeat(1 + i % 8);
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        size += content.len() + 32;
        messages.push(json!({"role": role, "content": content}));
        i += 1;
    }
    serde_json::to_vec(&Value::Array(messages)).unwrap_or_default()
}

fn bench_rewrite(c: &mut Criterion) {
    let mut params = Map::new();
    params.insert("max_tokens".to_owned(), json!(1024));
    params.insert("temperature".to_owned(), json!(0.7));
    let spec = UpstreamRequestSpec {
        model: "gpt-4o-mini",
        system_prompt: Some("You are the openEuler community assistant, your name is XiaoZhi."),
        params: &params,
        stream: true,
        include_usage: true,
    };
    let single = br#"[{"role":"user","content":"What is your name."}]"#.to_vec();
    let history = history_body(500 * 1024);

    let mut group = c.benchmark_group("rewrite");
    for (name, body) in [("one_message", &single), ("history_500KiB", &history)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let messages = parse_messages(black_box(body)).unwrap_or_default();
                black_box(build_openai_body(&messages, &spec))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_rewrite);
criterion_main!(benches);
