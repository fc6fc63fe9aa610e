//! Per-user rate and token limits on chat routes, brute-force limits on `/auth`, and
//! usage accounting. The arithmetic is GCRA (`gcra`); buckets live in Redis (`redis`,
//! shared by every gateway) or, without Redis or while it is unreachable, in this
//! process (`local`). [`Limiter`] is the one entry point the gateway calls.

pub mod gcra;
pub mod local;
pub mod redis;
pub mod usage;

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::auth::store::{validate_username, StoreError};
use crate::error::ApiError;
use crate::redis_client::RedisClient;
pub use gcra::{Charge, Rate};
use local::LocalBuckets;
use usage::{day_name, PendingCorrections, PendingUsage, UsageDelta};

/// What to do when the shared bucket store (Redis) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Keep serving; this process enforces the same limits on its own meanwhile.
    Allow,
    /// Refuse chat requests with 503 until Redis answers again.
    Deny,
}

/// Per-user chat limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Prompt plus completion tokens per day (a sliding 24 h).
    pub tokens_per_day: Option<u64>,
}

/// The default window of the failed-login limits (`rate_limits.auth.window`).
pub const DEFAULT_LOGIN_WINDOW: Duration = Duration::from_secs(900);

/// The validated `rate_limits:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    /// Redis unreachable: serve on local limits, or refuse.
    pub on_store_error: OnStoreError,
    /// Limits over all chat routes together.
    pub chat: ChatLimits,
    /// Completion tokens reserved before a call when the route sets no `max_tokens`.
    pub completion_estimate: u64,
    /// How long per-day usage counts are kept.
    pub usage_retention: Duration,
    /// How often usage counts gathered in this process are written to Redis in one
    /// batch; zero writes them with each request's settlement.
    pub usage_write_interval: Duration,
    /// Failed logins per user name from one client address.
    pub login_per_username: Option<Rate>,
    /// Failed logins per client address (IPv6: per /64).
    pub login_per_ip: Option<Rate>,
    /// Failed logins per user name from all addresses together: a ceiling on guessing
    /// that is spread over many addresses.
    pub login_per_username_global: Option<Rate>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            on_store_error: OnStoreError::Allow,
            chat: ChatLimits {
                requests_per_minute: Some(60),
                tokens_per_minute: Some(200_000),
                tokens_per_day: Some(2_000_000),
            },
            completion_estimate: 1024,
            usage_retention: Duration::from_secs(90 * 86_400),
            usage_write_interval: Duration::from_secs(1),
            login_per_username: Some(Rate {
                limit: 5,
                period: DEFAULT_LOGIN_WINDOW,
            }),
            login_per_ip: Some(Rate {
                limit: 20,
                period: DEFAULT_LOGIN_WINDOW,
            }),
            // OWASP ASVS 4.0, 2.2.1: "no more than 100 failed attempts per hour is
            // possible on a single account".
            login_per_username_global: Some(Rate {
                limit: 100,
                period: Duration::from_secs(3600),
            }),
        }
    }
}

/// Where a reservation's buckets were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Shared,
    Local,
}

/// Tokens and a request taken before an upstream call, to be settled after it.
#[derive(Debug)]
pub struct Reservation {
    user: String,
    /// Token buckets and what was reserved in each.
    token_buckets: Vec<(String, Rate, u64)>,
    taken: Taken,
}

/// Bucket name of the failed-login counter, in a user's and an address's hash.
const AUTH_BUCKET: &str = "auth";

/// The limiter: one per process, shared by every request.
pub struct Limiter {
    settings: LimitSettings,
    redis: Option<Arc<RedisClient>>,
    local: LocalBuckets,
    /// Usage waiting to be written: kept while Redis is unreachable, and between the
    /// [`UsageWriter`]'s batches.
    pending: PendingUsage,
    /// Token-bucket corrections waiting for the [`UsageWriter`]'s next batch.
    pending_corrections: PendingCorrections,
    /// Whether a [`UsageWriter`] is running, so settlements may be left to its batches.
    write_behind: AtomicBool,
    last_warning: AtomicU64,
    /// Login attempts of this process whose password is still being checked.
    logins_in_flight: LoginsInFlight,
}

