//! Configuration: the YAML file (`raw`) is parsed once at start-up into the
//! validated [`Config`] below — durations parsed, routes resolved to upstreams,
//! secrets read. Nothing downstream re-checks strings.

mod duration;
mod raw;
mod size;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use pingora::server::configuration::ServerConf;

pub use duration::{parse_duration, ConfigDuration};
pub use size::{parse_bytes, ConfigBytes};

use crate::auth::password::{PasswordParams, DEFAULT_QUEUE_TIMEOUT};
use crate::auth::store::redis::RedisSettings;
use crate::auth::token::{TokenAlgorithm, DEFAULT_LEEWAY};
use crate::breaker::BreakerSettings;
use crate::chat::DataFormat;
use crate::gateway::client_ip::parse_trusted;
use crate::limits::{ChatLimits, LimitSettings, OnStoreError, Rate};
use crate::tls::{CertFile, ListenerCert};
use raw::{RawBackend, RawConfig, RawEndpoint, RawListen, RawRouteKind, RawUpstream};

impl From<raw::RawOnStoreError> for OnStoreError {
    fn from(raw: raw::RawOnStoreError) -> Self {
        match raw {
            raw::RawOnStoreError::Allow => OnStoreError::Allow,
            raw::RawOnStoreError::Deny => OnStoreError::Deny,
        }
    }
}

/// Longest accepted `auth.jwt.leeway`.
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(3600);

/// The shortest JWT secret start-up accepts (RFC 7518 §3.2 asks for at least
/// the hash size for HS256).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// A configuration problem, naming the file, the line when known, and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: String,
    /// 1-based line of the offending key, when it could be found.
    pub line: Option<usize>,
    /// `key.path: what is wrong`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A secret read from the environment or a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
    /// The secret's bytes, for the one place that needs them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// The secret as text (API keys are ASCII); lossy for anything else.
    pub fn expose_str(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// The validated configuration of one gateway process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a path, or `<demo>`), for messages.
    pub source: String,
    /// The public listeners, plain or TLS.
    pub listen: Vec<Listener>,
    /// Address of the operations listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_listen: Option<String>,
    /// Settings handed to Pingora's `ServerConf`.
    pub server: ServerSettings,
    /// Request size limits.
    pub limits: Limits,
    /// Rate, token and failed-login limits, usage accounting.
    pub rate_limits: LimitSettings,
    /// Login, tokens and the credential store.
    pub auth: AuthSettings,
    /// Upstream LLM backends, referenced by index from routes.
    pub upstreams: Vec<Arc<UpstreamSettings>>,
    /// Chat routes in file order.
    pub routes: Vec<RouteSettings>,
    /// Cross-origin rules of the public listener; `None`: no CORS headers.
    pub cors: Option<CorsSettings>,
    /// Proxies whose `X-Forwarded-For` names the client; empty: the TCP peer is the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Where every exchange is recorded; `None`: no conversation record (the default).
    pub conversation_log: Option<ConversationLogSettings>,
    /// Where spans go (OTLP/HTTP); `None`: no tracing (the default).
    pub tracing: Option<TracingSettings>,
}

/// OpenTelemetry traces (`tracing:`).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's traces URL: `otlp_endpoint` with `/v1/traces` appended.
    pub traces_url: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Share of new traces kept (parent-based: a sampled incoming trace is always kept).
    pub sample_ratio: f64,
}

/// The conversation record in PostgreSQL (`conversation_log:`).
#[derive(Debug, Clone)]
pub struct ConversationLogSettings {
    /// The `postgres://` URL; `None` only when secrets were not read
    /// ([`SecretsPolicy::Skip`]) and `url_env` is unset.
    pub url: Option<Secret>,
    /// Where records wait while PostgreSQL is unreachable.
    pub spool_dir: PathBuf,
    /// Past this many spooled bytes, records are dropped (and counted).
    pub spool_max_bytes: u64,
    /// Rows older than this are deleted in the background.
    pub retention: Duration,
    /// How often queued records are written: what a killed process can lose at most.
    pub flush_interval: Duration,
}

/// One address of the public listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `IP:port` it binds.
    pub address: String,
    /// TLS, with HTTP/2 offered by ALPN; `None`: plain HTTP/1.1.
    pub tls: Option<ListenerTls>,
}

impl Listener {
    /// A plain HTTP/1.1 listener on `address`.
    pub fn plain(address: impl Into<String>) -> Self {
        Listener {
            address: address.into(),
            tls: None,
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tls {
            None => write!(f, "{}", self.address),
            Some(tls) => write!(
                f,
                "{} (TLS, h2 + http/1.1, certificate {})",
                self.address,
                tls.cert_file.display()
            ),
        }
    }
}

/// The certificate of a TLS listener.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first (absolute).
    pub cert_file: PathBuf,
    /// PEM private key of the leaf (absolute).
    pub key_file: PathBuf,
    /// Both as read and checked at load; `None` when secrets were not read.
    pub cert: Option<ListenerCert>,
}

/// Which browser origins may call the public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsSettings {
    /// Exact origins (`https://app.example.com`), compared case-insensitively.
    pub allowed_origins: Vec<String>,
    /// `*` was listed: every origin is allowed (and echoed, never `*`).
    pub any_origin: bool,
    /// Request headers a page may send; always includes `Authorization`, `Content-Type`.
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age: Duration,
    /// Send `Access-Control-Allow-Credentials: true` (cookies or TLS client certificates).
    pub allow_credentials: bool,
}

impl CorsSettings {
    /// Whether a page from `origin` may call.
    pub fn allows(&self, origin: &str) -> bool {
        self.any_origin
            || self
                .allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// An active HTTP health check of every endpoint of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// Path requested with `GET`; any status below 500 counts as healthy.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
}

/// The subset of Pingora's `ServerConf` an operator sets.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub work_stealing: bool,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub upstream_keepalive_pool_size: usize,
}

