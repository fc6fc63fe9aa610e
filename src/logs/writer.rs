//! The background log writer: formatted lines are appended to a shared
//! buffer under a short lock, and one thread writes the whole buffer to
//! stderr, one `write` per batch. A line that finds the writer idle wakes it
//! and is written at once; after each write the writer lets lines gather for
//! 5 ms, so under load it is never woken by a logger (a wake-up per
//! line, as a channel with a parked receiver does, costs more than
//! formatting the line). The buffer is bounded; a line that does
//! not fit is dropped and counted. An ERROR line is written out at once, with
//! everything queued before it, by the thread that logs it: Pingora exits
//! right after some of its errors, and those lines must not stay queued.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long lines gather after a write before the next one.
const GATHER: Duration = Duration::from_millis(5);
/// A batch this large is written at once, without waiting for the tick.
const WAKE_AT: usize = 256 * 1024;
/// Longest a stop waits for the last batch to be written.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// What loggers and the writer thread share.
struct Shared {
    /// Where lines go; held while a batch is written, and taken before
    /// `queue`, so batches reach it in the order they were queued.
    out: Mutex<Box<dyn Write + Send>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    dropped: AtomicU64,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    closed: bool,
    /// The writer waits for a line; the next one wakes it.
    idle: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what is queued, using `batch` as the spare buffer.
    fn write_queued(&self, batch: &mut Vec<u8>) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut self.lock().bytes, batch);
        if !batch.is_empty() {
            // A failing stderr has nowhere to report to; the lines are lost.
            let _ = out.write_all(batch).and_then(|()| out.flush());
            batch.clear();
            // Keep the two buffers from holding on to a burst's size.
            batch.shrink_to(WAKE_AT);
        }
    }
}

/// The loggers' end: a `MakeWriter` for `tracing_subscriber::fmt`.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote what is queued (up to
/// [`LAST_WRITE`]).
pub struct WriterGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl BatchWriter {
    /// Starts the writer thread on `out`, queueing at most `limit` bytes.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        limit: usize,
    ) -> std::io::Result<(BatchWriter, WriterGuard)> {
        let shared = Arc::new(Shared {
            out: Mutex::new(Box::new(out)),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            limit,
        });
        let (done_tx, done) = mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("chatgate-log".into())
            .spawn(move || {
                write_batches(&thread_shared);
                let _ = done_tx.send(());
            })?;
        let guard = WriterGuard {
            shared: shared.clone(),
            done,
        };
        Ok((BatchWriter { shared }, guard))
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: writes what is queued, lets lines gather, and waits
/// for one when there are none, until closed.
fn write_batches(shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        {
            let mut queue = shared.lock();
            while queue.bytes.is_empty() && !queue.closed {
                queue.idle = true;
                queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
            queue.idle = false;
        }
        shared.write_queued(&mut batch);
        let closed = {
            let queue = shared.lock();
            if queue.bytes.len() < WAKE_AT && !queue.closed {
                shared
                    .wake
                    .wait_timeout(queue, GATHER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .closed
            } else {
                queue.closed
            }
        };
        if closed {
            shared.write_queued(&mut batch);
            return;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let _ = self.done.recv_timeout(LAST_WRITE);
    }
}

/// One logger's handle: each `write` is one whole line (the `fmt` layer
/// formats a line into its buffer, then writes it in one call).
pub struct LineWriter<'a> {
    shared: &'a Shared,
    /// An ERROR line: written out before `write` returns.
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut queue = self.shared.lock();
        if queue.closed || queue.bytes.len() + line.len() > self.shared.limit {
            drop(queue);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        queue.bytes.extend_from_slice(line);
        // An urgent line is written here: the writer thread stays idle (and the next
        // line wakes it), so `idle` is left as it is.
        let wake = !self.urgent
            && (std::mem::take(&mut queue.idle)
                || (queue.bytes.len() >= WAKE_AT && queue.bytes.len() - line.len() < WAKE_AT));
        drop(queue);
        if self.urgent {
            self.shared.write_queued(&mut Vec::new());
        } else if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.shared,
            urgent: *meta.level() == tracing::Level::ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An output that records what reached it, and can be held shut.
    #[derive(Clone, Default)]
    struct Out {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        blocked: Arc<Mutex<()>>,
    }

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.blocked.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &BatchWriter, text: &str) {
        w.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_soon_in_batches_and_all_of_them_on_stop() {
        let out = Out::default();
        let (w, guard) = BatchWriter::start(out.clone(), 1 << 20).unwrap();
        line(&w, "first\n");
        let deadline = Instant::now() + Duration::from_secs(2);
        while out.written.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*out.written.lock().unwrap(), b"first\n");
        let before = out.writes.load(Ordering::Relaxed);
        for i in 0..1000 {
            line(&w, &format!("line {i}\n"));
        }
        drop(guard);
        let text = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1001);
        assert!(text.ends_with("line 999\n"));
        // 1,000 lines in a few writes, not one each.
        assert!(out.writes.load(Ordering::Relaxed) - before < 50);
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn an_error_line_is_written_before_logging_returns() {
        let out = Out::default();
        let (w, _guard) = BatchWriter::start(out.clone(), 1 << 20).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(w.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("queued first");
            tracing::error!("cannot go on");
            let text = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{text}");
            assert!(lines[0].ends_with("queued first") && lines[1].ends_with("cannot go on"));
        });
    }

    #[test]
    fn lines_after_an_error_line_still_arrive_soon() {
        let out = Out::default();
        let (w, _guard) = BatchWriter::start(out.clone(), 1 << 20).unwrap();
        let arrived = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while out
                .written
                .lock()
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                < n
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            String::from_utf8(out.written.lock().unwrap().clone()).unwrap()
        };
        line(&w, "first\n");
        assert_eq!(arrived(1), "first\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.shared.lock().idle && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The writer thread waits for a line now; an ERROR line is written by the logger itself.
        let mut urgent = w.make_writer();
        urgent.urgent = true;
        urgent.write_all(b"error\n").unwrap();
        line(&w, "after\n");
        assert_eq!(
            arrived(3),
            "first\nerror\nafter\n",
            "a line after an ERROR line stayed queued"
        );
    }

    #[test]
    fn a_stuck_output_drops_and_counts_lines_instead_of_blocking() {
        let out = Out::default();
        let stuck = out.blocked.lock().unwrap();
        let (w, guard) = BatchWriter::start(out.clone(), 100).unwrap();
        let started = Instant::now();
        for _ in 0..50 {
            line(&w, "0123456789\n");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        // At most 100 bytes queued (9 lines), plus what the thread took before it stuck.
        let dropped = w.dropped();
        assert!((50 - 2 * 9..=50 - 9).contains(&dropped), "{dropped}");
        drop(stuck);
        drop(guard);
        let written = out.written.lock().unwrap().len() as u64;
        assert_eq!(written / 11 + dropped, 50);
    }
}
