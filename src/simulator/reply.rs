//! The simulator's reply text and how it is cut into content chunks.
//! Everything here is deterministic, so tests can predict every byte the gateway receives.

use std::ops::Range;

/// Longest generated reply; keeps a `lorem:<n>` knob from exhausting memory.
pub const MAX_REPLY_CHARS: usize = 16 * 1024 * 1024;

/// Base text that `lorem:<n>` repeats until it has `n` characters.
const LOREM: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud \
exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. ";

/// The `newlines` reply, already split into tokens: it has bare `"\n"` and `"\n\n"` tokens
/// and tokens with a line break at their start or end.
pub const NEWLINES_TOKENS: [&str; 14] = [
    "First",
    " paragraph",
    ".",
    "\n\n",
    "Second",
    " paragraph,",
    "\n",
    "line two.",
    "\n",
    "\n",
    "Third",
    " paragraph.\n",
    "\nLast",
    " line.",
];

/// The `multibyte` reply: CJK, full-width punctuation, emoji with modifiers, accents.
pub const MULTIBYTE_TEXT: &str =
    "你好，世界！🌍 这是一个多字节测试。Emoji: 😀👍🏽🎉 café naïve Ωmega — 終わり。";

/// Which text the simulator answers with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReplySpec {
    /// The last user message, minus a `#sim` directive line.
    #[default]
    Echo,
    /// Exactly this many characters of lorem ipsum.
    Lorem(usize),
    /// Paragraphs whose tokens include bare line breaks ([`NEWLINES_TOKENS`]).
    Newlines,
    /// Chinese and emoji text ([`MULTIBYTE_TEXT`]).
    Multibyte,
    /// This literal text.
    Text(String),
}

/// A `reply` knob value that is none of the known forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {}", ReplySpec::EXPECTED)]
pub struct BadReplySpec;

impl ReplySpec {
    /// What the `reply` knob accepts, for error messages.
    pub const EXPECTED: &'static str =
        "echo, lorem:<n>, newlines, multibyte or text:<literal> (\\n \\r \\t \\\\ escapes)";
}

impl std::str::FromStr for ReplySpec {
    type Err = BadReplySpec;

    /// Parses `echo`, `lorem:<n>`, `newlines`, `multibyte` or `text:<literal>`; the literal
    /// understands `\n`, `\r`, `\t` and `\\` so line breaks fit in a header or one line.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Some(literal) = value.strip_prefix("text:") {
            return Ok(ReplySpec::Text(unescape(literal)));
        }
        if let Some(count) = value.trim().strip_prefix("lorem:") {
            return match count.parse::<usize>() {
                Ok(n) if n <= MAX_REPLY_CHARS => Ok(ReplySpec::Lorem(n)),
                _ => Err(BadReplySpec),
            };
        }
        match value.trim() {
            "echo" => Ok(ReplySpec::Echo),
            "newlines" => Ok(ReplySpec::Newlines),
            "multibyte" => Ok(ReplySpec::Multibyte),
            _ => Err(BadReplySpec),
        }
    }
}

/// How to cut the reply: by characters, or into an exact number of pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// At most this many characters per chunk (at least 1).
    Size(usize),
    /// Exactly this many chunks.
    Count(usize),
}

/// A reply text and the byte ranges of its content chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The whole answer.
    pub text: String,
    /// Byte ranges of `text`, each on character boundaries; together they cover `text`.
    pub pieces: Vec<Range<usize>>,
}

impl Reply {
    /// Builds the reply for `spec`; `echo` is the text an `Echo` reply repeats.
    ///
    /// `Chunking::Count` always wins; otherwise the `newlines` reply keeps its own tokens
    /// and every other reply is cut by character count.
    pub fn build(spec: &ReplySpec, echo: &str, chunking: Chunking) -> Reply {
        let text = match spec {
            ReplySpec::Echo => echo.to_string(),
            ReplySpec::Lorem(n) => lorem(*n),
            ReplySpec::Newlines => NEWLINES_TOKENS.concat(),
            ReplySpec::Multibyte => MULTIBYTE_TEXT.to_string(),
            ReplySpec::Text(literal) => literal.clone(),
        };
        let pieces = match (spec, chunking) {
            (_, Chunking::Count(n)) => split_even(&text, n),
            (ReplySpec::Newlines, Chunking::Size(_)) => token_ranges(&NEWLINES_TOKENS),
            (_, Chunking::Size(size)) => split_by_chars(&text, size),
        };
        Reply { text, pieces }
    }

    /// The content chunks as text.
    pub fn chunks(&self) -> impl Iterator<Item = &str> + '_ {
        self.pieces.iter().map(|range| &self.text[range.clone()])
    }
}

/// Exactly `n` characters of lorem ipsum.
pub fn lorem(n: usize) -> String {
    // LOREM is ASCII, so characters and bytes coincide.
    LOREM.chars().cycle().take(n.min(MAX_REPLY_CHARS)).collect()
}

/// Cuts `text` into pieces of `size` characters (the last one may be shorter).
/// An empty text has no pieces.
pub fn split_by_chars(text: &str, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    let mut pieces = Vec::with_capacity(text.len() / size + 1);
    let mut start = 0;
    let mut count = 0;
    for (index, _) in text.char_indices() {
        if count == size {
            pieces.push(start..index);
            start = index;
            count = 0;
        }
        count += 1;
    }
    if start < text.len() {
        pieces.push(start..text.len());
    }
    pieces
}

