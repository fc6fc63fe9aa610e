//! The in-process bucket store: the same GCRA buckets as Redis keeps, in maps in this
//! process. It serves when limits have no Redis (file or demo credentials) and stands in
//! for Redis while Redis is unreachable, so one node stays protected on its own.
//!
//! Bounded under a flood of distinct names (a dictionary attack on `/auth` while Redis is
//! down): buckets live in shards, each with its own lock and an index by arrival time, so
//! a bucket that has emptied is dropped in O(log n) when its time passes, and a full
//! shard makes room by forgetting the bucket closest to empty. No charge ever scans.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use super::gcra::{adjust, conform_all, room, Charge, Rate};

/// Buckets kept at most, all shards together.
const MAX_BUCKETS: usize = 200_000;
/// Independent locks: requests for different owners rarely wait on each other.
const SHARDS: usize = 16;
/// A shard's map gives memory back once it holds fewer than a quarter of its capacity.
const SHRINK_BELOW: usize = 4;

/// Buckets keyed by `<owner key>\0<bucket name>`, each holding its arrival time (µs).
/// An owner's buckets share a shard, so a multi-bucket charge is all-or-nothing.
#[derive(Debug)]
pub struct LocalBuckets {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    /// Slot → theoretical arrival time (µs). Absent means empty (arrival time 0).
    tats: HashMap<Arc<str>, u64>,
    /// The same entries ordered by arrival time: the front empties first.
    by_tat: BTreeSet<(u64, Arc<str>)>,
}

