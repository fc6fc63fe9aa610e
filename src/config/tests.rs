//! Config parsing and validation against the issue's sample file and its
//! error cases; each test uses its own environment variable names because
//! tests run in parallel threads.

use super::*;

fn sample(secret_var: &str) -> String {
    format!(
        r#"
listen: ["0.0.0.0:8080"]
admin_listen: "127.0.0.1:9090"
pingora:
  threads: 2
  grace_period_seconds: 60
  graceful_shutdown_timeout_seconds: 10
  upgrade_sock: /tmp/chatgate_upgrade.sock
  pid_file: /tmp/chatgate.pid
limits:
  max_body_bytes: 1048576
auth:
  token_ttl: 7d
  jwt:
    algorithm: HS256
    secret_env: {secret_var}
  password_hash: {{ memory_kib: 19456, iterations: 2, parallelism: 1 }}
  credentials:
    backend: redis
    redis:
      url: redis://127.0.0.1:6379/0
      key_prefix: "chatgate:"
      timeout: 500ms
upstreams:
  main:
    endpoints: ["127.0.0.1:8000", {{address: "localhost:8001", weight: 3}}]
    tls: false
    base_path: /v1
routes:
  - path: /chatCompletion
    kind: chat
    upstream: main
    model: gpt-4o-mini
    system_prompt: "You are the openEuler community assistant, your name is XiaoZhi."
    params: {{ temperature: 0.2, max_tokens: 512 }}
  - path: /chatCompletionStream
    kind: chat_stream
    upstream: main
    model: gpt-4o-mini
    data_format: json
"#
    )
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(
        "test.yaml",
        text,
        Path::new("/etc/chatgate"),
        SecretsPolicy::Required,
    )
}

fn set_secret(var: &str, value: &str) {
    std::env::set_var(var, value);
}

#[test]
fn sample_config_is_valid_and_resolved() {
    set_secret("CG_TEST_SECRET_OK", &"s".repeat(40));
    let c = parse(&sample("CG_TEST_SECRET_OK")).expect("valid config");
    assert_eq!(c.listen, vec!["0.0.0.0:8080"]);
    assert_eq!(c.auth.token_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.auth.secret.expose().len(), 40);
    assert_eq!(c.upstreams.len(), 1);
    let up = &c.upstreams[0];
    assert_eq!(
        up.endpoints[1],
        EndpointSettings {
            host: "localhost".into(),
            port: 8001,
            weight: 3
        }
    );
    assert_eq!(c.routes[0].kind, RouteKind::Chat);
    assert_eq!(c.routes[1].kind, RouteKind::ChatStream);
    assert_eq!(c.routes[1].data_format, DataFormat::Json);
    assert_eq!(
        c.routes[0].params.get("max_tokens"),
        Some(&serde_json::json!(512))
    );
    assert_eq!(c.routes[0].keepalive_interval, Duration::from_secs(15));
    match &c.auth.credentials {
        CredentialSettings::Redis(r) => {
            assert_eq!(r.timeout, Duration::from_millis(500));
            assert_eq!(r.key_prefix, "chatgate:");
        }
        other => panic!("expected redis, got {other:?}"),
    }
}

#[test]
fn unknown_key_names_line_and_key() {
    set_secret("CG_TEST_SECRET_UNKNOWN", &"s".repeat(40));
    let text = sample("CG_TEST_SECRET_UNKNOWN")
        .replace("    tls: false", "    tls: false\n    colour: blue");
    let e = parse(&text).expect_err("unknown key");
    let shown = e.to_string();
    assert!(shown.starts_with("test.yaml:"), "{shown}");
    assert!(shown.contains("colour"), "{shown}");
    assert_eq!(
        e.line,
        text.lines()
            .position(|l| l.contains("colour"))
            .map(|i| i + 1),
        "{shown}"
    );
}

#[test]
fn bad_duration_is_reported() {
    set_secret("CG_TEST_SECRET_DUR", &"s".repeat(40));
    let text = sample("CG_TEST_SECRET_DUR").replace("token_ttl: 7d", "token_ttl: seven days");
    let e = parse(&text).expect_err("bad duration").to_string();
    assert!(
        e.contains("token_ttl") && e.contains("invalid duration"),
        "{e}"
    );
    assert!(e.contains(":13:") || e.contains("line 13"), "{e}");
}

#[test]
fn short_or_missing_secret_is_refused() {
    set_secret("CG_TEST_SECRET_SHORT", "too-short");
    let e = parse(&sample("CG_TEST_SECRET_SHORT"))
        .expect_err("short secret")
        .to_string();
    assert!(e.contains("at least 32"), "{e}");
    assert!(
        !e.contains("too-short"),
        "the secret leaked into the message: {e}"
    );
    let e = parse(&sample("CG_TEST_SECRET_NEVER_SET"))
        .expect_err("missing secret")
        .to_string();
    assert!(e.contains("CG_TEST_SECRET_NEVER_SET is not set"), "{e}");
}

