//! OpenAI pass-through requests: checks a client's chat-completions body just
//! enough to apply the route's model policy (forced model or allowed list), to know
//! whether it streams and how many tokens it may generate, and asks for usage on
//! streams; everything else in the body is passed on as is.

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
    /// A stream whose usage chunk chatgate asked for on its own: the client did not,
    /// so that chunk is removed from what it receives.
    pub strip_usage: bool,
    /// The most completion tokens the client allows: `max_completion_tokens` (else
    /// `max_tokens`) times `n`, when given as whole numbers.
    pub max_completion: Option<u64>,
}

/// Checks an OpenAI chat-completions body and applies the model policy: a
/// non-empty `forced` model replaces the client's, otherwise the client's
/// `model` must be one of `allowed`. With `ask_usage`, a stream always asks for
/// `stream_options.include_usage`. The error text names what is wrong.
pub fn apply_model_policy(
    body: &[u8],
    forced: &str,
    allowed: &[String],
    ask_usage: bool,
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
    let max_completion = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| object.get(*key).and_then(Value::as_u64))
        .map(|max| {
            let n = object.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
            max.saturating_mul(n)
        });
    let client_usage = object
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let strip_usage = stream && ask_usage && !client_usage;
    if strip_usage {
        let options = object
            .entry("stream_options")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if !options.is_object() {
            *options = Value::Object(serde_json::Map::new());
        }
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let body = serde_json::to_vec(&value).map_err(|e| format!("cannot encode body: {e}"))?;
    Ok(PassThrough {
        body,
        stream,
        strip_usage,
        max_completion,
    })
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
        let p = apply_model_policy(body, "", &allowed(), true).unwrap();
        assert!(p.stream);
        // The client asked for usage itself: it gets the usage chunk.
        assert!(!p.strip_usage);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn forced_model_replaces_the_clients() {
        let body = br#"{"model":"anything","messages":[{"role":"user","content":"hi"}]}"#;
        let p = apply_model_policy(body, "house-model", &[], true).unwrap();
        assert!(!p.stream);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["model"], "house-model");
        // A forced model needs none from the client.
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(apply_model_policy(body, "house-model", &[], true).is_ok());
    }

    #[test]
    fn streams_ask_for_usage_unless_the_upstream_may_not() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"other":1}}"#;
        let p = apply_model_policy(body, "", &allowed(), true).unwrap();
        assert!(p.strip_usage);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"other": 1, "include_usage": true})
        );
        // The upstream is configured `stream_usage: false`: the body stays the client's.
        let p = apply_model_policy(body, "", &allowed(), false).unwrap();
        assert!(!p.strip_usage);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"other": 1}));
        // Not a stream: nothing to ask.
        let plain = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let p = apply_model_policy(plain, "", &allowed(), true).unwrap();
        assert!(!p.strip_usage);
        assert!(!String::from_utf8_lossy(&p.body).contains("stream_options"));
    }

    #[test]
    fn completion_budget_is_the_clients_max_tokens_times_n() {
        let budget = |fields: &str| {
            let body = format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}]{fields}}}"#
            );
            apply_model_policy(body.as_bytes(), "", &allowed(), true)
                .unwrap()
                .max_completion
        };
        assert_eq!(budget(""), None);
        assert_eq!(budget(r#","max_tokens":100"#), Some(100));
        assert_eq!(budget(r#","max_tokens":100,"n":3"#), Some(300));
        assert_eq!(
            budget(r#","max_tokens":100,"max_completion_tokens":50"#),
            Some(50)
        );
        assert_eq!(budget(r#","max_tokens":"lots""#), None);
        assert_eq!(budget(r#","max_tokens":10,"n":0"#), Some(10));
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
                apply_model_policy(body, "", &allowed(), true).unwrap_err(),
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
