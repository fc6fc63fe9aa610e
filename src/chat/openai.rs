//! OpenAI pass-through requests: checks a client's chat-completions body just
//! enough to apply the route's model policy (forced model or allowed list) and
//! to know whether it streams; everything else in the body is passed on as is.

use serde::Deserialize;
use serde_json::Value;

use super::reply::Usage;

/// A client body ready to go upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct PassThrough {
    /// The body to send, with the model policy applied.
    pub body: Vec<u8>,
    /// Whether the client asked for a stream (`"stream": true`).
    pub stream: bool,
}

/// Checks an OpenAI chat-completions body and applies the model policy: a
/// non-empty `forced` model replaces the client's, otherwise the client's
/// `model` must be one of `allowed`. The error text names what is wrong.
pub fn apply_model_policy(
    body: &[u8],
    forced: &str,
    allowed: &[String],
) -> Result<PassThrough, String> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|_| "body is not valid JSON".to_string())?;
    let Some(object) = value.as_object_mut() else {
        return Err("body is not a JSON object".into());
    };
    match object.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => {}
        Some(Value::Array(_)) => return Err("messages must not be empty".into()),
        Some(_) => return Err("messages is not an array".into()),
        None => return Err("messages is missing".into()),
    }
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("stream is not a boolean".into()),
    };
    if forced.is_empty() {
        match object.get("model") {
            Some(Value::String(m)) if allowed.iter().any(|a| a == m) => {}
            Some(Value::String(m)) => {
                return Err(format!(
                    "model {:?} is not allowed on this route (allowed: {})",
                    truncate(m, 64),
                    allowed.join(", ")
                ))
            }
            Some(_) => return Err("model is not a string".into()),
            None => return Err("model is missing".into()),
        }
    } else {
        object.insert("model".into(), Value::String(forced.to_string()));
    }
    let body = serde_json::to_vec(&value).map_err(|e| format!("cannot encode body: {e}"))?;
    Ok(PassThrough { body, stream })
}

/// The `usage` of a non-streaming chat-completions reply, if reported.
pub fn reply_usage(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Reply {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<Reply>(body).ok()?.usage
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<String> {
        vec!["gpt-4o-mini".into(), "gpt-4o".into()]
    }

    #[test]
    fn allowed_model_passes_and_keeps_other_fields() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"stream":true,"stream_options":{"include_usage":true}}"#;
        let p = apply_model_policy(body, "", &allowed()).unwrap();
        assert!(p.stream);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn forced_model_replaces_the_clients() {
        let body = br#"{"model":"anything","messages":[{"role":"user","content":"hi"}]}"#;
        let p = apply_model_policy(body, "house-model", &[]).unwrap();
        assert!(!p.stream);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["model"], "house-model");
        // A forced model needs none from the client.
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(apply_model_policy(body, "house-model", &[]).is_ok());
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let cases: [(&[u8], &str); 7] = [
            (b"nope", "body is not valid JSON"),
            (b"[]", "body is not a JSON object"),
            (br#"{"model":"gpt-4o"}"#, "messages is missing"),
            (
                br#"{"model":"gpt-4o","messages":[]}"#,
                "messages must not be empty",
            ),
            (
                br#"{"model":"gpt-4o","messages":[{}],"stream":"yes"}"#,
                "stream is not a boolean",
            ),
            (br#"{"messages":[{}]}"#, "model is missing"),
            (
                br#"{"model":"o3","messages":[{}]}"#,
                "model \"o3\" is not allowed on this route (allowed: gpt-4o-mini, gpt-4o)",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                apply_model_policy(body, "", &allowed()).unwrap_err(),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn usage_of_a_reply() {
        let body =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(
            reply_usage(body),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        assert_eq!(reply_usage(b"{}"), None);
        assert_eq!(reply_usage(b"x"), None);
    }
}
