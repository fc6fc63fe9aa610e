//! The shared bucket store: GCRA buckets and usage counters in Redis, changed only by
//! Lua scripts so N gateways enforce one limit. Every script touches keys of one hash
//! slot (the `{owner}` tag), so it runs unchanged on Redis Cluster.
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>limit:{<user>}` | hash | one field per bucket: its arrival time (µs, Redis clock) |
//! | `<prefix>limit:{ip:<addr>}` | hash | field `auth`: failed logins from that address |
//! | `<prefix>limit:{<user> ip:<addr>}` | hash | field `auth`: failed logins of that name from that address |
//! | `<prefix>usage:{<user>}:<YYYY-MM-DD>` | hash | `prompt_tokens`, `completion_tokens`, `requests`, `estimated_tokens` (of the tokens, those counted by chatgate) |
//!
//! Buckets use Redis's `TIME`, so gateways with skewed clocks still agree.

use std::sync::LazyLock;

use redis::Script;

use super::gcra::{Charge, Rate};
use super::usage::UsageDelta;
use crate::auth::store::StoreError;
use crate::redis_client::RedisClient;

/// Takes every charge or none. KEYS[1] owner hash; ARGV[1] key TTL (ms), then groups of
/// field, interval (µs), tolerance (µs), cost. Returns {1, "0"} or {0, wait µs}.
/// Numbers are written with %.0f: Lua's tostring would print 16-digit µs times as 1e+15.
const CHARGE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = (#ARGV - 1) / 4
local new = {}
local wait = 0
for i = 0, n - 1 do
  local base = 2 + i * 4
  local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[base]) or '0')
  if tat < now then tat = now end
  local nt = tat + tonumber(ARGV[base + 3]) * tonumber(ARGV[base + 1])
  local allowed_at = nt - tonumber(ARGV[base + 2])
  if allowed_at > now and allowed_at - now > wait then wait = allowed_at - now end
  new[i + 1] = nt
end
if wait > 0 then return {0, string.format('%.0f', wait)} end
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[2 + i * 4], string.format('%.0f', new[i + 1]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {1, '0'}
";

/// Corrects buckets and adds usage. KEYS[1] owner hash, KEYS[2] (optional) usage hash of
/// the same owner; ARGV[1] key TTL (ms), ARGV[2] usage TTL (s), ARGV[3..6] prompt,
/// completion, requests, estimated tokens, then groups of field, interval (µs), delta
/// (units, signed).
const SETTLE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = (#ARGV - 6) / 3
for i = 0, n - 1 do
  local base = 7 + i * 3
  local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[base]) or '0')
  local delta = tonumber(ARGV[base + 2])
  if delta >= 0 then
    if tat < now then tat = now end
    tat = tat + delta * tonumber(ARGV[base + 1])
  else
    tat = tat + delta * tonumber(ARGV[base + 1])
    if tat < 0 then tat = 0 end
  end
  redis.call('HSET', KEYS[1], ARGV[base], string.format('%.0f', tat))
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if KEYS[2] then
  redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[2], 'requests', ARGV[5])
  if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', KEYS[2], 'estimated_tokens', ARGV[6]) end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
";

/// How many more units fit a bucket, writing nothing. KEYS[1] owner hash; ARGV field,
/// interval (µs), tolerance (µs). Returns {units, wait µs for one when none fits}.
const ROOM_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tat < now then tat = now end
local interval = tonumber(ARGV[2])
local room = now + tonumber(ARGV[3]) - tat
if room < 0 then room = 0 end
local units = math.floor(room / interval)
local wait = 0
if units == 0 then wait = math.max(1, tat + interval - tonumber(ARGV[3]) - now) end
return {string.format('%.0f', units), string.format('%.0f', wait)}
";

static ROOM: LazyLock<Script> = LazyLock::new(|| Script::new(ROOM_SCRIPT));
static CHARGE: LazyLock<Script> = LazyLock::new(|| Script::new(CHARGE_SCRIPT));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE_SCRIPT));

/// Bucket hashes live a little longer than the longest period (a day).
const BUCKET_TTL_MS: u64 = 2 * 86_400 * 1000;

/// The owner hash of a user or an address tag (`ip:...`).
pub fn owner_key(prefix: &str, owner: &str) -> String {
    format!("{prefix}limit:{{{owner}}}")
}

/// The usage hash of a user's day.
pub fn usage_key(prefix: &str, user: &str, day: &str) -> String {
    format!("{prefix}usage:{{{user}}}:{day}")
}

/// How many more units fit `owner`'s `bucket` now, and the wait (µs) for one when none
/// does; takes nothing.
pub async fn room(
    store: &RedisClient,
    owner: &str,
    bucket: &str,
    rate: &Rate,
) -> Result<(u64, u64), StoreError> {
    let key = owner_key(store.key_prefix(), owner);
    let (units, wait): (String, String) = store
        .run(|mut conn| {
            let mut invocation = ROOM.key(&key);
            invocation
                .arg(bucket)
                .arg(rate.interval_us())
                .arg(rate.tolerance_us());
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
    Ok((
        units.parse().unwrap_or(0),
        wait.parse().unwrap_or(1_000_000),
    ))
}

/// Takes every charge or none; the inner `Err` is the wait in µs.
pub async fn charge(
    store: &RedisClient,
    owner: &str,
    charges: &[Charge],
) -> Result<Result<(), u64>, StoreError> {
    let key = owner_key(store.key_prefix(), owner);
    let (ok, wait): (i64, String) = store
        .run(|mut conn| {
            let mut invocation = CHARGE.key(&key);
            invocation.arg(BUCKET_TTL_MS);
            for c in charges {
                invocation
                    .arg(&c.bucket)
                    .arg(c.rate.interval_us())
                    .arg(c.rate.tolerance_us())
                    .arg(c.cost);
            }
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
    if ok == 1 {
        Ok(Ok(()))
    } else {
        Ok(Err(wait.parse().unwrap_or(1_000_000)))
    }
}

/// Corrects an owner's buckets and, with `usage`, adds to a user's day.
pub async fn settle(
    store: &RedisClient,
    owner: &str,
    corrections: &[(String, Rate, i64)],
    usage: Option<(&str, UsageDelta, u64)>,
) -> Result<(), StoreError> {
    let prefix = store.key_prefix();
    let key = owner_key(prefix, owner);
    let usage_key = usage.map(|(day, _, _)| usage_key(prefix, owner, day));
    let delta = usage.map(|u| u.1).unwrap_or_default();
    let usage_ttl = usage.map_or(0, |u| u.2);
    let _: i64 = store
        .run(|mut conn| {
            let mut invocation = SETTLE.key(&key);
            if let Some(k) = &usage_key {
                invocation.key(k);
            }
            invocation
                .arg(BUCKET_TTL_MS)
                .arg(usage_ttl)
                .arg(delta.prompt_tokens)
                .arg(delta.completion_tokens)
                .arg(delta.requests)
                .arg(delta.estimated_tokens);
            for (bucket, rate, d) in corrections {
                invocation.arg(bucket).arg(rate.interval_us()).arg(*d);
            }
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
    Ok(())
}

/// Empties one bucket of an owner.
pub async fn reset(store: &RedisClient, owner: &str, bucket: &str) -> Result<(), StoreError> {
    let key = owner_key(store.key_prefix(), owner);
    let _: i64 = store
        .run(|mut conn| {
            let key = &key;
            async move {
                redis::cmd("HDEL")
                    .arg(key)
                    .arg(bucket)
                    .query_async(&mut conn)
                    .await
            }
        })
        .await?;
    Ok(())
}

/// A user's usage on the given days (missing days count zero).
pub async fn read_usage(
    store: &RedisClient,
    user: &str,
    days: &[String],
) -> Result<Vec<UsageDelta>, StoreError> {
    let mut out = Vec::with_capacity(days.len());
    for day in days {
        let key = usage_key(store.key_prefix(), user, day);
        let fields: Vec<Option<u64>> = store
            .run(|mut conn| {
                let key = &key;
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(&[
                            "prompt_tokens",
                            "completion_tokens",
                            "requests",
                            "estimated_tokens",
                        ])
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        let get = |i: usize| fields.get(i).copied().flatten().unwrap_or(0);
        out.push(UsageDelta {
            prompt_tokens: get(0),
            completion_tokens: get(1),
            requests: get(2),
            estimated_tokens: get(3),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_owner_slot() {
        assert_eq!(owner_key("cg:", "alice"), "cg:limit:{alice}");
        assert_eq!(owner_key("cg:", "ip:10.0.0.1"), "cg:limit:{ip:10.0.0.1}");
        assert_eq!(
            usage_key("cg:", "alice", "2025-01-02"),
            "cg:usage:{alice}:2025-01-02"
        );
        // Redis Cluster hashes only the part between the first `{` and the next `}`.
        let tag = |key: &str| {
            let open = key.find('{').expect("tag");
            let close = open + key[open..].find('}').expect("tag end");
            key[open + 1..close].to_string()
        };
        assert_eq!(tag(&owner_key("cg:", "alice")), "alice");
        assert_eq!(tag(&usage_key("cg:", "alice", "2025-01-02")), "alice");
    }
}
