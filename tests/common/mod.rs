//! The one test harness: starts real processes — `redis-server` on its own
//! port, the `chatgate` binary (gateway and simulator) on free ports — and
//! stops them on drop. Tests talk HTTP to them over loopback.

#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod certs;
pub mod demo;
pub mod prometheus;

/// The JWT secret every test gateway uses unless told otherwise.
pub const JWT_SECRET: &str = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz";

/// Path of the binary under test.
pub fn chatgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_chatgate")
}

/// A port nobody listens on right now, and one this test process has not
/// handed out before: tests run in parallel threads, and the kernel may offer
/// a just-released port again, which would put two of our processes (say a
/// gateway and a redis-server) on one port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[path = "../../src/test_redis.rs"]
mod test_redis;
use test_redis::redis_server;
/// A private `redis-server` on a free port, killed on drop.
pub use test_redis::RedisServer as Redis;

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Redis {
    /// Starts a fresh, empty Redis.
    pub fn start() -> Redis {
        Redis::start_on(free_port(), false)
    }
}

/// A `chatgate simulate` process, killed on drop.
pub struct Simulator {
    pub port: u16,
    child: Child,
}

impl Simulator {
    /// Starts a simulator with extra flags (see `chatgate simulate --help`).
    pub fn start(flags: &[&str]) -> Simulator {
        Self::start_on(free_port(), flags)
    }

    /// Starts a simulator on a given port.
    pub fn start_on(port: u16, flags: &[&str]) -> Simulator {
        let child = Command::new(chatgate_bin())
            .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn simulator");
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "simulator did not start"
        );
        Simulator { port, child }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The simulator's counters.
    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/_sim/stats", self.addr()))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// The chat requests it received, oldest first.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        reqwest::get(format!("http://{}/_sim/requests", self.addr()))
            .await
            .expect("requests")
            .json()
            .await
            .expect("requests json")
    }

    /// Stops it (an outage).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Settings a test varies in the generated config file.
pub struct GatewayConfig {
    /// `credentials:` section body (YAML, indented 4 spaces).
    pub credentials: String,
    /// `upstreams:` entries (YAML, indented 2 spaces); empty for none.
    pub upstreams: String,
    /// `routes:` entries (YAML, indented 2 spaces); empty for none.
    pub routes: String,
    /// Extra keys under `auth:` (indented 2 spaces).
    pub auth_extra: String,
    /// Top-level extra YAML.
    pub extra: String,
    /// Environment for the process.
    pub env: Vec<(String, String)>,
}

impl GatewayConfig {
    /// Redis-backed credentials and the two seed routes on `upstream_addrs`.
    pub fn redis(redis: &Redis, upstream_addrs: &[String]) -> GatewayConfig {
        GatewayConfig {
            credentials: format!(
                "    backend: redis\n    redis:\n      url: {}\n      key_prefix: \"cg:\"\n      timeout: 300ms\n",
                redis.url()
            ),
            upstreams: upstream_block("main", upstream_addrs, ""),
            routes: seed_routes("main"),
            auth_extra: String::new(),
            extra: String::new(),
            env: Vec::new(),
        }
    }
}

/// An `upstreams:` entry with fast test timeouts; `extra` adds keys (4-space indent).
pub fn upstream_block(name: &str, addrs: &[String], extra: &str) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "  {name}:\n    endpoints: [{}]\n    connect_timeout: 1s\n    first_byte_timeout: 5s\n    idle_timeout: 5s\n    total_timeout: 30s\n    retry_backoff: 10ms\n    retry_backoff_max: 50ms\n{extra}",
        list.join(", ")
    )
}

/// The seed's two routes with the seed's system prompt.
pub fn seed_routes(upstream: &str) -> String {
    format!(
        "  - path: /chatCompletion\n    kind: chat\n    upstream: {upstream}\n    model: test-model\n    system_prompt: \"You are the openEuler community assistant, your name is XiaoZhi.\"\n  - path: /chatCompletionStream\n    kind: chat_stream\n    upstream: {upstream}\n    model: test-model\n    system_prompt: \"You are the openEuler community assistant, your name is XiaoZhi.\"\n"
    )
}

/// A running gateway, killed on drop; its stderr (the logs) is kept in a file.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub env: Vec<(String, String)>,
}

