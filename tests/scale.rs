//! Scale-out: several gateway instances on one Redis, and the credential store
//! on a three-master Redis Cluster. Tokens issued by one instance work on the
//! others; disabling or revoking a user on one reaches all within the
//! documented bound (`auth.user_cache_ttl`).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The staleness bound the tests configure.
const CACHE_TTL: &str = "300ms";

async fn chat_status(gw: &Gateway, token: &str) -> u16 {
    client()
        .post(gw.url("/chatCompletion"))
        .header("authorization", format!("Bearer {token}"))
        .body(r#"[{"role":"user","content":"hi"}]"#)
        .send()
        .await
        .expect("chat")
        .status()
        .as_u16()
}

/// Waits until every gateway rejects `token`, and returns how long it took.
async fn until_rejected_everywhere(gateways: &[&Gateway], token: &str) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for gw in gateways {
            all &= chat_status(gw, token).await == 401;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "token still accepted after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The per-user request limit the tests configure (a burst of this many, then
/// this many per minute).
const RATE_LIMIT: f64 = 200.0;

fn with_cache(mut cfg: GatewayConfig) -> GatewayConfig {
    cfg.auth_extra = format!("  user_cache_ttl: {CACHE_TTL}\n");
    cfg.extra = format!("rate_limits:\n  requests_per_minute: {RATE_LIMIT}\n");
    cfg
}

/// Sends `total` chat requests for one user, spread round-robin over the
/// gateways with 8 in flight, and checks that the number accepted matches
/// the one shared limit (burst plus what drips back while sending) within 5%.
async fn assert_limit_shared(gateways: &[&Gateway], token: &str, total: usize) {
    let started = Instant::now();
    let mut accepted = 0usize;
    let mut refused = 0usize;
    for batch in (0..total).collect::<Vec<_>>().chunks(8) {
        let replies = futures::future::join_all(
            batch
                .iter()
                .map(|i| chat_status(gateways[i % gateways.len()], token)),
        )
        .await;
        for status in replies {
            match status {
                200 => accepted += 1,
                429 => refused += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    let expected = RATE_LIMIT + RATE_LIMIT / 60.0 * started.elapsed().as_secs_f64();
    let off = (accepted as f64 - expected).abs() / RATE_LIMIT;
    assert!(
        off <= 0.05,
        "{accepted} accepted, {refused} refused across {} instances; expected {expected:.0} (off by {:.1}%)",
        gateways.len(),
        off * 100.0
    );
}

#[tokio::test]
async fn instances_share_users_tokens_and_revocations() {
    let redis = Redis::start();
    let sim = Simulator::start(&[]);
    let a = Gateway::start(with_cache(GatewayConfig::redis(&redis, &[sim.addr()])));
    let b = Gateway::start(with_cache(GatewayConfig::redis(&redis, &[sim.addr()])));
    let c = Gateway::start(with_cache(GatewayConfig::redis(&redis, &[sim.addr()])));
    a.add_user("carol", "carol-pw");
    a.add_user("busy", "busy-pw");

    // One per-user rate limit across all instances.
    let busy = login(&a, "busy", "busy-pw").await;
    assert_limit_shared(&[&a, &b, &c], &busy, 300).await;

    // Issued by one, accepted by all.
    let token = login(&b, "carol", "carol-pw").await;
    for gw in [&a, &b, &c] {
        assert_eq!(chat_status(gw, &token).await, 200);
    }

    // Disabled through one instance's CLI: rejected everywhere within the bound.
    assert!(c.users(&["disable", "carol"], None).status.success());
    let took = until_rejected_everywhere(&[&a, &b, &c], &token).await;
    assert!(
        took <= Duration::from_millis(300 + 500),
        "disable took {took:?} to reach every instance"
    );
    assert!(a.users(&["enable", "carol"], None).status.success());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // `disable` also revoked the tokens issued before it (issue 5): the old token
    // stays dead after `enable`, a new login works everywhere.
    for gw in [&a, &b, &c] {
        assert_eq!(chat_status(gw, &token).await, 401, "old token after enable");
    }
    let token = login(&a, "carol", "carol-pw").await;
    for gw in [&a, &b, &c] {
        assert_eq!(chat_status(gw, &token).await, 200, "enabled again");
    }

    // Revoked: old tokens die everywhere; a fresh login (a later second) works.
    assert!(b.users(&["revoke", "carol"], None).status.success());
    let took = until_rejected_everywhere(&[&a, &b, &c], &token).await;
    assert!(
        took <= Duration::from_millis(300 + 500),
        "revoke took {took:?} to reach every instance"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = login(&c, "carol", "carol-pw").await;
    for gw in [&a, &b, &c] {
        assert_eq!(chat_status(gw, &fresh).await, 200);
    }
}

#[tokio::test]
async fn redis_cluster_as_the_credential_store() {
    let cluster = RedisCluster::start();
    let sim = Simulator::start(&[]);
    let cfg = |sim: &Simulator| {
        with_cache(GatewayConfig {
            credentials: cluster.credentials(),
            upstreams: upstream_block("main", &[sim.addr()], ""),
            routes: seed_routes("main"),
            auth_extra: String::new(),
            extra: String::new(),
            env: Vec::new(),
        })
    };
    let a = Gateway::start(cfg(&sim));
    let b = Gateway::start(cfg(&sim));

    // Users spread over slots on different masters.
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    for name in names {
        a.add_user(name, &format!("{name}-pw"));
    }
    let list = String::from_utf8_lossy(&b.users(&["list"], None).stdout).to_string();
    for name in names {
        assert!(list.contains(name), "{name} missing from {list}");
    }
    let mut tokens = Vec::new();
    for name in names {
        let token = login(&b, name, &format!("{name}-pw")).await;
        assert_eq!(chat_status(&a, &token).await, 200);
        tokens.push(token);
    }
    let resp = client()
        .post(a.url("/auth"))
        .form(&[("username", "alice"), ("password", "wrong")])
        .send()
        .await
        .expect("auth");
    assert_eq!(resp.status(), 401);

    // The rate limit holds on the cluster too.
    a.add_user("busy", "busy-pw");
    let busy = login(&a, "busy", "busy-pw").await;
    assert_limit_shared(&[&a, &b], &busy, 300).await;

    // Password change and revocation on the cluster.
    assert!(a
        .users(&["passwd", "bob"], Some("bob-new"))
        .status
        .success());
    login(&b, "bob", "bob-new").await;
    assert!(a.users(&["revoke", "carol"], None).status.success());
    until_rejected_everywhere(&[&a, &b], &tokens[2]).await;
    assert_eq!(
        chat_status(&b, &tokens[0]).await,
        200,
        "revoking carol touched alice"
    );
    assert!(b.users(&["remove", "dave"], None).status.success());
    until_rejected_everywhere(&[&a, &b], &tokens[3]).await;
}
