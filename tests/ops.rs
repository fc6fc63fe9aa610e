//! Operations end to end: exact metric deltas after known traffic, health and
//! readiness, the access log (every field, no secret), endpoint pools with
//! health checks and ejection, CORS, the OpenAI pass-through route (byte for
//! byte, and with the official Python SDK), and the zero-downtime upgrade.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;

const OPENAI_ROUTE: &str = "  - path: /v1/chat/completions\n    kind: openai\n    upstream: main\n    models: [test-model, other-model]\n  - path: /forced/v1/chat/completions\n    kind: openai\n    upstream: main\n    model: house-model\n";

/// The seed routes and the OpenAI routes in front of `sims`.
async fn setup_with(sims: Vec<Simulator>, upstreams: String, extra: &str) -> Stack {
    Stack::start(sims, upstreams, seed_routes("main") + OPENAI_ROUTE, extra).await
}

async fn setup() -> Stack {
    let sim = Simulator::start(&[]);
    let upstreams = upstream_block("main", &[sim.addr()], "");
    setup_with(vec![sim], upstreams, "").await
}

/// Opens a stream on a raw socket, reads until `until` shows up, then hangs up.
fn start_and_abandon_stream(s: &Stack, body: &str, until: &str) {
    let request = format!(
        "POST /chatCompletionStream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        s.token,
        body.len(),
        body
    );
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.gw.port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    sock.write_all(request.as_bytes()).expect("send");
    let mut buf = [0u8; 4096];
    let mut seen = String::new();
    while !seen.contains(until) {
        let n = sock.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early: {seen}");
        seen += &String::from_utf8_lossy(&buf[..n]);
    }
}

/// Scrapes until `ready` holds (the access-log hook runs just after a reply ends;
/// the first request to count tokens loads the tokenizer, which took over 5 s of a
/// debug build with load 10 on 2 cores).
async fn metrics_when(gw: &Gateway, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    poll(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || gw.metrics(),
        ready,
    )
    .await
}

fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let s = setup().await;
    let sim_addr = s.sims[0].addr();
    // setup() logged in once; its access-log hook may still be running.
    let m0 = metrics_when(&s.gw, |m| {
        m.sum(
            "chatgate_requests_total",
            &[("route", "/auth"), ("status", "200")],
        ) >= 1.0
    })
    .await;

    // Logins: one good, one wrong password, one without credentials.
    login(&s.gw, "temporary_user", "default_password").await;
    let bad = client()
        .post(s.gw.url("/auth"))
        .form(&[("username", "temporary_user"), ("password", "wrong")])
        .send()
        .await
        .expect("auth");
    assert_eq!(bad.status(), 401);
    let missing = client().post(s.gw.url("/auth")).send().await.expect("auth");
    assert_eq!(missing.status(), 401);

    // Two answers, one complete stream, one the upstream cuts, one the client leaves.
    for q in ["one", "two"] {
        assert_eq!(s.post("/chatCompletion", user(q)).await.status(), 200);
    }
    let full = s
        .post("/chatCompletionStream", user("#sim chunk_size=2\nabcdefgh"))
        .await
        .text()
        .await
        .expect("stream");
    assert!(full.ends_with("data: \n\n"), "{full}");
    let cut = s
        .post(
            "/chatCompletionStream",
            user("#sim chunk_size=1 cut_after=2\nabcdef"),
        )
        .await
        .text()
        .await
        .expect("stream");
    assert!(cut.contains("event: error"), "{cut}");
    start_and_abandon_stream(
        &s,
        &user("#sim chunk_size=1 chunk_delay_ms=200\nabcdefghijklmnop"),
        "data: b",
    );

    // One OpenAI-format answer whose usage the client sees too.
    let reply: serde_json::Value = s
        .post(
            "/v1/chat/completions",
            json!({"model": "test-model", "messages": [{"role": "user", "content": "count me"}]})
                .to_string(),
        )
        .await
        .json()
        .await
        .expect("openai reply");
    let prompt = reply["usage"]["prompt_tokens"].as_f64().expect("usage");
    let completion = reply["usage"]["completion_tokens"].as_f64().expect("usage");
    assert!(prompt > 0.0 && completion > 0.0, "{reply}");

    let stream_route = [("route", "/chatCompletionStream")];
    // The last request's access-log hook (which records its tokens) may run
    // just after its reply reached us: wait for it too.
    let openai_route = [("route", "/v1/chat/completions")];
    let m1 = metrics_when(&s.gw, |m| {
        m.sum("chatgate_requests_total", &stream_route) >= 3.0
            && m.sum("chatgate_active_streams", &[]) == 0.0
            && delta(&m0, m, "chatgate_requests_total", &openai_route) >= 1.0
            && delta(
                &m0,
                m,
                "chatgate_tokens_total",
                &[("route", "/v1/chat/completions"), ("kind", "completion")],
            ) >= completion
    })
    .await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&m0, &m1, name, labels);

    assert_eq!(
        d(
            "chatgate_requests_total",
            &[("route", "/auth"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "chatgate_requests_total",
            &[("route", "/auth"), ("status", "401")]
        ),
        2.0
    );
    for (outcome, n) in [
        ("ok", 1.0),
        ("bad_credentials", 1.0),
        ("missing", 1.0),
        ("rate_limited", 0.0),
        ("store_error", 0.0),
        ("busy", 0.0),
    ] {
        assert_eq!(
            d("chatgate_auth_attempts_total", &[("outcome", outcome)]),
            n,
            "auth outcome {outcome}"
        );
    }
    assert_eq!(
        d(
            "chatgate_requests_total",
            &[("route", "/chatCompletion"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        d(
            "chatgate_requests_total",
            &[("route", "/chatCompletionStream"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        d(
            "chatgate_request_duration_seconds_count",
            &[("route", "/chatCompletion")]
        ),
        2.0
    );
    // 2 answers + 3 streams + 1 OpenAI call, each one attempt that got a 2xx.
    let upstream = [("upstream", "main"), ("endpoint", sim_addr.as_str())];
    assert_eq!(d("chatgate_upstream_requests_total", &upstream), 6.0);
    assert_eq!(
        d(
            "chatgate_upstream_requests_total",
            &[("outcome", "ok"), ("endpoint", sim_addr.as_str())]
        ),
        6.0
    );
    assert_eq!(d("chatgate_upstream_retries_total", &[]), 0.0);
    assert_eq!(
        d(
            "chatgate_upstream_time_to_first_byte_seconds_count",
            &[("upstream", "main")]
        ),
        6.0
    );
    // The cut and the abandoned stream brought the gauge back down too.
    assert_eq!(m1.sum("chatgate_active_streams", &stream_route), 0.0);
    assert!(d("chatgate_stream_inter_event_seconds_count", &stream_route) >= 4.0);
    assert_eq!(
        d(
            "chatgate_tokens_total",
            &[("route", "/v1/chat/completions"), ("kind", "prompt")]
        ),
        prompt
    );
    assert_eq!(
        d(
            "chatgate_tokens_total",
            &[("route", "/v1/chat/completions"), ("kind", "completion")]
        ),
        completion
    );
    assert_eq!(
        m1.sum(
            "chatgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(m1.sum("chatgate_upstream_endpoint_up", &upstream[..]), 1.0);
    assert!(!m1.text.contains(&s.token) && !m1.text.contains("default_password"));
    assert!(!m1.text.contains("temporary_user"));
}

#[tokio::test]
async fn upstream_outcomes_and_retries_are_counted() {
    let flaky = Simulator::start(&["--fail-first", "1"]);
    let slow = Simulator::start(&["--first-byte-delay-ms", "1000"]);
    let refused = format!("127.0.0.1:{}", free_port());
    let upstreams = upstream_block("main", &[flaky.addr()], "    retries: 2\n")
        + &upstream_block("dead", std::slice::from_ref(&refused), "    retries: 2\n")
        + "  slow:\n    endpoints: [\""
        + &slow.addr()
        + "\"]\n    first_byte_timeout: 200ms\n    retries: 0\n";
    let routes = seed_routes("main")
        + "  - path: /dead\n    kind: chat\n    upstream: dead\n    model: m\n  - path: /slow\n    kind: chat\n    upstream: slow\n    model: m\n";
    let s = Stack::start(Vec::new(), upstreams, routes, "").await;
    let m0 = s.gw.metrics().await;

    // 503 once, then served: one http_5xx attempt, one retry, one ok.
    assert_eq!(s.post("/chatCompletion", user("a")).await.status(), 200);
    // A 400 from the upstream is not retried.
    assert_eq!(
        s.post("/chatCompletion", user("#sim status=400\nb"))
            .await
            .status(),
        500
    );
    // Nobody listens: three connect errors (two retries).
    assert_eq!(s.post("/dead", user("c")).await.status(), 500);
    // No response header in time, no retry.
    assert_eq!(s.post("/slow", user("d")).await.status(), 500);

    let m1 = metrics_when(&s.gw, |m| {
        m.sum("chatgate_requests_total", &[("route", "/slow")]) >= 1.0
    })
    .await;
    let d = |labels: &[(&str, &str)]| delta(&m0, &m1, "chatgate_upstream_requests_total", labels);
    let main = flaky.addr();
    assert_eq!(d(&[("endpoint", &main), ("outcome", "http_5xx")]), 1.0);
    assert_eq!(d(&[("endpoint", &main), ("outcome", "ok")]), 1.0);
    assert_eq!(d(&[("endpoint", &main), ("outcome", "http_4xx")]), 1.0);
    assert_eq!(
        d(&[("endpoint", &refused), ("outcome", "connect_error")]),
        3.0
    );
    assert_eq!(
        d(&[("upstream", "slow"), ("outcome", "timeout")]),
        1.0,
        "{}",
        m1.text
    );
    let retries = |u: &str| {
        delta(
            &m0,
            &m1,
            "chatgate_upstream_retries_total",
            &[("upstream", u)],
        )
    };
    assert_eq!(
        (retries("main"), retries("dead"), retries("slow")),
        (1.0, 2.0, 0.0)
    );
    // Three failures in a row ejected the dead endpoint (it is its upstream's only one,
    // so it would still be tried).
    assert_eq!(
        m1.sum("chatgate_upstream_endpoint_up", &[("upstream", "dead")]),
        0.0
    );
    drop((flaky, slow));
}

#[tokio::test]
async fn health_and_readiness_follow_the_store_and_the_endpoints() {
    let sim = Simulator::start(&[]);
    let port = sim.port;
    let upstreams = upstream_block(
        "main",
        &[sim.addr()],
        "    health_check: {path: /health, interval: 100ms, timeout: 500ms}\n",
    );
    let mut s = setup_with(vec![sim], upstreams, "").await;
    let get = |path: &str| {
        let url = s.gw.admin_url(path);
        async move {
            let resp = client().get(url).send().await.expect("admin");
            let status = resp.status().as_u16();
            (status, resp.text().await.expect("body"))
        }
    };
    assert_eq!(get("/healthz").await, (200, r#"{"status": "ok"}"#.into()));
    assert_eq!(get("/readyz").await, (200, r#"{"status": "ready"}"#.into()));
    assert_eq!(get("/nope").await.0, 404);

    s.redis.stop();
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("credential store unreachable"), "{body}");
    assert_eq!(get("/healthz").await.0, 200);
    s.redis.restart();

    // The only endpoint stops answering its health check: not ready.
    s.sims[0].stop();
    let wait = |want: u16| {
        poll(
            Duration::from_secs(5),
            Duration::from_millis(50),
            move || get("/readyz"),
            move |(status, _)| *status == want,
        )
    };
    let (status, body) = wait(503).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        r#"{"errorMessage": "Not ready: route /chatCompletion: no endpoint of upstream main is up"}"#
    );
    let m = s.gw.metrics().await;
    assert_eq!(m.sum("chatgate_upstream_endpoint_up", &[]), 0.0);
    s.sims[0] = Simulator::start_on(port, &[]);
    assert_eq!(wait(200).await.0, 200);
}

#[tokio::test]
async fn access_log_has_every_field_and_no_secret() {
    let api_key = "sk-upstream-secret-4d2c7e9a";
    let sim = Simulator::start(&["--require-key", api_key]);
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block(
        "main",
        &[sim.addr()],
        "    api_keys_env: CG_OPS_TEST_KEYS\n",
    );
    cfg.routes = seed_routes("main");
    cfg.env = vec![("CG_OPS_TEST_KEYS".into(), api_key.into())];
    let gw = Gateway::start(cfg);
    let password = "pa55-Secret-word-917";
    gw.add_user("log_user", password);
    let token = login(&gw, "log_user", password).await;
    let cookie = "session=cookie-secret-5531";
    for path in ["/chatCompletion", "/chatCompletionStream"] {
        let resp = client()
            .post(gw.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("cookie", cookie)
            .header("x-request-id", "req-ops-1")
            // No trusted proxies are configured: a claimed address is ignored.
            .header("x-forwarded-for", "203.0.113.9")
            .body(user("hello log"))
            .send()
            .await
            .expect("chat");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body");
    }
    // A login with the password in the query string and a bad token.
    client()
        .post(gw.url(&format!("/auth?username=log_user&password={password}")))
        .send()
        .await
        .expect("auth");
    client()
        .post(gw.url("/chatCompletion"))
        .header("authorization", format!("Bearer {token}x"))
        .body(user("x"))
        .send()
        .await
        .expect("chat");

    let access_lines = || {
        let lines: Vec<serde_json::Value> = gw
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect();
        std::future::ready(lines)
    };
    let access = poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        access_lines,
        |lines| lines.len() >= 5,
    )
    .await;
    let log = gw.log();
    for secret in [api_key, password, &token, "cookie-secret-5531"] {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
    let stream_line = access
        .iter()
        .find(|v| v["fields"]["route"] == "/chatCompletionStream")
        .unwrap_or_else(|| panic!("no access line for the stream in:\n{log}"));
    assert!(stream_line["timestamp"].is_string(), "{stream_line}");
    let f = &stream_line["fields"];
    assert_eq!(f["request_id"], "req-ops-1");
    assert_eq!(f["client_ip"], "127.0.0.1");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["status"], 200);
    assert!(f["user_id"].as_u64().is_some(), "{f}");
    assert_eq!(f["upstream_endpoint"], sim.addr().as_str());
    assert_eq!(f["attempts"], 1);
    assert!(f["bytes_in"].as_u64().unwrap_or(0) > 0, "{f}");
    assert!(f["bytes_out"].as_u64().unwrap_or(0) > 0, "{f}");
    assert!(f["duration_ms"].as_f64().is_some(), "{f}");
    assert!(f["ttfb_ms"].as_f64().is_some(), "{f}");
    assert!(f["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{f}");
    assert!(f["completion_tokens"].as_u64().unwrap_or(0) > 0, "{f}");
}

#[tokio::test]
async fn a_dead_endpoint_fails_no_request_and_gets_traffic_back() {
    let a = Simulator::start(&["--name", "a"]);
    let b = Simulator::start(&["--name", "b"]);
    let a_port = a.port;
    let upstreams = upstream_block(
        "main",
        &[a.addr(), b.addr()],
        "    retries: 2\n    health_check: {path: /health, interval: 100ms, timeout: 300ms}\n    eject_after_failures: 2\n    eject_cooldown: 500ms\n",
    );
    let mut s = setup_with(vec![a, b], upstreams, "").await;
    let url = s.gw.url("/chatCompletion");
    let token = s.token.clone();
    let stop_at = Instant::now() + Duration::from_millis(2500);
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let http = client();
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut i = 0;
                while Instant::now() < stop_at {
                    i += 1;
                    let q = format!("w{w}q{i}");
                    let resp = http
                        .post(&url)
                        .header("authorization", format!("Bearer {token}"))
                        .body(user(&q))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            if v["message"] == q.as_str() {
                                ok += 1;
                            } else {
                                failed.push(v.to_string());
                            }
                        }
                        Ok(r) => failed.push(format!("{} {:?}", r.status(), r.text().await)),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.sims[0].stop();
    let a_addr = format!("127.0.0.1:{a_port}");
    let gw = &s.gw;
    let a_down = || async {
        let m = gw.metrics().await;
        m.sum("chatgate_upstream_endpoint_up", &[("endpoint", &a_addr)]) == 0.0
    };
    eventually(Duration::from_secs(5), a_down).await;
    let m = s.gw.metrics().await;
    assert_eq!(
        m.sum("chatgate_upstream_endpoint_up", &[("endpoint", &a_addr)]),
        0.0
    );
    s.sims[0] = Simulator::start_on(a_port, &["--name", "a-again"]);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.expect("load task");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 20, "too little load: {total}");

    // Traffic returns to the restarted endpoint.
    let s = &s;
    let restarted_requests = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async move {
            assert_eq!(s.post("/chatCompletion", user("back?")).await.status(), 200);
            s.sims[0].stats().await["chat_requests"]
                .as_u64()
                .unwrap_or(0)
        },
        |n| *n > 0,
    )
    .await;
    assert!(
        restarted_requests > 0,
        "no traffic to the restarted endpoint"
    );
}

#[tokio::test]
async fn cors_preflight_and_replies_echo_the_allowed_origin() {
    let sim = Simulator::start(&[]);
    let upstreams = upstream_block("main", &[sim.addr()], "");
    let s = setup_with(
        vec![sim],
        upstreams,
        "cors:\n  allowed_origins: [\"https://app.example.com\"]\n  allowed_headers: [X-Request-Id]\n  max_age: 10m\n",
    )
    .await;
    let page = "https://app.example.com";
    let preflight = |path: &str, origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, s.gw.url(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let h = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    for path in ["/auth", "/chatCompletionStream"] {
        let r = preflight(path, page).await.expect("preflight");
        assert_eq!(r.status(), 204);
        assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(page));
        assert_eq!(
            h(&r, "access-control-allow-methods").as_deref(),
            Some("POST, OPTIONS")
        );
        assert_eq!(
            h(&r, "access-control-allow-headers").as_deref(),
            Some("Authorization, Content-Type, X-Request-Id")
        );
        assert_eq!(h(&r, "access-control-max-age").as_deref(), Some("600"));
        assert_eq!(h(&r, "access-control-allow-credentials"), None);
    }
    // Another origin gets no permission; an unknown path is still 404.
    let r = preflight("/auth", "https://evil.example")
        .await
        .expect("preflight");
    assert_eq!(h(&r, "access-control-allow-origin"), None);
    assert_eq!(
        preflight("/nope", page).await.expect("preflight").status(),
        404
    );

    // The page logs in and streams; each reply echoes its origin, never `*`.
    let r = client()
        .post(s.gw.url("/auth"))
        .header("origin", page)
        .json(&json!({"username": "temporary_user", "password": "default_password"}))
        .send()
        .await
        .expect("auth");
    assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(page));
    assert_eq!(h(&r, "vary").as_deref(), Some("Origin"));
    let token: serde_json::Value = r.json().await.expect("token");
    let r = client()
        .post(s.gw.url("/chatCompletionStream"))
        .header("origin", page)
        .header(
            "authorization",
            format!("Bearer {}", token["accessToken"].as_str().unwrap_or("")),
        )
        .body(user("from the browser"))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(page));
    assert_eq!(
        h(&r, "access-control-expose-headers").as_deref(),
        Some("X-Request-Id, Retry-After")
    );
    assert!(r.text().await.expect("body").contains("data: from"));
    // Errors carry the header too, so the page can read them.
    let r = client()
        .post(s.gw.url("/chatCompletion"))
        .header("origin", page)
        .body(user("x"))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 401);
    assert_eq!(h(&r, "access-control-allow-origin").as_deref(), Some(page));
    // A plain OPTIONS (no preflight) is still a wrong method.
    let r = client()
        .request(reqwest::Method::OPTIONS, s.gw.url("/auth"))
        .send()
        .await
        .expect("options");
    assert_eq!(r.status(), 405);
}

/// Replaces the values that differ between two simulator replies (`id`, `created`).
fn normalize(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = ["\"id\":\"chatcmpl-sim", "\"created\":"]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
        .min()
    {
        let (i, len) = at;
        out.push_str(&rest[..i + len]);
        rest = rest[i + len..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out + rest
}

#[tokio::test]
async fn openai_route_passes_replies_through_byte_for_byte() {
    let s = setup().await;
    let sim = &s.sims[0];
    let body = json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": "#sim chunk_size=3 chunk_delay_ms=30\nPass 你好 through\r\nexactly"}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.25
    })
    .to_string();
    let direct = client()
        .post(format!("http://{}/v1/chat/completions", sim.addr()))
        .body(body.clone())
        .send()
        .await
        .expect("direct")
        .bytes()
        .await
        .expect("direct body");
    let resp = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap_or(""),
        "text/event-stream"
    );
    let mut pieces = 0;
    let mut via = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        via.extend_from_slice(&piece.expect("piece"));
        pieces += 1;
    }
    assert!(pieces > 1, "the stream came in one piece");
    assert_eq!(
        normalize(&String::from_utf8_lossy(&via)),
        normalize(&String::from_utf8_lossy(&direct))
    );
    assert!(String::from_utf8_lossy(&via).ends_with("data: [DONE]\n\n"));
    // The upstream got the client's body, fields and all.
    let sent = sim.requests().await;
    let last = &sent.last().expect("request")["body"];
    assert_eq!(last["temperature"], 0.25);
    assert_eq!(last["model"], "test-model");

    // Non-streaming: the JSON body as the upstream wrote it.
    let plain = json!({"model": "other-model", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let direct = client()
        .post(format!("http://{}/v1/chat/completions", sim.addr()))
        .body(plain.clone())
        .send()
        .await
        .expect("direct")
        .text()
        .await
        .expect("body");
    let via = s
        .post("/v1/chat/completions", plain)
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(normalize(&via), normalize(&direct));

    // The model policy: a model off the list is refused; a forced route overrides it.
    let (status, v) = json_reply(
        s.post(
            "/v1/chat/completions",
            json!({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}).to_string(),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        error_message(&v),
        "Invalid request: model \"gpt-5\" is not allowed on this route (allowed: test-model, other-model)"
    );
    let forced = s
        .post(
            "/forced/v1/chat/completions",
            json!({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}).to_string(),
        )
        .await;
    assert_eq!(forced.status(), 200);
    let v: serde_json::Value = forced.json().await.expect("json");
    assert_eq!(v["model"], "house-model");
    // The same token check as the chat routes.
    let r = client()
        .post(s.gw.url("/v1/chat/completions"))
        .body(json!({"model": "test-model", "messages": []}).to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn openai_route_cuts_the_client_when_the_upstream_breaks_off() {
    let s = setup().await;
    let body = json!({
        "model": "test-model",
        "messages": [{"role": "user", "content": "#sim chunk_size=1 cut_after=3\nabcdefgh"}],
        "stream": true
    })
    .to_string();
    let resp = s.post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    // The chunked body never gets its last chunk: the client sees an error, not an end.
    let result = resp.bytes().await;
    assert!(result.is_err(), "a broken stream looked complete");
    let m = metrics_when(&s.gw, |m| {
        m.sum(
            "chatgate_requests_total",
            &[("route", "/v1/chat/completions")],
        ) >= 1.0
    })
    .await;
    assert_eq!(m.sum("chatgate_active_streams", &[]), 0.0);
}

#[tokio::test]
async fn openai_python_sdk_completes_and_streams() {
    let has_sdk = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_sdk,
        "python3 with the openai package is required (scripts/install-deps.sh installs it)"
    );
    let s = setup().await;
    let script = r##"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hello sdk"}])
print("complete:" + r.choices[0].message.content)
print("usage:%d" % r.usage.total_tokens)
parts = []
for chunk in client.chat.completions.create(model="test-model", stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "#sim chunk_size=2\nstreamed sdk"}]):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print("stream:" + "".join(parts) + ":%d" % len(parts))
"##;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &s.gw.url("/v1"), &s.token])
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sdk failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "complete:hello sdk");
    assert!(
        lines[1].starts_with("usage:") && lines[1] != "usage:0",
        "{stdout}"
    );
    assert_eq!(lines[2], "stream:streamed sdk:6");
}

#[tokio::test]
async fn upgrade_hands_over_the_listeners_without_failing_a_request() {
    let sim = Simulator::start(&[]);
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.upstreams = upstream_block("main", &[sim.addr()], "");
    let mut old = Gateway::start_with_grace(cfg, 3, 2);
    old.add_user("temporary_user", "default_password");
    let token = login(&old, "temporary_user", "default_password").await;

    // Long streams (~6 s) that must finish on the old process.
    let long_text: String = ('a'..='z').cycle().take(60).collect();
    let streams: Vec<_> = (0..3)
        .map(|_| {
            let (url, token, text) = (
                old.url("/chatCompletionStream"),
                token.clone(),
                long_text.clone(),
            );
            tokio::spawn(async move {
                client()
                    .post(url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(user(&format!(
                        "#sim chunk_size=1 chunk_delay_ms=100\n{text}"
                    )))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    // Steady traffic over pooled connections until the old process is gone.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = (0..2)
        .map(|w| {
            let (url, token, done) = (old.url("/chatCompletion"), token.clone(), done.clone());
            tokio::spawn(async move {
                let http = client();
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut i = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let q = format!("w{w}-{i}");
                    match http
                        .post(&url)
                        .header("authorization", format!("Bearer {token}"))
                        .body(user(&q))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{}", r.status())),
                        Err(e) => failed.push(format!("{e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failed)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut new = old.spawn_upgrade();
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal(libc::SIGQUIT);
    let exited = tokio::task::spawn_blocking(move || {
        let exited = old.wait_exit(Duration::from_secs(20));
        (exited, old)
    })
    .await
    .expect("wait");
    let (exited, old) = exited;
    assert!(exited, "the old process did not exit; log:\n{}", old.log());
    assert!(
        old.log()
            .contains("draining: replies now close their connections"),
        "{}",
        old.log()
    );
    // Some traffic on the new process alone, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in traffic {
        let (ok, failed) = t.await.expect("traffic task");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 50, "too little traffic: {total}");
    let expected = format!(
        "event: message\ndata: \n\n{}event: message\ndata: \n\n",
        long_text
            .chars()
            .map(|c| format!("event: message\ndata: {c}\n\n"))
            .collect::<String>()
    );
    for s in streams {
        let body = s.await.expect("stream task").expect("stream");
        assert_eq!(body, expected, "a long stream was cut");
    }
    assert!(new.is_running(), "new process died:\n{}", new.log());
    assert!(new.log().contains("chatgate starting"), "{}", new.log());
}

#[tokio::test]
async fn a_client_that_leaves_before_the_reply_is_499_in_log_and_metrics() {
    let s = setup().await;
    let body = user("#sim first_byte_delay_ms=3000\nslow");
    let request = format!(
        "POST /chatCompletion HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nX-Request-Id: leaves-early-1\r\nContent-Length: {}\r\n\r\n{}",
        s.token,
        body.len(),
        body
    );
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.gw.port)).expect("connect");
    sock.write_all(request.as_bytes()).expect("send");
    // Gone before the upstream answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sock);
    let line = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let found = s
                .gw
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["target"] == "access" && v["fields"]["request_id"] == "leaves-early-1");
            std::future::ready(found)
        },
        Option::is_some,
    )
    .await
    .unwrap_or_else(|| panic!("no access line:\n{}", s.gw.log()));
    assert_eq!(line["fields"]["status"], 499, "{line}");
    let m = s.gw.metrics().await;
    assert_eq!(
        m.sum(
            "chatgate_requests_total",
            &[("route", "/chatCompletion"), ("status", "499")]
        ),
        1.0,
        "{}",
        m.text
    );
}
