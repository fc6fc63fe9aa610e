//! Keeping secrets out of everything the gateway prints, logs or answers:
//! connection URLs with credentials (Redis, PostgreSQL) and upstream error
//! texts, which routinely quote the API key they were sent.

/// What stands where a secret was removed.
pub const REDACTED: &str = "[redacted]";

/// Longest upstream error text passed on, in characters, after redaction.
pub const MAX_UPSTREAM_TEXT_CHARS: usize = 200;

/// Shortest word that is removed for being a piece of a configured key.
const MIN_KEY_FRAGMENT: usize = 6;
/// Shortest run of base64/hex characters taken for a credential.
const MIN_SECRET_RUN: usize = 24;

/// Prefixes of well-known API key and token formats (OpenAI and compatible servers,
/// Anthropic, Google, GitHub, Slack, Hugging Face, Groq, AWS).
const KEY_PREFIXES: [&str; 14] = [
    "sk-",
    "sk_",
    "pk-",
    "rk-",
    "AIza",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "xoxb-",
    "xoxp-",
    "hf_",
    "gsk_",
    "AKIA",
];

/// Names whose `name=value` value is a secret.
const SECRET_NAMES: [&str; 7] = [
    "key", "token", "password", "passwd", "pwd", "secret", "auth",
];

/// A URL with its credentials masked, fit for logs and `chatgate check`:
/// the password (or a lone user-info part, which Redis and PostgreSQL may take
/// as the password) becomes `***`, and a query string (`?password=...`) is
/// dropped. User info is everything before the last `@`, so a password with
/// an unencoded `/`, `?`, `#` or `@` is masked whole.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL we understand (a key=value DSN, a typo): show nothing that could be a secret.
        return "<unparsable URL>".to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let (user, rest) = match rest.rfind('@') {
        Some(at) => {
            let user_info = &rest[..at];
            let user = match user_info.find(':') {
                Some(colon) => format!("{}:***@", &user_info[..colon]),
                None => "***@".to_string(),
            };
            (user, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let (host_and_path, had_query) = match rest.find(['?', '#']) {
        Some(pos) => (&rest[..pos], true),
        None => (rest, false),
    };
    let query = if had_query { "?..." } else { "" };
    format!("{scheme}{user}{host_and_path}{query}")
}

/// An upstream's error text made safe to show a client or write to a log: every
/// configured key (`secrets`) and everything shaped like a credential removed,
/// control characters turned into spaces, cut to [`MAX_UPSTREAM_TEXT_CHARS`].
/// Removal comes before the cut, so a key is never split and half kept.
pub fn upstream_text(text: &str, secrets: &[&str]) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let scrubbed = scrub_credentials(&one_line, secrets);
    let trimmed = scrubbed.trim();
    match trimmed.char_indices().nth(MAX_UPSTREAM_TEXT_CHARS) {
        Some((cut, _)) => format!("{}…", trimmed[..cut].trim_end()),
        None => trimmed.to_owned(),
    }
}

/// `text` with every occurrence of a configured secret, every word that is a
/// piece of one, and every credential-shaped word replaced by [`REDACTED`].
///
/// Credential-shaped: a well-known key prefix (`sk-...`), a masked key
/// (`abcd****wxyz`), the word after `Bearer`/`Basic`, the value of
/// `key=`/`token=`/`password=`..., and long base64/hex runs.
pub fn scrub_credentials(text: &str, secrets: &[&str]) -> String {
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    // A key that contains another is removed first, whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = text.to_string();
    for secret in &secrets {
        if text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }

    let mut out = String::with_capacity(text.len());
    let mut after_scheme = false;
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let start = rest.find(is_word_char).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        if after_scheme || is_credential(word, &secrets) {
            out.push_str(REDACTED);
        } else if let Some((name, value)) = secret_assignment(word) {
            out.push_str(name);
            out.push('=');
            if !value.is_empty() {
                out.push_str(REDACTED);
            }
        } else {
            out.push_str(word);
        }
        // `Bearer <token>`: the next word is the credential, whatever it looks like.
        after_scheme = (word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic"))
            && rest.starts_with([' ', '\t']);
    }
    out
}

/// Characters of a word as far as credentials go: keys, tokens and JWTs are made of these.
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.+/=*~".contains(c)
}

fn is_credential(word: &str, secrets: &[&str]) -> bool {
    let bare = word.trim_end_matches(['.', '*', '~']);
    if KEY_PREFIXES
        .iter()
        .any(|p| bare.len() >= p.len() + 4 && bare.starts_with(p))
    {
        return true;
    }
    // A masked key: letters or digits around a run of asterisks, or anything on
    // both sides of one (a key of mostly `-` and `_` shows `--_A****_--_`).
    if word.contains("**")
        && (word.chars().filter(char::is_ascii_alphanumeric).count() >= 2
            || word.trim_matches('*').contains("**"))
    {
        return true;
    }
    let core = word.trim_matches(['.', '*', '~', '=', '/', '-', '_', '+']);
    if core.len() >= MIN_KEY_FRAGMENT && secrets.iter().any(|s| s.contains(core)) {
        return true;
    }
    looks_random(core)
}

