//! Issue 5's limits end to end: per-user request and token limits shared by two gateways
//! through one Redis, token reservations settled from upstream usage, usage accounting,
//! failed-login lockouts on `/auth`, revocation and its staleness bound, and Redis
//! outages during traffic (circuit breaker, 503 on /auth, chat from cache, recovery).

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOO_MANY_PREFIX: &str = "Too many requests: retry after ";

fn gateway_on(redis: &Redis, sim: &Simulator, extra: &str, auth_extra: &str) -> Gateway {
    let mut cfg = GatewayConfig::redis(redis, &[sim.addr()]);
    cfg.extra = extra.to_string();
    cfg.auth_extra = auth_extra.to_string();
    Gateway::start(cfg)
}

async fn chat(gw: &Gateway, token: &str, text: &str) -> reqwest::Response {
    client()
        .post(gw.url("/chatCompletion"))
        .header("authorization", format!("Bearer {token}"))
        .body(serde_json::json!([{"role": "user", "content": text}]).to_string())
        .send()
        .await
        .expect("chat")
}

async fn auth(gw: &Gateway, user: &str, password: &str) -> reqwest::Response {
    client()
        .post(gw.url("/auth"))
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .expect("auth")
}

/// Checks a 429: contract body, `Retry-After` equal to the seconds in the text, within `max`.
async fn assert_429(resp: reqwest::Response, max: u64) -> u64 {
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert_eq!(
        resp.headers()
            .get("x-content-type-options")
            .map(|v| v.as_bytes()),
        Some(&b"nosniff"[..])
    );
    let (status, body) = json_reply(resp).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        error_message(&body),
        format!("{TOO_MANY_PREFIX}{retry_after} seconds.")
    );
    assert!(
        (1..=max).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    retry_after
}

#[tokio::test]
async fn request_limit_is_shared_by_two_gateways() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let extra = "rate_limits:\n  requests_per_minute: 3\n";
    let gw1 = gateway_on(&redis, &sim, extra, "");
    let gw2 = gateway_on(&redis, &sim, extra, "");
    gw1.add_user("alice", "alice-pw");
    gw1.add_user("bob", "bob-pw");
    let alice = login(&gw1, "alice", "alice-pw").await;
    for (i, gw) in [&gw1, &gw2, &gw1].iter().enumerate() {
        let resp = chat(gw, &alice, "hi").await;
        assert_eq!(resp.status(), 200, "request {i}");
    }
    // 3 per minute: the fourth, on either gateway, waits for one to drip back (20 s).
    assert_429(chat(&gw2, &alice, "hi").await, 20).await;
    assert_429(chat(&gw1, &alice, "hi").await, 20).await;
    // Another user is not affected.
    let bob = login(&gw2, "bob", "bob-pw").await;
    assert_eq!(chat(&gw1, &bob, "hi").await.status(), 200);
    // The buckets are in Redis, in the user's hash slot.
    let fields = redis.cli(&["HKEYS", "cg:limit:{alice}"]);
    assert!(fields.contains("req:*"), "{fields}");
}

/// Sums `prompt_tokens`/`completion_tokens` of a user's access-log lines.
fn logged_usage(logs: &[String], user_id: u64) -> (u64, u64, u64) {
    let mut sum = (0, 0, 0);
    for log in logs {
        for line in log.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["user_id"].as_u64() == Some(user_id) && f["prompt_tokens"].is_u64() {
                sum.0 += f["prompt_tokens"].as_u64().unwrap_or(0);
                sum.1 += f["completion_tokens"].as_u64().unwrap_or(0);
                sum.2 += 1;
            }
        }
    }
    sum
}

/// The today row of `users usage` once it counts at least `requests` requests (usage is
/// written in batches, `rate_limits.usage_write_interval` apart), or the last row seen
/// after 5 s.
async fn usage_today_reaching(gw: &Gateway, user: &str, requests: u64) -> (u64, u64, u64, u64) {
    poll(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || std::future::ready(usage_today(gw, user)),
        |row| row.0 >= requests,
    )
    .await
}

