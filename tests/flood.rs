//! Connection floods and hostile clients at a scale that fits a small machine (issue 17):
//! past `limits.max_connections` and `limits.max_connections_per_ip` connections are
//! closed at once while the admin listener keeps answering, header drippers are cut at
//! `limits.header_timeout`, the open-connection gauge goes back down, and clients that
//! disconnect or send garbage leave no ERROR line in the log, only a counter.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const CAP: usize = 300;
const EXCESS: usize = 150;

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// Waits until the server closes `c` (EOF or reset); `None` if it stays open `within`.
async fn closed_within(c: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), c.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A client sending its request headers one byte at a time, every 200 ms, until the
/// server closes the connection; returns when that happened (from the first byte).
async fn drip(mut c: TcpStream) -> Duration {
    let started = Instant::now();
    let head = b"POST /auth HTTP/1.1\r\nHost: x\r\nX-Slow: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";
    for b in head.iter().cycle().take(600) {
        if c.write_all(&[*b]).await.is_err() {
            return started.elapsed();
        }
        if closed_within(&mut c, Duration::from_millis(200))
            .await
            .is_some()
        {
            return started.elapsed();
        }
    }
    panic!("a dripping client was never cut off");
}

/// A gateway config whose upstream is never called (nothing listens there).
fn config(redis: &Redis) -> GatewayConfig {
    GatewayConfig::redis(redis, &[format!("127.0.0.1:{}", free_port())])
}

fn open_public(m: &Metrics) -> f64 {
    m.sum("chatgate_open_connections", &[("listener", "public")])
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_drippers_are_cut_at_the_header_deadline() {
    let redis = Redis::start();
    let mut cfg = config(&redis);
    cfg.extra = format!(
        "limits:\n  max_connections: {CAP}\n  max_connections_per_ip: 0\n  header_timeout: 2s\n"
    );
    let gw = Gateway::start(cfg);
    gw.add_user("alice", "alice-pw");
    login(&gw, "alice", "alice-pw").await;
    let rss_before = gw.rss_kib();

    // CAP drippers fill the public listener.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut c = connect(gw.port).await;
        c.write_all(b"P").await.expect("first byte");
        held.push(c);
    }
    // Generous: on a loaded machine (the whole suite in parallel) accepting CAP
    // connections can take seconds.
    let m = poll(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || gw.metrics(),
        |m| open_public(m) >= CAP as f64,
    )
    .await;
    assert_eq!(open_public(&m), CAP as f64);
    let drippers: Vec<_> = held.into_iter().map(|c| tokio::spawn(drip(c))).collect();
    let flood_started = Instant::now();

    // The excess is closed at once.
    for i in 0..EXCESS {
        let mut c = connect(gw.port).await;
        let _ = c.write_all(b"POST /auth HTTP/1.1\r\n").await;
        let took = closed_within(&mut c, Duration::from_secs(1)).await;
        assert!(
            took.is_some(),
            "connection {i} past the cap was not closed within 1 s"
        );
    }
    // The admin listener still answers, fast.
    let started = Instant::now();
    let health = client()
        .get(gw.admin_url("/healthz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .expect("healthz while the public listener is full");
    assert_eq!(health.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    let during = gw.metrics().await;
    let rss_during = gw.rss_kib();
    assert!(
        flood_started.elapsed() < Duration::from_millis(1800),
        "the flood took too long to check before the header deadline: {:?}",
        flood_started.elapsed()
    );
    assert_eq!(open_public(&during), CAP as f64, "drippers still held");
    assert_eq!(
        during.sum(
            "chatgate_connections_refused_total",
            &[("listener", "public"), ("reason", "max_connections")]
        ),
        EXCESS as f64
    );

    // Every dripper is cut at the 2 s header deadline, not Pingora's 60 s.
    let mut cut = Vec::new();
    for d in drippers {
        cut.push(d.await.expect("dripper"));
    }
    let (min, max) = (
        cut.iter().min().copied().unwrap_or_default(),
        cut.iter().max().copied().unwrap_or_default(),
    );
    eprintln!("drippers cut after {min:?} .. {max:?}");
    assert!(min >= Duration::from_millis(1500), "cut too early: {min:?}");
    assert!(max < Duration::from_secs(5), "cut too late: {max:?}");

    // The gauge goes back down and normal traffic works.
    let after = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || gw.metrics(),
        |m| open_public(m) <= 1.0,
    )
    .await;
    assert!(open_public(&after) <= 1.0, "gauge stays up");
    assert!(
        after.sum(
            "chatgate_client_errors_total",
            &[("kind", "header_timeout")]
        ) >= CAP as f64
    );
    assert_eq!(login(&gw, "alice", "alice-pw").await.split('.').count(), 3);

    // Memory: the trimmer (every 5 s) returns what the flood took.
    let rss_after = poll(
        Duration::from_secs(12),
        Duration::from_millis(500),
        || async { gw.rss_kib() },
        |rss| *rss < rss_before + (rss_during.saturating_sub(rss_before)) / 2 + 1024,
    )
    .await;
    eprintln!(
        "gateway RSS: {rss_before} KiB before, {rss_during} KiB during, {rss_after} KiB after"
    );
    assert!(
        rss_after < rss_before + (rss_during.saturating_sub(rss_before)) / 2 + 1024,
        "memory not given back: {rss_before} KiB before, {rss_during} KiB during, {rss_after} KiB after"
    );
    let errors = error_lines(&gw.log()).join("\n");
    assert!(errors.is_empty(), "ERROR lines in the log:\n{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_max_connections_per_ip_unless_it_is_a_trusted_proxy() {
    let redis = Redis::start();
    let start = |extra: &str| {
        let mut cfg = config(&redis);
        cfg.extra = format!("limits:\n  max_connections_per_ip: 5\n{extra}");
        Gateway::start(cfg)
    };
    let gw = start("");
    let proxied = start("trusted_proxies: [127.0.0.1]\n");

    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(gw.port).await);
        held.push(connect(proxied.port).await);
    }
    let m = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || gw.metrics(),
        |m| open_public(m) >= 5.0,
    )
    .await;
    assert_eq!(open_public(&m), 5.0);

    let mut sixth = connect(gw.port).await;
    assert!(
        closed_within(&mut sixth, Duration::from_secs(1))
            .await
            .is_some(),
        "a sixth connection from one address was not refused"
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.sum(
            "chatgate_connections_refused_total",
            &[("listener", "public"), ("reason", "max_connections_per_ip")]
        ),
        1.0
    );

    // Behind a trusted proxy every client shares its address: no per-address cap.
    let mut more = Vec::new();
    for _ in 0..5 {
        more.push(connect(proxied.port).await);
    }
    let m = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || proxied.metrics(),
        |m| open_public(m) >= 10.0,
    )
    .await;
    assert_eq!(open_public(&m), 10.0);

    // A freed place can be taken again.
    drop(held);
    let m = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || gw.metrics(),
        |m| open_public(m) == 0.0,
    )
    .await;
    assert_eq!(open_public(&m), 0.0);
    assert_eq!(login_status(&gw).await, 401);
}

