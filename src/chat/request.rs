//! Client request rewrite: parses the client's JSON message array (keys matched
//! case-insensitively, as the original Go backend did) and writes the OpenAI
//! chat-completions body sent upstream.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer as _;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the model (the route's system prompt is one).
    System,
    /// The human side of the conversation.
    User,
    /// Earlier answers of the model.
    Assistant,
}

impl Role {
    /// The name OpenAI and the client use for this role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    fn from_name(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One message of the client's conversation history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text, possibly empty.
    pub content: String,
}

/// The two fields of a message object, for error texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageField {
    /// The `role` key.
    Role,
    /// The `content` key.
    Content,
}

impl fmt::Display for MessageField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageField::Role => "role",
            MessageField::Content => "content",
        })
    }
}

/// Why a client body is not a valid message array. The Display text is the
/// `<what is wrong>` part of `Invalid request: <what is wrong>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessagesError {
    /// The body is not JSON at all (or has trailing garbage); carries serde_json's message.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but not an array.
    #[error("body must be a JSON array of messages")]
    NotAnArray,
    /// An empty array.
    #[error("at least one message is required")]
    Empty,
    /// An array element that is not an object.
    #[error("messages[{0}] must be an object")]
    NotAnObject(usize),
    /// A message object without `role` or `content`.
    #[error("messages[{index}].{field} is missing")]
    Missing {
        /// Position in the array.
        index: usize,
        /// The absent field.
        field: MessageField,
    },
    /// The same field twice in one object (in any casing), which parsers resolve differently.
    #[error("messages[{index}].{field} appears more than once")]
    Duplicate {
        /// Position in the array.
        index: usize,
        /// The repeated field.
        field: MessageField,
    },
    /// `role` is not one of the three known names.
    #[error("messages[{0}].role must be one of \"system\", \"user\", \"assistant\"")]
    BadRole(usize),
    /// `content` is not a string.
    #[error("messages[{0}].content must be a string")]
    ContentNotString(usize),
}

/// Parses the client's body: a JSON array of at least one `{"role", "content"}` object.
pub fn parse_messages(body: &[u8]) -> Result<Vec<ChatMessage>, MessagesError> {
    // Semantic errors are raised from inside serde visitors, whose error type is
    // serde_json's; the precise error travels beside it in this cell.
    let found = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = deserializer
        .deserialize_any(BodyVisitor { found: &found })
        .and_then(|outcome| deserializer.end().map(|()| outcome));
    match parsed {
        Ok(Some(messages)) if messages.is_empty() => Err(MessagesError::Empty),
        Ok(Some(messages)) => Ok(messages),
        Ok(None) => Err(MessagesError::NotAnArray),
        Err(json_error) => Err(found
            .take()
            .unwrap_or_else(|| MessagesError::InvalidJson(json_error.to_string()))),
    }
}

type Found<'c> = &'c Cell<Option<MessagesError>>;

fn fail<E: de::Error>(found: Found<'_>, error: MessagesError) -> E {
    found.set(Some(error));
    E::custom("invalid message array")
}

/// Visitor methods for the JSON scalars a visitor refuses: each records
/// `$refusal(index)` and stops parsing.
macro_rules! refuse_scalars {
    ($refusal:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(fail(self.found, $refusal(self.index)))
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(fail(self.found, $refusal(self.index)))
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(fail(self.found, $refusal(self.index)))
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(fail(self.found, $refusal(self.index)))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(fail(self.found, $refusal(self.index)))
        }
    };
}

/// Visitor methods for JSON arrays and objects, refused like [`refuse_scalars`].
macro_rules! refuse_containers {
    ($de:lifetime, $refusal:expr) => {
        fn visit_seq<A: SeqAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(fail(self.found, $refusal(self.index)))
        }

        fn visit_map<A: MapAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(fail(self.found, $refusal(self.index)))
        }
    };
}

