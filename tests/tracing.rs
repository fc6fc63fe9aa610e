//! OpenTelemetry traces end to end: the gateway exports to an OTLP/HTTP receiver
//! this test runs (protobuf decoded with opentelemetry-proto), in front of the
//! simulator; over https too, where a collector whose certificate is not trusted
//! gets nothing; and a collector that is down or never answers leaves chat alone.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{make_certificates, make_certificates_named};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use pingora::tls::{ServerConfig, TlsAcceptor};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const PROMPT: &str = "what is the capital of traceland";
const PASSWORD: &str = "default_password";
const WRONG_PASSWORD: &str = "hunter2-wrong";
const API_KEY: &str = "sk-trace-secret-key";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// A pass-through route letting the client pick the model (no `gen_ai.request.model`).
const OPENAI_ROUTE: &str =
    "  - path: /v1/chat/completions\n    kind: openai\n    upstream: main\n    models: [gpt-traced]\n";

/// An OTLP/HTTP receiver: every span of every `POST /v1/traces`, with its service name.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// TCP connections accepted (TLS handshakes tried, for the https receiver).
    connections: Arc<AtomicUsize>,
    /// The header lines (`name: value`, name lowercased) of every export request.
    heads: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Receiver {
    async fn start() -> (Receiver, u16) {
        Receiver::start_with(None).await
    }

    /// An https receiver presenting `dir`'s `server.pem` (for `localhost`).
    async fn start_tls(dir: &Path) -> (Receiver, u16) {
        let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
        pingora::tls::install_default_crypto_provider();
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        Receiver::start_with(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> (Receiver, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let receiver = Receiver::default();
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                r.connections.fetch_add(1, Ordering::SeqCst);
                let (r, tls) = (r.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => r.serve(conn).await,
                        // A client that does not trust the certificate aborts here.
                        Some(tls) => {
                            if let Ok(conn) = tls.accept(conn).await {
                                r.serve(conn).await;
                            }
                        }
                    }
                });
            }
        });
        (receiver, port)
    }

    /// HTTP/1.1 requests on one connection: header, `Content-Length` body, 200.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self, mut conn: S) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 8192];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let raw_head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            self.heads.lock().unwrap().push(
                raw_head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| format!("{}: {}", n.to_lowercase(), v.trim()))
                    .collect(),
            );
            let head = raw_head.to_lowercase();
            assert!(head.starts_with("post /v1/traces "), "{head}");
            assert!(
                head.contains("content-type: application/x-protobuf"),
                "{head}"
            );
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().expect("length"))
                .expect("content-length");
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 8192];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
            let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("protobuf");
            self.keep(request);
            let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
            if conn.write_all(reply).await.is_err() || conn.flush().await.is_err() {
                return;
            }
        }
    }

    fn keep(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| find(&r.attributes, "service.name"))
                .and_then(as_str)
                .unwrap_or_default()
                .to_string();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn services(&self) -> Vec<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The server span of the request with this `X-Request-Id`.
    async fn server_span(&self, request_id: &str) -> Span {
        self.wait_for(1, |s| {
            attr_str(s, "chatgate.request_id") == Some(request_id)
        })
        .await
        .remove(0)
    }

    /// The (first) client span under `server`.
    async fn attempt_of(&self, server: &Span) -> Span {
        self.wait_for(1, |s| s.parent_span_id == server.span_id)
            .await
            .remove(0)
    }

    /// Waits until `n` spans satisfy `which`, and returns them.
    async fn wait_for(&self, n: usize, which: impl Fn(&Span) -> bool) -> Vec<Span> {
        let seen = poll(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || async { self.spans().into_iter().filter(&which).collect::<Vec<_>>() },
            |s: &Vec<Span>| s.len() >= n,
        )
        .await;
        assert!(seen.len() >= n, "spans: {:#?}", self.spans());
        seen
    }
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