/// Writes the config file for `cfg` into `dir` and returns its path.
pub fn write_config(dir: &Path, port: u16, admin_port: u16, cfg: &GatewayConfig) -> PathBuf {
    write_config_with_grace(dir, port, admin_port, cfg, 1, 1)
}

/// Per-user chat limits are off unless a test writes its own `rate_limits:` into
/// `extra`: traffic and ops tests send one user far more than the production defaults
/// allow. The failed-login limits keep their defaults.
const UNLIMITED_CHAT: &str =
    "rate_limits:\n  requests_per_minute: 0\n  tokens_per_minute: 0\n  tokens_per_day: 0\n";

/// Cheap password hashes, so that tests log in fast, unless a test writes its own
/// `password_hash:` into `auth_extra`.
const CHEAP_HASHES: &str = "  password_hash: { memory_kib: 1024, iterations: 1, parallelism: 1 }\n";

/// [`write_config`] with Pingora's grace period and shutdown timeout set.
pub fn write_config_with_grace(
    dir: &Path,
    port: u16,
    admin_port: u16,
    cfg: &GatewayConfig,
    grace_period_seconds: u64,
    graceful_shutdown_timeout_seconds: u64,
) -> PathBuf {
    let d = dir.display();
    let yaml = format!(
        "listen: [\"127.0.0.1:{port}\"]\nadmin_listen: \"127.0.0.1:{admin_port}\"\npingora:\n  threads: 2\n  grace_period_seconds: {grace_period_seconds}\n  graceful_shutdown_timeout_seconds: {graceful_shutdown_timeout_seconds}\n  upgrade_sock: {d}/upgrade.sock\n  pid_file: {d}/chatgate.pid\nauth:\n  token_ttl: 7d\n  jwt:\n    secret_env: CHATGATE_JWT_SECRET\n    previous_secrets_env: CHATGATE_JWT_PREVIOUS_SECRETS\n{}{}  credentials:\n{}{}{}{}",
        if cfg.auth_extra.lines().any(|l| l.starts_with("  password_hash:")) {
            ""
        } else {
            CHEAP_HASHES
        },
        cfg.auth_extra,
        cfg.credentials,
        if cfg.upstreams.is_empty() { String::new() } else { format!("upstreams:\n{}", cfg.upstreams) },
        if cfg.routes.is_empty() { String::new() } else { format!("routes:\n{}", cfg.routes) },
        if cfg.extra.lines().any(|l| l.starts_with("rate_limits:")) {
            cfg.extra.clone()
        } else {
            format!("{}{UNLIMITED_CHAT}", cfg.extra)
        },
    );
    let path = dir.join("chatgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path
}

/// Appends `extra` entries to the `listen:` list of a file from [`write_config`].
pub fn add_listeners(config_path: &Path, port: u16, extra: &[String]) {
    let text = std::fs::read_to_string(config_path).expect("read config");
    let plain = format!("listen: [\"127.0.0.1:{port}\"]");
    assert!(text.contains(&plain), "unexpected config layout");
    let all = std::iter::once(format!("\"127.0.0.1:{port}\""))
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>()
        .join(", ");
    let text = text.replacen(&plain, &format!("listen: [{all}]"), 1);
    std::fs::write(config_path, text).expect("write config");
}

impl Gateway {
    /// Starts `chatgate serve` with this config and waits until it listens.
    pub fn start(cfg: GatewayConfig) -> Gateway {
        Self::start_with_grace(cfg, 1, 1)
    }

    /// [`Gateway::start`] with Pingora's grace period and shutdown timeout set.
    pub fn start_with_grace(cfg: GatewayConfig, grace: u64, shutdown_timeout: u64) -> Gateway {
        Self::launch(cfg, grace, shutdown_timeout, &[], &[])
    }

    /// [`Gateway::start`] with more `listen:` entries (YAML flow form, e.g. a TLS
    /// listener) after the plain one; waits until every port in `ports` listens too.
    pub fn start_with_listeners(cfg: GatewayConfig, extra: &[String], ports: &[u16]) -> Gateway {
        Self::launch(cfg, 1, 1, extra, ports)
    }

    /// Writes the config (plus `extra` listeners), starts `serve` and waits until the
    /// public port and every port in `ports` listen.
    fn launch(
        cfg: GatewayConfig,
        grace: u64,
        shutdown_timeout: u64,
        extra: &[String],
        ports: &[u16],
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, admin_port) = (free_port(), free_port());
        let config_path =
            write_config_with_grace(dir.path(), port, admin_port, &cfg, grace, shutdown_timeout);
        if !extra.is_empty() {
            add_listeners(&config_path, port, extra);
        }
        let mut env = vec![("CHATGATE_JWT_SECRET".to_string(), JWT_SECRET.to_string())];
        env.extend(cfg.env.iter().cloned());
        let child = spawn_serve(dir.path(), &config_path, &env, false, "gateway.log");
        let mut gw = Gateway {
            port,
            admin_port,
            child,
            dir,
            config_path,
            env,
        };
        for p in std::iter::once(&port).chain(ports) {
            if !wait_for_port(*p, Duration::from_secs(15)) {
                let _ = gw.child.kill();
                panic!("gateway did not listen on {p}; log:\n{}", gw.log());
            }
        }
        gw
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `http://127.0.0.1:<admin port>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        settled_log(&self.dir.path().join("gateway.log"))
    }

    /// Runs `chatgate users ...` against this gateway's config, with `stdin`.
    pub fn users(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        users_cli(&self.config_path, args, stdin)
    }

    /// Adds a user through the CLI and asserts it worked.
    pub fn add_user(&self, name: &str, password: &str) {
        let out = self.users(&["add", name], Some(password));
        assert!(
            out.status.success(),
            "users add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's resident memory in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends a signal (`libc::SIGQUIT`, `libc::SIGTERM`, ...) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this harness owns.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits up to `within` for the process to exit; true if it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Starts a second process with `serve --upgrade` on the same config; it
    /// waits on the upgrade socket for this one's listeners (send SIGQUIT here next).
    pub fn spawn_upgrade(&self) -> Upgraded {
        let child = spawn_serve(
            self.dir.path(),
            &self.config_path,
            &self.env,
            true,
            "gateway-upgraded.log",
        );
        Upgraded {
            child,
            log_path: self.dir.path().join("gateway-upgraded.log"),
        }
    }

    /// The admin listener's `/metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let text = client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        Metrics::parse(&text)
    }
}

