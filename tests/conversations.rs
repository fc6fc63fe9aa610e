//! The conversation record against a real PostgreSQL (started by the harness):
//! every column of chat, stream and openai exchanges, cut streams, outages,
//! a stop with records pending, a full spool, the export command, and no
//! secret anywhere in the record.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SYSTEM_PROMPT: &str = "You are the openEuler community assistant, your name is XiaoZhi.";
const API_KEY: &str = "sk-upstream-key-0123456789abcdef";
const PG_PASSWORD: &str = "pg-secret-never-printed";
const USER_PASSWORD: &str = "default_password";

/// A gateway recording into `db_url` with its spool in `spool`, and a logged-in user.
struct Recorded {
    redis: Redis,
    sim: Simulator,
    gw: Gateway,
    token: String,
    spool: std::path::PathBuf,
}

fn config(
    redis: &Redis,
    sim: &Simulator,
    db_url: &str,
    spool: &Path,
    extra: &str,
) -> GatewayConfig {
    let mut cfg = GatewayConfig::redis(redis, &[]);
    cfg.upstreams = upstream_block("main", &[sim.addr()], "    api_keys_env: TEST_API_KEYS\n");
    cfg.routes = format!(
        "{}  - path: /v1/chat/completions\n    kind: openai\n    upstream: main\n    models: [gpt-test]\n  - path: /unrecorded\n    kind: chat\n    upstream: main\n    model: test-model\n    conversation_log: false\n",
        seed_routes("main")
    );
    let flush = if extra.contains("flush_interval") {
        ""
    } else {
        "  flush_interval: 50ms\n"
    };
    cfg.extra = format!(
        "conversation_log:\n  url_env: TEST_CONVERSATION_DB\n  spool_dir: {}\n{flush}{extra}",
        spool.display()
    );
    cfg.env = vec![
        ("TEST_API_KEYS".into(), API_KEY.into()),
        ("TEST_CONVERSATION_DB".into(), db_url.to_string()),
    ];
    cfg
}

/// `postgres://postgres:<password>@...`: trust authentication ignores the password,
/// which is only there to prove it is never printed or stored.
fn url_with_password(pg_port: u16) -> String {
    format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{pg_port}/postgres")
}

impl Recorded {
    async fn start(db_url: &str, spool_dir: &Path, extra: &str) -> Recorded {
        let redis = Redis::start();
        let sim = Simulator::start(&["--require-key", API_KEY]);
        let gw = Gateway::start(config(&redis, &sim, db_url, spool_dir, extra));
        gw.add_user("temporary_user", USER_PASSWORD);
        let token = login(&gw, "temporary_user", USER_PASSWORD).await;
        Recorded {
            redis,
            sim,
            gw,
            token,
            spool: spool_dir.to_path_buf(),
        }
    }

    /// A second gateway process on the same Redis, database and spool directory.
    fn restart_gateway(&mut self, db_url: &str, extra: &str) {
        self.gw = Gateway::start(config(&self.redis, &self.sim, db_url, &self.spool, extra));
    }

    async fn post(&self, path: &str, body: String) -> reqwest::Response {
        client()
            .post(self.gw.url(path))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Sends a chat request; returns its request id and the reply body.
    async fn chat(&self, path: &str, body: String) -> (String, String) {
        let resp = self.post(path, body).await;
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"]
            .to_str()
            .expect("id")
            .to_string();
        (id, resp.text().await.expect("body"))
    }
}

/// Polls until the table has at least `n` rows; returns them.
async fn rows_at_least(pg: &Postgres, n: usize, within: Duration) -> Vec<Value> {
    poll(
        within,
        Duration::from_millis(50),
        || pg.conversations(),
        |rows| rows.len() >= n,
    )
    .await
}

/// Every one of `ids` is in the table exactly once, nothing was dropped, and the
/// writer counts each as written once.
async fn each_landed_once(pg: &Postgres, s: &Recorded, ids: &[String]) {
    let rows = rows_at_least(pg, ids.len(), Duration::from_secs(20)).await;
    let seen: Vec<&str> = rows
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or(""))
        .collect();
    let unique: HashSet<&str> = seen.iter().copied().collect();
    assert_eq!(seen.len(), unique.len(), "a record arrived twice");
    assert_eq!(
        unique,
        ids.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    let m = s.gw.metrics().await;
    assert_eq!(m.sum("chatgate_conversation_log_dropped_total", &[]), 0.0);
    assert_eq!(
        m.sum("chatgate_conversation_log_written_total", &[]),
        ids.len() as f64
    );
}

fn row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["request_id"] == id)
        .unwrap_or_else(|| panic!("no row for {id} in {rows:#?}"))
}

