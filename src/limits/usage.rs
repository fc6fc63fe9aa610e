//! Usage accounting types: tokens and requests per user per UTC day, the day names used
//! in Redis keys, and the buffers that keep counts and token-bucket corrections until
//! they are written (in batches, or once an unreachable Redis is back).

use std::collections::HashMap;
use std::sync::Mutex;

use super::gcra::Rate;

/// Counts added to one user's day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// Prompt tokens the upstream reported.
    pub prompt_tokens: u64,
    /// Completion tokens the upstream reported.
    pub completion_tokens: u64,
    /// Chat requests that reached the upstream.
    pub requests: u64,
    /// Of the prompt and completion tokens, those chatgate counted itself because the
    /// upstream reported no usage.
    pub estimated_tokens: u64,
}

impl UsageDelta {
    /// Whether there is nothing to add.
    pub fn is_empty(&self) -> bool {
        *self == UsageDelta::default()
    }

    fn add(&mut self, other: UsageDelta) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.requests = self.requests.saturating_add(other.requests);
        self.estimated_tokens = self.estimated_tokens.saturating_add(other.estimated_tokens);
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time in seconds.
pub fn day_name(unix_secs: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Counts that could not be written yet, by (user, day). Bounded: past `MAX_PENDING`
/// users new counts are dropped and the drop is logged.
#[derive(Debug, Default)]
pub struct PendingUsage {
    entries: Mutex<HashMap<(String, String), UsageDelta>>,
}

const MAX_PENDING: usize = 100_000;

impl PendingUsage {
    /// Keeps `delta` for a later write; false when the buffer is full.
    pub fn keep(&self, user: &str, day: &str, delta: UsageDelta) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = (user.to_string(), day.to_string());
        if entries.len() >= MAX_PENDING && !entries.contains_key(&key) {
            return false;
        }
        entries.entry(key).or_default().add(delta);
        true
    }

    /// Takes everything kept so far.
    pub fn take(&self) -> Vec<((String, String), UsageDelta)> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.drain().collect()
    }

    /// Whether anything is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Token-bucket corrections not written yet, summed per (owner, bucket). Bounded like
/// [`PendingUsage`]; `keep` refuses what does not fit and the caller writes it at once.
#[derive(Debug, Default)]
pub struct PendingCorrections {
    entries: Mutex<HashMap<(String, String), (Rate, i64)>>,
}

impl PendingCorrections {
    /// Adds one settlement's corrections for `owner`; false (and nothing kept) when the
    /// buffer is full.
    pub fn keep(&self, owner: &str, corrections: &[(String, Rate, i64)]) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() + corrections.len() > MAX_PENDING {
            return false;
        }
        for (bucket, rate, delta) in corrections {
            let entry = entries
                .entry((owner.to_string(), bucket.clone()))
                .or_insert((*rate, 0));
            entry.1 = entry.1.saturating_add(*delta);
        }
        true
    }

    /// Takes everything kept so far, grouped by owner (sums of zero left out).
    pub fn take(&self) -> HashMap<String, Vec<(String, Rate, i64)>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_owner: HashMap<String, Vec<(String, Rate, i64)>> = HashMap::new();
        for ((owner, bucket), (rate, delta)) in entries.drain() {
            if delta != 0 {
                by_owner
                    .entry(owner)
                    .or_default()
                    .push((bucket, rate, delta));
            }
        }
        by_owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn corrections_add_up_per_owner_and_bucket() {
        let p = PendingCorrections::default();
        let rate = Rate {
            limit: 1000,
            period: Duration::from_secs(60),
        };
        assert!(p.keep(
            "alice",
            &[("tpm:*".into(), rate, -300), ("tpd:*".into(), rate, -300)]
        ));
        assert!(p.keep(
            "alice",
            &[("tpm:*".into(), rate, 100), ("tpd:*".into(), rate, 300)]
        ));
        assert!(p.keep("bob", &[("tpm:*".into(), rate, 5)]));
        let mut all = p.take();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all.remove("alice"),
            Some(vec![("tpm:*".into(), rate, -200)])
        );
        assert_eq!(all.remove("bob"), Some(vec![("tpm:*".into(), rate, 5)]));
        assert!(p.take().is_empty());
    }

    #[test]
    fn day_names() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(86_399), "1970-01-01");
        assert_eq!(day_name(951_782_400), "2000-02-29");
        assert_eq!(day_name(1_709_164_800), "2024-02-29");
        assert_eq!(day_name(1_735_689_599), "2024-12-31");
        assert_eq!(day_name(1_735_689_600), "2025-01-01");
    }

    #[test]
    fn pending_adds_up_and_drains() {
        let p = PendingUsage::default();
        let one = UsageDelta {
            prompt_tokens: 3,
            completion_tokens: 4,
            requests: 1,
            estimated_tokens: 7,
        };
        assert!(p.keep("alice", "2025-01-01", one));
        assert!(p.keep("alice", "2025-01-01", one));
        assert!(p.keep("bob", "2025-01-01", one));
        let mut all = p.take();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1.prompt_tokens, 6);
        assert_eq!(all[0].1.requests, 2);
        assert_eq!(all[0].1.estimated_tokens, 14);
        assert!(p.is_empty());
    }
}
