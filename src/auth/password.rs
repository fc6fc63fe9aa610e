//! Password hashing and verification: argon2id PHC strings for new hashes, bcrypt accepted for
//! migrated users. Every hash runs on a few dedicated low-priority threads behind a semaphore, so a
//! login flood neither stalls the I/O threads nor takes CPU from chat traffic, nor runs more than
//! `max_concurrent` hashes at once. A hash waits for a free thread no longer than the queue timeout:
//! past it the login is turned away ([`HashersBusy`], a 429) rather than held open behind a flood.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::Semaphore;

use super::hash_pool::HashPool;

/// Largest argon2 memory cost (KiB) and pass count accepted from a stored hash, unless the
/// configured cost is higher: a corrupt `m=` or `t=` must not make one login allocate
/// gigabytes or spin for minutes.
const MAX_STORED_MEMORY_KIB: u32 = 256 * 1024;
const MAX_STORED_ITERATIONS: u32 = 64;

/// How long a hash waits for a free hashing thread unless configured otherwise
/// (`auth.password_hash.queue_timeout`).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// The argon2id cost parameters used for new hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes over the memory.
    pub iterations: u32,
    /// Degree of parallelism (lanes).
    pub parallelism: u32,
}

impl Default for PasswordParams {
    /// OWASP's minimum recommendation for argon2id: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        PasswordParams {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

impl PasswordParams {
    /// Checks the parameters with argon2's own rules.
    fn argon2_params(&self) -> Result<Params, PasswordError> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(PasswordError::InvalidParams)
    }
}

/// Why a password could not be hashed, or the hasher could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The configured argon2 parameters are out of range.
    #[error("invalid argon2 parameters: {0}")]
    InvalidParams(argon2::Error),
    /// `max_concurrent` was zero.
    #[error("the number of concurrent password hashes must be at least 1")]
    NoConcurrency,
    /// argon2 refused the input (for example a password longer than it supports).
    #[error("password hashing failed: {0}")]
    Hashing(argon2::password_hash::Error),
    /// The blocking hashing task did not complete.
    #[error("password hashing task failed")]
    TaskFailed,
    /// Every hashing thread stayed busy for the whole queue timeout.
    #[error(transparent)]
    Busy(#[from] HashersBusy),
}

/// Every hashing thread stayed busy for the whole queue timeout: the login is turned away
/// instead of waiting without end behind a flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("every password hashing thread stayed busy for {waited:?}")]
pub struct HashersBusy {
    /// How long the hash waited for a thread.
    pub waited: Duration,
}

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// The password matches; `needs_rehash` asks the caller to store a fresh argon2id hash
    /// (bcrypt, another argon2 variant or other cost parameters than the configured ones).
    Valid {
        /// Whether the stored hash should be replaced with a fresh one.
        needs_rehash: bool,
    },
    /// Wrong password, unknown user or an unusable stored hash.
    Invalid,
}

/// Hashes and verifies passwords off the async threads, at most `max_concurrent` at a time.
pub struct Passwords {
    params: Params,
    permits: Arc<Semaphore>,
    /// How long a hash waits for a permit.
    queue_timeout: Duration,
    /// Low-priority threads the hashes run on, one per permit.
    pool: HashPool,
    /// An argon2id hash of a random password with the configured cost, verified against when
    /// there is no real hash so unknown users cost as much as wrong passwords.
    dummy_hash: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("params", &self.params)
            .field("available_permits", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// Validates `params` and computes the dummy hash (one full argon2id hash, done here
    /// synchronously, so call this at start-up).
    pub fn new(params: PasswordParams, max_concurrent: usize) -> Result<Self, PasswordError> {
        if max_concurrent == 0 {
            return Err(PasswordError::NoConcurrency);
        }
        let argon2_params = params.argon2_params()?;
        let dummy_password: [u8; 32] = rand::random();
        let dummy_hash = hash_with(&argon2_params, &dummy_password);
        // This is not a hash thread: it does not keep the memory.
        release_memory();
        let dummy_hash = dummy_hash?;
        let pool = HashPool::new(max_concurrent).map_err(|_| PasswordError::TaskFailed)?;
        Ok(Passwords {
            params: argon2_params,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            pool,
            dummy_hash: dummy_hash.into(),
        })
    }

    /// Sets how long a hash waits for a free hashing thread before it gives up with
    /// [`HashersBusy`] (a zero timeout is taken as the shortest wait tokio's timer has).
    pub fn with_queue_timeout(mut self, queue_timeout: Duration) -> Self {
        self.queue_timeout = queue_timeout;
        self
    }

    /// Hashes `password` into an argon2id PHC string with a fresh random salt.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let params = self.params.clone();
        let password = password.to_owned();
        self.run_blocking(move || hash_with(&params, password.as_bytes()))
            .await?
            .unwrap_or(Err(PasswordError::TaskFailed))
    }