/// What an SSE client reads as the answer: each event's `data` lines joined with `\n`,
/// all `message` events concatenated.
fn sse_answer(body: &str) -> String {
    body.split("\n\n")
        .filter(|ev| ev.starts_with("event: message\n"))
        .map(|ev| {
            ev.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn assert_no_secrets(what: &str, text: &str, token: &str) {
    for secret in [token, PG_PASSWORD, API_KEY, USER_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} holds a secret ({secret}): {text}"
        );
    }
}

#[tokio::test]
async fn every_kind_of_exchange_lands_with_every_column() {
    let pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let url = url_with_password(pg.port);
    let s = Recorded::start(&url, spool.path(), "").await;

    let (plain_id, plain) = s.chat("/chatCompletion", user("hello there")).await;
    assert_eq!(plain, r#"{"message": "hello there"}"#);
    // Bare newlines, CJK and emoji, one character per upstream chunk (so multi-byte
    // characters arrive in pieces of their own and events carry lone line breaks).
    let streamed_text = "第一行\n\n二行 🌍 end\n";
    let (stream_id, stream_body) = s
        .chat(
            "/chatCompletionStream",
            user("#sim chunk_size=1 reply=text:第一行\\n\\n二行 🌍 end\\n"),
        )
        .await;
    assert_eq!(sse_answer(&stream_body), streamed_text);
    let (cut_id, cut_body) = s
        .chat(
            "/chatCompletionStream",
            user("#sim chunk_size=2 cut_after=3 reply=text:abcdefghij"),
        )
        .await;
    assert!(cut_body.contains("event: error"), "{cut_body}");
    let openai_body =
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "ping"}]});
    let (openai_id, openai_reply) = s
        .chat("/v1/chat/completions", openai_body.to_string())
        .await;
    let openai_reply: Value = serde_json::from_str(&openai_reply).expect("openai json");
    let openai_stream = json!({"model": "gpt-test", "stream": true,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "line\none ✓"}]});
    let (openai_stream_id, _) = s
        .chat("/v1/chat/completions", openai_stream.to_string())
        .await;
    let (unrecorded_id, _) = s.chat("/unrecorded", user("not kept")).await;
    let failed = s.post("/chatCompletion", user("#sim status=503")).await;
    assert_eq!(failed.status(), 500);
    let failed_id = failed.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();

    let rows = rows_at_least(&pg, 6, Duration::from_secs(10)).await;
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert!(rows
        .iter()
        .all(|r| r["request_id"] != unrecorded_id.as_str()));

    let r = row(&rows, &plain_id);
    assert_eq!(r["username"], "temporary_user");
    assert!(r["user_id"].as_i64().is_some_and(|id| id > 0), "{r}");
    assert_eq!(r["route"], "/chatCompletion");
    assert_eq!(r["model"], "test-model");
    assert_eq!(
        r["messages"],
        json!([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "hello there"}])
    );
    assert_eq!(r["answer"], "hello there");
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["status"], 200);
    assert!(r["prompt_tokens"].as_i64().is_some_and(|n| n > 0), "{r}");
    assert!(
        r["completion_tokens"].as_i64().is_some_and(|n| n > 0),
        "{r}"
    );
    assert!(r["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{r}");
    assert!(r["ttfb_ms"].as_f64().is_some(), "{r}");
    let started = r["started_at"].as_str().expect("started_at");
    assert!(
        started.starts_with("20") && started.ends_with("+00:00"),
        "{started}"
    );

    let r = row(&rows, &stream_id);
    assert_eq!(r["route"], "/chatCompletionStream");
    assert_eq!(r["answer"], streamed_text);
    assert_eq!(r["outcome"], "ok");
    assert!(r["completion_tokens"].as_i64().is_some(), "{r}");

    let r = row(&rows, &cut_id);
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["answer"], "abcdef");
    assert_eq!(r["answer"], sse_answer(&cut_body).as_str());

    let r = row(&rows, &openai_id);
    assert_eq!(r["route"], "/v1/chat/completions");
    assert_eq!(r["model"], "gpt-test");
    assert_eq!(r["messages"], openai_body["messages"]);
    assert_eq!(
        r["answer"],
        openai_reply["choices"][0]["message"]["content"]
    );

    let r = row(&rows, &openai_stream_id);
    assert_eq!(r["messages"], openai_stream["messages"]);
    assert_eq!(r["answer"], "line\none ✓");
    assert_eq!(r["outcome"], "ok");

    let r = row(&rows, &failed_id);
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["status"], 500);
    assert_eq!(r["answer"], Value::Null);
    assert_eq!(r["messages"][1]["content"], "#sim status=503");

    // The export: the same rows, one JSON object per line, filters applied.
    let export = |args: &[&str]| {
        let out = std::process::Command::new(chatgate_bin())
            .args(["conversations", "export"])
            .args(args)
            .arg("--config")
            .arg(&s.gw.config_path)
            .env("TEST_CONVERSATION_DB", &url)
            .output()
            .expect("export");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_no_secrets(
            "export stderr",
            &String::from_utf8_lossy(&out.stderr),
            &s.token,
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let all = export(&[]);
    let exported: Vec<Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert_eq!(exported, rows);
    let streams = export(&[
        "--route",
        "/chatCompletionStream",
        "--user",
        "temporary_user",
        "--since",
        "1h",
    ]);
    assert_eq!(streams.lines().count(), 2, "{streams}");
    assert_eq!(export(&["--user", "nobody"]), "");

    // `chatgate check` sees the database and the schema, never the password.
    let check = std::process::Command::new(chatgate_bin())
        .args(["check", "--config"])
        .arg(&s.gw.config_path)
        .envs(s.gw.env.iter().cloned())
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        text.contains(&format!(
            "answers, schema version {} (current)",
            chatgate::conversations::db::SCHEMA_VERSION
        )),
        "{text}"
    );
    assert_no_secrets("check output", &text, &s.token);

    for r in &rows {
        assert_no_secrets("a row", &r.to_string(), &s.token);
    }
    assert_no_secrets("export", &all, &s.token);
    assert_no_secrets("the gateway log", &s.gw.log(), &s.token);
    let m = s.gw.metrics().await;
    assert_eq!(m.sum("chatgate_conversation_log_written_total", &[]), 6.0);
    assert_eq!(m.sum("chatgate_conversation_log_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn a_postgres_outage_loses_nothing_and_slows_no_request() {
    let mut pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let s = Recorded::start(&pg.url(), spool.path(), "").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            s.chat("/chatCompletion", user(&format!("before {i}")))
                .await
                .0,
        );
    }
    rows_at_least(&pg, 10, Duration::from_secs(10)).await;
    pg.stop();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        ids.push(
            s.chat("/chatCompletionStream", user(&format!("during {i}")))
                .await
                .0,
        );
        slowest = slowest.max(started.elapsed());
    }
    // Connecting gives up after 2 s and a write after 5 s: a reply that waited for
    // PostgreSQL would take that long; the simulator answers in milliseconds.
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?} during the outage"
    );
    let m = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || s.gw.metrics(),
        |m| m.sum("chatgate_conversation_log_spooled_total", &[]) > 0.0,
    )
    .await;
    assert!(m.sum("chatgate_conversation_log_spooled_total", &[]) > 0.0);
    pg.restart();
    for i in 0..5 {
        ids.push(
            s.chat("/chatCompletion", user(&format!("after {i}")))
                .await
                .0,
        );
    }
    each_landed_once(&pg, &s, &ids).await;
}

