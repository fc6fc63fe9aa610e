//! TLS both ways, with a private CA made at test time (the `openssl` command).
//! Upstream: the gateway talks HTTPS to a simulator, verifying the chain
//! against `ca_file` and the certificate's name against `sni`. Public
//! listener: `curl` (OpenSSL and nghttp2, an independent client) logs in and
//! streams over HTTP/1.1 and HTTP/2 by ALPN; plain HTTP on the TLS port, bad
//! certificate files and the certificate rotation by graceful upgrade.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{make_certificates, make_certificates_named};
use common::*;

/// The TLS simulator's chat request count, read with `curl -k` (the test
/// client speaks plain HTTP only).
fn chat_requests(sim: &Simulator) -> u64 {
    let out = Command::new("curl")
        .args(["-sk", &format!("https://{}/_sim/stats", sim.addr())])
        .output()
        .expect("curl must be installed");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    stats["chat_requests"].as_u64().expect("chat_requests")
}

async fn chat_through(sim: &Simulator, upstream_extra: &str) -> (u16, serde_json::Value) {
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block(
        "main",
        &[sim.addr()],
        &format!("    tls: true\n    retries: 0\n{upstream_extra}"),
    );
    let gw = Gateway::start(cfg);
    gw.add_user("u", "p");
    let token = login(&gw, "u", "p").await;
    let resp = client()
        .post(gw.url("/chatCompletion"))
        .header("authorization", format!("Bearer {token}"))
        .body(r#"[{"role":"user","content":"over TLS"}]"#)
        .send()
        .await
        .expect("chat");
    json_reply(resp).await
}

#[tokio::test]
async fn verified_tls_to_the_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let cert = dir.path().join("server.pem").display().to_string();
    let key = dir.path().join("server.key").display().to_string();
    let sim = Simulator::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let ca = dir.path().join("ca.pem").display().to_string();

    let (status, body) =
        chat_through(&sim, &format!("    sni: localhost\n    ca_file: {ca}\n")).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (200, Some("over TLS")),
        "{body}"
    );
    assert_eq!(
        chat_requests(&sim),
        1,
        "the request did not arrive over TLS"
    );

    // The certificate is for localhost, not for this name: refused.
    let (status, body) = chat_through(
        &sim,
        &format!("    sni: api.example.com\n    ca_file: {ca}\n"),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        error_message(&body)
            .starts_with("Failed with chatbot.ChatCompletion: cannot connect to upstream"),
        "{body}"
    );

    // Without the private CA the chain is not trusted.
    let (status, _) = chat_through(&sim, "    sni: localhost\n").await;
    assert_eq!(status, 500);
    assert_eq!(
        chat_requests(&sim),
        1,
        "an unverified connection carried a request"
    );
}

/// A gateway with a plain listener and a TLS one (certificate from `make_certificates(dir)`).
struct TlsGateway {
    gw: Gateway,
    tls_port: u16,
    _redis: Redis,
    sim: Simulator,
}

fn tls_entry(port: u16, dir: &Path) -> String {
    format!(
        "{{address: \"127.0.0.1:{port}\", tls: {{cert_file: {}, key_file: {}}}}}",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    )
}

fn start_tls_gateway(dir: &Path) -> TlsGateway {
    start_tls_gateway_with(dir, "")
}

/// [`start_tls_gateway`] with top-level YAML `extra` (e.g. `limits:`).
fn start_tls_gateway_with(dir: &Path, extra: &str) -> TlsGateway {
    let sim = Simulator::start(&[]);
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.extra = extra.to_string();
    cfg.routes += "  - path: /v1/chat/completions\n    kind: openai\n    upstream: main\n    model: test-model\n";
    let tls_port = free_port();
    let gw = Gateway::start_with_listeners(cfg, &[tls_entry(tls_port, dir)], &[tls_port]);
    gw.add_user("u", "p");
    TlsGateway {
        gw,
        tls_port,
        _redis: redis,
        sim,
    }
}

/// What `curl` got: status, negotiated HTTP version ("1.1", "2"), headers, body;
/// status 0 when there was no HTTP answer (e.g. the certificate was not trusted).
struct Curled {
    status: u16,
    version: String,
    headers: String,
    body: Vec<u8>,
    /// curl's own message when it failed (status 0).
    error: String,
}

