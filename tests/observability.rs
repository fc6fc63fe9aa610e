//! The shipped dashboard and alert rules against the real thing: `promtool` checks
//! and unit-tests the rules, and a private Prometheus scrapes a live gateway under
//! traffic with the rules loaded: every rule evaluates healthy, every dashboard
//! query evaluates, and those over series the traffic creates return data.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::prometheus::{promtool, Prometheus};
use common::*;
use serde_json::Value;

/// Metrics the dashboard or the rules show that this build does not define yet
/// (another part of chatgate adds them). Once one is defined, remove it here: from
/// then on its queries must return data like every other.
const NOT_YET_DEFINED: &[&str] = &[];

/// Metrics the test's traffic does not create: their queries must evaluate, but may
/// come back empty. The traffic creates every series the dashboard shows today.
const NOT_CREATED_BY_TRAFFIC: &[&str] = &[];

/// The alerts the rules must have.
const REQUIRED_ALERTS: &[&str] = &[
    "ChatgateHigh5xxRatio",
    "ChatgateUpstreamEndpointDown",
    "ChatgateUpstreamAllEndpointsDown",
    "ChatgateUpstreamSlowFirstByte",
    "ChatgateLoginFailuresSpike",
    "ChatgateCredentialStoreUnreachable",
    "ChatgateConversationRecordsDropped",
    "ChatgateTraceSpansDropped",
];

/// What the tests substitute for the dashboard's `$__rate_interval`: long enough
/// to hold several of the test's one-second scrapes.
const RATE_INTERVAL: &str = "30s";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("conf/grafana/chatgate.json")).expect("dashboard JSON")
}

fn alert_rules() -> Vec<Value> {
    let yaml: Value = serde_yaml_ng::from_str(&read("conf/prometheus/alerts.yml")).expect("YAML");
    yaml["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// (panel title, expr) of every query of the dashboard.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    panels(dash)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// The `chatgate_*` metric names in a PromQL expression or source text.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("chatgate_")
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The metric names src/metrics.rs defines.
fn defined_metrics() -> BTreeSet<String> {
    metric_names(include_str!("../src/metrics.rs"))
}

/// Whether `name` (a histogram's `_bucket`, `_sum`, `_count` series included) is
/// defined in src/metrics.rs.
fn is_defined(name: &str, defined: &BTreeSet<String>) -> bool {
    defined.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| defined.contains(base))
        })
}

/// Every metric the expressions name is defined (or known to come later).
fn assert_names_defined<'a>(what: &str, exprs: impl Iterator<Item = &'a str>) {
    let defined = defined_metrics();
    for expr in exprs {
        for name in metric_names(expr) {
            assert!(
                is_defined(&name, &defined) || NOT_YET_DEFINED.contains(&name.as_str()),
                "{what}: {name} is not a metric chatgate defines (src/metrics.rs), in: {expr}"
            );
        }
    }
    for name in NOT_YET_DEFINED {
        assert!(
            !is_defined(name, &defined),
            "{name} is defined now: remove it from NOT_YET_DEFINED in tests/observability.rs"
        );
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let dir = repo("conf/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = promtool(&dir, args);
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_summary_a_runbook_and_tests_both_ways() {
    let rules = alert_rules();
    let runbooks = read("docs/alerts.md");
    let tests: Value =
        serde_yaml_ng::from_str(&read("conf/prometheus/alerts_test.yml")).expect("YAML");
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().expect("alert_rule_test"))
        .collect();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "no alert {required}");
    }
    for rule in &rules {
        let name = rule["alert"].as_str().expect("only alerting rules");
        let summary = rule["annotations"]["summary"].as_str().unwrap_or("");
        assert!(!summary.is_empty(), "{name}: no summary");
        let anchor = name.to_lowercase();
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str(),
            Some(format!("docs/alerts.md#{anchor}").as_str()),
            "{name}: runbook_url"
        );
        assert!(
            runbooks.lines().any(|l| l == format!("### {name}")),
            "docs/alerts.md has no section ### {name}"
        );
        let mine = || cases.iter().filter(|c| c["alertname"] == name);
        let fires = |c: &&&Value| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
        assert!(mine().any(|c| fires(&c)), "{name}: no test where it fires");
        assert!(
            mine().any(|c| !fires(&c)),
            "{name}: no test where it stays quiet"
        );
    }
    assert_names_defined(
        "alerts.yml",
        rules.iter().map(|r| r["expr"].as_str().expect("expr")),
    );
}

