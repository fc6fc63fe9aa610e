//! Simulator knobs: the per-request behaviour switches and how they are resolved.
//! Precedence, low to high: process options (CLI flags), `x-sim-<knob>` request
//! headers, and a `#sim key=value ...` directive as the first line of the last user message.

use std::time::Duration;

use super::reply::ReplySpec;
use super::SimOptions;

/// Knob names accepted in headers (`x-sim-<name>`, `-` or `_`) and directive lines.
pub const KNOB_NAMES: [&str; 15] = [
    "chunk_size",
    "chunks",
    "first_byte_delay_ms",
    "chunk_delay_ms",
    "role_chunk",
    "usage",
    "stream_usage",
    "status",
    "retry_after",
    "error_after",
    "cut_after",
    "stall_after",
    "stall_ms",
    "reply",
    "quote_key",
];

/// Largest `status` value accepted besides 200: the simulator only fakes errors.
const STATUS_RANGE: std::ops::RangeInclusive<u16> = 400..=599;

/// A knob name or value the simulator cannot use; shown to the client in a 400 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnobError {
    /// The knob name is not one of [`KNOB_NAMES`].
    #[error("unknown simulator knob `{0}`")]
    Unknown(String),
    /// The value does not parse for that knob.
    #[error("bad value `{value}` for simulator knob `{knob}`: expected {expected}")]
    BadValue {
        knob: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A directive word without `=`.
    #[error("bad #sim directive word `{0}`: expected key=value")]
    BadDirective(String),
}

/// The fully resolved behaviour for one chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knobs {
    /// Characters per content chunk (at least 1).
    pub chunk_size: usize,
    /// Split the reply into exactly this many chunks instead.
    pub chunks: Option<usize>,
    /// Wait before the response header.
    pub first_byte_delay: Duration,
    /// Wait between consecutive content chunks.
    pub chunk_delay: Duration,
    /// Send a role-only first chunk in streams.
    pub role_chunk: bool,
    /// Report token usage.
    pub usage: bool,
    /// Streams: send the usage chunk when `stream_options.include_usage` asks for it
    /// (off: never, as llama.cpp's server and llama-cpp-python 0.3.x do).
    pub stream_usage: bool,
    /// Answer with this error status (400..=599) instead of a completion.
    pub status: Option<u16>,
    /// `Retry-After` seconds sent along with `status`.
    pub retry_after: Option<u64>,
    /// Stream: send an error event after this many content chunks.
    pub error_after: Option<usize>,
    /// Stream: drop the connection after this many content chunks.
    pub cut_after: Option<usize>,
    /// Stream: go silent for `stall` after this many content chunks.
    pub stall_after: Option<usize>,
    /// How long a stall lasts.
    pub stall: Duration,
    /// Which text to answer with.
    pub reply: ReplySpec,
    /// Whether error texts quote the API key the request came with (headers and
    /// directives only; no process flag).
    pub quote_key: QuoteKey,
    /// The text of this request's errors when it is not the default `simulated <status>`:
    /// set by the service from `quote_key` and the request's key, not a knob of its own.
    pub error_message: Option<String>,
}

/// How a simulated error quotes the key it was sent, as OpenAI (masked) and some
/// compatible servers (whole) do: the case a gateway must never pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuoteKey {
    /// Errors say `simulated <status>`.
    #[default]
    Off,
    /// The key as sent.
    Whole,
    /// OpenAI's form: the first characters, `****`, the last four.
    Masked,
}

impl QuoteKey {
    /// OpenAI's 401 text quoting `key`; `None` when off or no key came.
    pub fn message(self, key: Option<&str>) -> Option<String> {
        let key = key?;
        let shown = match self {
            QuoteKey::Off => return None,
            QuoteKey::Whole => key.to_string(),
            QuoteKey::Masked => {
                let chars: Vec<char> = key.chars().collect();
                let n = chars.len();
                if n < 12 {
                    "****".to_string()
                } else {
                    let head: String = chars[..(n / 3).min(12)].iter().collect();
                    let tail: String = chars[n - 4..].iter().collect();
                    format!("{head}****{tail}")
                }
            }
        };
        Some(format!(
            "Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."
        ))
    }
}

