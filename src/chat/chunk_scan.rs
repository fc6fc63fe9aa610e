//! The JSON scanner for upstream `chat.completion.chunk` payloads: one pass over the
//! bytes that validates the whole payload and reads only the fields the gateway uses
//! (`choices[0].delta.content`, `usage`, `error`), classifying string bytes a block at a time.

use std::borrow::Cow;

use super::reply::Usage;

/// The fields of a `chat.completion.chunk` the gateway uses.
#[derive(Default)]
pub(super) struct ChunkFields<'a> {
    /// `choices[0].delta.content`, not yet decoded.
    pub(super) content: Option<JsonStr<'a>>,
    pub(super) usage: Option<Usage>,
    /// A non-null top-level `error` member is present.
    pub(super) has_error: bool,
}

/// The payload is not valid JSON, or a used field has the wrong type.
pub(super) struct Malformed;

pub(super) type Scan<T> = Result<T, Malformed>;

/// How many payload bytes the string scanner classifies at a time.
const BLOCK: usize = 64;

/// Classifies one block: bit `i` of the first value is set where byte `i` ends a run of
/// plain characters inside a JSON string (a `"`, a `\` or a control character, which JSON
/// forbids there); the second tells whether the block holds a byte above 0x7F.
#[cfg(target_arch = "x86_64")]
fn block_stops(block: &[u8; BLOCK]) -> (u64, bool) {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut stops = 0;
    let mut high = 0;
    for (i, sixteen) in block.chunks_exact(16).enumerate() {
        // SAFETY: every x86_64 CPU has SSE2, and the unaligned load reads exactly the 16
        // bytes of `sixteen`.
        let (stop_mask, high_mask) = unsafe {
            let bytes = _mm_loadu_si128(sixteen.as_ptr().cast());
            let quote = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'\\' as i8));
            // Unsigned min(byte, 0x1F) == byte exactly when byte < 0x20.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(bytes, _mm_set1_epi8(0x1F)), bytes);
            let any = _mm_or_si128(_mm_or_si128(quote, backslash), control);
            // Each mask has one bit per byte, from the byte's top bit.
            (_mm_movemask_epi8(any), _mm_movemask_epi8(bytes))
        };
        stops |= u64::from(stop_mask as u16) << (16 * i);
        high |= high_mask;
    }
    (stops, high != 0)
}

/// Classifies one block (see the x86_64 version) eight bytes at a time with plain word
/// arithmetic.
#[cfg(not(target_arch = "x86_64"))]
fn block_stops(block: &[u8; BLOCK]) -> (u64, bool) {
    let mut stops = 0;
    let mut loaded = 0;
    for (i, eight) in block.chunks_exact(8).enumerate() {
        let mut word = [0; 8];
        word.copy_from_slice(eight);
        let word = u64::from_le_bytes(word);
        loaded |= word;
        stops |= word_stop_bits(word) << (8 * i);
    }
    (stops, loaded & 0x8080_8080_8080_8080 != 0)
}