fn as_str(v: &AnyValue) -> Option<&str> {
    match &v.value {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn attr_str<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    find(&span.attributes, key).and_then(as_str)
}

fn attr_int(span: &Span, key: &str) -> Option<i64> {
    match find(&span.attributes, key).and_then(|v| v.value.as_ref()) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// Every string anywhere in a span: attributes, events, name, status.
fn strings(span: &Span) -> Vec<String> {
    fn walk(v: &AnyValue, out: &mut Vec<String>) {
        match &v.value {
            Some(Value::StringValue(s)) => out.push(s.clone()),
            Some(Value::ArrayValue(a)) => a.values.iter().for_each(|v| walk(v, out)),
            Some(Value::KvlistValue(l)) => l
                .values
                .iter()
                .filter_map(|kv| kv.value.as_ref())
                .for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = vec![span.name.clone()];
    let events = span.events.iter().flat_map(|e| e.attributes.iter());
    for kv in span.attributes.iter().chain(events) {
        out.push(kv.key.clone());
        if let Some(v) = &kv.value {
            walk(v, &mut out);
        }
    }
    if let Some(s) = &span.status {
        out.push(s.message.clone());
    }
    out
}

/// How long the simulator waits before a stream's first text (`#sim stall_ms`).
const STALL_MS: u64 = 500;

/// A double attribute of the span's event `name`.
fn event_seconds(span: &Span, name: &str, key: &str) -> Option<f64> {
    let event = span.events.iter().find(|e| e.name == name)?;
    match find(&event.attributes, key)?.value.as_ref() {
        Some(Value::DoubleValue(d)) => Some(*d),
        _ => None,
    }
}

/// A stream attempt's time to first token counts to its first text, not its header.
fn first_token_after_the_stall(attempt: &Span) {
    let first_byte = event_seconds(attempt, "gen_ai.first_byte", "chatgate.time_to_first_byte")
        .unwrap_or_else(|| panic!("first byte: {attempt:#?}"));
    let first_token = event_seconds(
        attempt,
        "gen_ai.first_token",
        "gen_ai.server.time_to_first_token",
    )
    .unwrap_or_else(|| panic!("first token: {attempt:#?}"));
    assert!(
        first_token >= STALL_MS as f64 / 1000.0 && first_byte < first_token,
        "first byte {first_byte} s, first token {first_token} s"
    );
}

/// `gen_ai.response.finish_reasons`, a string array.
fn finish_reasons(span: &Span) -> Vec<&str> {
    match find(&span.attributes, "gen_ai.response.finish_reasons").and_then(|v| v.value.as_ref()) {
        Some(Value::ArrayValue(a)) => a.values.iter().filter_map(as_str).collect(),
        _ => Vec::new(),
    }
}

fn is_error(span: &Span) -> bool {
    span.status.as_ref().map(|s| s.code) == Some(StatusCode::Error as i32)
}

struct Traced {
    _redis: Redis,
    sim: Simulator,
    gw: Gateway,
    token: String,
}

async fn start(sim_flags: &[&str], tracing: Option<String>) -> Traced {
    start_with_env(sim_flags, tracing, &[]).await
}

async fn start_with_env(
    sim_flags: &[&str],
    tracing: Option<String>,
    env: &[(&str, &str)],
) -> Traced {
    let sim = Simulator::start(sim_flags);
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block(
        "main",
        &[sim.addr()],
        "    api_keys_env: TEST_UPSTREAM_KEYS\n    retries: 2\n",
    );
    cfg.routes = seed_routes("main") + OPENAI_ROUTE;
    cfg.env = vec![("TEST_UPSTREAM_KEYS".into(), API_KEY.into())];
    cfg.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    if let Some(block) = tracing {
        cfg.extra = block;
    }
    let gw = Gateway::start(cfg);
    gw.add_user("temporary_user", PASSWORD);
    let token = login(&gw, "temporary_user", PASSWORD).await;
    Traced {
        _redis: redis,
        sim,
        gw,
        token,
    }
}

fn tracing_block(port: u16) -> String {
    format!("tracing:\n  otlp_endpoint: http://127.0.0.1:{port}\n  service_name: gw-under-test\n")
}

impl Traced {
    async fn chat(&self, path: &str, body: String, traceparent: Option<&str>) -> reqwest::Response {
        let mut req = client()
            .post(self.gw.url(path))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(body);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        req.send().await.expect("request")
    }
}

fn request_id_of(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_string()
}

/// A streamed answer's attempt: ended with the stream, with its tokens, the model the
/// simulator's chunks name, `stop` from the last one, and the time to its first text.
fn check_streamed_attempt(server: &Span, attempt: &Span, model: &str) {
    assert!(attr_int(attempt, "gen_ai.usage.output_tokens").is_some_and(|n| n > 0));
    assert!(attempt.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(attempt.end_time_unix_nano > attempt.start_time_unix_nano);
    assert_eq!(attr_str(attempt, "gen_ai.response.model"), Some(model));
    assert_eq!(finish_reasons(attempt), ["stop"], "{attempt:#?}");
    first_token_after_the_stall(attempt);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_for_json_stream_retry_failure_and_auth() {
    let (receiver, port) = Receiver::start().await;
    // The first upstream request gets a 503: the first chat call is retried.
    let t = start(&["--fail-first", "1"], Some(tracing_block(port))).await;

    // A JSON route, continuing the client's trace, retried once.
    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let resp = t
        .chat("/chatCompletion", user(PROMPT), Some(&incoming))
        .await;
    let request_id = request_id_of(&resp);
    let (status, reply) = json_reply(resp).await;
    assert_eq!(status, 200, "{reply}");
    let answer = reply["message"].as_str().expect("message").to_string();

    let server = receiver.server_span(&request_id).await;
    assert_eq!(hex(&server.trace_id), TRACE_ID, "incoming trace continued");
    assert_eq!(hex(&server.parent_span_id), PARENT_ID);
    assert_eq!(server.kind, 2, "server kind");
    assert_eq!(server.name, "POST /chatCompletion");
    assert_eq!(attr_str(&server, "http.request.method"), Some("POST"));
    assert_eq!(attr_str(&server, "http.route"), Some("/chatCompletion"));
    assert_eq!(attr_int(&server, "http.response.status_code"), Some(200));
    assert!(attr_str(&server, "enduser.id").is_some_and(|u| u.parse::<u64>().is_ok()));
    assert!(!is_error(&server));

    let mut attempts = receiver
        .wait_for(2, |s| s.parent_span_id == server.span_id)
        .await;
    attempts.sort_by_key(|s| attr_int(s, "chatgate.attempt"));
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    let (failed, ok) = (&attempts[0], &attempts[1]);
    for a in [failed, ok] {
        assert_eq!(a.trace_id, server.trace_id);
        assert_eq!(a.kind, 3, "client kind");
        assert_eq!(attr_str(a, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(attr_str(a, "gen_ai.request.model"), Some("test-model"));
        assert_eq!(attr_str(a, "server.address"), Some("127.0.0.1"));
        assert_eq!(attr_int(a, "server.port"), Some(i64::from(t.sim.port)));
    }
    assert!(is_error(failed));
    assert_eq!(attr_int(failed, "http.response.status_code"), Some(503));
    assert_eq!(attr_str(failed, "error.type"), Some("http_5xx"));
    assert!(!is_error(ok));
    assert!(attr_int(ok, "gen_ai.usage.input_tokens").is_some_and(|n| n > 0));
    assert!(attr_int(ok, "gen_ai.usage.output_tokens").is_some_and(|n| n > 0));
    assert!(attr_str(ok, "gen_ai.response.model").is_some());
    assert_eq!(finish_reasons(ok), ["stop"], "{ok:#?}");
    assert!(ok
        .events
        .iter()
        .any(|e| find(&e.attributes, "gen_ai.server.time_to_first_token").is_some()));

    // What the upstream received: one traceparent per attempt, naming its client span.
    let requests = t.sim.requests().await;
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for (req, attempt) in requests.iter().zip([failed, ok]) {
        let headers = &req["headers"];
        let tp = headers["traceparent"]
            .as_str()
            .expect("traceparent upstream");
        assert_eq!(
            tp,
            format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id)),
            "parent is the attempt's span"
        );
        assert_eq!(headers["x-request-id"].as_str(), Some(request_id.as_str()));
    }

    // A stream: its spans end when it ends, with the tokens. The simulator sends its
    // header and role chunk at once, and the first text only after a pause.
    let stalled = format!("#sim stall_after=0 stall_ms={STALL_MS}\n{PROMPT}");
    let resp = t.chat("/chatCompletionStream", user(&stalled), None).await;
    assert_eq!(resp.status(), 200);
    let stream_id = request_id_of(&resp);
    let body = resp.text().await.expect("stream body");
    assert!(body.contains("data:"), "{body}");
    let server = receiver.server_span(&stream_id).await;
    assert_eq!(server.parent_span_id, Vec::<u8>::new(), "a new trace");
    let attempt = receiver.attempt_of(&server).await;
    check_streamed_attempt(&server, &attempt, "test-model");

    // A pass-through stream: the same, from the bytes it passes on unchanged.
    let resp = t
        .chat(
            "/v1/chat/completions",
            json!({"model": "gpt-traced", "stream": true,
                   "messages": [{"role": "user", "content": stalled}]})
            .to_string(),
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let passed_id = request_id_of(&resp);
    let body = resp.text().await.expect("pass-through body");
    assert!(body.contains("\"finish_reason\":\"stop\""), "{body}");
    let server = receiver.server_span(&passed_id).await;
    assert_eq!(
        attr_str(&server, "http.route"),
        Some("/v1/chat/completions")
    );
    let attempt = receiver.attempt_of(&server).await;
    assert_eq!(attr_str(&attempt, "gen_ai.request.model"), None);
    check_streamed_attempt(&server, &attempt, "gpt-traced");

    // A failed upstream: a 4xx is not retried; the client gets CONTRACT's 500.
    let resp = t
        .chat("/chatCompletion", user("#sim status=400\nfail"), None)
        .await;
    let failed_id = request_id_of(&resp);
    assert_eq!(resp.status(), 500);
    let server = receiver.server_span(&failed_id).await;
    assert!(is_error(&server));
    assert_eq!(attr_int(&server, "http.response.status_code"), Some(500));
    assert_eq!(
        attr_str(&server, "chatgate.outcome"),
        Some("upstream_error")
    );
    let attempt = receiver.attempt_of(&server).await;
    assert!(is_error(&attempt));
    assert_eq!(attr_str(&attempt, "error.type"), Some("http_4xx"));

    // /auth: the start-up login succeeded; a wrong password fails, without the name.
    let resp = client()
        .post(t.gw.url("/auth"))
        .form(&[("username", "temporary_user"), ("password", WRONG_PASSWORD)])
        .send()
        .await
        .expect("auth");
    assert_eq!(resp.status(), 401);
    let auths = receiver
        .wait_for(2, |s| attr_str(s, "http.route") == Some("/auth"))
        .await;
    let codes: Vec<_> = auths
        .iter()
        .map(|s| attr_int(s, "http.response.status_code"))
        .collect();
    assert!(
        codes.contains(&Some(200)) && codes.contains(&Some(401)),
        "{codes:?}"
    );
    assert!(auths
        .iter()
        .all(|s| attr_str(s, "chatgate.outcome").is_some()));

    // Never in any span: the prompt, the answer, the password, the JWT, the upstream key, the user name.
    let all = receiver.spans();
    assert!(receiver.services().iter().all(|s| s == "gw-under-test"));
    for span in &all {
        for s in strings(span) {
            for secret in [
                PROMPT,
                answer.as_str(),
                PASSWORD,
                WRONG_PASSWORD,
                t.token.as_str(),
                API_KEY,
                "temporary_user",
            ] {
                assert!(
                    !s.contains(secret),
                    "{secret:?} in span {}: {s:?}",
                    span.name
                );
            }
        }
    }
    let metrics = t.gw.metrics().await;
    assert_eq!(metrics.sum("chatgate_trace_spans_dropped_total", &[]), 0.0);
}

/// A collector that accepts connections and never answers.
fn silent_collector() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = listener.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while let Ok((c, _)) = held.accept() {
            conns.push(c);
        }
    });
    (listener, port)
}

async fn chat_round(t: &Traced, n: usize) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        let (status, reply) = json_reply(
            t.chat("/chatCompletion", user(&format!("hi {i}")), None)
                .await,
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_or_silent_leaves_chat_alone() {
    let off = start(&[], None).await;
    let metrics = off.gw.metrics().await;
    assert!(
        metrics.has("chatgate_trace_spans_dropped_total"),
        "the series exists with tracing off"
    );
    assert_eq!(metrics.sum("chatgate_trace_spans_dropped_total", &[]), 0.0);
    // Tracing off: the client's trace context goes upstream unchanged, with the request id.
    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let resp = off
        .chat("/chatCompletion", user("plain"), Some(&incoming))
        .await;
    let request_id = request_id_of(&resp);
    assert_eq!(resp.status(), 200);
    let seen = off.sim.requests().await;
    let headers = &seen.last().expect("request")["headers"];
    assert_eq!(headers["traceparent"].as_str(), Some(incoming.as_str()));
    assert_eq!(headers["x-request-id"].as_str(), Some(request_id.as_str()));
    let resp = off.chat("/chatCompletion", user("plain"), None).await;
    assert_eq!(resp.status(), 200);
    let seen = off.sim.requests().await;
    let headers = &seen.last().expect("request")["headers"];
    assert!(headers.get("traceparent").is_none(), "{headers}");

    let (_silent, silent_port) = silent_collector();
    let closed_port = free_port();
    let silent = start(&[], Some(tracing_block(silent_port))).await;
    let closed = start(&[], Some(tracing_block(closed_port))).await;

    let mut took: HashMap<&str, Duration> = HashMap::new();
    for (name, t) in [("off", &off), ("silent", &silent), ("closed", &closed)] {
        took.insert(name, chat_round(t, 10).await);
    }
    // Generous: an exporter on the request path would wait out its 5 s timeout.
    for (name, d) in &took {
        assert!(*d < Duration::from_secs(4), "{name}: {d:?} ({took:?})");
    }
    eprintln!("ten chat calls: {took:?}");

    for t in [&silent, &closed] {
        assert!(
            export_failures(t).await > 0.0,
            "undelivered spans are counted"
        );
    }
    assert!(silent.gw.log().contains("traces exported over OTLP/HTTP"));
}

fn https_block(port: u16, service: &str, ca: Option<&Path>) -> String {
    let ca = ca.map_or(String::new(), |ca| format!("  ca_file: {}\n", ca.display()));
    format!("tracing:\n  otlp_endpoint: https://localhost:{port}\n  service_name: {service}\n{ca}")
}

/// Waits until `t` counts spans that failed to export.
async fn export_failures(t: &Traced) -> f64 {
    poll(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            t.gw.metrics().await.sum(
                "chatgate_trace_spans_dropped_total",
                &[("reason", "export_failed")],
            )
        },
        |n: &f64| *n > 0.0,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_only_with_a_trusted_certificate() {
    let ours = tempfile::tempdir().expect("tempdir");
    make_certificates(ours.path());
    let theirs = tempfile::tempdir().expect("tempdir");
    make_certificates_named(theirs.path(), "another CA");
    let ca = ours.path().join("ca.pem");
    let (trusted, trusted_port) = Receiver::start_tls(ours.path()).await;
    let (foreign, foreign_port) = Receiver::start_tls(theirs.path()).await;

    // Trusting the collector's CA: spans arrive over TLS.
    let t = start(&[], Some(https_block(trusted_port, "gw-tls", Some(&ca)))).await;
    let resp = t.chat("/chatCompletion", user(PROMPT), None).await;
    let request_id = request_id_of(&resp);
    let (status, reply) = json_reply(resp).await;
    assert_eq!(status, 200, "{reply}");
    let server = trusted.server_span(&request_id).await;
    let attempt = trusted.attempt_of(&server).await;
    assert_eq!(
        attr_str(&attempt, "gen_ai.request.model"),
        Some("test-model")
    );
    assert!(t.gw.log().contains("traces exported over OTLP/HTTP"));

    // A certificate from another CA, and the system's CAs (which do not know ours):
    // the handshake fails, nothing is sent, the spans are counted, chat is unaffected.
    let wrong_ca = start(
        &[],
        Some(https_block(foreign_port, "gw-wrong-ca", Some(&ca))),
    )
    .await;
    let system_cas = start(&[], Some(https_block(trusted_port, "gw-system-cas", None))).await;
    for t in [&wrong_ca, &system_cas] {
        let took = chat_round(t, 5).await;
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert!(
            export_failures(t).await > 0.0,
            "undelivered spans are counted"
        );
    }
    assert!(
        foreign.connections.load(Ordering::SeqCst) > 0,
        "the exporter tried"
    );
    assert!(foreign.spans().is_empty(), "{:#?}", foreign.spans());
    assert!(
        trusted.services().iter().all(|s| s == "gw-tls"),
        "{:?}",
        trusted.services()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_requests_carry_the_configured_headers_and_no_log_shows_a_value() {
    const SECRET: &str = "otlp-secret-4711";
    let (receiver, port) = Receiver::start().await;
    let block = format!("{}  headers_env: TEST_OTLP_HEADERS\n", tracing_block(port));
    let headers = format!("Authorization=Bearer%20{SECRET}, X-Scope-OrgID=tenant-7");
    let t = start_with_env(&[], Some(block), &[("TEST_OTLP_HEADERS", &headers)]).await;
    let resp = t.chat("/chatCompletion", user(PROMPT), None).await;
    let request_id = request_id_of(&resp);
    let (status, reply) = json_reply(resp).await;
    assert_eq!(status, 200, "{reply}");
    receiver.server_span(&request_id).await;
    let heads = receiver.heads.lock().unwrap().clone();
    assert!(!heads.is_empty());
    for head in &heads {
        let has = |line: &str| head.iter().any(|l| l == line);
        assert!(has(&format!("authorization: Bearer {SECRET}")), "{head:?}");
        assert!(has("x-scope-orgid: tenant-7"), "{head:?}");
    }
    let log = t.gw.log();
    assert!(log.contains("traces exported over OTLP/HTTP"), "{log}");
    assert!(
        log.contains("authorization"),
        "the header names are logged: {log}"
    );
    assert!(!log.contains(SECRET), "{log}");
    // The upstream request carries trace context, never the collector's credentials.
    for req in t.sim.requests().await {
        assert!(!req.to_string().contains(SECRET), "{req}");
    }
}
