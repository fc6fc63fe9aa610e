//! The YAML file as written by an operator: serde structs that mirror
//! `conf/chatgate.yaml` key for key. Nothing here is trusted yet; `super::load`
//! turns it into the validated [`super::Config`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::duration::ConfigDuration;
use super::size::ConfigBytes;
use crate::auth::token::TokenAlgorithm;
use crate::chat::DataFormat;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listen: Vec<RawListen>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub pingora: RawPingora,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    pub auth: RawAuth,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub cors: Option<RawCors>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub conversation_log: Option<RawConversationLog>,
    #[serde(default)]
    pub tracing: Option<RawTracing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    pub otlp_endpoint: String,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub ca_file: Option<PathBuf>,
    pub headers_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConversationLog {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<ConfigBytes>,
    pub retention: Option<ConfigDuration>,
    pub flush_interval: Option<ConfigDuration>,
    pub ca_file: Option<PathBuf>,
}

/// A public listener, written either as `"IP:port"` or as `{address, tls}`.
#[derive(Debug)]
pub(super) struct RawListen {
    pub address: String,
    pub tls: Option<RawListenTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenObject {
    address: String,
    tls: Option<RawListenTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl<'de> Deserialize<'de> for RawListen {
    // By hand rather than `untagged`: a mistake inside the object form (an unknown
    // key, a missing `address`) keeps its own message instead of "did not match any variant".
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenVisitor;
        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an \"IP:port\" string or {address: \"IP:port\", tls: {cert_file, key_file}}",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen {
                    address: v.to_string(),
                    tls: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawListen, A::Error> {
                let o = RawListenObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawListen {
                    address: o.address,
                    tls: o.tls,
                })
            }
        }
        deserializer.deserialize_any(ListenVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCors {
    pub allowed_origins: Vec<String>,
    pub allowed_headers: Option<Vec<String>>,
    pub max_age: Option<ConfigDuration>,
    pub allow_credentials: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPingora {
    pub threads: Option<usize>,
    pub work_stealing: Option<bool>,
    pub grace_period_seconds: Option<u64>,
    pub graceful_shutdown_timeout_seconds: Option<u64>,
    pub upgrade_sock: Option<String>,
    pub pid_file: Option<String>,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub upstream_keepalive_pool_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_body_bytes: Option<usize>,
    pub max_auth_body_bytes: Option<usize>,
    pub body_timeout: Option<ConfigDuration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub header_timeout: Option<ConfigDuration>,
    pub keepalive_timeout: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    pub on_store_error: Option<RawOnStoreError>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub completion_estimate: Option<u64>,
    pub usage_retention: Option<ConfigDuration>,
    pub usage_write_interval: Option<ConfigDuration>,
    #[serde(default)]
    pub auth: RawAuthLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawOnStoreError {
    Allow,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthLimits {
    pub failures_per_username: Option<u64>,
    pub failures_per_ip: Option<u64>,
    pub window: Option<ConfigDuration>,
    pub failures_per_username_global: Option<u64>,
    pub global_window: Option<ConfigDuration>,
}

/// Per-route chat limits, counted on top of the global ones.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub token_ttl: Option<ConfigDuration>,
    pub jwt: RawJwt,
    #[serde(default)]
    pub password_hash: RawPasswordHash,
    pub user_cache_ttl: Option<ConfigDuration>,
    pub on_store_error: Option<RawOnStoreError>,
    pub credentials: RawCredentials,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    pub algorithm: Option<TokenAlgorithm>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub previous_secrets_env: Option<String>,
    pub previous_secrets_file: Option<PathBuf>,
    pub leeway: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPasswordHash {
    pub memory_kib: Option<u32>,
    pub iterations: Option<u32>,
    pub parallelism: Option<u32>,
    pub max_concurrent: Option<usize>,
    pub queue_timeout: Option<ConfigDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawBackend {
    Redis,
    File,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentials {
    pub backend: RawBackend,
    pub redis: Option<RawRedis>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub cluster: Option<Vec<String>>,
    pub cluster_env: Option<String>,
    pub key_prefix: Option<String>,
    pub timeout: Option<ConfigDuration>,
    pub circuit_breaker: Option<RawBreaker>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub failures: Option<u32>,
    pub open_for: Option<ConfigDuration>,
}

/// An endpoint is written either as `"host:port"` or as `{address, weight}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawEndpoint {
    Address(String),
    Weighted(RawWeightedEndpoint),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeightedEndpoint {
    pub address: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub tls: bool,
    pub sni: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub host_header: Option<String>,
    pub base_path: Option<String>,
    pub api_keys_env: Option<String>,
    pub api_keys_file: Option<PathBuf>,
    pub stream_usage: Option<bool>,
    pub connect_timeout: Option<ConfigDuration>,
    pub first_byte_timeout: Option<ConfigDuration>,
    pub idle_timeout: Option<ConfigDuration>,
    pub total_timeout: Option<ConfigDuration>,
    pub retries: Option<u32>,
    pub retry_backoff: Option<ConfigDuration>,
    pub retry_backoff_max: Option<ConfigDuration>,
    pub key_cooldown: Option<ConfigDuration>,
    pub dns_refresh: Option<ConfigDuration>,
    pub health_check: Option<RawHealthCheck>,
    pub eject_after_failures: Option<u32>,
    pub eject_cooldown: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub path: String,
    pub interval: Option<ConfigDuration>,
    pub timeout: Option<ConfigDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawRouteKind {
    Chat,
    ChatStream,
    Openai,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub path: String,
    pub kind: RawRouteKind,
    pub upstream: String,
    pub model: Option<String>,
    pub models: Option<Vec<String>>,
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    pub data_format: Option<DataFormat>,
    pub keepalive_interval: Option<ConfigDuration>,
    pub max_body_bytes: Option<usize>,
    pub rate_limits: Option<RawRouteLimits>,
    pub conversation_log: Option<bool>,
}