#[test]
fn dashboard_uses_the_current_schema_and_its_variables() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 39);
    assert!(dash["id"].is_null(), "an exported dashboard has no id");
    assert_eq!(dash["uid"], "chatgate");
    let vars = dash["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(
        instance["datasource"],
        serde_json::json!({"type": "prometheus", "uid": "${datasource}"})
    );
    assert_eq!(instance["allValue"], ".*");

    let source = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        assert!(p["gridPos"]["w"].is_u64(), "{title}: gridPos");
        match p["type"].as_str() {
            Some("row") => continue,
            Some("timeseries" | "stat") => {}
            other => panic!("{title}: panel type {other:?}"),
        }
        assert_eq!(p["datasource"], source, "{title}: panel datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"], source, "{title}: query datasource");
            let expr = t["expr"].as_str().expect("expr");
            // Each selector of a chatgate metric filters on the instance variable.
            for (i, _) in expr.match_indices("chatgate_") {
                let rest = &expr[i..];
                let braces = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|&end| rest[end..].starts_with('{'))
                    .and_then(|end| rest[end..].find('}').map(|close| &rest[end..end + close]));
                assert!(
                    braces.is_some_and(|b| b.contains("instance=~\"$instance\"")),
                    "{title}: a selector without instance=~\"$instance\" in {expr}"
                );
            }
        }
    }
    let queries = dashboard_queries(&dash);
    assert_names_defined("chatgate.json", queries.iter().map(|(_, e)| e.as_str()));
}

/// Puts what Grafana would in the dashboard's variables.
fn substitute(expr: &str, instance: &str) -> String {
    let out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", instance);
    assert!(
        !out.contains('$'),
        "a variable the test does not know: {expr}"
    );
    out
}

/// Whether every query over series the traffic created returned data.
fn must_return_data(expr: &str) -> bool {
    metric_names(expr).iter().all(|n| {
        !NOT_YET_DEFINED.contains(&n.as_str()) && !NOT_CREATED_BY_TRAFFIC.contains(&n.as_str())
    })
}

/// Each (panel, expr) whose query fails, or returns nothing although it must.
async fn failing_queries(
    prom: &Prometheus,
    queries: &[(String, String)],
    instance: &str,
) -> Vec<String> {
    let mut failing = Vec::new();
    for (title, expr) in queries {
        let answer = prom.query(&substitute(expr, instance)).await;
        if answer["status"] != "success" {
            failing.push(format!("{title}: {expr}: {answer}"));
        } else if must_return_data(expr)
            && answer["data"]["result"]
                .as_array()
                .is_none_or(|r| r.is_empty())
        {
            failing.push(format!("{title}: no data from {expr}"));
        }
    }
    failing
}

