//! Redis credential store (single server or Redis Cluster). It connects lazily, so the
//! gateway starts while Redis is down, bounds every call by a timeout, and recovers by itself
//! when Redis comes back.
//!
//! # Schema
//!
//! With the default key prefix `chatgate:`:
//!
//! | key | type | content |
//! |---|---|---|
//! | `chatgate:user:{<name>}` | hash | `id`, `password_hash`, `disabled` (`0`/`1`), `created_at`, `tokens_valid_after` (unix seconds) |
//! | `chatgate:user:next_id` | string | counter; `INCR` gives the id of the next created user |
//! | `chatgate:users` | set | names of all users, used only for listing |
//!
//! `{<name>}` is a Redis Cluster hash tag, so each user lives in one slot. Every mutation
//! that must be atomic is a Lua script on that single key, which works on a cluster too.
//!
//! Provisioning a user by hand:
//!
//! ```text
//! redis-cli HSET 'chatgate:user:{alice}' id 7 password_hash '$argon2id$v=19$...' disabled 0 created_at 0
//! redis-cli SADD chatgate:users alice   # only needed for `list`
//! ```
//!
//! Missing `disabled`, `created_at` and `tokens_valid_after` default to `0`; a hash without
//! `id` or `password_hash` is reported as corrupt. Hand-picked ids should stay clear of the
//! counter (or raise it: `SET chatgate:user:next_id 1000`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use redis::Script;

use super::{CredentialStore, StoreError, UserRecord};
use crate::redis_client::RedisClient;
use crate::redis_client::RedisSettings;
use crate::unix_time::unix_now;

/// Credential store backed by Redis; see the module docs for the schema. The rate limiter
/// shares its [`RedisClient`]: one connection, one timeout, one circuit breaker.
pub struct RedisStore {
    redis: Arc<RedisClient>,
    keys: Keys,
    description: String,
}

/// Key names derived from the prefix.
struct Keys {
    prefix: String,
    next_id: String,
    users: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            next_id: format!("{prefix}user:next_id"),
            users: format!("{prefix}users"),
        }
    }

    fn user(&self, name: &str) -> String {
        format!("{}user:{{{name}}}", self.prefix)
    }
}

/// Creates the user hash unless it exists. KEYS[1] user hash; ARGV id, hash, created_at.
/// Tokens count from the creation on, so a token of an earlier user of that name is dead.
const CREATE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'password_hash', ARGV[2], 'disabled', '0',
    'created_at', ARGV[3], 'tokens_valid_after', ARGV[3])
return 1
";

/// Sets one field of an existing user hash. KEYS[1] user hash; ARGV field, value.
const SET_FIELD_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Compare-and-set of `password_hash`. KEYS[1] user hash; ARGV expected, new.
const REPLACE_HASH_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'password_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'password_hash', ARGV[2])
return 1
";

// Built once: `Script::new` hashes the source.
static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(CREATE_SCRIPT));
static SET_FIELD: LazyLock<Script> = LazyLock::new(|| Script::new(SET_FIELD_SCRIPT));
static REPLACE_HASH: LazyLock<Script> = LazyLock::new(|| Script::new(REPLACE_HASH_SCRIPT));

impl RedisStore {
    /// Checks the URLs and prepares the store without connecting.
    pub fn new(settings: RedisSettings) -> Result<Self, StoreError> {
        RedisClient::new(settings).map(|client| Self::with_client(Arc::new(client)))
    }

    /// The store on `redis`, whose connection, timeout and breaker it shares.
    pub fn with_client(redis: Arc<RedisClient>) -> Self {
        RedisStore {
            keys: Keys::new(redis.key_prefix()),
            description: redis.describe(),
            redis,
        }
    }