impl Limiter {
    /// A limiter keeping its buckets in `redis`, or only in this process without it.
    pub fn new(settings: LimitSettings, redis: Option<Arc<RedisClient>>) -> Self {
        Limiter {
            settings,
            redis,
            local: LocalBuckets::new(),
            pending: PendingUsage::default(),
            pending_corrections: PendingCorrections::default(),
            write_behind: AtomicBool::new(false),
            last_warning: AtomicU64::new(0),
            logins_in_flight: LoginsInFlight::default(),
        }
    }

    /// The settings it enforces.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Reserves one request and `estimate` tokens for `user` on `route` (with the
    /// route's own limits on top of the global ones), or answers 429 with the wait.
    pub async fn reserve(
        &self,
        user: &str,
        route: &str,
        route_limits: &ChatLimits,
        estimate: u64,
    ) -> Result<Reservation, ApiError> {
        let mut charges = Vec::new();
        let mut token_buckets = Vec::new();
        for (scope, limits) in [("*", &self.settings.chat), (route, route_limits)] {
            if let Some(n) = limits.requests_per_minute {
                charges.push(charge(format!("req:{scope}"), Rate::per_minute(n), 1));
            }
            for (kind, limit, rate) in [
                (
                    "tpm",
                    limits.tokens_per_minute,
                    Rate::per_minute as fn(u64) -> Rate,
                ),
                ("tpd", limits.tokens_per_day, Rate::per_day),
            ] {
                if let Some(n) = limit {
                    let rate = rate(n);
                    let cost = rate.clamp(estimate);
                    let bucket = format!("{kind}:{scope}");
                    token_buckets.push((bucket.clone(), rate, cost));
                    charges.push(charge(bucket, rate, cost));
                }
            }
        }
        let taken = self.take(user, &charges).await?;
        Ok(Reservation {
            user: user.to_string(),
            token_buckets,
            taken,
        })
    }

    /// Settles a reservation once the call is over: token buckets are corrected to the
    /// usage (refunded entirely when the upstream gave no answer, kept at the estimate
    /// when usage is unknown), and the day's usage is counted; `estimated`: chatgate
    /// counted `used` itself, the upstream reported none.
    pub async fn settle(
        &self,
        r: Reservation,
        used: Option<(u64, u64)>,
        answered: bool,
        estimated: bool,
    ) {
        let total = used.map(|(p, c)| p.saturating_add(c));
        let corrections: Vec<(String, Rate, i64)> = r
            .token_buckets
            .iter()
            .filter_map(|(bucket, rate, reserved)| {
                let actual = match (answered, total) {
                    (false, _) => 0,
                    (true, Some(t)) => t,
                    (true, None) => return None,
                };
                let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                    - i64::try_from(*reserved).unwrap_or(i64::MAX);
                (delta != 0).then(|| (bucket.clone(), *rate, delta))
            })
            .collect();
        let delta = UsageDelta {
            prompt_tokens: used.map_or(0, |u| u.0),
            completion_tokens: used.map_or(0, |u| u.1),
            requests: u64::from(answered),
            estimated_tokens: match used {
                Some((p, c)) if estimated => p.saturating_add(c),
                _ => 0,
            },
        };
        let day = day_name(crate::unix_time::unix_now());
        let Some(store) = &self.redis else {
            self.local.adjust(&r.user, &corrections, unix_micros());
            return;
        };
        if r.taken == Taken::Local {
            self.local.adjust(&r.user, &corrections, unix_micros());
        }
        let shared_corrections: &[(String, Rate, i64)] = match r.taken {
            Taken::Shared => &corrections,
            Taken::Local => &[],
        };
        let write_behind = self.write_behind.load(Ordering::Relaxed);
        // Left to the UsageWriter: one Redis call per user and interval instead of one per
        // request (a full buffer falls back to writing now).
        let batched = write_behind && !delta.is_empty() && self.pending.keep(&r.user, &day, delta);
        let shared_corrections: &[(String, Rate, i64)] = if write_behind
            && !shared_corrections.is_empty()
            && self.pending_corrections.keep(&r.user, shared_corrections)
        {
            &[]
        } else {
            shared_corrections
        };
        if shared_corrections.is_empty() && (delta.is_empty() || batched) {
            return;
        }
        let usage =
            (!delta.is_empty() && !batched).then_some((day.as_str(), delta, self.retention_secs()));
        match redis::settle(store, &r.user, shared_corrections, usage).await {
            Ok(()) if !write_behind => self.flush_pending(store).await,
            Ok(()) => {}
            Err(e) => {
                self.warn_store(&e);
                if usage.is_some() && !self.pending.keep(&r.user, &day, delta) {
                    tracing::warn!(user = %r.user, "usage buffer full; usage of this request is lost");
                }
            }
        }
    }