impl ServerSettings {
    /// Pingora's server configuration for these settings.
    pub fn server_conf(&self) -> ServerConf {
        ServerConf {
            threads: self.threads,
            work_stealing: self.work_stealing,
            grace_period_seconds: Some(self.grace_period_seconds),
            graceful_shutdown_timeout_seconds: Some(self.graceful_shutdown_timeout_seconds),
            upgrade_sock: self.upgrade_sock.clone(),
            pid_file: self.pid_file.clone(),
            error_log: self.error_log.clone(),
            user: self.user.clone(),
            group: self.group.clone(),
            upstream_keepalive_pool_size: self.upstream_keepalive_pool_size,
            ..ServerConf::default()
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: 2,
            work_stealing: true,
            grace_period_seconds: 60,
            graceful_shutdown_timeout_seconds: 10,
            upgrade_sock: "/tmp/chatgate_upgrade.sock".into(),
            pid_file: "/tmp/chatgate.pid".into(),
            error_log: None,
            user: None,
            group: None,
            upstream_keepalive_pool_size: 128,
        }
    }
}

/// Request body limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest chat request body (default 1 MiB).
    pub max_body_bytes: usize,
    /// Largest `/auth` request body (default 64 KiB).
    pub max_auth_body_bytes: usize,
    /// Longest time to receive a whole request body (default 30 s); slower clients are
    /// disconnected.
    pub body_timeout: Duration,
    /// Open connections on the public listeners; `None`: derived from the
    /// open-file limit at start (see `connections::default_max_connections`).
    pub max_connections: Option<usize>,
    /// Open connections from one client address (default 256; 0: no cap).
    pub max_connections_per_ip: usize,
    /// Longest time to receive a request's headers, as a whole (default 10 s).
    pub header_timeout: Duration,
    /// Longest idle time of a kept-alive connection between requests (default 60 s).
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_auth_body_bytes: 64 << 10,
            body_timeout: Duration::from_secs(30),
            max_connections: None,
            max_connections_per_ip: 256,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
        }
    }
}

/// Login and token settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Lifetime of issued tokens (default 7 days).
    pub token_ttl: Duration,
    /// The one JWT algorithm accepted and issued.
    pub algorithm: TokenAlgorithm,
    /// The secret that signs new tokens.
    pub secret: Secret,
    /// Older secrets that still verify tokens during a rotation.
    pub previous_secrets: Vec<Secret>,
    /// Clock skew forgiven on a token's `iat`/`nbf` (future) and `exp` (past).
    pub jwt_leeway: Duration,
    /// argon2id parameters for new hashes.
    pub password: PasswordParams,
    /// How many password hashes may run at once.
    pub hash_concurrency: usize,
    /// How long a login waits for a free hashing thread before it is answered 429.
    pub hash_queue_timeout: Duration,
    /// How long the chat path trusts a cached "user exists and is enabled".
    pub user_cache_ttl: Duration,
    /// A valid token whose user's status cannot be read (store down, user not cached):
    /// `Allow` trusts the signature, `Deny` answers 503.
    pub on_store_error: OnStoreError,
    /// Where users live.
    pub credentials: CredentialSettings,
}

/// The credential store backend.
#[derive(Debug, Clone)]
pub enum CredentialSettings {
    /// Redis or Redis Cluster.
    Redis(RedisSettings),
    /// A YAML users file.
    File(PathBuf),
    /// In memory only (the demo).
    Memory,
}

impl CredentialSettings {
    /// A short description for `chatgate check`, without secrets.
    pub fn describe(&self) -> String {
        match self {
            CredentialSettings::Redis(r) if !r.cluster.is_empty() => {
                format!(
                    "redis cluster ({} seed nodes), prefix {:?}",
                    r.cluster.len(),
                    r.key_prefix
                )
            }
            CredentialSettings::Redis(r) => {
                format!(
                    "redis {}, prefix {:?}",
                    crate::redact::redact_url(&r.url),
                    r.key_prefix
                )
            }
            CredentialSettings::File(p) => format!("file {}", p.display()),
            CredentialSettings::Memory => "in-memory (demo)".into(),
        }
    }
}

/// One upstream endpoint as configured: a host name or IP, a port, a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    /// Host name or IP literal (without IPv6 brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Relative share of traffic.
    pub weight: u32,
}

impl EndpointSettings {
    /// `host:port` as written for logs and labels (IPv6 bracketed).
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// An OpenAI-compatible backend.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The name routes refer to.
    pub name: String,
    /// Where it listens.
    pub endpoints: Vec<EndpointSettings>,
    /// Whether to speak TLS (rustls, verified).
    pub tls: bool,
    /// SNI and certificate name; defaults to the endpoint host.
    pub sni: Option<String>,
    /// PEM file of CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// `Host` header; defaults to the endpoint's `host[:port]`.
    pub host_header: Option<String>,
    /// Path prefix before `/chat/completions` (default `/v1`).
    pub base_path: String,
    /// API keys used in rotation; may be empty (local backends).
    pub api_keys: Vec<Secret>,
    /// Whether streaming requests ask for `stream_options.include_usage`.
    pub stream_usage: bool,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    /// Extra attempts after the first, before any byte went to the client.
    pub retries: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long a key answered with 401/429 is skipped.
    pub key_cooldown: Duration,
    /// How often host names are resolved again.
    pub dns_refresh: Duration,
    /// Active health check, if configured.
    pub health_check: Option<HealthCheckSettings>,
    /// Failed calls in a row (connect error, timeout, 5xx) that eject an endpoint; 0: never.
    pub eject_after_failures: u32,
    /// How long an ejected endpoint gets no traffic.
    pub eject_cooldown: Duration,
}