/// Redis's count of script calls that ran so far (`INFO commandstats`): `calls` minus
/// `failed_calls`, so the NOSCRIPT miss of a script's first use (redis-rs then loads it and
/// calls again) does not count.
fn script_calls(redis: &Redis) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let Some(line) = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
    else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    field("calls") - field("failed_calls")
}

/// The today row of `users usage`: (requests, prompt, completion, total); the fifth
/// column, estimated tokens, is left out.
fn usage_today(gw: &Gateway, user: &str) -> (u64, u64, u64, u64) {
    let out = gw.users(&["usage", user, "--days", "1"], None);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: Vec<u64> = text
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(row.len(), 5, "{text}");
    (row[0], row[1], row[2], row[3])
}

#[tokio::test]
async fn token_reservations_stop_a_burst_of_long_streams_and_settle_from_usage() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.extra =
        "rate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0\n"
            .into();
    // The stream route reserves its max_tokens (400) per call and has 1000 tokens a minute.
    cfg.routes = cfg.routes.replace(
        "    kind: chat_stream\n",
        "    kind: chat_stream\n    params: {max_tokens: 400}\n    rate_limits: {tokens_per_minute: 1000}\n",
    );
    let gw = Gateway::start(cfg);
    gw.add_user("alice", "alice-pw");
    let token = login(&gw, "alice", "alice-pw").await;
    let stream = |text: &'static str| {
        client()
            .post(gw.url("/chatCompletionStream"))
            .header("authorization", format!("Bearer {token}"))
            .body(serde_json::json!([{"role": "user", "content": text}]).to_string())
            .send()
    };
    // Two slow streams are under way: 2 × ~420 tokens reserved.
    let slow = "#sim chunk_delay_ms=150 chunk_size=1\nabcdefghij";
    let mut first = stream(slow).await.expect("stream 1");
    let mut second = stream(slow).await.expect("stream 2");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let _ = first.chunk().await;
    let _ = second.chunk().await;
    // A third one now would overshoot the minute's tokens: refused before the upstream.
    let before = sim.stats().await["chat_requests"].as_u64();
    assert_429(stream("hello").await.expect("stream 3"), 60).await;
    assert_eq!(sim.stats().await["chat_requests"].as_u64(), before);
    // Once they finish, the unused part of the reservations is refunded.
    while first.chunk().await.ok().flatten().is_some() {}
    while second.chunk().await.ok().flatten().is_some() {}
    let status = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let resp = stream("hello").await.expect("stream 4");
            let status = resp.status();
            let _ = resp.bytes().await;
            status
        },
        |status| *status == 200,
    )
    .await;
    assert_eq!(status, 200, "reservations were not settled");
    // Non-streaming calls are counted too.
    assert_eq!(chat(&gw, &token, "one more").await.status(), 200);
    let logged = || std::future::ready(logged_usage(&[gw.log()], 1).2 >= 4);
    eventually(Duration::from_secs(5), logged).await;

    // Usage per day = what the upstream reported, request by request.
    let (prompt, completion, requests) = logged_usage(&[gw.log()], 1);
    assert_eq!(requests, 4, "{}", gw.log());
    assert!(prompt > 0 && completion > 0);
    assert_eq!(
        usage_today_reaching(&gw, "alice", 4).await,
        (4, prompt, completion, prompt + completion)
    );
    let out = gw.users(&["usage", "alice", "--days", "3"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
}

#[tokio::test]
async fn usage_and_token_refunds_are_written_in_batches_and_the_rest_on_shutdown() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    // A token limit only: each call reserves ~1,030 tokens in one Redis call; its refund
    // and its usage wait for the batch.
    let extra = "rate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 1000000\n  tokens_per_day: 0\n  usage_write_interval: 1h\n";
    let mut gw = gateway_on(&redis, &sim, extra, "");
    gw.add_user("alice", "alice-pw");
    let token = login(&gw, "alice", "alice-pw").await;
    let calls_before = script_calls(&redis);
    for i in 0..10 {
        assert_eq!(chat(&gw, &token, "hi").await.status(), 200, "request {i}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Within the interval only the reservations were written: one Redis call per request.
    assert_eq!(script_calls(&redis), calls_before + 10);
    assert_eq!(usage_today(&gw, "alice").0, 0);
    let bucket = || -> u64 {
        redis
            .cli(&["HGET", "cg:limit:{alice}", "tpm:*"])
            .parse()
            .expect("tpm bucket")
    };
    let reserved = bucket();
    // A graceful stop writes what was kept: usage and the refunds, in one call.
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(15)), "{}", gw.log());
    let (prompt, completion, requests) = logged_usage(&[gw.log()], 1);
    assert_eq!(requests, 10, "{}", gw.log());
    assert_eq!(
        usage_today(&gw, "alice"),
        (10, prompt, completion, prompt + completion)
    );
    assert_eq!(script_calls(&redis), calls_before + 11);
    // The bucket gave back the unused estimates: 10 × (~1,030 reserved − the tokens used),
    // at 60 µs per token for 1,000,000 a minute.
    let refunded_us = reserved - bucket();
    let refund = refunded_us / 60;
    assert!(
        refund > 10 * 1000 - (prompt + completion) && refund < 10 * 1100,
        "refunded {refund} tokens"
    );
}

