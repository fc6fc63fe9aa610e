//! Config parsing and validation against the issue's sample file and its
//! error cases; each test uses its own environment variable names because
//! tests run in parallel threads.

use super::*;
use crate::auth::password::DEFAULT_QUEUE_TIMEOUT;
use crate::breaker::BreakerSettings;
use crate::limits::Rate;

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
    let listen: Vec<&str> = c.listen.iter().map(|l| l.address.as_str()).collect();
    assert_eq!(listen, ["0.0.0.0:8080"]);
    assert!(c.listen[0].tls.is_none());
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
    assert_eq!(e.line, line_of(&text, &["routes", "0", "upstream"]));
}

/// The sample with a second and third upstream and a third route, each
/// repeating keys the others have, with `bad` replaced by `with`.
fn repeated_keys(var: &str, bad: &str, with: &str) -> String {
    let text = sample(var)
        .replace(
            "    base_path: /v1\n",
            "    base_path: /v1\n    connect_timeout: 2s\n    retries: 2\n  \
             backup:\n    endpoints: [\"127.0.0.1:8002\"]\n    connect_timeout: 3s\n    \
             retries: 3\n  spare:\n    endpoints: [\"127.0.0.1:8003\"]\n    connect_timeout: 4s\n",
        )
        .replace(
            "    data_format: json\n",
            "    data_format: json\n    keepalive_interval: 5s\n  - path: /third\n    \
             kind: chat\n    upstream: backup\n    model: m\n    keepalive_interval: 6s\n    \
             params: { temperature: 0.1 }\n",
        );
    assert!(text.contains(bad), "{bad:?} not in the text");
    text.replacen(bad, with, 1)
}

#[test]
fn errors_in_repeated_keys_point_at_their_own_section() {
    set_secret("CG_TEST_SECRET_REP", &"s".repeat(40));
    let var = "CG_TEST_SECRET_REP";
    assert!(parse(&repeated_keys(var, "", "")).is_ok());
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        (
            "connect_timeout: 3s",
            "connect_timeout: 0s",
            "upstreams.backup.connect_timeout",
            &["upstreams", "backup", "connect_timeout"],
        ),
        (
            "connect_timeout: 4s",
            "connect_timeout: 0s",
            "upstreams.spare.connect_timeout",
            &["upstreams", "spare", "connect_timeout"],
        ),
        (
            "retries: 3",
            "retries: 11",
            "upstreams.backup.retries",
            &["upstreams", "backup", "retries"],
        ),
        (
            "upstream: backup",
            "upstream: nowhere",
            "routes[2].upstream",
            &["routes", "2", "upstream"],
        ),
        (
            "keepalive_interval: 6s",
            "keepalive_interval: 0s",
            "routes.keepalive_interval",
            &["routes", "2", "keepalive_interval"],
        ),
        (
            "temperature: 0.1",
            "model: x",
            "routes[2].params",
            &["routes", "2", "params"],
        ),
    ];
    for (bad, with, key, path) in cases {
        let text = repeated_keys(var, bad, with);
        let e = parse(&text).expect_err(key);
        assert!(e.message.starts_with(key), "{e}");
        let line = line_of(&text, path);
        assert!(line.is_some(), "{path:?}");
        assert_eq!(e.line, line, "{e}");
        // The first line holding the key's name belongs to another section:
        // a search by text would have blamed that one.
        let name = with.split(':').next().unwrap_or_default();
        let first = text.lines().position(|l| l.contains(name)).map(|i| i + 1);
        assert_ne!(e.line, first, "{key}: the case does not repeat its key");
    }
}