/// PostgreSQL answering, but slowly: a lock another session holds keeps the
/// writer's `COPY` waiting (for less than the write timeout, so the connection is
/// never given up). Records handed in meanwhile go to the spool, not to the memory
/// queue, and all land once the lock goes.
#[tokio::test]
async fn a_slow_postgres_fills_the_spool_not_the_memory_queue() {
    let pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let s = Recorded::start(&pg.url(), spool.path(), "").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            s.chat("/chatCompletion", user(&format!("before {i}")))
                .await
                .0,
        );
    }
    rows_at_least(&pg, 3, Duration::from_secs(10)).await;

    let locker = pg.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE chatgate_conversations IN SHARE MODE")
        .await
        .expect("lock");
    let locked = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..12 {
        let started = Instant::now();
        ids.push(
            s.chat("/chatCompletion", user(&format!("slow {i}")))
                .await
                .0,
        );
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first write waits on the lock; a second on, what queues behind it is spooled.
    let m = poll(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || s.gw.metrics(),
        |m| {
            m.sum("chatgate_conversation_log_spooled_total", &[]) > 0.0
                && m.sum("chatgate_conversation_log_queued", &[]) == 0.0
        },
    )
    .await;
    let waited = locked.elapsed();
    assert!(
        m.sum("chatgate_conversation_log_spooled_total", &[]) > 0.0,
        "nothing was spooled in {waited:?} behind a write that cannot finish"
    );
    assert_eq!(m.sum("chatgate_conversation_log_queued", &[]), 0.0);
    assert_eq!(m.sum("chatgate_conversation_log_written_total", &[]), 3.0);
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?} while PostgreSQL was slow"
    );
    locker.batch_execute("COMMIT").await.expect("unlock");

    each_landed_once(&pg, &s, &ids).await;
}