impl Knobs {
    /// The process defaults, before any header or directive.
    pub fn from_options(options: &SimOptions) -> Knobs {
        Knobs {
            chunk_size: options.chunk_size.max(1),
            chunks: options.chunks.filter(|&n| n > 0),
            first_byte_delay: Duration::from_millis(options.first_byte_delay_ms),
            chunk_delay: Duration::from_millis(options.chunk_delay_ms),
            role_chunk: options.role_chunk,
            usage: options.usage,
            stream_usage: options.stream_usage,
            status: options.status.filter(|&s| s != 200),
            retry_after: options.retry_after,
            error_after: options.error_after,
            cut_after: options.cut_after,
            stall_after: options.stall_after,
            stall: Duration::from_millis(options.stall_ms),
            reply: options.reply.clone(),
            quote_key: QuoteKey::Off,
            error_message: None,
        }
    }

    /// Sets one knob from its text form. `key` may use `-` or `_` and any letter case;
    /// optional knobs take `off` (or `none`) to unset a lower-precedence value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), KnobError> {
        let key = normalize_key(key);
        let value = value.trim();
        match key.as_str() {
            "chunk_size" => self.chunk_size = positive("chunk_size", value)?,
            "chunks" => self.chunks = optional(value, |v| positive("chunks", v))?,
            "first_byte_delay_ms" => {
                self.first_byte_delay = millis("first_byte_delay_ms", value)?;
            }
            "chunk_delay_ms" => self.chunk_delay = millis("chunk_delay_ms", value)?,
            "role_chunk" => self.role_chunk = switch("role_chunk", value)?,
            "usage" => self.usage = switch("usage", value)?,
            "stream_usage" => self.stream_usage = switch("stream_usage", value)?,
            "status" => self.status = optional(value, status)?.filter(|&s| s != 200),
            "retry_after" => {
                self.retry_after = optional(value, |v| number("retry_after", v))?;
            }
            "error_after" => {
                self.error_after = optional(value, |v| number("error_after", v))?;
            }
            "cut_after" => self.cut_after = optional(value, |v| number("cut_after", v))?,
            "stall_after" => {
                self.stall_after = optional(value, |v| number("stall_after", v))?;
            }
            "stall_ms" => self.stall = millis("stall_ms", value)?,
            "reply" => {
                self.reply = value.parse().map_err(|_| KnobError::BadValue {
                    knob: "reply",
                    value: value.to_string(),
                    expected: ReplySpec::EXPECTED,
                })?;
            }
            "quote_key" => {
                self.quote_key = match value.to_ascii_lowercase().as_str() {
                    "off" | "none" => QuoteKey::Off,
                    "whole" => QuoteKey::Whole,
                    "masked" => QuoteKey::Masked,
                    _ => return Err(bad("quote_key", value, "off, whole or masked")),
                };
            }
            _ => return Err(KnobError::Unknown(key)),
        }
        Ok(())
    }

    /// Applies every `x-sim-<knob>` header; other headers are ignored.
    pub fn apply_headers<'a>(
        &mut self,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<(), KnobError> {
        for (name, value) in headers {
            let Some(key) = strip_prefix_ignore_case(name, "x-sim-") else {
                continue;
            };
            let value = std::str::from_utf8(value).map_err(|_| KnobError::BadValue {
                knob: "header",
                value: String::from_utf8_lossy(value).into_owned(),
                expected: "UTF-8 text",
            })?;
            self.set(key, value)?;
        }
        Ok(())
    }

    /// Applies the arguments of a `#sim` directive line (see [`parse_directive_args`]).
    pub fn apply_directive(&mut self, args: &str) -> Result<(), KnobError> {
        for (key, value) in parse_directive_args(args)? {
            self.set(key, value)?;
        }
        Ok(())
    }
}

/// Splits a message into its `#sim` directive arguments and the rest of the text.
///
/// The directive is the first line when it starts with `#sim` followed by whitespace or
/// the line end; the line and its terminator (`\n` or `\r\n`) are removed from the text.
pub fn split_directive(content: &str) -> Option<(&str, &str)> {
    let (line, rest) = match content.find('\n') {
        Some(i) => (&content[..i], &content[i + 1..]),
        None => (content, ""),
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let args = line.strip_prefix("#sim")?;
    if !args.is_empty() && !args.starts_with(char::is_whitespace) {
        return None;
    }
    Some((args, rest))
}

/// Parses `key=value key=value ...` from a directive line.
///
/// `reply=text:...` takes the rest of the line, so a literal reply may contain spaces;
/// put it last.
pub fn parse_directive_args(args: &str) -> Result<Vec<(&str, &str)>, KnobError> {
    let mut pairs = Vec::new();
    let mut rest = args.trim_start();
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        let Some((key, value)) = word.split_once('=') else {
            return Err(KnobError::BadDirective(word.to_string()));
        };
        if normalize_key(key) == "reply" && value.starts_with("text:") {
            pairs.push((key, rest[key.len() + 1..].trim_end()));
            break;
        }
        pairs.push((key, value));
        rest = rest[end..].trim_start();
    }
    Ok(pairs)
}