/// The 1-based line of the key path `path` in block-style YAML (a number is
/// a sequence index), found by indentation: independent of the validator's
/// own locator, so a test notices when that one points elsewhere.
fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    // The column of a line's key, past any `- ` sequence markers.
    let key_col = |l: &str| {
        let mut rest = l.trim_start();
        let mut col = indent(l);
        while let Some(r) = rest.strip_prefix("- ") {
            col += 2 + (r.len() - r.trim_start().len());
            rest = r.trim_start();
        }
        col
    };
    let written = |l: &&str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let (mut from, mut to, mut found) = (0, lines.len(), None);
    for seg in path {
        let block: Vec<usize> = (from..to).filter(|&i| written(&lines[i])).collect();
        let hit = if let Ok(n) = seg.parse::<usize>() {
            let col = block.iter().map(|&i| indent(lines[i])).min()?;
            let entries: Vec<usize> = block
                .iter()
                .copied()
                .filter(|&i| indent(lines[i]) == col && lines[i].trim_start().starts_with('-'))
                .collect();
            let at = *entries.get(n)?;
            let end = entries.get(n + 1).copied().unwrap_or(to);
            (at, at, end)
        } else {
            let col = block.iter().map(|&i| key_col(lines[i])).min()?;
            let at = block.iter().copied().find(|&i| {
                key_col(lines[i]) == col
                    && lines[i][col..]
                        .strip_prefix(*seg)
                        .is_some_and(|r| r.starts_with(':'))
            })?;
            let end = (at + 1..to)
                .find(|&i| {
                    written(&lines[i])
                        && key_col(lines[i]) <= col
                        && !lines[i].trim_start().starts_with('-')
                })
                .unwrap_or(to);
            (at, at + 1, end)
        };
        found = Some(hit.0 + 1);
        (from, to) = (hit.1, hit.2);
    }
    found
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
    assert_eq!(e.line, line_of(&bad, &["trusted_proxies"]));
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
fn jwt_leeway_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_LW", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_LW");
    let c = parse(&base).unwrap();
    assert_eq!(c.auth.jwt_leeway, Duration::from_secs(60));
    let with = |value: &str| {
        base.replace(
            "    secret_env: CG_TEST_SECRET_LW\n",
            &format!("    secret_env: CG_TEST_SECRET_LW\n    leeway: {value}\n"),
        )
    };
    assert_eq!(
        parse(&with("5s")).unwrap().auth.jwt_leeway,
        Duration::from_secs(5)
    );
    assert_eq!(parse(&with("0s")).unwrap().auth.jwt_leeway, Duration::ZERO);
    let text = with("2h");
    let e = parse(&text).expect_err("too long").to_string();
    let line = text.lines().position(|l| l.contains("leeway:")).unwrap() + 1;
    assert!(
        e.contains(&format!(":{line}: auth.jwt.leeway: must be at most 1h")),
        "{e}"
    );
}