/// Cuts `text` into exactly `n` pieces whose character counts differ by at most one,
/// longer pieces first. When `n` exceeds the character count the last pieces are empty;
/// an empty text (or `n == 0`) has no pieces.
pub fn split_even(text: &str, n: usize) -> Vec<Range<usize>> {
    if text.is_empty() || n == 0 {
        return Vec::new();
    }
    let total = text.chars().count();
    let (base, extra) = (total / n, total % n);
    // Byte offsets after the 1st, 2nd, ... character.
    let mut char_ends = text
        .char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .chain([text.len()]);
    let mut pieces = Vec::with_capacity(n);
    let mut start = 0;
    for piece in 0..n {
        let len = base + usize::from(piece < extra);
        let end = match len {
            0 => start,
            len => char_ends.nth(len - 1).unwrap_or(text.len()),
        };
        pieces.push(start..end);
        start = end;
    }
    pieces
}

fn token_ranges(tokens: &[&str]) -> Vec<Range<usize>> {
    let mut start = 0;
    tokens
        .iter()
        .map(|token| {
            let range = start..start + token.len();
            start = range.end;
            range
        })
        .collect()
}

fn unescape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    let mut chars = literal.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str, pieces: &[Range<usize>]) -> Vec<String> {
        pieces.iter().map(|r| text[r.clone()].to_string()).collect()
    }

    #[test]
    fn spec_parses_every_form() {
        assert_eq!("echo".parse(), Ok(ReplySpec::Echo));
        assert_eq!("lorem:25".parse(), Ok(ReplySpec::Lorem(25)));
        assert_eq!("newlines".parse(), Ok(ReplySpec::Newlines));
        assert_eq!("multibyte".parse(), Ok(ReplySpec::Multibyte));
        assert_eq!(
            "text:a b\\nc\\\\n\\q".parse(),
            Ok(ReplySpec::Text("a b\nc\\n\\q".to_string()))
        );
        assert_eq!("lorem:x".parse::<ReplySpec>(), Err(BadReplySpec));
        assert_eq!(
            format!("lorem:{}", MAX_REPLY_CHARS + 1).parse::<ReplySpec>(),
            Err(BadReplySpec)
        );
        assert_eq!("poem".parse::<ReplySpec>(), Err(BadReplySpec));
    }

    #[test]
    fn lorem_has_exactly_n_chars_and_wraps() {
        assert_eq!(lorem(0), "");
        assert_eq!(lorem(11), "Lorem ipsum");
        let long = lorem(LOREM.len() + 5);
        assert_eq!(long.chars().count(), LOREM.len() + 5);
        assert!(long.ends_with("Lorem"));
    }

    #[test]
    fn split_by_chars_never_cuts_a_character() {
        let text = "añ你🌍b";
        assert_eq!(texts(text, &split_by_chars(text, 2)), ["añ", "你🌍", "b"]);
        assert_eq!(
            texts(text, &split_by_chars(text, 1)),
            ["a", "ñ", "你", "🌍", "b"]
        );
        assert_eq!(texts(text, &split_by_chars(text, 10)), ["añ你🌍b"]);
        assert!(split_by_chars("", 4).is_empty());
    }

    #[test]
    fn split_even_gives_exactly_n_balanced_pieces() {
        assert_eq!(
            texts("abcdefg", &split_even("abcdefg", 3)),
            ["abc", "de", "fg"]
        );
        assert_eq!(
            texts("你好世界", &split_even("你好世界", 2)),
            ["你好", "世界"]
        );
        assert_eq!(texts("🌍é", &split_even("🌍é", 4)), ["🌍", "é", "", ""]);
        assert_eq!(texts("abc", &split_even("abc", 1)), ["abc"]);
        assert!(split_even("", 3).is_empty());
        assert!(split_even("abc", 0).is_empty());
    }

    #[test]
    fn split_even_covers_multibyte_text_for_every_count() {
        for n in 1..=MULTIBYTE_TEXT.chars().count() + 2 {
            let pieces = split_even(MULTIBYTE_TEXT, n);
            assert_eq!(pieces.len(), n);
            assert_eq!(texts(MULTIBYTE_TEXT, &pieces).concat(), MULTIBYTE_TEXT);
        }
    }

    #[test]
    fn echo_reply_is_cut_by_size() {
        let reply = Reply::build(&ReplySpec::Echo, "Hello, world", Chunking::Size(5));
        assert_eq!(reply.text, "Hello, world");
        assert_eq!(reply.chunks().collect::<Vec<_>>(), ["Hello", ", wor", "ld"]);
    }

    #[test]
    fn newlines_reply_keeps_its_tokens_unless_a_count_is_given() {
        let reply = Reply::build(&ReplySpec::Newlines, "ignored", Chunking::Size(4));
        let chunks: Vec<_> = reply.chunks().collect();
        assert_eq!(chunks, NEWLINES_TOKENS);
        assert!(chunks.contains(&"\n") && chunks.contains(&"\n\n"));
        assert_eq!(
            reply.text,
            "First paragraph.\n\nSecond paragraph,\nline two.\n\nThird paragraph.\n\nLast line."
        );
        let counted = Reply::build(&ReplySpec::Newlines, "", Chunking::Count(2));
        assert_eq!(counted.pieces.len(), 2);
    }

    #[test]
    fn multibyte_and_text_replies() {
        let reply = Reply::build(&ReplySpec::Multibyte, "", Chunking::Size(3));
        assert_eq!(reply.chunks().next(), Some("你好，"));
        assert_eq!(reply.chunks().collect::<String>(), MULTIBYTE_TEXT);
        let text = Reply::build(&ReplySpec::Text("a\nb".into()), "x", Chunking::Count(3));
        assert_eq!(text.chunks().collect::<Vec<_>>(), ["a", "\n", "b"]);
        let lorem = Reply::build(&ReplySpec::Lorem(10), "", Chunking::Size(4));
        assert_eq!(lorem.chunks().collect::<Vec<_>>(), ["Lore", "m ip", "su"]);
    }
}