/// `curl` to `https://localhost:<port><path>` trusting `ca` only, with `--http1.1`
/// or `--http2`; `args` add the request (method, headers, data).
fn curl(version: &str, ca: &Path, port: u16, path: &str, args: &[&str]) -> Curled {
    let dir = tempfile::tempdir().expect("tempdir");
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = Command::new("curl")
        .args(["-sS", version, "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code} %{http_version}"])
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl must be installed");
    let written = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, version) = written.split_once(' ').unwrap_or(("0", ""));
    Curled {
        status: status.parse().unwrap_or(0),
        version: version.to_string(),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
        error: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn curl_login(version: &str, ca: &Path, port: u16) -> Curled {
    curl(
        version,
        ca,
        port,
        "/auth",
        &[
            "--data-urlencode",
            "username=u",
            "--data-urlencode",
            "password=p",
        ],
    )
}

fn token_of(login: &Curled) -> String {
    let body: serde_json::Value = serde_json::from_slice(&login.body).expect("login json");
    body["accessToken"]
        .as_str()
        .expect("accessToken")
        .to_string()
}

const STREAM_BODY: &str =
    "[{\"role\":\"user\",\"content\":\"#sim chunk_size=5\\nHello, XiaoZhi.\"}]";

#[tokio::test]
async fn tls_listener_logs_in_and_streams_over_http1_and_http2() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    let t = start_tls_gateway(dir.path());

    // The plain listener's stream, the reference.
    let token = login(&t.gw, "u", "p").await;
    let plain = client()
        .post(t.gw.url("/chatCompletionStream"))
        .header("authorization", format!("Bearer {token}"))
        .body(STREAM_BODY)
        .send()
        .await
        .expect("plain stream")
        .bytes()
        .await
        .expect("plain body");
    assert!(plain.starts_with(b"event: message\ndata: \n\n"));

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let login = curl_login(flag, &ca, t.tls_port);
        assert_eq!(
            (login.status, login.version.as_str()),
            (200, version),
            "{} {}",
            login.error,
            String::from_utf8_lossy(&login.body)
        );
        let token = token_of(&login);
        let stream = curl(
            flag,
            &ca,
            t.tls_port,
            "/chatCompletionStream",
            &[
                "-H",
                &format!("authorization: Bearer {token}"),
                "--data-binary",
                STREAM_BODY,
            ],
        );
        assert_eq!((stream.status, stream.version.as_str()), (200, version));
        assert_eq!(
            String::from_utf8_lossy(&stream.body),
            String::from_utf8_lossy(&plain),
            "over {flag}"
        );
        let headers = stream.headers.to_ascii_lowercase();
        assert!(
            headers.contains("content-type: text/event-stream; charset=utf-8"),
            "{headers}"
        );
        // Chunked framing on HTTP/1.1; HTTP/2 has no such header (it would be a protocol error).
        assert_eq!(
            headers.contains("transfer-encoding: chunked"),
            version == "1.1",
            "{headers}"
        );

        // The OpenAI pass-through stream too.
        let openai = curl(
            flag,
            &ca,
            t.tls_port,
            "/v1/chat/completions",
            &[
                "-H",
                &format!("authorization: Bearer {token}"),
                "-H",
                "content-type: application/json",
                "--data-binary",
                r##"{"messages":[{"role":"user","content":"#sim chunk_size=3\npassed through"}],"stream":true}"##,
            ],
        );
        let text = String::from_utf8_lossy(&openai.body);
        assert_eq!(
            (openai.status, openai.version.as_str()),
            (200, version),
            "{text}"
        );
        assert!(
            text.contains("\"content\":\"pas\"") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert_eq!(
            openai
                .headers
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            version == "1.1"
        );
    }
}