#[tokio::test]
async fn failed_logins_lock_out_the_name_and_the_address_on_every_gateway() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let extra =
        "rate_limits:\n  auth:\n    failures_per_username: 3\n    failures_per_ip: 5\n    window: 1m\n";
    let gw1 = gateway_on(&redis, &sim, extra, "");
    let gw2 = gateway_on(&redis, &sim, extra, "");
    for name in ["alice", "bob", "carol"] {
        gw1.add_user(name, "right-pw");
    }
    for gw in [&gw1, &gw2, &gw1] {
        assert_eq!(auth(gw, "alice", "wrong").await.status(), 401);
    }
    // The name is locked, even for the right password, on both gateways.
    for gw in [&gw2, &gw1] {
        let resp = auth(gw, "alice", "right-pw").await;
        assert_eq!(
            resp.headers().get("cache-control").map(|v| v.as_bytes()),
            Some(&b"no-store"[..])
        );
        assert_429(resp, 20).await;
    }
    // The address has had 3 failures; bob's success does not add one.
    assert_eq!(auth(&gw2, "bob", "right-pw").await.status(), 200);
    assert_eq!(auth(&gw2, "bob", "wrong").await.status(), 401);
    assert_eq!(auth(&gw1, "nobody", "wrong").await.status(), 401);
    // Five failures from this address: everyone here waits now.
    assert_429(auth(&gw1, "carol", "right-pw").await, 12).await;
    // Missing credentials are not counted (and not limited).
    let (status, _) = json_reply(client().post(gw1.url("/auth")).send().await.expect("auth")).await;
    assert_eq!(status, 401);
}