impl UpstreamSettings {
    /// Settings with the documented defaults for a plain HTTP backend.
    pub fn with_defaults(name: &str, endpoints: Vec<EndpointSettings>) -> Self {
        UpstreamSettings {
            name: name.to_string(),
            endpoints,
            tls: false,
            sni: None,
            ca_file: None,
            host_header: None,
            base_path: "/v1".into(),
            api_keys: Vec::new(),
            stream_usage: true,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(600),
            retries: 2,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(5),
            key_cooldown: Duration::from_secs(30),
            dns_refresh: Duration::from_secs(60),
            health_check: None,
            eject_after_failures: 3,
            eject_cooldown: Duration::from_secs(10),
        }
    }
}

/// Whether a chat route answers with one JSON object or an SSE stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// `{"message": ...}`.
    Chat,
    /// Server-Sent Events.
    ChatStream,
    /// OpenAI chat-completions bodies passed through, model policy applied.
    Openai,
}

/// A chat route.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Exact request path.
    pub path: String,
    pub kind: RouteKind,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Model name sent upstream; on `openai` routes the forced model, or
    /// empty when the client's choice among `allowed_models` is kept.
    pub model: String,
    /// `openai` routes: the models a client may ask for (empty: `model` is forced).
    pub allowed_models: Vec<String>,
    /// Prepended as a system message when the client sent none.
    pub system_prompt: Option<String>,
    /// Extra OpenAI request fields (`temperature`, `max_tokens`, ...).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// How streamed text is put into `data:` lines.
    pub data_format: DataFormat,
    /// SSE comment interval during upstream silence.
    pub keepalive_interval: Duration,
    /// Largest request body for this route.
    pub max_body_bytes: usize,
    /// Longest time to receive the request body (`limits.body_timeout`).
    pub body_timeout: Duration,
    /// Limits of this route alone, on top of the global `rate_limits`.
    pub rate_limits: ChatLimits,
    /// Completion tokens reserved per call: the route's `max_tokens`, else
    /// `rate_limits.completion_estimate`.
    pub completion_estimate: u64,
    /// Whether its exchanges go to the conversation record (it is configured and the
    /// route does not say `conversation_log: false`).
    pub conversation_log: bool,
}

/// OpenAI request fields the gateway sets itself; `params` may not override them.
const RESERVED_PARAMS: &[&str] = &["model", "messages", "stream", "stream_options"];

impl Config {
    /// Reads, parses and validates a config file, secrets included.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, SecretsPolicy::Required)
    }

    /// Reads a config file; with [`SecretsPolicy::Skip`] the JWT secret and
    /// API keys are not read (user administration needs neither).
    pub fn load_with(path: &Path, secrets: SecretsPolicy) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::from_yaml(
            &file,
            &text,
            path.parent().unwrap_or(Path::new(".")),
            secrets,
        )
    }

    /// Parses and validates YAML text; `base_dir` anchors relative paths.
    pub fn from_yaml(
        file: &str,
        text: &str,
        base_dir: &Path,
        secrets: SecretsPolicy,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        Validator {
            file,
            text,
            base_dir,
            secrets,
        }
        .validate(raw)
    }

    /// The upstream a route sends to.
    pub fn route_upstream(&self, route: &RouteSettings) -> &Arc<UpstreamSettings> {
        &self.upstreams[route.upstream]
    }
}

/// Whether loading a config reads its secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretsPolicy {
    /// Read and check every secret (serving, `check`).
    Required,
    /// Leave secrets unread (user administration).
    Skip,
}

/// Turns the raw file into [`Config`], producing errors that point into the text.
struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    base_dir: &'a Path,
    secrets: SecretsPolicy,
}

