//! The limiter's arithmetic, free of Redis and clocks: GCRA (the generic cell rate
//! algorithm, a token bucket kept as one "theoretical arrival time" per bucket) with
//! weighted costs, so one rule serves requests per minute, tokens per minute and per day,
//! and failed logins. The Redis Lua scripts in `redis.rs` do exactly this arithmetic.

use std::time::Duration;

/// At most `limit` units per `period`, with a burst of up to `limit` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units allowed per period (greater than 0).
    pub limit: u64,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// `limit` per minute.
    pub fn per_minute(limit: u64) -> Self {
        Rate {
            limit,
            period: Duration::from_secs(60),
        }
    }

    /// `limit` per day (24 h, a sliding day rather than a calendar day).
    pub fn per_day(limit: u64) -> Self {
        Rate {
            limit,
            period: Duration::from_secs(86_400),
        }
    }

    /// Microseconds one unit adds to the bucket's arrival time.
    pub fn interval_us(&self) -> u64 {
        (self.period_us() / self.limit.max(1)).max(1)
    }

    /// How far ahead of now the arrival time may run: the whole period, i.e. a full burst.
    pub fn tolerance_us(&self) -> u64 {
        self.period_us()
    }

    fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX / 4)
    }

    /// A cost that fits an empty bucket: a single request larger than the whole limit
    /// is charged as the whole limit, so it can pass once the bucket is empty.
    pub fn clamp(&self, cost: u64) -> u64 {
        cost.min(self.limit)
    }
}

/// One bucket to charge: its field name, its rate and the units to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Bucket name inside the owner's key, e.g. `req:*` or `tpd:/chatCompletion`.
    pub bucket: String,
    /// The bucket's rate.
    pub rate: Rate,
    /// Units to take (already clamped to the rate's limit).
    pub cost: u64,
}

/// The bucket's arrival time after taking `cost` at `now`, or how long to wait (µs)
/// until that charge would conform. `tat` 0 means an empty (never used) bucket.
pub fn conform(tat: u64, now: u64, rate: &Rate, cost: u64) -> Result<u64, u64> {
    let new_tat = tat
        .max(now)
        .saturating_add(cost.saturating_mul(rate.interval_us()));
    let allowed_at = new_tat.saturating_sub(rate.tolerance_us());
    if allowed_at <= now {
        Ok(new_tat)
    } else {
        Err(allowed_at - now)
    }
}

/// How many more units fit the bucket at `now`, and when none does, how long until one
/// does (µs); the same arithmetic as [`conform`], taking nothing.
pub fn room(tat: u64, now: u64, rate: &Rate) -> (u64, u64) {
    let base = tat.max(now);
    let room = now.saturating_add(rate.tolerance_us()).saturating_sub(base);
    let units = room / rate.interval_us();
    let wait = if units > 0 {
        0
    } else {
        base.saturating_add(rate.interval_us())
            .saturating_sub(rate.tolerance_us())
            .saturating_sub(now)
            .max(1)
    };
    (units, wait)
}

/// All-or-nothing over several buckets: the new arrival times when every charge conforms,
/// else the longest wait (µs). `tats[i]` belongs to `charges[i]`.
pub fn conform_all(tats: &[u64], now: u64, charges: &[Charge]) -> Result<Vec<u64>, u64> {
    let mut new_tats = Vec::with_capacity(charges.len());
    let mut wait = 0;
    for (tat, charge) in tats.iter().zip(charges) {
        match conform(*tat, now, &charge.rate, charge.cost) {
            Ok(t) => new_tats.push(t),
            Err(w) => wait = wait.max(w),
        }
    }
    if wait > 0 {
        Err(wait)
    } else {
        Ok(new_tats)
    }
}

/// Corrects a bucket after the fact by `delta` units: positive charges more (the call
/// used more than reserved), negative refunds. Never refused: the debt delays later calls.
pub fn adjust(tat: u64, now: u64, rate: &Rate, delta: i64) -> u64 {
    let step = delta.unsigned_abs().saturating_mul(rate.interval_us());
    if delta >= 0 {
        tat.max(now).saturating_add(step)
    } else {
        tat.saturating_sub(step)
    }
}