#[test]
fn secrets_can_be_skipped_for_user_administration() {
    let c = Config::from_yaml(
        "test.yaml",
        &sample("CG_TEST_SECRET_NEVER_SET_EITHER"),
        Path::new("."),
        SecretsPolicy::Skip,
    )
    .expect("secrets are not read");
    assert_eq!(c.routes.len(), 2);
}

#[test]
fn unknown_upstream_is_an_error_with_its_line() {
    set_secret("CG_TEST_SECRET_UP", &"s".repeat(40));
    let text = sample("CG_TEST_SECRET_UP").replacen("upstream: main", "upstream: mian", 1);
    let e = parse(&text).expect_err("unknown upstream");
    assert!(
        e.message.contains("routes[0].upstream") && e.message.contains("\"mian\""),
        "{e}"
    );
    assert_eq!(e.line, line_of(&text, "upstream: mian"));
}

/// The 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

#[test]
fn reserved_params_and_duplicate_paths_are_refused() {
    set_secret("CG_TEST_SECRET_RES", &"s".repeat(40));
    let text = sample("CG_TEST_SECRET_RES").replace("temperature: 0.2", "stream: false");
    assert!(parse(&text)
        .expect_err("reserved")
        .message
        .contains("\"stream\""));
    let text = sample("CG_TEST_SECRET_RES")
        .replace("path: /chatCompletionStream", "path: /chatCompletion");
    assert!(parse(&text)
        .expect_err("duplicate")
        .message
        .contains("already taken"));
}

#[test]
fn host_port_parsing() {
    assert_eq!(
        parse_host_port("api.openai.com:443"),
        Ok(("api.openai.com".into(), 443))
    );
    assert_eq!(parse_host_port("[::1]:8000"), Ok(("::1".into(), 8000)));
    assert!(parse_host_port("no-port").is_err());
    assert!(parse_host_port("host:0").is_err());
    assert!(parse_host_port(":80").is_err());
}

#[test]
fn redis_passwords_are_masked() {
    assert_eq!(
        mask_url_password("redis://:hunter2@db:6379/0"),
        "redis://:***@db:6379/0"
    );
    assert_eq!(
        mask_url_password("redis://app:hunter2@db/0"),
        "redis://app:***@db/0"
    );
    assert_eq!(mask_url_password("redis://db:6379"), "redis://db:6379");
}

#[test]
fn rate_limits_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_RL", &"s".repeat(40));
    let c = parse(&sample("CG_TEST_SECRET_RL")).unwrap();
    assert_eq!(c.rate_limits, LimitSettings::default());
    assert_eq!(c.limits.body_timeout, Duration::from_secs(30));
    // max_tokens of the route is what a call reserves for its completion.
    assert_eq!(c.routes[0].completion_estimate, 512);
    assert_eq!(c.routes[1].completion_estimate, 1024);
    assert_eq!(c.routes[0].rate_limits, ChatLimits::default());
    match &c.auth.credentials {
        CredentialSettings::Redis(r) => assert_eq!(r.breaker, BreakerSettings::default()),
        other => panic!("{other:?}"),
    }

    let text = sample("CG_TEST_SECRET_RL")
        .replace(
            "limits:\n",
            "rate_limits:\n  on_store_error: deny\n  requests_per_minute: 0\n  tokens_per_day: 50\n  auth: {failures_per_ip: 0, window: 1m}\nlimits:\n  body_timeout: 5s\n",
        )
        .replace(
            "    data_format: json\n",
            "    data_format: json\n    rate_limits: {requests_per_minute: 7}\n",
        )
        .replace(
            "      timeout: 500ms\n",
            "      timeout: 500ms\n      circuit_breaker: {failures: 3, open_for: 2s}\n",
        );
    let c = parse(&text).unwrap();
    let r = &c.rate_limits;
    assert_eq!(r.on_store_error, OnStoreError::Deny);
    assert_eq!(r.chat.requests_per_minute, None, "0 is unlimited");
    assert_eq!(r.chat.tokens_per_minute, Some(200_000));
    assert_eq!(r.chat.tokens_per_day, Some(50));
    assert_eq!(r.login_per_ip, None);
    assert_eq!(
        r.login_per_username,
        Some(Rate {
            limit: 5,
            period: Duration::from_secs(60)
        })
    );
    assert_eq!(c.limits.body_timeout, Duration::from_secs(5));
    assert_eq!(c.routes[1].rate_limits.requests_per_minute, Some(7));
    match &c.auth.credentials {
        CredentialSettings::Redis(r) => assert_eq!(
            r.breaker,
            BreakerSettings {
                failures: 3,
                open_for: Duration::from_secs(2)
            }
        ),
        other => panic!("{other:?}"),
    }

    let bad = sample("CG_TEST_SECRET_RL").replace(
        "limits:\n",
        "rate_limits:\n  on_store_error: maybe\nlimits:\n",
    );
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.line, Some(11), "{e}");
    assert!(e.message.contains("on_store_error"), "{e}");
}

