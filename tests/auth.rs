//! `/auth` and the token check on chat routes, end to end: real gateway,
//! real redis-server, simulator upstream. Every row of docs/api.md's auth and
//! token tables, each input form, the users CLI, and Redis outages.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const MISSING: &str = "Authentication failed: cannot find username/password in request body.";
const REJECTED: &str =
    "Authentication failed: cannot authenticate with provided username and password.";
const NO_BEARER: &str = "Invalid token: empty or not starts with 'Bearer '";
const FAKE: &str = "Invalid token: expired or fake token.";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64json(part: &str) -> serde_json::Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

/// (header, claims) of a JWT, unverified.
fn decode(token: &str) -> (serde_json::Value, serde_json::Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {token}");
    (b64json(parts[0]), b64json(parts[1]))
}

struct Setup {
    redis: Redis,
    _sim: Simulator,
    gw: Gateway,
}

fn setup_with(tweak: impl FnOnce(&mut GatewayConfig)) -> Setup {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    tweak(&mut cfg);
    let gw = Gateway::start(cfg);
    gw.add_user("temporary_user", "default_password");
    Setup {
        redis,
        _sim: sim,
        gw,
    }
}

fn setup() -> Setup {
    setup_with(|_| {})
}

async fn chat_with_auth(gw: &Gateway, authorization: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = client()
        .post(gw.url("/chatCompletion"))
        .header("content-type", "application/json")
        .body(r#"[{"role":"user","Content":"What is your name."}]"#);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    json_reply(req.send().await.expect("chat")).await
}

#[tokio::test]
async fn every_input_form_logs_in() {
    let s = setup();
    let c = client();
    let form = reqwest::multipart::Form::new()
        .text("username", "temporary_user")
        .text("password", "default_password");
    let forms = vec![
        ("multipart", c.post(s.gw.url("/auth")).multipart(form)),
        (
            "urlencoded",
            c.post(s.gw.url("/auth")).form(&[
                ("username", "temporary_user"),
                ("password", "default_password"),
            ]),
        ),
        (
            "json",
            c.post(s.gw.url("/auth"))
                .json(&json!({"username": "temporary_user", "password": "default_password"})),
        ),
        (
            "query",
            c.post(s.gw.url("/auth?username=temporary_user&password=default_password")),
        ),
        (
            "body and query mixed",
            c.post(s.gw.url("/auth?password=default_password"))
                .form(&[("username", "temporary_user")]),
        ),
    ];
    for (name, req) in forms {
        let resp = req.send().await.expect("auth");
        assert_eq!(
            resp.headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap_or("")),
            Some("no-store")
        );
        let (status, body) = json_reply(resp).await;
        assert_eq!(status, 200, "{name}: {body}");
        let token = body["accessToken"].as_str().expect("accessToken");
        let (header, claims) = decode(token);
        assert_eq!(header["alg"], "HS256", "{name}");
        assert!(
            header["kid"].as_str().is_some_and(|k| !k.is_empty()),
            "{name}: kid"
        );
        assert_eq!(claims["sub"], "temporary_user");
        assert_eq!(claims["identity"], 1);
        let iat = claims["iat"].as_u64().expect("iat");
        assert_eq!(claims["nbf"].as_u64(), Some(iat));
        assert_eq!(claims["exp"].as_u64(), Some(iat + 7 * 86400));
        assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16));
        assert!(iat.abs_diff(now()) < 60);
    }
}

#[tokio::test]
async fn missing_and_wrong_credentials_get_the_contract_errors() {
    let s = setup();
    let c = client();
    let cases = vec![
        ("no body", c.post(s.gw.url("/auth")), MISSING),
        (
            "only username",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "temporary_user")]),
            MISSING,
        ),
        (
            "empty password",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "temporary_user"), ("password", "")]),
            MISSING,
        ),
        (
            "unparseable json",
            c.post(s.gw.url("/auth"))
                .header("content-type", "application/json")
                .body("{nope"),
            MISSING,
        ),
        (
            "multipart without boundary",
            c.post(s.gw.url("/auth"))
                .header("content-type", "multipart/form-data")
                .body("garbage"),
            MISSING,
        ),
        (
            "wrong password",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "temporary_user"), ("password", "nope")]),
            REJECTED,
        ),
        (
            "unknown user",
            c.post(s.gw.url("/auth"))
                .form(&[("username", "nobody"), ("password", "default_password")]),
            REJECTED,
        ),
    ];
    for (name, req, expected) in cases {
        let (status, body) = json_reply(req.send().await.expect("auth")).await;
        assert_eq!((status, error_message(&body)), (401, expected), "{name}");
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "{name}: extra fields {body}"
        );
    }
}