/// The stop bits of eight bytes (little-endian: byte 0 is the lowest). Each byte is tested
/// on its own, with no carry between bytes, so every bit is exact.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn word_stop_bits(word: u64) -> u64 {
    const LOW_BITS: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    // A byte's top bit ends up set iff the byte is not zero (resp. not below 0x20).
    let not_quote = ((quote & LOW_BITS) + LOW_BITS) | quote;
    let not_backslash = ((backslash & LOW_BITS) + LOW_BITS) | backslash;
    let not_control = ((word & LOW_BITS) + ONES * 0x60) | word;
    let stops = !(not_quote & not_backslash & not_control) & (ONES << 7);
    // The multiplier's partial products land on distinct bits, gathering byte i's top
    // bit into bit 56 + i without carries.
    (stops >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

/// Deepest nesting accepted in a chunk, as in serde_json.
const MAX_DEPTH: usize = 128;

/// Reads the used fields of one chunk in a single pass, validating the JSON syntax of the
/// whole payload but building nothing for the (many) members it skips. This runs once per
/// streamed token, and a general JSON deserializer was the largest cost of the stream.
pub(super) fn scan_chunk(payload: &[u8]) -> Scan<ChunkFields<'_>> {
    let mut scanner = Scanner::new(payload);
    scanner.skip_ws();
    if scanner.peek() != Some(b'{') {
        return Err(Malformed);
    }
    let mut fields = ChunkFields::default();
    let mut seen = [false; 3];
    scanner.object(|scanner, key| {
        let slot = match &*key.name()? {
            b"choices" => 0,
            b"usage" => 1,
            b"error" => 2,
            _ => return scanner.skip_value(),
        };
        // serde refuses a repeated field too; which copy would win is anyone's guess.
        if std::mem::replace(&mut seen[slot], true) {
            return Err(Malformed);
        }
        match slot {
            0 => fields.content = scanner.choices()?,
            1 => fields.usage = scanner.usage()?,
            _ => fields.has_error = !scanner.null()?,
        }
        Ok(())
    })?;
    scanner.skip_ws();
    if scanner.pos != scanner.bytes.len() {
        return Err(Malformed);
    }
    // The grammar admits bytes above 0x7F only inside strings, and every string byte
    // was classified, so all-ASCII blocks (most chunks) need no UTF-8 check.
    if scanner.non_ascii && std::str::from_utf8(payload).is_err() {
        return Err(Malformed);
    }
    Ok(fields)
}

/// A JSON string literal found in the payload.
pub(super) struct JsonStr<'a> {
    /// The literal between its quotes, escapes not decoded. Its UTF-8 is checked with
    /// the whole payload's, at the end of [`scan_chunk`].
    inner: &'a [u8],
    /// Whether it contains a backslash escape.
    escaped: bool,
}

impl<'a> JsonStr<'a> {
    /// The decoded text: borrowed from the payload when it has no escape, else decoded
    /// into `scratch` (one buffer per stream, so a delta with escapes allocates nothing).
    pub(super) fn decode_into<'s>(&self, scratch: &'s mut String) -> Scan<&'s str>
    where
        'a: 's,
    {
        let inner = std::str::from_utf8(self.inner).map_err(|_| Malformed)?;
        if !self.escaped {
            return Ok(inner);
        }
        scratch.clear();
        unescape_into(inner, scratch)?;
        Ok(scratch)
    }

    /// The decoded bytes, for object keys; comparing bytes needs no UTF-8 check. Inlined,
    /// as it runs once per key, while escaped keys are too rare to inline for.
    #[inline(always)]
    fn name(&self) -> Scan<Cow<'a, [u8]>> {
        if self.escaped {
            return self.unescaped_name();
        }
        Ok(Cow::Borrowed(self.inner))
    }

    #[cold]
    fn unescaped_name(&self) -> Scan<Cow<'a, [u8]>> {
        let mut name = String::new();
        self.decode_into(&mut name)?;
        Ok(Cow::Owned(name.into_bytes()))
    }
}

/// Appends the decoded `inner` of a string literal to `text`, by serde_json's rules
/// (which the differential test holds it to): a `\u` escape of a UTF-16 surrogate must be
/// half of a pair. The scanner has already checked each escape's shape.
fn unescape_into(inner: &str, text: &mut String) -> Scan<()> {
    text.reserve(inner.len());
    let mut rest = inner;
    while let Some(at) = memchr::memchr(b'\\', rest.as_bytes()) {
        text.push_str(&rest[..at]);
        let escape = &rest.as_bytes()[at + 1..];
        let (decoded, used) = match escape.first().ok_or(Malformed)? {
            b'"' => ('"', 1),
            b'\\' => ('\\', 1),
            b'/' => ('/', 1),
            b'b' => ('\u{8}', 1),
            b'f' => ('\u{c}', 1),
            b'n' => ('\n', 1),
            b'r' => ('\r', 1),
            b't' => ('\t', 1),
            b'u' => unicode_escape(escape)?,
            _ => return Err(Malformed),
        };
        text.push(decoded);
        rest = &rest[at + 1 + used..];
    }
    text.push_str(rest);
    Ok(())
}