/// Microseconds as a `Duration` for `Retry-After`.
pub fn wait_duration(us: u64) -> Duration {
    Duration::from_micros(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn a_full_burst_then_one_per_interval() {
        let rate = Rate::per_minute(3); // interval 20 s
        let now = 1_000 * S;
        let mut tat = 0;
        for _ in 0..3 {
            tat = conform(tat, now, &rate, 1).expect("burst");
        }
        assert_eq!(conform(tat, now, &rate, 1), Err(20 * S));
        assert_eq!(conform(tat, now + 19 * S, &rate, 1), Err(S));
        tat = conform(tat, now + 20 * S, &rate, 1).expect("refilled one");
        assert!(conform(tat, now + 20 * S, &rate, 1).is_err());
        // A minute of silence refills the whole burst.
        let later = now + 200 * S;
        for _ in 0..3 {
            tat = conform(tat, later, &rate, 1).expect("burst again");
        }
    }

    #[test]
    fn weighted_costs_and_refused_charges_take_nothing() {
        let rate = Rate::per_minute(1000); // 60 ms per token
        let now = 50 * S;
        let tat = conform(0, now, &rate, 800).expect("fits");
        let wait = conform(tat, now, &rate, 300).expect_err("over");
        // 100 tokens over the limit: 100 * 60 ms.
        assert_eq!(wait, 6 * S);
        // The refusal did not change the bucket: 200 still fit.
        assert!(conform(tat, now, &rate, 200).is_ok());
        assert_eq!(rate.clamp(5000), 1000);
        assert!(conform(0, now, &rate, rate.clamp(5000)).is_ok());
    }

    #[test]
    fn all_or_nothing_over_buckets() {
        let now = 10 * S;
        let charges = vec![
            Charge {
                bucket: "req:*".into(),
                rate: Rate::per_minute(10),
                cost: 1,
            },
            Charge {
                bucket: "tpm:*".into(),
                rate: Rate::per_minute(100),
                cost: 100,
            },
        ];
        let tats = conform_all(&[0, 0], now, &charges).expect("first fits");
        let wait = conform_all(&tats, now, &charges).expect_err("tokens exhausted");
        assert_eq!(wait, 60 * S);
        assert_eq!(tats[0], now + 6 * S);
    }

    #[test]
    fn settling_refunds_and_charges_debt() {
        let rate = Rate::per_minute(600); // 100 ms per token
        let now = 100 * S;
        let tat = conform(0, now, &rate, 500).expect("reserve 500");
        // Only 100 were used: refund 400.
        let tat = adjust(tat, now, &rate, -400);
        assert_eq!(tat, now + 10 * S);
        // Used 1000 more than reserved: the bucket runs 100 s ahead, later calls wait.
        let tat = adjust(tat, now, &rate, 1000);
        assert_eq!(conform(tat, now, &rate, 1), Err(50 * S + 100_000));
        // Adjusting a long-idle bucket starts from now.
        assert_eq!(adjust(5, now, &rate, 1), now + 100_000);
        assert_eq!(adjust(5, now, &rate, -10), 0);
    }

    #[test]
    fn room_agrees_with_conform() {
        let rate = Rate::per_minute(5); // interval 12 s
        let now = 1_000 * S;
        let mut tat = 0;
        for left in (1..=5).rev() {
            assert_eq!(room(tat, now, &rate), (left, 0));
            assert!(conform(tat, now, &rate, left).is_ok());
            assert!(conform(tat, now, &rate, left + 1).is_err());
            tat = conform(tat, now, &rate, 1).expect("fits");
        }
        assert_eq!(room(tat, now, &rate), (0, 12 * S));
        assert_eq!(conform(tat, now, &rate, 1), Err(12 * S));
    }

    #[test]
    fn per_day_interval() {
        let rate = Rate::per_day(86_400);
        assert_eq!(rate.interval_us(), S);
        assert_eq!(rate.tolerance_us(), 86_400 * S);
        assert_eq!(Rate::per_minute(u64::MAX).interval_us(), 1);
    }
}
