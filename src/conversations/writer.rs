//! The one background writer per process: takes queued records in batches
//! (every `flush_interval`, or sooner when a batch is full), writes them to
//! PostgreSQL, spools them when it does not answer in time, spools what queues
//! behind a slow call rather than holding it in memory, and replays the spool
//! oldest first once PostgreSQL answers; deletes expired rows in small batches.
//!
//! Stopping: on Pingora's shutdown signal it keeps flushing, since requests
//! still finishing in the grace period hand in records; when the runtime
//! finally drops it, whatever is still in memory is spooled synchronously
//! (see `Drop for State`). A killed process loses the batch in flight and what
//! arrived since: at most one `flush_interval` of records, or while a call is
//! slow, [`SLOW_AFTER`]'s (or the flush interval's, if longer) and a tick's.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use super::db::{self, Writer};
use super::spool::Spool;
use super::{DropWarning, Record, MAX_BATCH, QUEUE_CAPACITY, QUEUE_MAX_BYTES};
use crate::config::ConversationLogSettings;
use crate::metrics;

/// How long connecting may take, and then migrating the schema (records queued
/// meanwhile go to the spool: see [`Intake::meanwhile`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one batch write may take before it goes to the spool instead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A database call in flight longer than this (or the flush interval, if longer)
/// is slow: what queues meanwhile is spooled, looked at every tick.
const SLOW_AFTER: Duration = Duration::from_secs(1);
const SLOW_TICK: Duration = Duration::from_millis(250);
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
            ca_file: self.settings.ca_file.clone(),
            retention: self.settings.retention,
            intake: Intake {
                queue,
                queued_bytes: self.queued_bytes.clone(),
                batch_ready: self.batch_ready.clone(),
                spool,
                warn: self.warn.clone(),
                flush_interval: self.settings.flush_interval,
            },
            batch: Vec::with_capacity(MAX_BATCH),
            db: None,
            next_connect: Instant::now(),
            backoff: BACKOFF_MIN,
            next_scan: Instant::now() + SCAN_EVERY,
            next_retention: Instant::now(),
            was_up: None,
        };
        state.run(shutdown).await;
    }
}

/// Records on their way in: the queue requests fill and the spool for what
/// PostgreSQL does not take in time. Kept apart from the connection so that a
/// database call in flight can go on while the queue is drained to the spool.
struct Intake {
    queue: mpsc::Receiver<Record>,
    queued_bytes: Arc<AtomicUsize>,
    batch_ready: Arc<Notify>,
    spool: Option<Spool>,
    warn: Arc<DropWarning>,
    flush_interval: Duration,
}

impl Intake {
    /// Moves up to a batch of queued records into `batch`; whether the queue is
    /// closed and empty (every sender gone: the process is stopping).
    fn take_queued(&mut self, batch: &mut Vec<Record>) -> bool {
        let before = batch.len();
        let mut closed = false;
        while batch.len() < before + MAX_BATCH {
            match self.queue.try_recv() {
                Ok(record) => batch.push(record),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let taken = &batch[before..];
        if !taken.is_empty() {
            metrics::conversation_queued(-(taken.len() as i64));
            let weight: usize = taken.iter().map(Record::weight).sum();
            self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
        }
        closed
    }

    /// Runs `work`, a database call. Should it be slow (past [`SLOW_AFTER`] or the
    /// flush interval), records that queue meanwhile go to the spool every tick
    /// rather than waiting in memory, where a full queue would drop them; so would
    /// a queue half full, however long the call has taken.
    async fn meanwhile<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        let tick = self.flush_interval.min(SLOW_TICK);
        let slow_after = self.flush_interval.max(SLOW_AFTER);
        let started = Instant::now();
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = tokio::time::sleep(tick) => {}
            }
            let high = self.queue.len() >= QUEUE_CAPACITY / 2
                || self.queued_bytes.load(Ordering::Relaxed) >= QUEUE_MAX_BYTES / 2;
            if high || started.elapsed() >= slow_after {
                self.spool_queued();
            }
        }
    }

    /// Spools everything in the queue now, a batch at a time; returns how many
    /// records it took.
    fn spool_queued(&mut self) -> usize {
        let mut batch = Vec::new();
        let mut taken = 0;
        loop {
            self.take_queued(&mut batch);
            if batch.is_empty() {
                return taken;
            }
            taken += batch.len();
            self.spool_records(&batch);
            batch.clear();
        }
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
}

