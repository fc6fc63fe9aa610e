//! Sans-IO parser for the upstream's OpenAI chat-completions SSE stream: fed raw body
//! pieces split at any byte, it follows the SSE line rules and turns each `data` payload
//! into a text delta, a usage report, the `[DONE]` marker or an upstream error.

use std::borrow::Cow;

use super::chunk_scan::{scan_chunk, Malformed};
use super::reply::{error_value_message, Usage};

/// Default bound on one upstream event (and on one line), in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// What one upstream event means for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent<'a> {
    /// A non-empty piece of the answer (`choices[0].delta.content`).
    Delta(Cow<'a, str>),
    /// Token usage, usually in the last chunk before `[DONE]`.
    Usage(Usage),
    /// A choice's `finish_reason` (once per stream and choice, in its last chunk), with
    /// the `model` that chunk names; only from a parser told to [`UpstreamSseParser::report_finish`].
    Finish {
        reason: Cow<'a, str>,
        model: Option<Cow<'a, str>>,
    },
    /// `data: [DONE]`: the answer is complete.
    Done,
    /// The upstream reported an error inside the stream; the text is already cleaned.
    Error(String),
}

impl UpstreamEvent<'_> {
    /// Detaches the event from the parser's buffer, for callers that keep events around.
    pub fn into_owned(self) -> UpstreamEvent<'static> {
        match self {
            UpstreamEvent::Delta(text) => UpstreamEvent::Delta(Cow::Owned(text.into_owned())),
            UpstreamEvent::Usage(usage) => UpstreamEvent::Usage(usage),
            UpstreamEvent::Finish { reason, model } => UpstreamEvent::Finish {
                reason: Cow::Owned(reason.into_owned()),
                model: model.map(|model| Cow::Owned(model.into_owned())),
            },
            UpstreamEvent::Done => UpstreamEvent::Done,
            UpstreamEvent::Error(message) => UpstreamEvent::Error(message),
        }
    }
}

/// How a reply said it ended, for its trace: the model the upstream named and the
/// finish reasons, in the order they came.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinishSeen {
    pub model: Option<String>,
    pub finish_reasons: Vec<String>,
}

impl FinishSeen {
    /// Notes one [`UpstreamEvent::Finish`].
    pub fn note(&mut self, reason: &str, model: Option<&str>) {
        self.finish_reasons.push(reason.to_owned());
        if let Some(model) = model {
            self.model = Some(model.to_owned());
        }
    }
}

/// Why the upstream stream cannot be read further. Display texts are short causes fit
/// for `Failed with chatbot.ChatCompletion: <cause>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line or event grew beyond the configured bound.
    #[error("upstream sent a stream event larger than {limit} bytes")]
    EventTooLarge {
        /// The configured bound in bytes.
        limit: usize,
    },
    /// A `data` payload that is neither `[DONE]` nor a JSON object of the expected shape.
    #[error("upstream sent a malformed stream chunk")]
    MalformedChunk,
}

/// Incremental parser of an upstream SSE body. Feed it pieces as they arrive; it calls
/// back once per meaningful event, borrowing delta text from its own buffer when it can.
/// After `Done`, an `Error` event or an `Err`, it ignores further input.
#[derive(Debug)]
pub struct UpstreamSseParser {
    max_event_bytes: usize,
    /// The start of a line whose end has not arrived yet.
    partial_line: Vec<u8>,
    /// The `data` lines of the current event, joined with `\n`.
    data: Vec<u8>,
    /// Delta text with its escapes decoded, reused from event to event.
    unescaped: String,
    has_data: bool,
    /// The previous piece ended in `\r`, so a `\n` opening the next one ends no new line.
    skip_lf: bool,
    ended: bool,
    /// Whether finish reasons are looked for (the stream's trace is recorded).
    report_finish: bool,
}