async fn login_status(gw: &Gateway) -> u16 {
    client()
        .post(gw.url("/auth"))
        .form(&[("username", "nobody"), ("password", "wrong")])
        .send()
        .await
        .expect("auth")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_and_garbage_clients_leave_no_error_lines_only_a_counter() {
    let redis = Redis::start();
    let mut gw = Gateway::start(config(&redis));
    let before = gw.metrics().await;
    let counted = |m: &Metrics| m.sum("chatgate_client_errors_total", &[]);

    for i in 0..40 {
        // Half a request, then gone (reset on every fourth).
        let mut c = connect(gw.port).await;
        c.write_all(b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Le")
            .await
            .expect("write");
        if i % 4 == 0 {
            c.set_zero_linger().expect("linger");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(c);
        // Garbage on both listeners.
        for port in [gw.port, gw.admin_port] {
            let mut c = connect(port).await;
            let _ = c
                .write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n")
                .await;
            let _ = closed_within(&mut c, Duration::from_secs(2)).await;
        }
        // Half a request on the admin listener, then gone.
        let mut c = connect(gw.admin_port).await;
        let _ = c.write_all(b"GET /metr").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(c);
    }

    // Wait for the count first, so that every line is written before the log is read.
    let after = poll(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || gw.metrics(),
        |m| counted(m) >= counted(&before) + 80.0,
    )
    .await;
    assert!(gw.is_running());
    let log = gw.log();
    let errors = error_lines(&log);
    assert!(
        errors.is_empty(),
        "{} ERROR lines, first:\n{}",
        errors.len(),
        errors
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        counted(&after) >= counted(&before) + 80.0,
        "client errors counted: {} before, {} after",
        counted(&before),
        counted(&after)
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("chatgate::client_errors"))
        .count();
    assert_eq!(warnings, 1, "one rate-limited warning:\n{log}");
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `c`.
async fn read_response(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {out:?}");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().expect("length"))
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_get_an_idle_bound_and_a_new_header_deadline_per_request() {
    let redis = Redis::start();
    let mut cfg = config(&redis);
    cfg.extra = "limits:\n  header_timeout: 2s\n  keepalive_timeout: 1s\n".into();
    let gw = Gateway::start(cfg);
    let get = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n";

    // Idle after a reply: closed after the keep-alive timeout.
    let mut idle = connect(gw.port).await;
    idle.write_all(get).await.expect("request");
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 404"));
    let took = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection stays open");
    assert!(took < Duration::from_millis(2500), "idle for {took:?}");

    // A second request on the connection dripped byte by byte (each byte well within the
    // keep-alive timeout): cut at the header deadline, counted from its first byte.
    let mut c = connect(gw.port).await;
    c.write_all(get).await.expect("request");
    assert!(read_response(&mut c).await.starts_with("HTTP/1.1 404"));
    let cut = drip(c).await;
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_secs(4),
        "second request's headers cut after {cut:?}"
    );

    // A slow but timely sequence of requests on one connection is served.
    let mut c = connect(gw.port).await;
    for _ in 0..3 {
        c.write_all(get).await.expect("request");
        assert!(read_response(&mut c).await.starts_with("HTTP/1.1 404"));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}