#[test]
fn auth_on_store_error_defaults_to_allow() {
    set_secret("CG_TEST_SECRET_OSE", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_OSE");
    assert_eq!(
        parse(&base).unwrap().auth.on_store_error,
        OnStoreError::Allow
    );
    let deny = base.replace(
        "  token_ttl: 7d\n",
        "  token_ttl: 7d\n  on_store_error: deny\n",
    );
    assert_eq!(
        parse(&deny).unwrap().auth.on_store_error,
        OnStoreError::Deny
    );
    let bad = base.replace(
        "  token_ttl: 7d\n",
        "  token_ttl: 7d\n  on_store_error: maybe\n",
    );
    assert!(parse(&bad).is_err());
}

/// A self-signed certificate for `localhost` and its key in `dir` (made with
/// the `openssl` command), as `(cert.pem, key.pem)`; `name` tells pairs apart.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The sample with a second, TLS listener on these files.
fn with_tls_listener(var: &str, cert: &Path, key: &Path) -> String {
    sample(var).replace(
        "listen: [\"0.0.0.0:8080\"]",
        &format!(
            "listen:\n  - \"0.0.0.0:8080\"\n  - address: \"0.0.0.0:8443\"\n    tls:\n      cert_file: {}\n      key_file: {}",
            cert.display(),
            key.display()
        ),
    )
}

#[test]
fn tls_listener_reads_its_certificate_at_load() {
    set_secret("CG_TEST_SECRET_TLS_OK", &"s".repeat(40));
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server");
    let c = parse(&with_tls_listener("CG_TEST_SECRET_TLS_OK", &cert, &key)).expect("valid");
    assert_eq!(c.listen.len(), 2);
    assert!(c.listen[0].tls.is_none());
    let tls = c.listen[1].tls.as_ref().expect("tls listener");
    assert_eq!(c.listen[1].address, "0.0.0.0:8443");
    assert_eq!((&tls.cert_file, &tls.key_file), (&cert, &key));
    assert_eq!(tls.cert.as_ref().map(|c| c.chain_len()), Some(1));
    // The flow form of the issue parses the same way; relative paths are
    // anchored at the config file's directory.
    let flow = sample("CG_TEST_SECRET_TLS_OK").replace(
        "listen: [\"0.0.0.0:8080\"]",
        "listen: [\"127.0.0.1:8080\", {address: \"0.0.0.0:8443\", tls: {cert_file: server.pem, key_file: server.key}}]",
    );
    let c = Config::from_yaml("t.yaml", &flow, dir.path(), SecretsPolicy::Required).expect("flow");
    let tls = c.listen[1].tls.as_ref().expect("tls listener");
    assert_eq!(tls.cert_file, cert);
    // User administration does not read the key.
    let c = Config::from_yaml(
        "t.yaml",
        &flow.replace("server.key", "absent.key"),
        dir.path(),
        SecretsPolicy::Skip,
    )
    .expect("secrets skipped");
    assert!(c.listen[1].tls.as_ref().is_some_and(|t| t.cert.is_none()));
}

#[test]
fn unusable_tls_files_refuse_start_with_file_line_and_key() {
    set_secret("CG_TEST_SECRET_TLS_BAD", &"s".repeat(40));
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server");
    let (_, other_key) = self_signed(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let bad_der = dir.path().join("bad-der.pem");
    std::fs::write(
        &bad_der,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let cases: [(&Path, &Path, &str, String); 7] = [
        (
            &missing,
            &key,
            "cert_file",
            format!("cannot read {}: No such file", missing.display()),
        ),
        (
            &cert,
            &missing,
            "key_file",
            format!("cannot read {}: No such file", missing.display()),
        ),
        // A directory cannot be read as a file (even by root, who can read any file).
        (
            dir.path(),
            &key,
            "cert_file",
            format!("cannot read {}: Is a directory", dir.path().display()),
        ),
        (
            &garbage,
            &key,
            "cert_file",
            format!("{} holds no PEM certificate", garbage.display()),
        ),
        (
            &cert,
            &cert,
            "key_file",
            format!("{} holds no PEM private key", cert.display()),
        ),
        (
            &bad_der,
            &key,
            "cert_file",
            format!(
                "{}: the first certificate cannot be used",
                bad_der.display()
            ),
        ),
        (
            &cert,
            &other_key,
            "key_file",
            format!(
                "{} does not match the certificate in {}",
                other_key.display(),
                cert.display()
            ),
        ),
    ];
    for (cert_file, key_file, blamed, problem) in cases {
        let text = with_tls_listener("CG_TEST_SECRET_TLS_BAD", cert_file, key_file);
        let e = parse(&text).expect_err(&problem);
        let line = line_of(&text, &["listen", "1", "tls", blamed]);
        assert!(line.is_some());
        assert_eq!(e.line, line, "{e}");
        let expected = format!(
            "test.yaml:{}: listen[1].tls.{blamed}: {problem}",
            line.unwrap_or(0)
        );
        assert!(
            e.to_string().starts_with(&expected),
            "{e}\nwanted {expected}"
        );
    }
}

#[test]
fn listen_entries_are_checked() {
    set_secret("CG_TEST_SECRET_LISTEN", &"s".repeat(40));
    let text = sample("CG_TEST_SECRET_LISTEN");
    let twice = text.replace(
        "listen: [\"0.0.0.0:8080\"]",
        "listen: [\"0.0.0.0:8080\", {address: \"0.0.0.0:8080\"}]",
    );
    let e = parse(&twice).expect_err("listed twice").to_string();
    assert!(
        e.starts_with("test.yaml:2: listen: 0.0.0.0:8080 is listed twice"),
        "{e}"
    );
    let unknown = text.replace(
        "listen: [\"0.0.0.0:8080\"]",
        "listen:\n  - address: \"0.0.0.0:8443\"\n    tls: {cert_file: a.pem, key: a.key}",
    );
    let e = parse(&unknown).expect_err("unknown key").to_string();
    assert!(e.contains("unknown field `key`"), "{e}");
    assert!(e.starts_with("test.yaml:4:") || e.contains("line 4"), "{e}");
    let no_address = text.replace(
        "listen: [\"0.0.0.0:8080\"]",
        "listen: [{tls: {cert_file: a.pem, key_file: a.key}}]",
    );
    let e = parse(&no_address).expect_err("no address").to_string();
    assert!(e.contains("missing field `address`"), "{e}");
}

#[test]
fn connection_limits_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_CONN", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_CONN");
    let c = parse(&base).expect("valid");
    assert_eq!(c.limits.max_connections, None, "derived at start");
    assert_eq!(c.limits.max_connections_per_ip, 256);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.keepalive_timeout, Duration::from_secs(60));

    let set = |keys: &str| base.replace("limits:\n", &format!("limits:\n{keys}"));
    let c = parse(&set(
        "  max_connections: 300\n  max_connections_per_ip: 0\n  header_timeout: 2s\n  keepalive_timeout: 5s\n",
    ))
    .expect("valid");
    assert_eq!(c.limits.max_connections, Some(300));
    assert_eq!(c.limits.max_connections_per_ip, 0, "0: no per-address cap");
    assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.keepalive_timeout, Duration::from_secs(5));

    for (keys, key) in [
        ("  max_connections: 0\n", "limits.max_connections"),
        ("  header_timeout: 0s\n", "limits.header_timeout"),
        ("  keepalive_timeout: 500ms\n", "limits.keepalive_timeout"),
    ] {
        let e = parse(&set(keys)).unwrap_err();
        assert!(e.message.starts_with(key), "{e}");
        assert_eq!(e.line, Some(11), "the line under `limits:`: {e}");
    }
}