/// Starts `chatgate serve` (optionally `--upgrade`) logging into `dir/log_name`.
fn spawn_serve(
    dir: &Path,
    config_path: &Path,
    env: &[(String, String)],
    upgrade: bool,
    log_name: &str,
) -> Child {
    let log = std::fs::File::create(dir.join(log_name)).expect("log file");
    let mut cmd = Command::new(chatgate_bin());
    cmd.args(["serve", "--config"]).arg(config_path);
    if upgrade {
        cmd.arg("--upgrade");
    }
    // A test's own RUST_LOG (in `env`) wins over the default.
    cmd.env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn gateway")
}

/// The process started by [`Gateway::spawn_upgrade`], killed on drop.
pub struct Upgraded {
    child: Child,
    log_path: PathBuf,
}

impl Upgraded {
    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        settled_log(&self.log_path)
    }
}

/// A gateway's log file once it stopped growing: the gateway writes its log
/// from a background thread a moment after the request, so a test that reads
/// it right after a reply must let the queued lines land (an absent line must
/// be absent, not late).
pub fn settled_log(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut seen = std::fs::read_to_string(path).unwrap_or_default();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.len() == seen.len() || Instant::now() >= deadline {
            return now;
        }
        seen = now;
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// One series of a scrape: metric name, sorted label pairs, value.
type Series = (String, Vec<(String, String)>, f64);

/// A parsed Prometheus text scrape: one value per series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    series: Vec<Series>,
    /// The raw text, for failure messages.
    pub text: String,
}

impl Metrics {
    /// Parses the text format (label values without escaped quotes suffice here).
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = line.rsplit_once(' ').expect("series line");
            let value: f64 = value.parse().expect("series value");
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let mut labels: Vec<(String, String)> = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    labels.sort();
                    (name.to_string(), labels)
                }
                None => (head.to_string(), Vec::new()),
            };
            series.push((name, labels, value));
        }
        Metrics {
            series,
            text: text.to_string(),
        }
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any series of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.series.iter().any(|(n, _, _)| n == name)
    }

    /// Every label value of `label` seen on `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.series
            .iter()
            .filter(|(n, _, _)| n == name)
            .flat_map(|(_, l, _)| l.iter().filter(|(k, _)| k == label).map(|(_, v)| v.clone()))
            .collect()
    }
}

