//! The in-process bucket store: the same GCRA buckets as Redis keeps, in a map in this
//! process. It serves when limits have no Redis (file or demo credentials) and stands in
//! for Redis while Redis is unreachable, so one node stays protected on its own.

use std::collections::HashMap;
use std::sync::Mutex;

use super::gcra::{adjust, conform_all, room, Charge, Rate};

/// Entries beyond this make the map drop every bucket that is already empty.
const MAX_BUCKETS: usize = 200_000;

/// Buckets keyed by `<owner key>\0<bucket name>`, each holding its arrival time (µs).
#[derive(Debug, Default)]
pub struct LocalBuckets {
    tats: Mutex<HashMap<String, u64>>,
}

fn slot(owner: &str, bucket: &str) -> String {
    format!("{owner}\0{bucket}")
}

impl LocalBuckets {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes every charge at `now` (µs) or none; `Err` is the wait in µs.
    pub fn charge(&self, owner: &str, charges: &[Charge], now: u64) -> Result<(), u64> {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let current: Vec<u64> = charges
            .iter()
            .map(|c| tats.get(&slot(owner, &c.bucket)).copied().unwrap_or(0))
            .collect();
        let new_tats = conform_all(&current, now, charges)?;
        if tats.len() >= MAX_BUCKETS {
            tats.retain(|_, tat| *tat > now);
        }
        for (charge, tat) in charges.iter().zip(new_tats) {
            tats.insert(slot(owner, &charge.bucket), tat);
        }
        Ok(())
    }

    /// How many more units fit `owner`'s `bucket` at `now`, and the wait for one when none
    /// does (see [`room`]); takes nothing.
    pub fn room(&self, owner: &str, bucket: &str, rate: &Rate, now: u64) -> (u64, u64) {
        let tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let tat = tats.get(&slot(owner, bucket)).copied().unwrap_or(0);
        room(tat, now, rate)
    }

    /// Corrects buckets after the fact (see [`adjust`]).
    pub fn adjust(&self, owner: &str, corrections: &[(String, Rate, i64)], now: u64) {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        for (bucket, rate, delta) in corrections {
            let key = slot(owner, bucket);
            let tat = tats.get(&key).copied().unwrap_or(0);
            tats.insert(key, adjust(tat, now, rate, *delta));
        }
    }

    /// Empties one bucket (a successful login clears its name's failures).
    pub fn reset(&self, owner: &str, bucket: &str) {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        tats.remove(&slot(owner, bucket));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