/// The names of the alerts Prometheus has pending or firing.
async fn active_alerts(prom: &Prometheus) -> BTreeSet<String> {
    prom.api("/api/v1/alerts").await["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
        .collect()
}

/// Sends a chat request and reads the whole reply (a client that hangs up after the
/// header would cut a stream short); returns the status.
async fn post_as(gw: &Gateway, token: &str, path: &str, text: &str) -> u16 {
    let resp = client()
        .post(gw.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(user(text))
        .send()
        .await
        .expect("chat request");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("reply body");
    assert!(!body.is_empty(), "{path}: empty reply");
    status
}

async fn login_status(gw: &Gateway, name: &str, password: &str) -> u16 {
    client()
        .post(gw.url("/auth"))
        .form(&[("username", name), ("password", password)])
        .send()
        .await
        .expect("auth request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn prometheus_scrapes_a_live_gateway_and_every_rule_and_dashboard_query_works() {
    let mut redis = Redis::start();
    let pg = Postgres::start();
    let sim = Simulator::start(&[]);
    let spool = tempfile::tempdir().expect("spool dir");
    let refused = format!("127.0.0.1:{}", free_port());
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block("main", &[sim.addr()], "")
        + &upstream_block(
            "dead",
            std::slice::from_ref(&refused),
            // Ejected for longer than the test runs: past the default 10 s the endpoint
            // would count as up again before the alert rules are looked at.
            "    retries: 2\n    eject_cooldown: 10m\n",
        );
    cfg.routes = seed_routes("main")
        + "  - path: /limited\n    kind: chat\n    upstream: main\n    model: test-model\n    rate_limits: {requests_per_minute: 1}\n  - path: /dead\n    kind: chat\n    upstream: dead\n    model: m\n";
    cfg.extra = format!(
        "rate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0\n  auth:\n    failures_per_username: 3\nconversation_log:\n  url_env: TEST_CONVERSATION_DB\n  spool_dir: {}\n  flush_interval: 50ms\nlimits:\n  max_connections_per_ip: 8\n",
        spool.path().display()
    );
    cfg.env = vec![("TEST_CONVERSATION_DB".into(), pg.url())];
    let gw = Gateway::start(cfg);
    let instance = format!("127.0.0.1:{}", gw.admin_port);
    let rules_path = repo("conf/prometheus/alerts.yml");
    let prom = Prometheus::start(std::slice::from_ref(&instance), &[&rules_path]).await;

    // Traffic: logins that work, fail and get locked out; answers, streams, a
    // rate-limited call, an upstream error, a dead upstream and a connection burst.
    gw.add_user("temporary_user", "default_password");
    let token = login(&gw, "temporary_user", "default_password").await;
    let failed: Vec<u16> =
        futures::future::join_all((0..4).map(|_| login_status(&gw, "temporary_user", "wrong")))
            .await;
    assert!(failed.contains(&401) && failed.contains(&429), "{failed:?}");
    for q in ["one", "two"] {
        assert_eq!(post_as(&gw, &token, "/chatCompletion", q).await, 200);
    }
    for q in ["#sim chunk_size=3\nabcdefghijkl", "a stream"] {
        assert_eq!(post_as(&gw, &token, "/chatCompletionStream", q).await, 200);
    }
    assert_eq!(post_as(&gw, &token, "/limited", "first").await, 200);
    assert_eq!(post_as(&gw, &token, "/limited", "second").await, 429);
    assert!(post_as(&gw, &token, "/chatCompletion", "#sim status=503\nx").await >= 500);
    assert_eq!(post_as(&gw, &token, "/dead", "nobody there").await, 500);
    // More connections from one address than limits.max_connections_per_ip.
    let held: Vec<std::net::TcpStream> = (0..12)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", gw.port)).expect("connect"))
        .collect();
    let refusals = |m: &Metrics| m.sum("chatgate_connections_refused_total", &[]);
    let m = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || gw.metrics(),
        |m| refusals(m) > 0.0,
    )
    .await;
    assert!(refusals(&m) > 0.0, "{}", m.text);
    drop(held);

    // The instance variable's query finds this gateway.
    let dash = dashboard();
    let var_query = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == "instance")
        .and_then(|v| v["definition"].as_str())
        .expect("instance variable query")
        .to_string();
    let (metric, label) = var_query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.split_once(','))
        .map(|(m, l)| (m.trim().to_string(), l.trim().to_string()))
        .expect("label_values(metric, label)");
    assert_eq!(label, "instance");
    let match_arg = serde_urlencoded::to_string([("match[]", metric.as_str())]).expect("encode");
    let values_path = format!("/api/v1/label/{label}/values?{match_arg}");
    let values = poll(
        Duration::from_secs(15),
        Duration::from_millis(250),
        || prom.api(&values_path),
        |v: &Value| {
            v["data"]
                .as_array()
                .is_some_and(|a| a.contains(&Value::from(instance.as_str())))
        },
    )
    .await;
    assert!(
        values["data"]
            .as_array()
            .is_some_and(|a| a.contains(&Value::from(instance.as_str()))),
        "{var_query} found {values}"
    );

    // Every dashboard query evaluates; those over the traffic's series return data
    // (a series needs two scrapes before rate() has a value).
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let failing = failing_queries(&prom, &queries, &instance).await;
        if failing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard queries failing:\n{}\nprometheus log:\n{}",
            failing.join("\n"),
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every rule loaded and evaluates without error over the traffic's series: each
    // expression on its own, then the rule manager's own rounds (every second; two
    // rounds since the series above are all in).
    let alerts = alert_rules();
    for rule in &alerts {
        let expr = rule["expr"].as_str().expect("expr");
        let answer = prom.query(expr).await;
        assert_eq!(
            answer["status"], "success",
            "rule {}: {answer}",
            rule["alert"]
        );
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expected_rules = alerts.len();
    let rules = poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || prom.api("/api/v1/rules"),
        |v: &Value| {
            let all: Vec<&Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            all.len() == expected_rules && all.iter().all(|r| r["health"] != "unknown")
        },
    )
    .await;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    assert_eq!(loaded.len(), expected_rules, "{rules}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
    }

    // The rules see the live series: the dead endpoint is down, and once Redis is
    // gone the credential store alert goes pending too.
    redis.stop();
    for _ in 0..6 {
        assert_eq!(login_status(&gw, "someone", "pw").await, 503);
    }
    let active = poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || active_alerts(&prom),
        |a: &BTreeSet<String>| {
            [
                "ChatgateUpstreamEndpointDown",
                "ChatgateUpstreamAllEndpointsDown",
                "ChatgateCredentialStoreUnreachable",
            ]
            .iter()
            .all(|n| a.contains(*n))
        },
    )
    .await;
    for name in [
        "ChatgateUpstreamEndpointDown",
        "ChatgateUpstreamAllEndpointsDown",
        "ChatgateCredentialStoreUnreachable",
    ] {
        assert!(active.contains(name), "{name} not pending: {active:?}");
    }
    assert!(
        !active.contains("ChatgateConversationRecordsDropped"),
        "{active:?}"
    );
    let open = format!("chatgate_redis_breaker_open{{instance=\"{instance}\"}} == 1");
    let breaker = poll(
        Duration::from_secs(15),
        Duration::from_millis(250),
        || prom.query(&open),
        |v: &Value| v["data"]["result"].as_array().is_some_and(|r| r.len() == 1),
    )
    .await;
    assert_eq!(
        breaker["data"]["result"].as_array().map(Vec::len),
        Some(1),
        "{breaker}"
    );
}
