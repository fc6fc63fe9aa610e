//! Streaming reply transcoder: reads the upstream's OpenAI SSE body piece by piece and
//! writes the contract's downstream SSE frames (one empty event first, one per text
//! delta, one empty event last), reporting when the stream finished or failed. It keeps
//! the answer's text until the upstream reports usage, to count it when none comes.

use bytes::BytesMut;

use super::reply::Usage;
use super::sse_in::{FinishSeen, SseError, UpstreamEvent, UpstreamSseParser};
use super::sse_out::{write_message_event, DataFormat, DeltaWriter};
use super::token_count::CompletionText;

/// Where a streamed reply stands after a call to the transcoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStatus {
    /// More upstream input is expected.
    Open,
    /// The closing empty event has been written; the downstream body is complete.
    Finished,
    /// The upstream failed; the caller writes the error event with this cause
    /// (`Failed with chatbot.ChatCompletion: <cause>`) and closes the stream.
    Failed(String),
}

/// Turns one upstream SSE body into the downstream SSE body.
#[derive(Debug)]
pub struct StreamTranscoder {
    parser: UpstreamSseParser,
    format: DataFormat,
    writer: DeltaWriter,
    status: StreamStatus,
    usage: Option<Usage>,
    events_sent: u64,
    /// The answer so far, while no usage was reported.
    completion: CompletionText,
    /// The answer text written since the last [`StreamTranscoder::take_text`], when kept.
    text: Option<String>,
    /// The model and finish reasons, when kept (the request's trace is recorded).
    finish: Option<Box<FinishSeen>>,
}

impl StreamTranscoder {
    /// A transcoder rendering text as `format`, refusing upstream events over `max_event_bytes`.
    pub fn new(format: DataFormat, max_event_bytes: usize) -> Self {
        Self {
            parser: UpstreamSseParser::new(max_event_bytes),
            format,
            writer: DeltaWriter::new(format),
            status: StreamStatus::Open,
            usage: None,
            events_sent: 0,
            completion: CompletionText::default(),
            text: None,
            finish: None,
        }
    }

    /// Keeps the model and finish reasons the upstream reports, for
    /// [`StreamTranscoder::take_finish`] (the attempt's span).
    pub fn keep_finish(&mut self) {
        self.parser.report_finish();
        self.finish.get_or_insert_with(Box::default);
    }

    /// The model and finish reasons seen, when kept.
    pub fn take_finish(&mut self) -> Option<FinishSeen> {
        self.finish.take().map(|finish| *finish)
    }

    /// Keeps the answer text it writes, for [`StreamTranscoder::take_text`] (the
    /// conversation record).
    pub fn keep_text(&mut self) {
        self.text.get_or_insert_with(String::new);
    }

    /// The answer text written since the last call (empty unless kept): the
    /// concatenated `data` of the events, before they were split into lines.
    pub fn take_text(&mut self) -> String {
        self.text.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Writes the opening empty `message` event; call once, when the upstream answered 200.
    pub fn start(&mut self, out: &mut BytesMut) {
        write_message_event("", self.format, out);
    }

    /// Transcodes the next piece of the upstream body into `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut BytesMut) -> StreamStatus {
        if !matches!(self.status, StreamStatus::Open) {
            return self.status.clone();
        }
        self.parse(out, |parser, sink| {
            parser.feed(piece, &mut |event| sink.take(event))
        })
    }

    /// Ends the upstream body (it closed cleanly): dispatches a trailing event and, unless
    /// the stream already finished or failed, writes the closing empty event.
    pub fn finish(&mut self, out: &mut BytesMut) -> StreamStatus {
        if self.status != StreamStatus::Open {
            return self.status.clone();
        }
        let status = self.parse(out, |parser, sink| {
            parser.finish(&mut |event| sink.take(event))
        });
        if status != StreamStatus::Open {
            return status;
        }
        write_message_event("", self.format, out);
        self.status = StreamStatus::Finished;
        StreamStatus::Finished
    }

