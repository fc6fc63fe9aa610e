//! Reading `username`/`password` out of a `POST /auth` request (docs/api.md, "POST /auth").
//! The body's format follows its Content-Type (multipart, urlencoded or JSON); each field falls
//! back to the query string when the body lacks it, as Go's `r.FormValue` did in the original.

use std::convert::Infallible;
use std::fmt;

use bytes::Bytes;

/// A username and password as sent by a client, both non-empty.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The login name, used to look the user up in the credential store.
    pub username: String,
    /// The clear-text password; never log it (`Debug` redacts it).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Fields found in one source (body or query); `None` means missing, empty or not UTF-8.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fields {
    username: Option<String>,
    password: Option<String>,
}

impl Fields {
    /// Keeps the first usable value of a field, like Go's `FormValue` takes the first one.
    fn offer(&mut self, name: &[u8], value: Vec<u8>) {
        let slot = match name {
            b"username" => &mut self.username,
            b"password" => &mut self.password,
            _ => return,
        };
        if slot.is_none() {
            *slot = usable(value);
        }
    }
}

/// The body formats `/auth` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Multipart,
    UrlEncoded,
    Json,
}

/// Extracts credentials from a `/auth` request: `content_type` is the raw Content-Type header,
/// `body` the whole (already size-limited) body and `query` the raw query string without `?`.
/// Returns `None` when the username or the password is missing.
pub async fn extract_credentials(
    content_type: Option<&str>,
    body: Bytes,
    query: Option<&str>,
) -> Option<Credentials> {
    let from_body = match content_type.and_then(body_format) {
        Some(BodyFormat::Multipart) => match content_type.and_then(boundary) {
            Some(boundary) => multipart_fields(body, boundary).await,
            None => Fields::default(),
        },
        Some(BodyFormat::UrlEncoded) => urlencoded_fields(&body),
        Some(BodyFormat::Json) => json_fields(&body),
        None => Fields::default(),
    };
    let from_query = query.map(|q| urlencoded_fields(q.as_bytes()));
    let (query_username, query_password) = match from_query {
        Some(fields) => (fields.username, fields.password),
        None => (None, None),
    };
    Some(Credentials {
        username: from_body.username.or(query_username)?,
        password: from_body.password.or(query_password)?,
    })
}

/// Maps a Content-Type to a body format: media type compared case-insensitively,
/// parameters ignored here.
fn body_format(content_type: &str) -> Option<BodyFormat> {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let (kind, subtype) = media_type.split_once('/')?;
    let kind = kind.trim();
    let subtype = subtype.trim();
    if kind.eq_ignore_ascii_case("multipart") && subtype.eq_ignore_ascii_case("form-data") {
        Some(BodyFormat::Multipart)
    } else if kind.eq_ignore_ascii_case("application")
        && subtype.eq_ignore_ascii_case("x-www-form-urlencoded")
    {
        Some(BodyFormat::UrlEncoded)
    } else if kind.eq_ignore_ascii_case("application") && is_json_subtype(subtype) {
        Some(BodyFormat::Json)
    } else {
        None
    }
}

/// The non-empty `boundary` parameter of a Content-Type (name case-insensitive, value as
/// token or quoted string). Hand-rolled because `mime` refuses some headers browsers and
/// proxies send, such as a space before `;`.
fn boundary(content_type: &str) -> Option<String> {
    let mut rest = content_type.split_once(';')?.1;
    loop {
        let (name, after_name) = rest.split_once('=')?;
        let after_name = after_name.trim_start_matches([' ', '\t']);
        let (value, after_value) = match after_name.strip_prefix('"') {
            Some(quoted) => unquote(quoted)?,
            None => {
                let end = after_name.find(';').unwrap_or(after_name.len());
                let (token, tail) = after_name.split_at(end);
                (token.trim_end_matches([' ', '\t']).to_owned(), tail)
            }
        };
        // A valueless parameter before this one ends up in `name`; only the last part counts.
        let name = name.rsplit(';').next().unwrap_or(name);
        if name
            .trim_matches([' ', '\t'])
            .eq_ignore_ascii_case("boundary")
        {
            return Some(value).filter(|v| !v.is_empty());
        }
        rest = after_value.split_once(';')?.1;
    }
}

