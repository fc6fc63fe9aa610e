//! What the simulator saw, for tests: request and stream counters, and a log of the last
//! chat requests with their headers and bodies. Served under `/_sim/`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// How many chat requests `/_sim/requests` remembers.
pub const REQUEST_LOG_LEN: usize = 32;

/// Counters shared by all connections of one simulator service.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    chat_requests: AtomicU64,
    streams_started: AtomicU64,
    streams_completed: AtomicU64,
    streams_cancelled: AtomicU64,
    active_streams: AtomicU64,
    last_cancel_unix_ms: AtomicU64,
}

/// A point-in-time copy of [`Stats`], the body of `GET /_sim/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Requests other than `/_sim/*`.
    pub requests: u64,
    /// `POST .../chat/completions` requests.
    pub chat_requests: u64,
    /// Streaming replies begun (counted before the first-byte delay).
    pub streams_started: u64,
    /// Streams the simulator played to their planned end (including planned errors/cuts).
    pub streams_completed: u64,
    /// Streams the client left before they ended.
    pub streams_cancelled: u64,
    /// Streams in progress now.
    pub active_streams: u64,
    /// When the last cancellation was seen (Unix ms, 0 if never).
    pub last_cancel_unix_ms: u64,
}

impl Stats {
    /// Counts one request outside `/_sim/`.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one chat request.
    pub fn count_chat_request(&self) {
        self.chat_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a stream as begun; the guard records how it ends.
    pub fn start_stream(self: &Arc<Self>) -> StreamGuard {
        self.streams_started.fetch_add(1, Ordering::Relaxed);
        self.active_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            stats: Arc::clone(self),
            completed: false,
        }
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            chat_requests: self.chat_requests.load(Ordering::Relaxed),
            streams_started: self.streams_started.load(Ordering::Relaxed),
            streams_completed: self.streams_completed.load(Ordering::Relaxed),
            streams_cancelled: self.streams_cancelled.load(Ordering::Relaxed),
            active_streams: self.active_streams.load(Ordering::Relaxed),
            last_cancel_unix_ms: self.last_cancel_unix_ms.load(Ordering::Relaxed),
        }
    }

    /// Zeroes the counters. `active_streams` is a gauge of live streams, so it stays.
    pub fn reset(&self) {
        for counter in [
            &self.requests,
            &self.chat_requests,
            &self.streams_started,
            &self.streams_completed,
            &self.streams_cancelled,
            &self.last_cancel_unix_ms,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// One live stream. Dropping it without [`StreamGuard::complete`] counts a cancellation,
/// so every early exit (client gone, write error, task dropped) is recorded.
#[derive(Debug)]
pub struct StreamGuard {
    stats: Arc<Stats>,
    completed: bool,
}

impl StreamGuard {
    /// The stream reached its planned end.
    pub fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let stats = &self.stats;
        stats.active_streams.fetch_sub(1, Ordering::Relaxed);
        if self.completed {
            stats.streams_completed.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.streams_cancelled.fetch_add(1, Ordering::Relaxed);
            stats
                .last_cancel_unix_ms
                .store(unix_ms(), Ordering::Relaxed);
        }
    }
}

/// A chat request as it arrived, one element of `GET /_sim/requests`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Lower-case header names; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body, `null` when it was not JSON.
    pub body: serde_json::Value,
    /// Body length in bytes.
    pub body_bytes: usize,
    /// Whether the body asked for a usage chunk (`stream_options.include_usage: true`).
    pub include_usage: bool,
}

/// The last [`REQUEST_LOG_LEN`] chat requests, oldest first.
#[derive(Debug, Default)]
pub struct RequestLog {
    entries: Mutex<VecDeque<Arc<LoggedRequest>>>,
}

impl RequestLog {
    /// Remembers a request, forgetting the oldest beyond the limit.
    pub fn push(&self, request: Arc<LoggedRequest>) {
        let mut entries = self.lock();
        if entries.len() == REQUEST_LOG_LEN {
            entries.pop_front();
        }
        entries.push_back(request);
    }

    /// The log as a JSON array.
    pub fn to_json(&self) -> Vec<u8> {
        let entries: Vec<Arc<LoggedRequest>> = self.lock().iter().cloned().collect();
        let refs: Vec<&LoggedRequest> = entries.iter().map(|entry| &**entry).collect();
        serde_json::to_vec(&refs).unwrap_or_else(|_| b"[]".to_vec())
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<LoggedRequest>>> {
        // A panic elsewhere while holding the lock leaves a usable deque; keep serving.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    crate::unix_time::since_epoch().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_completion_and_cancellation() {
        let stats = Arc::new(Stats::default());
        let done = stats.start_stream();
        let dropped = stats.start_stream();
        assert_eq!(stats.snapshot().active_streams, 2);
        done.complete();
        drop(dropped);
        let snap = stats.snapshot();
        assert_eq!(snap.streams_started, 2);
        assert_eq!(snap.streams_completed, 1);
        assert_eq!(snap.streams_cancelled, 1);
        assert_eq!(snap.active_streams, 0);
        assert!(snap.last_cancel_unix_ms > 0);
    }

    #[test]
    fn reset_keeps_the_live_stream_gauge() {
        let stats = Arc::new(Stats::default());
        stats.count_request();
        stats.count_chat_request();
        let live = stats.start_stream();
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!(
            (snap.requests, snap.chat_requests, snap.streams_started),
            (0, 0, 0)
        );
        assert_eq!(snap.active_streams, 1);
        live.complete();
        assert_eq!(stats.snapshot().active_streams, 0);
    }

    #[test]
    fn snapshot_serialises_all_fields() {
        let json = serde_json::to_string(&Stats::default().snapshot()).unwrap();
        assert_eq!(
            json,
            r#"{"requests":0,"chat_requests":0,"streams_started":0,"streams_completed":0,"streams_cancelled":0,"active_streams":0,"last_cancel_unix_ms":0}"#
        );
    }

    #[test]
    fn request_log_keeps_the_last_entries_in_order() {
        let log = RequestLog::default();
        for i in 0..REQUEST_LOG_LEN + 3 {
            log.push(Arc::new(LoggedRequest {
                method: "POST".into(),
                path: format!("/{i}"),
                headers: BTreeMap::new(),
                body: serde_json::Value::Null,
                body_bytes: i,
                include_usage: false,
            }));
        }
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&log.to_json()).unwrap();
        assert_eq!(parsed.len(), REQUEST_LOG_LEN);
        assert_eq!(parsed[0]["path"], "/3");
        assert_eq!(
            parsed[REQUEST_LOG_LEN - 1]["body_bytes"],
            REQUEST_LOG_LEN + 2
        );
        log.clear();
        assert_eq!(log.to_json(), b"[]");
    }
}