/// Ten right passwords for one name at once, with 5 failures allowed: attempts still being
/// checked are no failures, so all ten get their token (issue 17: five got a false 429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_with_the_right_password_all_succeed() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let gw = gateway_on(
        &redis,
        &sim,
        "rate_limits:\n  auth:\n    failures_per_username: 5\n    failures_per_ip: 20\n    window: 15m\n",
        "",
    );
    gw.add_user("temporary_user", "right-pw");
    let logins: Vec<_> = (0..10)
        .map(|_| {
            let url = gw.url("/auth");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .form(&[("username", "temporary_user"), ("password", "right-pw")])
                    .send()
                    .await
                    .expect("auth")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for login in logins {
        statuses.push(login.await.expect("task"));
    }
    assert_eq!(statuses, vec![200; 10]);
}

/// A login carrying `X-Forwarded-For`, as a proxy on loopback would send it.
async fn auth_from(gw: &Gateway, user: &str, password: &str, client_ip: &str) -> reqwest::Response {
    client()
        .post(gw.url("/auth"))
        .header("x-forwarded-for", client_ip)
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .expect("auth")
}

/// Wrong passwords from one address lock the name out there only; the name's ceiling over
/// all addresses still stops guessing spread over many (issue 17).
#[tokio::test]
async fn failed_logins_lock_a_name_per_address_under_a_ceiling_over_all() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let gw = gateway_on(
        &redis,
        &sim,
        "trusted_proxies: [127.0.0.1]\nrate_limits:\n  auth:\n    failures_per_username: 3\n    failures_per_ip: 20\n    window: 1m\n    failures_per_username_global: 5\n    global_window: 1m\n",
        "",
    );
    gw.add_user("alice", "right-pw");
    for _ in 0..3 {
        assert_eq!(
            auth_from(&gw, "alice", "wrong", "198.51.100.1")
                .await
                .status(),
            401
        );
    }
    assert_429(
        auth_from(&gw, "alice", "right-pw", "198.51.100.1").await,
        20,
    )
    .await;
    // Elsewhere alice logs in: the guesses from .1 do not lock her out.
    assert_eq!(
        auth_from(&gw, "alice", "right-pw", "198.51.100.2")
            .await
            .status(),
        200
    );
    // Two more guesses from other addresses reach the ceiling of 5: now she waits too,
    // one more failure being allowed every 12 s.
    for ip in ["198.51.100.3", "198.51.100.4"] {
        assert_eq!(auth_from(&gw, "alice", "wrong", ip).await.status(), 401);
    }
    assert_429(
        auth_from(&gw, "alice", "right-pw", "198.51.100.5").await,
        12,
    )
    .await;
    assert_eq!(
        auth_from(&gw, "bob", "wrong", "198.51.100.5")
            .await
            .status(),
        401
    );
}