#[tokio::test]
async fn records_pending_at_a_stop_arrive_after_the_restart() {
    let mut pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let mut s = Recorded::start(&pg.url(), spool.path(), "").await;
    let (first, _) = s.chat("/chatCompletion", user("first")).await;
    rows_at_least(&pg, 1, Duration::from_secs(10)).await;
    pg.stop();
    let mut ids = vec![first];
    for i in 0..10 {
        ids.push(
            s.chat("/chatCompletionStream", user(&format!("pending {i}")))
                .await
                .0,
        );
    }
    s.gw.signal(libc::SIGTERM);
    assert!(
        s.gw.wait_exit(Duration::from_secs(20)),
        "gateway did not stop"
    );
    pg.restart();
    s.restart_gateway(&pg.url(), "");
    let rows = rows_at_least(&pg, ids.len(), Duration::from_secs(20)).await;
    let seen: Vec<&str> = rows
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(seen.len(), ids.len(), "{seen:?}");
    assert_eq!(
        seen.iter().copied().collect::<HashSet<_>>(),
        ids.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    // Replayed, then removed from the spool.
    let left = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { std::fs::read_dir(spool.path()).map_or(0, |d| d.count()) },
        |n| *n == 0,
    )
    .await;
    assert_eq!(left, 0, "spool not emptied");
}

#[tokio::test]
async fn past_the_spool_bound_records_are_dropped_and_counted() {
    // Nothing listens on this port: PostgreSQL is down from the start.
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let spool = tempfile::tempdir().expect("spool dir");
    let s = Recorded::start(&url, spool.path(), "  spool_max_bytes: 3KiB\n").await;
    for i in 0..12 {
        s.chat(
            "/chatCompletion",
            user(&format!("message {i} {}", "x".repeat(200))),
        )
        .await;
    }
    let m = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || s.gw.metrics(),
        |m| {
            m.sum("chatgate_conversation_log_spooled_total", &[])
                + m.sum("chatgate_conversation_log_dropped_total", &[])
                >= 12.0
        },
    )
    .await;
    let spooled = m.sum("chatgate_conversation_log_spooled_total", &[]);
    let dropped = m.sum(
        "chatgate_conversation_log_dropped_total",
        &[("reason", "spool_full")],
    );
    assert!(
        spooled >= 1.0 && dropped >= 1.0,
        "spooled {spooled}, dropped {dropped}"
    );
    assert_eq!(spooled + dropped, 12.0);
    let on_disk: u64 = std::fs::read_dir(spool.path())
        .expect("spool")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(on_disk <= 3 * 1024, "spool holds {on_disk} bytes");
    assert!(s.gw.log().contains("records dropped"), "no warning logged");

    let check = std::process::Command::new(chatgate_bin())
        .args(["check", "--config"])
        .arg(&s.gw.config_path)
        .envs(s.gw.env.iter().cloned())
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(text.contains("DOES NOT ANSWER"), "{text}");
}

#[tokio::test]
async fn records_still_in_memory_at_the_end_of_a_stop_are_spooled() {
    let pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    // An hour between flushes: only the stop itself can get these records out.
    let mut s = Recorded::start(&pg.url(), spool.path(), "  flush_interval: 1h\n").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            s.chat("/chatCompletion", user(&format!("quick {i}")))
                .await
                .0,
        );
    }
    // A stream still running when the stop begins; it ends inside the grace period,
    // after the writer's last flush, so its record is in memory when the process ends.
    let slow = {
        let req = client()
            .post(s.gw.url("/chatCompletionStream"))
            .header("authorization", format!("Bearer {}", s.token))
            .body(user(
                "#sim chunk_size=1 chunk_delay_ms=100 reply=text:slowly",
            ));
        tokio::spawn(async move {
            let resp = req.send().await.expect("stream");
            let id = resp.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_string();
            let body = resp.text().await.expect("body");
            (id, body)
        })
    };
    let m = poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || s.gw.metrics(),
        |m| m.sum("chatgate_active_streams", &[]) >= 1.0,
    )
    .await;
    assert_eq!(m.sum("chatgate_active_streams", &[]), 1.0);
    s.gw.signal(libc::SIGTERM);
    let (slow_id, body) = slow.await.expect("stream task");
    assert_eq!(sse_answer(&body), "slowly", "the stream was cut: {body}");
    ids.push(slow_id);
    assert!(
        s.gw.wait_exit(Duration::from_secs(20)),
        "gateway did not stop"
    );
    s.restart_gateway(&pg.url(), "");
    let rows = rows_at_least(&pg, ids.len(), Duration::from_secs(20)).await;
    let seen: HashSet<&str> = rows
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(seen, ids.iter().map(String::as_str).collect::<HashSet<_>>());
    assert_eq!(rows.len(), ids.len());
}