    /// The last usage the upstream reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The answer's text, to count when no usage came (empty once usage came).
    pub fn take_completion(&mut self) -> CompletionText {
        std::mem::take(&mut self.completion)
    }

    /// How many non-empty `message` events were written.
    pub fn events_sent(&self) -> u64 {
        self.events_sent
    }

    /// Runs the parser (`feed` or `finish`) with a sink writing into `out` and noting
    /// what is kept, then settles the status. The sink borrows the kept fields in
    /// place: moving them out and back costs more than the usual call does.
    fn parse<P>(&mut self, out: &mut BytesMut, run: P) -> StreamStatus
    where
        P: FnOnce(&mut UpstreamSseParser, &mut EventSink<'_, '_>) -> Result<(), SseError>,
    {
        let mut sink = EventSink {
            writer: self.writer,
            out,
            completion: &mut self.completion,
            text: self.text.as_mut(),
            finish: self.finish.as_deref_mut(),
            events_sent: 0,
            usage: None,
            ending: None,
        };
        let result = run(&mut self.parser, &mut sink);
        let outcome = Outcome {
            writer: sink.writer,
            out: sink.out,
            events_sent: sink.events_sent,
            usage: sink.usage,
            ending: sink.ending,
        };
        let status = self.settle(outcome, result);
        // Once usage came, nothing needs counting.
        if self.usage.is_some() {
            self.completion.clear();
        }
        status
    }

    fn settle(&mut self, sink: Outcome<'_>, result: Result<(), SseError>) -> StreamStatus {
        self.writer = sink.writer;
        self.events_sent += sink.events_sent;
        if sink.usage.is_some() {
            self.usage = sink.usage;
        }
        // The usual outcome of a piece; skips replacing and cloning the status.
        if result.is_ok() && sink.ending.is_none() {
            return StreamStatus::Open;
        }
        self.status = match (result, sink.ending) {
            (Err(error), _) => StreamStatus::Failed(error.to_string()),
            (Ok(()), Some(Ending::Done)) => {
                write_message_event("", self.format, sink.out);
                StreamStatus::Finished
            }
            (Ok(()), Some(Ending::UpstreamError(message))) => {
                StreamStatus::Failed(format!("upstream error: {message}"))
            }
            (Ok(()), None) => StreamStatus::Open,
        };
        self.status.clone()
    }
}

/// What one call's sink leaves for [`StreamTranscoder::settle`].
struct Outcome<'o> {
    writer: DeltaWriter,
    out: &'o mut BytesMut,
    events_sent: u64,
    usage: Option<Usage>,
    ending: Option<Ending>,
}

enum Ending {
    Done,
    UpstreamError(String),
}

/// Collects what the parser reports during one call, writing text events as they come.
struct EventSink<'o, 't> {
    writer: DeltaWriter,
    out: &'o mut BytesMut,
    completion: &'t mut CompletionText,
    text: Option<&'t mut String>,
    finish: Option<&'t mut FinishSeen>,
    events_sent: u64,
    usage: Option<Usage>,
    ending: Option<Ending>,
}