    /// Hashes on the calling thread, for the command line tool that creates users.
    pub fn hash_blocking(params: &PasswordParams, password: &str) -> Result<String, PasswordError> {
        let hash = hash_with(&params.argon2_params()?, password.as_bytes());
        release_memory();
        hash
    }

    /// Checks `password` against `stored`; `None` (unknown user) and unusable hashes are
    /// verified against the dummy hash so they cost the same as a wrong password.
    /// Fails only when no hashing thread came free within the queue timeout.
    pub async fn verify(
        &self,
        password: &str,
        stored: Option<&str>,
    ) -> Result<Verification, HashersBusy> {
        let params = self.params.clone();
        let password = password.to_owned();
        let stored = stored.map(str::to_owned);
        let dummy_hash = Arc::clone(&self.dummy_hash);
        let verdict = self
            .run_blocking(move || verify_stored(&params, &password, stored.as_deref(), &dummy_hash))
            .await?;
        Ok(verdict.unwrap_or(Verification::Invalid))
    }

    /// Runs `work` on the low-priority hash threads while holding a permit; `Ok(None)` if the
    /// work panicked. The wait for a permit is bounded by the queue timeout; the permit moves
    /// into the task, so a cancelled caller does not free a slot while its hash is still running.
    async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>, HashersBusy> {
        let busy = HashersBusy {
            waited: self.queue_timeout,
        };
        let permit = tokio::time::timeout(
            self.queue_timeout,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        .map_err(|_| busy)?;
        // The semaphore is never closed.
        let Ok(permit) = permit else { return Ok(None) };
        Ok(self
            .pool
            .run(move || {
                let result = work();
                drop(permit);
                result
            })
            .await)
    }
}

thread_local! {
    /// This thread's argon2 working memory, kept from one hash to the next.
    ///
    /// argon2 fills a fresh 19 MiB block per hash (default cost) when it allocates its own.
    /// glibc serves such blocks from the hashing thread's arena after the first one and keeps
    /// them resident once freed: a gateway's RSS grew by ~95 MiB after a few logins. Kept
    /// memory costs one block per hash thread, for good, and no page faults per login.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Runs `argon2` over `password` and `salt` into `out`, in this thread's kept memory.
/// A stored hash costlier than `configured` gets memory of its own for that call, freed
/// after it: growing the kept block and shrinking it back would leave the old block
/// resident in the thread's arena, hash after hash.
fn argon2_into(
    argon2: &Argon2<'_>,
    cost: &Params,
    configured: &Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> argon2::Result<()> {
    let blocks = cost.block_count();
    if blocks > configured.block_count() {
        let mut own = vec![Block::default(); blocks];
        return argon2.hash_password_into_with_memory(password, salt, out, &mut own);
    }
    MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            // Exactly the configured size from the first configured-cost hash on.
            memory.reserve_exact(configured.block_count() - memory.len());
            memory.resize(configured.block_count(), Block::default());
        }
        // Every block is written before it is read, so what an earlier hash left is harmless.
        argon2.hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
    })
}

/// Frees this thread's kept argon2 memory (for threads that hash once).
fn release_memory() {
    MEMORY.with_borrow_mut(|memory| *memory = Vec::new());
}

/// One argon2id hash with the given cost and a random 16-byte salt, as a PHC string.
fn hash_with(params: &Params, password: &[u8]) -> Result<String, PasswordError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(PasswordError::Hashing)?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    argon2_into(&argon2, params, params, password, &salt_bytes, &mut out)
        .map_err(|e| PasswordError::Hashing(e.into()))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(PasswordError::Hashing)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(PasswordError::Hashing)?),
    };
    Ok(phc.to_string())
}

