//! The project's Redis client: one lazily made connection (single server or Redis
//! Cluster) that reconnects by itself, a timeout on every call and a circuit breaker.
//! The credential store and the rate limiter share one, so a Redis outage is one
//! outage with one breaker, however many parts call it.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

use crate::auth::store::StoreError;
use crate::breaker::{Admission, Breaker, BreakerSettings};
use crate::redact::redact_url;

/// Connection settings, resolved from the config file.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port/db` of a single server (secret already resolved).
    pub url: String,
    /// Cluster node URLs; when non-empty they are used instead of `url`.
    pub cluster: Vec<String>,
    /// Prepended to every key, e.g. `chatgate:`.
    pub key_prefix: String,
    /// Upper bound for each store call, connecting included.
    pub timeout: Duration,
    /// When to stop calling a Redis that keeps failing, and for how long.
    pub breaker: BreakerSettings,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cluster: Vec<String> = self.cluster.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("cluster", &cluster)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// A Redis connection shared by its users; every call goes through [`RedisClient::run`].
pub struct RedisClient {
    client: Client,
    /// Filled on the first successful connect; left empty after a failed one so a later
    /// call tries again. Concurrent callers wait for one attempt instead of each connecting.
    connection: OnceCell<Connection>,
    key_prefix: String,
    timeout: Duration,
    breaker: Breaker,
    description: String,
}

enum Client {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// A connection that reconnects by itself once established.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisClient {
    /// Checks the URLs and prepares the client without connecting.
    pub fn new(settings: RedisSettings) -> Result<Self, StoreError> {
        let timeout = settings.timeout;
        let (client, target) = if settings.cluster.is_empty() {
            let client = redis::Client::open(settings.url.as_str())
                .map_err(|_| StoreError::Unavailable("invalid Redis URL".to_string()))?;
            (Client::Single(client), redact_url(&settings.url))
        } else {
            let client = ClusterClient::builder(settings.cluster.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "invalid Redis cluster URLs ({})",
                        e.category()
                    ))
                })?;
            let nodes: Vec<String> = settings.cluster.iter().map(|u| redact_url(u)).collect();
            (
                Client::Cluster(Box::new(client)),
                format!("cluster [{}]", nodes.join(", ")),
            )
        };
        Ok(RedisClient {
            client,
            connection: OnceCell::new(),
            description: format!("redis {target} (prefix {:?})", settings.key_prefix),
            key_prefix: settings.key_prefix,
            timeout,
            breaker: Breaker::observed(settings.breaker, crate::metrics::redis_breaker_open),
        })
    }

    async fn connect(&self) -> RedisResult<Connection> {
        match &self.client {
            Client::Single(client) => {
                // No internal retries: a dead server must fail the call fast, and the next
                // call tries again anyway.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map(Connection::Single)
            }
            Client::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        }
    }

    /// The key prefix every key starts with (`chatgate:` by default).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The server or cluster (credentials masked) and the key prefix, for logs.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// Runs `op` on the (lazily created) connection within the timeout, through the
    /// circuit breaker: while Redis is considered down it fails at once.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.breaker.admit(std::time::Instant::now()) == Admission::Refused {
            return Err(StoreError::Unavailable(
                "Redis is failing; calls paused (circuit open)".to_string(),
            ));
        }
        let result = self.run_once(op).await;
        let reached = !matches!(result, Err(StoreError::Unavailable(_)));
        self.breaker.record(reached, std::time::Instant::now());
        result
    }

    async fn run_once<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let work = async {
            let conn = self
                .connection
                .get_or_try_init(|| self.connect())
                .await
                .map_err(map_redis_error)?
                .clone();
            match op(conn.clone()).await {
                // After an outage the manager holds a reconnect attempt made while the
                // server was still down; it starts a fresh one when that fails. Nothing was
                // sent on a refused connection, so trying once more is safe.
                Err(e) if e.is_connection_refusal() => op(conn).await.map_err(map_redis_error),
                result => result.map_err(map_redis_error),
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer from Redis within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

/// Turns a Redis error into a store error whose text carries no reply payload.
fn map_redis_error(e: RedisError) -> StoreError {
    match e.kind() {
        // The detail of these may quote the reply, which can be a hash.
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
            StoreError::Corrupt("unexpected reply type from Redis".to_string())
        }
        _ if e.code() == Some("WRONGTYPE") => {
            StoreError::Corrupt("a store key holds the wrong Redis type".to_string())
        }
        ErrorKind::AuthenticationFailed => {
            StoreError::Unavailable("Redis authentication failed".to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}
