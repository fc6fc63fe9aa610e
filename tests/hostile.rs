//! Hostile input against a real gateway (issue 5): malformed and oversized bodies,
//! broken framing, header floods, slow and idle clients. Each case gets docs/api.md's
//! error or a clean close; the process stays up and its memory stays bounded. Also the
//! security headers, and a full session whose logs must not contain any secret.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const MISSING: &str = "Authentication failed: cannot find username/password in request body.";

struct Setup {
    _redis: Redis,
    _sim: Simulator,
    gw: Gateway,
    token: String,
}

async fn setup() -> Setup {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    // All test clients share 127.0.0.1: no per-address connection cap here (tests/flood.rs has it).
    cfg.extra = "limits:\n  body_timeout: 1s\n  max_connections_per_ip: 0\nrate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0\n".into();
    // A route with a large body limit for the million-message case.
    cfg.routes += "  - path: /bulk\n    kind: chat\n    upstream: main\n    model: m\n    max_body_bytes: 33554432\n";
    let gw = Gateway::start(cfg);
    gw.add_user("alice", "alice-pw");
    let token = login(&gw, "alice", "alice-pw").await;
    Setup {
        _redis: redis,
        _sim: sim,
        gw,
        token,
    }
}

/// A raw request with `Connection: close`; `head` holds extra header lines.
fn request(path: &str, head: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn bearer(s: &Setup) -> String {
    format!("Authorization: Bearer {}\r\n", s.token)
}

/// Sends a raw request and checks the status and the `errorMessage` prefix.
fn expect(s: &Setup, what: &str, raw: &[u8], status: u16, message: &str) {
    let (resp, _) = raw_exchange(s.gw.port, raw, Duration::from_secs(10));
    assert_eq!(
        raw_status(&resp),
        Some(status),
        "{what}: {}",
        String::from_utf8_lossy(&resp)
    );
    let body = raw_body(&resp);
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
    assert!(error_message(&v).starts_with(message), "{what}: {body}");
}

#[tokio::test]
async fn hostile_bodies_and_framing_get_contract_errors_or_clean_closes() {
    let mut s = setup().await;
    let rss_before = s.gw.rss_kib();
    let port = s.gw.port;
    let auth = bearer(&s);

    // Invalid UTF-8 and a raw NUL inside JSON strings.
    expect(
        &s,
        "invalid utf-8",
        &request(
            "/chatCompletion",
            &auth,
            b"[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]",
        ),
        400,
        "Invalid request: ",
    );
    expect(
        &s,
        "raw NUL",
        &request(
            "/chatCompletion",
            &auth,
            b"[{\"role\":\"user\",\"content\":\"a\x00b\"}]",
        ),
        400,
        "Invalid request: ",
    );
    expect(
        &s,
        "NUL in auth",
        &request(
            "/auth",
            "Content-Type: application/x-www-form-urlencoded\r\n",
            b"username=al%00ice&password=x\x00",
        ),
        401,
        "Authentication failed: cannot authenticate",
    );
    // An escaped NUL is a valid JSON string and is passed on.
    let (resp, _) = raw_exchange(
        port,
        &request(
            "/chatCompletion",
            &auth,
            br#"[{"role":"user","content":"a\u0000b"}]"#,
        ),
        Duration::from_secs(10),
    );
    assert_eq!(
        raw_status(&resp),
        Some(200),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(raw_body(&resp), r#"{"message": "a\u0000b"}"#);

    // Depth bomb: nesting far past serde_json's recursion limit.
    let bomb = "[".repeat(200_000);
    expect(
        &s,
        "depth bomb",
        &request("/chatCompletion", &auth, bomb.as_bytes()),
        400,
        "Invalid request: ",
    );
    let object_bomb = "{\"a\":".repeat(12_000); // under the 64 KiB /auth limit
    expect(
        &s,
        "object bomb",
        &request(
            "/auth",
            "Content-Type: application/json\r\n",
            object_bomb.as_bytes(),
        ),
        401,
        MISSING,
    );

    // A million tiny messages within the route's size limit: parsed, forwarded, answered.
    let mut million = String::with_capacity(30 << 20);
    million.push('[');
    for i in 0..1_000_000 {
        if i > 0 {
            million.push(',');
        }
        million.push_str(r#"{"role":"user","content":""}"#);
    }
    million.push(']');
    // The rewritten body (~30 MB) is over the simulator's 16 MiB limit, so the
    // upstream refuses it: the client gets the contract's 500, the gateway is unhurt.
    expect(
        &s,
        "million messages",
        &request("/bulk", &auth, million.as_bytes()),
        500,
        "Failed with chatbot.ChatCompletion: upstream",
    );
    drop(million);
    // The same shape over the default 1 MiB limit of the seed route: 413 before reading.
    let big = format!(
        "[{}]",
        vec![r#"{"role":"user","content":""}"#; 40_000].join(",")
    );
    expect(
        &s,
        "too many for 1 MiB",
        &request("/chatCompletion", &auth, big.as_bytes()),
        413,
        "Invalid request: body exceeds 1048576 bytes",
    );

    // Duplicate keys: the message parser refuses them; /auth JSON takes the last.
    expect(
        &s,
        "duplicate keys",
        &request(
            "/chatCompletion",
            &auth,
            br#"[{"role":"user","role":"system","content":"x"}]"#,
        ),
        400,
        "Invalid request: ",
    );
    let (resp, _) = raw_exchange(
        port,
        &request(
            "/auth",
            "Content-Type: application/json\r\n",
            br#"{"username":"alice","username":"bob","password":"alice-pw"}"#,
        ),
        Duration::from_secs(10),
    );
    // In a JSON object the last duplicate wins (as in Go's encoding/json): "bob", unknown.
    assert_eq!(
        raw_status(&resp),
        Some(401),
        "{}",
        String::from_utf8_lossy(&resp)
    );

    // Body longer than declared: only the declared bytes are read; the rest is never
    // taken as a second request.
    let mut longer = request("/chatCompletion", &auth, b"[{\"role\"");
    longer.extend_from_slice(b":\"user\",\"content\":\"x\"}]GET /auth HTTP/1.1\r\n\r\n");
    let (resp, _) = raw_exchange(port, &longer, Duration::from_secs(10));
    assert_eq!(raw_status(&resp), Some(400));
    assert_eq!(
        String::from_utf8_lossy(&resp).matches("HTTP/1.1 ").count(),
        1
    );

    // Chunked body that never ends, and a body that stops: 408 after body_timeout, then
    // the close (issue 17: they used to be closed without an answer).
    for (what, raw) in [
        ("endless chunked", format!("POST /chatCompletion HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n5\r\n[{{\"ro\r\n").into_bytes()),
        ("short body", b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nusername=".to_vec()),
    ] {
        let started = Instant::now();
        let (resp, closed) = raw_exchange(port, &raw, Duration::from_secs(5));
        assert!(closed, "{what}: connection left open");
        assert_eq!(raw_status(&resp), Some(408), "{what}: {}", String::from_utf8_lossy(&resp));
        assert_eq!(
            raw_body(&resp),
            r#"{"errorMessage": "Invalid request: body not received in time"}"#,
            "{what}"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "{what}: {:?}", started.elapsed());
    }
    // A chunk size that is no hex number: 400 with the contract's JSON, then the close.
    for (path, head) in [("/chatCompletion", auth.as_str()), ("/auth", "")] {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{head}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        );
        let (resp, closed) = raw_exchange(port, raw.as_bytes(), Duration::from_secs(5));
        assert!(closed, "{path}: bad chunk size: connection left open");
        assert_eq!(
            raw_status(&resp),
            Some(400),
            "{path}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_eq!(
            raw_body(&resp),
            r#"{"errorMessage": "Invalid request: malformed chunked body"}"#
        );
    }
    // Two Authorization headers: refused, whichever of them is valid.
    expect(
        &s,
        "two Authorization headers",
        &request(
            "/chatCompletion",
            &format!("{auth}Authorization: Bearer x\r\n"),
            br#"[{"role":"user","content":"x"}]"#,
        ),
        400,
        "Invalid request: more than one Authorization header",
    );
    let mut drip = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    drip.write_all(b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n").expect("head");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(5) {
        if drip.write_all(b"a").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed || read_until_close(&mut drip, Duration::from_secs(1)).1,
        "slow-drip body not cut off"
    );

    // Content types: wrong and missing on /auth count as no body; chat ignores them.
    expect(
        &s,
        "wrong type",
        &request(
            "/auth",
            "Content-Type: text/plain\r\n",
            b"username=alice&password=alice-pw",
        ),
        401,
        MISSING,
    );
    expect(
        &s,
        "no type",
        &request("/auth", "", b"username=alice&password=alice-pw"),
        401,
        MISSING,
    );
    let (resp, _) = raw_exchange(
        port,
        &request(
            "/chatCompletion",
            &format!("{auth}Content-Type: image/png\r\n"),
            br#"[{"role":"user","content":"hi"}]"#,
        ),
        Duration::from_secs(10),
    );
    assert_eq!(raw_status(&resp), Some(200));

    // A value too long to be a credential is present but cannot authenticate, in every
    // form alike (issue 17; multipart used to call it missing), and no boundary at all.
    for len in [8192, 60_000] {
        let long = "a".repeat(len);
        let multipart = format!("--B\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n{long}\r\n--B\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nx\r\n--B--\r\n");
        let urlencoded = format!("username={long}&password=x");
        let json = format!(r#"{{"username": "{long}", "password": "x"}}"#);
        for (content_type, body) in [
            ("multipart/form-data; boundary=B", multipart),
            ("application/x-www-form-urlencoded", urlencoded),
            ("application/json", json),
        ] {
            expect(
                &s,
                &format!("{len}-byte username as {content_type}"),
                &request(
                    "/auth",
                    &format!("Content-Type: {content_type}\r\n"),
                    body.as_bytes(),
                ),
                401,
                "Authentication failed: cannot authenticate",
            );
        }
    }
    let over = "a".repeat(70_000);
    expect(
        &s,
        "over auth limit",
        &request(
            "/auth",
            "Content-Type: multipart/form-data; boundary=B\r\n",
            over.as_bytes(),
        ),
        413,
        "Invalid request: body exceeds 65536 bytes",
    );
    expect(
        &s,
        "no boundary",
        &request(
            "/auth",
            "Content-Type: multipart/form-data\r\n",
            b"--B\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nalice\r\n--B--\r\n",
        ),
        401,
        MISSING,
    );

    // A 100 KB header reaches our code; thousands of headers are refused by Pingora's
    // parser, before any hook: chatgate turns that reply into the contract's JSON.
    let big_header = format!("X-Big: {}\r\n", "b".repeat(100_000));
    expect(
        &s,
        "100 KB header",
        &request("/auth", &big_header, b""),
        401,
        MISSING,
    );
    let many: String = (0..3000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let before = s.gw.metrics().await;
    let malformed: [(&str, Vec<u8>); 4] = [
        ("3000 headers", request("/auth", &many, b"")),
        (
            "bad request line",
            b"POST /auth HTTP/9\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "bad Content-Length",
            b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
        ),
        (
            "two Content-Lengths",
            b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
        ),
    ];
    for (what, raw) in &malformed {
        let (resp, closed) = raw_exchange(port, raw, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(raw_status(&resp), Some(400), "{what}: {text}");
        assert!(closed, "{what}: connection left open");
        assert_eq!(
            raw_body(&resp),
            r#"{"errorMessage": "Invalid request: malformed HTTP request"}"#,
            "{what}: {text}"
        );
        assert!(
            text.to_ascii_lowercase().contains("\r\nx-request-id: "),
            "{what}: {text}"
        );
    }
    let counted = |m: &Metrics| {
        m.sum(
            "chatgate_requests_total",
            &[("route", "unparsed"), ("status", "400")],
        )
    };
    let after = poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || s.gw.metrics(),
        |m| counted(m) - counted(&before) >= malformed.len() as f64,
    )
    .await;
    assert_eq!(counted(&after) - counted(&before), malformed.len() as f64);

    // Requests that close mid-body.
    for _ in 0..20 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = c.write_all(&request("/chatCompletion", &auth, &[b'['; 1000])[..300]);
    }

    // Slow header drips and idle connections, held open while real traffic goes on.
    let mut held = Vec::new();
    for i in 0..300 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if i % 2 == 0 {
            let _ = c.write_all(b"POST /auth HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        }
        held.push(c);
    }
    for round in 0..5 {
        for c in held.iter_mut().step_by(2) {
            let _ = c.write_all(b"z");
        }
        let resp = client()
            .post(s.gw.url("/chatCompletion"))
            .header("authorization", format!("Bearer {}", s.token))
            .body(r#"[{"role":"user","content":"still here"}]"#)
            .send()
            .await
            .expect("chat while held");
        assert_eq!(resp.status(), 200, "round {round}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.gw.is_running(), "gateway died:\n{}", s.gw.log());
    assert_eq!(
        login(&s.gw, "alice", "alice-pw").await.split('.').count(),
        3
    );
    let rss_after = s.gw.rss_kib();
    eprintln!("gateway RSS: {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 128 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[tokio::test]
async fn security_headers_on_auth_and_json_replies() {
    let s = setup().await;
    let c = client();
    let replies = vec![
        (
            "auth ok",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "alice"), ("password", "alice-pw")]),
            true,
        ),
        (
            "auth wrong",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "alice"), ("password", "no")]),
            true,
        ),
        ("auth missing", c.post(s.gw.url("/auth")), true),
        ("auth get", c.get(s.gw.url("/auth")), true),
        (
            "chat ok",
            c.post(s.gw.url("/chatCompletion"))
                .bearer_auth(&s.token)
                .body(r#"[{"role":"user","content":"x"}]"#),
            false,
        ),
        (
            "chat 401",
            c.post(s.gw.url("/chatCompletion")).body("[]"),
            false,
        ),
        (
            "chat 400",
            c.post(s.gw.url("/chatCompletion"))
                .bearer_auth(&s.token)
                .body("{}"),
            false,
        ),
        ("404", c.get(s.gw.url("/nope")), false),
    ];
    for (what, req, is_auth) in replies {
        let resp = req.send().await.expect(what);
        let h = resp.headers();
        assert_eq!(
            h.get("x-content-type-options").map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{what}"
        );
        if is_auth {
            assert_eq!(
                h.get("cache-control").map(|v| v.as_bytes()),
                Some(&b"no-store"[..]),
                "{what}"
            );
        }
        json_reply(resp).await;
    }
}

#[tokio::test]
async fn a_full_session_logs_no_secret() {
    const API_KEY: &str = "sk-test-VERYSECRETAPIKEY0123456789";
    const PASSWORD: &str = "pw-Sup3rSecretPassword!";
    let redis = Redis::start();
    let sim = Simulator::start(&["--require-key", API_KEY]);
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.upstreams = upstream_block("main", &[sim.addr()], "    api_keys_env: TEST_API_KEYS\n");
    cfg.env = vec![
        ("TEST_API_KEYS".into(), API_KEY.into()),
        ("RUST_LOG".into(), "debug".into()),
    ];
    cfg.extra = "rate_limits:\n  auth:\n    failures_per_username: 2\n".into();
    let gw = Gateway::start(cfg);
    gw.add_user("alice", PASSWORD);
    let c = client();
    let token = login(&gw, "alice", PASSWORD).await;
    for path in ["/chatCompletion", "/chatCompletionStream"] {
        let resp = c
            .post(gw.url(path))
            .bearer_auth(&token)
            .body(r#"[{"role":"user","content":"hello"}]"#)
            .send()
            .await
            .expect("chat");
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
    }
    // Wrong password, lockout, bad tokens, a revoked token, a password sent as JSON.
    for _ in 0..3 {
        let _ = c
            .post(gw.url("/auth"))
            .form(&[("username", "alice"), ("password", "wrong-Sup3rSecret")])
            .send()
            .await;
    }
    let _ = c
        .post(gw.url("/auth"))
        .json(&serde_json::json!({"username": "bob", "password": PASSWORD}))
        .send()
        .await;
    let _ = c
        .post(gw.url("/chatCompletion"))
        .bearer_auth(format!("{token}x"))
        .body("[]")
        .send()
        .await;
    assert!(gw.users(&["revoke", "alice"], None).status.success());
    let _ = c
        .post(gw.url("/chatCompletion"))
        .bearer_auth(&token)
        .body("[]")
        .send()
        .await;
    // One access line per request above (1 login, 2 chats, 4 logins, 2 chats).
    let logged = || {
        let access = gw
            .log()
            .lines()
            .filter(|l| l.contains("\"access\""))
            .count();
        std::future::ready(access >= 9)
    };
    eventually(Duration::from_secs(5), logged).await;

    let log = gw.log();
    assert!(log.lines().count() > 10, "too few log lines:\n{log}");
    let signature = token.rsplit('.').next().unwrap_or("");
    for (name, secret) in [
        ("password", PASSWORD),
        ("wrong password", "wrong-Sup3rSecret"),
        ("token", token.as_str()),
        ("token signature", signature),
        ("API key", API_KEY),
        ("JWT secret", JWT_SECRET),
    ] {
        for line in log.lines() {
            assert!(!line.contains(secret), "{name} in log line: {line}");
        }
    }
}

/// The operations listener answers only GET, like the public one: other methods get 405
/// with `Allow` and the contract's JSON (issue 17: `POST /metrics` used to be a 200).
#[tokio::test]
async fn admin_endpoints_refuse_other_methods() {
    let s = setup().await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        for method in [
            reqwest::Method::POST,
            reqwest::Method::PUT,
            reqwest::Method::DELETE,
        ] {
            let resp = client()
                .request(method.clone(), s.gw.admin_url(path))
                .send()
                .await
                .expect("admin");
            assert_eq!(
                resp.headers().get("allow").map(|v| v.as_bytes()),
                Some(&b"GET"[..]),
                "{method} {path}"
            );
            assert_eq!(resp.status(), 405, "{method} {path}");
            let body = resp.text().await.expect("body");
            assert_eq!(body, r#"{"errorMessage": "Method not allowed"}"#);
        }
        let resp = client()
            .get(s.gw.admin_url(path))
            .send()
            .await
            .expect("admin");
        assert_eq!(resp.status(), 200, "GET {path}");
    }
}