    async fn set_field(&self, username: &str, field: &str, value: &str) -> Result<(), StoreError> {
        let key = self.keys.user(username);
        let updated: i64 = self
            .redis
            .run(|mut conn| {
                let mut invocation = SET_FIELD.key(&key);
                invocation.arg(field).arg(value);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        if updated == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn fetch(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let key = self.keys.user(username);
        let fields: HashMap<String, Vec<u8>> = self
            .redis
            .run(|mut conn| {
                let key = &key;
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await }
            })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        record_from_fields(username, &fields).map(Some)
    }
}

#[async_trait]
impl CredentialStore for RedisStore {
    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        self.fetch(username).await
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<UserRecord, StoreError> {
        let key = self.keys.user(username);
        let created_at = unix_now();
        let next_id = &self.keys.next_id;
        let users = &self.keys.users;
        let id = self
            .redis
            .run(|mut conn| {
                let key = &key;
                async move {
                    // An id burnt by a failed creation only leaves a gap.
                    let id: u64 = redis::cmd("INCR")
                        .arg(next_id)
                        .query_async(&mut conn)
                        .await?;
                    let created: i64 = CREATE
                        .key(key)
                        .arg(id)
                        .arg(password_hash)
                        .arg(created_at)
                        .invoke_async(&mut conn)
                        .await?;
                    if created == 1 {
                        let _: i64 = redis::cmd("SADD")
                            .arg(users)
                            .arg(username)
                            .query_async(&mut conn)
                            .await?;
                        Ok(Some(id))
                    } else {
                        Ok(None)
                    }
                }
            })
            .await?;
        match id {
            Some(id) => Ok(UserRecord {
                id,
                username: username.to_string(),
                password_hash: password_hash.to_string(),
                disabled: false,
                created_at,
                tokens_valid_after: created_at,
            }),
            None => Err(StoreError::AlreadyExists),
        }
    }

    async fn set_password_hash(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        self.set_field(username, "password_hash", password_hash)
            .await
    }

    async fn replace_password_hash(
        &self,
        username: &str,
        expected_old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        let key = self.keys.user(username);
        let replaced: i64 = self
            .redis
            .run(|mut conn| {
                let mut invocation = REPLACE_HASH.key(&key);
                invocation.arg(expected_old_hash).arg(new_hash);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(replaced == 1)
    }

    async fn set_disabled(&self, username: &str, disabled: bool) -> Result<(), StoreError> {
        self.set_field(username, "disabled", if disabled { "1" } else { "0" })
            .await
    }

    async fn revoke_tokens(&self, username: &str, valid_after: u64) -> Result<(), StoreError> {
        self.set_field(username, "tokens_valid_after", &valid_after.to_string())
            .await
    }

    async fn remove_user(&self, username: &str) -> Result<(), StoreError> {
        let key = self.keys.user(username);
        let users = &self.keys.users;
        let deleted: i64 = self
            .redis
            .run(|mut conn| {
                let key = &key;
                async move {
                    let deleted: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
                    // Also cleans a stale listing entry whose hash was deleted by hand.
                    let _: i64 = redis::cmd("SREM")
                        .arg(users)
                        .arg(username)
                        .query_async(&mut conn)
                        .await?;
                    Ok(deleted)
                }
            })
            .await?;
        if deleted == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let users = &self.keys.users;
        let names: Vec<String> = self
            .redis
            .run(|mut conn| async move {
                redis::cmd("SMEMBERS")
                    .arg(users)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            // A name without a hash is a leftover of a hand-deleted user; skip it.
            if let Some(record) = self.fetch(&name).await? {
                records.push(record);
            }
        }
        records.sort_by_key(|r| r.id);
        Ok(records)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self
            .redis
            .run(|mut conn| async move { redis::cmd("PING").query_async(&mut conn).await })
            .await?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Builds a record from the fields of a user hash; unknown fields are ignored.
fn record_from_fields(
    username: &str,
    fields: &HashMap<String, Vec<u8>>,
) -> Result<UserRecord, StoreError> {
    let text = |name: &str| -> Result<Option<&str>, StoreError> {
        match fields.get(name) {
            None => Ok(None),
            Some(raw) => std::str::from_utf8(raw).map(Some).map_err(|_| {
                StoreError::Corrupt(format!("user {username:?}: field {name} is not UTF-8"))
            }),
        }
    };
    let number = |name: &str| -> Result<Option<u64>, StoreError> {
        match text(name)? {
            None => Ok(None),
            Some(value) => value.trim().parse().map(Some).map_err(|_| {
                StoreError::Corrupt(format!("user {username:?}: field {name} is not a number"))
            }),
        }
    };
    let missing = |name: &str| StoreError::Corrupt(format!("user {username:?}: no {name} field"));

    let id = number("id")?.ok_or_else(|| missing("id"))?;
    let password_hash = match text("password_hash")? {
        Some(hash) if !hash.is_empty() => hash.to_string(),
        _ => return Err(missing("password_hash")),
    };
    let disabled = match text("disabled")?.map(str::trim) {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(_) => {
            return Err(StoreError::Corrupt(format!(
                "user {username:?}: field disabled is not 0 or 1"
            )))
        }
    };
    Ok(UserRecord {
        id,
        username: username.to_string(),
        password_hash,
        disabled,
        created_at: number("created_at")?.unwrap_or(0),
        tokens_valid_after: number("tokens_valid_after")?.unwrap_or(0),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use crate::breaker::BreakerSettings;

    use crate::auth::store::contract::HASH;
    /// The timeout of the tests that measure how fast a dead or hung Redis is reported.
    const TIMEOUT: Duration = Duration::from_millis(500);
    /// The timeout everywhere else: a debug build on a busy two-core CI machine has been
    /// seen to miss 500 ms on a fresh server, and those tests are not about timing.
    const ROOMY: Duration = Duration::from_secs(10);

    /// The shared test launcher, with the stores the tests here and the limiter's use.
    pub(crate) use crate::test_redis::RedisServer;

    impl RedisServer {
        pub(crate) fn start() -> Self {
            Self::start_on(free_port(), false)
        }

        pub(crate) fn store(&self) -> RedisStore {
            RedisStore::with_client(Arc::new(self.client()))
        }

        /// A client with the roomy timeout, as the limiter's tests use it.
        pub(crate) fn client(&self) -> RedisClient {
            RedisClient::new(RedisSettings {
                timeout: ROOMY,
                ..settings(&self.url())
            })
            .unwrap()
        }

        /// A store with the short [`TIMEOUT`], for the tests that time failures.
        fn impatient_store(&self) -> RedisStore {
            RedisStore::new(settings(&self.url())).unwrap()
        }

        async fn raw(&self) -> redis::aio::MultiplexedConnection {
            redis::Client::open(self.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    use crate::test_ports::free_port;

    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.to_string(),
            cluster: Vec::new(),
            key_prefix: "chatgate:".to_string(),
            timeout: TIMEOUT,
            breaker: BreakerSettings::default(),
        }
    }

    /// Waits (up to 10 s) until `store` gets an answer: a fresh redis-server on a busy
    /// machine may need longer than the short timeout for the first connection, and the
    /// tests that time failures must start from a working connection.
    async fn until_answered(store: &RedisStore) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.ping().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "Redis did not answer within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn is_unavailable(result: &Result<(), StoreError>) -> bool {
        matches!(result, Err(StoreError::Unavailable(_)))
    }

    /// The store calls every test runs against both single server and cluster.
    async fn exercise_crud(store: &RedisStore) {
        let alice = store.create_user("alice", HASH).await.unwrap();
        let bob = store.create_user("bob", "$2b$12$old").await.unwrap();
        assert_eq!((alice.id, bob.id), (1, 2));
        assert!(alice.created_at > 1_600_000_000);
        assert_eq!(store.find_user("alice").await.unwrap(), Some(alice.clone()));
        assert_eq!(store.find_user("carol").await.unwrap(), None);

        store
            .set_password_hash("alice", "$argon2id$new")
            .await
            .unwrap();
        store.set_disabled("bob", true).await.unwrap();
        store.revoke_tokens("alice", 1234).await.unwrap();
        let found = store.find_user("alice").await.unwrap().unwrap();
        assert_eq!(found.password_hash, "$argon2id$new");
        assert_eq!(found.tokens_valid_after, 1234);
        assert!(!found.disabled);
        assert!(store.find_user("bob").await.unwrap().unwrap().disabled);
        store.set_disabled("bob", false).await.unwrap();
        assert!(!store.find_user("bob").await.unwrap().unwrap().disabled);

        let ids: Vec<u64> = store
            .list_users()
            .await
            .unwrap()
            .iter()
            .map(|u| u.id)
            .collect();
        assert_eq!(ids, vec![1, 2]);

        assert_eq!(
            store
                .replace_password_hash("bob", "$2b$12$wrong", "$argon2id$b")
                .await,
            Ok(false)
        );
        assert_eq!(
            store.find_user("bob").await.unwrap().unwrap().password_hash,
            "$2b$12$old"
        );
        assert_eq!(
            store
                .replace_password_hash("bob", "$2b$12$old", "$argon2id$b")
                .await,
            Ok(true)
        );
        assert_eq!(
            store.find_user("bob").await.unwrap().unwrap().password_hash,
            "$argon2id$b"
        );

        store.remove_user("alice").await.unwrap();
        assert_eq!(store.find_user("alice").await.unwrap(), None);
        let names: Vec<String> = store
            .list_users()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.username)
            .collect();
        assert_eq!(names, vec!["bob"]);
        assert_eq!(store.create_user("alice", HASH).await.unwrap().id, 3);
        assert_eq!(store.ping().await, Ok(()));
    }

    #[tokio::test]
    async fn crud_round_trip() {
        let server = RedisServer::start();
        let store = server.store();
        exercise_crud(&store).await;
        assert_eq!(
            store.describe(),
            format!(
                "redis redis://127.0.0.1:{}/0 (prefix \"chatgate:\")",
                server.port
            )
        );
        // The schema the module docs promise.
        let mut raw = server.raw().await;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("chatgate:user:{bob}")
            .query_async(&mut raw)
            .await
            .unwrap();
        let expected: HashMap<String, String> = [
            ("id", "2"),
            ("password_hash", "$argon2id$b"),
            ("disabled", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("created_at".to_string(), fields["created_at"].clone())])
        .chain([(
            "tokens_valid_after".to_string(),
            fields["created_at"].clone(),
        )])
        .collect();
        assert_eq!(fields, expected);
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg("chatgate:users")
            .query_async(&mut raw)
            .await
            .unwrap();
        names.sort();
        assert_eq!(names, vec!["alice", "bob"]);
        let next: u64 = redis::cmd("GET")
            .arg("chatgate:user:next_id")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(next, 3);
    }

    #[tokio::test]
    async fn already_exists_and_not_found() {
        let server = RedisServer::start();
        super::super::contract::duplicates_and_missing_users(&server.store()).await;
    }

    #[tokio::test]
    async fn user_provisioned_with_redis_cli() {
        let server = RedisServer::start();
        let store = server.store();
        let mut raw = server.raw().await;
        let _: () = redis::cmd("HSET")
            .arg("chatgate:user:{alice}")
            .arg(&[
                "id",
                "7",
                "password_hash",
                HASH,
                "disabled",
                "0",
                "created_at",
                "0",
            ])
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("chatgate:user:{bare}")
            .arg(&["id", "8", "password_hash", HASH])
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("chatgate:user:{noid}")
            .arg(&["password_hash", HASH])
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("chatgate:user:{nohash}")
            .arg(&["id", "9"])
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("chatgate:user:{badflag}")
            .arg(&["id", "10", "password_hash", HASH, "disabled", "yes"])
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("chatgate:user:{string}")
            .arg(HASH)
            .query_async(&mut raw)
            .await
            .unwrap();

        let alice = store.find_user("alice").await.unwrap().unwrap();
        assert_eq!(
            alice,
            UserRecord {
                id: 7,
                username: "alice".into(),
                password_hash: HASH.into(),
                disabled: false,
                created_at: 0,
                tokens_valid_after: 0,
            }
        );
        let bare = store.find_user("bare").await.unwrap().unwrap();
        assert_eq!((bare.id, bare.disabled, bare.created_at), (8, false, 0));
        assert_eq!(
            store.find_user("noid").await,
            Err(StoreError::Corrupt("user \"noid\": no id field".into()))
        );
        assert_eq!(
            store.find_user("nohash").await,
            Err(StoreError::Corrupt(
                "user \"nohash\": no password_hash field".into()
            ))
        );
        assert_eq!(
            store.find_user("badflag").await,
            Err(StoreError::Corrupt(
                "user \"badflag\": field disabled is not 0 or 1".into()
            ))
        );
        let wrong_type = store.find_user("string").await.unwrap_err();
        assert!(
            matches!(wrong_type, StoreError::Corrupt(_)),
            "{wrong_type:?}"
        );
        assert!(!wrong_type.to_string().contains("argon2"), "{wrong_type}");
        // Hand-provisioned users are mutable like created ones.
        assert_eq!(
            store
                .replace_password_hash("alice", HASH, "$argon2id$new")
                .await,
            Ok(true)
        );
    }

    #[tokio::test]
    async fn starts_without_redis_and_connects_later() {
        let port = free_port();
        let store = RedisStore::new(settings(&format!("redis://127.0.0.1:{port}/0"))).unwrap();
        let started = Instant::now();
        assert!(is_unavailable(&store.ping().await));
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(200));

        let _server = RedisServer::start_on(port, false);
        until_answered(&store).await;
        store.create_user("alice", HASH).await.unwrap();
    }

    #[tokio::test]
    async fn dead_redis_fails_fast_and_recovers() {
        let mut server = RedisServer::start();
        let store = server.impatient_store();
        until_answered(&store).await;
        store.create_user("alice", HASH).await.unwrap();

        server.stop();
        for _ in 0..3 {
            let started = Instant::now();
            let result = store.find_user("alice").await;
            assert!(
                matches!(result, Err(StoreError::Unavailable(_))),
                "{result:?}"
            );
            assert!(started.elapsed() < TIMEOUT + Duration::from_millis(200));
        }

        // Lets the reconnect attempts started by the failed calls fail too.
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Same port, empty data (no persistence): the same store works again by itself.
        server.restart();
        until_answered(&store).await;
        assert_eq!(store.find_user("alice").await, Ok(None));
        assert_eq!(store.create_user("alice", HASH).await.unwrap().id, 1);
    }

    #[tokio::test]
    async fn hung_redis_times_out() {
        let server = RedisServer::start();
        let store = server.impatient_store();
        until_answered(&store).await;

        server.signal("-STOP");
        let started = Instant::now();
        let result = store.ping().await;
        let elapsed = started.elapsed();
        server.signal("-CONT");
        assert!(is_unavailable(&result), "{result:?}");
        assert!(
            elapsed >= TIMEOUT - Duration::from_millis(50),
            "{elapsed:?}"
        );
        assert!(
            elapsed < TIMEOUT + Duration::from_millis(200),
            "{elapsed:?}"
        );

        let deadline = Instant::now() + Duration::from_secs(5);
        while store.ping().await.is_err() {
            assert!(Instant::now() < deadline, "no recovery after SIGCONT");
        }
    }

    #[tokio::test]
    async fn breaker_stops_calling_a_hung_redis_and_closes_after_a_probe() {
        let server = RedisServer::start();
        let store = RedisStore::new(RedisSettings {
            breaker: BreakerSettings {
                failures: 2,
                open_for: Duration::from_millis(300),
            },
            ..settings(&server.url())
        })
        .unwrap();
        until_answered(&store).await;
        server.signal("-STOP");
        for _ in 0..2 {
            let result = store.ping().await;
            assert!(is_unavailable(&result), "{result:?}");
        }
        // Open: refused without a call (and so without waiting for the timeout).
        let result = store.ping().await;
        assert!(
            matches!(&result, Err(StoreError::Unavailable(m)) if m.contains("circuit open")),
            "{result:?}"
        );
        server.signal("-CONT");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.ping().await.is_err() {
            assert!(Instant::now() < deadline, "breaker did not close");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.find_user("nobody").await, Ok(None));
    }

    #[tokio::test]
    async fn cluster_down_fails_fast() {
        let store = RedisStore::new(RedisSettings {
            url: String::new(),
            cluster: vec![format!("redis://127.0.0.1:{}", free_port())],
            key_prefix: "chatgate:".to_string(),
            timeout: TIMEOUT,
            breaker: BreakerSettings::default(),
        })
        .unwrap();
        for _ in 0..2 {
            let started = Instant::now();
            assert!(is_unavailable(&store.ping().await));
            assert!(started.elapsed() < TIMEOUT + Duration::from_millis(200));
        }
    }

    #[tokio::test]
    async fn works_on_a_cluster() {
        let server = RedisServer::start_on(free_port(), true);
        let mut raw = server.raw().await;
        let _: () = redis::cmd("CLUSTER")
            .arg(&["ADDSLOTSRANGE", "0", "16383"])
            .query_async(&mut raw)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut raw)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let store = RedisStore::new(RedisSettings {
            url: String::new(),
            cluster: vec![format!("redis://127.0.0.1:{}", server.port)],
            key_prefix: "chatgate:".to_string(),
            timeout: ROOMY,
            breaker: BreakerSettings::default(),
        })
        .unwrap();
        exercise_crud(&store).await;
        assert_eq!(
            store.describe(),
            format!(
                "redis cluster [redis://127.0.0.1:{}] (prefix \"chatgate:\")",
                server.port
            )
        );
    }

    #[test]
    fn describe_and_debug_hide_the_password() {
        let mut settings = settings("redis://admin:hunter2@127.0.0.1:6380/0");
        settings.cluster = vec!["redis://:hunter2@10.0.0.1:7000".to_string()];
        assert!(!format!("{settings:?}").contains("hunter2"));
        let single = RedisStore::new(RedisSettings {
            cluster: Vec::new(),
            ..settings.clone()
        })
        .unwrap();
        assert_eq!(
            single.describe(),
            "redis redis://admin:***@127.0.0.1:6380/0 (prefix \"chatgate:\")"
        );
        let cluster = RedisStore::new(settings).unwrap();
        assert_eq!(
            cluster.describe(),
            "redis cluster [redis://:***@10.0.0.1:7000] (prefix \"chatgate:\")"
        );
    }

    #[test]
    fn invalid_url_is_rejected_without_echo() {
        let err = RedisStore::new(settings("http://hunter2@x")).err().unwrap();
        assert_eq!(err, StoreError::Unavailable("invalid Redis URL".into()));
    }

    #[test]
    fn keys_follow_the_schema() {
        let keys = Keys::new("cg:");
        assert_eq!(keys.user("alice"), "cg:user:{alice}");
        assert_eq!(keys.next_id, "cg:user:next_id");
        assert_eq!(keys.users, "cg:users");
    }
}
