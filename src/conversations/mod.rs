//! The conversation record: every exchange on a chat or openai route written
//! to PostgreSQL off the request path. A request hands its finished [`Record`]
//! to [`ConversationLog::submit`] (a bounded in-memory queue, never waiting);
//! one [`writer::ConversationWriter`] per process writes batches, spools them
//! to local disk while PostgreSQL does not take them, and replays the spool.

pub mod db;
pub mod record;
pub mod spool;
pub mod writer;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

pub use record::{Draft, Finished, Record};
pub use writer::ConversationWriter;

use crate::config::ConversationLogSettings;
use crate::metrics;

/// Records the memory queue holds at most; past it, records are dropped and counted.
pub const QUEUE_CAPACITY: usize = 20_000;
/// Bytes of text the memory queue holds at most (large bodies fill it before the count).
pub const QUEUE_MAX_BYTES: usize = 256 << 20;
/// Records per write (and per replayed chunk); a queue this long wakes the writer
/// before its flush interval is up.
pub const MAX_BATCH: usize = 2_000;

/// The request path's handle: queue a record for the writer.
pub struct ConversationLog {
    queue: mpsc::Sender<Record>,
    /// Text bytes of the records in the queue (see [`Record::weight`]).
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Wakes the writer early when a whole batch is waiting. Only then: a wake-up
    /// per record would cost more than the record itself.
    batch_ready: Arc<Notify>,
    warn: DropWarning,
}

impl ConversationLog {
    /// The handle and the background writer that drains it.
    pub fn new(settings: ConversationLogSettings) -> (ConversationLog, ConversationWriter) {
        Self::with_bounds(settings, QUEUE_CAPACITY, QUEUE_MAX_BYTES)
    }

    fn with_bounds(
        settings: ConversationLogSettings,
        capacity: usize,
        max_bytes: usize,
    ) -> (ConversationLog, ConversationWriter) {
        metrics::conversation_log_init();
        let (queue, rx) = mpsc::channel(capacity);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let batch_ready = Arc::new(Notify::new());
        (
            ConversationLog {
                queue,
                queued_bytes: queued_bytes.clone(),
                max_bytes,
                batch_ready: batch_ready.clone(),
                warn: DropWarning::default(),
            },
            ConversationWriter::new(settings, rx, queued_bytes, batch_ready),
        )
    }

    /// Queues `record` for writing; never waits. A full queue (the writer cannot keep
    /// up even with the spool) drops it, counted and warned about.
    pub fn submit(&self, record: Record) {
        let weight = record.weight();
        let before = self.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        if before + weight > self.max_bytes {
            self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
            return self.drop_one();
        }
        match self.queue.try_send(record) {
            Ok(()) => {
                metrics::conversation_queued(1);
                if self.queue.max_capacity() - self.queue.capacity() >= MAX_BATCH {
                    self.batch_ready.notify_one();
                }
            }
            Err(_) => {
                self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
                self.drop_one();
            }
        }
    }

    fn drop_one(&self) {
        metrics::conversation_dropped("queue_full", 1);
        self.warn.dropped(1, "queue_full");
    }
}

/// At most one warning about lost records every [`DropWarning::EVERY_SECS`], with the
/// count since the last one.
#[derive(Default)]
pub struct DropWarning {
    last_secs: AtomicU64,
    since_last: AtomicU64,
}

impl DropWarning {
    const EVERY_SECS: u64 = 10;

    /// Notes `n` lost records.
    pub fn dropped(&self, n: u64, reason: &str) {
        self.since_last.fetch_add(n, Ordering::Relaxed);
        let now = crate::unix_time::unix_now();
        let last = self.last_secs.load(Ordering::Relaxed);
        if now >= last + Self::EVERY_SECS
            && self
                .last_secs
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let total = self.since_last.swap(0, Ordering::Relaxed);
            tracing::warn!(
                dropped = total,
                reason,
                "conversation log: records dropped (see chatgate_conversation_log_dropped_total)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(answer_bytes: usize) -> Record {
        let mut d = Draft::new("u", br#"{"model":"m","messages":[]}"#).expect("draft");
        d.set_answer("a".repeat(answer_bytes));
        d.finish(Finished {
            request_id: "r",
            user_id: None,
            route: "/r",
            outcome: "ok",
            status: 200,
            tokens: None,
            duration: Duration::ZERO,
            ttfb: None,
        })
    }

    fn settings() -> ConversationLogSettings {
        ConversationLogSettings {
            url: None,
            spool_dir: "/nonexistent".into(),
            spool_max_bytes: 1,
            retention: Duration::from_secs(1),
            flush_interval: Duration::from_secs(1),
            ca_file: None,
        }
    }

    fn queued(log: &ConversationLog) -> usize {
        log.queue.max_capacity() - log.queue.capacity()
    }

    #[test]
    fn the_queue_is_bounded_in_records_and_in_bytes() {
        let (log, _writer) = ConversationLog::with_bounds(settings(), 3, 1 << 20);
        for _ in 0..5 {
            log.submit(record(10));
        }
        assert_eq!(queued(&log), 3);

        let (log, _writer) = ConversationLog::with_bounds(settings(), 100, 10_000);
        log.submit(record(4_000));
        log.submit(record(4_000));
        log.submit(record(4_000));
        assert_eq!(queued(&log), 2, "the third would pass the byte bound");
        log.submit(record(100));
        assert_eq!(queued(&log), 3, "small records still fit");
        // A refused record gives its bytes back.
        assert!(log.queued_bytes.load(Ordering::Relaxed) < 10_000);
    }
}