/// A record of a typical size: the seed's system prompt, a 300-character question,
/// a 600-character answer.
fn sample_record(i: usize) -> chatgate::conversations::Record {
    let body = json!({"model": "m", "messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "q".repeat(300)}]});
    let mut draft = chatgate::conversations::Draft::new("bench_user", body.to_string().as_bytes())
        .expect("draft");
    draft.set_answer("a".repeat(600));
    draft.finish(chatgate::conversations::Finished {
        request_id: &format!("bench-{i}"),
        user_id: Some(1),
        route: "/chatCompletion",
        outcome: "ok",
        status: 200,
        tokens: Some((120, 150)),
        duration: Duration::from_millis(800),
        ttfb: Some(Duration::from_millis(200)),
    })
}

/// The writer service on its own (no gateway), writing to `pg`; it runs until the
/// returned guard (the stop signal's sender and the spool) is dropped.
fn start_writer(
    pg: &Postgres,
    flush_interval: Duration,
) -> (
    chatgate::conversations::ConversationLog,
    (tokio::sync::watch::Sender<bool>, tempfile::TempDir),
) {
    use pingora::services::background::BackgroundService;

    let spool = tempfile::tempdir().expect("spool");
    let settings = chatgate::config::ConversationLogSettings {
        url: Some(chatgate::config::Secret::new(pg.url().into_bytes())),
        spool_dir: spool.path().to_path_buf(),
        spool_max_bytes: 1 << 30,
        retention: Duration::from_secs(86_400),
        flush_interval,
        ca_file: None,
    };
    let (log, service) = chatgate::conversations::ConversationLog::new(settings);
    let (stop, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move { service.start(watch).await });
    (log, (stop, spool))
}

async fn row_count(pg: &Postgres) -> i64 {
    let client = pg.client().await;
    match client
        .query_one("SELECT count(*) FROM chatgate_conversations", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

/// CPU seconds (user and system) this test process has used so far.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a constant.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Records per second one writer sustains against a local PostgreSQL (fsync on).
/// Prints figures; asserts only that nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test conversations writer_throughput -- --ignored --nocapture"]
async fn writer_throughput() {
    use chatgate::conversations::db;

    let pg = Postgres::start_with_fsync(true);
    // 1. The batch write alone (new records: COPY into the table): 50 batches of 2,000.
    let mut client = db::connect(&pg.url(), None, Duration::from_secs(5))
        .await
        .expect("connect");
    db::migrate(&mut client).await.expect("migrate");
    let mut writer = db::Writer::new(client).await.expect("writer");
    let records: Vec<_> = (0..100_000).map(sample_record).collect();
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    for batch in records.chunks(2_000) {
        writer.write_new(batch).await.expect("write");
    }
    let cpu = process_cpu_seconds() - cpu_before;
    let took = started.elapsed();
    println!(
        "batch writes: {} records in {:.2?}: {:.0} records/s; this process's CPU (encoding, sending) {:.2} µs per record",
        records.len(),
        took,
        records.len() as f64 / took.as_secs_f64(),
        cpu / records.len() as f64 * 1e6
    );
    // Writing them all again (a replay) inserts nothing.
    assert_eq!(writer.write(&records[..2_000]).await.expect("replay"), 0);

    // 2. The whole writer service, fed at a steady 10,000 records/s for 5 s.
    let client = pg.client().await;
    client
        .batch_execute("TRUNCATE chatgate_conversations")
        .await
        .expect("truncate");
    let (log, _writer) = start_writer(&pg, Duration::from_millis(200));
    let rate = 10_000;
    let total = rate * 5;
    let started = Instant::now();
    for (i, record) in records.into_iter().take(total).enumerate() {
        log.submit(record);
        if i % 200 == 199 {
            let due = started + Duration::from_secs_f64((i + 1) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let fed = started.elapsed();
    let dropped = || {
        let text = String::from_utf8(chatgate::metrics::render().0).expect("metrics");
        Metrics::parse(&text).sum("chatgate_conversation_log_dropped_total", &[]) as i64
    };
    let n = poll(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || row_count(&pg),
        |n| *n + dropped() >= total as i64,
    )
    .await;
    let drained = started.elapsed();
    let metrics = String::from_utf8(chatgate::metrics::render().0).expect("metrics");
    let m = Metrics::parse(&metrics);
    println!(
        "writer service: {total} records fed in {fed:.2?} ({:.0}/s), {n} in PostgreSQL after {drained:.2?}: {:.0} records/s; spooled {}, dropped {}",
        total as f64 / fed.as_secs_f64(),
        n as f64 / drained.as_secs_f64(),
        m.sum("chatgate_conversation_log_spooled_total", &[]),
        m.sum("chatgate_conversation_log_dropped_total", &[]),
    );
    assert_eq!(n, total as i64);
    assert_eq!(m.sum("chatgate_conversation_log_dropped_total", &[]), 0.0);
}

/// Chat throughput with the record on vs off, same run, same simulator, rounds
/// alternated. Prints figures; asserts only that every recorded exchange arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test conversations record_on_vs_off -- --ignored --nocapture"]
async fn record_on_vs_off() {
    let pg = Postgres::start_with_fsync(true);
    let spool = tempfile::tempdir().expect("spool");
    let on = Recorded::start(&pg.url(), spool.path(), "").await;
    let redis = Redis::start();
    let mut off_cfg = config(&redis, &on.sim, &pg.url(), spool.path(), "");
    off_cfg.extra = String::new();
    let off_gw = Gateway::start(off_cfg);
    off_gw.add_user("temporary_user", USER_PASSWORD);
    let off_token = login(&off_gw, "temporary_user", USER_PASSWORD).await;

    let (requests, concurrency) = (2_000, 16);
    let round = |url: String, token: String| async move {
        let http = client();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in 0..requests / concurrency {
                    let t = Instant::now();
                    let resp = http
                        .post(&url)
                        .header("authorization", format!("Bearer {token}"))
                        .body(user(&format!("question {i} {}", "q".repeat(200))))
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(resp.status(), 200);
                    resp.bytes().await.expect("body");
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all.sort();
        let took = started.elapsed();
        (
            requests as f64 / took.as_secs_f64(),
            all[all.len() * 99 / 100],
        )
    };
    let mut figures = Vec::new();
    for r in 0..3 {
        let a = round(on.gw.url("/chatCompletionStream"), on.token.clone()).await;
        let b = round(off_gw.url("/chatCompletionStream"), off_token.clone()).await;
        println!(
            "round {r}: record on {:.0} req/s p99 {:.1?}; off {:.0} req/s p99 {:.1?}; on/off {:.2}",
            a.0,
            a.1,
            b.0,
            b.1,
            a.0 / b.0
        );
        figures.push(a.0 / b.0);
    }
    println!("throughput on/off per round: {figures:.2?}");
    let rows = rows_at_least(&pg, 3 * requests, Duration::from_secs(60)).await;
    assert_eq!(rows.len(), 3 * requests);
}

/// `instances` connections migrating the schema at once; each then sees the current version.
async fn migrate_at_once(url: &str, instances: usize) {
    use chatgate::conversations::db;
    let tasks: Vec<_> = (0..instances)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut client = db::connect(&url, None, Duration::from_secs(10)).await?;
                db::migrate(&mut client).await?;
                db::schema_version(&client).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(Some(db::SCHEMA_VERSION)));
    }
}

#[tokio::test]
async fn schema_creation_is_safe_with_several_instances_at_once() {
    use chatgate::conversations::db;
    let pg = Postgres::start();
    let url = pg.url();
    migrate_at_once(&url, 6).await;
    // And again on a database that has it: nothing to do, no error.
    let mut client = db::connect(&url, None, Duration::from_secs(10))
        .await
        .expect("connect");
    db::migrate(&mut client).await.expect("idempotent");
}

/// The rows of a query of two text columns, the second nullable.
async fn text_pairs(client: &tokio_postgres::Client, sql: &str) -> Vec<(String, Option<String>)> {
    client
        .query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The schema as the first release (version 1) created it, with its version row.
const SCHEMA_V1: &str = "
CREATE TABLE chatgate_schema (component text PRIMARY KEY, version integer NOT NULL);
INSERT INTO chatgate_schema VALUES ('conversations', 1);
CREATE TABLE chatgate_conversations (
    request_id text PRIMARY KEY, user_id bigint, username text, route text NOT NULL,
    model text NOT NULL, messages jsonb NOT NULL, answer text, outcome text NOT NULL,
    status integer, prompt_tokens integer, completion_tokens integer,
    started_at timestamptz NOT NULL, duration_ms double precision NOT NULL,
    ttfb_ms double precision);
CREATE INDEX chatgate_conversations_started_at ON chatgate_conversations (started_at);
CREATE INDEX chatgate_conversations_user ON chatgate_conversations (username, started_at);
";

/// A version 1 database, migrated by several instances at once: its rows are kept
/// byte for byte, the indexes are the same, and new long texts are stored with lz4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_migrated_with_its_rows() {
    use chatgate::conversations::db;
    let pg = Postgres::start();
    let client = pg.client().await;
    client.batch_execute(SCHEMA_V1).await.expect("v1 schema");
    let long = "x".repeat(4_000);
    client
        .batch_execute(&format!(
            "INSERT INTO chatgate_conversations (request_id, username, route, model, messages, answer, outcome, started_at, duration_ms)
             SELECT 'v1-' || i, 'alice', '/chatCompletion', 'm', '[{{\"role\":\"user\",\"content\":\"hi\"}}]',
                    CASE WHEN i = 1 THEN '{long}' ELSE 'answer ' || i END, 'ok', now() - i * interval '1 minute', 1
             FROM generate_series(1, 50) AS i"
        ))
        .await
        .expect("v1 rows");
    let before = pg.conversations().await;
    assert_eq!(before.len(), 50);

    let url = pg.url();
    migrate_at_once(&url, 4).await;
    assert_eq!(db::SCHEMA_VERSION, 2);
    assert_eq!(
        pg.conversations().await,
        before,
        "rows changed by the migration"
    );

    let indexes: Vec<String> = client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'chatgate_conversations' ORDER BY indexname",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "CREATE UNIQUE INDEX chatgate_conversations_pkey ON public.chatgate_conversations USING btree (request_id)",
            "CREATE INDEX chatgate_conversations_started_at ON public.chatgate_conversations USING btree (started_at)",
            "CREATE INDEX chatgate_conversations_user ON public.chatgate_conversations USING btree (username, started_at)",
        ]
    );
    let compression = text_pairs(
        &client,
        "SELECT attname::text, attcompression::text FROM pg_attribute
         WHERE attrelid = 'chatgate_conversations'::regclass AND attname IN ('messages', 'answer')
         ORDER BY attname",
    )
    .await;
    assert_eq!(
        compression,
        [
            ("answer".into(), Some("l".into())),
            ("messages".into(), Some("l".into()))
        ]
    );
    // Rows written by the migrated gateway's writer, straight (bench-0) and through
    // the replay's staging table (bench-1): their long answers are lz4; the old row
    // keeps pglz.
    let mut client2 = db::connect(&url, None, Duration::from_secs(10))
        .await
        .expect("connect");
    db::migrate(&mut client2).await.expect("idempotent");
    let mut writer = db::Writer::new(client2).await.expect("writer");
    let mut record = sample_record(0);
    record.answer = Some(long.clone());
    assert_eq!(writer.write_new(&[record]).await.expect("write"), 1);
    let mut replayed = sample_record(1);
    replayed.answer = Some(long.clone());
    assert_eq!(writer.write(&[replayed]).await.expect("replay"), 1);
    let methods = text_pairs(
        &client,
        "SELECT request_id, pg_column_compression(answer) FROM chatgate_conversations
         WHERE request_id IN ('v1-1', 'bench-0', 'bench-1') ORDER BY request_id",
    )
    .await;
    assert_eq!(
        methods,
        [
            ("bench-0".into(), Some("lz4".into())),
            ("bench-1".into(), Some("lz4".into())),
            ("v1-1".into(), Some("pglz".into()))
        ]
    );
}

#[tokio::test]
async fn rows_past_the_retention_are_deleted_in_the_background() {
    use chatgate::conversations::db;
    let pg = Postgres::start();
    let mut client = db::connect(&pg.url(), None, Duration::from_secs(10))
        .await
        .expect("connect");
    db::migrate(&mut client).await.expect("migrate");
    client
        .batch_execute(
            "INSERT INTO chatgate_conversations (request_id, route, model, messages, outcome, started_at, duration_ms)
             SELECT 'old-' || i, '/chatCompletion', 'm', '[]', 'ok', now() - interval '3 days', 1
             FROM generate_series(1, 12000) AS i;
             INSERT INTO chatgate_conversations (request_id, route, model, messages, outcome, started_at, duration_ms)
             VALUES ('recent', '/chatCompletion', 'm', '[]', 'ok', now() - interval '1 hour', 1);",
        )
        .await
        .expect("seed rows");
    let spool = tempfile::tempdir().expect("spool dir");
    let _s = Recorded::start(&pg.url(), spool.path(), "  retention: 2d\n").await;
    let left = poll(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || row_count(&pg),
        |n| *n == 1,
    )
    .await;
    assert_eq!(left, 1, "expired rows not deleted");
    assert_eq!(pg.conversations().await[0]["request_id"], "recent");
}

#[tokio::test]
async fn a_graceful_upgrade_during_an_outage_hands_the_spool_over() {
    let mut pg = Postgres::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let mut s = Recorded::start(&pg.url(), spool.path(), "").await;
    let mut ids = vec![s.chat("/chatCompletion", user("first")).await.0];
    rows_at_least(&pg, 1, Duration::from_secs(10)).await;
    pg.stop();
    for i in 0..5 {
        ids.push(s.chat("/chatCompletion", user(&format!("old {i}"))).await.0);
    }
    let mut new = s.gw.spawn_upgrade();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.gw.signal(libc::SIGQUIT);
    // Blocking is fine here: nothing else runs on this test's runtime meanwhile.
    assert!(
        s.gw.wait_exit(Duration::from_secs(30)),
        "the old process did not exit:\n{}",
        s.gw.log()
    );
    let port = s.gw.port;
    for i in 0..5 {
        let resp = client()
            .post(format!("http://127.0.0.1:{port}/chatCompletion"))
            .header("authorization", format!("Bearer {}", s.token))
            .body(user(&format!("new {i}")))
            .send()
            .await
            .expect("request to the upgraded process");
        assert_eq!(resp.status(), 200);
        ids.push(
            resp.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_string(),
        );
    }
    pg.restart();
    let rows = rows_at_least(&pg, ids.len(), Duration::from_secs(30)).await;
    let seen: Vec<&str> = rows
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(seen.len(), ids.len(), "{seen:?}\n{}", new.log());
    assert_eq!(
        seen.iter().copied().collect::<HashSet<_>>(),
        ids.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    assert!(new.is_running(), "{}", new.log());
}

/// The writer is not woken per record, only for a whole batch: a full batch is
/// written long before a (here very long) flush interval is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_is_written_before_the_flush_interval() {
    let pg = Postgres::start();
    let (log, _writer) = start_writer(&pg, Duration::from_secs(120));
    let batch = chatgate::conversations::MAX_BATCH;
    // The writer connects and creates the schema before it waits for records.
    poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            pg.client()
                .await
                .query_opt("SELECT to_regclass('chatgate_conversations')::text", &[])
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<String>>(0))
        },
        |t| t.is_some(),
    )
    .await;
    for i in 0..batch {
        log.submit(sample_record(i));
    }
    let n = poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || row_count(&pg),
        |n| *n >= batch as i64,
    )
    .await;
    assert_eq!(
        n, batch as i64,
        "a full batch waits for the 120 s flush interval"
    );
}

