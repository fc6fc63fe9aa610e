//! YAML file credential store for a single node and the demo. Writes replace the file
//! atomically; reads notice changes made by another process (the CLI) through a cheap
//! metadata check and reload, keeping the last good copy if the new file does not parse.
//! Writers in different processes take turns through an advisory lock on `<file>.lock`,
//! so that one never replaces the file with a copy missing the other's change.
//!
//! Format:
//!
//! ```yaml
//! users:
//!   - id: 1
//!     username: alice
//!     password_hash: $argon2id$v=19$...
//!     disabled: false          # optional, default false
//!     created_at: 1700000000   # optional, default 0
//!     tokens_valid_after: 0    # optional, default 0
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{CredentialStore, StoreError, UserRecord};
use crate::unix_time::unix_now;

/// Credential store kept in a YAML file, or only in memory for the demo.
pub struct FileStore {
    /// `None` for the in-memory store, which never touches the disk.
    path: Option<PathBuf>,
    state: Mutex<State>,
}

struct State {
    users: Vec<UserRecord>,
    /// Metadata of the file the users were last loaded from (or last tried to load from);
    /// `None` when the file did not exist.
    seen: Option<FileStamp>,
}

/// Cheap fingerprint of the file: a rename gives a new inode, an edit in place a new
/// length or modification time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    users: Vec<FileUser>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    id: u64,
    username: String,
    password_hash: String,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    created_at: u64,
    #[serde(default)]
    tokens_valid_after: u64,
}

impl FileStore {
    /// Opens the store at `path`. A missing file is an empty store; the file is created on
    /// the first write. An existing file that does not parse is an error.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (users, seen) = match std::fs::metadata(path) {
            Ok(meta) => {
                let stamp = FileStamp::of(&meta);
                (load(path)?, Some(stamp))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), None),
            Err(e) => return Err(io_error(path, "cannot read", &e)),
        };
        Ok(FileStore {
            path: Some(path.to_path_buf()),
            state: Mutex::new(State { users, seen }),
        })
    }

    /// An empty store that lives only in memory and never writes, for the demo.
    pub fn in_memory() -> Self {
        FileStore {
            path: None,
            state: Mutex::new(State {
                users: Vec::new(),
                seen: None,
            }),
        }
    }

    /// Locks the state, reloading it first if the file changed since it was last seen.
    fn current(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the Vec half-updated in a way that
        // matters here, so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.path {
            refresh(path, &mut state);
        }
        state
    }

    /// Applies `change` to the users and persists them; memory is only updated when the
    /// write succeeded. Under the write lock the file is read afresh, so the change applies
    /// to what other processes (or an editor) wrote before; a file that does not parse is
    /// an error and is never overwritten, and a change that changes nothing writes nothing.
    fn modify<T>(
        &self,
        change: impl FnOnce(&mut Vec<UserRecord>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _turn = self.path.as_deref().map(WriteLock::take).transpose()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.path {
            let stamp = stamp_of(path).map_err(|e| io_error(path, "cannot check", &e))?;
            state.users = match stamp {
                Some(_) => load(path)?,
                None => Vec::new(),
            };
            state.seen = stamp;
        }
        let mut users = state.users.clone();
        let result = change(&mut users)?;
        if users == state.users {
            return Ok(result);
        }
        if let Some(path) = &self.path {
            state.seen = Some(save(path, &users)?);
        }
        state.users = users;
        Ok(result)
    }

    fn update_user(
        &self,
        username: &str,
        change: impl FnOnce(&mut UserRecord),
    ) -> Result<(), StoreError> {
        self.modify(|users| {
            let user = users
                .iter_mut()
                .find(|u| u.username == username)
                .ok_or(StoreError::NotFound)?;
            change(user);
            Ok(())
        })
    }
}