/// Parses an on/off switch; shared with the CLI flags.
pub fn parse_switch(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got `{value}`")),
    }
}

fn normalize_key(key: &str) -> String {
    key.trim().to_ascii_lowercase().replace('-', "_")
}

fn strip_prefix_ignore_case<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let head = name.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &name[prefix.len()..])
}

fn optional<T>(
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, KnobError>,
) -> Result<Option<T>, KnobError> {
    if value.eq_ignore_ascii_case("off") || value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    parse(value).map(Some)
}

fn bad(knob: &'static str, value: &str, expected: &'static str) -> KnobError {
    KnobError::BadValue {
        knob,
        value: value.to_string(),
        expected,
    }
}

fn number<T: std::str::FromStr>(knob: &'static str, value: &str) -> Result<T, KnobError> {
    value
        .parse()
        .map_err(|_| bad(knob, value, "a whole number"))
}

fn positive(knob: &'static str, value: &str) -> Result<usize, KnobError> {
    match number::<usize>(knob, value)? {
        0 => Err(bad(knob, value, "a whole number of at least 1")),
        n => Ok(n),
    }
}

fn millis(knob: &'static str, value: &str) -> Result<Duration, KnobError> {
    number(knob, value).map(Duration::from_millis)
}

fn switch(knob: &'static str, value: &str) -> Result<bool, KnobError> {
    parse_switch(value).map_err(|_| bad(knob, value, "on or off"))
}