#[tokio::test]
async fn http2_streams_event_by_event_and_cancels_when_the_client_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    let t = start_tls_gateway(dir.path());
    let token = token_of(&curl_login("--http2", &ca, t.tls_port));
    // The upstream sends "aaaa", then stalls past the gateway's idle timeout (5 s), which
    // ends the stream with an error event: a reply held back until the end would bring
    // "aaaa" together with that event.
    let body = "[{\"role\":\"user\",\"content\":\"#sim chunk_size=4 stall_after=1 stall_ms=20000\\naaaabbbb\"}]";
    let mut child = Command::new("curl")
        .args(["-sSN", "--http2", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", t.tls_port)])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args(["--data-binary", body])
        .arg(format!(
            "https://localhost:{}/chatCompletionStream",
            t.tls_port
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    let mut out = child.stdout.take().expect("stdout");
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("aaaa") {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        seen
    })
    .await
    .expect("reader");
    let _ = child.kill();
    let _ = child.wait();
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("event: message\ndata: aaaa\n\n"), "{seen}");
    assert!(
        !seen.contains("event: error"),
        "the first event waited for the end of the stream: {seen}"
    );
    // The client left (curl killed): the upstream call is cancelled at once, well
    // before the idle timeout would have ended it.
    let stats = poll(
        Duration::from_secs(2),
        Duration::from_millis(20),
        || t.sim.stats(),
        |stats| stats["streams_cancelled"].as_u64() == Some(1),
    )
    .await;
    assert_eq!(stats["streams_cancelled"].as_u64(), Some(1), "{stats}");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_no_answer_and_the_gateway_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    let mut t = start_tls_gateway(dir.path());
    for _ in 0..3 {
        let (reply, _) = raw_exchange(
            t.tls_port,
            b"POST /auth HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 21\r\n\r\nusername=u&password=p",
            Duration::from_secs(3),
        );
        assert!(
            !reply.starts_with(b"HTTP/"),
            "plain HTTP got an HTTP answer: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    assert!(t.gw.is_running(), "{}", t.gw.log());
    assert_eq!(curl_login("--http2", &ca, t.tls_port).status, 200);
    login(&t.gw, "u", "p").await;
}

/// An `openssl s_client` holding a finished TLS handshake open (its stdin stays open).
struct HeldTls(std::process::Child);

impl HeldTls {
    fn open(ca: &Path, port: u16) -> HeldTls {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-servername",
                "localhost",
            ])
            .arg("-CAfile")
            .arg(ca)
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        // `-quiet` prints the verification lines once the handshake is done.
        let mut err = child.stderr.take().expect("stderr");
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        let deadline = Instant::now() + Duration::from_secs(10);
        while String::from_utf8_lossy(&seen)
            .matches("verify return:1")
            .count()
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "no handshake: {}",
                String::from_utf8_lossy(&seen)
            );
            match err.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!("s_client ended: {}", String::from_utf8_lossy(&seen)),
            }
        }
        HeldTls(child)
    }
}

impl Drop for HeldTls {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn tls_connections_count_against_the_caps_from_accept_and_must_say_hello_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    let t = start_tls_gateway_with(
        dir.path(),
        "limits:\n  max_connections_per_ip: 3\n  header_timeout: 2s\n",
    );
    let refused = |m: &Metrics| {
        m.sum(
            "chatgate_connections_refused_total",
            &[("listener", "public"), ("reason", "max_connections_per_ip")],
        )
    };

    // Three finished handshakes hold exactly three places: the fourth is refused.
    let held: Vec<_> = (0..3).map(|_| HeldTls::open(&ca, t.tls_port)).collect();
    assert_eq!(curl_login("--http1.1", &ca, t.tls_port).status, 0);
    assert_eq!(refused(&t.gw.metrics().await), 1.0);
    drop(held);
    let ok = eventually(Duration::from_secs(5), || async {
        curl_login("--http1.1", &ca, t.tls_port).status == 200
    })
    .await;
    assert!(
        ok,
        "closed TLS connections kept their places\n{}",
        t.gw.log()
    );

    // Connections that never send a ClientHello count too, and are cut at the deadline.
    let mut silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", t.tls_port)).expect("connect"))
        .collect();
    let m = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { curl_login("--http1.1", &ca, t.tls_port).status },
        |status| *status == 0,
    )
    .await;
    assert_eq!(
        m, 0,
        "a fourth connection got through beside three silent ones"
    );
    let before = refused(&t.gw.metrics().await);
    assert!(before >= 2.0, "refusals: {before}");
    let started = Instant::now();
    for c in &mut silent {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "a silent connection was answered"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "silent connections held for {waited:?}"
    );
    let m = t.gw.metrics().await;
    assert!(
        m.sum(
            "chatgate_client_errors_total",
            &[("kind", "header_timeout")]
        ) >= 3.0
    );
    assert_eq!(curl_login("--http2", &ca, t.tls_port).status, 200);

    // Failed handshakes free their places at once (garbage instead of a ClientHello).
    for _ in 0..6 {
        let (reply, _) = raw_exchange(
            t.tls_port,
            b"GET / HTTP/1.1\r\n\r\n",
            Duration::from_secs(3),
        );
        assert!(!reply.starts_with(b"HTTP/"));
    }
    assert_eq!(curl_login("--http1.1", &ca, t.tls_port).status, 200);
    assert_eq!(refused(&t.gw.metrics().await), before);
    let log = t.gw.log();
    assert!(
        !log.contains("\"level\":\"ERROR\""),
        "ERROR lines in the log:\n{log}"
    );
}