/// Sends raw bytes to `port`, then reads until the server closes or `wait` passes.
/// Returns what was read and whether the server closed the connection.
pub fn raw_exchange(port: u16, request: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = stream.write_all(request);
    read_until_close(&mut stream, wait)
}

/// Reads from `stream` until EOF (true) or until `wait` passes (false).
pub fn read_until_close(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    use std::io::Read;
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

/// The status code of a raw HTTP/1.1 response, if it has a status line.
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The body of a raw HTTP/1.1 response with a Content-Length (after the blank line).
pub fn raw_body(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Runs `chatgate users <args> --config <path>`, feeding `stdin`.
pub fn users_cli(config: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(chatgate_bin())
        .arg("users")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn users cli");
    if let Some(mut input) = child.stdin.take() {
        if let Some(text) = stdin {
            let _ = input.write_all(text.as_bytes());
        }
    }
    child.wait_with_output().expect("users cli output")
}

/// A gateway on its own Redis in front of `sims`, with one user logged in.
pub struct Stack {
    pub redis: Redis,
    pub sims: Vec<Simulator>,
    pub gw: Gateway,
    /// The logged-in user's token.
    pub token: String,
}

impl Stack {
    /// Starts the gateway with these upstreams, routes and extra top-level YAML, adds
    /// `temporary_user` and logs it in.
    pub async fn start(
        sims: Vec<Simulator>,
        upstreams: String,
        routes: String,
        extra: &str,
    ) -> Stack {
        let redis = Redis::start();
        let mut cfg = GatewayConfig::redis(&redis, &[]);
        cfg.upstreams = upstreams;
        cfg.routes = routes;
        cfg.extra = extra.to_string();
        let gw = Gateway::start(cfg);
        gw.add_user("temporary_user", "default_password");
        let token = login(&gw, "temporary_user", "default_password").await;
        Stack {
            redis,
            sims,
            gw,
            token,
        }
    }

    /// The first simulator.
    pub fn sim(&self) -> &Simulator {
        &self.sims[0]
    }

    /// POSTs a JSON `body` to `path` with the user's token.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        client()
            .post(self.gw.url(path))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request")
    }
}

/// A chat body of one user message.
pub fn user(text: &str) -> String {
    serde_json::to_string(&serde_json::json!([{"role": "user", "content": text}])).expect("json")
}

/// Runs `probe` every `every` until `done` accepts its result or `within` has passed, and
/// returns the last result, so the caller's assertion shows what was seen last.
pub async fn poll<T, F>(
    within: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T
where
    F: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + within;
    loop {
        let seen = probe().await;
        if done(&seen) || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `condition` holds, checking every 20 ms for at most `within`, and says
/// whether it did: for what a test cannot be told about (a log line written, a health
/// check run, a counter flushed), instead of sleeping a guessed time.
pub async fn eventually<F>(within: Duration, condition: impl FnMut() -> F) -> bool
where
    F: std::future::Future<Output = bool>,
{
    poll(within, Duration::from_millis(20), condition, |held| *held).await
}

/// A client with no connection reuse surprises and a sane timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Logs in with a urlencoded form and returns the token.
pub async fn login(gw: &Gateway, user: &str, password: &str) -> String {
    login_at(&gw.url("/auth"), user, password).await
}

/// Logs in at the `/auth` URL `auth_url` with a urlencoded form; returns the token.
pub async fn login_at(auth_url: &str, user: &str, password: &str) -> String {
    let resp = client()
        .post(auth_url)
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .expect("auth request");
    assert_eq!(resp.status(), 200, "login failed");
    let body: serde_json::Value = resp.json().await.expect("auth json");
    body["accessToken"]
        .as_str()
        .expect("accessToken")
        .to_string()
}

/// Reads a reply as (status, parsed JSON body), asserting the JSON content type.
pub async fn json_reply(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        resp.headers().contains_key("x-request-id"),
        "reply without X-Request-Id"
    );
    let text = resp.text().await.expect("body");
    assert_eq!(ct, "application/json", "content type of {status} {text}");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

/// The `errorMessage` of an error reply.
pub fn error_message(v: &serde_json::Value) -> &str {
    v["errorMessage"].as_str().unwrap_or("<no errorMessage>")
}

/// A private three-master Redis Cluster (no replicas) on free ports, made with
/// `redis-cli --cluster create`; every node is killed on drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three nodes and joins them into one cluster covering all slots.
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = redis_server(*port, &node_dir)
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .spawn()
                .expect("redis-server");
            children.push(child);
        }
        let cluster = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        for port in &cluster.ports {
            assert!(
                wait_for_port(*port, Duration::from_secs(10)),
                "cluster node did not start"
            );
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = cluster.ports.iter().all(|p| {
                let info = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false);
                info
            });
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// The `cluster:` list for the config.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A `credentials:` section using this cluster.
    pub fn credentials(&self) -> String {
        let list: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "    backend: redis\n    redis:\n      cluster: [{}]\n      key_prefix: \"cg:\"\n      timeout: 500ms\n",
            list.join(", ")
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            kill(c);
        }
    }
}