/// More logins at once than the hash threads can take within the queue timeout: the rest are
/// turned away at once with the documented 429 instead of queueing without end, counted as `busy`,
/// and not as failed logins. (A login takes its unit of the failed-login buckets before the
/// hash and gets it back unless the password was wrong, so the limits here fit the burst.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_beyond_the_hash_threads_is_turned_away_and_not_counted_as_failures() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    // One hash thread; each hash (32 MiB, 2 passes: ~0.1 s in a release build, ~0.7 s in the
    // tests' debug build) takes far longer than the 20 ms wait.
    let gw = gateway_on(
        &redis,
        &sim,
        "rate_limits:\n  auth:\n    failures_per_username: 7\n    failures_per_ip: 7\n    window: 1m\n",
        "  password_hash:\n    memory_kib: 32768\n    iterations: 2\n    max_concurrent: 1\n    queue_timeout: 20ms\n",
    );
    gw.add_user("alice", "right-pw");
    let before = gw.metrics().await;
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let gw_url = gw.url("/auth");
            tokio::spawn(async move {
                client()
                    .post(gw_url)
                    .form(&[("username", "alice"), ("password", "right-pw")])
                    .send()
                    .await
                    .expect("auth")
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for resp in burst {
        let resp = resp.await.expect("task");
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(assert_429(resp, 1).await, 1);
                busy += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    // The busy answers were no failed logins: after two real ones the address has 5 of its 7
    // left, and would have none if the busy answers had counted.
    assert_eq!(auth(&gw, "nobody", "wrong").await.status(), 401);
    assert_eq!(auth(&gw, "nobody", "wrong").await.status(), 401);
    assert_eq!(auth(&gw, "alice", "right-pw").await.status(), 200);
    // The logging hook counts a request just after its reply: wait for all 9.
    let counted = |m: &Metrics, outcome: &str| {
        m.sum("chatgate_auth_attempts_total", &[("outcome", outcome)])
            - before.sum("chatgate_auth_attempts_total", &[("outcome", outcome)])
    };
    let after = poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || gw.metrics(),
        |m| counted(m, "ok") + counted(m, "busy") + counted(m, "bad_credentials") >= 9.0,
    )
    .await;
    assert_eq!(counted(&after, "bad_credentials"), 2.0);
    assert_eq!(counted(&after, "busy"), f64::from(busy));
    assert_eq!(counted(&after, "ok"), f64::from(ok + 1));
    assert_eq!(counted(&after, "rate_limited"), 0.0);
}

/// A failed login carrying `X-Forwarded-For`, as a proxy on loopback would send it.
async fn auth_via_proxy(gw: &Gateway, user: &str, forwarded_for: &str) -> reqwest::Response {
    client()
        .post(gw.url("/auth"))
        .header("x-forwarded-for", forwarded_for)
        .form(&[("username", user), ("password", "wrong")])
        .send()
        .await
        .expect("auth")
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_address_limit_counts_forwarded_clients() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let limits = "rate_limits:\n  auth:\n    failures_per_username: 0\n    failures_per_ip: 2\n    window: 1m\n";
    // The tests talk from 127.0.0.1: here that is a trusted proxy (and 10.0.0.0/8 its peers).
    let behind = gateway_on(
        &redis,
        &sim,
        &format!("{limits}trusted_proxies: [127.0.0.1, 10.0.0.0/8]\n"),
        "",
    );
    for _ in 0..2 {
        assert_eq!(
            auth_via_proxy(&behind, "x", "198.51.100.1").await.status(),
            401
        );
    }
    assert_429(auth_via_proxy(&behind, "x", "198.51.100.1").await, 60).await;
    // Another client behind the same proxy has its own allowance; what a client wrote into
    // the header itself (left of the address the proxies saw) changes nothing.
    assert_eq!(
        auth_via_proxy(&behind, "x", "198.51.100.1, 198.51.100.2, 10.1.2.3")
            .await
            .status(),
        401
    );
    assert_eq!(
        auth_via_proxy(&behind, "x", "198.51.100.2").await.status(),
        401
    );
    assert_429(
        auth_via_proxy(&behind, "x", "6.6.6.6, 198.51.100.2").await,
        60,
    )
    .await;

    // Without trusted proxies the header is ignored: every "client" is 127.0.0.1.
    let direct = gateway_on(&redis, &sim, limits, "");
    assert_eq!(
        auth_via_proxy(&direct, "x", "192.0.2.1").await.status(),
        401
    );
    assert_eq!(
        auth_via_proxy(&direct, "x", "192.0.2.2").await.status(),
        401
    );
    assert_429(auth_via_proxy(&direct, "x", "192.0.2.3").await, 60).await;
}

#[tokio::test]
async fn revocation_disable_and_remove_take_effect_within_the_cache_bound() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let gw = gateway_on(&redis, &sim, "", "  user_cache_ttl: 1s\n");
    gw.add_user("alice", "alice-pw");
    // Waits until `token` is refused; the time taken is the staleness seen.
    async fn refused_after(gw: &Gateway, token: &str) -> Duration {
        let started = Instant::now();
        loop {
            let status = chat(gw, token, "hi").await.status();
            if status == 401 {
                return started.elapsed();
            }
            assert_eq!(status, 200);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "token still accepted after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    const BOUND: Duration = Duration::from_millis(1500); // user_cache_ttl + margin

    let old = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &old, "warm the cache").await.status(), 200);
    assert!(gw.users(&["revoke", "alice"], None).status.success());
    // A login in the same second as the revocation still yields a working token.
    let fresh = login(&gw, "alice", "alice-pw").await;
    let stale_for = refused_after(&gw, &old).await;
    assert!(
        stale_for <= BOUND,
        "revoked token accepted for {stale_for:?}"
    );
    assert_eq!(chat(&gw, &fresh, "hi").await.status(), 200);

    assert!(gw.users(&["disable", "alice"], None).status.success());
    let stale_for = refused_after(&gw, &fresh).await;
    assert!(
        stale_for <= BOUND,
        "disabled user's token accepted for {stale_for:?}"
    );
    assert!(gw.users(&["enable", "alice"], None).status.success());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        chat(&gw, &fresh, "hi").await.status(),
        401,
        "enable revived a token"
    );
    let third = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &third, "hi").await.status(), 200);

    assert!(gw.users(&["remove", "alice"], None).status.success());
    let stale_for = refused_after(&gw, &third).await;
    assert!(
        stale_for <= BOUND,
        "removed user's token accepted for {stale_for:?}"
    );
    // The same name created again does not bring old tokens back.
    gw.add_user("alice", "alice-pw");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(&gw, &third, "hi").await.status(), 401);
    let fourth = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &fourth, "hi").await.status(), 200);
}