/// Reads a quoted string whose opening quote is already consumed; returns the unescaped
/// value and the text after the closing quote.
fn unquote(quoted: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return Some((value, &quoted[index + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// `json` itself or any structured-syntax `+json` subtype (RFC 6839), e.g. `vnd.api+json`.
fn is_json_subtype(subtype: &str) -> bool {
    let bytes = subtype.as_bytes();
    subtype.eq_ignore_ascii_case("json")
        || (bytes.len() > 5 && bytes[bytes.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// A value counts only when it is non-empty UTF-8.
fn usable(value: Vec<u8>) -> Option<String> {
    String::from_utf8(value).ok().filter(|s| !s.is_empty())
}

/// Parses a multipart body; any framing error discards all fields. Parts with a file name
/// are uploads, not form values (as in Go's `ParseMultipartForm`). A part has no size limit
/// of its own (the whole body already has one, `limits.max_auth_body_bytes`), so an
/// over-long value is present, as it is in the other forms: it cannot authenticate, but it
/// is no missing field.
async fn multipart_fields(body: Bytes, boundary: String) -> Fields {
    let stream = futures::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = Fields::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return fields,
            Err(_) => return Fields::default(),
        };
        let name = match field.name() {
            Some(name @ ("username" | "password")) if field.file_name().is_none() => {
                name.to_owned()
            }
            // Unread parts are skipped by the next `next_field` call.
            _ => continue,
        };
        match field.bytes().await {
            Ok(value) => fields.offer(name.as_bytes(), value.to_vec()),
            Err(_) => return Fields::default(),
        }
    }
}

/// Parses `application/x-www-form-urlencoded` text (also used for the query string).
/// Decoded to bytes first so that values that are not UTF-8 count as missing instead of
/// being silently replaced with U+FFFD; pairs with a broken `%` escape are skipped, as Go does.
fn urlencoded_fields(input: &[u8]) -> Fields {
    let mut fields = Fields::default();
    for pair in input.split(|&b| b == b'&') {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        if let (Some(name), Some(value)) = (percent_decode(name), percent_decode(value)) {
            fields.offer(&name, value);
        }
    }
    fields
}

/// Decodes `+` and `%XX`; `None` on a truncated or non-hex escape.
fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex_value(*input.get(i + 1)?)?;
                let lo = hex_value(*input.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Parses a JSON object body; non-string values count as missing, anything but an object
/// (or invalid JSON) contributes no fields.
fn json_fields(body: &[u8]) -> Fields {
    let Ok(object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
    else {
        return Fields::default();
    };
    let text = |key: &str| {
        object
            .get(key)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Fields {
        username: text("username"),
        password: text("password"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        content_type: Option<&str>,
        body: &'static [u8],
        query: Option<&str>,
    ) -> Option<Credentials> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime");
        runtime.block_on(extract_credentials(
            content_type,
            Bytes::from_static(body),
            query,
        ))
    }

    fn creds(username: &str, password: &str) -> Option<Credentials> {
        Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The body `curl -F username=alice -F 'password=s3cr3t p@ss'` sends.
    const CURL_MULTIPART: &[u8] = b"--------------------------d74496d66958873e\r\n\
Content-Disposition: form-data; name=\"username\"\r\n\
\r\n\
alice\r\n\
--------------------------d74496d66958873e\r\n\
Content-Disposition: form-data; name=\"password\"\r\n\
\r\n\
s3cr3t p@ss\r\n\
--------------------------d74496d66958873e--\r\n";
    const CURL_CONTENT_TYPE: &str =
        "multipart/form-data; boundary=------------------------d74496d66958873e";

    #[test]
    fn multipart_as_curl_sends_it() {
        assert_eq!(
            run(Some(CURL_CONTENT_TYPE), CURL_MULTIPART, None),
            creds("alice", "s3cr3t p@ss")
        );
    }

    #[test]
    fn multipart_media_type_is_case_insensitive_and_boundary_may_be_quoted() {
        let content_type =
            "Multipart/Form-Data ; charset=utf-8; BOUNDARY=\"------------------------d74496d66958873e\"";
        assert_eq!(
            run(Some(content_type), CURL_MULTIPART, None),
            creds("alice", "s3cr3t p@ss")
        );
    }

    #[test]
    fn multipart_skips_other_parts_and_file_uploads() {
        let body = b"--XyZ\r\n\
Content-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
--XyZ\r\n\
Content-Disposition: form-data; name=\"username\"; filename=\"u.txt\"\r\n\
Content-Type: text/plain\r\n\r\nmallory\r\n\
--XyZ\r\n\
Content-Disposition: form-data; name=\"username\"\r\n\r\nbob\r\n\
--XyZ\r\n\
Content-Disposition: form-data; name=\"username\"\r\n\r\nsecond\r\n\
--XyZ\r\n\
Content-Disposition: form-data; name=\"password\"\r\n\r\npw\r\n\
--XyZ--\r\n";
        assert_eq!(
            run(Some("multipart/form-data; boundary=XyZ"), body, None),
            creds("bob", "pw")
        );
    }

    #[test]
    fn multipart_without_boundary_contributes_nothing() {
        // The seed document's example: a multipart Content-Type without a boundary.
        assert_eq!(run(Some("multipart/form-data"), CURL_MULTIPART, None), None);
        assert_eq!(
            run(
                Some("multipart/form-data"),
                CURL_MULTIPART,
                Some("username=q&password=r")
            ),
            creds("q", "r")
        );
    }

    /// An over-long value is present in every form: multipart, urlencoded and JSON give the
    /// same credentials, which then cannot authenticate (no user has such a name).
    #[test]
    fn over_long_values_are_present_in_every_form() {
        let long = "a".repeat(8192);
        let mut multipart =
            b"--b\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n".to_vec();
        multipart.extend_from_slice(long.as_bytes());
        multipart.extend_from_slice(
            b"\r\n--b\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\npw\r\n--b--\r\n",
        );
        let urlencoded = format!("username={long}&password=pw");
        let json = format!(r#"{{"username": "{long}", "password": "pw"}}"#);
        let leak = |body: Vec<u8>| -> &'static [u8] { Box::leak(body.into_boxed_slice()) };
        for (content_type, body) in [
            ("multipart/form-data; boundary=b", leak(multipart)),
            (
                "application/x-www-form-urlencoded",
                leak(urlencoded.into_bytes()),
            ),
            ("application/json", leak(json.into_bytes())),
        ] {
            assert_eq!(
                run(Some(content_type), body, Some("username=q")),
                creds(&long, "pw"),
                "{content_type}"
            );
        }
    }

    #[test]
    fn multipart_truncated_body_contributes_nothing() {
        let truncated = &CURL_MULTIPART[..CURL_MULTIPART.len() - 60];
        assert_eq!(run(Some(CURL_CONTENT_TYPE), truncated, None), None);
    }

    #[test]
    fn multipart_non_utf8_value_counts_as_missing() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n\xff\xfe\r\n\
--b\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\npw\r\n--b--\r\n";
        assert_eq!(
            run(Some("multipart/form-data; boundary=b"), body, None),
            None
        );
        assert_eq!(
            run(
                Some("multipart/form-data; boundary=b"),
                body,
                Some("username=q")
            ),
            creds("q", "pw")
        );
    }

    #[test]
    fn urlencoded_body() {
        assert_eq!(
            run(
                Some("application/x-www-form-urlencoded"),
                b"username=temporary_user&password=default%5Fpass+word%21",
                None
            ),
            creds("temporary_user", "default_pass word!")
        );
    }

    #[test]
    fn urlencoded_first_value_wins_and_empty_counts_as_missing() {
        let body = b"username=&username=first&username=second&password=p&password=q";
        assert_eq!(
            run(
                Some("APPLICATION/X-WWW-FORM-URLENCODED; charset=UTF-8"),
                body,
                None
            ),
            creds("first", "p")
        );
    }

    #[test]
    fn urlencoded_non_utf8_and_bad_escapes_count_as_missing() {
        assert_eq!(
            run(
                Some("application/x-www-form-urlencoded"),
                b"username=%FF&password=p",
                None
            ),
            None
        );
        assert_eq!(
            run(
                Some("application/x-www-form-urlencoded"),
                b"username=%zz&username=ok&password=%4",
                Some("password=fromquery")
            ),
            creds("ok", "fromquery")
        );
    }

    #[test]
    fn json_body_and_json_suffix_types() {
        let body = br#"{"username": "alice", "password": "p\u00e4ss", "extra": [1]}"#;
        assert_eq!(
            run(Some("application/json"), body, None),
            creds("alice", "päss")
        );
        assert_eq!(
            run(
                Some("application/vnd.chatgate+JSON; charset=utf-8"),
                body,
                None
            ),
            creds("alice", "päss")
        );
    }

    #[test]
    fn json_non_string_values_count_as_missing() {
        let body = br#"{"username": 42, "password": "pw"}"#;
        assert_eq!(run(Some("application/json"), body, None), None);
        assert_eq!(
            run(Some("application/json"), body, Some("username=q")),
            creds("q", "pw")
        );
        let body = br#"{"username": "u", "password": null}"#;
        assert_eq!(run(Some("application/json"), body, None), None);
    }

    #[test]
    fn json_that_is_not_an_object_contributes_nothing() {
        for body in [
            &br#"["alice", "pw"]"#[..],
            b"{\"username\": \"alice\", \"password\": \"pw\"",
            b"",
            b"username=alice&password=pw",
        ] {
            let body: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
            assert_eq!(run(Some("application/json"), body, None), None);
            assert_eq!(
                run(
                    Some("application/json"),
                    body,
                    Some("username=q&password=r")
                ),
                creds("q", "r")
            );
        }
    }

    #[test]
    fn query_only() {
        assert_eq!(
            run(
                None,
                b"",
                Some("username=temporary_user&password=default_password")
            ),
            creds("temporary_user", "default_password")
        );
    }

    #[test]
    fn body_fields_win_over_query_fields_one_by_one() {
        assert_eq!(
            run(
                Some("application/x-www-form-urlencoded"),
                b"password=body-pw",
                Some("username=query-user&password=query-pw")
            ),
            creds("query-user", "body-pw")
        );
        assert_eq!(
            run(
                Some("application/json"),
                br#"{"username": "body-user", "password": ""}"#,
                Some("password=query-pw")
            ),
            creds("body-user", "query-pw")
        );
    }

    #[test]
    fn unknown_content_type_ignores_the_body() {
        assert_eq!(
            run(Some("text/plain"), b"username=a&password=b", None),
            None
        );
        assert_eq!(run(None, b"username=a&password=b", None), None);
        assert_eq!(
            run(
                Some("garbage"),
                b"username=a&password=b",
                Some("username=a")
            ),
            None
        );
    }

    #[test]
    fn both_fields_are_required() {
        assert_eq!(run(None, b"", Some("username=a")), None);
        assert_eq!(run(None, b"", Some("password=b")), None);
        assert_eq!(run(None, b"", Some("")), None);
        assert_eq!(run(None, b"", None), None);
    }

    #[test]
    fn debug_redacts_the_password() {
        let shown = format!("{:?}", creds("alice", "hunter2").expect("credentials"));
        assert_eq!(
            shown,
            r#"Credentials { username: "alice", password: "[redacted]" }"#
        );
    }

    #[test]
    fn boundary_parameter() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc"),
            Some("abc".into())
        );
        assert_eq!(
            boundary("multipart/form-data;boundary=abc ; x=y"),
            Some("abc".into())
        );
        assert_eq!(
            boundary(r#"multipart/form-data; charset="a;b"; Boundary="q\"u;o""#),
            Some(r#"q"u;o"#.into())
        );
        assert_eq!(
            boundary("multipart/form-data; flag; boundary=abc"),
            Some("abc".into())
        );
        assert_eq!(boundary("multipart/form-data; xboundary=abc"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(boundary("multipart/form-data; boundary=\"abc"), None);
        assert_eq!(boundary("multipart/form-data"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode(b"a+b%20c%2b%C3%A4"),
            Some("a b c+ä".as_bytes().to_vec())
        );
        assert_eq!(percent_decode(b"%"), None);
        assert_eq!(percent_decode(b"%a"), None);
        assert_eq!(percent_decode(b"%g0"), None);
        assert_eq!(percent_decode(b""), Some(Vec::new()));
    }
}
