//! Token counts chatgate makes itself when an upstream streams no usage (llama.cpp's
//! server, llama-cpp-python 0.3.x): OpenAI's o200k_base BPE from `tiktoken-rs`, whose
//! vocabulary is compiled into the binary. It is loaded once, on first use (~20 MB).

use serde::Deserialize;
use serde_json::Value;

/// Text kept per stream for counting; beyond it the rest counts at 4 bytes a token.
pub const MAX_KEPT_COMPLETION_BYTES: usize = 1 << 20;

/// Tokens OpenAI adds around each message of a chat (`<|im_start|>role ... <|im_end|>`).
const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens OpenAI adds once per chat to prime the reply.
const TOKENS_PER_REPLY: u64 = 3;

/// Loads the vocabulary now (it takes a fraction of a second); later counts are quick.
pub fn load() {
    tiktoken_rs::o200k_base_singleton();
}

/// o200k_base tokens of `text` (special-token text counts as ordinary text).
pub fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// Prompt tokens of an OpenAI chat-completions request body, counted the way OpenAI
/// bills chats: each message's role, text and name (plus 1), 3 tokens per message, 3
/// for the reply.
/// Non-text parts (images, tool calls) are not counted. A body that is not such a
/// request counts as one token per 4 bytes.
pub fn prompt_tokens(body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Request {
        messages: Vec<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        role: Option<String>,
        #[serde(default)]
        content: Value,
        #[serde(default)]
        name: Option<String>,
    }
    let Ok(request) = serde_json::from_slice::<Request>(body) else {
        return (body.len() as u64).div_ceil(4);
    };
    let mut tokens = TOKENS_PER_REPLY;
    for message in &request.messages {
        tokens += TOKENS_PER_MESSAGE + message.role.as_deref().map_or(0, count);
        match &message.content {
            Value::String(text) => tokens += count(text),
            Value::Array(parts) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        tokens += count(text);
                    }
                }
            }
            _ => {}
        }
        if let Some(name) = &message.name {
            tokens += 1 + count(name);
        }
    }
    tokens
}

/// The text of a streamed answer, kept (up to [`MAX_KEPT_COMPLETION_BYTES`]) so its
/// tokens can be counted when the upstream reports none.
#[derive(Debug, Default)]
pub struct CompletionText {
    text: String,
    /// Bytes of deltas that did not fit.
    dropped_bytes: u64,
}

impl CompletionText {
    /// Adds the next delta.
    pub fn push(&mut self, delta: &str) {
        if self.text.len() + delta.len() <= MAX_KEPT_COMPLETION_BYTES {
            self.text.push_str(delta);
        } else {
            self.dropped_bytes += delta.len() as u64;
        }
    }

    /// Forgets the text (the upstream reported usage; nothing to count).
    pub fn clear(&mut self) {
        self.text = String::new();
        self.dropped_bytes = 0;
    }

    /// Completion tokens of the text seen so far.
    pub fn tokens(&self) -> u64 {
        count(&self.text) + self.dropped_bytes.div_ceil(4)
    }
}

/// Counts a stream's prompt and completion tokens on a blocking thread (a long prompt
/// takes milliseconds, the first count also loads the vocabulary).
pub async fn estimate_stream(body: bytes::Bytes, completion: CompletionText) -> (u64, u64) {
    let count = move || (prompt_tokens(&body), completion.tokens());
    // Only a panic in the tokenizer fails here; count nothing rather than guess twice.
    tokio::task::spawn_blocking(count).await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_texts() {
        // o200k_base counts, as OpenAI's tiktoken gives them.
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        assert_eq!(count("tiktoken is great!"), 6);
    }

    /// Counts OpenAI published: its GPT-4o announcement gives the same sentence in the old
    /// (cl100k_base, GPT-4) and the new (o200k_base, GPT-4o) tokenizer; the cookbook's
    /// six-message example prompt was billed 124 tokens by the API on gpt-4o.
    #[test]
    fn matches_counts_openai_published() {
        let cl100k = |text: &str| {
            tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(text)
                .len()
        };
        let english =
            "Hello, my name is GPT-4o. I'm a new type of language model, it's nice to meet you!";
        let chinese = "你好，我的名字是GPT-4o。我是一种新型的语言模型，很高兴见到你!";
        assert_eq!((cl100k(english), count(english)), (27, 24));
        assert_eq!((cl100k(chinese), count(chinese)), (34, 24));
        let cookbook = serde_json::json!({"messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
        ]});
        assert_eq!(prompt_tokens(cookbook.to_string().as_bytes()), 124);
    }

    #[test]
    fn prompt_tokens_add_the_chat_overhead() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"hello world"},{"role":"user","content":[{"type":"text","text":"hello world"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(prompt_tokens(body), 3 + (3 + 1 + 2) + (3 + 1 + 2));
        let named = br#"{"messages":[{"role":"user","name":"bob","content":"hello world"}]}"#;
        assert_eq!(prompt_tokens(named), 3 + 3 + 1 + 2 + 1 + count("bob"));
        assert_eq!(prompt_tokens(b"not json at all!"), 4);
    }

    #[test]
    fn completion_text_counts_past_its_cap_by_bytes() {
        let mut text = CompletionText::default();
        text.push("hello");
        text.push(" world");
        assert_eq!(text.tokens(), 2);
        text.push(&"a".repeat(MAX_KEPT_COMPLETION_BYTES));
        assert_eq!(text.tokens(), 2 + (MAX_KEPT_COMPLETION_BYTES as u64 / 4));
        text.clear();
        assert_eq!(text.tokens(), 0);
    }
}
