//! The one background writer per process: takes queued records in batches
//! (every `flush_interval`, or sooner when a batch is full), writes them to
//! PostgreSQL, spools them when it does not answer in time, and replays the
//! spool oldest first once it does; deletes expired rows in small batches.
//!
//! Stopping: on Pingora's shutdown signal it keeps flushing, since requests
//! still finishing in the grace period hand in records; when the runtime
//! finally drops it, whatever is still in memory is spooled synchronously
//! (see `Drop for State`). A killed process loses what arrived since the last
//! flush: at most one `flush_interval` of records.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use super::db::{self, Writer};
use super::spool::Spool;
use super::{DropWarning, Record, MAX_BATCH};
use crate::config::ConversationLogSettings;
use crate::metrics;

/// How long connecting (and migrating) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one batch write may take before it goes to the spool instead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff, doubling between these bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the spool directory is looked at for segments other processes left.
const SCAN_EVERY: Duration = Duration::from_secs(5);
/// Retention: how often it runs, and rows deleted per statement and per run.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
const RETENTION_BATCH: i64 = 5_000;
const RETENTION_BATCHES_PER_RUN: usize = 20;

/// The background service (see the module doc).
pub struct ConversationWriter {
    settings: ConversationLogSettings,
    queue: Mutex<Option<mpsc::Receiver<Record>>>,
    queued_bytes: Arc<AtomicUsize>,
    batch_ready: Arc<Notify>,
    warn: Arc<DropWarning>,
}

impl ConversationWriter {
    pub(super) fn new(
        settings: ConversationLogSettings,
        queue: mpsc::Receiver<Record>,
        queued_bytes: Arc<AtomicUsize>,
        batch_ready: Arc<Notify>,
    ) -> Self {
        ConversationWriter {
            settings,
            queue: Mutex::new(Some(queue)),
            queued_bytes,
            batch_ready,
            warn: Arc::new(DropWarning::default()),
        }
    }
}

#[async_trait]
impl BackgroundService for ConversationWriter {
    async fn start(&self, shutdown: ShutdownWatch) {
        let taken = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(queue) = taken else { return };
        let spool = match Spool::open(&self.settings.spool_dir, self.settings.spool_max_bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(dir = %self.settings.spool_dir.display(), error = %e,
                    "conversation log: cannot open the spool; records PostgreSQL does not take are lost");
                None
            }
        };
        let url = self
            .settings
            .url
            .as_ref()
            .map(|u| u.expose_str())
            .unwrap_or_default();
        let mut state = State {
            url,
            flush_interval: self.settings.flush_interval,
            ca_file: self.settings.ca_file.clone(),
            retention: self.settings.retention,
            queue,
            queued_bytes: self.queued_bytes.clone(),
            batch_ready: self.batch_ready.clone(),
            batch: Vec::with_capacity(MAX_BATCH),
            spool,
            db: None,
            next_connect: Instant::now(),
            backoff: BACKOFF_MIN,
            next_scan: Instant::now() + SCAN_EVERY,
            next_retention: Instant::now(),
            warn: self.warn.clone(),
            was_up: None,
        };
        state.run(shutdown).await;
    }
}

struct State {
    url: String,
    ca_file: Option<std::path::PathBuf>,
    flush_interval: Duration,
    retention: Duration,
    queue: mpsc::Receiver<Record>,
    queued_bytes: Arc<AtomicUsize>,
    batch_ready: Arc<Notify>,
    /// Records taken from the queue and not yet written or spooled.
    batch: Vec<Record>,
    spool: Option<Spool>,
    db: Option<Writer>,
    next_connect: Instant,
    backoff: Duration,
    next_scan: Instant,
    next_retention: Instant,
    warn: Arc<DropWarning>,
    /// Last logged connection state, to log changes only.
    was_up: Option<bool>,
}

impl State {
    async fn run(&mut self, mut shutdown: ShutdownWatch) {
        let mut stopping = false;
        self.connected().await;
        loop {
            // The queue is not polled while waiting: submitting a record then wakes
            // nobody, unless a whole batch is waiting.
            if self.queue.len() < MAX_BATCH {
                let flush_at = tokio::time::Instant::now() + self.flush_interval;
                tokio::select! {
                    biased;
                    _ = shutdown.changed(), if !stopping => stopping = true,
                    _ = self.batch_ready.notified() => {}
                    _ = tokio::time::sleep_until(flush_at) => {}
                }
            }
            let closed = self.take_queued();
            self.flush().await;
            if closed {
                return;
            }
            if !stopping {
                self.maintain().await;
            }
            self.report();
        }
    }

    /// Moves up to a batch of queued records into the batch; whether the queue is
    /// closed and empty (every sender gone: the process is stopping).
    fn take_queued(&mut self) -> bool {
        let before = self.batch.len();
        let mut closed = false;
        while self.batch.len() < MAX_BATCH {
            match self.queue.try_recv() {
                Ok(record) => self.batch.push(record),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let n = self.batch.len() - before;
        if n > 0 {
            self.taken(n);
        }
        closed
    }

    /// The last `n` records of the batch just left the queue.
    fn taken(&self, n: usize) {
        metrics::conversation_queued(-(n as i64));
        let weight: usize = self.batch[self.batch.len() - n..]
            .iter()
            .map(Record::weight)
            .sum();
        self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
    }

    /// Writes the batch to PostgreSQL, or spools it.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self.connected().await {
            if let Some(db) = &mut self.db {
                let started = Instant::now();
                match tokio::time::timeout(WRITE_TIMEOUT, db.write_new(&self.batch)).await {
                    Ok(Ok(new)) => {
                        metrics::conversation_written(new, started.elapsed());
                        self.batch.clear();
                        return;
                    }
                    Ok(Err(e)) => self.lost_connection(&e),
                    Err(_) => self.lost_connection("write timed out"),
                }
            }
        }
        let batch = std::mem::take(&mut self.batch);
        self.spool_records(&batch);
    }

