//! Upstream non-streaming reply: pulls the answer text and token usage out of an OpenAI
//! chat-completions body, and finds the message in upstream error bodies. That message
//! is the upstream's own text and may quote its API key: it reaches a client or a log
//! only through `Upstream::redact`.

use serde::Deserialize;
use serde_json::Value;

/// Token counts an upstream reports for one completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Tokens in the request (history plus system prompt).
    pub prompt_tokens: u64,
    /// Tokens in the answer.
    pub completion_tokens: u64,
}

/// The useful part of a successful non-streaming upstream reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// `choices[0].message.content`, the answer sent to the client as `{"message": ...}`.
    pub content: String,
    /// Token usage, when the upstream reported it.
    pub usage: Option<Usage>,
}

/// Why an upstream reply body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The body does not parse as JSON.
    #[error("upstream reply is not valid JSON")]
    InvalidJson,
    /// `choices` is missing, not an array, or empty.
    #[error("upstream reply has no choices")]
    NoChoices,
    /// `choices[0].message.content` is missing or not a string.
    #[error("upstream reply has no message content")]
    NoContent,
    /// The upstream answered with an `error` object; the upstream's own text (redact before showing it).
    #[error("upstream error: {0}")]
    Upstream(String),
}

/// Parses a non-streaming chat-completions reply body.
pub fn parse_completion(body: &[u8]) -> Result<Completion, ReplyError> {
    let mut reply: Value = serde_json::from_slice(body).map_err(|_| ReplyError::InvalidJson)?;
    if let Some(error) = reply.get("error").filter(|error| !error.is_null()) {
        return Err(ReplyError::Upstream(error_value_message(error)));
    }
    let usage = reply
        .get("usage")
        .filter(|usage| usage.is_object())
        .and_then(|usage| Usage::deserialize(usage).ok());
    let first_choice = reply
        .get_mut("choices")
        .and_then(Value::as_array_mut)
        .and_then(|choices| choices.first_mut())
        .ok_or(ReplyError::NoChoices)?;
    match first_choice
        .pointer_mut("/message/content")
        .map(Value::take)
    {
        Some(Value::String(content)) => Ok(Completion { content, usage }),
        _ => Err(ReplyError::NoContent),
    }
}

/// Extracts the error text, trimmed, from an upstream error body: `{"error":{"message":..}}`
/// (OpenAI), `{"error":"text"}` or `{"message":"text"}`. `None` when there is none.
pub fn upstream_error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = match value.get("error") {
        Some(Value::String(text)) => text.as_str(),
        Some(Value::Object(error)) => error.get("message")?.as_str()?,
        _ => value.get("message")?.as_str()?,
    };
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// The message of an `error` member (object with `message`, or plain string), trimmed.
pub(crate) fn error_value_message(error: &Value) -> String {
    let text = match error {
        Value::String(text) => Some(text.as_str()),
        Value::Object(error) => error.get("message").and_then(Value::as_str),
        _ => None,
    };
    match text.map(str::trim) {
        Some(trimmed) if !trimmed.is_empty() => trimmed.to_owned(),
        _ => "no error message given".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_first_choice_content_and_usage() {
        let body = br#"{"id":"x","object":"chat.completion","choices":[
            {"index":0,"message":{"role":"assistant","content":"Hello, \"you\" \u4f60"},"finish_reason":"stop"},
            {"index":1,"message":{"role":"assistant","content":"other"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        assert_eq!(
            parse_completion(body),
            Ok(Completion {
                content: "Hello, \"you\" 你".to_owned(),
                usage: Some(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 7
                }),
            })
        );
    }

    #[test]
    fn usage_is_optional_and_empty_content_is_fine() {
        let body = br#"{"choices":[{"message":{"content":""}}],"usage":null}"#;
        assert_eq!(
            parse_completion(body),
            Ok(Completion {
                content: String::new(),
                usage: None
            })
        );
    }

    #[test]
    fn reports_what_is_missing() {
        let cases: &[(&[u8], ReplyError)] = &[
            (b"", ReplyError::InvalidJson),
            (b"<html>502</html>", ReplyError::InvalidJson),
            (br#"{"choices":[]} x"#, ReplyError::InvalidJson),
            (br#"{}"#, ReplyError::NoChoices),
            (br#"[]"#, ReplyError::NoChoices),
            (br#"{"choices":[]}"#, ReplyError::NoChoices),
            (br#"{"choices":{"a":1}}"#, ReplyError::NoChoices),
            (br#"{"choices":[{}]}"#, ReplyError::NoContent),
            (
                br#"{"choices":[{"message":{"content":null}}]}"#,
                ReplyError::NoContent,
            ),
            (
                br#"{"choices":[{"message":{"content":[1]}}]}"#,
                ReplyError::NoContent,
            ),
            (
                br#"{"error":{"message":"Rate limit\nreached","type":"x"}}"#,
                // The raw text: redaction and one-line cleaning are the upstream's.
                ReplyError::Upstream("Rate limit\nreached".to_owned()),
            ),
            (
                br#"{"error":"overloaded","choices":[{"message":{"content":"a"}}]}"#,
                ReplyError::Upstream("overloaded".to_owned()),
            ),
            (
                br#"{"error":{"code":5}}"#,
                ReplyError::Upstream("no error message given".to_owned()),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                parse_completion(body).as_ref(),
                Err(expected),
                "body {:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            ReplyError::Upstream("x".to_owned()).to_string(),
            "upstream error: x"
        );
        assert_eq!(
            ReplyError::NoChoices.to_string(),
            "upstream reply has no choices"
        );
    }

    #[test]
    fn error_message_shapes() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
                Some("Rate limit reached"),
            ),
            (br#"{"error":"  bad gateway\r\n"}"#, Some("bad gateway")),
            (br#"{"message":"model not found"}"#, Some("model not found")),
            (br#"{"error":{"type":"x"}}"#, None),
            (br#"{"error":{"message":" \t "}}"#, None),
            (br#"{"message":5}"#, None),
            (b"<html>Bad Gateway</html>", None),
            (br#""text""#, None),
        ];
        for (body, expected) in cases {
            assert_eq!(
                upstream_error_message(body).as_deref(),
                *expected,
                "body {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
