//! The wall clock as Unix time, for token `iat`/`exp`, revocation marks, rate
//! windows and the simulator's counters. A clock before 1970 reads as 0.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch (zero if the clock is before it).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Current time in whole Unix seconds.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}