/// The character of the `u` escape at the start of `escape` (just after its backslash),
/// with the number of bytes it took: 5, or 11 for a surrogate pair.
fn unicode_escape(escape: &[u8]) -> Scan<(char, usize)> {
    let unit = hex_unit(escape.get(1..5))?;
    match unit {
        0xD800..=0xDBFF => {
            let low = match escape.get(5..7) {
                Some(b"\\u") => hex_unit(escape.get(7..11))?,
                _ => return Err(Malformed),
            };
            if !(0xDC00..=0xDFFF).contains(&low) {
                return Err(Malformed);
            }
            let scalar = 0x1_0000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
            Ok((char::from_u32(scalar).ok_or(Malformed)?, 11))
        }
        _ => Ok((char::from_u32(unit).ok_or(Malformed)?, 5)),
    }
}

/// The value of four hex digits.
fn hex_unit(digits: Option<&[u8]>) -> Scan<u32> {
    digits
        .ok_or(Malformed)?
        .iter()
        .try_fold(0, |value, &digit| {
            let nibble = char::from(digit).to_digit(16).ok_or(Malformed)?;
            Ok(value << 4 | nibble)
        })
}

/// A cursor over a chunk's payload. Strings are scanned with a cached block of stop bits
/// (see [`block_stops`]), so finding a string's end costs a shift and a bit count, and each
/// byte is classified once however many strings share its block.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
    /// Where the cached block starts; bit `i` of `stops` is about byte `block_start + i`.
    block_start: usize,
    stops: u64,
    /// Whether a classified block held a byte above 0x7F.
    non_ascii: bool,
}

