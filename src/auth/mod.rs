//! Login and token checks: credential parsing (`login`), password hashing
//! (`password`), JWTs (`token`), user stores (`store`), and the
//! [`Authenticator`] that ties them to the `/auth` and Bearer rules of docs/api.md.

mod hash_pool;
pub mod login;
pub mod password;
pub mod store;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{AuthSettings, CredentialSettings};
use crate::error::ApiError;
use crate::limits::OnStoreError;
use login::Credentials;
use password::{Passwords, Verification};
use store::{CredentialStore, StoreError, UserRecord};
use token::{Claims, TokenService};

/// What a token check yields: the caller's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user's numeric id (`identity` claim).
    pub user_id: u64,
    /// The user name (`sub` claim).
    pub username: String,
}

/// Opens the credential store the settings name.
pub fn open_store(settings: &CredentialSettings) -> Result<Arc<dyn CredentialStore>, StoreError> {
    open_store_shared(settings).map(|(store, _)| store)
}

/// The credential store, and its Redis client when it is the Redis store.
pub type SharedStore = (
    Arc<dyn CredentialStore>,
    Option<Arc<crate::redis_client::RedisClient>>,
);

/// Opens the credential store and, when it is Redis, hands out its client for the rate
/// limiter and usage accounting (one connection, one timeout, one breaker).
pub fn open_store_shared(settings: &CredentialSettings) -> Result<SharedStore, StoreError> {
    Ok(match settings {
        CredentialSettings::Redis(r) => {
            let redis = Arc::new(crate::redis_client::RedisClient::new(r.clone())?);
            let store = store::redis::RedisStore::with_client(redis.clone());
            (Arc::new(store), Some(redis))
        }
        CredentialSettings::File(path) => (Arc::new(store::file::FileStore::open(path)?), None),
        CredentialSettings::Memory => (Arc::new(store::file::FileStore::in_memory()), None),
    })
}

/// Logs users in and checks their tokens.
pub struct Authenticator {
    store: Arc<dyn CredentialStore>,
    passwords: Passwords,
    tokens: TokenService,
    user_cache: UserCache,
    on_store_error: OnStoreError,
}

impl Authenticator {
    /// Builds the authenticator from validated settings and an opened store.
    pub fn new(settings: &AuthSettings, store: Arc<dyn CredentialStore>) -> Result<Self, String> {
        let passwords = Passwords::new(settings.password, settings.hash_concurrency)
            .map_err(|e| format!("password hashing: {e}"))?
            .with_queue_timeout(settings.hash_queue_timeout);
        let previous: Vec<Vec<u8>> = settings
            .previous_secrets
            .iter()
            .map(|s| s.expose().to_vec())
            .collect();
        let tokens = TokenService::new(
            settings.algorithm,
            settings.secret.expose(),
            &previous,
            settings.token_ttl,
        )
        .map_err(|e| format!("JWT settings: {e}"))?
        .with_leeway(settings.jwt_leeway);
        Ok(Authenticator {
            store,
            passwords,
            tokens,
            user_cache: UserCache::new(settings.user_cache_ttl),
            on_store_error: settings.on_store_error,
        })
    }

    /// The credential store, for readiness checks.
    pub fn store(&self) -> &Arc<dyn CredentialStore> {
        &self.store
    }

    /// `POST /auth`: checks the credentials and issues a token.
    pub async fn login(&self, credentials: Option<Credentials>) -> Result<String, ApiError> {
        let Some(credentials) = credentials else {
            return Err(ApiError::CredentialsMissing);
        };
        // A name no user can have is not looked up (nor put into a store key),
        // but still costs a dummy verification below.
        let lookup = if store::validate_username(&credentials.username).is_ok() {
            self.store.find_user(&credentials.username).await
        } else {
            Ok(None)
        };
        let user = match lookup {
            Ok(user) => user,
            Err(e) => {
                tracing::warn!(error = %e, "credential store lookup failed during login");
                return Err(ApiError::CredentialStoreUnavailable);
            }
        };
        let stored_hash = user.as_ref().map(|u| u.password_hash.as_str());
        let verdict = match self
            .passwords
            .verify(&credentials.password, stored_hash)
            .await
        {
            Ok(verdict) => verdict,
            Err(busy) => {
                // Not the client's failure: the login limits refund it. Debug level: a
                // flood would write one line per request; `outcome="busy"` counts them.
                tracing::debug!(
                    waited_ms = busy.waited.as_millis() as u64,
                    "login turned away: every password hashing thread stayed busy"
                );
                return Err(ApiError::HashersBusy {
                    retry_after: busy.waited,
                });
            }
        };
        let (user, needs_rehash) = match (user, verdict) {
            (Some(user), Verification::Valid { needs_rehash }) if !user.disabled => {
                (user, needs_rehash)
            }
            _ => return Err(ApiError::CredentialsRejected),
        };
        if needs_rehash {
            self.rehash(&user, &credentials.password).await;
        }
        wait_out_revocation(user.tokens_valid_after).await;
        self.user_cache.put(&user);
        self.tokens
            .issue(user.id, &user.username)
            .map_err(|e| ApiError::Internal(format!("cannot sign token: {e}")))
    }