    /// Runs a login `attempt` under the failed-login limits for `username` and `ip`: the
    /// address, the (name, address) pair and the name across all addresses. Refused with
    /// 429 while any of them is locked out by failures already known; a rejected password
    /// counts one failure in each, a success clears the pair's failures.
    ///
    /// Only known failures count. An attempt still being checked holds a place: when the
    /// known failures plus the attempts in flight (in this process) would exceed a limit,
    /// the attempt waits for those to finish instead of being refused, so parallel guesses
    /// cannot overshoot a limit and a right password is never refused for attempts that
    /// may still succeed; every `Retry-After` is the wait the known failures impose.
    pub async fn guard_login<T>(
        &self,
        username: Option<&str>,
        ip: Option<IpAddr>,
        attempt: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let Some(username) = username else {
            return attempt.await;
        };
        let ip_tag = ip.map(ip_owner);
        let mut owners: Vec<(String, Rate)> = Vec::new();
        if let (Some(tag), Some(rate)) = (&ip_tag, self.settings.login_per_ip) {
            owners.push((tag.clone(), rate));
        }
        // A name no user can have is never looked up; the address limit still holds.
        let pair = validate_username(username).is_ok().then(|| {
            let tag = ip_tag.as_deref().unwrap_or("ip:unknown");
            format!("{username} {tag}")
        });
        if let (Some(pair), Some(rate)) = (&pair, self.settings.login_per_username) {
            owners.push((pair.clone(), rate));
        }
        if let (true, Some(rate)) = (pair.is_some(), self.settings.login_per_username_global) {
            owners.push((username.to_string(), rate));
        }
        let in_flight = self.admit_login(&owners).await?;
        let result = attempt.await;
        match &result {
            Err(ApiError::CredentialsRejected) => self.count_login_failure(&owners).await,
            Ok(_) => {
                if let Some(pair) = &pair {
                    self.reset_login(pair).await;
                }
            }
            // Store outages, busy hashers and the like are not the client's failures.
            Err(_) => {}
        }
        // Released after the failure is counted, so a waiting attempt sees it.
        drop(in_flight);
        result
    }

