//! The parts of an OpenAI chat-completions request body the simulator acts on.
//! Lenient like a test backend should be: only a non-object body or missing `messages` fail.

use std::borrow::Cow;

use serde_json::Value;

/// Model name used when the request names none.
pub const DEFAULT_MODEL: &str = "simulated";

/// A chat request body that cannot be served; the text goes into a 400 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The body is not JSON.
    #[error("We could not parse the JSON body of your request: {0}")]
    BadJson(String),
    /// The JSON is not an object.
    #[error("The request body must be a JSON object.")]
    NotObject,
    /// `messages` is missing or not an array.
    #[error("'messages' is a required property and must be an array.")]
    NoMessages,
}

/// What the simulator needs from a chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest<'a> {
    /// `model`, echoed in the reply.
    pub model: &'a str,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// Characters of all message contents, for `prompt_tokens`.
    pub prompt_chars: usize,
    /// Text of the last `user` message (empty when there is none).
    pub last_user: Cow<'a, str>,
}

impl<'a> ChatRequest<'a> {
    /// Reads the fields from a parsed body.
    pub fn from_json(body: &'a Value) -> Result<ChatRequest<'a>, RequestError> {
        let object = body.as_object().ok_or(RequestError::NotObject)?;
        let messages = object
            .get("messages")
            .and_then(Value::as_array)
            .ok_or(RequestError::NoMessages)?;
        let mut prompt_chars = 0;
        let mut last_user = None;
        for message in messages {
            let content = message.get("content").map_or(Cow::Borrowed(""), text_of);
            prompt_chars += content.chars().count();
            if message.get("role").and_then(Value::as_str) == Some("user") {
                last_user = Some(content);
            }
        }
        Ok(ChatRequest {
            model: object
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_MODEL),
            stream: object.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: object
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true),
            prompt_chars,
            last_user: last_user.unwrap_or_default(),
        })
    }
}

/// A message content as text: a string, or the `text` parts of a content array joined.
fn text_of(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(text) => Cow::Borrowed(text),
        Value::Array(parts) => Cow::Owned(
            parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_fields_of_a_streaming_request() {
        let body = json!({
            "model": "gpt-x",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 10,
            "messages": [
                {"role": "system", "content": "Be nice."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "你好"}
            ]
        });
        assert_eq!(
            ChatRequest::from_json(&body).unwrap(),
            ChatRequest {
                model: "gpt-x",
                stream: true,
                include_usage: true,
                prompt_chars: 8 + 5 + 2 + 2,
                last_user: Cow::Borrowed("你好"),
            }
        );
    }

    #[test]
    fn defaults_for_missing_optional_fields() {
        let body = json!({"messages": [{"role": "system", "content": "x"}]});
        let request = ChatRequest::from_json(&body).unwrap();
        assert_eq!(request.model, DEFAULT_MODEL);
        assert!(!request.stream && !request.include_usage);
        assert_eq!(request.last_user, "");
    }

    #[test]
    fn content_parts_are_joined() {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}
        ]}]});
        assert_eq!(ChatRequest::from_json(&body).unwrap().last_user, "ab");
    }

    #[test]
    fn rejects_bodies_without_messages() {
        assert_eq!(
            ChatRequest::from_json(&json!([1])).unwrap_err(),
            RequestError::NotObject
        );
        assert_eq!(
            ChatRequest::from_json(&json!({"messages": "hi"})).unwrap_err(),
            RequestError::NoMessages
        );
    }
}