/// Dispatches on the stored hash's scheme; without a usable hash, burns one dummy
/// verification and answers `Invalid`.
fn verify_stored(
    params: &Params,
    password: &str,
    stored: Option<&str>,
    dummy_hash: &str,
) -> Verification {
    let outcome = match stored {
        Some(stored) if stored.starts_with("$argon2") => verify_argon2(params, password, stored),
        Some(stored) if is_bcrypt(stored) => verify_bcrypt(password, stored),
        _ => None,
    };
    outcome.unwrap_or_else(|| {
        let _ = verify_argon2(params, password, dummy_hash);
        Verification::Invalid
    })
}

fn is_bcrypt(stored: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| stored.starts_with(prefix))
}

/// Verifies a bcrypt hash; a match always asks for a rehash to argon2id.
/// `None` when the hash cannot be parsed.
fn verify_bcrypt(password: &str, stored: &str) -> Option<Verification> {
    match bcrypt::verify(password, stored).ok()? {
        true => Some(Verification::Valid { needs_rehash: true }),
        false => Some(Verification::Invalid),
    }
}

/// Verifies an argon2 (id, i or d) PHC string. `None` when it cannot be parsed, names an
/// unknown variant or asks for more memory than we allow.
fn verify_argon2(params: &Params, password: &str, stored: &str) -> Option<Verification> {
    let (hash, stored_params) = parse_argon2(params, stored)?;
    let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
    let version = match hash.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let expected = hash.hash?;
    let mut salt = [0u8; Salt::MAX_LENGTH];
    let salt = hash.salt?.decode_b64(&mut salt).ok()?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    let argon2 = Argon2::new(algorithm, version, stored_params.clone());
    if argon2_into(
        &argon2,
        &stored_params,
        params,
        password.as_bytes(),
        salt,
        out,
    )
    .is_err()
    {
        return Some(Verification::Invalid);
    }
    // Output compares in constant time.
    if Output::new(out).ok()? != expected {
        return Some(Verification::Invalid);
    }
    let needs_rehash = hash.algorithm != Algorithm::Argon2id.ident()
        || hash.version != Some(Version::V0x13.into())
        || stored_params.m_cost() != params.m_cost()
        || stored_params.t_cost() != params.t_cost()
        || stored_params.p_cost() != params.p_cost()
        || stored_params.output_len() != Some(Params::DEFAULT_OUTPUT_LEN);
    Some(Verification::Valid { needs_rehash })
}