#[tokio::test]
async fn redis_outage_during_traffic_breaker_cache_and_recovery() {
    let mut redis = Redis::start();
    let sim = Simulator::start(&[]);
    let mut cfg = GatewayConfig::redis(&redis, &[sim.addr()]);
    cfg.credentials += "      circuit_breaker: {failures: 2, open_for: 500ms}\n";
    cfg.auth_extra = "  user_cache_ttl: 1s\n".into();
    cfg.extra = "rate_limits:\n  requests_per_minute: 1000\n".into();
    let mut gw = Gateway::start(cfg);
    gw.add_user("alice", "alice-pw");
    let token = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &token, "before").await.status(), 200);

    // Chat traffic runs through the whole outage, until Redis is back (empty).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let url = gw.url("/chatCompletion");
        let token = token.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && statuses.len() < 1000 {
                let sent = Instant::now();
                let resp = client()
                    .post(&url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(r#"[{"role":"user","content":"during"}]"#)
                    .send()
                    .await;
                statuses.push((sent, resp.map(|r| r.status().as_u16()).unwrap_or(0)));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.stop();
    let stopped_at = Instant::now();

    // /auth answers 503 quickly; once the breaker is open, without waiting for a timeout.
    let mut took = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let (status, body) = json_reply(auth(&gw, "alice", "alice-pw").await).await;
        took.push(started.elapsed());
        assert_eq!(
            (status, error_message(&body)),
            (503, "Service unavailable: credential store unreachable.")
        );
    }
    assert!(took.iter().all(|t| *t < Duration::from_secs(1)), "{took:?}");
    assert!(
        took.iter().any(|t| *t < Duration::from_millis(100)),
        "breaker never short-circuited: {took:?}"
    );
    let ready = client()
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    // Valid tokens keep working (stale user cache, local limits).
    assert_eq!(chat(&gw, &token, "outage").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = traffic.await.expect("traffic");
    let during = statuses.iter().filter(|(at, _)| *at > stopped_at).count();
    assert!(during > 20, "{statuses:?}");
    assert!(
        statuses.iter().all(|(_, s)| *s == 200),
        "chat failed during the outage: {statuses:?}"
    );

    redis.restart();
    gw.add_user("alice", "alice-pw"); // the test Redis keeps no data
    let status = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { auth(&gw, "alice", "alice-pw").await.status() },
        |status| *status == 200,
    )
    .await;
    assert_eq!(status, 200, "login did not recover");
    // Limits are shared again, and usage counted during the outage was written back.
    let fresh = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &fresh, "after").await.status(), 200);
    let written =
        || std::future::ready(redis.cli(&["HKEYS", "cg:limit:{alice}"]).contains("req:*"));
    eventually(Duration::from_secs(5), written).await;
    assert!(redis.cli(&["HKEYS", "cg:limit:{alice}"]).contains("req:*"));
    // The restarted Redis was empty: what it counts now is the outage's requests,
    // kept in the gateway and written back, plus the one after.
    let (requests, ..) = usage_today_reaching(&gw, "alice", during as u64 + 1).await;
    assert!(
        requests as usize > during,
        "usage lost: {requests} <= {during}"
    );
    let ready = client()
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    assert!(gw.is_running());
}

#[tokio::test]
async fn deny_policy_refuses_chat_while_redis_is_down() {
    let mut redis = Redis::start();
    let sim = Simulator::start(&[]);
    let gw = gateway_on(&redis, &sim, "rate_limits:\n  on_store_error: deny\n", "");
    gw.add_user("alice", "alice-pw");
    let token = login(&gw, "alice", "alice-pw").await;
    assert_eq!(chat(&gw, &token, "hi").await.status(), 200);
    redis.stop();
    let (status, body) = json_reply(chat(&gw, &token, "hi").await).await;
    assert_eq!(
        (status, error_message(&body)),
        (503, "Service unavailable: credential store unreachable.")
    );
    redis.restart();
    let status = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { chat(&gw, &token, "hi").await.status() },
        |status| *status == 200,
    )
    .await;
    assert_eq!(status, 200, "chat did not recover");
}