#[tokio::test]
async fn unknown_paths_wrong_methods_and_request_ids() {
    let s = setup();
    let c = client();
    let (status, body) = json_reply(c.get(s.gw.url("/nope")).send().await.expect("404")).await;
    assert_eq!((status, error_message(&body)), (404, "Not found"));
    for path in ["/auth", "/chatCompletion", "/chatCompletionStream"] {
        let resp = c.get(s.gw.url(path)).send().await.expect("405");
        assert_eq!(
            resp.headers()
                .get("allow")
                .map(|v| v.to_str().unwrap_or("")),
            Some("POST"),
            "{path}"
        );
        let (status, body) = json_reply(resp).await;
        assert_eq!(
            (status, error_message(&body)),
            (405, "Method not allowed"),
            "{path}"
        );
    }
    let resp = c
        .post(s.gw.url("/auth"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .expect("auth");
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap_or("")),
        Some("client-id-42")
    );
    let resp = c
        .post(s.gw.url("/auth"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .expect("auth");
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(!id.is_empty() && id != "bad id with spaces");
    assert!(
        s.gw.log().contains("client-id-42"),
        "request id missing from the access log"
    );
}

#[tokio::test]
async fn token_table_rows() {
    let s = setup();
    let token = login(&s.gw, "temporary_user", "default_password").await;
    let (header, claims) = decode(&token);
    let kid = header["kid"].as_str().expect("kid").to_string();
    let t = now();

    // Accepted: the token, also with a lowercase scheme.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (status, body) = chat_with_auth(&s.gw, Some(&format!("{scheme} {token}"))).await;
        assert_eq!(status, 200, "{scheme}: {body}");
        assert!(body["message"].as_str().is_some());
    }

    // Missing or not Bearer.
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some(token.as_str()),
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearertoken"),
    ] {
        let (status, body) = chat_with_auth(&s.gw, auth).await;
        assert_eq!((status, error_message(&body)), (401, NO_BEARER), "{auth:?}");
    }

    // Forged, malformed, wrong alg, expired, not yet valid, wrong kid.
    let secret = JWT_SECRET.as_bytes();
    let sign = |alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value, key: &[u8]| {
        let mut h = Header::new(alg);
        h.kid = kid.map(String::from);
        encode(&h, claims, &EncodingKey::from_secret(key)).expect("sign")
    };
    let with = |patch: serde_json::Value| {
        let mut c = claims.clone();
        for (k, v) in patch.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    };
    let none_token = format!(
        "{}.{}.",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        token.split('.').nth(1).unwrap_or("")
    );
    let mut tampered_parts: Vec<String> = token.split('.').map(String::from).collect();
    tampered_parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&with(json!({"identity": 2}))).expect("json"));
    let forged = vec![
        ("garbage", "not.a.jwt".to_string()),
        ("alg none", none_token),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, Some(&kid), &claims, secret),
        ),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                Some(&kid),
                &claims,
                b"another-secret-that-is-long-enough-0123456789",
            ),
        ),
        (
            "unknown kid",
            sign(Algorithm::HS256, Some("0123456789abcdef"), &claims, secret),
        ),
        ("no kid", sign(Algorithm::HS256, None, &claims, secret)),
        (
            "expired",
            sign(
                Algorithm::HS256,
                Some(&kid),
                // Past the default 60 s clock-skew leeway.
                &with(json!({"iat": t - 200, "nbf": t - 200, "exp": t - 120})),
                secret,
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::HS256,
                Some(&kid),
                &with(json!({"nbf": t + 3600})),
                secret,
            ),
        ),
        (
            "issued beyond the clock skew",
            sign(
                Algorithm::HS256,
                Some(&kid),
                &with(json!({"iat": t + 120, "nbf": t})),
                secret,
            ),
        ),
        ("tampered payload", tampered_parts.join(".")),
    ];
    for (name, bad) in forged {
        let (status, body) = chat_with_auth(&s.gw, Some(&format!("Bearer {bad}"))).await;
        assert_eq!((status, error_message(&body)), (401, FAKE), "{name}");
    }
    // A correctly signed token with our kid and fresh claims is accepted: the
    // rejections above are about the defects, not about hand-made tokens.
    let remade = sign(
        Algorithm::HS256,
        Some(&kid),
        &with(json!({"jti": "hand-made"})),
        secret,
    );
    assert_eq!(
        chat_with_auth(&s.gw, Some(&format!("Bearer {remade}")))
            .await
            .0,
        200
    );
    // Clock skew between instances: minted by a neighbour whose clock runs 30 s ahead,
    // or expired 30 s ago by this one's clock, the token still works.
    for (name, patch) in [
        ("minted ahead", json!({"iat": t + 30, "nbf": t + 30})),
        // Only `exp` moves: an `iat` before the user was created would be revoked.
        ("expired within the skew", json!({"exp": t - 30})),
    ] {
        let skewed = sign(Algorithm::HS256, Some(&kid), &with(patch), secret);
        let (status, body) = chat_with_auth(&s.gw, Some(&format!("Bearer {skewed}"))).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
}

