//! OpenAI wire formats the simulator writes: `chat.completion` bodies, error bodies and the
//! `chat.completion.chunk` SSE stream, planned up front as a list of writes, pauses and cuts.
//! Pure: no sockets here, so every byte is unit-tested.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::knobs::Knobs;
use super::reply::Reply;

/// The final SSE event of a normal stream.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// The event `error_after` sends instead of finishing the stream.
pub const MID_STREAM_ERROR_EVENT: &[u8] =
    b"data: {\"error\":{\"message\":\"simulated mid-stream failure\",\"type\":\"server_error\"}}\n\n";

/// Token counts reported in `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens: message characters / 4, rounded up.
    pub prompt_tokens: u64,
    /// Completion tokens: the number of content chunks.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Deterministic counts from the prompt's character count and the reply's chunk count.
    pub fn count(prompt_chars: usize, chunks: usize) -> Usage {
        let prompt_tokens = prompt_chars.div_ceil(4) as u64;
        let completion_tokens = chunks as u64;
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Identity fields shared by every object of one response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseMeta<'a> {
    /// `chatcmpl-...` id.
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The request's model, echoed.
    pub model: &'a str,
}

/// An OpenAI-style error body: `{"error":{"message","type","param":null,"code"}}`.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Inner<'a>,
    }
    #[derive(Serialize)]
    struct Inner<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<()>,
        code: Option<&'a str>,
    }
    let body = Body {
        error: Inner {
            message,
            kind,
            param: None,
            code,
        },
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// The OpenAI error `type` and `code` conventionally sent with an HTTP status.
pub fn error_kind(status: u16) -> (&'static str, Option<&'static str>) {
    match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    }
}

/// A non-streaming `chat.completion` body; `usage` is left out when `None`.
pub fn completion_body(meta: ResponseMeta<'_>, content: &str, usage: Option<Usage>) -> Bytes {
    #[derive(Serialize)]
    struct Completion<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        choices: [Choice<'a>; 1],
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        index: u32,
        message: Message<'a>,
        finish_reason: &'static str,
    }
    #[derive(Serialize)]
    struct Message<'a> {
        role: &'static str,
        content: &'a str,
    }
    let completion = Completion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content,
            },
            finish_reason: "stop",
        }],
        usage,
    };
    Bytes::from(serde_json::to_vec(&completion).unwrap_or_default())
}

/// Writes `data: {chat.completion.chunk}\n\n` events from a per-response template, so
/// each chunk costs one JSON string escape and a few copies.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    /// `data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,"choices":`
    head: Vec<u8>,
}

impl ChunkEncoder {
    /// Prepares the template for one response.
    pub fn new(meta: ResponseMeta<'_>) -> ChunkEncoder {
        let mut head = Vec::with_capacity(96 + meta.id.len() + meta.model.len());
        head.extend_from_slice(b"data: {\"id\":");
        push_json_str(&mut head, meta.id);
        head.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        head.extend_from_slice(meta.created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        push_json_str(&mut head, meta.model);
        head.extend_from_slice(b",\"choices\":");
        ChunkEncoder { head }
    }

    /// The role-only first chunk.
    pub fn role(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(
            b"[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        );
    }

    /// One content chunk.
    pub fn content(&self, out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"[{\"index\":0,\"delta\":{\"content\":");
        push_json_str(out, text);
        out.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
    }

    /// The chunk with an empty delta and `finish_reason: "stop"`.
    pub fn finish(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
    }

    /// The trailing `choices: []` chunk carrying `usage`.
    pub fn usage(&self, out: &mut Vec<u8>, usage: Usage) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"[],\"usage\":");
        // Serialising three integers cannot fail.
        let _ = serde_json::to_writer(&mut *out, &usage);
        out.extend_from_slice(b"}\n\n");
    }
}

/// One action of a planned stream body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write (and flush) these bytes as one body chunk.
    Send(Bytes),
    /// Stay silent this long (watching for the client to leave).
    Pause(Duration),
    /// Drop the connection without the chunked terminator; no step follows.
    Cut,
}