#[test]
fn failed_login_ceiling_per_name_defaults_overrides_and_errors() {
    set_secret("CG_TEST_SECRET_LG", &"s".repeat(40));
    let c = parse(&sample("CG_TEST_SECRET_LG")).unwrap();
    assert_eq!(
        c.rate_limits.login_per_username_global,
        Some(Rate {
            limit: 100,
            period: Duration::from_secs(3600)
        })
    );
    let with = |auth: &str| {
        sample("CG_TEST_SECRET_LG").replace(
            "limits:\n",
            &format!("rate_limits:\n  auth: {{{auth}}}\nlimits:\n"),
        )
    };
    let c = parse(&with("failures_per_username_global: 40, global_window: 2h")).unwrap();
    assert_eq!(
        c.rate_limits.login_per_username_global,
        Some(Rate {
            limit: 40,
            period: Duration::from_secs(7200)
        })
    );
    let c = parse(&with("failures_per_username_global: 0")).unwrap();
    assert_eq!(c.rate_limits.login_per_username_global, None, "0 is off");
    let e = parse(&with("global_window: 0s"))
        .expect_err("zero window")
        .to_string();
    assert!(
        e.contains("rate_limits.auth.global_window: must be greater than 0"),
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
        (
            "  url_env: CG_TEST_CONV_DB\n  ca_file: /nonexistent/pg-ca.pem\n",
            "conversation_log.ca_file",
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

#[test]
fn tracing_defaults_and_errors() {
    set_secret("CG_TEST_SECRET_TRACE", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_TRACE");
    assert!(
        parse(&base).expect("valid").tracing.is_none(),
        "off when absent"
    );
    let with = |block: &str| format!("{base}tracing:\n{block}");
    let t = parse(&with("  otlp_endpoint: http://127.0.0.1:4318/\n"))
        .expect("valid")
        .tracing
        .expect("configured");
    assert_eq!(t.traces_url, "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.service_name, "chatgate");
    assert_eq!(t.sample_ratio, 1.0);
    let t = parse(&with(
        "  otlp_endpoint: http://otel:4318\n  service_name: gw\n  sample_ratio: 0.25\n",
    ))
    .expect("valid")
    .tracing
    .expect("configured");
    assert_eq!((t.service_name.as_str(), t.sample_ratio), ("gw", 0.25));
    assert_eq!(t.ca_file, None);
    let t = parse(&with("  otlp_endpoint: https://otel:4318\n"))
        .expect("https, the system's CAs")
        .tracing
        .expect("configured");
    assert_eq!(t.traces_url, "https://otel:4318/v1/traces");
    assert_eq!(t.ca_file, None);
    for (block, needle) in [
        (
            "  otlp_endpoint: ftp://u:hunter2@x\n",
            "must be an http:// or https:// URL",
        ),
        (
            "  otlp_endpoint: \"http://u:hunter2@x y\"\n",
            "not a valid URL",
        ),
        (
            "  otlp_endpoint: http://u:hunter2@x\n  ca_file: /etc/ssl/certs/ca-certificates.crt\n",
            "tracing.ca_file: applies to an https:// otlp_endpoint only",
        ),
        (
            "  otlp_endpoint: https://u:hunter2@x\n  ca_file: /nonexistent/otel-ca.pem\n",
            "tracing.ca_file: /nonexistent/otel-ca.pem holds no usable PEM certificate",
        ),
        (
            "  otlp_endpoint: http://x\n  sample_ratio: 1.5\n",
            "tracing.sample_ratio: must be between 0 and 1",
        ),
        (
            "  otlp_endpoint: http://x\n  sample_ratio: -0.1\n",
            "between 0 and 1",
        ),
        (
            "  otlp_endpoint: http://x\n  service_name: \" \"\n",
            "must not be empty",
        ),
        ("  sample_ratio: 1\n", "otlp_endpoint"),
    ] {
        let e = parse(&with(block)).expect_err(block).to_string();
        assert!(e.contains(needle), "{block}: {e}");
        assert!(e.starts_with("test.yaml:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

#[test]
fn tracing_headers_come_from_the_environment_and_are_never_quoted() {
    set_secret("CG_TEST_SECRET_TRACE_H", &"s".repeat(40));
    let base = sample("CG_TEST_SECRET_TRACE_H");
    let with = |var: &str| {
        format!("{base}tracing:\n  otlp_endpoint: https://otel:4318\n  headers_env: {var}\n")
    };
    set_secret(
        "CG_TEST_OTLP_HEADERS",
        " Authorization=Basic%20aHVudGVyMg== , X-Scope-OrgID=tenant-1,",
    );
    let t = parse(&with("CG_TEST_OTLP_HEADERS"))
        .expect("valid")
        .tracing
        .expect("configured");
    let headers: Vec<(&str, String)> = t
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.expose_str()))
        .collect();
    assert_eq!(
        headers,
        [
            ("authorization", "Basic aHVudGVyMg==".to_string()),
            ("x-scope-orgid", "tenant-1".to_string())
        ]
    );
    assert!(!format!("{t:?}").contains("aHVudGVyMg"), "{t:?}");
    for (value, needle) in [
        (
            "Authorization: Bearer aHVudGVyMg",
            "entry 1 is not name=value",
        ),
        ("x=1,Bad Name=aHVudGVyMg", "entry 2: not a header name"),
        (
            "authorization=aHVudGVyMg%0A",
            "entry 1 (authorization): the value is empty or not a valid header value",
        ),
        (
            "authorization=",
            "entry 1 (authorization): the value is empty",
        ),
        (
            "content-type=aHVudGVyMg",
            "content-type is set by the exporter itself",
        ),
        ("a=aHVudGVyMg,A=aHVudGVyMg", "entry 2: a is given twice"),
        (" , ", "holds no header"),
    ] {
        set_secret("CG_TEST_OTLP_HEADERS_BAD", value);
        let e = parse(&with("CG_TEST_OTLP_HEADERS_BAD"))
            .expect_err(value)
            .to_string();
        assert!(
            e.contains("tracing.headers_env: CG_TEST_OTLP_HEADERS_BAD: "),
            "{e}"
        );
        assert!(e.contains(needle), "{value}: {e}");
        assert!(!e.contains("aHVudGVyMg"), "{e}");
    }
    let e = parse(&with("CG_TEST_OTLP_HEADERS_UNSET"))
        .expect_err("unset")
        .to_string();
    assert!(
        e.contains("CG_TEST_OTLP_HEADERS_UNSET is not set or empty"),
        "{e}"
    );
}