#[async_trait]
impl CredentialStore for FileStore {
    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let state = self.current();
        Ok(state.users.iter().find(|u| u.username == username).cloned())
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<UserRecord, StoreError> {
        self.modify(|users| {
            if users.iter().any(|u| u.username == username) {
                return Err(StoreError::AlreadyExists);
            }
            let id = users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
            let created_at = unix_now();
            // Ids can be reused here (a removed last user); tokens count from creation
            // on, so a token of the earlier holder of the id stays dead.
            let record = UserRecord {
                id,
                username: username.to_string(),
                password_hash: password_hash.to_string(),
                disabled: false,
                created_at,
                tokens_valid_after: created_at,
            };
            users.push(record.clone());
            Ok(record)
        })
    }

    async fn set_password_hash(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        self.update_user(username, |u| u.password_hash = password_hash.to_string())
    }

    async fn replace_password_hash(
        &self,
        username: &str,
        expected_old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        self.modify(|users| {
            match users
                .iter_mut()
                .find(|u| u.username == username && u.password_hash == expected_old_hash)
            {
                Some(user) => {
                    user.password_hash = new_hash.to_string();
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    async fn set_disabled(&self, username: &str, disabled: bool) -> Result<(), StoreError> {
        self.update_user(username, |u| u.disabled = disabled)
    }

    async fn revoke_tokens(&self, username: &str, valid_after: u64) -> Result<(), StoreError> {
        self.update_user(username, |u| u.tokens_valid_after = valid_after)
    }

    async fn remove_user(&self, username: &str) -> Result<(), StoreError> {
        self.modify(|users| {
            let before = users.len();
            users.retain(|u| u.username != username);
            if users.len() == before {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let mut users = self.current().users.clone();
        users.sort_by_key(|u| u.id);
        Ok(users)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(path) => format!("file {}", path.display()),
            None => "in-memory (demo, not persisted)".to_string(),
        }
    }
}

/// Reloads `state` if the file changed; on any failure keeps the users it has.
fn refresh(path: &Path, state: &mut State) {
    let stamp = match stamp_of(path) {
        Ok(stamp) => stamp,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot check credential file; keeping the users loaded before");
            return;
        }
    };
    if stamp == state.seen {
        return;
    }
    match stamp {
        // Deleting the file removes every user, like starting without one.
        None => state.users.clear(),
        Some(_) => match load(path) {
            Ok(users) => state.users = users,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "credential file changed but cannot be loaded; keeping the users loaded before");
            }
        },
    }
    // Remember the stamp even after a failure, so a broken file is reported once.
    state.seen = stamp;
}

/// The file's stamp; `None` when it does not exist.
fn stamp_of(path: &Path) -> std::io::Result<Option<FileStamp>> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(FileStamp::of(&meta))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads and checks the file.
fn load(path: &Path) -> Result<Vec<UserRecord>, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, "cannot read", &e))?;
    parse(&text).map_err(|why| StoreError::Corrupt(format!("{}: {why}", path.display())))
}

/// Parses the YAML text; the error text never quotes a value from the file.
fn parse(text: &str) -> Result<Vec<UserRecord>, String> {
    // An empty file is an empty store, as a missing one is.
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| {
        let location = e
            .location()
            .map(|l| format!("line {} column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        format!("{location}{}", without_quoted(&e.to_string()))
    })?;
    let mut users: Vec<UserRecord> = Vec::with_capacity(doc.users.len());
    for u in doc.users {
        if users.iter().any(|seen| seen.username == u.username) {
            return Err(format!("user {:?} appears twice", u.username));
        }
        if users.iter().any(|seen| seen.id == u.id) {
            return Err(format!("id {} appears twice", u.id));
        }
        users.push(UserRecord {
            id: u.id,
            username: u.username,
            password_hash: u.password_hash,
            disabled: u.disabled,
            created_at: u.created_at,
            tokens_valid_after: u.tokens_valid_after,
        });
    }
    Ok(users)
}

/// Serializes the users in the file format.
fn render(users: &[UserRecord]) -> Result<String, StoreError> {
    let doc = FileDoc {
        users: users
            .iter()
            .map(|u| FileUser {
                id: u.id,
                username: u.username.clone(),
                password_hash: u.password_hash.clone(),
                disabled: u.disabled,
                created_at: u.created_at,
                tokens_valid_after: u.tokens_valid_after,
            })
            .collect(),
    };
    serde_yaml_ng::to_string(&doc)
        .map_err(|_| StoreError::Corrupt("cannot serialize the users".to_string()))
}

/// An exclusive advisory lock (`flock`) on `<users file>.lock`, held from re-reading the
/// users to replacing the file. The lock file itself is never replaced or removed, so
/// every process locks the same inode; closing it releases the lock, also when a process
/// dies holding it. It is opened read-only when it exists (a lock needs no more), so one
/// created by another account still works for everyone who can read it.
struct WriteLock {
    /// Held only to be closed on drop, which releases the lock.
    _file: File,
}

/// How long a writer waits for another process's turn before giving up. Writes take
/// milliseconds; a holder stopped in a terminal (Ctrl-Z) must not stall the gateway's
/// thread for longer than this.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl WriteLock {
    fn take(path: &Path) -> Result<Self, StoreError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let file = File::open(&lock_path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&lock_path),
                _ => Err(e),
            })
            .map_err(|e| io_error(&lock_path, "cannot open", &e))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock takes a descriptor owned by `file`, open for this call, and flags.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(WriteLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            let busy = e.kind() == std::io::ErrorKind::WouldBlock;
            if !busy && e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_error(&lock_path, "cannot lock", &e));
            }
            if busy && std::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "{} is held by another writer for more than {} s",
                    lock_path.display(),
                    LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Replaces the file atomically: a private temp file in the same directory, fsync, rename,