/// A long run of base64/hex characters with digits in it, or a long one mixing cases:
/// what generated keys, tokens and hashes look like, and prose does not.
fn looks_random(run: &str) -> bool {
    let chunks = run.split('.');
    chunks.into_iter().any(|part| {
        if part.len() < MIN_SECRET_RUN
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=_-".contains(&b))
        {
            return false;
        }
        let digits = part.bytes().filter(u8::is_ascii_digit).count();
        let upper = part.bytes().any(|b| b.is_ascii_uppercase());
        let lower = part.bytes().any(|b| b.is_ascii_lowercase());
        digits >= 2 || (part.len() >= 32 && upper && lower)
    })
}

/// `api_key=value`, `token=value`, ...: the name and the value.
fn secret_assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    let lower = name.to_ascii_lowercase();
    SECRET_NAMES
        .iter()
        .any(|n| lower.ends_with(n))
        .then_some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "sk-proj-Abcdefghijklmnop1234567890QRSTuvwx";

    #[test]
    fn urls_lose_passwords_in_every_shape() {
        let cases = [
            ("redis://:s3cret@host:6380/0", "redis://:***@host:6380/0"),
            ("rediss://user:s3cret@host/2", "rediss://user:***@host/2"),
            ("redis://S3cret@host", "redis://***@host"),
            ("redis://user:S3cret@host", "redis://user:***@host"),
            (
                "redis://u:p@ss@host:1/0?password=x",
                "redis://u:***@host:1/0?...",
            ),
            ("redis://host:1/0?password=S3cret", "redis://host:1/0?..."),
            (
                "redis+unix:///run/redis.sock?pass=x",
                "redis+unix:///run/redis.sock?...",
            ),
            ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0"),
            ("redis://u:pa/ss@host/0", "redis://u:***@host/0"),
            ("redis://u:pa?ss@host/0", "redis://u:***@host/0"),
            ("redis://u:pa#ss@host", "redis://u:***@host"),
            ("redis://pa/ss@host", "redis://***@host"),
            (
                "postgres://chat:S3cret@db.example:5432/chat?sslmode=require",
                "postgres://chat:***@db.example:5432/chat?...",
            ),
            ("postgresql://chat@db/chat", "postgresql://***@db/chat"),
            ("s3cret", "<unparsable URL>"),
            ("host=db password=S3cret", "<unparsable URL>"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn configured_keys_and_their_pieces_are_removed() {
        let key = "my-vllm-key-not-shaped";
        let text = format!("bad key {key}; you sent {} (prefix)", &key[..10]);
        let out = scrub_credentials(&text, &[key]);
        assert_eq!(out, "bad key [redacted]; you sent [redacted] (prefix)");
    }

    #[test]
    fn credential_shapes_are_removed() {
        let cases = [
            (
                format!("Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com/account/api-keys."),
                "Incorrect API key provided: [redacted] You can find your API key at https://platform.openai.com/account/api-keys.",
            ),
            (
                "Incorrect API key provided: sk-proj-abcd****wxyz.".to_string(),
                "Incorrect API key provided: [redacted]",
            ),
            ("key abcd****************wxyz is wrong".into(), "key [redacted] is wrong"),
            ("header was Bearer hunter2".into(), "header was Bearer [redacted]"),
            ("Authorization: basic dXNlcjpwYXNz".into(), "Authorization: basic [redacted]"),
            ("bad api_key=hunter2 given".into(), "bad api_key=[redacted] given"),
            (
                "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into(),
                "token [redacted]",
            ),
            ("hash 0123456789abcdef0123456789abcdef".into(), "hash [redacted]"),
            ("AIzaSyA-1234567890abcdefgh".into(), "[redacted]"),
            // Found by the property below: a key of mostly `-` and `_`, masked.
            ("key --_A****_--_ is wrong".into(), "key [redacted] is wrong"),
        ];
        for (text, want) in cases {
            assert_eq!(scrub_credentials(&text, &[]), want, "{text}");
        }
    }

    #[test]
    fn ordinary_error_texts_pass_unchanged() {
        for text in [
            "Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): Limit 3, Used 3, Requested 1.",
            "The server is overloaded, please try again later",
            "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
            "model `llama-3.1-8b-instruct` not found",
            "simulated 503",
            "你好，服务器繁忙",
        ] {
            assert_eq!(scrub_credentials(text, &["sk-other-1234567890"]), text);
        }
    }

    #[test]
    fn cut_comes_after_removal() {
        let long = format!("{}{KEY}", "x ".repeat(95));
        let out = upstream_text(&long, &[KEY]);
        assert!(out.ends_with("[redacted]"), "{out}");
        let cut = upstream_text(&"ab ".repeat(200), &[]);
        assert_eq!(cut.chars().count(), MAX_UPSTREAM_TEXT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(upstream_text("a\u{0}b\u{7f}c\td\n", &[]), "a b c d");
        let exact = "é".repeat(MAX_UPSTREAM_TEXT_CHARS);
        assert_eq!(upstream_text(&exact, &[]), exact);
    }

    proptest! {
        #[test]
        fn no_fragment_of_a_key_survives(
            key in "[A-Za-z0-9_-]{12,48}",
            before in "[ -~]{0,300}",
            after in "[ -~]{0,300}",
            masked in any::<bool>(),
        ) {
            let shown = if masked {
                format!("{}****{}", &key[..4], &key[key.len() - 4..])
            } else {
                key.clone()
            };
            let text = format!("{before} {shown} {after}");
            let out = upstream_text(&text, &[&key]);
            prop_assert!(!out.contains(&key));
            prop_assert!(!out.contains(&shown), "{out}");
            prop_assert!(out.chars().count() <= MAX_UPSTREAM_TEXT_CHARS + 1);
        }
    }
}