    fn spool_records(&mut self, records: &[Record]) {
        let Some(spool) = &mut self.spool else {
            metrics::conversation_dropped("spool_error", records.len() as u64);
            self.warn.dropped(records.len() as u64, "spool_error");
            return;
        };
        match spool.append(records) {
            Ok(done) => {
                metrics::conversation_spooled(done.spooled as u64);
                if done.dropped > 0 {
                    metrics::conversation_dropped("spool_full", done.dropped as u64);
                    self.warn.dropped(done.dropped as u64, "spool_full");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "conversation log: cannot write the spool");
                metrics::conversation_dropped("spool_error", records.len() as u64);
                self.warn.dropped(records.len() as u64, "spool_error");
            }
        }
    }

    /// Whether a connection is open, opening one (and migrating) when it is time.
    async fn connected(&mut self) -> bool {
        if self.db.as_ref().is_some_and(Writer::is_closed) {
            self.lost_connection("connection closed");
        }
        if self.db.is_some() {
            return true;
        }
        if Instant::now() < self.next_connect || self.url.is_empty() {
            return false;
        }
        let opened = async {
            let mut client =
                db::connect(&self.url, self.ca_file.as_deref(), CONNECT_TIMEOUT).await?;
            tokio::time::timeout(CONNECT_TIMEOUT, db::migrate(&mut client))
                .await
                .map_err(|_| "schema migration timed out".to_string())??;
            Writer::new(client).await
        }
        .await;
        match opened {
            Ok(writer) => {
                self.db = Some(writer);
                self.backoff = BACKOFF_MIN;
                if self.was_up != Some(true) {
                    tracing::info!(database = %db::describe(&self.url), "conversation log: PostgreSQL connected, schema current");
                }
                self.was_up = Some(true);
                true
            }
            Err(e) => {
                self.lost_connection(&e);
                false
            }
        }
    }

    fn lost_connection(&mut self, cause: &str) {
        self.db = None;
        self.next_connect = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if self.was_up != Some(false) {
            tracing::warn!(database = %db::describe(&self.url), error = %cause,
                "conversation log: PostgreSQL unavailable; records go to the spool");
        }
        self.was_up = Some(false);
    }

    /// Between flushes: replays one spool segment, runs the retention deletes.
    async fn maintain(&mut self) {
        if let Some(spool) = &mut self.spool {
            if Instant::now() >= self.next_scan {
                self.next_scan = Instant::now() + SCAN_EVERY;
                if let Err(e) = spool.scan() {
                    tracing::warn!(error = %e, "conversation log: cannot read the spool directory");
                }
            }
        }
        if self.spool.as_ref().is_some_and(Spool::has_pending) && self.connected().await {
            self.replay_one().await;
        }
        if Instant::now() >= self.next_retention && self.connected().await {
            self.expire().await;
        }
    }

    /// Writes the oldest spooled segment, chunk by chunk; removes it when all is in.
    async fn replay_one(&mut self) {
        let (Some(spool), Some(db)) = (&mut self.spool, &mut self.db) else {
            return;
        };
        let Some(mut segment) = spool.next_ready() else {
            return;
        };
        let (records, unreadable) = match segment.read() {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "conversation log: cannot read a spool segment");
                spool.put_back(segment);
                return;
            }
        };
        for chunk in records.chunks(MAX_BATCH) {
            let started = Instant::now();
            match tokio::time::timeout(WRITE_TIMEOUT, db.write(chunk)).await {
                Ok(Ok(new)) => metrics::conversation_written(new, started.elapsed()),
                Ok(Err(e)) => {
                    spool.put_back(segment);
                    self.lost_connection(&e);
                    return;
                }
                Err(_) => {
                    spool.put_back(segment);
                    self.lost_connection("write timed out");
                    return;
                }
            }
        }
        spool.finish(segment);
        if unreadable > 0 {
            metrics::conversation_dropped("spool_unreadable", unreadable as u64);
            self.warn.dropped(unreadable as u64, "spool_unreadable");
        }
    }

    /// Deletes rows past the retention, a bounded number per run.
    async fn expire(&mut self) {
        let Some(db) = &self.db else { return };
        let mut deleted = 0;
        for _ in 0..RETENTION_BATCHES_PER_RUN {
            match db.delete_expired(self.retention, RETENTION_BATCH).await {
                Ok(n) => {
                    deleted += n;
                    if n < RETENTION_BATCH as u64 {
                        self.next_retention = Instant::now() + RETENTION_EVERY;
                        break;
                    }
                    // More to delete: the next run comes soon, after the next flush.
                    self.next_retention = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "conversation log: retention delete failed");
                    self.next_retention = Instant::now() + RETENTION_EVERY;
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "conversation log: expired rows deleted");
        }
    }

    fn report(&self) {
        metrics::conversation_state(
            self.spool.as_ref().map_or(0, Spool::bytes),
            self.db.is_some(),
        );
    }
}

impl Drop for State {
    /// The runtime is going away (or the task panicked): spool what is in memory.
    fn drop(&mut self) {
        let mut rest = std::mem::take(&mut self.batch);
        while let Ok(r) = self.queue.try_recv() {
            metrics::conversation_queued(-1);
            self.queued_bytes.fetch_sub(r.weight(), Ordering::Relaxed);
            rest.push(r);
        }
        if !rest.is_empty() {
            self.spool_records(&rest);
            tracing::info!(
                records = rest.len(),
                "conversation log: stopping; records in memory spooled"
            );
        }
        if let Some(spool) = &mut self.spool {
            spool.seal();
        }
    }
}
