//! Downstream SSE encoder: turns answer text into the `event: message` frames of the
//! wire contract, plus the `event: error` frame and the keep-alive comment.
//! Appends to a caller-owned `BytesMut` so a stream reuses one buffer.

use bytes::{BufMut, BytesMut};
use serde::Deserialize;

/// SSE comment sent during long upstream silences so idle timers along the path do not fire.
pub const KEEPALIVE_COMMENT: &[u8] = b": keep-alive\n\n";

/// How a route renders the text of a `message` event's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// The raw text; line breaks become several `data:` lines (SSE's own multi-line rule).
    #[default]
    Text,
    /// The text as one JSON string literal, so the client sees escapes instead of line breaks.
    Json,
}

/// Appends one `event: message` frame carrying `text` (which may be empty).
pub fn write_message_event(text: &str, format: DataFormat, out: &mut BytesMut) {
    out.reserve(text.len() + 32);
    // One copy per run of constant framing: this runs once per streamed token.
    out.put_slice(b"event: message\ndata: ");
    match format {
        DataFormat::Text => write_text_lines(text.as_bytes(), out),
        DataFormat::Json => push_json_string(text, out),
    }
    out.put_slice(b"\n\n");
}

/// Writes the text deltas of one stream as `message` events, carrying a line break split
/// across deltas: a delta ending in `\r` already ended its line, so a `\n` opening the
/// next delta is the second half of that `\r\n`, not another break. Without this, `abc\r`
/// then `\nd` would reach a client as `abc\n\nd`.
#[derive(Debug, Clone, Copy)]
pub struct DeltaWriter {
    format: DataFormat,
    after_cr: bool,
}

impl DeltaWriter {
    /// A writer rendering deltas as `format`.
    pub fn new(format: DataFormat) -> Self {
        Self {
            format,
            after_cr: false,
        }
    }

    /// Appends the `message` event for one delta; returns whether an event was written.
    /// In `text` format a delta that was only the `\n` of a split `\r\n` writes nothing:
    /// an empty event in mid-stream would look like the closing one.
    pub fn write(&mut self, text: &str, out: &mut BytesMut) -> bool {
        if text.is_empty() {
            return false;
        }
        let text = match self.format {
            DataFormat::Text if self.after_cr => text.strip_prefix('\n').unwrap_or(text),
            _ => text,
        };
        if text.is_empty() {
            self.after_cr = false;
            return false;
        }
        self.after_cr = text.ends_with('\r');
        write_message_event(text, self.format, out);
        true
    }
}

/// Appends one `event: error` frame whose data is `{"errorMessage": <error_message>}`.
pub fn write_error_event(error_message: &str, out: &mut BytesMut) {
    out.reserve(error_message.len() + 48);
    out.put_slice(b"event: error\ndata: {\"errorMessage\": ");
    push_json_string(error_message, out);
    out.put_slice(b"}\n\n");
}

/// Writes `text` as the data of the frame, whose first `data: ` is already out: one line
/// per line of `text`. `\r\n`, `\n` and `\r` all end a line, because an SSE client treats
/// all three as line ends and a raw one inside a data line would cut it.
fn write_text_lines(text: &[u8], out: &mut BytesMut) {
    let mut rest = text;
    while let Some(at) = find_line_break(rest) {
        out.put_slice(&rest[..at]);
        out.put_slice(b"\ndata: ");
        let ending = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[at + ending..];
    }
    out.put_slice(rest);
}

/// Where the first `\n` or `\r` of `text` is. Most streamed tokens are a few bytes long,
/// where a plain loop costs less than memchr's setup.
fn find_line_break(text: &[u8]) -> Option<usize> {
    if text.len() < 16 {
        text.iter().position(|&byte| byte == b'\n' || byte == b'\r')
    } else {
        memchr::memchr2(b'\n', b'\r', text)
    }
}

fn push_json_string(text: &str, out: &mut BytesMut) {
    // A str always serializes, and BytesMut grows on demand, so this cannot fail.
    let _ = serde_json::to_writer(out.writer(), text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, format: DataFormat) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_message_event(text, format, &mut out);
        out.to_vec()
    }

    #[test]
    fn text_format_splits_every_kind_of_line_break() {
        let cases: &[(&str, &[u8])] = &[
            ("", b"event: message\ndata: \n\n"),
            ("Hello", b"event: message\ndata: Hello\n\n"),
            (" Xiao", b"event: message\ndata:  Xiao\n\n"),
            ("a\nb", b"event: message\ndata: a\ndata: b\n\n"),
            ("\n", b"event: message\ndata: \ndata: \n\n"),
            ("a\r\nb", b"event: message\ndata: a\ndata: b\n\n"),
            ("a\rb", b"event: message\ndata: a\ndata: b\n\n"),
            ("\r\n", b"event: message\ndata: \ndata: \n\n"),
            (
                "\r\r\n\n",
                b"event: message\ndata: \ndata: \ndata: \ndata: \n\n",
            ),
            ("a\n", b"event: message\ndata: a\ndata: \n\n"),
            ("你好😀", "event: message\ndata: 你好😀\n\n".as_bytes()),
            // Past 16 bytes the line-break search takes its memchr path.
            (
                "a line of more than sixteen bytes\r\nand\ranother one\n",
                b"event: message\ndata: a line of more than sixteen bytes\ndata: and\ndata: another one\ndata: \n\n",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                message(text, DataFormat::Text),
                expected.to_vec(),
                "text {text:?}"
            );
        }
    }

    #[test]
    fn json_format_is_one_escaped_literal() {
        assert_eq!(
            message("", DataFormat::Json),
            b"event: message\ndata: \"\"\n\n".to_vec()
        );
        assert_eq!(
            message("a\r\n\"b\"\\ 你", DataFormat::Json),
            "event: message\ndata: \"a\\r\\n\\\"b\\\"\\\\ 你\"\n\n"
                .as_bytes()
                .to_vec()
        );
    }

    #[test]
    fn error_event_matches_the_contract() {
        let mut out = BytesMut::new();
        write_error_event(
            "Failed with chatbot.ChatCompletion: upstream error: \"bad\"\n",
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"event: error\ndata: {\"errorMessage\": \"Failed with chatbot.ChatCompletion: upstream error: \\\"bad\\\"\\n\"}\n\n"
        );
    }

    #[test]
    fn events_append_to_the_buffer() {
        let mut out = BytesMut::new();
        write_message_event("a", DataFormat::Text, &mut out);
        out.put_slice(KEEPALIVE_COMMENT);
        write_message_event("b", DataFormat::Text, &mut out);
        assert_eq!(
            &out[..],
            b"event: message\ndata: a\n\n: keep-alive\n\nevent: message\ndata: b\n\n"
        );
    }

    #[test]
    fn data_format_deserializes_from_lowercase_names() {
        let parsed: Vec<DataFormat> = serde_json::from_str(r#"["text","json"]"#).unwrap();
        assert_eq!(parsed, vec![DataFormat::Text, DataFormat::Json]);
        assert!(serde_json::from_str::<DataFormat>(r#""Text""#).is_err());
        assert_eq!(DataFormat::default(), DataFormat::Text);
    }
}
