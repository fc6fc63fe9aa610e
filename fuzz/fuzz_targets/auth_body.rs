//! Fuzzes the `/auth` credential extraction: the first byte picks a Content-Type (multipart
//! with a boundary, urlencoded, JSON, odd or none), the second a query string, the rest is
//! the body. It must never panic, and anything it returns must be non-empty.
#![no_main]

use bytes::Bytes;
use chatgate::auth::login::extract_credentials;
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some("multipart/form-data; boundary=X"),
    Some("multipart/form-data; boundary=\"a b\""),
    Some("multipart/form-data"),
    Some("application/x-www-form-urlencoded"),
    Some("application/json"),
    Some("application/vnd.api+json; charset=utf-8"),
    Some("text/plain"),
    Some("MULTIPART/FORM-DATA;BOUNDARY=--"),
];

const QUERIES: &[Option<&str>] = &[
    None,
    Some("username=u&password=p"),
    Some("password=p"),
    Some("username=%FF&password=%00"),
];

fuzz_target!(|data: &[u8]| {
    let (ct, query, body) = match data {
        [a, b, rest @ ..] => (
            CONTENT_TYPES[*a as usize % CONTENT_TYPES.len()],
            QUERIES[*b as usize % QUERIES.len()],
            rest,
        ),
        _ => (None, None, data),
    };
    let found =
        futures::executor::block_on(extract_credentials(ct, Bytes::copy_from_slice(body), query));
    if let Some(c) = found {
        assert!(!c.username.is_empty() && !c.password.is_empty());
    }
});