    /// Moves a user whose hash is bcrypt (or old argon2 parameters) to the
    /// configured argon2id; a failure only costs a later retry.
    async fn rehash(&self, user: &UserRecord, password: &str) {
        let new_hash = match self.passwords.hash(password).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(user_id = user.id, error = %e, "re-hashing password failed");
                return;
            }
        };
        match self
            .store
            .replace_password_hash(&user.username, &user.password_hash, &new_hash)
            .await
        {
            Ok(true) => tracing::info!(user_id = user.id, "password hash upgraded to argon2id"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(user_id = user.id, error = %e, "storing re-hashed password failed")
            }
        }
    }

    /// Chat routes: checks `Authorization: Bearer <jwt>` and that its user is
    /// still present, enabled and not revoked.
    pub async fn authorize(&self, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        let token = token::bearer_token(authorization).map_err(|e| match e {
            token::BearerError::Missing => ApiError::BearerMissing,
            token::BearerError::Malformed => ApiError::TokenRejected,
        })?;
        let claims = self.tokens.verify(token).map_err(|rejected| {
            tracing::debug!(reason = rejected.reason.as_str(), "token rejected");
            ApiError::TokenRejected
        })?;
        self.check_user_status(&claims).await?;
        Ok(Caller {
            user_id: claims.identity,
            username: claims.sub,
        })
    }

    async fn check_user_status(&self, claims: &Claims) -> Result<(), ApiError> {
        let status = match self.user_cache.get(&claims.sub) {
            Some(status) => status,
            None => match self.store.find_user(&claims.sub).await {
                Ok(Some(user)) => self.user_cache.put(&user),
                Ok(None) => self.user_cache.put_missing(&claims.sub),
                Err(e) => {
                    // A signed, unexpired token is still good evidence; keep chat
                    // working through a store outage on the last known status.
                    match (self.user_cache.get_stale(&claims.sub), self.on_store_error) {
                        (Some(status), _) => status,
                        (None, OnStoreError::Allow) => {
                            tracing::warn!(error = %e, "credential store unreachable; accepting a valid token without a status check");
                            return Ok(());
                        }
                        (None, OnStoreError::Deny) => {
                            tracing::warn!(error = %e, "credential store unreachable; refusing a token whose user status is unknown");
                            return Err(ApiError::CredentialStoreUnavailable);
                        }
                    }
                }
            },
        };
        let usable = status.exists
            && !status.disabled
            && status.user_id == claims.identity
            && claims.iat >= status.tokens_valid_after;
        if usable {
            Ok(())
        } else {
            Err(ApiError::TokenRejected)
        }
    }
}

/// The `tokens_valid_after` that revokes every token issued until now: `iat` has whole
/// seconds, so a token issued earlier in this very second must die too. A login in the
/// same second waits for the next one (see [`wait_out_revocation`]).
pub fn revocation_time(now_secs: u64) -> u64 {
    now_secs.saturating_add(1)
}

/// After a revocation in the current second, waits (under a second) until new tokens
/// get an `iat` the check accepts, so a fresh login never yields a dead token.
async fn wait_out_revocation(tokens_valid_after: u64) {
    let now = crate::unix_time::since_epoch();
    let valid_from = Duration::from_secs(tokens_valid_after);
    if valid_from > now && valid_from - now <= Duration::from_secs(1) {
        tokio::time::sleep(valid_from - now).await;
    }
}

/// What the chat path needs to know about a token's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserStatus {
    exists: bool,
    disabled: bool,
    user_id: u64,
    tokens_valid_after: u64,
}

/// A small per-process cache of user status, so a chat request does not
/// cost a store round trip; entries are trusted for `ttl` (the staleness
/// bound of disable/remove/revoke) and kept as a fallback for outages.
struct UserCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (UserStatus, Instant)>>,
}

/// Entries beyond this are dropped wholesale; the cache refills on demand.
const USER_CACHE_MAX: usize = 100_000;

impl UserCache {
    fn new(ttl: Duration) -> Self {
        UserCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, username: &str) -> Option<UserStatus> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(username)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(s, _)| *s)
    }

    fn get_stale(&self, username: &str) -> Option<UserStatus> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(username).map(|(s, _)| *s)
    }

    fn insert(&self, username: &str, status: UserStatus) -> UserStatus {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= USER_CACHE_MAX {
            entries.clear();
        }
        entries.insert(username.to_string(), (status, Instant::now()));
        status
    }

    fn put(&self, user: &UserRecord) -> UserStatus {
        self.insert(
            &user.username,
            UserStatus {
                exists: true,
                disabled: user.disabled,
                user_id: user.id,
                tokens_valid_after: user.tokens_valid_after,
            },
        )
    }

    fn put_missing(&self, username: &str) -> UserStatus {
        self.insert(
            username,
            UserStatus {
                exists: false,
                disabled: true,
                user_id: 0,
                tokens_valid_after: u64::MAX,
            },
        )
    }
}