/// fsync of the directory. Returns the stamp of the new file.
fn save(path: &Path, users: &[UserRecord]) -> Result<FileStamp, StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let text = render(users)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        let stamp = FileStamp::of(&file.metadata()?);
        std::fs::rename(&temp, path)?;
        Ok::<_, std::io::Error>(stamp)
    })();
    let stamp = match written {
        Ok(stamp) => stamp,
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            return Err(io_error(path, "cannot write", &e));
        }
    };
    // Makes the rename itself durable; the data is already safe, so only warn.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot sync the credential file's directory");
    }
    Ok(stamp)
}

fn io_error(path: &Path, what: &str, e: &std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

/// Replaces every double-quoted part of a parser message by `"..."`: serde quotes the
/// offending value, which may be a password hash.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if !inside {
                out.push_str("\"...\"");
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::store::contract::HASH;

    fn new_store() -> (tempfile::TempDir, PathBuf, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        let store = FileStore::open(&path).unwrap();
        (dir, path, store)
    }

    #[tokio::test]
    async fn missing_file_is_empty_and_created_on_first_write() {
        let (_dir, path, store) = new_store();
        assert_eq!(store.list_users().await.unwrap(), vec![]);
        assert!(!path.exists());
        let alice = store.create_user("alice", HASH).await.unwrap();
        assert_eq!(alice.id, 1);
        assert!(path.exists());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp file is left; the writers' lock file stays (empty, owner only).
        let mut left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["users.yaml", "users.yaml.lock"]);
        let lock = std::fs::metadata(path.with_extension("yaml.lock")).unwrap();
        assert_eq!((lock.len(), lock.mode() & 0o777), (0, 0o600));
    }

    #[tokio::test]
    async fn crud_round_trip_survives_reopen() {
        let (_dir, path, store) = new_store();
        let alice = store.create_user("alice", HASH).await.unwrap();
        let bob = store.create_user("bob", "$2b$12$old").await.unwrap();
        assert_eq!((alice.id, bob.id), (1, 2));
        assert!(!alice.disabled);
        assert_eq!(alice.tokens_valid_after, alice.created_at);
        assert!(alice.created_at > 1_600_000_000);

        store
            .set_password_hash("alice", "$argon2id$new")
            .await
            .unwrap();
        store.set_disabled("bob", true).await.unwrap();
        store.revoke_tokens("alice", 1234).await.unwrap();

        let reopened = FileStore::open(&path).unwrap();
        let found = reopened.find_user("alice").await.unwrap().unwrap();
        assert_eq!(found.password_hash, "$argon2id$new");
        assert_eq!(found.tokens_valid_after, 1234);
        assert_eq!(found.created_at, alice.created_at);
        assert!(reopened.find_user("bob").await.unwrap().unwrap().disabled);
        assert_eq!(reopened.find_user("carol").await.unwrap(), None);

        reopened.remove_user("alice").await.unwrap();
        let names: Vec<String> = reopened
            .list_users()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.username)
            .collect();
        assert_eq!(names, vec!["bob"]);
        // Ids are never reused while a higher id exists: next = max + 1.
        assert_eq!(reopened.create_user("carol", HASH).await.unwrap().id, 3);
    }

    #[tokio::test]
    async fn errors_for_existing_and_missing_users() {
        let (_dir, _path, store) = new_store();
        super::super::contract::duplicates_and_missing_users(&store).await;
    }

    #[tokio::test]
    async fn replace_password_hash_is_compare_and_set() {
        let (_dir, _path, store) = new_store();
        super::super::contract::compare_and_set(&store).await;
    }

    #[tokio::test]
    async fn sees_changes_made_by_another_writer() {
        let (_dir, path, gateway) = new_store();
        assert_eq!(gateway.find_user("alice").await.unwrap(), None);
        // The CLI is another process with its own store on the same file.
        let cli = FileStore::open(&path).unwrap();
        cli.create_user("alice", HASH).await.unwrap();
        assert_eq!(gateway.find_user("alice").await.unwrap().unwrap().id, 1);
        cli.set_disabled("alice", true).await.unwrap();
        assert!(gateway.find_user("alice").await.unwrap().unwrap().disabled);
        // A write by the gateway starts from the CLI's latest file, not its old copy.
        cli.create_user("bob", HASH).await.unwrap();
        gateway.create_user("carol", HASH).await.unwrap();
        let names: Vec<String> = cli
            .list_users()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.username)
            .collect();
        assert_eq!(names, vec!["alice", "bob", "carol"]);
    }

    /// Two stores on one file stand for the gateway and the CLI (separate processes:
    /// each opens the lock file itself, and flock locks of separate opens exclude each
    /// other even within one process). Writing at the same time, neither loses the other's
    /// users.
    #[test]
    fn writers_on_one_file_take_turns() {
        let (_dir, path, _store) = new_store();
        const EACH: usize = 40;
        let writers: Vec<_> = ["gw", "cli"]
            .into_iter()
            .map(|who| {
                let store = FileStore::open(&path).unwrap();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    for i in 0..EACH {
                        runtime
                            .block_on(store.create_user(&format!("{who}{i}"), HASH))
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let users = FileStore::open(&path)
            .unwrap()
            .state
            .into_inner()
            .unwrap()
            .users;
        assert_eq!(users.len(), 2 * EACH);
        let mut ids: Vec<u64> = users.iter().map(|u| u.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 2 * EACH, "two users got the same id");
    }

    /// A hand edit that does not parse is never overwritten by a write from the copy in
    /// memory, and a write that changes nothing (a compare-and-set miss) leaves the file
    /// as it is.
    #[tokio::test]
    async fn writes_start_from_the_file_on_disk_and_never_clobber_it() {
        let (_dir, path, store) = new_store();
        store.create_user("alice", HASH).await.unwrap();
        let broken = "users: [{id: 1, username: alice, disabled: true, bogus: 1}]\n";
        std::fs::write(&path, broken).unwrap();
        let e = store.create_user("bob", HASH).await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);

        let edited =
            "users:\n  - id: 1\n    username: alice\n    password_hash: h\n    disabled: true\n";
        std::fs::write(&path, edited).unwrap();
        assert_eq!(
            store.replace_password_hash("alice", "not-h", "new").await,
            Ok(false)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edited);
        store.create_user("bob", HASH).await.unwrap();
        let alice = store.find_user("alice").await.unwrap().unwrap();
        assert!(alice.disabled && alice.password_hash == "h");
    }

    /// A writer that keeps the lock (a CLI stopped with Ctrl-Z) stalls the others for at
    /// most `LOCK_WAIT`, after which they fail instead of waiting on.
    #[tokio::test]
    async fn a_held_lock_is_waited_for_a_bounded_time() {
        let (_dir, path, store) = new_store();
        store.create_user("alice", HASH).await.unwrap();
        let holder = WriteLock::take(&path).unwrap();
        let started = std::time::Instant::now();
        let e = store.create_user("bob", HASH).await.unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(waited >= LOCK_WAIT && waited < LOCK_WAIT * 3, "{waited:?}");
        drop(holder);
        store.create_user("bob", HASH).await.unwrap();
    }

    #[tokio::test]
    async fn keeps_last_good_copy_when_file_breaks() {
        let (_dir, path, store) = new_store();
        store.create_user("alice", HASH).await.unwrap();
        std::fs::write(&path, "users: [{id: 1, username: alice, bogus: 1}]\n").unwrap();
        assert_eq!(
            store
                .find_user("alice")
                .await
                .unwrap()
                .unwrap()
                .password_hash,
            HASH
        );
        // Fixing the file is picked up again.
        std::fs::write(
            &path,
            "users:\n  - id: 9\n    username: dave\n    password_hash: h\n",
        )
        .unwrap();
        let dave = store.find_user("dave").await.unwrap().unwrap();
        assert_eq!((dave.id, dave.disabled, dave.created_at), (9, false, 0));
        assert_eq!(store.find_user("alice").await.unwrap(), None);
        // Deleting the file removes all users.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.list_users().await.unwrap(), vec![]);
    }

    #[test]
    fn open_rejects_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        std::fs::write(
            &path,
            "users:\n  - id: x\n    username: a\n    password_hash: h\n",
        )
        .unwrap();
        let err = FileStore::open(&path).err().unwrap();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let secret = "$argon2id$v=19$secret";
        let text = format!("users:\n  - id: \"{secret}\"\n    username: a\n    password_hash: h\n");
        let err = parse(&text).unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        assert!(err.starts_with("line 2 column "), "{err}");

        let err =
            parse("users:\n  - {id: 1, username: a, password_hash: h, pasword: x}\n").unwrap_err();
        assert!(err.contains("unknown field `pasword`"), "{err}");

        assert_eq!(
            parse("users:\n  - {id: 1, username: a, password_hash: h}\n  - {id: 2, username: a, password_hash: h}\n"),
            Err("user \"a\" appears twice".to_string())
        );
        assert_eq!(
            parse("users:\n  - {id: 1, username: a, password_hash: h}\n  - {id: 1, username: b, password_hash: h}\n"),
            Err("id 1 appears twice".to_string())
        );
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(parse("users: []\n"), Ok(vec![]));
        assert!(parse("people: []\n").is_err());
    }

    #[test]
    fn render_then_parse_round_trips() {
        let users = vec![UserRecord {
            id: 3,
            username: "a+b@c.d".into(),
            password_hash: "$2y$10$abc/def".into(),
            disabled: true,
            created_at: 17,
            tokens_valid_after: 99,
        }];
        assert_eq!(parse(&render(&users).unwrap()), Ok(users));
    }

    #[test]
    fn quoted_parts_are_removed() {
        assert_eq!(
            without_quoted(r#"invalid type: string "abc", expected u64"#),
            r#"invalid type: string "...", expected u64"#
        );
        assert_eq!(without_quoted("no quotes"), "no quotes");
        assert_eq!(without_quoted(r#"open "rest"#), r#"open "...""#);
    }

    #[tokio::test]
    async fn in_memory_store_never_writes() {
        let store = FileStore::in_memory();
        let alice = store.create_user("alice", HASH).await.unwrap();
        assert_eq!(alice.id, 1);
        assert_eq!(store.find_user("alice").await.unwrap(), Some(alice));
        assert_eq!(store.describe(), "in-memory (demo, not persisted)");
        assert_eq!(store.ping().await, Ok(()));
    }
}
