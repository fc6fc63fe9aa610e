//! A circuit breaker for calls to a shared backend (Redis): after a run of failures it
//! fails calls at once for a cool-down instead of letting each wait for its timeout,
//! then lets one probe through and closes again when the probe succeeds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker (0 disables it).
    pub failures: u32,
    /// How long it stays open before one probe call is let through.
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            open_for: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; others are refused until it reports.
    HalfOpen {
        since: Instant,
    },
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead and report the outcome with [`Breaker::record`].
    Proceed,
    /// The backend is considered down; fail without calling it.
    Refused,
}

/// A thread-safe circuit breaker; the clock is passed in so the logic tests without sleeps.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
    /// Told `true` when the breaker opens and `false` when a call closes it again
    /// (a metric); called under the state lock, so reports arrive in order.
    on_change: fn(bool),
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self::observed(settings, |_| {})
    }

    /// A closed breaker that reports each opening and closing to `on_change`,
    /// starting with `false` now.
    pub fn observed(settings: BreakerSettings, on_change: fn(bool)) -> Self {
        on_change(false);
        Breaker {
            settings,
            state: Mutex::new(State::Closed { failures: 0 }),
            on_change,
        }
    }

    /// Decides whether a call starting at `now` may go to the backend.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.settings.failures == 0 {
            return Admission::Proceed;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            State::Closed { .. } => Admission::Proceed,
            State::Open { until } if now < until => Admission::Refused,
            State::Open { .. } => {
                *state = State::HalfOpen { since: now };
                Admission::Proceed
            }
            // A probe whose caller went away never reports; after a cool-down another may go.
            State::HalfOpen { since } if now.duration_since(since) >= self.settings.open_for => {
                *state = State::HalfOpen { since: now };
                Admission::Proceed
            }
            State::HalfOpen { .. } => Admission::Refused,
        }
    }

    /// Reports how an admitted call ended: `reached` is false only when the backend could
    /// not be reached or did not answer in time (not for "not found" or bad data).
    pub fn record(&self, reached: bool, now: Instant) {
        if self.settings.failures == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let was_closed = matches!(*state, State::Closed { .. });
        *state = match (*state, reached) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.settings.failures => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => State::Open {
                until: now + self.settings.open_for,
            },
        };
        let closed = matches!(*state, State::Closed { .. });
        if closed != was_closed {
            (self.on_change)(!closed);
        }
    }

    /// Whether calls are being refused right now (for logs and readiness).
    pub fn is_open(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        matches!(*state, State::Open { until } if now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(2);

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures: 3,
            open_for: OPEN_FOR,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let t = Instant::now();
        b.record(false, t);
        b.record(false, t);
        b.record(true, t); // a success resets the run
        b.record(false, t);
        b.record(false, t);
        assert_eq!(b.admit(t), Admission::Proceed);
        b.record(false, t);
        assert_eq!(b.admit(t), Admission::Refused);
        assert!(b.is_open(t));
        assert_eq!(
            b.admit(t + OPEN_FOR - Duration::from_millis(1)),
            Admission::Refused
        );
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(false, t);
        }
        let later = t + OPEN_FOR;
        assert_eq!(b.admit(later), Admission::Proceed);
        assert_eq!(b.admit(later), Admission::Refused, "only one probe");
        // A failed probe opens it again for a full period.
        b.record(false, later);
        assert_eq!(b.admit(later + OPEN_FOR / 2), Admission::Refused);
        let again = later + OPEN_FOR;
        assert_eq!(b.admit(again), Admission::Proceed);
        b.record(true, again);
        assert_eq!(b.admit(again), Admission::Proceed);
        assert_eq!(b.admit(again), Admission::Proceed);
        assert!(!b.is_open(again));
    }

    #[test]
    fn a_lost_probe_does_not_wedge_it() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(false, t);
        }
        assert_eq!(b.admit(t + OPEN_FOR), Admission::Proceed);
        // The probe never reports; after another period a new probe may go.
        assert_eq!(b.admit(t + OPEN_FOR * 2), Admission::Proceed);
    }

    #[test]
    fn reports_each_opening_and_closing_once() {
        static SEEN: Mutex<Vec<bool>> = Mutex::new(Vec::new());
        let b = Breaker::observed(
            BreakerSettings {
                failures: 2,
                open_for: OPEN_FOR,
            },
            |open| SEEN.lock().unwrap().push(open),
        );
        let t = Instant::now();
        b.record(false, t);
        b.record(false, t); // opens
        let probe = t + OPEN_FOR;
        assert_eq!(b.admit(probe), Admission::Proceed);
        b.record(false, probe); // a failed probe: still open, no new report
        b.record(true, probe + OPEN_FOR); // closes
        b.record(true, probe + OPEN_FOR);
        assert_eq!(*SEEN.lock().unwrap(), [false, true, false]);
    }

    #[test]
    fn zero_failures_disables_it() {
        let b = Breaker::new(BreakerSettings {
            failures: 0,
            open_for: OPEN_FOR,
        });
        let t = Instant::now();
        for _ in 0..10 {
            b.record(false, t);
        }
        assert_eq!(b.admit(t), Admission::Proceed);
    }
}