    /// Waits until one more failure fits every owner's bucket next to the attempts in
    /// flight, then holds a place in each; 429 when the known failures alone leave no room.
    async fn admit_login(&self, owners: &[(String, Rate)]) -> Result<InFlight<'_>, ApiError> {
        loop {
            let released = self.logins_in_flight.released();
            let mut rooms = Vec::with_capacity(owners.len());
            let mut refused = None;
            for (owner, rate) in owners {
                let (units, wait) = self.login_room(owner, rate).await?;
                if units == 0 {
                    refused = refused.max(Some(wait));
                }
                rooms.push(units);
            }
            if let Some(wait) = refused {
                return Err(ApiError::TooManyRequests {
                    retry_after: gcra::wait_duration(wait),
                });
            }
            // Others in flight may still succeed: wait for one of them, then look again.
            match self.logins_in_flight.enter(owners, &rooms) {
                Some(held) => return Ok(held),
                None => self.logins_in_flight.released_beyond(released).await,
            }
        }
    }

    /// How many more failures fit `owner`'s failed-login bucket now, and the wait for one
    /// when none does; takes nothing.
    async fn login_room(&self, owner: &str, rate: &Rate) -> Result<(u64, u64), ApiError> {
        let Some(store) = &self.redis else {
            return Ok(self.local.room(owner, AUTH_BUCKET, rate, unix_micros()));
        };
        match redis::room(store, owner, AUTH_BUCKET, rate).await {
            Ok(room) => Ok(room),
            Err(e) => {
                self.warn_store(&e);
                match self.settings.on_store_error {
                    OnStoreError::Allow => {
                        Ok(self.local.room(owner, AUTH_BUCKET, rate, unix_micros()))
                    }
                    OnStoreError::Deny => Err(ApiError::CredentialStoreUnavailable),
                }
            }
        }
    }

    /// Counts one failed login for each owner (never refused: a failure past the limit
    /// lengthens the lockout).
    async fn count_login_failure(&self, owners: &[(String, Rate)]) {
        for (owner, rate) in owners {
            let correction = [(AUTH_BUCKET.to_string(), *rate, 1)];
            match &self.redis {
                Some(store) => {
                    if let Err(e) = redis::settle(store, owner, &correction, None).await {
                        self.warn_store(&e);
                        self.local.adjust(owner, &correction, unix_micros());
                    }
                }
                None => self.local.adjust(owner, &correction, unix_micros()),
            }
        }
    }

    /// Empties `owner`'s failed-login bucket, in Redis and in this process (failures
    /// counted here while Redis was unreachable).
    async fn reset_login(&self, owner: &str) {
        if let Some(store) = &self.redis {
            if let Err(e) = redis::reset(store, owner, AUTH_BUCKET).await {
                self.warn_store(&e);
            }
        }
        self.local.reset(owner, AUTH_BUCKET);
    }

    /// Takes every charge for `owner` in Redis, or locally when Redis is absent or (with
    /// `on_store_error: allow`) unreachable.
    async fn take(&self, owner: &str, charges: &[Charge]) -> Result<Taken, ApiError> {
        let too_many = |wait: u64| ApiError::TooManyRequests {
            retry_after: gcra::wait_duration(wait),
        };
        let local = || {
            self.local
                .charge(owner, charges, unix_micros())
                .map(|()| Taken::Local)
                .map_err(too_many)
        };
        let Some(store) = &self.redis else {
            return local();
        };
        if charges.is_empty() {
            return Ok(Taken::Shared);
        }
        match redis::charge(store, owner, charges).await {
            Ok(Ok(())) => Ok(Taken::Shared),
            Ok(Err(wait)) => Err(too_many(wait)),
            Err(e) => {
                self.warn_store(&e);
                match self.settings.on_store_error {
                    OnStoreError::Allow => local(),
                    OnStoreError::Deny => Err(ApiError::CredentialStoreUnavailable),
                }
            }
        }
    }

    /// Writes the usage and corrections kept in this process, one call per user (and
    /// day), up to [`FLUSH_CONCURRENCY`] calls in flight. Usage that cannot be written
    /// stays kept; corrections are then dropped, as when a single request's settlement
    /// fails.
    async fn flush_pending(&self, store: &RedisClient) {
        let mut corrections = self.pending_corrections.take();
        if corrections.is_empty() && self.pending.is_empty() {
            return;
        }
        let with_usage: Vec<_> = self
            .pending
            .take()
            .into_iter()
            .map(|((user, day), delta)| {
                let fixes = corrections.remove(&user).unwrap_or_default();
                (user, Some((day, delta)), fixes)
            })
            .collect();
        let calls = with_usage.into_iter().chain(
            corrections
                .into_iter()
                .map(|(owner, fixes)| (owner, None, fixes)),
        );
        let retention = self.retention_secs();
        futures::stream::iter(calls)
            .for_each_concurrent(FLUSH_CONCURRENCY, |(owner, usage, fixes)| async move {
                let written = usage
                    .as_ref()
                    .map(|(day, delta)| (day.as_str(), *delta, retention));
                let Err(e) = redis::settle(store, &owner, &fixes, written).await else {
                    return;
                };
                self.warn_store(&e);
                if let Some((day, delta)) = usage {
                    if !self.pending.keep(&owner, &day, delta) {
                        tracing::warn!(user = %owner, "usage buffer full; usage is lost");
                    }
                }
            })
            .await;
    }

    fn retention_secs(&self) -> u64 {
        self.settings.usage_retention.as_secs().max(86_400)
    }

    /// Logs a store failure at most once per 10 seconds (an outage would flood the log).
    fn warn_store(&self, e: &StoreError) {
        let now = crate::unix_time::unix_now();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let policy = match self.settings.on_store_error {
                OnStoreError::Allow => "enforcing limits in this process only",
                OnStoreError::Deny => "refusing chat requests",
            };
            tracing::warn!(error = %e, policy, "rate limit store unreachable");
        }
    }
}