impl Validator<'_> {
    fn error(&self, key: &str, near: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: self.locate(near),
            message: format!("{key}: {message}"),
        }
    }

    /// `d` itself, or the error `<key>: must be greater than 0` at the line of `near`.
    fn positive(&self, key: &str, near: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            Err(self.error(key, near, "must be greater than 0"))
        } else {
            Ok(d)
        }
    }

    /// The first line that contains `needle`, to point the operator at it.
    fn locate(&self, needle: &str) -> Option<usize> {
        if needle.is_empty() {
            return None;
        }
        self.text
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
    }

    /// The first line that contains every one of `needles`.
    fn locate_all(&self, needles: &[&str]) -> Option<usize> {
        self.text
            .lines()
            .position(|l| needles.iter().all(|n| l.contains(n)))
            .map(|i| i + 1)
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.listen.is_empty() {
            return Err(self.error("listen", "listen:", "at least one address is required"));
        }
        let addresses = raw.listen.iter().map(|l| &l.address);
        let mut bound = HashSet::new();
        for addr in addresses.chain(raw.admin_listen.iter()) {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.error(
                    "listen",
                    addr,
                    format!("{addr:?} is not an IP:port address"),
                ));
            }
            if !bound.insert(addr) {
                return Err(self.error("listen", addr, format!("{addr} is listed twice")));
            }
        }
        let listen = raw
            .listen
            .into_iter()
            .enumerate()
            .map(|(i, l)| self.listener(i, l))
            .collect::<Result<Vec<_>, _>>()?;
        let defaults = ServerSettings::default();
        let p = raw.pingora;
        let server = ServerSettings {
            threads: p.threads.unwrap_or(defaults.threads).max(1),
            work_stealing: p.work_stealing.unwrap_or(defaults.work_stealing),
            grace_period_seconds: p
                .grace_period_seconds
                .unwrap_or(defaults.grace_period_seconds),
            graceful_shutdown_timeout_seconds: p
                .graceful_shutdown_timeout_seconds
                .unwrap_or(defaults.graceful_shutdown_timeout_seconds),
            upgrade_sock: p.upgrade_sock.unwrap_or(defaults.upgrade_sock),
            pid_file: p.pid_file.unwrap_or(defaults.pid_file),
            error_log: p.error_log,
            user: p.user,
            group: p.group,
            upstream_keepalive_pool_size: p
                .upstream_keepalive_pool_size
                .unwrap_or(defaults.upstream_keepalive_pool_size),
        };
        let limit_defaults = Limits::default();
        let limits = Limits {
            max_body_bytes: raw
                .limits
                .max_body_bytes
                .unwrap_or(limit_defaults.max_body_bytes),
            max_auth_body_bytes: raw
                .limits
                .max_auth_body_bytes
                .unwrap_or(limit_defaults.max_auth_body_bytes),
            body_timeout: raw
                .limits
                .body_timeout
                .map_or(limit_defaults.body_timeout, |d| d.0),
            max_connections: raw.limits.max_connections,
            max_connections_per_ip: raw
                .limits
                .max_connections_per_ip
                .unwrap_or(limit_defaults.max_connections_per_ip),
            header_timeout: raw
                .limits
                .header_timeout
                .map_or(limit_defaults.header_timeout, |d| d.0),
            keepalive_timeout: raw
                .limits
                .keepalive_timeout
                .map_or(limit_defaults.keepalive_timeout, |d| d.0),
        };
        if limits.max_connections == Some(0) {
            return Err(self.error(
                "limits.max_connections",
                "max_connections",
                "must be greater than 0 (leave it out for the default from the open-file limit)",
            ));
        }
        if limits.max_body_bytes == 0 || limits.max_auth_body_bytes == 0 {
            return Err(self.error("limits", "limits:", "body limits must be greater than 0"));
        }
        self.positive("limits.body_timeout", "body_timeout", limits.body_timeout)?;
        self.positive(
            "limits.header_timeout",
            "header_timeout",
            limits.header_timeout,
        )?;
        if limits.keepalive_timeout < Duration::from_secs(1) {
            return Err(self.error(
                "limits.keepalive_timeout",
                "keepalive_timeout",
                "must be at least 1s (Pingora counts it in whole seconds)",
            ));
        }
        let auth = self.auth(raw.auth)?;
        let rate_limits = self.rate_limits(raw.rate_limits)?;

        let mut upstreams = Vec::new();
        for (name, u) in raw.upstreams {
            upstreams.push(Arc::new(self.upstream(&name, u)?));
        }
        let conversation_log = raw
            .conversation_log
            .map(|c| self.conversation_log(c))
            .transpose()?;
        let tracing = raw.tracing.map(|t| self.tracing(t)).transpose()?;
        let mut routes = Vec::new();
        let mut seen = HashSet::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.path.starts_with('/') {
                return Err(self.error(
                    &key,
                    &r.path,
                    format!("path {:?} must start with '/'", r.path),
                ));
            }
            if r.path == "/auth" || !seen.insert(r.path.clone()) {
                return Err(self.error(
                    &key,
                    &r.path,
                    format!("path {:?} is already taken", r.path),
                ));
            }
            let Some(upstream) = upstreams.iter().position(|u| u.name == r.upstream) else {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(self.error(
                    &format!("{key}.upstream"),
                    &format!("upstream: {}", r.upstream),
                    format!(
                        "unknown upstream {:?} (defined: {})",
                        r.upstream,
                        known.join(", ")
                    ),
                ));
            };
            let (model, allowed_models) = match (r.kind, r.model, r.models) {
                (RawRouteKind::Openai, None, Some(models)) => {
                    if models.is_empty() || models.iter().any(|m| m.trim().is_empty()) {
                        return Err(self.error(
                            &format!("{key}.models"),
                            "models:",
                            "list at least one model, none empty",
                        ));
                    }
                    (String::new(), models)
                }
                (_, Some(model), None) if !model.trim().is_empty() => (model, Vec::new()),
                (_, Some(_), None) => {
                    return Err(self.error(&format!("{key}.model"), "model:", "must not be empty"))
                }
                (RawRouteKind::Openai, _, _) => {
                    return Err(self.error(
                        &key,
                        &r.path,
                        "an openai route needs exactly one of `model` (forced) or `models` (allowed list)",
                    ))
                }
                (_, _, _) => {
                    return Err(self.error(
                        &format!("{key}.model"),
                        &r.path,
                        "a chat route needs `model` (and no `models`)",
                    ))
                }
            };
            if let Some(reserved) = RESERVED_PARAMS.iter().find(|k| r.params.contains_key(**k)) {
                return Err(self.error(
                    &format!("{key}.params"),
                    &format!("{reserved}:"),
                    format!("{reserved:?} is set by the gateway and cannot be a route parameter"),
                ));
            }
            let completion_estimate = ["max_tokens", "max_completion_tokens"]
                .iter()
                .find_map(|k| r.params.get(*k).and_then(serde_json::Value::as_u64))
                .unwrap_or(rate_limits.completion_estimate);
            routes.push(RouteSettings {
                path: r.path,
                kind: match r.kind {
                    RawRouteKind::Chat => RouteKind::Chat,
                    RawRouteKind::ChatStream => RouteKind::ChatStream,
                    RawRouteKind::Openai => RouteKind::Openai,
                },
                upstream,
                model,
                allowed_models,
                system_prompt: r.system_prompt.filter(|s| !s.is_empty()),
                params: r.params,
                data_format: r.data_format.unwrap_or_default(),
                keepalive_interval: r
                    .keepalive_interval
                    .map_or(Duration::from_secs(15), |d| d.0),
                max_body_bytes: r.max_body_bytes.unwrap_or(limits.max_body_bytes),
                body_timeout: limits.body_timeout,
                rate_limits: r.rate_limits.map_or(ChatLimits::default(), |l| {
                    chat_limits(l.requests_per_minute, l.tokens_per_minute, l.tokens_per_day)
                }),
                completion_estimate,
                conversation_log: conversation_log.is_some() && r.conversation_log != Some(false),
            });
        }
        if routes.iter().any(|r| r.keepalive_interval.is_zero()) {
            return Err(self.error(
                "routes.keepalive_interval",
                "keepalive_interval",
                "must be greater than 0",
            ));
        }
        let cors = raw.cors.map(|c| self.cors(c)).transpose()?;
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .map(|entry| parse_trusted(entry).map_err(|m| self.error("trusted_proxies", entry, m)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            cors,
            trusted_proxies,
            conversation_log,
            tracing,
            source: self.file.to_string(),
            listen,
            admin_listen: raw.admin_listen,
            server,
            limits,
            rate_limits,
            auth,
            upstreams,
            routes,
        })
    }

    /// `listen[i]`: a plain address, or one with TLS whose certificate and key
    /// are read and checked now (unless secrets are skipped).
    fn listener(&self, i: usize, l: RawListen) -> Result<Listener, ConfigError> {
        let Some(tls) = l.tls else {
            return Ok(Listener::plain(l.address));
        };
        let cert_file = self.resolve_path(&tls.cert_file);
        let key_file = self.resolve_path(&tls.key_file);
        let cert = match self.secrets {
            SecretsPolicy::Skip => None,
            SecretsPolicy::Required => Some(ListenerCert::load(&cert_file, &key_file).map_err(
                |problem| {
                    let (name, written) = match problem.file {
                        CertFile::Chain => ("cert_file", &tls.cert_file),
                        CertFile::Key => ("key_file", &tls.key_file),
                    };
                    let written = written.display().to_string();
                    ConfigError {
                        // The line with this key and its value: the two files may be one.
                        line: self
                            .locate_all(&[&format!("{name}:"), &written])
                            .or_else(|| self.locate(&written)),
                        ..self.error(&format!("listen[{i}].tls.{name}"), "", problem.message)
                    }
                },
            )?),
        };
        Ok(Listener {
            address: l.address,
            tls: Some(ListenerTls {
                cert_file,
                key_file,
                cert,
            }),
        })
    }

    fn conversation_log(
        &self,
        c: raw::RawConversationLog,
    ) -> Result<ConversationLogSettings, ConfigError> {
        let key = "conversation_log";
        let url = match (&c.url, &c.url_env) {
            (Some(u), None) => Some(Secret::new(u.clone().into_bytes())),
            (None, Some(var)) if self.secrets == SecretsPolicy::Skip => std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| Secret::new(v.into_bytes())),
            (None, Some(var)) => Some(self.env_secret(&format!("{key}.url_env"), var)?),
            (None, None) => {
                return Err(self.error(key, "conversation_log:", "set url_env (or url)"))
            }
            _ => return Err(self.error(key, "url", "set at most one of url or url_env")),
        };
        if let Some(url) = &url {
            // The text is never quoted back: it may hold a password.
            let parsed: tokio_postgres::Config = url.expose_str().parse().map_err(|_| {
                self.error(
                    key,
                    if c.url.is_some() { "url:" } else { "url_env" },
                    "not a valid PostgreSQL URL (postgres://user@host:port/database)",
                )
            })?;
            if c.url.is_some() && parsed.get_password().is_some() {
                return Err(self.error(
                    &format!("{key}.url"),
                    "url:",
                    "holds a password; put the URL in an environment variable and name it in url_env",
                ));
            }
        }
        let spool_max_bytes = c.spool_max_bytes.map_or(1 << 30, |b| b.0);
        if spool_max_bytes == 0 {
            return Err(self.error(
                &format!("{key}.spool_max_bytes"),
                "spool_max_bytes",
                "must be greater than 0",
            ));
        }
        let retention = self.positive(
            &format!("{key}.retention"),
            "retention",
            c.retention
                .map_or(Duration::from_secs(90 * 86_400), |d| d.0),
        )?;
        let flush_interval = self.positive(
            &format!("{key}.flush_interval"),
            "flush_interval",
            c.flush_interval.map_or(Duration::from_millis(200), |d| d.0),
        )?;
        Ok(ConversationLogSettings {
            url,
            spool_dir: self.resolve_path(
                &c.spool_dir
                    .unwrap_or_else(|| PathBuf::from("/var/lib/chatgate/spool")),
            ),
            spool_max_bytes,
            retention,
            flush_interval,
        })
    }

    fn tracing(&self, t: raw::RawTracing) -> Result<TracingSettings, ConfigError> {
        // Never quoted back: the URL may carry credentials.
        let uri: http::Uri = t.otlp_endpoint.parse().map_err(|_| {
            self.error(
                "tracing.otlp_endpoint",
                "otlp_endpoint",
                "not a valid URL (http://host:4318)",
            )
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(self.error(
                "tracing.otlp_endpoint",
                "otlp_endpoint",
                "https is not supported yet; point it at a collector or agent reachable over http",
            )),
            _ => {
                return Err(self.error(
                    "tracing.otlp_endpoint",
                    "otlp_endpoint",
                    "must be an http:// URL (http://host:4318)",
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.error("tracing.otlp_endpoint", "otlp_endpoint", "has no host"));
        }
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(self.error(
                "tracing.sample_ratio",
                "sample_ratio",
                "must be between 0 and 1",
            ));
        }
        let service_name = t.service_name.unwrap_or_else(|| "chatgate".into());
        if service_name.trim().is_empty() {
            return Err(self.error("tracing.service_name", "service_name", "must not be empty"));
        }
        Ok(TracingSettings {
            traces_url: format!("{}/v1/traces", t.otlp_endpoint.trim_end_matches('/')),
            service_name,
            sample_ratio,
        })
    }

    fn rate_limits(&self, r: raw::RawRateLimits) -> Result<LimitSettings, ConfigError> {
        let d = LimitSettings::default();
        let or = |v: Option<u64>, default: Option<u64>| v.map_or(default, |n| (n > 0).then_some(n));
        let window = self.positive(
            "rate_limits.auth.window",
            "window",
            r.auth.window.map_or(Duration::from_secs(900), |w| w.0),
        )?;
        let global_window = self.positive(
            "rate_limits.auth.global_window",
            "global_window",
            r.auth
                .global_window
                .map_or(Duration::from_secs(3600), |w| w.0),
        )?;
        let login_global = or(
            r.auth.failures_per_username_global,
            d.login_per_username_global.map(|r| r.limit),
        )
        .map(|limit| Rate {
            limit,
            period: global_window,
        });
        let login = |v: Option<u64>, default: Option<Rate>| {
            or(v, default.map(|r| r.limit)).map(|limit| Rate {
                limit,
                period: window,
            })
        };
        Ok(LimitSettings {
            on_store_error: r
                .on_store_error
                .map_or(d.on_store_error, OnStoreError::from),
            chat: ChatLimits {
                requests_per_minute: or(r.requests_per_minute, d.chat.requests_per_minute),
                tokens_per_minute: or(r.tokens_per_minute, d.chat.tokens_per_minute),
                tokens_per_day: or(r.tokens_per_day, d.chat.tokens_per_day),
            },
            completion_estimate: r.completion_estimate.unwrap_or(d.completion_estimate),
            usage_retention: r.usage_retention.map_or(d.usage_retention, |u| u.0),
            usage_write_interval: r
                .usage_write_interval
                .map_or(d.usage_write_interval, |u| u.0),
            login_per_username: login(r.auth.failures_per_username, d.login_per_username),
            login_per_ip: login(r.auth.failures_per_ip, d.login_per_ip),
            login_per_username_global: login_global,
        })
    }

    fn cors(&self, c: raw::RawCors) -> Result<CorsSettings, ConfigError> {
        let any_origin = c.allowed_origins.iter().any(|o| o == "*");
        let allow_credentials = c.allow_credentials.unwrap_or(false);
        if any_origin && allow_credentials {
            return Err(self.error(
                "cors.allow_credentials",
                "allow_credentials",
                "credentials cannot be allowed for every origin (`*`); list the origins",
            ));
        }
        let mut allowed_origins = Vec::new();
        for o in c.allowed_origins.into_iter().filter(|o| o != "*") {
            let valid = (o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && o.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(self.error(
                    "cors.allowed_origins",
                    &o,
                    format!("{o:?} is not an origin like https://app.example.com (scheme, host, optional port, no path)"),
                ));
            }
            allowed_origins.push(o);
        }
        if allowed_origins.is_empty() && !any_origin {
            return Err(self.error(
                "cors.allowed_origins",
                "allowed_origins",
                "list at least one origin (or \"*\")",
            ));
        }
        let mut allowed_headers = vec!["Authorization".to_string(), "Content-Type".to_string()];
        for h in c.allowed_headers.unwrap_or_default() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(self.error(
                    "cors.allowed_headers",
                    &h,
                    format!("{h:?} is not a header name"),
                ));
            }
            if !allowed_headers.iter().any(|a| a.eq_ignore_ascii_case(&h)) {
                allowed_headers.push(h);
            }
        }
        Ok(CorsSettings {
            allowed_origins,
            any_origin,
            allowed_headers,
            max_age: c.max_age.map_or(Duration::from_secs(600), |d| d.0),
            allow_credentials,
        })
    }

    fn auth(&self, a: raw::RawAuth) -> Result<AuthSettings, ConfigError> {
        let jwt = a.jwt;
        let skip = self.secrets == SecretsPolicy::Skip;
        let secret = match (&jwt.secret_env, &jwt.secret_file) {
            (Some(_), None) | (None, Some(_)) if skip => Secret::new(vec![0; MIN_JWT_SECRET_BYTES]),
            (Some(var), None) => self.env_secret("auth.jwt.secret_env", var)?,
            (None, Some(path)) => self.file_secret("auth.jwt.secret_file", path)?,
            _ => {
                return Err(self.error(
                    "auth.jwt",
                    "jwt:",
                    "set exactly one of secret_env or secret_file (the JWT secret is never written in the file)",
                ))
            }
        };
        check_secret_strength(&secret).map_err(|m| self.error("auth.jwt", "secret_", m))?;
        let mut previous_secrets = Vec::new();
        let previous_text = match (&jwt.previous_secrets_env, &jwt.previous_secrets_file) {
            _ if skip => None,
            (Some(var), None) => std::env::var(var).ok(),
            (None, Some(path)) => Some(
                self.file_secret("auth.jwt.previous_secrets_file", path)?
                    .expose_str(),
            ),
            (None, None) => None,
            _ => {
                return Err(self.error(
                    "auth.jwt",
                    "previous_secrets",
                    "set at most one of previous_secrets_env or previous_secrets_file",
                ))
            }
        };
        for part in previous_text.iter().flat_map(|t| t.split([',', '\n'])) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let s = Secret::new(part.as_bytes().to_vec());
            check_secret_strength(&s)
                .map_err(|m| self.error("auth.jwt.previous_secrets", "previous_secrets", m))?;
            previous_secrets.push(s);
        }
        let ph = a.password_hash;
        let defaults = PasswordParams::default();
        let password = PasswordParams {
            memory_kib: ph.memory_kib.unwrap_or(defaults.memory_kib),
            iterations: ph.iterations.unwrap_or(defaults.iterations),
            parallelism: ph.parallelism.unwrap_or(defaults.parallelism),
        };
        if let Err(e) = argon2::Params::new(
            password.memory_kib,
            password.iterations,
            password.parallelism,
            None,
        ) {
            return Err(self.error(
                "auth.password_hash",
                "password_hash",
                format!("invalid argon2 parameters: {e}"),
            ));
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hash_concurrency = ph.max_concurrent.unwrap_or((cores / 2).max(1)).max(1);
        let hash_queue_timeout = self.positive(
            "auth.password_hash.queue_timeout",
            "queue_timeout",
            ph.queue_timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |d| d.0),
        )?;
        let token_ttl = self.positive(
            "auth.token_ttl",
            "token_ttl",
            a.token_ttl.map_or(Duration::from_secs(7 * 86400), |d| d.0),
        )?;
        let jwt_leeway = jwt.leeway.map_or(DEFAULT_LEEWAY, |d| d.0);
        if jwt_leeway > MAX_JWT_LEEWAY {
            return Err(self.error(
                "auth.jwt.leeway",
                "leeway",
                "must be at most 1h: a longer one keeps expired tokens working",
            ));
        }
        let credentials = self.credentials(a.credentials)?;
        Ok(AuthSettings {
            jwt_leeway,
            token_ttl,
            algorithm: jwt.algorithm.unwrap_or(TokenAlgorithm::HS256),
            secret,
            previous_secrets,
            password,
            hash_concurrency,
            hash_queue_timeout,
            user_cache_ttl: a.user_cache_ttl.map_or(Duration::from_secs(5), |d| d.0),
            on_store_error: a
                .on_store_error
                .map_or(OnStoreError::Allow, OnStoreError::from),
            credentials,
        })
    }

    fn credentials(&self, c: raw::RawCredentials) -> Result<CredentialSettings, ConfigError> {
        match c.backend {
            RawBackend::File => {
                let Some(path) = c.file else {
                    return Err(self.error(
                        "auth.credentials.file",
                        "backend:",
                        "backend `file` needs `file: PATH`",
                    ));
                };
                Ok(CredentialSettings::File(self.resolve_path(&path)))
            }
            RawBackend::Redis => {
                let Some(r) = c.redis else {
                    return Err(self.error(
                        "auth.credentials.redis",
                        "backend:",
                        "backend `redis` needs a `redis:` section",
                    ));
                };
                let key = "auth.credentials.redis";
                let url = match (&r.url, &r.url_env) {
                    (Some(u), None) => u.clone(),
                    (None, Some(var)) => self
                        .env_secret(&format!("{key}.url_env"), var)?
                        .expose_str(),
                    (None, None) => String::new(),
                    _ => return Err(self.error(key, "url", "set at most one of url or url_env")),
                };
                let mut cluster = r.cluster.unwrap_or_default();
                if let Some(var) = &r.cluster_env {
                    let list = self
                        .env_secret(&format!("{key}.cluster_env"), var)?
                        .expose_str();
                    cluster.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from),
                    );
                }
                if url.is_empty() && cluster.is_empty() {
                    return Err(self.error(
                        key,
                        "redis:",
                        "set url, url_env, cluster or cluster_env",
                    ));
                }
                if !url.is_empty() && !cluster.is_empty() {
                    return Err(self.error(
                        key,
                        "cluster",
                        "set either a single-server url or a cluster, not both",
                    ));
                }
                for u in std::iter::once(&url)
                    .filter(|u| !u.is_empty())
                    .chain(cluster.iter())
                {
                    if !(u.starts_with("redis://")
                        || u.starts_with("rediss://")
                        || u.starts_with("unix://")
                        || u.starts_with("redis+unix://"))
                    {
                        return Err(self.error(
                            key,
                            "url",
                            format!("{} is not a redis:// URL", crate::redact::redact_url(u)),
                        ));
                    }
                }
                let timeout = self.positive(
                    &format!("{key}.timeout"),
                    "timeout",
                    r.timeout.map_or(Duration::from_millis(500), |d| d.0),
                )?;
                let mut breaker = BreakerSettings::default();
                if let Some(b) = r.circuit_breaker {
                    breaker.failures = b.failures.unwrap_or(breaker.failures);
                    breaker.open_for = b.open_for.map_or(breaker.open_for, |d| d.0);
                }
                self.positive(
                    &format!("{key}.circuit_breaker.open_for"),
                    "open_for",
                    breaker.open_for,
                )?;
                Ok(CredentialSettings::Redis(RedisSettings {
                    url,
                    cluster,
                    key_prefix: r.key_prefix.unwrap_or_else(|| "chatgate:".into()),
                    timeout,
                    breaker,
                }))
            }
        }
    }

    fn upstream(&self, name: &str, u: RawUpstream) -> Result<UpstreamSettings, ConfigError> {
        let key = format!("upstreams.{name}");
        if u.endpoints.is_empty() {
            return Err(self.error(
                &format!("{key}.endpoints"),
                name,
                "at least one endpoint is required",
            ));
        }
        let mut endpoints = Vec::new();
        for e in u.endpoints {
            let (address, weight) = match e {
                RawEndpoint::Address(a) => (a, 1),
                RawEndpoint::Weighted(w) => (w.address, w.weight.unwrap_or(1)),
            };
            let parsed = parse_host_port(&address)
                .map_err(|m| self.error(&format!("{key}.endpoints"), &address, m))?;
            if weight == 0 {
                return Err(self.error(
                    &format!("{key}.endpoints"),
                    &address,
                    "weight must be at least 1",
                ));
            }
            endpoints.push(EndpointSettings {
                host: parsed.0,
                port: parsed.1,
                weight,
            });
        }
        let mut s = UpstreamSettings::with_defaults(name, endpoints);
        s.tls = u.tls;
        s.sni = u.sni;
        if let Some(ca) = u.ca_file {
            let full = self.resolve_path(&ca);
            let mut store = pingora::tls::RootCertStore::empty();
            let loaded = pingora::tls::load_ca_file_into_store(&full, &mut store);
            if loaded.is_err() || store.is_empty() {
                return Err(self.error(
                    &format!("{key}.ca_file"),
                    &ca.display().to_string(),
                    format!("{} holds no usable PEM certificate", full.display()),
                ));
            }
            s.ca_file = Some(full);
        }
        s.host_header = u.host_header;
        if let Some(bp) = u.base_path {
            if !bp.starts_with('/') {
                return Err(self.error(&format!("{key}.base_path"), &bp, "must start with '/'"));
            }
            s.base_path = bp.trim_end_matches('/').to_string();
        }
        let keys_text = match (&u.api_keys_env, &u.api_keys_file) {
            _ if self.secrets == SecretsPolicy::Skip => None,
            (Some(var), None) => Some(
                self.env_secret(&format!("{key}.api_keys_env"), var)?
                    .expose_str(),
            ),
            (None, Some(p)) => Some(
                self.file_secret(&format!("{key}.api_keys_file"), p)?
                    .expose_str(),
            ),
            (None, None) => None,
            _ => {
                return Err(self.error(
                    &key,
                    "api_keys",
                    "set at most one of api_keys_env or api_keys_file",
                ))
            }
        };
        s.api_keys = keys_text
            .iter()
            .flat_map(|t| t.split([',', '\n']))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| Secret::new(k.as_bytes().to_vec()))
            .collect();
        if keys_text.is_some() && s.api_keys.is_empty() {
            return Err(self.error(&key, "api_keys", "the API key list is empty"));
        }
        if s.api_keys
            .iter()
            .any(|k| k.expose().iter().any(|b| !b.is_ascii_graphic()))
        {
            return Err(self.error(
                &key,
                "api_keys",
                "API keys must be printable ASCII without spaces",
            ));
        }
        s.stream_usage = u.stream_usage.unwrap_or(true);
        let set = |slot: &mut Duration, v: Option<ConfigDuration>| {
            if let Some(d) = v {
                *slot = d.0;
            }
        };
        set(&mut s.connect_timeout, u.connect_timeout);
        set(&mut s.first_byte_timeout, u.first_byte_timeout);
        set(&mut s.idle_timeout, u.idle_timeout);
        set(&mut s.total_timeout, u.total_timeout);
        set(&mut s.retry_backoff, u.retry_backoff);
        set(&mut s.retry_backoff_max, u.retry_backoff_max);
        set(&mut s.key_cooldown, u.key_cooldown);
        set(&mut s.dns_refresh, u.dns_refresh);
        s.retries = u.retries.unwrap_or(s.retries);
        s.eject_after_failures = u.eject_after_failures.unwrap_or(s.eject_after_failures);
        set(&mut s.eject_cooldown, u.eject_cooldown);
        if let Some(hc) = u.health_check {
            if !hc.path.starts_with('/') {
                return Err(self.error(
                    &format!("{key}.health_check.path"),
                    &hc.path,
                    "must start with '/'",
                ));
            }
            let check = HealthCheckSettings {
                path: hc.path,
                interval: hc.interval.map_or(Duration::from_secs(10), |d| d.0),
                timeout: hc.timeout.map_or(Duration::from_secs(2), |d| d.0),
            };
            if check.interval.is_zero() || check.timeout.is_zero() {
                return Err(self.error(
                    &format!("{key}.health_check"),
                    "health_check",
                    "interval and timeout must be greater than 0",
                ));
            }
            s.health_check = Some(check);
        }
        for (field, d) in [
            ("connect_timeout", s.connect_timeout),
            ("first_byte_timeout", s.first_byte_timeout),
            ("idle_timeout", s.idle_timeout),
            ("total_timeout", s.total_timeout),
            ("dns_refresh", s.dns_refresh),
        ] {
            self.positive(&format!("{key}.{field}"), field, d)?;
        }
        if s.retries > 10 {
            return Err(self.error(&format!("{key}.retries"), "retries", "at most 10"));
        }
        Ok(s)
    }

    fn env_secret(&self, key: &str, var: &str) -> Result<Secret, ConfigError> {
        match std::env::var_os(var) {
            Some(v) if !v.is_empty() => Ok(Secret::new(v.into_encoded_bytes())),
            _ => Err(self.error(
                key,
                var,
                format!("environment variable {var} is not set or empty"),
            )),
        }
    }

    fn file_secret(&self, key: &str, path: &Path) -> Result<Secret, ConfigError> {
        let full = self.resolve_path(path);
        let mut bytes = std::fs::read(&full).map_err(|e| {
            self.error(
                key,
                &path.display().to_string(),
                format!("cannot read {}: {e}", full.display()),
            )
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(self.error(
                key,
                &path.display().to_string(),
                format!("{} is empty", full.display()),
            ));
        }
        Ok(Secret::new(bytes))
    }
}

/// Route limits as written: 0 or absent is "no limit of this route's own".
fn chat_limits(rpm: Option<u64>, tpm: Option<u64>, tpd: Option<u64>) -> ChatLimits {
    let set = |v: Option<u64>| v.filter(|n| *n > 0);
    ChatLimits {
        requests_per_minute: set(rpm),
        tokens_per_minute: set(tpm),
        tokens_per_day: set(tpd),
    }
}

/// Refuses JWT secrets that are too short to resist brute force.
pub fn check_secret_strength(secret: &Secret) -> Result<(), String> {
    let n = secret.expose().len();
    if n < MIN_JWT_SECRET_BYTES {
        return Err(format!(
            "the JWT secret is {n} bytes; at least {MIN_JWT_SECRET_BYTES} are required (generate one with `openssl rand -base64 48`)"
        ));
    }
    Ok(())
}

/// Splits `host:port` / `[v6]:port`.
pub fn parse_host_port(address: &str) -> Result<(String, u16), String> {
    let bad = || format!("{address:?} is not host:port");
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        address.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests;