struct State {
    url: String,
    ca_file: Option<std::path::PathBuf>,
    retention: Duration,
    intake: Intake,
    /// Records taken from the queue and not yet written or spooled.
    batch: Vec<Record>,
    db: Option<Writer>,
    next_connect: Instant,
    backoff: Duration,
    next_scan: Instant,
    next_retention: Instant,
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
            if self.intake.queue.len() < MAX_BATCH {
                let flush_at = tokio::time::Instant::now() + self.intake.flush_interval;
                tokio::select! {
                    biased;
                    _ = shutdown.changed(), if !stopping => stopping = true,
                    _ = self.intake.batch_ready.notified() => {}
                    _ = tokio::time::sleep_until(flush_at) => {}
                }
            }
            let closed = self.intake.take_queued(&mut self.batch);
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

    /// Writes the batch to PostgreSQL, or spools it.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self.connected().await {
            if let Some(db) = &mut self.db {
                let started = Instant::now();
                let write = tokio::time::timeout(WRITE_TIMEOUT, db.write_new(&self.batch));
                match self.intake.meanwhile(write).await {
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
        self.intake.spool_records(&batch);
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
        let (url, ca_file) = (&self.url, self.ca_file.as_deref());
        let opening = async {
            let mut client = db::connect(url, ca_file, CONNECT_TIMEOUT).await?;
            tokio::time::timeout(MIGRATE_TIMEOUT, db::migrate(&mut client))
                .await
                .map_err(|_| "schema migration timed out".to_string())??;
            Writer::new(client).await
        };
        match self.intake.meanwhile(opening).await {
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
        if let Some(spool) = &mut self.intake.spool {
            if Instant::now() >= self.next_scan {
                self.next_scan = Instant::now() + SCAN_EVERY;
                if let Err(e) = spool.scan() {
                    tracing::warn!(error = %e, "conversation log: cannot read the spool directory");
                }
            }
        }
        if self.intake.spool.as_ref().is_some_and(Spool::has_pending) && self.connected().await {
            self.replay_one().await;
        }
        if Instant::now() >= self.next_retention && self.connected().await {
            self.expire().await;
        }
    }

    /// Writes the oldest spooled segment, chunk by chunk; removes it when all is in.
    async fn replay_one(&mut self) {
        let Some(spool) = &mut self.intake.spool else {
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
            let Some(db) = &mut self.db else { return };
            let started = Instant::now();
            let write = tokio::time::timeout(WRITE_TIMEOUT, db.write(chunk));
            let failed = match self.intake.meanwhile(write).await {
                Ok(Ok(new)) => {
                    metrics::conversation_written(new, started.elapsed());
                    continue;
                }
                Ok(Err(e)) => e,
                Err(_) => "write timed out".to_string(),
            };
            if let Some(spool) = &mut self.intake.spool {
                spool.put_back(segment);
            }
            self.lost_connection(&failed);
            return;
        }
        if let Some(spool) = &mut self.intake.spool {
            spool.finish(segment);
        }
        if unreadable > 0 {
            metrics::conversation_dropped("spool_unreadable", unreadable as u64);
            self.intake
                .warn
                .dropped(unreadable as u64, "spool_unreadable");
        }
    }

    /// Deletes rows past the retention, a bounded number per run.
    async fn expire(&mut self) {
        let Some(db) = &self.db else { return };
        let mut deleted = 0;
        for _ in 0..RETENTION_BATCHES_PER_RUN {
            let delete = db.delete_expired(self.retention, RETENTION_BATCH);
            match self.intake.meanwhile(delete).await {
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
            self.intake.spool.as_ref().map_or(0, Spool::bytes),
            self.db.is_some(),
        );
    }
}

impl Drop for State {
    /// The runtime is going away (or the task panicked): spool what is in memory,
    /// the batch being written included (its write may yet commit: a replay skips
    /// rows already there).
    fn drop(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        if !batch.is_empty() {
            self.intake.spool_records(&batch);
        }
        let records = batch.len() + self.intake.spool_queued();
        if records > 0 {
            tracing::info!(
                records,
                "conversation log: stopping; records in memory spooled"
            );
        }
        if let Some(spool) = &mut self.intake.spool {
            spool.seal();
        }
    }
}
