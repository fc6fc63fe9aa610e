//! Benchmarks of the per-request auth cores: JWT issue/verify (every chat request verifies one)
//! and `/auth` credential extraction for each body format. Password hashing is left out on
//! purpose: its cost is a configured parameter, not something to optimise.

use std::time::Duration;

use bytes::Bytes;
use chatgate::auth::login::extract_credentials;
use chatgate::auth::token::{TokenAlgorithm, TokenService};
use criterion::{criterion_group, criterion_main, Criterion};

const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret!!";
const PREVIOUS_SECRET: &[u8] = b"previous-secret-previous-secret-previous";

fn tokens(c: &mut Criterion) {
    let service = TokenService::new(
        TokenAlgorithm::HS256,
        SECRET,
        &[PREVIOUS_SECRET.to_vec()],
        Duration::from_secs(7 * 24 * 3600),
    )
    .expect("bench token config");
    let token = service.issue(42, "temporary_user").expect("bench token");

    let mut group = c.benchmark_group("jwt");
    group.bench_function("issue", |b| {
        b.iter(|| service.issue(std::hint::black_box(42), "temporary_user"))
    });
    group.bench_function("verify", |b| {
        b.iter(|| service.verify(std::hint::black_box(&token)))
    });
    group.finish();
}

fn credentials(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("bench runtime");
    let multipart = Bytes::from_static(
        b"--------------------------d74496d66958873e\r\n\
Content-Disposition: form-data; name=\"username\"\r\n\r\ntemporary_user\r\n\
--------------------------d74496d66958873e\r\n\
Content-Disposition: form-data; name=\"password\"\r\n\r\ndefault_password\r\n\
--------------------------d74496d66958873e--\r\n",
    );
    let cases: [(&str, Option<&str>, Bytes, Option<&str>); 4] = [
        (
            "multipart",
            Some("multipart/form-data; boundary=------------------------d74496d66958873e"),
            multipart,
            None,
        ),
        (
            "urlencoded",
            Some("application/x-www-form-urlencoded"),
            Bytes::from_static(b"username=temporary_user&password=default_password"),
            None,
        ),
        (
            "json",
            Some("application/json"),
            Bytes::from_static(br#"{"username":"temporary_user","password":"default_password"}"#),
            None,
        ),
        (
            "query",
            None,
            Bytes::new(),
            Some("username=temporary_user&password=default_password"),
        ),
    ];

    let mut group = c.benchmark_group("extract_credentials");
    for (name, content_type, body, query) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                let found =
                    runtime.block_on(extract_credentials(content_type, body.clone(), query));
                assert!(found.is_some(), "{name} bench input must parse");
                found
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tokens, credentials);
criterion_main!(benches);
