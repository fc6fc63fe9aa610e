//! Throughput of the streaming-reply transcoder (upstream OpenAI SSE in, contract SSE out)
//! on a realistic ~1 MiB upstream body fed in 1-byte, 7-byte and 4 KiB pieces.

use std::hint::black_box;

use bytes::BytesMut;
use chatgate::chat::{DataFormat, StreamStatus, StreamTranscoder, DEFAULT_MAX_EVENT_BYTES};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TOKENS: [&str; 12] = [
    "Hello",
    ",",
    " I",
    " am",
    " XiaoZhi",
    ", the openEuler community assistant.",
    "\n\n",
    " 你好",
    "😀",
    " \"quoted\"",
    " code:\n```rust\nfn main() {}\n```",
    " How may I assist you today?",
];

/// One upstream chunk per token (20-200 bytes each) until the body reaches ~1 MiB.
fn upstream_body() -> Vec<u8> {
    let mut body = Vec::with_capacity(1 << 20);
    body.extend_from_slice(b"data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
    let mut i = 0;
    while body.len() < (1 << 20) {
        let token = serde_json::to_string(TOKENS[i % TOKENS.len()]).unwrap_or_default();
        // Alternate a full OpenAI chunk with the compact form some servers send.
        let chunk = if i % 2 == 0 {
            format!("data: {{\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{token}}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n")
        } else {
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":{token}}}}}]}}\n\n")
        };
        body.extend_from_slice(chunk.as_bytes());
        i += 1;
    }
    body.extend_from_slice(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":900,\"completion_tokens\":12000,\"total_tokens\":12900}}\n\ndata: [DONE]\n\n");
    body
}

fn transcode(body: &[u8], piece_size: usize, out: &mut BytesMut) -> StreamStatus {
    let mut stream = StreamTranscoder::new(DataFormat::Text, DEFAULT_MAX_EVENT_BYTES);
    out.clear();
    stream.start(out);
    let mut status = StreamStatus::Open;
    for piece in body.chunks(piece_size) {
        status = stream.feed(piece, out);
    }
    if status == StreamStatus::Open {
        status = stream.finish(out);
    }
    status
}

fn bench_transcoder(c: &mut Criterion) {
    let body = upstream_body();
    let mut out = BytesMut::with_capacity(body.len());
    let mut group = c.benchmark_group("sse_transcode");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for piece_size in [1, 7, 4096] {
        group.bench_with_input(
            BenchmarkId::new("piece_bytes", piece_size),
            &piece_size,
            |b, &size| b.iter(|| black_box(transcode(black_box(&body), size, &mut out))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_transcoder);
criterion_main!(benches);