/// Settle calls one flush keeps in flight: they share the multiplexed Redis connection,
/// so a flush for many users is pipelined instead of paying one round trip per user in turn.
const FLUSH_CONCURRENCY: usize = 64;

/// Writes the usage counted in this process, and the token-bucket corrections of
/// settled calls, to Redis every `rate_limits.usage_write_interval`: one call per user
/// instead of one per request. Refunds of unused reservations thus arrive up to one
/// interval late (and extra charges too). On shutdown it writes what is left and turns
/// batching off, so requests still finishing during the graceful shutdown write their
/// usage directly. A killed process loses at most one interval of usage counts.
pub struct UsageWriter {
    limiter: Arc<Limiter>,
}

impl UsageWriter {
    pub fn new(limiter: Arc<Limiter>) -> Self {
        UsageWriter { limiter }
    }

    /// Whether batching applies: usage goes to Redis, and an interval is set.
    pub fn is_needed(&self) -> bool {
        self.limiter.redis.is_some() && !self.limiter.settings.usage_write_interval.is_zero()
    }

    /// Batches usage until `shutdown` resolves, then writes the rest.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let limiter = &self.limiter;
        let Some(store) = &limiter.redis else {
            return;
        };
        let interval = limiter.settings.usage_write_interval;
        limiter.write_behind.store(true, Ordering::Relaxed);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(interval) => limiter.flush_pending(store).await,
            }
        }
        limiter.write_behind.store(false, Ordering::Relaxed);
        limiter.flush_pending(store).await;
    }
}

#[async_trait::async_trait]
impl BackgroundService for UsageWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.run(async move {
            // An error means the sender is gone: shutting down either way.
            let _ = shutdown.changed().await;
        })
        .await;
    }
}

/// Login attempts of this process still being checked, per limit owner, so a new attempt
/// can tell failures already counted from attempts that may yet succeed.
#[derive(Default)]
struct LoginsInFlight {
    state: std::sync::Mutex<InFlightState>,
    /// Woken whenever a place is given back.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct InFlightState {
    counts: std::collections::HashMap<String, u64>,
    /// How many places have been given back so far.
    released: u64,
}

impl LoginsInFlight {
    /// Holds a place at each owner when every owner has room for one more attempt next to
    /// those already in flight (`rooms[i]`: the failures that still fit `owners[i]`).
    fn enter(&self, owners: &[(String, Rate)], rooms: &[u64]) -> Option<InFlight<'_>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fits = owners
            .iter()
            .zip(rooms)
            .all(|((owner, _), room)| state.counts.get(owner).copied().unwrap_or(0) < *room);
        if !fits {
            return None;
        }
        for (owner, _) in owners {
            *state.counts.entry(owner.clone()).or_insert(0) += 1;
        }
        Some(InFlight {
            registry: self,
            owners: owners.iter().map(|(owner, _)| owner.clone()).collect(),
        })
    }

    /// How many places have been given back so far.
    fn released(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .released
    }

    /// Waits until more than `count` places have been given back.
    async fn released_beyond(&self, count: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .released
                > count
            {
                return;
            }
            changed.await;
        }
    }
}