/// Plans the whole SSE body of a stream. Consecutive events without a pause between them
/// are merged into one `Send`, so a stream without delays is a single write.
///
/// Order: optional role chunk; content chunks with `chunk_delay` between them; then the
/// finish chunk, the usage chunk (when `usage` is given) and `[DONE]`. After `k` content
/// chunks, `stall_after == k` pauses for `stall`, then `error_after == k` sends the error
/// event and ends, then `cut_after == k` cuts; values beyond the chunk count act after the
/// last chunk.
pub fn plan_stream(
    encoder: &ChunkEncoder,
    reply: &Reply,
    knobs: &Knobs,
    usage: Option<Usage>,
) -> Vec<Step> {
    let mut plan = Planner::default();
    if knobs.role_chunk {
        encoder.role(&mut plan.pending);
    }
    let total = reply.pieces.len();
    let at = |knob: Option<usize>, k: usize| knob.map(|n| n.min(total)) == Some(k);
    for (k, chunk) in reply.chunks().map(Some).chain([None]).enumerate() {
        if at(knobs.stall_after, k) {
            plan.pause(knobs.stall);
        }
        if at(knobs.error_after, k) {
            match &knobs.error_message {
                Some(message) => {
                    let event =
                        serde_json::json!({"error": {"message": message, "type": "server_error"}});
                    plan.pending
                        .extend_from_slice(format!("data: {event}\n\n").as_bytes());
                }
                None => plan.pending.extend_from_slice(MID_STREAM_ERROR_EVENT),
            }
            return plan.finish();
        }
        if at(knobs.cut_after, k) {
            plan.flush();
            plan.steps.push(Step::Cut);
            return plan.steps;
        }
        let Some(chunk) = chunk else { break };
        if k > 0 {
            plan.pause(knobs.chunk_delay);
        }
        encoder.content(&mut plan.pending, chunk);
    }
    encoder.finish(&mut plan.pending);
    if let Some(usage) = usage {
        encoder.usage(&mut plan.pending, usage);
    }
    plan.pending.extend_from_slice(DONE_EVENT);
    plan.finish()
}

#[derive(Default)]
struct Planner {
    steps: Vec<Step>,
    pending: Vec<u8>,
}

impl Planner {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let bytes = std::mem::take(&mut self.pending);
            self.steps.push(Step::Send(Bytes::from(bytes)));
        }
    }

    fn pause(&mut self, duration: Duration) {
        if !duration.is_zero() {
            self.flush();
            self.steps.push(Step::Pause(duration));
        }
    }

    fn finish(mut self) -> Vec<Step> {
        self.flush();
        self.steps
    }
}

fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::reply::{Chunking, ReplySpec};
    use crate::simulator::SimOptions;

    const META: ResponseMeta<'static> = ResponseMeta {
        id: "chatcmpl-sim1",
        created: 1700000000,
        model: "m\"1",
    };
    const HEAD: &str = r#"data: {"id":"chatcmpl-sim1","object":"chat.completion.chunk","created":1700000000,"model":"m\"1","choices":"#;

    fn knobs() -> Knobs {
        Knobs::from_options(&SimOptions::default())
    }

    fn reply(text: &str, size: usize) -> Reply {
        Reply::build(&ReplySpec::Text(text.into()), "", Chunking::Size(size))
    }

    fn content(text: &str) -> String {
        format!(
            "{HEAD}[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            serde_json::to_string(text).unwrap()
        )
    }

    fn role() -> String {
        format!("{HEAD}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n")
    }

    fn finish() -> String {
        format!("{HEAD}[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n")
    }

    fn send(text: String) -> Step {
        Step::Send(Bytes::from(text))
    }

    #[test]
    fn usage_counts_are_deterministic() {
        assert_eq!(
            Usage::count(9, 3),
            Usage {
                prompt_tokens: 3,
                completion_tokens: 3,
                total_tokens: 6
            }
        );
        assert_eq!(Usage::count(0, 0).total_tokens, 0);
        assert_eq!(Usage::count(8, 1).prompt_tokens, 2);
    }

    #[test]
    fn error_body_has_the_openai_shape() {
        assert_eq!(
            error_body("simulated 503", "server_error", None),
            &br#"{"error":{"message":"simulated 503","type":"server_error","param":null,"code":null}}"#[..]
        );
        assert_eq!(
            error_kind(401),
            ("invalid_request_error", Some("invalid_api_key"))
        );
        assert_eq!(error_kind(429), ("requests", Some("rate_limit_exceeded")));
        assert_eq!(error_kind(502), ("server_error", None));
        assert_eq!(error_kind(413), ("invalid_request_error", None));
    }

    #[test]
    fn completion_body_is_a_chat_completion() {
        let body = completion_body(META, "Hi \"you\"", Some(Usage::count(4, 2)));
        assert_eq!(
            body,
            &br#"{"id":"chatcmpl-sim1","object":"chat.completion","created":1700000000,"model":"m\"1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"you\""},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#[..]
        );
        let bare = completion_body(META, "x", None);
        assert!(!String::from_utf8_lossy(&bare).contains("usage"));
    }

    #[test]
    fn fast_stream_is_one_write_with_exact_framing() {
        let encoder = ChunkEncoder::new(META);
        let usage = Usage::count(5, 2);
        let steps = plan_stream(&encoder, &reply("Hé\n!", 2), &knobs(), Some(usage));
        let expected = [
            role(),
            content("Hé"),
            content("\n!"),
            finish(),
            format!("{HEAD}[],\"usage\":{{\"prompt_tokens\":2,\"completion_tokens\":2,\"total_tokens\":4}}}}\n\n"),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        assert_eq!(steps, vec![send(expected)]);
    }

    #[test]
    fn chunk_delay_separates_content_chunks_only() {
        let encoder = ChunkEncoder::new(META);
        let mut k = knobs();
        k.chunk_delay = Duration::from_millis(7);
        k.role_chunk = false;
        let steps = plan_stream(&encoder, &reply("abc", 1), &k, None);
        let pause = Step::Pause(Duration::from_millis(7));
        assert_eq!(
            steps,
            vec![
                send(content("a")),
                pause.clone(),
                send(content("b")),
                pause,
                send([content("c"), finish(), "data: [DONE]\n\n".into()].concat()),
            ]
        );
    }

    #[test]
    fn error_after_ends_with_the_error_event() {
        let encoder = ChunkEncoder::new(META);
        let mut k = knobs();
        k.error_after = Some(1);
        let steps = plan_stream(&encoder, &reply("abc", 1), &k, None);
        let expected = [
            role(),
            content("a"),
            String::from_utf8_lossy(MID_STREAM_ERROR_EVENT).into_owned(),
        ]
        .concat();
        assert_eq!(steps, vec![send(expected)]);
    }

    #[test]
    fn cut_after_sends_then_cuts() {
        let encoder = ChunkEncoder::new(META);
        let mut k = knobs();
        k.cut_after = Some(2);
        k.role_chunk = false;
        let steps = plan_stream(&encoder, &reply("abc", 1), &k, None);
        assert_eq!(
            steps,
            vec![send([content("a"), content("b")].concat()), Step::Cut]
        );
        k.cut_after = Some(0);
        assert_eq!(
            plan_stream(&encoder, &reply("abc", 1), &k, None),
            vec![Step::Cut]
        );
    }

    #[test]
    fn stall_after_pauses_then_continues_and_large_values_act_at_the_end() {
        let encoder = ChunkEncoder::new(META);
        let mut k = knobs();
        k.role_chunk = false;
        k.stall_after = Some(1);
        k.stall = Duration::from_secs(60);
        let steps = plan_stream(&encoder, &reply("ab", 1), &k, None);
        assert_eq!(
            steps,
            vec![
                send(content("a")),
                Step::Pause(Duration::from_secs(60)),
                send([content("b"), finish(), "data: [DONE]\n\n".into()].concat()),
            ]
        );
        k.stall_after = None;
        k.cut_after = Some(99);
        assert_eq!(
            plan_stream(&encoder, &reply("ab", 1), &k, None),
            vec![send([content("a"), content("b")].concat()), Step::Cut]
        );
    }

    #[test]
    fn empty_reply_still_finishes() {
        let encoder = ChunkEncoder::new(META);
        let mut k = knobs();
        k.role_chunk = false;
        let steps = plan_stream(&encoder, &reply("", 4), &k, None);
        assert_eq!(
            steps,
            vec![send([finish(), "data: [DONE]\n\n".into()].concat())]
        );
    }
}