/// The newest installed PostgreSQL's `bin` directory (Debian's `postgresql` package).
pub fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL must be installed (scripts/install-deps.sh installs it)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("no /usr/lib/postgresql/<version>/bin/initdb")
}

/// A private PostgreSQL server on a free port, its data in a temporary
/// directory; stopped on drop. `initdb` and `postgres` refuse to run as root,
/// so when the tests run as root both run as the `postgres` user (`runuser`)
/// in a directory that user owns. `fsync` is off: a test server's data need
/// not survive a power cut.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    fsync: bool,
}

impl Postgres {
    /// Creates a fresh cluster and starts it.
    pub fn start() -> Postgres {
        Self::start_with_fsync(false)
    }

    /// [`Postgres::start`] with `fsync` on, as in production (for benchmarks).
    pub fn start_with_fsync(fsync: bool) -> Postgres {
        Self::start_with(fsync, None)
    }

    /// A server that takes TCP clients over TLS only (`hostssl`), with the
    /// certificate and key files in `cert_dir` (`server.pem`, `server.key`, as
    /// [`certs::make_certificates`] makes them); the unix socket stays plain.
    pub fn start_tls(cert_dir: &Path) -> Postgres {
        Self::start_with(false, Some(cert_dir))
    }

    fn start_with(fsync: bool, tls: Option<&Path>) -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres failed");
        }
        let out = Self::as_postgres(as_root, "initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(certs) = tls {
            let data = dir.path().join("data");
            for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key")] {
                std::fs::copy(certs.join(from), data.join(to)).expect("copy certificate");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("postgresql.conf");
            writeln!(conf, "ssl = on").expect("ssl = on");
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
            if as_root {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key"))
                    .status()
                    .expect("chown");
                assert!(status.success(), "chown postgres failed");
            }
        }
        std::fs::create_dir_all(dir.path().join("sock")).expect("socket dir");
        if as_root {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path().join("sock"))
                .status();
        }
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
            fsync,
        };
        pg.spawn();
        pg
    }

    fn as_postgres(as_root: bool, program: &str) -> Command {
        let path = postgres_bin_dir().join(program);
        if as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn spawn(&mut self) {
        let as_root = unsafe { libc::geteuid() } == 0;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("postgres log");
        let child = Self::as_postgres(as_root, "postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(if self.fsync { "fsync=on" } else { "fsync=off" })
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Listening is not ready: it answers "starting up" for a moment.
        while Instant::now() < deadline {
            if wait_for_port(self.port, Duration::from_millis(200)) {
                let ok = std::process::Command::new(postgres_bin_dir().join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres did not start: {}", self.log());
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: clients are disconnected); its data stays.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        match pid {
            // SAFETY: kill(2) on the postmaster this fixture started.
            Some(pid) => unsafe {
                libc::kill(pid, libc::SIGINT);
            },
            None => {
                let _ = child.kill();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        kill(&mut child);
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A client connection through the unix socket (its driver runs on the current
    /// tokio runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        let socket = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().join("sock").display(),
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&socket, tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        tokio::spawn(connection);
        client
    }

    /// Every row of `chatgate_conversations` as JSON (columns as keys), oldest first;
    /// empty while the table does not exist.
    pub async fn conversations(&self) -> Vec<serde_json::Value> {
        let client = self.client().await;
        let Ok(rows) = client
            .query(
                "SELECT row_to_json(c)::text FROM chatgate_conversations c ORDER BY started_at, request_id",
                &[],
            )
            .await
        else {
            return Vec::new();
        };
        rows.iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).expect("row json"))
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
