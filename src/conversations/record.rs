//! One conversation record: what the gateway knows of an exchange once it is
//! over, and the [`Draft`] a request carries while it runs (the messages as
//! sent upstream, the answer as far as the client received it).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A row of `chatgate_conversations`; also the line format of the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The reply's `X-Request-Id` (unique: replays never duplicate a row).
    pub request_id: String,
    /// The token's `identity`.
    pub user_id: Option<i64>,
    /// The token's `sub`.
    pub username: Option<String>,
    /// The configured route path.
    pub route: String,
    /// The model asked for upstream.
    pub model: String,
    /// The messages array exactly as sent upstream (JSON text).
    pub messages: String,
    /// The answer as the client received it; `None` when nothing was sent.
    pub answer: Option<String>,
    /// `ok`, `upstream_error`, `cancelled`, `client_gone`.
    pub outcome: String,
    /// HTTP status of the reply (499 when the client left before any).
    pub status: i32,
    /// From the upstream's usage, when reported.
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    /// When the request arrived, in microseconds since the Unix epoch.
    pub started_at_us: i64,
    /// Request start to last byte.
    pub duration_ms: f64,
    /// Request start to the upstream's response header.
    pub ttfb_ms: Option<f64>,
}

impl Record {
    /// About how much memory it holds: its texts, plus a fixed share for the rest.
    pub fn weight(&self) -> usize {
        256 + self.request_id.len()
            + self.route.len()
            + self.model.len()
            + self.messages.len()
            + self.answer.as_ref().map_or(0, String::len)
            + self.username.as_ref().map_or(0, String::len)
    }

    /// `started_at` as a time.
    pub fn started_at(&self) -> SystemTime {
        match u64::try_from(self.started_at_us) {
            Ok(us) => UNIX_EPOCH + Duration::from_micros(us),
            Err(_) => UNIX_EPOCH,
        }
    }
}

/// What a chat or openai request collects for its record while it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    username: String,
    model: String,
    messages: String,
    answer: Option<String>,
}

/// The fields of an upstream request body a record keeps.
#[derive(Deserialize)]
struct UpstreamBody<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: &'a RawValue,
}

impl Draft {
    /// A draft for `username`'s request whose upstream body is `body` (the model
    /// and the messages array are taken from it, byte for byte); `None` if the
    /// body has no messages array (never for bodies the gateway built or checked).
    pub fn new(username: &str, body: &[u8]) -> Option<Draft> {
        let parsed: UpstreamBody = serde_json::from_slice(body).ok()?;
        Some(Draft {
            username: username.to_string(),
            model: parsed.model.map(Cow::into_owned).unwrap_or_default(),
            messages: parsed.messages.get().to_string(),
            answer: None,
        })
    }

    /// A draft for a body the gateway built itself, with `messages` the span of its
    /// messages array (no parse needed); `None` if it is not text (never for JSON).
    pub fn with_messages(username: &str, model: &str, messages: &[u8]) -> Option<Draft> {
        Some(Draft {
            username: username.to_string(),
            model: model.to_string(),
            messages: std::str::from_utf8(messages).ok()?.to_string(),
            answer: None,
        })
    }

    /// The reply started: from now on the answer is text, possibly empty.
    pub fn answer_started(&mut self) {
        self.answer.get_or_insert_with(String::new);
    }

    /// Appends text the client has just been sent.
    pub fn answer_sent(&mut self, text: &str) {
        self.answer.get_or_insert_with(String::new).push_str(text);
    }

    /// The whole answer, sent at once.
    pub fn set_answer(&mut self, text: String) {
        self.answer = Some(text);
    }

    /// The record of the finished exchange.
    pub fn finish(self, done: Finished<'_>) -> Record {
        let started = SystemTime::now()
            .checked_sub(done.duration)
            .unwrap_or(UNIX_EPOCH);
        let started_at_us = started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let int = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
        Record {
            request_id: done.request_id.to_string(),
            user_id: done.user_id.map(|id| i64::try_from(id).unwrap_or(i64::MAX)),
            username: Some(self.username),
            route: done.route.to_string(),
            model: self.model,
            messages: self.messages,
            answer: self.answer,
            outcome: done.outcome.to_string(),
            status: i32::from(done.status),
            prompt_tokens: done.tokens.map(|t| int(t.0)),
            completion_tokens: done.tokens.map(|t| int(t.1)),
            started_at_us,
            duration_ms: done.duration.as_secs_f64() * 1000.0,
            ttfb_ms: done.ttfb.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}

/// What the access log knows when the request is over.
pub struct Finished<'a> {
    pub request_id: &'a str,
    pub user_id: Option<u64>,
    pub route: &'a str,
    pub outcome: &'a str,
    pub status: u16,
    pub tokens: Option<(u64, u64)>,
    /// Request start to now.
    pub duration: Duration,
    pub ttfb: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_keeps_the_messages_byte_for_byte() {
        let body = br#"{"model":"m-1","messages":[{"role":"system","content":"S"},{"role":"user","content":"caf\u00e9 \n"}],"stream":true}"#;
        let mut d = Draft::new("alice", body).unwrap();
        d.answer_started();
        d.answer_sent("Hel");
        d.answer_sent("lo");
        let r = d.finish(Finished {
            request_id: "r1",
            user_id: Some(7),
            route: "/chat",
            outcome: "ok",
            status: 200,
            tokens: Some((3, 4)),
            duration: Duration::from_millis(1500),
            ttfb: None,
        });
        assert_eq!(
            r.messages,
            r#"[{"role":"system","content":"S"},{"role":"user","content":"caf\u00e9 \n"}]"#
        );
        assert_eq!(r.model, "m-1");
        assert_eq!(r.answer.as_deref(), Some("Hello"));
        assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(3), Some(4)));
        assert!((r.duration_ms - 1500.0).abs() < 1e-6);
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        assert!((now_us - r.started_at_us - 1_500_000).abs() < 1_000_000);
    }

    #[test]
    fn a_draft_from_the_messages_span_is_the_parsed_one() {
        let body =
            br#"{"model":"m-1","messages":[{"role":"user","content":"caf\u00e9"}],"stream":false}"#;
        let messages = &body[26..body.len() - 16];
        assert_eq!(
            Draft::with_messages("alice", "m-1", messages),
            Draft::new("alice", body)
        );
        assert!(Draft::with_messages("alice", "m-1", b"[\xff]").is_none());
    }

    #[test]
    fn no_reply_means_no_answer() {
        let d = Draft::new("bob", br#"{"model":"m","messages":[]}"#).unwrap();
        let r = d.finish(Finished {
            request_id: "r2",
            user_id: None,
            route: "/chat",
            outcome: "upstream_error",
            status: 500,
            tokens: None,
            duration: Duration::ZERO,
            ttfb: None,
        });
        assert_eq!(r.answer, None);
        assert!(Draft::new("bob", b"[]").is_none());
    }

    #[test]
    fn records_survive_a_spool_line() {
        let r = Draft::new("c", br#"{"model":"m","messages":[{"a":"\u2028"}]}"#)
            .unwrap()
            .finish(Finished {
                request_id: "r3",
                user_id: Some(1),
                route: "/x",
                outcome: "ok",
                status: 200,
                tokens: None,
                duration: Duration::from_millis(1),
                ttfb: Some(Duration::from_millis(1)),
            });
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
    }
}
