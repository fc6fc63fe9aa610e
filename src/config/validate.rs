//! Validation: the raw YAML model becomes the [`Config`] of `mod.rs` here, with every
//! check and default, and errors that name the file, the line (found by key path, see
//! `locate`) and the key.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::locate::{self, at, Seg};
use super::raw::{self, RawBackend, RawConfig, RawEndpoint, RawListen, RawRouteKind, RawUpstream};
use super::{
    AuthSettings, Config, ConfigDuration, ConfigError, ConversationLogSettings, CorsSettings,
    CredentialSettings, EndpointSettings, HealthCheckSettings, Limits, Listener, ListenerTls,
    RouteKind, RouteSettings, Secret, SecretsPolicy, ServerSettings, TracingSettings,
    UpstreamSettings, MIN_JWT_SECRET_BYTES,
};
use crate::auth::password::{PasswordParams, DEFAULT_QUEUE_TIMEOUT};
use crate::auth::token::{TokenAlgorithm, DEFAULT_LEEWAY};
use crate::breaker::BreakerSettings;
use crate::chat::request::RESERVED_KEYS;
use crate::gateway::client_ip::parse_trusted;
use crate::limits::{ChatLimits, LimitSettings, OnStoreError, Rate, DEFAULT_LOGIN_WINDOW};
use crate::redis_client::RedisSettings;
use crate::tls::{CertFile, ListenerCert};

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

/// Turns the raw file into [`Config`], producing errors that point into the text.
pub(super) struct Validator<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) base_dir: &'a Path,
    pub(super) secrets: SecretsPolicy,
}

