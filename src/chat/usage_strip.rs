//! Sans-IO filter for a passed-through OpenAI SSE stream: removes the usage-only chunk
//! (`"choices": []` with `usage`, sent when `stream_options.include_usage` is asked) for
//! a client that did not ask for it. Every other byte goes out as it came, in order; an
//! event is held only until its closing blank line has arrived.

use bytes::BytesMut;
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Events larger than this are passed on without being looked at (a usage chunk is small).
const MAX_HELD_EVENT_BYTES: usize = 64 << 10;

/// Splits a stream into SSE events and drops the usage-only ones.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    /// The start of the current event, not complete yet.
    held: Vec<u8>,
    /// Where scanning for line ends resumes in `held`.
    scanned: usize,
    /// The start of the current line in `held`.
    line_start: usize,
    /// Bytes of the current line have already been passed on (a large event).
    line_started: bool,
    /// The current event is too large to be a usage chunk: its bytes go out at once.
    passing: bool,
    /// Usage-only events removed so far.
    removed: u32,
}

impl UsageChunkFilter {
    /// A filter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many usage-only events were removed.
    pub fn removed(&self) -> u32 {
        self.removed
    }

    /// Takes the next piece of the upstream body and writes what the client gets to `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut BytesMut) {
        self.held.extend_from_slice(piece);
        let mut event_start = 0;
        let mut at = self.scanned;
        self.scanned = loop {
            let Some(found) = memchr::memchr2(b'\n', b'\r', &self.held[at..]) else {
                break self.held.len();
            };
            let end = at + found;
            let next = match (self.held[end], self.held.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                // `\r` at the very end: a `\n` may follow in the next piece.
                (b'\r', None) => break end,
                _ => end + 1,
            };
            let blank = end == self.line_start && !self.line_started;
            self.line_start = next;
            self.line_started = false;
            at = next;
            if blank {
                self.complete(event_start, next, out);
                event_start = next;
            }
        };
        if !self.passing && self.held.len() - event_start > MAX_HELD_EVENT_BYTES {
            self.passing = true;
        }
        if self.passing {
            // Everything scanned goes out; only a trailing `\r` stays to be paired.
            out.extend_from_slice(&self.held[event_start..self.scanned]);
            if self.line_start < self.scanned {
                self.line_started = true;
                self.line_start = self.scanned;
            }
            event_start = self.scanned;
        }
        self.held.drain(..event_start);
        self.scanned -= event_start;
        self.line_start -= event_start;
    }

    /// Ends the stream: a last event without its blank line is judged as it is.
    pub fn finish(&mut self, out: &mut BytesMut) {
        let len = self.held.len();
        if len > 0 {
            self.complete(0, len, out);
        }
        self.held.clear();
        self.scanned = 0;
        self.line_start = 0;
        self.line_started = false;
    }

    fn complete(&mut self, start: usize, end: usize, out: &mut BytesMut) {
        let event = &self.held[start..end];
        if std::mem::take(&mut self.passing) {
            out.extend_from_slice(event);
        } else if is_usage_only(event) {
            self.removed += 1;
        } else {
            out.extend_from_slice(event);
        }
    }
}

/// Whether an SSE event's data is a chunk with usage and no choices.
fn is_usage_only(event: &[u8]) -> bool {
    let mut payload = Vec::new();
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(value) = line.strip_prefix(b"data:") {
            if !payload.is_empty() {
                payload.push(b'\n');
            }
            payload.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
        }
    }
    // Most chunks have no usage, or `"usage":null` (OpenAI, once usage is asked for).
    let Some(at) = memchr::memmem::find(&payload, b"\"usage\"") else {
        return false;
    };
    let after = payload[at + 7..].trim_ascii_start();
    let value = after.strip_prefix(b":").unwrap_or(after).trim_ascii_start();
    if value.starts_with(b"null") {
        return false;
    }
    #[derive(Deserialize)]
    struct Chunk {
        choices: Option<Vec<IgnoredAny>>,
        usage: Option<IgnoredAny>,
    }
    match serde_json::from_slice::<Chunk>(&payload) {
        Ok(chunk) => chunk.usage.is_some() && chunk.choices.is_none_or(|c| c.is_empty()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROLE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}],\"usage\":null}\n\n";
    const TEXT: &str =
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn filter(pieces: &[&[u8]]) -> (Vec<u8>, u32) {
        let mut f = UsageChunkFilter::new();
        let mut out = BytesMut::new();
        for piece in pieces {
            f.feed(piece, &mut out);
        }
        f.finish(&mut out);
        (out.to_vec(), f.removed())
    }

    #[test]
    fn removes_only_the_usage_chunk() {
        let body = [": keep-alive\n\n", ROLE, TEXT, USAGE, DONE].concat();
        let (out, removed) = filter(&[body.as_bytes()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            [": keep-alive\n\n", ROLE, TEXT, DONE].concat()
        );
        assert_eq!(removed, 1);
    }

    #[test]
    fn keeps_chunks_that_carry_choices_and_usage() {
        let both =
            "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let body = [both, DONE].concat();
        assert_eq!(filter(&[body.as_bytes()]), (body.into_bytes(), 0));
    }

    #[test]
    fn whole_events_go_out_as_soon_as_they_are_complete() {
        let mut f = UsageChunkFilter::new();
        let mut out = BytesMut::new();
        f.feed(&TEXT.as_bytes()[..10], &mut out);
        assert!(out.is_empty());
        f.feed(&TEXT.as_bytes()[10..], &mut out);
        assert_eq!(&out[..], TEXT.as_bytes());
        out.clear();
        f.feed(b"data: {\"choices\":[],\"usage\":{}}\r\n\r", &mut out);
        assert!(out.is_empty());
        f.feed(b"\n", &mut out);
        assert!(out.is_empty());
        assert_eq!(f.removed(), 1);
    }

    #[test]
    fn large_events_pass_without_being_held() {
        let mut f = UsageChunkFilter::new();
        let mut out = BytesMut::new();
        let big = format!("data: {}", "x".repeat(MAX_HELD_EVENT_BYTES + 1));
        f.feed(big.as_bytes(), &mut out);
        assert_eq!(out.len(), big.len());
        f.feed(b"y\n\n", &mut out);
        f.feed(USAGE.as_bytes(), &mut out);
        f.finish(&mut out);
        assert_eq!(out.len(), big.len() + 3);
    }

    #[test]
    fn an_unterminated_last_usage_chunk_is_removed_too() {
        let body = [TEXT, USAGE.trim_end()].concat();
        assert_eq!(filter(&[body.as_bytes()]), (TEXT.as_bytes().to_vec(), 1));
    }

    proptest! {
        #[test]
        fn any_split_and_line_ending_gives_the_stream_without_the_usage_chunk(
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
            ending in 0..3usize,
        ) {
            let eol = ["\n", "\r\n", "\r"][ending];
            let events = [ROLE, TEXT, TEXT, USAGE, DONE].map(|e| e.replace('\n', eol));
            let body = events.concat();
            let want = [&events[0], &events[1], &events[2], &events[4]].map(|e| e.as_str()).concat();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut start = 0;
            for point in points {
                pieces.push(&body.as_bytes()[start..point]);
                start = point;
            }
            pieces.push(&body.as_bytes()[start..]);
            let (out, removed) = filter(&pieces);
            prop_assert_eq!(String::from_utf8(out).unwrap(), want);
            prop_assert_eq!(removed, 1);
        }
    }
}