/// One attempt's places in [`LoginsInFlight`], given back on drop.
struct InFlight<'a> {
    registry: &'a LoginsInFlight,
    owners: Vec<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self
            .registry
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for owner in &self.owners {
            if let Some(n) = state.counts.get_mut(owner) {
                *n -= 1;
                if *n == 0 {
                    state.counts.remove(owner);
                }
            }
        }
        state.released += 1;
        drop(state);
        self.registry.changed.notify_waiters();
    }
}

fn charge(bucket: String, rate: Rate, cost: u64) -> Charge {
    Charge { bucket, rate, cost }
}

/// The owner tag of a client address: the address for IPv4, its /64 for IPv6 (one
/// subscriber usually holds a whole /64).
pub fn ip_owner(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

fn unix_micros() -> u64 {
    u64::try_from(crate::unix_time::since_epoch().as_micros()).unwrap_or(u64::MAX)
}

/// Tokens to reserve for a request: about one per 4 bytes of the body, plus the
/// completion the route allows.
pub fn estimate_tokens(body_bytes: usize, completion_estimate: u64) -> u64 {
    (body_bytes as u64 / 4).saturating_add(completion_estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimitSettings {
        LimitSettings {
            chat: ChatLimits {
                requests_per_minute: Some(3),
                tokens_per_minute: Some(1000),
                tokens_per_day: None,
            },
            login_per_username: Some(Rate::per_minute(2)),
            login_per_ip: Some(Rate::per_minute(3)),
            ..LimitSettings::default()
        }
    }

    /// One flush writes the batched usage of many users (more than it keeps in flight at
    /// once), each to its own key; what a flush cannot write stays for the next one.
    #[tokio::test]
    async fn a_flush_writes_every_users_usage_and_keeps_what_failed() {
        let mut server = crate::auth::store::redis::tests::RedisServer::start();
        let store = Arc::new(server.client());
        let limiter = Limiter::new(LimitSettings::default(), Some(Arc::clone(&store)));
        let day = day_name(crate::unix_time::unix_now());
        let users: Vec<String> = (0..3 * FLUSH_CONCURRENCY)
            .map(|i| format!("u{i}"))
            .collect();
        let delta = |i: usize| UsageDelta {
            prompt_tokens: i as u64,
            completion_tokens: 2 * i as u64,
            requests: 1,
            estimated_tokens: i as u64 % 3,
        };
        for (i, user) in users.iter().enumerate() {
            assert!(limiter.pending.keep(user, &day, delta(i)));
        }
        limiter.flush_pending(&store).await;
        assert!(limiter.pending.is_empty());
        for (i, user) in users.iter().enumerate() {
            let written = redis::read_usage(&store, user, std::slice::from_ref(&day))
                .await
                .expect("usage");
            assert_eq!(written, vec![delta(i)], "{user}");
        }

        server.stop();
        assert!(limiter.pending.keep("late", &day, delta(7)));
        limiter.flush_pending(&store).await;
        assert_eq!(
            limiter.pending.take(),
            vec![(("late".into(), day), delta(7))]
        );
    }

    #[test]
    fn address_owners() {
        assert_eq!(ip_owner("10.1.2.3".parse().unwrap()), "ip:10.1.2.3");
        assert_eq!(ip_owner("::ffff:10.1.2.3".parse().unwrap()), "ip:10.1.2.3");
        assert_eq!(
            ip_owner("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "ip:2001:db8:1:2::/64"
        );
    }

    #[tokio::test]
    async fn local_request_limit_and_token_settling() {
        let l = Limiter::new(settings(), None);
        let none = ChatLimits::default();
        let r = l.reserve("alice", "/c", &none, 600).await.expect("first");
        // Only 100 used: 500 refunded, so 900 fit now.
        l.settle(r, Some((60, 40)), true, false).await;
        let r = l.reserve("alice", "/c", &none, 900).await.expect("second");
        l.settle(r, None, true, false).await; // unknown usage keeps the estimate
        match l.reserve("alice", "/c", &none, 10).await {
            // The bucket is full; 10 tokens drip back in 10 × 60 ms.
            Err(ApiError::TooManyRequests { retry_after }) => assert!(
                retry_after > Duration::from_millis(500)
                    && retry_after <= Duration::from_millis(600),
                "{retry_after:?}"
            ),
            other => panic!("{other:?}"),
        }
        // An upstream failure refunds the tokens, but the request still counts.
        let r = l.reserve("bob", "/c", &none, 1000).await.expect("bob");
        l.settle(r, None, false, false).await;
        let r = l.reserve("bob", "/c", &none, 1000).await.expect("bob 2");
        l.settle(r, Some((1, 1)), true, true).await;
        l.reserve("bob", "/c", &none, 1).await.expect("bob 3");
        assert!(matches!(
            l.reserve("bob", "/c", &none, 1).await,
            Err(ApiError::TooManyRequests { .. })
        ));
    }

    #[tokio::test]
    async fn route_limits_add_to_global_ones() {
        let l = Limiter::new(settings(), None);
        let strict = ChatLimits {
            requests_per_minute: Some(1),
            ..ChatLimits::default()
        };
        l.reserve("alice", "/strict", &strict, 1)
            .await
            .expect("first");
        assert!(l.reserve("alice", "/strict", &strict, 1).await.is_err());
        assert!(l
            .reserve("alice", "/other", &ChatLimits::default(), 1)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn login_failures_lock_out_and_success_clears_the_name() {
        let l = Limiter::new(settings(), None);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let reject = || async { Err::<(), _>(ApiError::CredentialsRejected) };
        let ok = || async { Ok::<(), ApiError>(()) };
        assert_eq!(l.guard_login(Some("alice"), Some(ip), ok()).await, Ok(()));
        for _ in 0..2 {
            assert_eq!(
                l.guard_login(Some("alice"), Some(ip), reject()).await,
                Err(ApiError::CredentialsRejected)
            );
        }
        // The name is locked, even with the right password.
        assert!(matches!(
            l.guard_login(Some("alice"), Some(ip), ok()).await,
            Err(ApiError::TooManyRequests { .. })
        ));
        // Another name from the same address: one failure left there (3 per minute).
        assert_eq!(
            l.guard_login(Some("bob"), Some(ip), reject()).await,
            Err(ApiError::CredentialsRejected)
        );
        assert!(matches!(
            l.guard_login(Some("carol"), Some(ip), ok()).await,
            Err(ApiError::TooManyRequests { .. })
        ));
        // Outage-type errors do not count.
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(
                l.guard_login(Some("dave"), Some(other), async {
                    Err::<(), _>(ApiError::CredentialStoreUnavailable)
                })
                .await,
                Err(ApiError::CredentialStoreUnavailable)
            );
        }
        // A success clears the name's failures.
        l.guard_login(Some("erin"), Some(other), reject())
            .await
            .ok();
        l.guard_login(Some("erin"), Some(other), ok()).await.ok();
        assert_eq!(
            l.guard_login(Some("erin"), Some(other), reject()).await,
            Err(ApiError::CredentialsRejected)
        );
        assert_eq!(
            l.guard_login(Some("erin"), Some(other), reject()).await,
            Err(ApiError::CredentialsRejected)
        );
    }

    /// Runs `n` login attempts for `name` from `ip` at once; each attempt, once admitted,
    /// waits at a gate the test opens when `admitted_first` attempts are in.
    async fn logins_at_once(
        l: &Arc<Limiter>,
        name: &'static str,
        ip: IpAddr,
        n: usize,
        admitted_first: usize,
        verdict: Result<(), ApiError>,
    ) -> (Vec<Result<(), ApiError>>, usize) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let ran = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (l, gate, ran, verdict) =
                    (l.clone(), gate.clone(), ran.clone(), verdict.clone());
                tokio::spawn(async move {
                    l.guard_login(Some(name), Some(ip), async {
                        ran.fetch_add(1, Ordering::SeqCst);
                        let _permit = gate.acquire().await.expect("gate");
                        verdict
                    })
                    .await
                })
            })
            .collect();
        while ran.load(Ordering::SeqCst) < admitted_first as u64 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // No more got in while those are in flight.
        assert_eq!(ran.load(Ordering::SeqCst), admitted_first as u64);
        gate.add_permits(n);
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("task"));
        }
        (results, ran.load(Ordering::SeqCst) as usize)
    }

    /// A local limiter allowing 5 failed logins a minute per name (20 per address), and
    /// the address the attempts come from.
    fn five_failures_a_minute() -> (Arc<Limiter>, IpAddr) {
        let settings = LimitSettings {
            login_per_username: Some(Rate::per_minute(5)),
            login_per_ip: Some(Rate::per_minute(20)),
            ..LimitSettings::default()
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        (Arc::new(Limiter::new(settings, None)), ip)
    }

    /// Ten right passwords at once for a name allowing 5 failures: attempts still in flight
    /// are no failures, so all ten succeed (the later five wait for the first five).
    #[tokio::test]
    async fn parallel_right_passwords_all_succeed() {
        let (l, ip) = five_failures_a_minute();
        let (results, ran) = logins_at_once(&l, "alice", ip, 10, 5, Ok(())).await;
        assert_eq!(results, vec![Ok(()); 10]);
        assert_eq!(ran, 10);
    }

    /// Ten wrong passwords at once: exactly the limit's five are checked, the rest get 429
    /// with the true wait (a full minute's worth of one failure: 12 s).
    #[tokio::test]
    async fn parallel_wrong_passwords_cannot_overshoot_the_limit() {
        let (l, ip) = five_failures_a_minute();
        let (results, ran) =
            logins_at_once(&l, "alice", ip, 10, 5, Err(ApiError::CredentialsRejected)).await;
        assert_eq!(ran, 5);
        let rejected = results
            .iter()
            .filter(|r| **r == Err(ApiError::CredentialsRejected))
            .count();
        assert_eq!(rejected, 5);
        for r in results
            .iter()
            .filter(|r| **r != Err(ApiError::CredentialsRejected))
        {
            match r {
                Err(ApiError::TooManyRequests { retry_after }) => assert!(
                    *retry_after > Duration::from_secs(11)
                        && *retry_after <= Duration::from_secs(12),
                    "{retry_after:?}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Failures count per (name, address): another address can still log in; the name's
    /// ceiling over all addresses stops guessing spread over many.
    #[tokio::test]
    async fn a_name_is_locked_per_address_and_by_a_ceiling_over_all() {
        let settings = LimitSettings {
            login_per_username: Some(Rate::per_minute(2)),
            login_per_ip: Some(Rate::per_minute(10)),
            login_per_username_global: Some(Rate::per_minute(5)),
            ..LimitSettings::default()
        };
        let l = Limiter::new(settings, None);
        let reject = || async { Err::<(), _>(ApiError::CredentialsRejected) };
        let ok = || async { Ok::<(), ApiError>(()) };
        let at = |i: u8| -> IpAddr { format!("10.0.0.{i}").parse().unwrap() };
        for _ in 0..2 {
            assert_eq!(
                l.guard_login(Some("alice"), Some(at(1)), reject()).await,
                Err(ApiError::CredentialsRejected)
            );
        }
        assert!(matches!(
            l.guard_login(Some("alice"), Some(at(1)), ok()).await,
            Err(ApiError::TooManyRequests { .. })
        ));
        // The user, elsewhere, is not locked out.
        assert_eq!(
            l.guard_login(Some("alice"), Some(at(2)), ok()).await,
            Ok(())
        );
        // Guesses from three more addresses reach the name's ceiling of 5.
        for i in [3, 4, 5] {
            assert_eq!(
                l.guard_login(Some("alice"), Some(at(i)), reject()).await,
                Err(ApiError::CredentialsRejected)
            );
        }
        assert!(matches!(
            l.guard_login(Some("alice"), Some(at(6)), ok()).await,
            Err(ApiError::TooManyRequests { .. })
        ));
        // Other names are not affected.
        assert_eq!(l.guard_login(Some("bob"), Some(at(6)), ok()).await, Ok(()));
    }

    #[test]
    fn estimates() {
        assert_eq!(estimate_tokens(400, 1024), 1124);
    }
}
