//! The API-key pool of one upstream: keys are used in rotation, and a key the
//! backend answered with 401/403/429 sits out a cool-down before it is tried again.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::Secret;

/// One key and the moment (ms since the pool's epoch) it may be used again.
struct PooledKey {
    header_value: String,
    cooling_until_ms: AtomicU64,
}

/// Rotating API keys with cool-downs; cheap to share between requests.
pub struct KeyPool {
    keys: Vec<PooledKey>,
    next: AtomicUsize,
    epoch: Instant,
}

/// A key picked for one attempt: its index (to report failures) and the
/// full `Authorization` header value.
#[derive(Clone, Copy)]
pub struct PickedKey<'a> {
    pub index: usize,
    pub authorization: &'a str,
}

impl std::fmt::Debug for PickedKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PickedKey(#{})", self.index)
    }
}

impl KeyPool {
    /// A pool over the given keys (may be empty: no Authorization is sent).
    pub fn new(keys: &[Secret]) -> Self {
        KeyPool {
            keys: keys
                .iter()
                .map(|k| PooledKey {
                    header_value: format!("Bearer {}", k.expose_str()),
                    cooling_until_ms: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// How many keys the pool holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next key in rotation that is not cooling down, avoiding `avoid`
    /// when another usable key exists; when every key cools down, the one
    /// that recovers first.
    pub fn pick(&self, avoid: Option<usize>) -> Option<PickedKey<'_>> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback: Option<(u64, usize)> = None;
        for step in 0..n {
            let i = (start + step) % n;
            let until = self.keys[i].cooling_until_ms.load(Ordering::Relaxed);
            if until <= now && (Some(i) != avoid || n == 1) {
                return Some(self.picked(i));
            }
            let rank = if Some(i) == avoid { u64::MAX } else { until };
            if fallback.is_none_or(|(best, _)| rank < best) {
                fallback = Some((rank, i));
            }
        }
        fallback.map(|(_, i)| self.picked(i))
    }

    fn picked(&self, index: usize) -> PickedKey<'_> {
        PickedKey {
            index,
            authorization: &self.keys[index].header_value,
        }
    }

    /// Takes a key out of rotation for `cooldown` (at least).
    pub fn cool_down(&self, index: usize, cooldown: Duration) {
        if let Some(k) = self.keys.get(index) {
            let until = self.now_ms() + cooldown.as_millis() as u64;
            k.cooling_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KeyPool {
        let keys: Vec<Secret> = (0..n)
            .map(|i| Secret::new(format!("sk-{i}").into_bytes()))
            .collect();
        KeyPool::new(&keys)
    }

    #[test]
    fn rotates_through_keys() {
        let p = pool(3);
        let picked: Vec<usize> = (0..6)
            .map(|_| p.pick(None).map(|k| k.index).unwrap_or(99))
            .collect();
        assert_eq!(picked, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.pick(None).map(|k| k.authorization), Some("Bearer sk-0"));
    }

    #[test]
    fn skips_cooling_keys_and_avoids_the_failed_one() {
        let p = pool(3);
        p.cool_down(1, Duration::from_secs(60));
        for _ in 0..6 {
            assert_ne!(p.pick(None).map(|k| k.index), Some(1));
        }
        for _ in 0..6 {
            let k = p.pick(Some(0)).map(|k| k.index);
            assert_eq!(k, Some(2));
        }
    }

    #[test]
    fn all_cooling_falls_back_to_earliest_recovery() {
        let p = pool(2);
        p.cool_down(0, Duration::from_secs(60));
        p.cool_down(1, Duration::from_secs(5));
        assert_eq!(p.pick(None).map(|k| k.index), Some(1));
        assert!(pool(0).pick(None).is_none());
    }
}