impl<'a> Scanner<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let mut scanner = Self {
            bytes,
            pos: 0,
            depth: 0,
            block_start: 0,
            stops: 0,
            non_ascii: false,
        };
        scanner.load_block(0);
        scanner
    }

    /// Classifies the `BLOCK` bytes from `start` (spaces, which stop nothing, past the end).
    fn load_block(&mut self, start: usize) {
        let rest = &self.bytes[start..];
        let (stops, non_ascii) = match rest.first_chunk::<BLOCK>() {
            Some(block) => block_stops(block),
            None => {
                let mut padded = [b' '; BLOCK];
                padded[..rest.len()].copy_from_slice(rest);
                block_stops(&padded)
            }
        };
        self.block_start = start;
        self.stops = stops;
        self.non_ascii |= non_ascii;
    }

    /// The first byte at or after `from` that ends a plain run inside a string.
    fn next_stop(&mut self, mut from: usize) -> Option<usize> {
        loop {
            let offset = from.wrapping_sub(self.block_start);
            if offset < BLOCK {
                let ahead = self.stops >> offset;
                if ahead != 0 {
                    return Some(from + ahead.trailing_zeros() as usize);
                }
                from = self.block_start + BLOCK;
            }
            if from >= self.bytes.len() {
                return None;
            }
            self.load_block(from);
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Scan<()> {
        if self.peek() != Some(byte) {
            return Err(Malformed);
        }
        self.pos += 1;
        Ok(())
    }

    fn nest(&mut self) -> Scan<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Malformed);
        }
        Ok(())
    }

    /// Walks the object at the cursor; `on_member` must consume each member's value.
    fn object<F>(&mut self, mut on_member: F) -> Scan<()>
    where
        F: FnMut(&mut Self, JsonStr<'a>) -> Scan<()>,
    {
        self.nest()?;
        self.expect(b'{')?;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            on_member(self, key)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
        }
    }

    /// Walks the array at the cursor; `on_element` gets each index and must consume the value.
    fn array<F>(&mut self, mut on_element: F) -> Scan<()>
    where
        F: FnMut(&mut Self, usize) -> Scan<()>,
    {
        self.nest()?;
        self.expect(b'[')?;
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        let mut index = 0;
        loop {
            self.skip_ws();
            on_element(self, index)?;
            index += 1;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
        }
    }

    fn skip_value(&mut self) -> Scan<()> {
        match self.peek() {
            Some(b'{') => self.object(|scanner, _| scanner.skip_value()),
            Some(b'[') => self.array(|scanner, _| scanner.skip_value()),
            Some(b'"') => self.string().map(drop),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(drop),
            _ => Err(Malformed),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Scan<()> {
        if !self.bytes[self.pos..].starts_with(word) {
            return Err(Malformed);
        }
        self.pos += word.len();
        Ok(())
    }

    /// Consumes a `null` if one is at the cursor, else any other value.
    fn null(&mut self) -> Scan<bool> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Ok(true);
        }
        self.skip_value()?;
        Ok(false)
    }

    /// The string literal at the cursor. Escapes are checked for shape here; a string the
    /// gateway uses is decoded (and fully checked) in [`JsonStr::decode`].
    #[inline(always)]
    fn string(&mut self) -> Scan<JsonStr<'a>> {
        self.expect(b'"')?;
        let start = self.pos;
        let mut escaped = false;
        loop {
            self.pos = self.next_stop(self.pos).ok_or(Malformed)?;
            match self.bytes[self.pos] {
                b'"' => break,
                b'\\' => self.pos += 1,
                _ => return Err(Malformed),
            }
            escaped = true;
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                Some(b'u') => {
                    let hex = self
                        .bytes
                        .get(self.pos + 1..self.pos + 5)
                        .ok_or(Malformed)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Malformed);
                    }
                    self.pos += 5;
                }
                _ => return Err(Malformed),
            }
        }
        let inner = &self.bytes[start..self.pos];
        self.pos += 1;
        Ok(JsonStr { inner, escaped })
    }

    /// Checks the number at the cursor; gives its digits when it is a plain non-negative
    /// integer (no sign, fraction or exponent), the only numbers the gateway reads.
    fn number(&mut self) -> Scan<Option<&'a [u8]>> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(Malformed),
        }
        let mut integer = !negative;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.require_digits()?;
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.require_digits()?;
            integer = false;
        }
        let number = &self.bytes[start..self.pos];
        if integer {
            return Ok(Some(number));
        }
        // Like serde_json, refuse numbers beyond f64's range.
        let finite = std::str::from_utf8(number)
            .ok()
            .and_then(|n| n.parse::<f64>().ok());
        match finite {
            Some(value) if value.is_finite() => Ok(None),
            _ => Err(Malformed),
        }
    }

    fn skip_digits(&mut self) {
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn require_digits(&mut self) -> Scan<()> {
        let start = self.pos;
        self.skip_digits();
        if self.pos == start {
            return Err(Malformed);
        }
        Ok(())
    }

    /// `choices`: null or an array whose first element is a choice object.
    fn choices(&mut self) -> Scan<Option<JsonStr<'a>>> {
        if self.peek() != Some(b'[') {
            return self.null_or_malformed().map(|()| None);
        }
        let mut content = None;
        self.array(|scanner, index| {
            if index == 0 {
                content = scanner.first_choice()?;
                Ok(())
            } else {
                scanner.skip_value()
            }
        })?;
        Ok(content)
    }

    fn first_choice(&mut self) -> Scan<Option<JsonStr<'a>>> {
        if self.peek() != Some(b'{') {
            return Err(Malformed);
        }
        let mut content = None;
        let mut seen_delta = false;
        self.object(|scanner, key| {
            if *key.name()? != *b"delta" {
                return scanner.skip_value();
            }
            if std::mem::replace(&mut seen_delta, true) {
                return Err(Malformed);
            }
            content = scanner.delta()?;
            Ok(())
        })?;
        Ok(content)
    }

    /// `delta`: null or an object whose `content` is null or a string.
    fn delta(&mut self) -> Scan<Option<JsonStr<'a>>> {
        if self.peek() != Some(b'{') {
            return self.null_or_malformed().map(|()| None);
        }
        let mut content = None;
        let mut seen_content = false;
        self.object(|scanner, key| {
            if *key.name()? != *b"content" {
                return scanner.skip_value();
            }
            if std::mem::replace(&mut seen_content, true) {
                return Err(Malformed);
            }
            if scanner.peek() == Some(b'"') {
                content = Some(scanner.string()?);
                Ok(())
            } else {
                scanner.null_or_malformed()
            }
        })?;
        Ok(content)
    }

    /// `usage`: null or an object whose token counts, when present, are u64 integers.
    fn usage(&mut self) -> Scan<Option<Usage>> {
        if self.peek() != Some(b'{') {
            return self.null_or_malformed().map(|()| None);
        }
        let mut usage = Usage::default();
        let mut seen = [false; 2];
        self.object(|scanner, key| {
            let slot = match &*key.name()? {
                b"prompt_tokens" => 0,
                b"completion_tokens" => 1,
                _ => return scanner.skip_value(),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Malformed);
            }
            if !matches!(scanner.peek(), Some(b'-' | b'0'..=b'9')) {
                return Err(Malformed);
            }
            let count = scanner
                .number()?
                .and_then(|digits| {
                    digits.iter().try_fold(0u64, |value, &digit| {
                        value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
                    })
                })
                .ok_or(Malformed)?;
            if slot == 0 {
                usage.prompt_tokens = count;
            } else {
                usage.completion_tokens = count;
            }
            Ok(())
        })?;
        Ok(Some(usage))
    }

    fn null_or_malformed(&mut self) -> Scan<()> {
        self.literal(b"null")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The used fields as the scanner reads them, content decoded; `None` if malformed.
    fn scan(payload: &[u8]) -> Option<(Option<String>, Option<Usage>, bool)> {
        let fields = scan_chunk(payload).ok()?;
        let content = match fields.content {
            Some(literal) => Some(literal.decode_into(&mut String::new()).ok()?.to_owned()),
            None => None,
        };
        Some((content, fields.usage, fields.has_error))
    }

    /// What serde_json's general parser says the used fields are; the scanner must agree.
    fn reference_fields(payload: &[u8]) -> Option<(Option<String>, Option<Usage>, bool)> {
        use serde_json::Value;
        let value: Value = serde_json::from_slice(payload).ok()?;
        let object = value.as_object()?;
        let content = match object.get("choices") {
            None | Some(Value::Null) => None,
            Some(Value::Array(choices)) => match choices.first() {
                None => None,
                Some(Value::Object(choice)) => match choice.get("delta") {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(delta)) => match delta.get("content") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(text)) => Some(text.clone()),
                        Some(_) => return None,
                    },
                    Some(_) => return None,
                },
                Some(_) => return None,
            },
            Some(_) => return None,
        };
        let usage = match object.get("usage") {
            None | Some(Value::Null) => None,
            Some(Value::Object(usage)) => {
                let count = |name: &str| match usage.get(name) {
                    None => Some(0),
                    Some(value) => value.as_u64(),
                };
                Some(Usage {
                    prompt_tokens: count("prompt_tokens")?,
                    completion_tokens: count("completion_tokens")?,
                })
            }
            Some(_) => return None,
        };
        let has_error = object.get("error").is_some_and(|error| !error.is_null());
        Some((content, usage, has_error))
    }

    mod differential {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{json, Map, Value};

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<u64>().prop_map(|n| json!(n)),
                any::<i32>().prop_map(|n| json!(n)),
                (-1e6f64..1e6).prop_map(|n| json!(n)),
                "[a-z \"\\\\\n\u{1}你😀/]{0,6}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                        .prop_map(|members| Value::Object(members.into_iter().collect())),
                ]
            })
        }

        fn maybe(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
            prop::option::of(prop_oneof![3 => value, 1 => any_json()])
        }

        fn chunk() -> impl Strategy<Value = Value> {
            let content = prop_oneof![
                "[a-z \"\\\\\n\r你😀]{0,6}".prop_map(Value::String),
                Just(Value::Null)
            ];
            let delta = maybe(content).prop_map(|content| {
                let mut delta = Map::new();
                delta.insert("role".to_owned(), json!("assistant"));
                if let Some(content) = content {
                    delta.insert("content".to_owned(), content);
                }
                Value::Object(delta)
            });
            let choice = maybe(delta).prop_map(|delta| {
                let mut choice = Map::new();
                choice.insert("index".to_owned(), json!(0));
                if let Some(delta) = delta {
                    choice.insert("delta".to_owned(), delta);
                }
                choice.insert("finish_reason".to_owned(), Value::Null);
                Value::Object(choice)
            });
            let choices = prop::collection::vec(choice, 0..3).prop_map(Value::Array);
            let usage = (any::<u64>(), maybe(Just(json!(5))))
                .prop_map(|(prompt, completion)| json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 1}));
            let error = Just(json!({"message": "boom"}));
            (
                maybe(choices),
                maybe(usage),
                prop::option::weighted(0.1, error),
                any_json(),
            )
                .prop_map(|(choices, usage, error, extra)| {
                    let mut chunk = Map::new();
                    chunk.insert("id".to_owned(), json!("chatcmpl-1"));
                    chunk.insert("extra".to_owned(), extra);
                    for (key, value) in [("choices", choices), ("usage", usage), ("error", error)] {
                        if let Some(value) = value {
                            chunk.insert(key.to_owned(), value);
                        }
                    }
                    Value::Object(chunk)
                })
        }

        proptest! {
            #[test]
            fn scanner_agrees_with_serde_json(
                chunk in chunk(),
                edits in prop::collection::vec(
                    (any::<prop::sample::Index>(), any::<bool>(), prop::sample::select(b"{}[]\",:\\ 0e-.nu\x01".to_vec())),
                    0..3,
                ),
                cut in prop::option::weighted(0.1, any::<prop::sample::Index>()),
            ) {
                let mut payload = serde_json::to_vec(&chunk).unwrap();
                for (at, insert, byte) in edits {
                    let at = at.index(payload.len());
                    if insert {
                        payload.insert(at, byte);
                    } else {
                        payload.remove(at);
                    }
                }
                if let Some(cut) = cut {
                    payload.truncate(cut.index(payload.len()));
                }
                prop_assert_eq!(scan(&payload), reference_fields(&payload), "payload {}", String::from_utf8_lossy(&payload));
            }
        }
    }

    #[test]
    fn scanner_edge_cases() {
        let cases: &[(&str, bool)] = &[
            (
                r#"{"choices":[{"delta":{"content":"\u00e9\ud83d\ude00"}}]}"#,
                true,
            ),
            (r#"{"\u0063hoices":[{"delta":{"content":"k"}}]}"#, true),
            (r#"{"choices":[{"delta":{"content":"\ud800"}}]}"#, false),
            (
                r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
                false,
            ),
            (r#"{"choices":[],"choices":[]}"#, false),
            (r#"{"usage":{"prompt_tokens":1.5}}"#, false),
            (r#"{"usage":{"prompt_tokens":18446744073709551616}}"#, false),
            (r#"{"usage":{"prompt_tokens":-1}}"#, false),
            (r#"{"x":01}"#, false),
            (r#"{"x":1.}"#, false),
            (r#"{"x":-}"#, false),
            (r#"{"x":1e400}"#, false),
            (r#"{"x":-0.1e309}"#, true),
            (r#"{"x":"\x"}"#, false),
            (r#"{"x":"\u12"}"#, false),
            (r#"{"x":tru}"#, false),
            (r#"{"x":[1,]}"#, false),
            (r#"{"x":1,}"#, false),
            (r#" {"x":[-0.5e+3, true, false, null, {}, []]} "#, true),
            ("{\"x\":\"\t\"}", false),
            ("[]", false),
            ("null", false),
        ];
        for (payload, valid) in cases {
            assert_eq!(
                scan(payload.as_bytes()).is_some(),
                *valid,
                "payload {payload}"
            );
        }
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(scan_chunk(deep.as_bytes()).is_err());
        let fine = format!("{{\"x\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(scan_chunk(fine.as_bytes()).is_ok());
        let escaped = scan(br#"{"choices":[{"delta":{"content":"\u00e9\ud83d\ude00\n"}}]}"#);
        assert_eq!(
            escaped.and_then(|(content, _, _)| content).as_deref(),
            Some("é😀\n")
        );
    }

    fn is_stop(byte: u8) -> bool {
        byte == b'"' || byte == b'\\' || byte < 0x20
    }

    #[test]
    fn word_stop_bits_mark_exactly_the_stop_bytes() {
        for byte in 0..=u8::MAX {
            for filler in [
                b'a', b'"', 0x00, 0x21, 0x23, 0x5D, 0x7F, 0x80, 0xA2, 0xDC, 0xFF,
            ] {
                for at in 0..8 {
                    let mut word = [filler; 8];
                    word[at] = byte;
                    let expected = (0..8)
                        .filter(|&i| is_stop(word[i]))
                        .fold(0, |bits, i| bits | 1 << i);
                    assert_eq!(
                        word_stop_bits(u64::from_le_bytes(word)),
                        expected,
                        "word {word:02x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_stops_mark_exactly_the_stop_bytes() {
        for byte in 0..=u8::MAX {
            for filler in [b'a', b'"', 0x00, 0x1F, 0x20, 0x7F, 0x80, 0xFF] {
                for at in [0, 1, 7, 8, 15, 16, 31, 32, 48, 63] {
                    let mut block = [filler; BLOCK];
                    block[at] = byte;
                    let stops = (0..BLOCK)
                        .filter(|&i| is_stop(block[i]))
                        .fold(0, |bits, i| bits | 1 << i);
                    let non_ascii = block.iter().any(|&byte| byte > 0x7F);
                    assert_eq!(
                        block_stops(&block),
                        (stops, non_ascii),
                        "byte {byte:#x} at {at} among {filler:#x}"
                    );
                }
            }
        }
    }

    /// Puts each tricky string piece at every offset around the scanner's block edges, in a
    /// skipped value and in the content, and holds the scanner to serde_json's verdict.
    #[test]
    fn strings_straddling_blocks_agree_with_serde_json() {
        let pieces: [&[u8]; 14] = [
            br#"\""#,
            br#"\\"#,
            br#"\n"#,
            br#"\u00e9"#,
            br#"\ud83d\ude00"#,
            br#"\ud83d"#,
            br#"\udc00"#,
            br#"\u00e"#,
            "é".as_bytes(),
            "😀".as_bytes(),
            b"\xc3",
            b"\xff",
            b"\x01",
            b"\x1f",
        ];
        for piece in pieces {
            for pad in 0..140 {
                let filler = "x".repeat(pad);
                let mut skipped = format!(r#"{{"id":"{filler}"#).into_bytes();
                skipped.extend_from_slice(piece);
                skipped.extend_from_slice(br#"tail","choices":[{"delta":{"content":"ok"}}]}"#);
                let mut content =
                    format!(r#"{{"choices":[{{"delta":{{"content":"{filler}"#).into_bytes();
                content.extend_from_slice(piece);
                content.extend_from_slice(br#"tail"}}]}"#);
                // Only used strings are decoded; a skipped one has its escapes checked
                // for shape, so a lone surrogate there passes where serde_json refuses it.
                let lone_surrogate = [br#"\ud83d"#.as_slice(), br#"\udc00"#].contains(&piece);
                let payloads = if lone_surrogate {
                    vec![content]
                } else {
                    vec![skipped, content]
                };
                for payload in payloads {
                    assert_eq!(
                        scan(&payload),
                        reference_fields(&payload),
                        "payload {}",
                        String::from_utf8_lossy(&payload)
                    );
                }
            }
        }
    }

    #[test]
    fn next_stop_crosses_blocks_and_stops_at_the_end() {
        for len in [0, 1, 63, 64, 65, 127, 128, 200] {
            let mut payload = vec![b'a'; len];
            let marks: Vec<usize> = [0, 7, 8, 62, 63, 64, 65, 127, 128, 150]
                .into_iter()
                .filter(|&at| at < len)
                .collect();
            for &at in &marks {
                payload[at] = b'"';
            }
            let mut scanner = Scanner::new(&payload);
            let mut found = Vec::new();
            let mut from = 0;
            while let Some(at) = scanner.next_stop(from) {
                found.push(at);
                from = at + 1;
            }
            assert_eq!(found, marks, "len {len}");
            assert!(!scanner.non_ascii);
        }
    }
}