impl Default for UpstreamSseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl UpstreamSseParser {
    /// A parser that refuses events (and lines) over `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            partial_line: Vec::new(),
            data: Vec::with_capacity(512),
            unescaped: String::new(),
            has_data: false,
            skip_lf: false,
            ended: false,
            report_finish: false,
        }
    }

    /// Also reports [`UpstreamEvent::Finish`]. Off, as it is for an untraced stream, the
    /// parser does not look for finish reasons at all.
    pub fn report_finish(&mut self) {
        self.report_finish = true;
    }

    /// Whether the stream is over (`[DONE]`, an upstream error or a parse error was seen).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Parses the next piece of the body, calling `on_event` for each event it completes.
    pub fn feed<F>(&mut self, piece: &[u8], on_event: &mut F) -> Result<(), SseError>
    where
        F: FnMut(UpstreamEvent<'_>),
    {
        if self.ended || piece.is_empty() {
            return Ok(());
        }
        let mut rest = piece;
        if std::mem::take(&mut self.skip_lf) && rest[0] == b'\n' {
            rest = &rest[1..];
        }
        while !self.ended {
            let Some(at) = memchr::memchr2(b'\n', b'\r', rest) else {
                if self.partial_line.len() + rest.len() > self.max_event_bytes {
                    return Err(self.fail(SseError::EventTooLarge {
                        limit: self.max_event_bytes,
                    }));
                }
                self.partial_line.extend_from_slice(rest);
                break;
            };
            let next = match (rest[at], rest.get(at + 1)) {
                (b'\r', Some(b'\n')) => at + 2,
                (b'\r', None) => {
                    self.skip_lf = true;
                    at + 1
                }
                _ => at + 1,
            };
            if let Some(after) = self.single_line_event(rest, at, next) {
                // Same as `take_line(data line)` then `take_line("")`, without copying
                // the payload into `self.data`.
                let value = &rest[5..at];
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if value.len() > self.max_event_bytes {
                    return Err(self.fail(SseError::EventTooLarge {
                        limit: self.max_event_bytes,
                    }));
                }
                match interpret_payload(value, &mut self.unescaped, self.report_finish, on_event) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::End) => self.ended = true,
                    Err(error) => return Err(self.fail(error)),
                }
                rest = &rest[after..];
                continue;
            }
            if self.partial_line.is_empty() {
                self.take_line(&rest[..at], on_event)?;
            } else {
                self.take_split_line(&rest[..at], on_event)?;
            }
            rest = &rest[next..];
        }
        Ok(())
    }

    /// Ends the body: an unterminated last line and event are processed as if a blank
    /// line followed, since some upstreams close right after `data: [DONE]`.
    pub fn finish<F>(&mut self, on_event: &mut F) -> Result<(), SseError>
    where
        F: FnMut(UpstreamEvent<'_>),
    {
        if self.ended {
            return Ok(());
        }
        if !self.partial_line.is_empty() {
            self.take_split_line(&[], on_event)?;
        }
        if !self.ended {
            self.dispatch(on_event)?;
        }
        self.ended = true;
        Ok(())
    }

    /// The common case of one whole `data:` line (ending at `at`, next line at `next`)
    /// followed at once by a blank line, all inside `rest` and with nothing buffered:
    /// returns where the input after the blank line starts.
    fn single_line_event(&self, rest: &[u8], at: usize, next: usize) -> Option<usize> {
        if !self.partial_line.is_empty() || self.has_data || !rest[..at].starts_with(b"data:") {
            return None;
        }
        match rest.get(next..next + 2) {
            Some([b'\n', _]) => Some(next + 1),
            Some(b"\r\n") => Some(next + 2),
            // A lone `\r` at the very end may be followed by a `\n` in the next piece,
            // which the general path tracks with `skip_lf`.
            _ if rest.get(next) == Some(&b'\n') => Some(next + 1),
            _ => None,
        }
    }

    fn fail(&mut self, error: SseError) -> SseError {
        self.ended = true;
        error
    }

    /// Completes the buffered start of a line with `tail` and processes it.
    fn take_split_line<F>(&mut self, tail: &[u8], on_event: &mut F) -> Result<(), SseError>
    where
        F: FnMut(UpstreamEvent<'_>),
    {
        if self.partial_line.len() + tail.len() > self.max_event_bytes {
            return Err(self.fail(SseError::EventTooLarge {
                limit: self.max_event_bytes,
            }));
        }
        let mut line = std::mem::take(&mut self.partial_line);
        line.extend_from_slice(tail);
        let result = self.take_line(&line, on_event);
        line.clear();
        self.partial_line = line;
        result
    }

    fn take_line<F>(&mut self, line: &[u8], on_event: &mut F) -> Result<(), SseError>
    where
        F: FnMut(UpstreamEvent<'_>),
    {
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // `event`, `id`, `retry` and unknown fields carry nothing an OpenAI stream needs.
        if field != b"data" {
            return Ok(());
        }
        let separator = usize::from(self.has_data);
        if self.data.len() + separator + value.len() > self.max_event_bytes {
            return Err(self.fail(SseError::EventTooLarge {
                limit: self.max_event_bytes,
            }));
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
        Ok(())
    }

    fn dispatch<F>(&mut self, on_event: &mut F) -> Result<(), SseError>
    where
        F: FnMut(UpstreamEvent<'_>),
    {
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        let result = interpret_payload(
            &self.data,
            &mut self.unescaped,
            self.report_finish,
            on_event,
        );
        self.data.clear();
        match result {
            Ok(Flow::Continue) => Ok(()),
            Ok(Flow::End) => {
                self.ended = true;
                Ok(())
            }
            Err(error) => Err(self.fail(error)),
        }
    }
}

enum Flow {
    Continue,
    End,
}

/// Interprets one event's payload; delta text with escapes is decoded into `unescaped`.
fn interpret_payload<F>(
    payload: &[u8],
    unescaped: &mut String,
    report_finish: bool,
    on_event: &mut F,
) -> Result<Flow, SseError>
where
    F: FnMut(UpstreamEvent<'_>),
{
    let trimmed = payload.trim_ascii();
    // An empty payload carries nothing; some servers use `data:` lines as keep-alives.
    if trimmed.is_empty() {
        return Ok(Flow::Continue);
    }
    if trimmed == b"[DONE]" {
        on_event(UpstreamEvent::Done);
        return Ok(Flow::End);
    }
    let chunk = scan_chunk(trimmed).map_err(|Malformed| SseError::MalformedChunk)?;
    let content = chunk
        .content
        .map(|literal| literal.decode_into(unescaped))
        .transpose()
        .map_err(|Malformed| SseError::MalformedChunk)?;
    if chunk.has_error {
        // Rare, so the error member is read with the general (slower) JSON parser.
        let message = serde_json::from_slice::<serde_json::Value>(trimmed)
            .ok()
            .and_then(|value| value.get("error").map(error_value_message))
            .ok_or(SseError::MalformedChunk)?;
        on_event(UpstreamEvent::Error(message));
        return Ok(Flow::End);
    }
    if let Some(text) = content.filter(|text| !text.is_empty()) {
        on_event(UpstreamEvent::Delta(Cow::Borrowed(text)));
    }
    if report_finish && has_finish_reason(trimmed) {
        report_finishes(trimmed, on_event);
    }
    if let Some(usage) = chunk.usage {
        on_event(UpstreamEvent::Usage(usage));
    }
    Ok(Flow::Continue)
}

/// Whether the payload may hold a string `finish_reason` (it is `null` in every chunk but
/// the last): a quick look, so that only that chunk is parsed again. Inside a JSON string a
/// quote is escaped, so `"finish_reason"` with both quotes bare is a key.
fn has_finish_reason(payload: &[u8]) -> bool {
    const KEY: &[u8] = b"\"finish_reason\"";
    memchr::memmem::find_iter(payload, KEY).any(|at| {
        let rest = payload[at + KEY.len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|value| value.trim_ascii_start().first() == Some(&b'"'))
    })
}

/// Reports each choice's string `finish_reason` with the chunk's `model`, read with the
/// general JSON parser (once per stream). Odd types are left out, never an error.
fn report_finishes<F>(payload: &[u8], on_event: &mut F)
where
    F: FnMut(UpstreamEvent<'_>),
{
    let Ok(chunk) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let model = chunk.get("model").and_then(serde_json::Value::as_str);
    let choices = chunk.get("choices").and_then(serde_json::Value::as_array);
    for choice in choices.into_iter().flatten() {
        if let Some(reason) = choice
            .get("finish_reason")
            .and_then(serde_json::Value::as_str)
        {
            on_event(UpstreamEvent::Finish {
                reason: Cow::Borrowed(reason),
                model: model.map(Cow::Borrowed),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Events = Vec<UpstreamEvent<'static>>;

    /// Feeds `pieces` then finishes; returns the events and the first error.
    fn parse_pieces(
        parser: &mut UpstreamSseParser,
        pieces: &[&[u8]],
    ) -> (Events, Option<SseError>) {
        let mut events = Vec::new();
        let mut sink = |event: UpstreamEvent<'_>| events.push(event.into_owned());
        for piece in pieces {
            if let Err(error) = parser.feed(piece, &mut sink) {
                return (events, Some(error));
            }
        }
        let error = parser.finish(&mut sink).err();
        (events, error)
    }

    fn parse(pieces: &[&[u8]]) -> (Events, Option<SseError>) {
        parse_pieces(&mut UpstreamSseParser::default(), pieces)
    }

    fn delta(text: &str) -> UpstreamEvent<'static> {
        UpstreamEvent::Delta(Cow::Owned(text.to_owned()))
    }

    fn finish(reason: &str, model: Option<&str>) -> UpstreamEvent<'static> {
        UpstreamEvent::Finish {
            reason: Cow::Owned(reason.to_owned()),
            model: model.map(|model| Cow::Owned(model.to_owned())),
        }
    }

    fn content_chunk(text: &str) -> String {
        format!(
            r#"{{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}],"usage":null}}"#,
            serde_json::to_string(text).unwrap()
        )
    }

    #[test]
    fn reads_a_typical_openai_stream() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \\\"w\\u00f6rld\\\"\"},\"logprobs\":null}]}\n\n",
            "data: {\"model\":\"gpt-4o-2024\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            parse(&[body.as_bytes()]),
            (
                vec![
                    delta("Hello"),
                    delta(" \"wörld\""),
                    UpstreamEvent::Usage(Usage {
                        prompt_tokens: 9,
                        completion_tokens: 2
                    }),
                    UpstreamEvent::Done,
                ],
                None
            )
        );
    }

    #[test]
    fn unescaped_delta_text_is_borrowed() {
        let mut parser = UpstreamSseParser::default();
        let mut borrowed = Vec::new();
        let chunk = format!("data: {}\n\n", content_chunk("plain"));
        parser
            .feed(chunk.as_bytes(), &mut |event| {
                borrowed.push(matches!(
                    event,
                    UpstreamEvent::Delta(Cow::Borrowed("plain"))
                ))
            })
            .unwrap();
        assert_eq!(borrowed, vec![true]);
    }

    #[test]
    fn every_line_ending_works() {
        for ending in ["\n", "\r\n", "\r"] {
            let body = format!(
                "data: {a}{e}{e}:c{e}data: {b}{e}{e}data: [DONE]{e}{e}",
                a = content_chunk("a"),
                b = content_chunk("b"),
                e = ending
            );
            assert_eq!(
                parse(&[body.as_bytes()]),
                (vec![delta("a"), delta("b"), UpstreamEvent::Done], None),
                "ending {ending:?}"
            );
        }
    }

    #[test]
    fn cr_and_lf_split_across_pieces_end_one_line() {
        let chunk = format!("data: {}", content_chunk("x"));
        // Were the `\n` after the split `\r` a second line end, the blank line would
        // dispatch early and the following line would never be seen as part of the event.
        let pieces: [&[u8]; 5] = [chunk.as_bytes(), b"\r", b"\n\r", b"\ndata: [DONE]\r", b"\n"];
        assert_eq!(
            parse(&pieces),
            (vec![delta("x"), UpstreamEvent::Done], None)
        );

        let two_lines: [&[u8]; 4] = [b"data: {\"choices\":\r", b"\n", b"data: []}\r", b"\r\n"];
        assert_eq!(parse(&two_lines), (vec![], None));
    }

    #[test]
    fn empty_pieces_keep_a_pending_cr() {
        let chunk = format!("data: {}\r", content_chunk("x"));
        let pieces: [&[u8]; 4] = [chunk.as_bytes(), b"", b"\n", b"\n"];
        assert_eq!(parse(&pieces), (vec![delta("x")], None));
    }

    #[test]
    fn field_rules() {
        // No space after the colon, a second space kept, data lines joined with \n
        // (valid JSON whitespace here), other fields ignored.
        let body = concat!(
            "event: completion\nid: 7\nretry: 100\nfoo: bar\ndata:{\"choices\":[{\"delta\":\n",
            "data:  {\"content\":\"a\"}}]}\n\n",
            "data\n\n",
            "data:  [DONE]\n\n"
        );
        assert_eq!(
            parse(&[body.as_bytes()]),
            (vec![delta("a"), UpstreamEvent::Done], None)
        );
    }

    #[test]
    fn data_lines_join_with_newline() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\ndata: b\"}}]}\n\n";
        // The joined payload contains a raw newline inside a JSON string, which JSON forbids.
        assert_eq!(
            parse(&[body.as_bytes()]),
            (vec![], Some(SseError::MalformedChunk))
        );
    }

    #[test]
    fn multibyte_characters_split_across_pieces_are_reassembled() {
        let text = "你好😀 \"é\"\\\n\u{1}";
        let body = format!("data: {}\n\ndata: [DONE]\n\n", content_chunk(text));
        let bytes = body.as_bytes();
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            parse(&pieces),
            (vec![delta(text), UpstreamEvent::Done], None)
        );
    }

    #[test]
    fn trailing_event_without_blank_line_is_dispatched_at_finish() {
        let body = format!("data: {}\n\ndata: [DONE]", content_chunk("a"));
        assert_eq!(
            parse(&[body.as_bytes()]),
            (vec![delta("a"), UpstreamEvent::Done], None)
        );
        let unterminated_line = format!("data: {}\n", content_chunk("b"));
        assert_eq!(
            parse(&[unterminated_line.as_bytes()]),
            (vec![delta("b")], None)
        );
    }

    #[test]
    fn finish_reasons_come_with_the_chunks_model_only_when_asked_and_never_fail() {
        let body = concat!(
            "data: {\"model\":\"m\\u00e9\",\"choices\":[{\"delta\":{\"content\":\"a \\\"finish_reason\\\": \\\"x\"},\"finish_reason\":null}]}\n\n",
            "data: {\"model\":\"m\\u00e9\",\"choices\":[{\"delta\":{},\"finish_reason\" : \"len\\u0067th\"}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"},{\"finish_reason\":\"second\"}]}\n\n",
            "data: {\"model\":7,\"choices\":[{\"finish_reason\":{\"odd\":true}}]}\n\n",
            "data: {\"model\":\"x\",\"choices\":[{\"finish_reason\":\"\\ud800\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut parser = UpstreamSseParser::default();
        parser.report_finish();
        assert_eq!(
            parse_pieces(&mut parser, &[body.as_bytes()]),
            (
                vec![
                    delta("a \"finish_reason\": \"x"),
                    finish("length", Some("mé")),
                    finish("stop", None),
                    finish("second", None),
                    UpstreamEvent::Done,
                ],
                None
            )
        );
        assert_eq!(
            parse(&[body.as_bytes()]),
            (
                vec![delta("a \"finish_reason\": \"x"), UpstreamEvent::Done],
                None
            ),
            "not looked for unless asked"
        );
    }

    #[test]
    fn chunks_without_text_give_nothing() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":null},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[]}\n\n",
            "data: {\"choices\":null,\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":null}]}\n\n",
            "data: {}\n\n",
            "data: \n\n",
        );
        assert_eq!(parse(&[body.as_bytes()]), (vec![], None));
    }

    #[test]
    fn content_and_usage_in_one_chunk_give_both() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"z\"}},{\"delta\":{\"content\":\"ignored\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        assert_eq!(
            parse(&[body.as_bytes()]),
            (
                vec![
                    delta("z"),
                    UpstreamEvent::Usage(Usage {
                        prompt_tokens: 1,
                        completion_tokens: 1
                    })
                ],
                None
            )
        );
    }

    #[test]
    fn upstream_errors_end_the_stream() {
        let object = "data: {\"error\":{\"message\":\"The server had an error\\nwhile processing\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            parse(&[object.as_bytes()]),
            (
                vec![UpstreamEvent::Error(
                    "The server had an error\nwhile processing".to_owned()
                )],
                None
            )
        );
        let text = "data: {\"error\":\"overloaded\"}\n\n";
        assert_eq!(
            parse(&[text.as_bytes()]),
            (vec![UpstreamEvent::Error("overloaded".to_owned())], None)
        );
        let null_error = format!(
            "data: {}\n\n",
            content_chunk("ok").replace("\"usage\":null", "\"error\":null")
        );
        assert_eq!(parse(&[null_error.as_bytes()]), (vec![delta("ok")], None));
    }

    #[test]
    fn malformed_payloads_are_errors_and_end_the_stream() {
        for payload in [
            "{\"choices\":",
            "hello",
            "{\"choices\":5}",
            "{\"choices\":[{\"delta\":{\"content\":7}}]}",
            "[1]",
        ] {
            let body = format!("data: {payload}\n\ndata: {}\n\n", content_chunk("late"));
            assert_eq!(
                parse(&[body.as_bytes()]),
                (vec![], Some(SseError::MalformedChunk)),
                "payload {payload}"
            );
        }
        let invalid_utf8: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\"}}]}\n\n";
        assert_eq!(
            parse(&[invalid_utf8]),
            (vec![], Some(SseError::MalformedChunk))
        );
        assert_eq!(
            SseError::MalformedChunk.to_string(),
            "upstream sent a malformed stream chunk"
        );
    }

    #[test]
    fn input_after_done_is_ignored() {
        let body = format!(
            "data: [DONE]\n\ndata: {}\n\nnot even sse",
            content_chunk("late")
        );
        assert_eq!(
            parse(&[body.as_bytes(), b"\xff\xfe"]),
            (vec![UpstreamEvent::Done], None)
        );
    }

    #[test]
    fn event_size_is_bounded() {
        let limit = 64;
        let long_line = format!("data: {}", "x".repeat(limit));
        let expected = Some(SseError::EventTooLarge { limit });
        // One line, arriving whole or in pieces, never terminated.
        let mut parser = UpstreamSseParser::new(limit);
        assert_eq!(
            parse_pieces(&mut parser, &[long_line.as_bytes()]),
            (vec![], expected.clone())
        );
        assert!(parser.is_ended());
        let pieces: Vec<&[u8]> = long_line.as_bytes().chunks(5).collect();
        assert_eq!(
            parse_pieces(&mut UpstreamSseParser::new(limit), &pieces),
            (vec![], expected.clone())
        );
        // Many short data lines that add up.
        let many = "data: 0123456789\n".repeat(7);
        assert_eq!(
            parse_pieces(&mut UpstreamSseParser::new(limit), &[many.as_bytes()]),
            (vec![], expected.clone())
        );
        // Exactly at the limit is fine.
        let chunk = content_chunk("a");
        let at_limit = format!("data: {chunk}\n\n");
        assert_eq!(
            parse_pieces(
                &mut UpstreamSseParser::new(chunk.len()),
                &[at_limit.as_bytes()]
            ),
            (vec![delta("a")], None)
        );
        // Comments that each fit do not add up.
        let comments = ": 0123456789\n".repeat(100);
        assert_eq!(
            parse_pieces(&mut UpstreamSseParser::new(limit), &[comments.as_bytes()]),
            (vec![], None)
        );
    }
}