/// Top level: an array gives `Some(messages)`; any other JSON value is consumed
/// (so broken JSON still reports as such) and gives `None`.
struct BodyVisitor<'c> {
    found: Found<'c>,
}

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = Option<Vec<ChatMessage>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(8).min(1024));
        while let Some(message) = seq.next_element_seed(MessageSeed {
            index: messages.len(),
            found: self.found,
        })? {
            messages.push(message);
        }
        Ok(Some(messages))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// One array element, which must be a message object.
struct MessageSeed<'c> {
    index: usize,
    found: Found<'c>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ChatMessage;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<ChatMessage, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ChatMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatMessage, A::Error> {
        let (index, found) = (self.index, self.found);
        let mut role = None;
        let mut content = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Key::Role => {
                    if role.is_some() {
                        return Err(fail(
                            found,
                            MessagesError::Duplicate {
                                index,
                                field: MessageField::Role,
                            },
                        ));
                    }
                    role = Some(map.next_value_seed(RoleSeed { index, found })?);
                }
                Key::Content => {
                    if content.is_some() {
                        return Err(fail(
                            found,
                            MessagesError::Duplicate {
                                index,
                                field: MessageField::Content,
                            },
                        ));
                    }
                    content = Some(map.next_value_seed(ContentSeed { index, found })?);
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let role = role.ok_or_else(|| {
            fail(
                found,
                MessagesError::Missing {
                    index,
                    field: MessageField::Role,
                },
            )
        })?;
        let content = content.ok_or_else(|| {
            fail(
                found,
                MessagesError::Missing {
                    index,
                    field: MessageField::Content,
                },
            )
        })?;
        Ok(ChatMessage { role, content })
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<ChatMessage, E> {
        Err(fail(self.found, MessagesError::NotAnObject(self.index)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<ChatMessage, A::Error> {
        Err(fail(self.found, MessagesError::NotAnObject(self.index)))
    }

    refuse_scalars!(MessagesError::NotAnObject);
}

/// An object key, classified without allocating.
enum Key {
    Role,
    Content,
    Other,
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        // Go's encoding/json matched keys case-insensitively; clients rely on `Content`.
        Ok(if key.eq_ignore_ascii_case("role") {
            Key::Role
        } else if key.eq_ignore_ascii_case("content") {
            Key::Content
        } else {
            Key::Other
        })
    }
}

/// The value of `role`: exactly one of the three names.
struct RoleSeed<'c> {
    index: usize,
    found: Found<'c>,
}

impl<'de> DeserializeSeed<'de> for RoleSeed<'_> {
    type Value = Role;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Role, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RoleSeed<'_> {
    type Value = Role;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a role name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Role, E> {
        Role::from_name(name).ok_or_else(|| fail(self.found, MessagesError::BadRole(self.index)))
    }

    refuse_scalars!(MessagesError::BadRole);
    refuse_containers!('de, MessagesError::BadRole);
}

/// The value of `content`: any string.
struct ContentSeed<'c> {
    index: usize,
    found: Found<'c>,
}

impl<'de> DeserializeSeed<'de> for ContentSeed<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    refuse_scalars!(MessagesError::ContentNotString);
    refuse_containers!('de, MessagesError::ContentNotString);
}

/// What the gateway asks of the upstream besides the messages; built per request from the route.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamRequestSpec<'a> {
    /// The route's model name.
    pub model: &'a str,
    /// Prepended as a system message when the client sent none.
    pub system_prompt: Option<&'a str>,
    /// The route's extra request fields (`temperature`, `max_tokens`, ...), written in map order.
    pub params: &'a serde_json::Map<String, serde_json::Value>,
    /// Whether to ask for a streamed (SSE) answer.
    pub stream: bool,
    /// Whether to ask for a final usage chunk (`stream_options.include_usage`) when streaming.
    pub include_usage: bool,
}