impl EventSink<'_, '_> {
    fn take(&mut self, event: UpstreamEvent<'_>) {
        match event {
            UpstreamEvent::Delta(text) => {
                self.completion.push(&text);
                if let Some(kept) = self.text.as_deref_mut() {
                    kept.push_str(&text);
                }
                if self.writer.write(&text, self.out) {
                    self.events_sent += 1;
                }
            }
            UpstreamEvent::Usage(usage) => self.usage = Some(usage),
            UpstreamEvent::Finish { reason, model } => {
                if let Some(finish) = self.finish.as_deref_mut() {
                    finish.note(&reason, model.as_deref());
                }
            }
            UpstreamEvent::Done => self.ending = Some(Ending::Done),
            UpstreamEvent::Error(message) => self.ending = Some(Ending::UpstreamError(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::sse_in::DEFAULT_MAX_EVENT_BYTES;
    use proptest::prelude::*;

    const EMPTY_EVENT: &str = "event: message\ndata: \n\n";

    fn transcoder() -> StreamTranscoder {
        StreamTranscoder::new(DataFormat::Text, DEFAULT_MAX_EVENT_BYTES)
    }

    fn chunk(text: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}\n\n",
            serde_json::to_string(text).unwrap()
        )
    }

    fn text(out: &BytesMut) -> &str {
        std::str::from_utf8(out).unwrap()
    }

    #[test]
    fn kept_text_is_the_answer_as_sent_split_anywhere() {
        let body = format!(
            "{}{}{}data: [DONE]\n\n",
            chunk("第一"),
            chunk("\n\n"),
            chunk("🌍 end\n")
        );
        for split in 1..body.len() {
            let mut stream = transcoder();
            stream.keep_text();
            let mut out = BytesMut::new();
            let (a, b) = body.as_bytes().split_at(split);
            stream.feed(a, &mut out);
            let mut text = stream.take_text();
            stream.feed(b, &mut out);
            text += &stream.take_text();
            assert_eq!(text, "第一\n\n🌍 end\n", "split at {split}");
        }
        let mut plain = transcoder();
        let mut out = BytesMut::new();
        plain.feed(body.as_bytes(), &mut out);
        assert_eq!(plain.take_text(), "", "text is kept only when asked");
    }

    #[test]
    fn kept_finish_holds_the_model_and_reasons_split_anywhere() {
        let body = format!(
            "{}data: {{\"model\":\"sim-1\",\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"length\"}}]}}\n\ndata: [DONE]\n\n",
            chunk("a"),
        );
        for split in 1..body.len() {
            let mut stream = transcoder();
            stream.keep_finish();
            let mut out = BytesMut::new();
            let (a, b) = body.as_bytes().split_at(split);
            stream.feed(a, &mut out);
            stream.feed(b, &mut out);
            let seen = stream.take_finish().expect("kept");
            assert_eq!(seen.model.as_deref(), Some("sim-1"), "split at {split}");
            assert_eq!(seen.finish_reasons, ["length"], "split at {split}");
        }
        let mut plain = transcoder();
        plain.feed(body.as_bytes(), &mut BytesMut::new());
        assert_eq!(plain.take_finish(), None, "kept only when asked");
    }

    #[test]
    fn frames_a_complete_stream() {
        let mut stream = transcoder();
        let mut out = BytesMut::new();
        stream.start(&mut out);
        let body = format!(
            "{}{}{}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}\n\ndata: [DONE]\n\n",
            chunk("Hello"),
            chunk(","),
            chunk(" Xiao\nZhi")
        );
        assert_eq!(
            stream.feed(body.as_bytes(), &mut out),
            StreamStatus::Finished
        );
        assert_eq!(
            text(&out),
            "event: message\ndata: \n\nevent: message\ndata: Hello\n\nevent: message\ndata: ,\n\n\
             event: message\ndata:  Xiao\ndata: Zhi\n\nevent: message\ndata: \n\n"
        );
        assert_eq!(stream.events_sent(), 3);
        assert_eq!(
            stream.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        // The closing event is written once, whatever follows.
        out.clear();
        assert_eq!(
            stream.feed(chunk("late").as_bytes(), &mut out),
            StreamStatus::Finished
        );
        assert_eq!(stream.finish(&mut out), StreamStatus::Finished);
        assert!(out.is_empty());
    }

    #[test]
    fn json_format_renders_literals() {
        let mut stream = StreamTranscoder::new(DataFormat::Json, DEFAULT_MAX_EVENT_BYTES);
        let mut out = BytesMut::new();
        stream.start(&mut out);
        stream.feed(chunk("a\nb").as_bytes(), &mut out);
        assert_eq!(stream.finish(&mut out), StreamStatus::Finished);
        assert_eq!(
            text(&out),
            "event: message\ndata: \"\"\n\nevent: message\ndata: \"a\\nb\"\n\nevent: message\ndata: \"\"\n\n"
        );
    }

    #[test]
    fn end_of_body_without_done_closes_the_stream() {
        let mut stream = transcoder();
        let mut out = BytesMut::new();
        let body = chunk("a");
        let unterminated = body.trim_end();
        assert_eq!(
            stream.feed(unterminated.as_bytes(), &mut out),
            StreamStatus::Open
        );
        assert!(out.is_empty());
        assert_eq!(stream.finish(&mut out), StreamStatus::Finished);
        assert_eq!(
            text(&out),
            format!("event: message\ndata: a\n\n{EMPTY_EVENT}")
        );
        assert_eq!(stream.finish(&mut out), StreamStatus::Finished);
        assert_eq!(stream.usage(), None);
        // No usage came: the answer is kept for counting.
        assert_eq!(stream.take_completion().tokens(), 1);
    }

    #[test]
    fn upstream_error_fails_after_writing_earlier_events() {
        let mut stream = transcoder();
        let mut out = BytesMut::new();
        let body = format!(
            "{}data: {{\"error\":{{\"message\":\"Rate limit reached\"}}}}\n\n{}",
            chunk("partial"),
            chunk("never")
        );
        let failed = StreamStatus::Failed("upstream error: Rate limit reached".to_owned());
        assert_eq!(stream.feed(body.as_bytes(), &mut out), failed);
        assert_eq!(text(&out), "event: message\ndata: partial\n\n");
        assert_eq!(stream.events_sent(), 1);
        out.clear();
        assert_eq!(stream.feed(b"data: [DONE]\n\n", &mut out), failed);
        assert_eq!(stream.finish(&mut out), failed);
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_chunk_fails_without_closing_event() {
        let mut stream = transcoder();
        let mut out = BytesMut::new();
        let body = format!("{}data: {{\"choices\":[{{\n\n", chunk("a"));
        let failed = StreamStatus::Failed("upstream sent a malformed stream chunk".to_owned());
        assert_eq!(stream.feed(body.as_bytes(), &mut out), failed);
        assert_eq!(text(&out), "event: message\ndata: a\n\n");
        // A malformed trailing event found at end of body fails too.
        let mut stream = transcoder();
        out.clear();
        assert_eq!(stream.feed(b"data: {", &mut out), StreamStatus::Open);
        assert_eq!(stream.finish(&mut out), failed);
        assert!(out.is_empty());
    }

    #[test]
    fn oversized_event_fails() {
        let mut stream = StreamTranscoder::new(DataFormat::Text, 32);
        let mut out = BytesMut::new();
        assert_eq!(
            stream.feed(chunk("a").as_bytes(), &mut out),
            StreamStatus::Failed("upstream sent a stream event larger than 32 bytes".to_owned())
        );
        assert!(out.is_empty());
    }

    /// A realistic upstream body for `tokens`, with per-event line endings and comments.
    fn render_upstream(tokens: &[String], endings: &[u8], comments: &[bool]) -> Vec<u8> {
        let mut payloads = vec![
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#.to_owned(),
        ];
        for token in tokens {
            payloads.push(format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_1","choices":[{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#,
                serde_json::to_string(token).unwrap()
            ));
        }
        payloads.push(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#.to_owned());
        payloads.push(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":17,"completion_tokens":5,"total_tokens":22}}"#.to_owned());
        payloads.push("[DONE]".to_owned());

        let mut body = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let ending: &[u8] = match endings.get(i).copied().unwrap_or(0) % 3 {
                0 => b"\n",
                1 => b"\r\n",
                _ => b"\r",
            };
            if comments.get(i).copied().unwrap_or(false) {
                body.extend_from_slice(b": keep-alive");
                body.extend_from_slice(ending);
                body.extend_from_slice(ending);
            }
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(payload.as_bytes());
            body.extend_from_slice(ending);
            body.extend_from_slice(ending);
        }
        body
    }

    fn transcode(
        format: DataFormat,
        pieces: &[&[u8]],
    ) -> (Vec<u8>, StreamStatus, StreamTranscoder) {
        let mut stream = StreamTranscoder::new(format, DEFAULT_MAX_EVENT_BYTES);
        let mut out = BytesMut::new();
        stream.start(&mut out);
        let mut status = StreamStatus::Open;
        for piece in pieces {
            status = stream.feed(piece, &mut out);
        }
        if status == StreamStatus::Open {
            status = stream.finish(&mut out);
        }
        (out.to_vec(), status, stream)
    }

    /// Decodes a downstream body as an SSE client would: the `data` of each `message` event.
    fn decode_message_events(body: &[u8], format: DataFormat) -> Vec<String> {
        let body = std::str::from_utf8(body).unwrap();
        let mut events = Vec::new();
        for frame in body.split_terminator("\n\n") {
            let mut lines = frame.split('\n');
            assert_eq!(lines.next(), Some("event: message"));
            let data: Vec<&str> = lines
                .map(|line| line.strip_prefix("data: ").unwrap())
                .collect();
            let data = data.join("\n");
            events.push(match format {
                DataFormat::Text => data,
                DataFormat::Json => serde_json::from_str(&data).unwrap(),
            });
        }
        events
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("你好".to_owned()),
            Just("😀".to_owned()),
            Just("\n".to_owned()),
            Just("\r\n".to_owned()),
            Just(String::new()),
            Just(" Xiao".to_owned()),
            Just("\"q\" \\ \u{1}".to_owned()),
            "[a-z \n\r你é😀]{0,6}",
        ]
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_output(
            tokens in prop::collection::vec(token(), 0..12),
            endings in prop::collection::vec(any::<u8>(), 16),
            comments in prop::collection::vec(any::<bool>(), 16),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
            json in any::<bool>(),
        ) {
            let format = if json { DataFormat::Json } else { DataFormat::Text };
            let upstream = render_upstream(&tokens, &endings, &comments);
            let (whole, status, stream) = transcode(format, &[&upstream]);
            prop_assert_eq!(status, StreamStatus::Finished);
            prop_assert_eq!(stream.usage(), Some(Usage { prompt_tokens: 17, completion_tokens: 5 }));

            let events = decode_message_events(&whole, format);
            prop_assert!(events.len() >= 2);
            prop_assert_eq!(stream.events_sent(), events.len() as u64 - 2);
            prop_assert_eq!(events.first().map(String::as_str), Some(""));
            prop_assert_eq!(events.last().map(String::as_str), Some(""));
            // Only the first and the last event are empty: a client can tell the end.
            prop_assert!(events[1..events.len() - 1].iter().all(|e| !e.is_empty()));
            // A client reassembles multi-line data with \n, whatever the original break was,
            // also when a \r\n is split across two tokens.
            let expected = match format {
                DataFormat::Text => normalize_breaks(&tokens.concat()),
                DataFormat::Json => tokens.concat(),
            };
            prop_assert_eq!(events.concat(), expected);

            let mut points: Vec<usize> = cuts.iter().map(|cut| cut.index(upstream.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut start = 0;
            for point in points {
                pieces.push(&upstream[start..point]);
                start = point;
            }
            pieces.push(&upstream[start..]);
            let (split, split_status, _) = transcode(format, &pieces);
            prop_assert_eq!(&split, &whole);
            prop_assert_eq!(split_status, StreamStatus::Finished);

            let bytes: Vec<&[u8]> = upstream.chunks(1).collect();
            let (byte_by_byte, _, _) = transcode(format, &bytes);
            prop_assert_eq!(&byte_by_byte, &whole);
        }
    }

    /// Every line break (`\r\n`, `\n`, `\r`) as `\n`, as an SSE client reassembles data lines.
    fn normalize_breaks(text: &str) -> String {
        text.replace("\r\n", "\n").replace('\r', "\n")
    }

    /// A client per the WHATWG HTML specification's "Interpreting an event stream": lines
    /// end at CRLF, LF or CR; a `data` field appends its value and a LF; a blank line
    /// dispatches the data minus its last LF (nothing when the data buffer is empty); the
    /// type is `event` or `message`. Returns (type, data) per dispatched event.
    fn whatwg_client(body: &[u8]) -> Vec<(String, String)> {
        let text = std::str::from_utf8(body).expect("UTF-8 stream");
        let mut rest = text.strip_prefix('\u{feff}').unwrap_or(text);
        let (mut events, mut data, mut kind) = (Vec::new(), String::new(), String::new());
        while let Some(end) = rest.find(['\r', '\n']) {
            let line = &rest[..end];
            let skip = if rest[end..].starts_with("\r\n") {
                2
            } else {
                1
            };
            rest = &rest[end + skip..];
            if line.is_empty() {
                if !data.is_empty() {
                    data.pop();
                    let kind = if kind.is_empty() {
                        "message".to_owned()
                    } else {
                        kind.clone()
                    };
                    events.push((kind, std::mem::take(&mut data)));
                }
                kind.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "event" => kind = value.to_owned(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                _ => {}
            }
        }
        // An unterminated last event is discarded, as the specification says.
        events
    }

    /// Cuts `content` at character boundaries picked by `cuts` (sorted, duplicates allowed).
    fn split_at_chars(content: &str, cuts: &[prop::sample::Index]) -> Vec<String> {
        let boundaries: Vec<usize> = content
            .char_indices()
            .map(|(i, _)| i)
            .chain([content.len()])
            .collect();
        let mut points: Vec<usize> = cuts.iter().map(|c| *c.get(&boundaries)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for point in points {
            pieces.push(content[start..point].to_owned());
            start = point;
        }
        pieces.push(content[start..].to_owned());
        pieces
    }

    #[test]
    fn a_crlf_split_across_deltas_is_one_line_break() {
        for (pieces, joined) in [
            (&["abc\r", "\nd"][..], "abc\nd"),
            (&["abc\r", "\n", "d"][..], "abc\nd"),
            (&["\r", "\n"][..], "\n"),
            (&["a\r", "\r", "\nb"][..], "a\n\nb"),
            (&["a\r", "b\n"][..], "a\nb\n"),
            (&["a\r", "", "\nb"][..], "a\nb"),
        ] {
            let tokens: Vec<String> = pieces.iter().map(|p| (*p).to_owned()).collect();
            let upstream = render_upstream(&tokens, &[], &[]);
            let (body, status, _) = transcode(DataFormat::Text, &[&upstream]);
            assert_eq!(status, StreamStatus::Finished);
            let events = whatwg_client(&body);
            let data: String = events.iter().map(|(_, d)| d.as_str()).collect();
            assert_eq!(data, joined, "{pieces:?}");
        }
    }

    proptest! {
        /// Any content cut into any deltas, and the upstream body cut into any reads, reaches a
        /// conforming SSE client as the content itself: line breaks as `\n` in `text` format,
        /// byte for byte in `json` format.
        #[test]
        fn a_conforming_client_joins_any_split_content_back(
            content in "[ab\r\n你😀]{0,24}",
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            reads in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            json in any::<bool>(),
        ) {
            let format = if json { DataFormat::Json } else { DataFormat::Text };
            let tokens = split_at_chars(&content, &cuts);
            let upstream = render_upstream(&tokens, &[], &[]);
            let mut points: Vec<usize> = reads.iter().map(|r| r.index(upstream.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut start = 0;
            for point in points {
                pieces.push(&upstream[start..point]);
                start = point;
            }
            pieces.push(&upstream[start..]);
            let (body, status, _) = transcode(format, &pieces);
            prop_assert_eq!(status, StreamStatus::Finished);

            let events = whatwg_client(&body);
            prop_assert!(events.iter().all(|(kind, _)| kind == "message"));
            prop_assert!(events.len() >= 2);
            let data: Vec<String> = events
                .into_iter()
                .map(|(_, data)| match format {
                    DataFormat::Text => data,
                    DataFormat::Json => serde_json::from_str(&data).expect("a JSON string"),
                })
                .collect();
            prop_assert_eq!(data.first().map(String::as_str), Some(""));
            prop_assert_eq!(data.last().map(String::as_str), Some(""));
            prop_assert!(data[1..data.len() - 1].iter().all(|d| !d.is_empty()));
            let expected = match format {
                DataFormat::Text => normalize_breaks(&content),
                DataFormat::Json => content.clone(),
            };
            prop_assert_eq!(data.concat(), expected);
        }
    }
}
