//! Credential stores: where user records (password hashes, disabled flag, token revocation)
//! live. One trait, two implementations: Redis (single server or cluster) for real
//! deployments and a YAML file for a single node and the demo.

pub mod file;
pub mod redis;

use async_trait::async_trait;

/// Longest username a store accepts, in bytes (all allowed characters are ASCII).
pub const MAX_USERNAME_LEN: usize = 64;

/// One user as the stores keep it.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Numeric id, put into the token's `identity` claim.
    pub id: u64,
    /// Login name, unique within a store.
    pub username: String,
    /// PHC string (argon2id) or bcrypt hash of the password.
    pub password_hash: String,
    /// A disabled user can neither log in nor use tokens issued earlier.
    pub disabled: bool,
    /// Creation time, unix seconds (0 when unknown, e.g. provisioned by hand).
    pub created_at: u64,
    /// Tokens whose `iat` is before this time (unix seconds) are revoked; 0 = none revoked.
    pub tokens_valid_after: u64,
}

// The hash is not a password, but it still must not end up in logs.
impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("password_hash", &"<redacted>")
            .field("disabled", &self.disabled)
            .field("created_at", &self.created_at)
            .field("tokens_valid_after", &self.tokens_valid_after)
            .finish()
    }
}

/// Why a store operation failed. Texts never contain hashes, passwords or URL credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached in time (timeout, connection refused, auth failure, ...).
    #[error("credential store unavailable: {0}")]
    Unavailable(String),
    /// The user does not exist.
    #[error("user not found")]
    NotFound,
    /// A user with this name exists already.
    #[error("user already exists")]
    AlreadyExists,
    /// Stored data cannot be understood (missing field, bad number, unparsable file).
    #[error("credential store data is corrupt: {0}")]
    Corrupt(String),
    /// Reading or writing the backing file failed.
    #[error("credential store I/O error: {0}")]
    Io(String),
}

/// Storage of user records, shared by the login handler, the token checks and the CLI.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// Looks a user up by name; `Ok(None)` when there is no such user.
    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Creates an enabled user with a fresh id; `AlreadyExists` if the name is taken.
    /// Callers validate the name with [`validate_username`] first.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<UserRecord, StoreError>;

    /// Overwrites the password hash; `NotFound` if the user is missing.
    async fn set_password_hash(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError>;

    /// Compare-and-set of the password hash, used to upgrade a bcrypt hash after a login
    /// without clobbering a concurrent password change. `Ok(true)` when the hash was replaced,
    /// `Ok(false)` when the stored hash differs from `expected_old_hash` or the user is gone.
    async fn replace_password_hash(
        &self,
        username: &str,
        expected_old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError>;

    /// Enables or disables a user; `NotFound` if the user is missing.
    async fn set_disabled(&self, username: &str, disabled: bool) -> Result<(), StoreError>;

    /// Revokes every token issued before `valid_after` (unix seconds); `NotFound` if the
    /// user is missing. The value is stored as given, so a smaller value un-revokes.
    async fn revoke_tokens(&self, username: &str, valid_after: u64) -> Result<(), StoreError>;

    /// Deletes a user; `NotFound` if the user is missing.
    async fn remove_user(&self, username: &str) -> Result<(), StoreError>;

    /// All users, sorted by id.
    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError>;

    /// Checks that the backend answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// One line naming the backend for logs, with any password masked.
    fn describe(&self) -> String;
}

/// Checks a username for creation: 1 to 64 characters of `A-Z a-z 0-9 . _ @ + -`.
/// The error text says what is wrong and is fit to show to the operator.
pub fn validate_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("username must not be empty".to_string());
    }
    if name.len() > MAX_USERNAME_LEN {
        return Err(format!(
            "username must be at most {MAX_USERNAME_LEN} characters"
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-');
    match name.chars().find(|c| !allowed(*c)) {
        Some(bad) => Err(format!(
            "username contains {bad:?}; allowed are letters, digits and . _ @ + -"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_accepted() {
        for name in ["a", "alice", "Bob.Smith", "x_y-z", "a+tag@example.com", "0"] {
            assert_eq!(validate_username(name), Ok(()), "{name}");
        }
        assert_eq!(validate_username(&"a".repeat(64)), Ok(()));
    }

    #[test]
    fn usernames_rejected() {
        assert_eq!(
            validate_username(""),
            Err("username must not be empty".to_string())
        );
        assert_eq!(
            validate_username(&"a".repeat(65)),
            Err("username must be at most 64 characters".to_string())
        );
        assert_eq!(
            validate_username("a b"),
            Err("username contains ' '; allowed are letters, digits and . _ @ + -".to_string())
        );
        for name in ["{x}", "a:b", "a/b", "é", "a\nb", "a*"] {
            assert!(validate_username(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn debug_redacts_hash() {
        let record = UserRecord {
            id: 1,
            username: "alice".into(),
            password_hash: "$argon2id$v=19$secret".into(),
            disabled: false,
            created_at: 5,
            tokens_valid_after: 0,
        };
        let text = format!("{record:?}");
        assert!(!text.contains("argon2id"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains("alice"), "{text}");
    }
}

/// Checks every store implementation must pass, shared by their tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::{CredentialStore, StoreError};

    /// A syntactically valid argon2id PHC string (not a real password's hash).
    pub const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

    /// Creating a taken name fails, and every mutation of a missing user is
    /// `NotFound` (the compare-and-set replace is `Ok(false)`), without
    /// creating a half record.
    pub async fn duplicates_and_missing_users(store: &dyn CredentialStore) {
        store
            .create_user("alice", HASH)
            .await
            .expect("create alice");
        assert_eq!(
            store.create_user("alice", "other").await,
            Err(StoreError::AlreadyExists)
        );
        assert_eq!(
            store
                .find_user("alice")
                .await
                .ok()
                .flatten()
                .map(|u| u.password_hash),
            Some(HASH.to_string()),
            "a failed create changed the existing user"
        );
        assert_eq!(
            store.set_password_hash("nobody", HASH).await,
            Err(StoreError::NotFound)
        );
        assert_eq!(
            store.set_disabled("nobody", true).await,
            Err(StoreError::NotFound)
        );
        assert_eq!(
            store.revoke_tokens("nobody", 5).await,
            Err(StoreError::NotFound)
        );
        assert_eq!(store.remove_user("nobody").await, Err(StoreError::NotFound));
        assert_eq!(
            store.replace_password_hash("nobody", HASH, "x").await,
            Ok(false)
        );
        assert_eq!(store.find_user("nobody").await, Ok(None));
    }

    /// The re-hash write is a compare-and-set: a stale expected hash changes
    /// nothing, the current one is replaced.
    pub async fn compare_and_set(store: &dyn CredentialStore) {
        store
            .create_user("casey", "$2b$12$old")
            .await
            .expect("create casey");
        let stored = |s: Option<super::UserRecord>| s.map(|u| u.password_hash);
        assert_eq!(
            store
                .replace_password_hash("casey", "$2b$12$other", "$argon2id$new")
                .await,
            Ok(false)
        );
        assert_eq!(
            stored(store.find_user("casey").await.expect("find")),
            Some("$2b$12$old".into())
        );
        assert_eq!(
            store
                .replace_password_hash("casey", "$2b$12$old", "$argon2id$new")
                .await,
            Ok(true)
        );
        assert_eq!(
            stored(store.find_user("casey").await.expect("find")),
            Some("$argon2id$new".into())
        );
    }
}