/// Body keys the gateway writes itself; the config refuses them as route params, and
/// one that slips through is skipped, because a JSON object with a key twice is read
/// differently by different upstreams.
pub const RESERVED_KEYS: [&str; 4] = ["model", "messages", "stream", "stream_options"];

/// Writes the OpenAI chat-completions request body for `messages`.
pub fn build_openai_body(messages: &[ChatMessage], spec: &UpstreamRequestSpec) -> Vec<u8> {
    build_openai_body_and_messages(messages, spec).0
}

/// [`build_openai_body`], and where the messages array is in it (what the
/// conversation record keeps, without parsing the body again).
pub fn build_openai_body_and_messages(
    messages: &[ChatMessage],
    spec: &UpstreamRequestSpec,
) -> (Vec<u8>, std::ops::Range<usize>) {
    let prompt = spec
        .system_prompt
        .filter(|_| !messages.iter().any(|message| message.role == Role::System));
    let text_bytes: usize = messages.iter().map(|message| message.content.len()).sum();
    let mut out = Vec::with_capacity(
        96 + spec.model.len()
            + prompt.map_or(0, |prompt| prompt.len() + 32)
            + text_bytes
            + text_bytes / 8
            + messages.len() * 32
            + spec.params.len() * 32,
    );

    out.extend_from_slice(b"{\"model\":");
    push_json(&mut out, spec.model);
    out.extend_from_slice(b",\"messages\":");
    let messages_start = out.len();
    out.push(b'[');
    let mut first = true;
    let all = prompt
        .map(|prompt| (Role::System, prompt))
        .into_iter()
        .chain(
            messages
                .iter()
                .map(|message| (message.role, message.content.as_str())),
        );
    for (role, content) in all {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"role\":\"");
        out.extend_from_slice(role.as_str().as_bytes());
        out.extend_from_slice(b"\",\"content\":");
        push_json(&mut out, content);
        out.push(b'}');
    }
    out.push(b']');
    let messages_at = messages_start..out.len();
    out.extend_from_slice(if spec.stream {
        b",\"stream\":true"
    } else {
        b",\"stream\":false"
    });
    if spec.stream && spec.include_usage {
        out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    }
    for (key, value) in spec.params {
        if RESERVED_KEYS.contains(&key.as_str()) {
            continue;
        }
        out.push(b',');
        push_json(&mut out, key.as_str());
        out.push(b':');
        push_json(&mut out, value);
    }
    out.push(b'}');
    (out, messages_at)
}

fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Strings and serde_json::Values always serialize and a Vec grows on demand, so this cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    fn error_text(body: &str) -> String {
        match parse_messages(body.as_bytes()) {
            Ok(messages) => panic!("accepted {body}: {messages:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn parses_messages_in_order() {
        let body = r#"[{"role":"system","content":"be brief"},
                       {"role":"user","content":"Hi \"there\"\n\u4f60\ud83d\ude00"},
                       {"role":"assistant","content":""}]"#;
        assert_eq!(
            parse_messages(body.as_bytes()),
            Ok(vec![
                message(Role::System, "be brief"),
                message(Role::User, "Hi \"there\"\n你😀"),
                message(Role::Assistant, ""),
            ])
        );
    }

    #[test]
    fn keys_match_in_any_ascii_case_and_unknown_keys_are_ignored() {
        let body = r#"[{"Role":"user","CONTENT":"a","name":{"deep":[1,2,{"x":null}]},"ROLEX":1},
                       {"cOnTeNt":"b","rOlE":"assistant"}]"#;
        assert_eq!(
            parse_messages(body.as_bytes()),
            Ok(vec![
                message(Role::User, "a"),
                message(Role::Assistant, "b")
            ])
        );
    }

    #[test]
    fn names_the_offending_index_and_field() {
        let cases = [
            ("{}", "body must be a JSON array of messages"),
            (
                r#"{"role":"user"}"#,
                "body must be a JSON array of messages",
            ),
            (r#""text""#, "body must be a JSON array of messages"),
            ("null", "body must be a JSON array of messages"),
            ("12", "body must be a JSON array of messages"),
            ("[]", "at least one message is required"),
            ("[1]", "messages[0] must be an object"),
            (
                r#"[{"role":"user","content":"a"},"b"]"#,
                "messages[1] must be an object",
            ),
            (
                r#"[{"role":"user","content":"a"},[]]"#,
                "messages[1] must be an object",
            ),
            (r#"[null]"#, "messages[0] must be an object"),
            (
                r#"[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"bot","content":"c"}]"#,
                r#"messages[2].role must be one of "system", "user", "assistant""#,
            ),
            (
                r#"[{"role":"User","content":"a"}]"#,
                r#"messages[0].role must be one of "system", "user", "assistant""#,
            ),
            (
                r#"[{"role":1,"content":"a"}]"#,
                r#"messages[0].role must be one of "system", "user", "assistant""#,
            ),
            (
                r#"[{"role":["user"],"content":"a"}]"#,
                r#"messages[0].role must be one of "system", "user", "assistant""#,
            ),
            (
                r#"[{"role":null,"content":"a"}]"#,
                r#"messages[0].role must be one of "system", "user", "assistant""#,
            ),
            (r#"[{"role":"user"}]"#, "messages[0].content is missing"),
            (r#"[{"content":"a"}]"#, "messages[0].role is missing"),
            (r#"[{}]"#, "messages[0].role is missing"),
            (
                r#"[{"role":"user","content":"a"},{"role":"user","content":5}]"#,
                "messages[1].content must be a string",
            ),
            (
                r#"[{"role":"user","content":null}]"#,
                "messages[0].content must be a string",
            ),
            (
                r#"[{"role":"user","content":{"text":"a"}}]"#,
                "messages[0].content must be a string",
            ),
            (
                r#"[{"role":"user","content":[{"type":"text"}]}]"#,
                "messages[0].content must be a string",
            ),
            (
                r#"[{"role":"user","content":true}]"#,
                "messages[0].content must be a string",
            ),
            (
                r#"[{"role":"user","content":"a","Content":"b"}]"#,
                "messages[0].content appears more than once",
            ),
            (
                r#"[{"role":"user","ROLE":"system","content":"a"}]"#,
                "messages[0].role appears more than once",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(error_text(body), expected, "body {body}");
        }
    }

    #[test]
    fn broken_json_reports_serde_message() {
        assert_eq!(
            error_text(""),
            "body is not valid JSON: EOF while parsing a value at line 1 column 0"
        );
        assert_eq!(
            error_text(r#"[{"role":"user","content":"a"}] x"#),
            "body is not valid JSON: trailing characters at line 1 column 33"
        );
        assert_eq!(
            error_text(r#"[{"role":"user","content":"a"},]"#),
            "body is not valid JSON: trailing comma at line 1 column 32"
        );
        assert_eq!(
            error_text(r#"{"a":1"#),
            "body is not valid JSON: EOF while parsing an object at line 1 column 6"
        );
        assert!(error_text(r#"[{"role":"user","content":"a"#)
            .starts_with("body is not valid JSON: EOF"));
        let invalid_utf8 = parse_messages(b"[{\"role\":\"user\",\"content\":\"\xff\"}]");
        assert!(
            matches!(&invalid_utf8, Err(MessagesError::InvalidJson(text)) if text.contains("invalid unicode")),
            "{invalid_utf8:?}"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert_eq!(error_text(&deep), "messages[0] must be an object");
        // serde_json skips ignored values iteratively, so deep unknown values cost no stack.
        let deep_unknown = format!(
            r#"[{{"role":"user","content":"a","x":{}"#,
            "[".repeat(100_000)
        );
        assert_eq!(
            error_text(&deep_unknown),
            "body is not valid JSON: EOF while parsing a list at line 1 column 100034"
        );
        let balanced = format!(
            r#"[{{"role":"user","content":"a","x":{}{}}}]"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            parse_messages(balanced.as_bytes()),
            Ok(vec![message(Role::User, "a")])
        );
        let deep_object = "{\"a\":".repeat(100_000);
        assert!(error_text(&deep_object).starts_with("body is not valid JSON: EOF"));
    }

    fn spec<'a>(
        params: &'a Map<String, Value>,
        system_prompt: Option<&'a str>,
        stream: bool,
    ) -> UpstreamRequestSpec<'a> {
        UpstreamRequestSpec {
            model: "gpt-4o-mini",
            system_prompt,
            params,
            stream,
            include_usage: true,
        }
    }

    #[test]
    fn body_prepends_system_prompt_and_appends_params_in_order() {
        let mut params = Map::new();
        // Alphabetical, so the expectation holds with or without serde_json's preserve_order.
        params.insert("max_tokens".to_owned(), json!(512));
        params.insert("stop".to_owned(), json!(["\n\n"]));
        params.insert("temperature".to_owned(), json!(0.5));
        let messages = [message(Role::User, "Hi \"you\"\n你")];
        let body = build_openai_body(&messages, &spec(&params, Some("You are XiaoZhi."), false));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are XiaoZhi."},{"role":"user","content":"Hi \"you\"\n你"}],"stream":false,"max_tokens":512,"stop":["\n\n"],"temperature":0.5}"#
        );
    }

    #[test]
    fn the_messages_span_is_the_bodys_messages_array() {
        let mut params = Map::new();
        params.insert("temperature".to_owned(), json!(0.5));
        let messages = [
            message(Role::User, "a \"]\" [b"),
            message(Role::Assistant, "你"),
        ];
        for stream in [false, true] {
            let (body, at) =
                build_openai_body_and_messages(&messages, &spec(&params, Some("prompt"), stream));
            let parsed: Value = serde_json::from_slice(&body).unwrap();
            let span: Value = serde_json::from_slice(&body[at]).unwrap();
            assert_eq!(span, parsed["messages"]);
        }
    }

    #[test]
    fn client_system_message_wins_over_the_prompt() {
        let params = Map::new();
        let messages = [
            message(Role::User, "a"),
            message(Role::System, "mine"),
            message(Role::Assistant, "b"),
        ];
        let body = build_openai_body(&messages, &spec(&params, Some("route prompt"), false));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a"},{"role":"system","content":"mine"},{"role":"assistant","content":"b"}],"stream":false}"#
        );
    }

    #[test]
    fn streaming_asks_for_usage_only_when_supported() {
        let params = Map::new();
        let messages = [message(Role::User, "")];
        let with_usage = build_openai_body(&messages, &spec(&params, None, true));
        assert_eq!(
            String::from_utf8(with_usage).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":""}],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let mut no_usage = spec(&params, None, true);
        no_usage.include_usage = false;
        assert_eq!(
            String::from_utf8(build_openai_body(&messages, &no_usage)).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":""}],"stream":true}"#
        );
    }

    #[test]
    fn params_cannot_override_gateway_keys() {
        let mut params = Map::new();
        params.insert("model".to_owned(), json!("other"));
        params.insert("stream".to_owned(), json!(true));
        params.insert("top_p".to_owned(), json!(1));
        let messages = [message(Role::User, "a")];
        let body = build_openai_body(&messages, &spec(&params, None, false));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a"}],"stream":false,"top_p":1}"#
        );
    }

    #[test]
    fn built_body_round_trips_through_a_json_parser() {
        let params = Map::new();
        let messages = [message(Role::User, "\u{0}\u{1f}\"\\\r\n😀")];
        let body = build_openai_body(&messages, &spec(&params, None, false));
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value["messages"][0]["content"],
            json!("\u{0}\u{1f}\"\\\r\n😀")
        );
    }
}