/// New records go straight into the table; a batch holding a request id that is
/// already there (a client repeating its `X-Request-Id`) still lands, each id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_repeated_request_id_still_lands() {
    use chatgate::conversations::db;

    let pg = Postgres::start();
    let mut client = db::connect(&pg.url(), None, Duration::from_secs(5))
        .await
        .expect("connect");
    db::migrate(&mut client).await.expect("migrate");
    let mut writer = db::Writer::new(client).await.expect("writer");
    let first: Vec<_> = (0..10).map(sample_record).collect();
    assert_eq!(writer.write_new(&first).await.expect("write"), 10);
    // Ids 5..15: five already written, and one repeated inside the batch.
    let mut second: Vec<_> = (5..15).map(sample_record).collect();
    second.push(sample_record(12));
    assert_eq!(writer.write_new(&second).await.expect("write"), 5);
    assert_eq!(row_count(&pg).await, 15);
    // The connection is still good for the next batch.
    let third: Vec<_> = (15..20).map(sample_record).collect();
    assert_eq!(writer.write_new(&third).await.expect("write"), 5);
    assert_eq!(row_count(&pg).await, 20);
}

/// TLS to PostgreSQL (`sslmode=require`): the record lands over TLS when the
/// server's CA is in `ca_file`; a certificate from an unknown CA or for another
/// name is refused, and so is plain TCP where the server takes only TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_record_lands_and_the_certificate_is_verified() {
    use chatgate::conversations::db;

    let certs = tempfile::tempdir().expect("certs");
    certs::make_certificates(certs.path());
    let ca = certs.path().join("ca.pem");
    let pg = Postgres::start_tls(certs.path());
    let tls_url = format!(
        "postgres://postgres:{PG_PASSWORD}@localhost:{}/postgres?sslmode=require",
        pg.port
    );
    let spool = tempfile::tempdir().expect("spool");
    let rec = Recorded::start(
        &tls_url,
        spool.path(),
        &format!("  ca_file: {}\n", ca.display()),
    )
    .await;
    let (id, _) = rec.chat("/chatCompletion", user("asked over TLS")).await;
    let rows = rows_at_least(&pg, 1, Duration::from_secs(20)).await;
    assert_eq!(rows[0]["request_id"], id);
    let over_tls: bool = pg
        .client()
        .await
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'chatgate'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(over_tls, "the gateway's session is not encrypted");

    let timeout = Duration::from_secs(5);
    let unknown_ca = db::connect(&tls_url, None, timeout)
        .await
        .expect_err("a certificate from a CA that is not trusted");
    assert!(unknown_ca.contains("certificate"), "{unknown_ca}");
    let by_address = tls_url.replace("@localhost:", "@127.0.0.1:");
    let wrong_name = db::connect(&by_address, Some(&ca), timeout)
        .await
        .expect_err("a certificate for localhost, reached as 127.0.0.1");
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    let plain = tls_url.replace("sslmode=require", "sslmode=disable");
    let refused = db::connect(&plain, Some(&ca), timeout)
        .await
        .expect_err("plain TCP to a TLS-only server");
    for text in [&unknown_ca, &wrong_name, &refused] {
        assert!(!text.contains(PG_PASSWORD), "{text}");
    }
    assert!(db::connect(&tls_url, Some(&ca), timeout).await.is_ok());
}