fn status(value: &str) -> Result<u16, KnobError> {
    const EXPECTED: &str = "200 or an HTTP status from 400 to 599";
    let code: u16 = value.parse().map_err(|_| bad("status", value, EXPECTED))?;
    if code == 200 || STATUS_RANGE.contains(&code) {
        Ok(code)
    } else {
        Err(bad("status", value, EXPECTED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Knobs {
        Knobs::from_options(&SimOptions::default())
    }

    #[test]
    fn defaults_are_a_plain_fast_echo() {
        let knobs = defaults();
        assert_eq!(knobs.chunk_size, 4);
        assert_eq!(knobs.chunks, None);
        assert_eq!(knobs.first_byte_delay, Duration::ZERO);
        assert_eq!(knobs.chunk_delay, Duration::ZERO);
        assert!(knobs.role_chunk);
        assert!(knobs.usage);
        assert!(knobs.stream_usage);
        assert_eq!(knobs.status, None);
        assert_eq!(knobs.error_after, None);
        assert_eq!(knobs.cut_after, None);
        assert_eq!(knobs.stall_after, None);
        assert_eq!(knobs.reply, ReplySpec::Echo);
    }

    #[test]
    fn set_accepts_every_knob_in_either_spelling() {
        let mut k = defaults();
        k.set("chunk-size", "7").unwrap();
        k.set("CHUNKS", "3").unwrap();
        k.set("first_byte_delay_ms", "250").unwrap();
        k.set("chunk-delay-ms", " 10 ").unwrap();
        k.set("role_chunk", "off").unwrap();
        k.set("usage", "false").unwrap();
        k.set("stream-usage", "off").unwrap();
        k.set("status", "429").unwrap();
        k.set("retry_after", "5").unwrap();
        k.set("error_after", "2").unwrap();
        k.set("cut_after", "0").unwrap();
        k.set("stall_after", "1").unwrap();
        k.set("stall_ms", "1500").unwrap();
        k.set("reply", "lorem:12").unwrap();
        k.set("Quote-Key", "Masked").unwrap();
        assert_eq!(
            k,
            Knobs {
                chunk_size: 7,
                chunks: Some(3),
                first_byte_delay: Duration::from_millis(250),
                chunk_delay: Duration::from_millis(10),
                role_chunk: false,
                usage: false,
                stream_usage: false,
                status: Some(429),
                retry_after: Some(5),
                error_after: Some(2),
                cut_after: Some(0),
                stall_after: Some(1),
                stall: Duration::from_millis(1500),
                reply: ReplySpec::Lorem(12),
                quote_key: QuoteKey::Masked,
                error_message: None,
            }
        );
        assert!(k.set("quote_key", "half").is_err());
    }

    #[test]
    fn quoted_keys_look_like_openai_texts() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz";
        assert_eq!(QuoteKey::Off.message(Some(key)), None);
        assert_eq!(QuoteKey::Whole.message(None), None);
        assert!(QuoteKey::Whole.message(Some(key)).unwrap().contains(key));
        let masked = QuoteKey::Masked.message(Some(key)).unwrap();
        assert!(
            masked.starts_with("Incorrect API key provided: sk-proj-abc****wxyz."),
            "{masked}"
        );
    }

    #[test]
    fn off_unsets_optional_knobs_and_status_200_means_normal() {
        let mut k = defaults();
        k.set("cut_after", "3").unwrap();
        k.set("cut_after", "off").unwrap();
        assert_eq!(k.cut_after, None);
        k.set("status", "503").unwrap();
        k.set("status", "200").unwrap();
        assert_eq!(k.status, None);
    }

    #[test]
    fn bad_values_and_names_are_reported() {
        let mut k = defaults();
        assert_eq!(
            k.set("chunk_size", "0").unwrap_err().to_string(),
            "bad value `0` for simulator knob `chunk_size`: expected a whole number of at least 1"
        );
        assert_eq!(
            k.set("status", "302").unwrap_err().to_string(),
            "bad value `302` for simulator knob `status`: expected 200 or an HTTP status from 400 to 599"
        );
        assert_eq!(
            k.set("usage", "maybe").unwrap_err().to_string(),
            "bad value `maybe` for simulator knob `usage`: expected on or off"
        );
        assert_eq!(
            k.set("chunk-sise", "3").unwrap_err(),
            KnobError::Unknown("chunk_sise".to_string())
        );
        assert!(k.set("reply", "poetry").is_err());
        assert_eq!(k, defaults(), "failed sets change nothing");
    }

    #[test]
    fn headers_apply_only_the_x_sim_prefix() {
        let mut k = defaults();
        let headers: Vec<(&str, &[u8])> = vec![
            ("content-type", b"application/json"),
            ("x-sim-chunk-size", b"2"),
            ("X-Sim-Usage", b"off"),
            ("x-simulated", b"ignored"),
        ];
        k.apply_headers(headers).unwrap();
        assert_eq!(k.chunk_size, 2);
        assert!(!k.usage);

        let unknown: Vec<(&str, &[u8])> = vec![("x-sim-bogus", b"1")];
        assert_eq!(
            k.apply_headers(unknown).unwrap_err(),
            KnobError::Unknown("bogus".to_string())
        );
    }

    #[test]
    fn split_directive_removes_only_a_first_sim_line() {
        assert_eq!(
            split_directive("#sim chunks=2 usage=off\nhello\nworld"),
            Some((" chunks=2 usage=off", "hello\nworld"))
        );
        assert_eq!(
            split_directive("#sim status=500\r\nrest"),
            Some((" status=500", "rest"))
        );
        assert_eq!(split_directive("#sim"), Some(("", "")));
        assert_eq!(split_directive("#simulate this\nx"), None);
        assert_eq!(split_directive("hello\n#sim chunks=2"), None);
        assert_eq!(split_directive(" #sim chunks=2"), None);
    }

    #[test]
    fn directive_args_parse_pairs_and_a_trailing_text_reply() {
        assert_eq!(
            parse_directive_args("  chunks=2   usage=off ").unwrap(),
            vec![("chunks", "2"), ("usage", "off")]
        );
        assert_eq!(
            parse_directive_args(" chunk_size=3 reply=text:Hello, big world!  ").unwrap(),
            vec![("chunk_size", "3"), ("reply", "text:Hello, big world!")]
        );
        assert_eq!(
            parse_directive_args("chunks 2").unwrap_err(),
            KnobError::BadDirective("chunks".to_string())
        );
        assert!(parse_directive_args("").unwrap().is_empty());
    }

    #[test]
    fn directive_overrides_headers_which_override_options() {
        let options = SimOptions {
            chunk_size: 9,
            chunk_delay_ms: 5,
            ..SimOptions::default()
        };
        let mut k = Knobs::from_options(&options);
        let headers: Vec<(&str, &[u8])> = vec![("x-sim-chunk-size", b"3")];
        k.apply_headers(headers).unwrap();
        k.apply_directive("chunk_size=1").unwrap();
        assert_eq!(k.chunk_size, 1);
        assert_eq!(k.chunk_delay, Duration::from_millis(5));
    }

    #[test]
    fn switch_parser_accepts_common_spellings() {
        for on in ["on", "ON", "true", "yes", "1"] {
            assert_eq!(parse_switch(on), Ok(true));
        }
        for off in ["off", "false", "no", "0"] {
            assert_eq!(parse_switch(off), Ok(false));
        }
        assert!(parse_switch("sometimes").is_err());
    }
}
