//! The conversation record: every exchange on a chat or openai route written
//! to PostgreSQL off the request path. A request hands its finished [`Record`]
//! to [`ConversationLog::submit`] (a bounded in-memory queue, never waiting);
//! one [`writer::ConversationWriter`] per process writes batches, spools them
//! to local disk while PostgreSQL does not take them, and replays the spool.

pub mod db;
pub mod record;
pub mod spool;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

pub use record::{Draft, Finished, Record};
pub use writer::ConversationWriter;

use crate::config::ConversationLogSettings;
use crate::metrics;

/// Records the memory queue holds at most; past it, records are dropped and counted.
pub const QUEUE_CAPACITY: usize = 20_000;

/// The request path's handle: queue a record for the writer.
pub struct ConversationLog {
    queue: mpsc::Sender<Record>,
    warn: DropWarning,
}

impl ConversationLog {
    /// The handle and the background writer that drains it.
    pub fn new(settings: ConversationLogSettings) -> (ConversationLog, ConversationWriter) {
        metrics::conversation_log_init();
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        (
            ConversationLog {
                queue,
                warn: DropWarning::default(),
            },
            ConversationWriter::new(settings, rx),
        )
    }

    /// Queues `record` for writing; never waits. A full queue (the writer cannot keep
    /// up even with the spool) drops it, counted and warned about.
    pub fn submit(&self, record: Record) {
        match self.queue.try_send(record) {
            Ok(()) => metrics::conversation_queued(1),
            Err(_) => {
                metrics::conversation_dropped("queue_full", 1);
                self.warn.dropped(1, "queue_full");
            }
        }
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
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
