//! Configuration: the YAML file (`raw`) is parsed once at start-up into the
//! validated [`Config`] below — durations parsed, routes resolved to upstreams,
//! secrets read. Nothing downstream re-checks strings. This file is the model;
//! `validate` turns the raw file into it.

mod duration;
mod locate;
mod raw;
mod size;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use pingora::server::configuration::ServerConf;

pub use duration::{parse_duration, ConfigDuration};
pub use size::{parse_bytes, ConfigBytes};
pub use validate::{check_secret_strength, parse_host_port};

use crate::auth::password::PasswordParams;
use crate::auth::token::TokenAlgorithm;
use crate::chat::DataFormat;
use crate::limits::{ChatLimits, LimitSettings, OnStoreError};
use crate::redis_client::RedisSettings;
use crate::tls::ListenerCert;
use raw::RawConfig;

/// The shortest JWT secret start-up accepts: the token service's own minimum.
pub use crate::auth::token::MIN_SECRET_BYTES as MIN_JWT_SECRET_BYTES;

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
    /// PEM file of the CAs trusted for an https collector; `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// Headers sent with every export (a collector's credentials: values are secrets).
    pub headers: Vec<(http::HeaderName, Secret)>,
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
    /// PEM file of the CAs trusted for PostgreSQL's certificate; `None`: the system's.
    pub ca_file: Option<PathBuf>,
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
        validate::Validator {
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

#[cfg(test)]
mod tests;