#[tokio::test]
async fn users_cli_round_trip_and_disabled_users() {
    let s = setup_with(|c| c.auth_extra = "  user_cache_ttl: 200ms\n".into());
    let gw = &s.gw;
    // Duplicate and empty password are refused.
    let out = gw.users(&["add", "temporary_user"], Some("x"));
    assert!(!out.status.success());
    let out = gw.users(&["add", "alice"], Some(""));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty password"));
    let out = gw.users(&["add", "alice"], Some("alice-pw\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let token = login(gw, "alice", "alice-pw").await;
    let list = String::from_utf8_lossy(&gw.users(&["list"], None).stdout).to_string();
    assert!(
        list.contains("alice") && list.contains("temporary_user") && list.contains("enabled"),
        "{list}"
    );

    // Disabled: login refused, existing token refused after the cache bound.
    assert!(gw.users(&["disable", "alice"], None).status.success());
    let (status, body) = json_reply(
        client()
            .post(gw.url("/auth"))
            .form(&[("username", "alice"), ("password", "alice-pw")])
            .send()
            .await
            .expect("auth"),
    )
    .await;
    assert_eq!((status, error_message(&body)), (401, REJECTED));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = chat_with_auth(gw, Some(&format!("Bearer {token}"))).await;
    assert_eq!((status, error_message(&body)), (401, FAKE));
    assert!(String::from_utf8_lossy(&gw.users(&["list"], None).stdout).contains("disabled"));

    // Enabled again: login works, but `disable` revoked the tokens issued before it
    // (issue 5), so the old token stays dead and only a new one works.
    assert!(gw.users(&["enable", "alice"], None).status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        chat_with_auth(gw, Some(&format!("Bearer {token}"))).await.0,
        401
    );
    let token = login(gw, "alice", "alice-pw").await;
    assert_eq!(
        chat_with_auth(gw, Some(&format!("Bearer {token}"))).await.0,
        200
    );

    // Password change: old password fails, new one works.
    assert!(gw
        .users(&["passwd", "alice"], Some("new-pw"))
        .status
        .success());
    let resp = client()
        .post(gw.url("/auth"))
        .form(&[("username", "alice"), ("password", "alice-pw")])
        .send()
        .await
        .expect("auth");
    assert_eq!(resp.status(), 401);
    login(gw, "alice", "new-pw").await;

    // Removed: login and token both refused.
    assert!(gw.users(&["remove", "alice"], None).status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = client()
        .post(gw.url("/auth"))
        .form(&[("username", "alice"), ("password", "new-pw")])
        .send()
        .await
        .expect("auth");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        chat_with_auth(gw, Some(&format!("Bearer {token}"))).await.0,
        401
    );
    assert!(
        !gw.users(&["disable", "alice"], None).status.success(),
        "unknown user must fail"
    );
}

#[tokio::test]
async fn bcrypt_users_are_migrated_to_argon2id() {
    let s = setup();
    let hash = bcrypt::hash("legacy-pw", 4).expect("bcrypt");
    s.redis.cli(&[
        "HSET",
        "cg:user:{legacy}",
        "id",
        "77",
        "password_hash",
        &hash,
        "disabled",
        "0",
        "created_at",
        "0",
    ]);
    s.redis.cli(&["SADD", "cg:users", "legacy"]);
    let token = login(&s.gw, "legacy", "legacy-pw").await;
    assert_eq!(decode(&token).1["identity"], 77);
    let stored = s.redis.cli(&["HGET", "cg:user:{legacy}", "password_hash"]);
    assert!(stored.starts_with("$argon2id$"), "not re-hashed: {stored}");
    login(&s.gw, "legacy", "legacy-pw").await;
}

#[tokio::test]
async fn secret_rotation_keeps_old_tokens_valid() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let old = Gateway::start(GatewayConfig::redis(&redis, &[sim.addr()]));
    old.add_user("temporary_user", "default_password");
    let token = login(&old, "temporary_user", "default_password").await;

    let new_secret = "rotated-secret-abcdefghijklmnopqrstuvwxyz-0123456789";
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.env = vec![
        ("CHATGATE_JWT_SECRET".into(), new_secret.into()),
        ("CHATGATE_JWT_PREVIOUS_SECRETS".into(), JWT_SECRET.into()),
    ];
    let rotated = Gateway::start(cfg);
    assert_eq!(
        chat_with_auth(&rotated, Some(&format!("Bearer {token}")))
            .await
            .0,
        200
    );
    let fresh = login(&rotated, "temporary_user", "default_password").await;
    assert_ne!(decode(&fresh).0["kid"], decode(&token).0["kid"]);

    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.env = vec![("CHATGATE_JWT_SECRET".into(), new_secret.into())];
    let dropped = Gateway::start(cfg);
    let (status, body) = chat_with_auth(&dropped, Some(&format!("Bearer {token}"))).await;
    assert_eq!((status, error_message(&body)), (401, FAKE));
    assert_eq!(
        chat_with_auth(&dropped, Some(&format!("Bearer {fresh}")))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn redis_outage_answers_503_quickly_and_recovers() {
    let mut s = setup();
    login(&s.gw, "temporary_user", "default_password").await;
    s.redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let resp = client()
            .post(s.gw.url("/auth"))
            .form(&[
                ("username", "temporary_user"),
                ("password", "default_password"),
            ])
            .send()
            .await
            .expect("auth");
        let elapsed = started.elapsed();
        let (status, body) = json_reply(resp).await;
        assert_eq!(
            (status, error_message(&body)),
            (503, "Service unavailable: credential store unreachable.")
        );
        assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
    }
    let ready = client()
        .get(s.gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    assert!(ready
        .text()
        .await
        .unwrap_or_default()
        .contains("credential store unreachable"));
    s.redis.restart();
    s.gw.add_user("temporary_user", "default_password");
    let login_status = || async {
        client()
            .post(s.gw.url("/auth"))
            .form(&[
                ("username", "temporary_user"),
                ("password", "default_password"),
            ])
            .send()
            .await
            .expect("auth")
            .status()
    };
    let status = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        login_status,
        |status| *status == 200,
    )
    .await;
    assert_eq!(status, 200, "login did not recover after Redis came back");
    let ready = client()
        .get(s.gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    assert!(s.gw.is_running());
}

#[tokio::test]
async fn file_backend_sees_cli_changes_without_restart() {
    let sim = Simulator::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.yaml");
    let cfg = GatewayConfig {
        credentials: format!("    backend: file\n    file: {}\n", users.display()),
        upstreams: upstream_block("main", &[sim.addr()], ""),
        routes: seed_routes("main"),
        auth_extra: String::new(),
        extra: String::new(),
        env: Vec::new(),
    };
    let gw = Gateway::start(cfg);
    let resp = client()
        .post(gw.url("/auth"))
        .form(&[("username", "bob"), ("password", "bob-pw")])
        .send()
        .await
        .expect("auth");
    assert_eq!(resp.status(), 401);
    gw.add_user("bob", "bob-pw");
    let token = login(&gw, "bob", "bob-pw").await;
    assert_eq!(
        chat_with_auth(&gw, Some(&format!("Bearer {token}")))
            .await
            .0,
        200
    );
    let text = std::fs::read_to_string(&users).expect("users file");
    assert!(text.contains("$argon2id$") && !text.contains("bob-pw"));
}

/// A config for `chatgate check` alone: Redis at `redis_url`, nothing started.
fn check_only_config(redis_url: &str) -> GatewayConfig {
    GatewayConfig {
        credentials: format!("    backend: redis\n    redis:\n      url: \"{redis_url}\"\n"),
        upstreams: upstream_block("main", &["127.0.0.1:9".to_string()], ""),
        routes: seed_routes("main"),
        auth_extra: String::new(),
        extra: String::new(),
        env: Vec::new(),
    }
}

#[test]
fn check_reports_config_errors_with_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        1,
        2,
        &check_only_config("redis://127.0.0.1:1/0"),
    );
    let good = std::fs::read_to_string(&path).expect("config");
    let run = |text: &str, secret: &str| {
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(chatgate_bin())
            .args(["check", "--config"])
            .arg(&path)
            .env("CHATGATE_JWT_SECRET", secret)
            .output()
            .expect("check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, _) = run(&good, JWT_SECRET);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("route POST /chatCompletion (chat) -> main"),
        "{stdout}"
    );
    assert!(stdout.contains("credentials: redis"), "{stdout}");

    let file = path.display().to_string();
    let unknown = good.replace("  token_ttl: 7d\n", "  token_ttl: 7d\n  tokenttl: 8d\n");
    let (code, _, err) = run(&unknown, JWT_SECRET);
    assert_eq!(code, Some(1));
    let line = unknown
        .lines()
        .position(|l| l.contains("tokenttl"))
        .map_or(0, |i| i + 1);
    assert!(
        err.contains(&format!("{file}:{line}:")) && err.contains("tokenttl"),
        "{err}"
    );

    let bad_duration = good.replace("token_ttl: 7d", "token_ttl: 7 parsecs");
    let (code, _, err) = run(&bad_duration, JWT_SECRET);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&file) && err.contains("token_ttl") && err.contains("invalid duration"),
        "{err}"
    );

    let (code, _, err) = run(&good, "short-secret");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("at least 32") && !err.contains("short-secret"),
        "{err}"
    );

    // serve refuses to start for the same reason, before binding anything.
    let out = std::process::Command::new(chatgate_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("CHATGATE_JWT_SECRET", "short-secret")
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"));
}