/// Parses a stored argon2 PHC string and its cost, refusing unknown variants and costs
/// above the ceilings.
fn parse_argon2<'a>(params: &Params, stored: &'a str) -> Option<(PasswordHash<'a>, Params)> {
    let hash = PasswordHash::new(stored).ok()?;
    Algorithm::try_from(hash.algorithm).ok()?;
    hash.salt?;
    hash.hash?;
    let stored_params = Params::try_from(&hash).ok()?;
    if stored_params.m_cost() > MAX_STORED_MEMORY_KIB.max(params.m_cost())
        || stored_params.t_cost() > MAX_STORED_ITERATIONS.max(params.t_cost())
    {
        return None;
    }
    Some((hash, stored_params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};

    /// Cheap parameters so tests stay fast; the shape of the code path is the same.
    const TEST_PARAMS: PasswordParams = PasswordParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    fn passwords() -> Passwords {
        Passwords::new(TEST_PARAMS, 2).expect("valid test params")
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("test runtime")
            .block_on(future)
    }

    #[test]
    fn hash_then_verify_round_trip() {
        let passwords = passwords();
        block_on(async {
            let hash = passwords.hash("correct horse").await.expect("hash");
            assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
            assert_eq!(
                passwords
                    .verify("correct horse", Some(&hash))
                    .await
                    .expect("a hash thread"),
                Verification::Valid {
                    needs_rehash: false
                }
            );
            assert_eq!(
                passwords
                    .verify("correct horsf", Some(&hash))
                    .await
                    .expect("a hash thread"),
                Verification::Invalid
            );
        });
    }

    /// The kept working memory must give the argon2 crate's own answers, in any order of
    /// costs on one thread (memory left dirty by a larger or smaller hash before).
    #[test]
    fn kept_memory_matches_the_argon2_crate_in_both_directions() {
        let configured = TEST_PARAMS.argon2_params().expect("params");
        let costs = [(64, 1, 1), (256, 2, 1), (64, 3, 2), (128, 1, 4), (64, 1, 1)];
        let salt = SaltString::encode_b64(&[9u8; 16]).expect("salt");
        for (i, (m, t, p)) in costs.into_iter().enumerate() {
            let cost = Params::new(m, t, p, None).expect("cost");
            for algorithm in [Algorithm::Argon2id, Algorithm::Argon2i, Algorithm::Argon2d] {
                let password = format!("pw {i} {algorithm:?}");
                let theirs = Argon2::new(algorithm, Version::V0x13, cost.clone())
                    .hash_password(password.as_bytes(), &salt)
                    .expect("hash")
                    .to_string();
                assert!(
                    matches!(
                        verify_argon2(&configured, &password, &theirs),
                        Some(Verification::Valid { .. })
                    ),
                    "{theirs}"
                );
                assert_eq!(
                    verify_argon2(&configured, "wrong", &theirs),
                    Some(Verification::Invalid)
                );
            }
            let ours = hash_with(&cost, b"ours").expect("hash");
            let parsed = PasswordHash::new(&ours).expect("phc");
            assert!(
                Argon2::default().verify_password(b"ours", &parsed).is_ok(),
                "{ours}"
            );
            assert!(Argon2::default().verify_password(b"ourz", &parsed).is_err());
        }
        // A costlier stored hash gets memory for its own call only; the kept block is
        // exactly the configured size.
        release_memory();
        let kept = || MEMORY.with_borrow(|m| (m.len(), m.capacity()));
        let stored = |cost: &Params| {
            Argon2::new(Algorithm::Argon2id, Version::V0x13, cost.clone())
                .hash_password(b"pw", &salt)
                .expect("hash")
                .to_string()
        };
        let costly = stored(&Params::new(256, 1, 1, None).expect("cost"));
        let normal = stored(&configured);
        let valid = |hash: &str| {
            matches!(
                verify_argon2(&configured, "pw", hash),
                Some(Verification::Valid { .. })
            )
        };
        assert!(valid(&costly));
        assert_eq!(kept(), (0, 0));
        let configured_size = (configured.block_count(), configured.block_count());
        for hash in [&normal, &costly, &normal] {
            assert!(valid(hash));
            assert_eq!(kept(), configured_size);
        }
    }

    #[test]
    fn only_hash_threads_keep_memory() {
        // Passwords::new hashes its dummy password on the calling thread.
        let passwords = passwords();
        assert_eq!(MEMORY.with_borrow(Vec::capacity), 0);
        Passwords::hash_blocking(&TEST_PARAMS, "cli").expect("hash");
        assert_eq!(MEMORY.with_borrow(Vec::capacity), 0);
        let kept = block_on(passwords.pool.run(|| {
            let _ = hash_with(&TEST_PARAMS.argon2_params().expect("params"), b"x");
            MEMORY.with_borrow(Vec::len)
        }));
        assert_eq!(
            kept,
            Some(TEST_PARAMS.argon2_params().expect("params").block_count())
        );
    }

    #[test]
    fn hashes_use_fresh_salts() {
        let passwords = passwords();
        let (a, b) = block_on(async {
            (
                passwords.hash("same").await.expect("hash"),
                passwords.hash("same").await.expect("hash"),
            )
        });
        assert_ne!(a, b);
    }

    #[test]
    fn blocking_hash_verifies_with_the_async_hasher() {
        let hash = Passwords::hash_blocking(&TEST_PARAMS, "from the cli").expect("hash");
        assert_eq!(
            block_on(passwords().verify("from the cli", Some(&hash))).expect("a hash thread"),
            Verification::Valid {
                needs_rehash: false
            }
        );
    }

    #[test]
    fn other_argon2_cost_or_variant_asks_for_rehash() {
        let stronger = PasswordParams {
            memory_kib: 128,
            ..TEST_PARAMS
        };
        let hash = Passwords::hash_blocking(&stronger, "pw").expect("hash");
        let passwords = passwords();
        assert_eq!(
            block_on(passwords.verify("pw", Some(&hash))).expect("a hash thread"),
            Verification::Valid { needs_rehash: true }
        );

        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            TEST_PARAMS.argon2_params().expect("params"),
        )
        .hash_password(b"pw", &SaltString::encode_b64(&[7u8; 16]).expect("salt"))
        .expect("hash")
        .to_string();
        assert!(argon2i.starts_with("$argon2i$"), "{argon2i}");
        assert_eq!(
            block_on(passwords.verify("pw", Some(&argon2i))).expect("a hash thread"),
            Verification::Valid { needs_rehash: true }
        );
        assert_eq!(
            block_on(passwords.verify("wrong", Some(&argon2i))).expect("a hash thread"),
            Verification::Invalid
        );
    }

    #[test]
    fn bcrypt_hashes_verify_and_ask_for_rehash() {
        let passwords = passwords();
        let hash_2b = bcrypt::hash("legacy pw", 4).expect("bcrypt");
        assert!(hash_2b.starts_with("$2b$04$"), "{hash_2b}");
        let hash_2a = hash_2b.replacen("$2b$", "$2a$", 1);
        let hash_2y = hash_2b.replacen("$2b$", "$2y$", 1);
        for hash in [&hash_2b, &hash_2a, &hash_2y] {
            assert_eq!(
                block_on(passwords.verify("legacy pw", Some(hash))).expect("a hash thread"),
                Verification::Valid { needs_rehash: true },
                "{hash}"
            );
            assert_eq!(
                block_on(passwords.verify("legacy pX", Some(hash))).expect("a hash thread"),
                Verification::Invalid
            );
        }
    }

    #[test]
    fn unknown_user_is_invalid_even_with_the_dummy_password() {
        let passwords = passwords();
        assert_eq!(
            block_on(passwords.verify("", None)).expect("a hash thread"),
            Verification::Invalid
        );
        assert_eq!(
            block_on(passwords.verify("anything", None)).expect("a hash thread"),
            Verification::Invalid
        );
    }

    #[test]
    fn garbage_hashes_are_invalid_without_panicking() {
        let passwords = passwords();
        let huge_memory = "$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHRzYWx0$\
                           AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        for stored in [
            "",
            "plain text password",
            "$argon2id$",
            "$argon2id$v=19$m=64,t=1,p=1$",
            "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2x$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            huge_memory,
            "$argon2id$v=19$m=64,t=4000000000,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$2b$",
            "$2b$04$tooshort",
            "$2b$99$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234",
            "$2x$04$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234",
            "$2b$04$ééééééééééééééééééééééééééééé",
        ] {
            assert_eq!(
                block_on(passwords.verify("pw", Some(stored))).expect("a hash thread"),
                Verification::Invalid,
                "{stored:?}"
            );
        }
    }

    #[test]
    fn a_login_waits_for_a_hash_thread_no_longer_than_the_queue_timeout() {
        let wait = Duration::from_millis(50);
        let passwords = Passwords::new(TEST_PARAMS, 1)
            .expect("valid test params")
            .with_queue_timeout(wait);
        block_on(async {
            // Another hash holds the only thread.
            let held = Arc::clone(&passwords.permits)
                .acquire_owned()
                .await
                .expect("permit");
            let started = std::time::Instant::now();
            assert_eq!(
                passwords.verify("pw", None).await,
                Err(HashersBusy { waited: wait })
            );
            assert!(started.elapsed() >= wait);
            assert!(matches!(
                passwords.hash("pw").await,
                Err(PasswordError::Busy(HashersBusy { .. }))
            ));
            // Free again: the next login is served.
            drop(held);
            assert_eq!(
                passwords.verify("pw", None).await,
                Ok(Verification::Invalid)
            );
            assert!(passwords.hash("pw").await.is_ok());
        });
    }

    #[test]
    fn bad_configuration_is_refused() {
        let too_little_memory = PasswordParams {
            memory_kib: 1,
            ..TEST_PARAMS
        };
        assert!(matches!(
            Passwords::new(too_little_memory, 1),
            Err(PasswordError::InvalidParams(argon2::Error::MemoryTooLittle))
        ));
        assert!(matches!(
            Passwords::new(TEST_PARAMS, 0),
            Err(PasswordError::NoConcurrency)
        ));
        assert_eq!(
            PasswordParams::default(),
            PasswordParams {
                memory_kib: 19456,
                iterations: 2,
                parallelism: 1
            }
        );
        assert!(PasswordParams::default().argon2_params().is_ok());
    }
}