/// `chatgate <args> --config <path>`, given at most 20 s to exit: (exit code, stderr).
fn run_to_exit(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(chatgate_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("CHATGATE_JWT_SECRET", JWT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatgate");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            return (status.code(), err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, "still running".into())
}

#[test]
fn unusable_certificate_files_refuse_start_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let redis = Redis::start();
    let cfg = GatewayConfig::redis(&redis, &[]);
    let port = free_port();
    let config = write_config(dir.path(), port, free_port(), &cfg);
    let missing = dir.path().join("missing.key");
    let entry = format!(
        "{{address: \"127.0.0.1:{}\", tls: {{cert_file: {}, key_file: {}}}}}",
        free_port(),
        dir.path().join("server.pem").display(),
        missing.display()
    );
    add_listeners(&config, port, &[entry]);
    let prefix = format!(
        "{}:1: listen[1].tls.key_file: cannot read {}",
        config.display(),
        missing.display()
    );
    for args in [&["check"][..], &["serve"][..]] {
        let (code, err) = run_to_exit(args, &config);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(&prefix), "{args:?}: {err}\nwanted {prefix}");
    }
    // A key that is not the certificate's.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            &missing.display().to_string(),
            &dir.path().join("ca.key").display().to_string(),
        ),
    )
    .expect("write");
    let (code, err) = run_to_exit(&["serve"], &config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("listen[1].tls.key_file:") && err.contains("does not match the certificate"),
        "{err}"
    );
}

#[test]
fn a_busy_tls_port_refuses_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let redis = Redis::start();
    let cfg = GatewayConfig::redis(&redis, &["127.0.0.1:9".to_string()]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    let port = free_port();
    let config = write_config(dir.path(), port, free_port(), &cfg);
    add_listeners(&config, port, &[tls_entry(busy_port, dir.path())]);
    let (code, err) = run_to_exit(&["serve"], &config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{busy_port}")),
        "{err}"
    );
}

/// The issuer of the certificate the TLS port serves (`openssl s_client`).
fn served_issuer(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -issuer"
        ))
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn certificates_are_read_again_on_graceful_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let (old_ca, new_ca) = (dir.path().join("old-ca.pem"), dir.path().join("ca.pem"));
    std::fs::copy(&new_ca, &old_ca).expect("keep the first CA");
    let t = start_tls_gateway(dir.path());
    assert_eq!(curl_login("--http2", &old_ca, t.tls_port).status, 200);

    // Rotation: new files in place (a new CA and certificate)...
    let next = tempfile::tempdir().expect("tempdir");
    make_certificates_named(next.path(), "chatgate rotated CA");
    for f in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(next.path().join(f), dir.path().join(f)).expect("replace");
    }
    // ...are not picked up by the running process...
    assert!(served_issuer(t.tls_port).contains("chatgate test CA"));
    let refused = curl_login("--http2", &new_ca, t.tls_port);
    assert_eq!(refused.status, 0);
    assert!(refused.error.contains("certificate"), "{}", refused.error);
    // ...but by the process that takes over the listeners.
    let mut new = t.gw.spawn_upgrade();
    let sock = t.gw.dir.path().join("upgrade.sock");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sock.exists(),
        "the new process never listened: {}",
        new.log()
    );
    t.gw.signal(libc::SIGQUIT);
    let mut old = t.gw;
    let exited = tokio::task::spawn_blocking(move || old.wait_exit(Duration::from_secs(20)))
        .await
        .expect("wait");
    assert!(exited, "the old process did not exit");
    let port = t.tls_port;
    let subject = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { served_issuer(port) },
        |s: &String| !s.is_empty(),
    )
    .await;
    assert!(subject.contains("chatgate rotated CA"), "{subject}");
    let rotated = curl_login("--http2", &new_ca, port);
    assert_eq!((rotated.status, rotated.version.as_str()), (200, "2"));
    assert_eq!(curl_login("--http1.1", &old_ca, port).status, 0);
    assert!(new.is_running(), "{}", new.log());
}