#[test]
fn check_never_prints_a_redis_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let urls = [
        "redis://S3cretPw9@127.0.0.1:1/0",
        "redis://user:S3cretPw9@127.0.0.1:1/0",
        "redis://:S3cretPw9@127.0.0.1:1/0",
        "redis://127.0.0.1:1/0?password=S3cretPw9",
        "redis://user:S3cr/etPw9@127.0.0.1:1/0",
        "redis://user:S3cr@etPw9@127.0.0.1:1/0",
        // Not a redis:// URL: the error names it, masked.
        "http://user:S3cretPw9@127.0.0.1:1/0",
    ];
    for url in urls {
        let path = write_config(dir.path(), 1, 2, &check_only_config(url));
        let out = std::process::Command::new(chatgate_bin())
            .args(["check", "--config"])
            .arg(&path)
            .env("CHATGATE_JWT_SECRET", JWT_SECRET)
            .output()
            .expect("check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("127.0.0.1:1"), "{url}: {text}");
        for piece in ["S3cr", "etPw9"] {
            assert!(!text.contains(piece), "{url} printed {piece}: {text}");
        }
    }
}

#[tokio::test]
async fn on_store_error_decides_for_tokens_of_users_not_cached() {
    let mut s = setup();
    let token = login(&s.gw, "temporary_user", "default_password").await;
    // Neighbours on the same Redis that have never seen the user: nothing cached.
    let start = |mode: &str| {
        let mut cfg = GatewayConfig::redis(&s.redis, &[s._sim.addr()]);
        cfg.auth_extra = format!("  on_store_error: {mode}\n");
        Gateway::start(cfg)
    };
    let allow = start("allow");
    let deny = start("deny");
    s.redis.stop();
    let bearer = format!("Bearer {token}");
    let (status, body) = chat_with_auth(&allow, Some(&bearer)).await;
    assert_eq!(status, 200, "allow trusts the signature: {body}");
    let started = Instant::now();
    let (status, body) = chat_with_auth(&deny, Some(&bearer)).await;
    assert_eq!(
        (status, error_message(&body)),
        (503, "Service unavailable: credential store unreachable.")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The gateway that logged the user in knows its status and keeps serving it.
    assert_eq!(chat_with_auth(&s.gw, Some(&bearer)).await.0, 200);
    // The test Redis keeps nothing across a restart: the user comes back as a new one.
    s.redis.restart();
    s.gw.add_user("temporary_user", "default_password");
    let bearer = format!(
        "Bearer {}",
        login(&s.gw, "temporary_user", "default_password").await
    );
    let (status, body) = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || chat_with_auth(&deny, Some(&bearer)),
        |(status, _)| *status == 200,
    )
    .await;
    assert_eq!(status, 200, "deny recovers with the store: {body}");
}