#[test]
fn trusted_proxies_are_networks_or_addresses() {
    set_secret("CG_TEST_SECRET_TP", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_TP");
    assert!(parse(&base).expect("valid").trusted_proxies.is_empty());
    let ok = format!("{base}trusted_proxies: [10.0.0.0/8, \"::1\", 192.168.1.7]\n");
    let nets: Vec<String> = parse(&ok)
        .expect("valid")
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.168.1.7/32"]);
    let bad = format!("{base}trusted_proxies: [10.0.0.0/8, lb.internal]\n");
    let e = parse(&bad).expect_err("a host name");
    assert!(
        e.message.contains("trusted_proxies")
            && e.message.contains("\"lb.internal\" is not an IP address"),
        "{e}"
    );
    assert_eq!(e.line, line_of(&bad, "lb.internal"));
}

#[test]
fn password_hash_queue_timeout_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_HQ", &"s".repeat(40));
    let c = parse(&sample("CG_TEST_SECRET_HQ")).unwrap();
    assert_eq!(c.auth.hash_queue_timeout, DEFAULT_QUEUE_TIMEOUT);
    let with = |value: &str| {
        sample("CG_TEST_SECRET_HQ").replace(
            "parallelism: 1 }",
            &format!("parallelism: 1, queue_timeout: {value} }}"),
        )
    };
    let c = parse(&with("250ms")).unwrap();
    assert_eq!(c.auth.hash_queue_timeout, Duration::from_millis(250));
    let e = parse(&with("0s")).expect_err("zero wait").to_string();
    assert!(
        e.contains("auth.password_hash.queue_timeout: must be greater than 0"),
        "{e}"
    );
}

#[test]
fn conversation_log_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_CONV", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_CONV");
    let c = parse(&base).expect("valid");
    assert!(c.conversation_log.is_none());
    assert!(c.routes.iter().all(|r| !r.conversation_log));

    set_secret("CG_TEST_CONV_DB", "postgres://app:pw@db:5432/chat");
    let with = |block: &str| {
        format!("{base}conversation_log:\n{block}").replace(
            "    data_format: json\n",
            "    data_format: json\n    conversation_log: false\n",
        )
    };
    let c = parse(&with("  url_env: CG_TEST_CONV_DB\n")).expect("valid");
    let log = c.conversation_log.expect("configured");
    assert_eq!(
        log.url.expect("url").expose(),
        b"postgres://app:pw@db:5432/chat"
    );
    assert_eq!(log.spool_dir, PathBuf::from("/var/lib/chatgate/spool"));
    assert_eq!(log.spool_max_bytes, 1 << 30);
    assert_eq!(log.retention, Duration::from_secs(90 * 86400));
    assert_eq!(log.flush_interval, Duration::from_millis(200));
    assert!(c.routes[0].conversation_log);
    assert!(!c.routes[1].conversation_log, "route opted out");

    let c = parse(&with(
        "  url: postgres://app@db/chat\n  spool_dir: spool\n  spool_max_bytes: 64MiB\n  retention: 30d\n  flush_interval: 1s\n",
    ))
    .expect("valid");
    let log = c.conversation_log.expect("configured");
    assert_eq!(log.spool_dir, PathBuf::from("/etc/chatgate/spool"));
    assert_eq!(log.spool_max_bytes, 64 << 20);
    assert_eq!(log.retention, Duration::from_secs(30 * 86400));

    for (block, needle) in [
        ("  spool_dir: /x\n", "set url_env"),
        (
            "  url: postgres://app:hunter2@db/chat\n",
            "holds a password",
        ),
        (
            "  url: \"host=db port=notaport\"\n",
            "not a valid PostgreSQL URL",
        ),
        (
            "  url_env: CG_TEST_CONV_DB\n  spool_max_bytes: 0\n",
            "must be greater than 0",
        ),
        (
            "  url_env: CG_TEST_CONV_DB\n  retention: 0s\n",
            "must be greater than 0",
        ),
        (
            "  url_env: CG_TEST_CONV_UNSET\n",
            "CG_TEST_CONV_UNSET is not set",
        ),
    ] {
        let e = parse(&with(block)).expect_err(block).to_string();
        assert!(e.contains(needle), "{block}: {e}");
        assert!(e.starts_with("test.yaml:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    // User administration does not need the database URL.
    let c = Config::from_yaml(
        "test.yaml",
        &with("  url_env: CG_TEST_CONV_UNSET\n"),
        Path::new("/etc/chatgate"),
        SecretsPolicy::Skip,
    )
    .expect("valid without secrets");
    assert!(c.conversation_log.expect("configured").url.is_none());
}