impl Validator<'_> {
    /// The error `<key>: <message>` at the line of the key path `at` (or of
    /// its nearest written parent).
    fn error(&self, key: &str, at: Vec<Seg<'_>>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: locate::line_of(self.text, &at),
            message: format!("{key}: {message}"),
        }
    }

    /// `d` itself, or the error `<key>: must be greater than 0` at the line of `at`.
    fn positive(&self, key: &str, at: Vec<Seg<'_>>, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            Err(self.error(key, at, "must be greater than 0"))
        } else {
            Ok(d)
        }
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// A CA file (`key`, at `at`, as written `ca`), resolved against the config's
    /// folder and checked to hold at least one PEM certificate.
    fn ca_file(&self, key: &str, at: Vec<Seg<'_>>, ca: &Path) -> Result<PathBuf, ConfigError> {
        let full = self.resolve_path(ca);
        let mut store = pingora::tls::RootCertStore::empty();
        let loaded = pingora::tls::load_ca_file_into_store(&full, &mut store);
        if loaded.is_err() || store.is_empty() {
            return Err(self.error(
                key,
                at,
                format!("{} holds no usable PEM certificate", full.display()),
            ));
        }
        Ok(full)
    }

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.listen.is_empty() {
            return Err(self.error("listen", at!["listen"], "at least one address is required"));
        }
        let addresses = raw
            .listen
            .iter()
            .enumerate()
            .map(|(i, l)| (&l.address, Some(i)));
        let mut bound = HashSet::new();
        for (addr, i) in addresses.chain(raw.admin_listen.iter().map(|a| (a, None))) {
            let at = match i {
                Some(i) => at!["listen", i],
                None => at!["admin_listen"],
            };
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.error(
                    "listen",
                    at,
                    format!("{addr:?} is not an IP:port address"),
                ));
            }
            if !bound.insert(addr) {
                return Err(self.error("listen", at, format!("{addr} is listed twice")));
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
                at!["limits", "max_connections"],
                "must be greater than 0 (leave it out for the default from the open-file limit)",
            ));
        }
        if limits.max_body_bytes == 0 || limits.max_auth_body_bytes == 0 {
            return Err(self.error(
                "limits",
                at!["limits"],
                "body limits must be greater than 0",
            ));
        }
        self.positive(
            "limits.body_timeout",
            at!["limits", "body_timeout"],
            limits.body_timeout,
        )?;
        self.positive(
            "limits.header_timeout",
            at!["limits", "header_timeout"],
            limits.header_timeout,
        )?;
        if limits.keepalive_timeout < Duration::from_secs(1) {
            return Err(self.error(
                "limits.keepalive_timeout",
                at!["limits", "keepalive_timeout"],
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
                    at!["routes", i, "path"],
                    format!("path {:?} must start with '/'", r.path),
                ));
            }
            if r.path == "/auth" || !seen.insert(r.path.clone()) {
                return Err(self.error(
                    &key,
                    at!["routes", i, "path"],
                    format!("path {:?} is already taken", r.path),
                ));
            }
            let Some(upstream) = upstreams.iter().position(|u| u.name == r.upstream) else {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(self.error(
                    &format!("{key}.upstream"),
                    at!["routes", i, "upstream"],
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
                            at!["routes", i, "models"],
                            "list at least one model, none empty",
                        ));
                    }
                    (String::new(), models)
                }
                (_, Some(model), None) if !model.trim().is_empty() => (model, Vec::new()),
                (_, Some(_), None) => {
                    return Err(self.error(
                        &format!("{key}.model"),
                        at!["routes", i, "model"],
                        "must not be empty",
                    ))
                }
                (RawRouteKind::Openai, _, _) => {
                    return Err(self.error(
                        &key,
                        at!["routes", i],
                        "an openai route needs exactly one of `model` (forced) or `models` (allowed list)",
                    ))
                }
                (_, _, _) => {
                    return Err(self.error(
                        &format!("{key}.model"),
                        at!["routes", i],
                        "a chat route needs `model` (and no `models`)",
                    ))
                }
            };
            if let Some(reserved) = RESERVED_KEYS.iter().find(|k| r.params.contains_key(**k)) {
                return Err(self.error(
                    &format!("{key}.params"),
                    at!["routes", i, "params", *reserved],
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
        if let Some(i) = routes.iter().position(|r| r.keepalive_interval.is_zero()) {
            return Err(self.error(
                "routes.keepalive_interval",
                at!["routes", i, "keepalive_interval"],
                "must be greater than 0",
            ));
        }
        let cors = raw.cors.map(|c| self.cors(c)).transpose()?;
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                parse_trusted(entry)
                    .map_err(|m| self.error("trusted_proxies", at!["trusted_proxies", i], m))
            })
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
                    let name = match problem.file {
                        CertFile::Chain => "cert_file",
                        CertFile::Key => "key_file",
                    };
                    self.error(
                        &format!("listen[{i}].tls.{name}"),
                        at!["listen", i, "tls", name],
                        problem.message,
                    )
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
            (None, Some(var)) => {
                Some(self.env_secret(&format!("{key}.url_env"), at![key, "url_env"], var)?)
            }
            (None, None) => return Err(self.error(key, at![key], "set url_env (or url)")),
            _ => return Err(self.error(key, at![key, "url"], "set at most one of url or url_env")),
        };
        if let Some(url) = &url {
            // The text is never quoted back: it may hold a password.
            let parsed: tokio_postgres::Config = url.expose_str().parse().map_err(|_| {
                self.error(
                    key,
                    at![key, if c.url.is_some() { "url" } else { "url_env" }],
                    "not a valid PostgreSQL URL (postgres://user@host:port/database)",
                )
            })?;
            if c.url.is_some() && parsed.get_password().is_some() {
                return Err(self.error(
                    &format!("{key}.url"),
                    at![key, "url"],
                    "holds a password; put the URL in an environment variable and name it in url_env",
                ));
            }
        }
        let spool_max_bytes = c.spool_max_bytes.map_or(1 << 30, |b| b.0);
        if spool_max_bytes == 0 {
            return Err(self.error(
                &format!("{key}.spool_max_bytes"),
                at![key, "spool_max_bytes"],
                "must be greater than 0",
            ));
        }
        let retention = self.positive(
            &format!("{key}.retention"),
            at![key, "retention"],
            c.retention
                .map_or(Duration::from_secs(90 * 86_400), |d| d.0),
        )?;
        let flush_interval = self.positive(
            &format!("{key}.flush_interval"),
            at![key, "flush_interval"],
            c.flush_interval.map_or(Duration::from_millis(200), |d| d.0),
        )?;
        let ca_file = match c.ca_file {
            Some(ca) => Some(self.ca_file(&format!("{key}.ca_file"), at![key, "ca_file"], &ca)?),
            None => None,
        };
        Ok(ConversationLogSettings {
            url,
            spool_dir: self.resolve_path(
                &c.spool_dir
                    .unwrap_or_else(|| PathBuf::from("/var/lib/chatgate/spool")),
            ),
            spool_max_bytes,
            retention,
            flush_interval,
            ca_file,
        })
    }

    fn tracing(&self, t: raw::RawTracing) -> Result<TracingSettings, ConfigError> {
        let endpoint_error = |message| {
            self.error(
                "tracing.otlp_endpoint",
                at!["tracing", "otlp_endpoint"],
                message,
            )
        };
        // Never quoted back: the URL may carry credentials.
        let uri: http::Uri = t
            .otlp_endpoint
            .parse()
            .map_err(|_| endpoint_error("not a valid URL (http://host:4318)"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(endpoint_error(
                    "must be an http:// or https:// URL (http://host:4318)",
                ))
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(endpoint_error("has no host"));
        }
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(self.error(
                "tracing.sample_ratio",
                at!["tracing", "sample_ratio"],
                "must be between 0 and 1",
            ));
        }
        let service_name = t.service_name.unwrap_or_else(|| "chatgate".into());
        if service_name.trim().is_empty() {
            return Err(self.error(
                "tracing.service_name",
                at!["tracing", "service_name"],
                "must not be empty",
            ));
        }
        let ca_file = match t.ca_file {
            Some(_) if !https => {
                return Err(self.error(
                    "tracing.ca_file",
                    at!["tracing", "ca_file"],
                    "applies to an https:// otlp_endpoint only",
                ))
            }
            Some(ca) => Some(self.ca_file("tracing.ca_file", at!["tracing", "ca_file"], &ca)?),
            None => None,
        };
        let headers = match &t.headers_env {
            None => Vec::new(),
            Some(var) if self.secrets == SecretsPolicy::Skip && std::env::var_os(var).is_none() => {
                Vec::new()
            }
            Some(var) => {
                let at = || at!["tracing", "headers_env"];
                let text = self.env_secret("tracing.headers_env", at(), var)?;
                parse_export_headers(text.expose())
                    .map_err(|m| self.error("tracing.headers_env", at(), format!("{var}: {m}")))?
            }
        };
        Ok(TracingSettings {
            traces_url: format!("{}/v1/traces", t.otlp_endpoint.trim_end_matches('/')),
            service_name,
            sample_ratio,
            ca_file,
            headers,
        })
    }

    fn rate_limits(&self, r: raw::RawRateLimits) -> Result<LimitSettings, ConfigError> {
        let d = LimitSettings::default();
        let or = |v: Option<u64>, default: Option<u64>| v.map_or(default, |n| (n > 0).then_some(n));
        let window = self.positive(
            "rate_limits.auth.window",
            at!["rate_limits", "auth", "window"],
            r.auth.window.map_or(DEFAULT_LOGIN_WINDOW, |w| w.0),
        )?;
        let global_window = self.positive(
            "rate_limits.auth.global_window",
            at!["rate_limits", "auth", "global_window"],
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
                at!["cors", "allow_credentials"],
                "credentials cannot be allowed for every origin (`*`); list the origins",
            ));
        }
        let mut allowed_origins = Vec::new();
        for (i, o) in c.allowed_origins.into_iter().enumerate() {
            if o == "*" {
                continue;
            }
            let valid = (o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && o.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(self.error(
                    "cors.allowed_origins",
                    at!["cors", "allowed_origins", i],
                    format!("{o:?} is not an origin like https://app.example.com (scheme, host, optional port, no path)"),
                ));
            }
            allowed_origins.push(o);
        }
        if allowed_origins.is_empty() && !any_origin {
            return Err(self.error(
                "cors.allowed_origins",
                at!["cors", "allowed_origins"],
                "list at least one origin (or \"*\")",
            ));
        }
        let mut allowed_headers = vec!["Authorization".to_string(), "Content-Type".to_string()];
        for (i, h) in c
            .allowed_headers
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(self.error(
                    "cors.allowed_headers",
                    at!["cors", "allowed_headers", i],
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
            (Some(var), None) => self.env_secret(
                "auth.jwt.secret_env",
                at!["auth", "jwt", "secret_env"],
                var,
            )?,
            (None, Some(path)) => self.file_secret(
                "auth.jwt.secret_file",
                at!["auth", "jwt", "secret_file"],
                path,
            )?,
            _ => {
                return Err(self.error(
                    "auth.jwt",
                    at!["auth", "jwt"],
                    "set exactly one of secret_env or secret_file (the JWT secret is never written in the file)",
                ))
            }
        };
        let secret_at = match jwt.secret_env {
            Some(_) => at!["auth", "jwt", "secret_env"],
            None => at!["auth", "jwt", "secret_file"],
        };
        check_secret_strength(&secret).map_err(|m| self.error("auth.jwt", secret_at, m))?;
        let mut previous_secrets = Vec::new();
        let previous_text = match (&jwt.previous_secrets_env, &jwt.previous_secrets_file) {
            _ if skip => None,
            (Some(var), None) => std::env::var(var).ok(),
            (None, Some(path)) => Some(
                self.file_secret(
                    "auth.jwt.previous_secrets_file",
                    at!["auth", "jwt", "previous_secrets_file"],
                    path,
                )?
                .expose_str(),
            ),
            (None, None) => None,
            _ => {
                return Err(self.error(
                    "auth.jwt",
                    at!["auth", "jwt", "previous_secrets_env"],
                    "set at most one of previous_secrets_env or previous_secrets_file",
                ))
            }
        };
        let previous_at = match jwt.previous_secrets_env {
            Some(_) => at!["auth", "jwt", "previous_secrets_env"],
            None => at!["auth", "jwt", "previous_secrets_file"],
        };
        for part in previous_text.iter().flat_map(|t| t.split([',', '\n'])) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let s = Secret::new(part.as_bytes().to_vec());
            check_secret_strength(&s)
                .map_err(|m| self.error("auth.jwt.previous_secrets", previous_at.clone(), m))?;
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
                at!["auth", "password_hash"],
                format!("invalid argon2 parameters: {e}"),
            ));
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hash_concurrency = ph.max_concurrent.unwrap_or((cores / 2).max(1)).max(1);
        let hash_queue_timeout = self.positive(
            "auth.password_hash.queue_timeout",
            at!["auth", "password_hash", "queue_timeout"],
            ph.queue_timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |d| d.0),
        )?;
        let token_ttl = self.positive(
            "auth.token_ttl",
            at!["auth", "token_ttl"],
            a.token_ttl.map_or(Duration::from_secs(7 * 86400), |d| d.0),
        )?;
        let jwt_leeway = jwt.leeway.map_or(DEFAULT_LEEWAY, |d| d.0);
        if jwt_leeway > MAX_JWT_LEEWAY {
            return Err(self.error(
                "auth.jwt.leeway",
                at!["auth", "jwt", "leeway"],
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
                        at!["auth", "credentials", "backend"],
                        "backend `file` needs `file: PATH`",
                    ));
                };
                Ok(CredentialSettings::File(self.resolve_path(&path)))
            }
            RawBackend::Redis => {
                let Some(r) = c.redis else {
                    return Err(self.error(
                        "auth.credentials.redis",
                        at!["auth", "credentials", "backend"],
                        "backend `redis` needs a `redis:` section",
                    ));
                };
                let key = "auth.credentials.redis";
                let here = |field| at!["auth", "credentials", "redis", field];
                let url = match (&r.url, &r.url_env) {
                    (Some(u), None) => u.clone(),
                    (None, Some(var)) => self
                        .env_secret(&format!("{key}.url_env"), here("url_env"), var)?
                        .expose_str(),
                    (None, None) => String::new(),
                    _ => {
                        return Err(self.error(
                            key,
                            here("url"),
                            "set at most one of url or url_env",
                        ))
                    }
                };
                let cluster_key = if r.cluster.is_some() {
                    "cluster"
                } else {
                    "cluster_env"
                };
                let mut cluster = r.cluster.unwrap_or_default();
                if let Some(var) = &r.cluster_env {
                    let list = self
                        .env_secret(&format!("{key}.cluster_env"), here("cluster_env"), var)?
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
                        at!["auth", "credentials", "redis"],
                        "set url, url_env, cluster or cluster_env",
                    ));
                }
                if !url.is_empty() && !cluster.is_empty() {
                    return Err(self.error(
                        key,
                        here(cluster_key),
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
                            here(if u == &url { "url" } else { "cluster" }),
                            format!("{} is not a redis:// URL", crate::redact::redact_url(u)),
                        ));
                    }
                }
                let timeout = self.positive(
                    &format!("{key}.timeout"),
                    here("timeout"),
                    r.timeout.map_or(Duration::from_millis(500), |d| d.0),
                )?;
                let mut breaker = BreakerSettings::default();
                if let Some(b) = r.circuit_breaker {
                    breaker.failures = b.failures.unwrap_or(breaker.failures);
                    breaker.open_for = b.open_for.map_or(breaker.open_for, |d| d.0);
                }
                self.positive(
                    &format!("{key}.circuit_breaker.open_for"),
                    at![
                        "auth",
                        "credentials",
                        "redis",
                        "circuit_breaker",
                        "open_for"
                    ],
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
        let here = |field| at!["upstreams", name, field];
        if u.endpoints.is_empty() {
            return Err(self.error(
                &format!("{key}.endpoints"),
                here("endpoints"),
                "at least one endpoint is required",
            ));
        }
        let mut endpoints = Vec::new();
        for (i, e) in u.endpoints.into_iter().enumerate() {
            let entry = at!["upstreams", name, "endpoints", i];
            let (address, weight) = match e {
                RawEndpoint::Address(a) => (a, 1),
                RawEndpoint::Weighted(w) => (w.address, w.weight.unwrap_or(1)),
            };
            let parsed = parse_host_port(&address)
                .map_err(|m| self.error(&format!("{key}.endpoints"), entry.clone(), m))?;
            if weight == 0 {
                return Err(self.error(
                    &format!("{key}.endpoints"),
                    entry,
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
            s.ca_file = Some(self.ca_file(&format!("{key}.ca_file"), here("ca_file"), &ca)?);
        }
        s.host_header = u.host_header;
        if let Some(bp) = u.base_path {
            if !bp.starts_with('/') {
                return Err(self.error(
                    &format!("{key}.base_path"),
                    here("base_path"),
                    "must start with '/'",
                ));
            }
            s.base_path = bp.trim_end_matches('/').to_string();
        }
        let keys_text = match (&u.api_keys_env, &u.api_keys_file) {
            _ if self.secrets == SecretsPolicy::Skip => None,
            (Some(var), None) => Some(
                self.env_secret(&format!("{key}.api_keys_env"), here("api_keys_env"), var)?
                    .expose_str(),
            ),
            (None, Some(p)) => Some(
                self.file_secret(&format!("{key}.api_keys_file"), here("api_keys_file"), p)?
                    .expose_str(),
            ),
            (None, None) => None,
            _ => {
                return Err(self.error(
                    &key,
                    here("api_keys_env"),
                    "set at most one of api_keys_env or api_keys_file",
                ))
            }
        };
        let keys_at = here(if u.api_keys_env.is_some() {
            "api_keys_env"
        } else {
            "api_keys_file"
        });
        s.api_keys = keys_text
            .iter()
            .flat_map(|t| t.split([',', '\n']))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| Secret::new(k.as_bytes().to_vec()))
            .collect();
        if keys_text.is_some() && s.api_keys.is_empty() {
            return Err(self.error(&key, keys_at, "the API key list is empty"));
        }
        if s.api_keys
            .iter()
            .any(|k| k.expose().iter().any(|b| !b.is_ascii_graphic()))
        {
            return Err(self.error(
                &key,
                keys_at,
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
                    at!["upstreams", name, "health_check", "path"],
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
                    here("health_check"),
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
            self.positive(&format!("{key}.{field}"), here(field), d)?;
        }
        if s.retries > 10 {
            return Err(self.error(&format!("{key}.retries"), here("retries"), "at most 10"));
        }
        Ok(s)
    }

    fn env_secret(&self, key: &str, at: Vec<Seg<'_>>, var: &str) -> Result<Secret, ConfigError> {
        match std::env::var_os(var) {
            Some(v) if !v.is_empty() => Ok(Secret::new(v.into_encoded_bytes())),
            _ => Err(self.error(
                key,
                at,
                format!("environment variable {var} is not set or empty"),
            )),
        }
    }

    fn file_secret(&self, key: &str, at: Vec<Seg<'_>>, path: &Path) -> Result<Secret, ConfigError> {
        let full = self.resolve_path(path);
        let mut bytes = std::fs::read(&full).map_err(|e| {
            self.error(
                key,
                at.clone(),
                format!("cannot read {}: {e}", full.display()),
            )
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(self.error(key, at, format!("{} is empty", full.display())));
        }
        Ok(Secret::new(bytes))
    }
}

/// Headers the OTLP exporter may not be given: the exporter sets them itself.
const EXPORT_HEADERS_RESERVED: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// `name=value` pairs separated by commas, values percent-decoded: the format of
/// OpenTelemetry's `OTEL_EXPORTER_OTLP_HEADERS`. Errors name the entry and header,
/// never a value.
pub(super) fn parse_export_headers(text: &[u8]) -> Result<Vec<(http::HeaderName, Secret)>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "is not UTF-8".to_string())?;
    let mut headers: Vec<(http::HeaderName, Secret)> = Vec::new();
    for (i, entry) in text.split(',').map(str::trim).enumerate() {
        let n = i + 1;
        if entry.is_empty() {
            continue;
        }
        let Some((name, value)) = entry.split_once('=') else {
            return Err(format!("entry {n} is not name=value"));
        };
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("entry {n}: not a header name"))?;
        if EXPORT_HEADERS_RESERVED.contains(&name.as_str()) {
            return Err(format!("entry {n}: {name} is set by the exporter itself"));
        }
        let value = percent_encoding::percent_decode_str(value.trim()).decode_utf8();
        let value = value
            .map(|v| v.into_owned().into_bytes())
            .unwrap_or_default();
        if value.is_empty() || http::HeaderValue::from_bytes(&value).is_err() {
            return Err(format!(
                "entry {n} ({name}): the value is empty or not a valid header value"
            ));
        }
        if headers.iter().any(|(seen, _)| *seen == name) {
            return Err(format!("entry {n}: {name} is given twice"));
        }
        headers.push((name, Secret::new(value)));
    }
    if headers.is_empty() {
        return Err("holds no header".into());
    }
    Ok(headers)
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