fn slot(owner: &str, bucket: &str) -> String {
    format!("{owner}\0{bucket}")
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBuckets {
    /// An empty store of the default size.
    pub fn new() -> Self {
        Self::with_capacity(MAX_BUCKETS)
    }

    /// An empty store that keeps at most about `capacity` buckets.
    pub fn with_capacity(capacity: usize) -> Self {
        LocalBuckets {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, owner: &str) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(owner) as usize % SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes every charge at `now` (µs) or none; `Err` is the wait in µs.
    pub fn charge(&self, owner: &str, charges: &[Charge], now: u64) -> Result<(), u64> {
        let mut shard = self.shard(owner);
        shard.expire(now);
        let slots: Vec<String> = charges.iter().map(|c| slot(owner, &c.bucket)).collect();
        let current: Vec<u64> = slots.iter().map(|s| shard.get(s)).collect();
        let new_tats = conform_all(&current, now, charges)?;
        for (slot, tat) in slots.iter().zip(new_tats) {
            shard.set(slot, tat, now, self.per_shard);
        }
        Ok(())
    }

    /// How many more units fit `owner`'s `bucket` at `now`, and the wait for one when none
    /// does (see [`room`]); takes nothing.
    pub fn room(&self, owner: &str, bucket: &str, rate: &Rate, now: u64) -> (u64, u64) {
        let tat = self.shard(owner).get(&slot(owner, bucket));
        room(tat, now, rate)
    }

    /// Corrects buckets after the fact (see [`adjust`]).
    pub fn adjust(&self, owner: &str, corrections: &[(String, Rate, i64)], now: u64) {
        let mut shard = self.shard(owner);
        shard.expire(now);
        for (bucket, rate, delta) in corrections {
            let key = slot(owner, bucket);
            let tat = adjust(shard.get(&key), now, rate, *delta);
            shard.set(&key, tat, now, self.per_shard);
        }
    }

    /// Empties one bucket (a successful login clears its name's failures).
    pub fn reset(&self, owner: &str, bucket: &str) {
        self.shard(owner).remove(&slot(owner, bucket));
    }

    /// How many buckets are held (not yet empty), all shards together.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).tats.len())
            .sum()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
    fn get(&self, key: &str) -> u64 {
        self.tats.get(key).copied().unwrap_or(0)
    }

    /// Drops every bucket whose arrival time has passed: it is as good as empty.
    fn expire(&mut self, now: u64) {
        while self.by_tat.first().is_some_and(|(tat, _)| *tat <= now) {
            if let Some((_, key)) = self.by_tat.pop_first() {
                self.tats.remove(&key);
            }
        }
        self.shrink();
    }

    fn set(&mut self, key: &str, tat: u64, now: u64, capacity: usize) {
        if tat <= now {
            self.remove(key);
            return;
        }
        let key: Arc<str> = match self.tats.get_key_value(key) {
            Some((known, &old)) => {
                let known = Arc::clone(known);
                self.by_tat.remove(&(old, Arc::clone(&known)));
                known
            }
            None => {
                if self.tats.len() >= capacity {
                    // Full of live buckets: forget the one closest to empty.
                    if let Some((_, oldest)) = self.by_tat.pop_first() {
                        self.tats.remove(&oldest);
                    }
                }
                Arc::from(key)
            }
        };
        self.by_tat.insert((tat, Arc::clone(&key)));
        self.tats.insert(key, tat);
    }

    fn remove(&mut self, key: &str) {
        if let Some((key, tat)) = self.tats.remove_entry(key) {
            self.by_tat.remove(&(tat, key));
        }
    }

    fn shrink(&mut self) {
        let capacity = self.tats.capacity();
        if capacity > 1024 && self.tats.len() * SHRINK_BELOW < capacity {
            self.tats.shrink_to(self.tats.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000;

    fn charge(bucket: &str, limit: u64, cost: u64) -> Charge {
        Charge {
            bucket: bucket.into(),
            rate: Rate::per_minute(limit),
            cost,
        }
    }

    #[test]
    fn owners_and_buckets_are_separate() {
        let b = LocalBuckets::new();
        let now = 1_000_000_000;
        assert!(b.charge("alice", &[charge("req", 1, 1)], now).is_ok());
        assert!(b.charge("alice", &[charge("req", 1, 1)], now).is_err());
        assert!(b.charge("bob", &[charge("req", 1, 1)], now).is_ok());
        assert!(b.charge("alice", &[charge("other", 1, 1)], now).is_ok());
        b.reset("alice", "req");
        assert!(b.charge("alice", &[charge("req", 1, 1)], now).is_ok());
    }

    #[test]
    fn refused_multi_charge_takes_nothing_and_refunds_work() {
        let b = LocalBuckets::new();
        let now = 1_000_000_000;
        let both = [charge("req", 10, 1), charge("tok", 100, 100)];
        assert!(b.charge("u", &both, now).is_ok());
        assert_eq!(b.charge("u", &both, now), Err(60_000_000));
        // Requests were not taken by the refusal: 9 more fit on their own.
        for _ in 0..9 {
            assert!(b.charge("u", &[charge("req", 10, 1)], now).is_ok());
        }
        b.adjust("u", &[("tok".into(), Rate::per_minute(100), -100)], now);
        assert!(b.charge("u", &[charge("tok", 100, 100)], now).is_ok());
    }

    #[test]
    fn emptied_buckets_are_dropped_when_their_time_passes() {
        let b = LocalBuckets::new();
        let now = 1_000 * S;
        for i in 0..1000 {
            b.charge(&format!("name-{i}"), &[charge("f", 60, 1)], now)
                .expect("charge");
        }
        assert_eq!(b.len(), 1000);
        // One unit of a 60/min bucket is one second: after it every bucket is empty, and
        // the next charges in each shard drop them.
        let later = now + 2 * S;
        for i in 0..200 {
            b.charge(&format!("other-{i}"), &[charge("f", 60, 1)], later)
                .expect("charge");
        }
        assert!(b.len() <= 200, "{} buckets left", b.len());
        // A full refund empties the bucket at once: no entry is kept for it.
        b.adjust("other-0", &[("f".into(), Rate::per_minute(60), -1)], later);
        assert!(b.len() <= 199);
    }

    #[test]
    fn a_flood_of_new_names_stays_bounded_and_keeps_the_fullest_buckets() {
        let capacity = 1_600;
        let b = LocalBuckets::with_capacity(capacity);
        let now = 1_000 * S;
        let day = Rate {
            limit: 5,
            period: Duration::from_secs(86_400),
        };
        let fail = |cost| {
            [Charge {
                bucket: "auth".into(),
                rate: day,
                cost,
            }]
        };
        // A locked-out name: its bucket is the fullest there is.
        b.charge("victim-guess", &fail(5), now)
            .expect("five failures");
        assert!(b.charge("victim-guess", &fail(1), now).is_err());
        for i in 0..20_000 {
            let _ = b.charge(&format!("dict-{i}"), &fail(1), now + i);
        }
        assert!(b.len() <= capacity, "{} buckets", b.len());
        assert!(
            b.charge("victim-guess", &fail(1), now + 20_000).is_err(),
            "the flood made the store forget a locked-out name"
        );
    }
}
