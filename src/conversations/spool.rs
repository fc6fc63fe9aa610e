//! The local spool: records that could not be written to PostgreSQL yet, as
//! JSON lines in append-only segment files, fsync'd once per batch and bounded
//! in total size. Segments are replayed oldest first and deleted once written.
//!
//! Files: `open-<nanos>-<pid>.jsonl` is the segment a process appends to (held
//! under `flock`), `ready-<nanos>-<pid>.jsonl` one that is complete. An `open-`
//! file nobody holds belongs to a process that died or stopped: it is adopted
//! (renamed to `ready-`). A `ready-` segment is locked while it is replayed,
//! so two processes sharing the directory (a graceful upgrade) do not replay
//! it at once; if they ever did, `request_id` keeps rows unique.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::record::Record;

/// A segment is closed for appending past this size, so a replay reads a bounded file.
const SEGMENT_MAX_BYTES: u64 = 8 << 20;

/// The spool directory, as seen by this process.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    current: Option<Segment>,
    /// Complete segments, oldest first, as of the last scan.
    ready: VecDeque<PathBuf>,
    /// Bytes of every segment in the directory (as of the last scan, plus our appends).
    total_bytes: u64,
}

struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
}

/// What [`Spool::append`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Records now on disk.
    pub spooled: usize,
    /// Records refused: the spool is full.
    pub dropped: usize,
}

/// A complete segment this process holds the lock of, for replay.
pub struct ReadySegment {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl Spool {
    /// Opens (creating it, mode 0700) the spool in `dir`, holding at most `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            current: None,
            ready: VecDeque::new(),
            total_bytes: 0,
        };
        spool.scan()?;
        Ok(spool)
    }

    /// Bytes waiting in the directory.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Whether anything waits to be replayed.
    pub fn has_pending(&self) -> bool {
        !self.ready.is_empty() || self.current.as_ref().is_some_and(|s| s.bytes > 0)
    }

    /// Looks at the directory again: adopts segments left open by processes that are
    /// gone, lists the complete ones oldest first and sums their sizes.
    pub fn scan(&mut self) -> io::Result<()> {
        let own = self.current.as_ref().map(|s| s.path.clone());
        let mut ready = Vec::new();
        let mut total = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(".jsonl") {
                continue;
            }
            let path = entry.path();
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if let Some(rest) = name.strip_prefix("open-") {
                if Some(&path) == own.as_ref() {
                    total += bytes;
                    continue;
                }
                // Lockable: its writer is gone. Its name keeps the creation time.
                let Ok(file) = OpenOptions::new().read(true).open(&path) else {
                    continue;
                };
                if !try_lock(&file) {
                    total += bytes;
                    continue;
                }
                if bytes == 0 {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let target = self.dir.join(format!("ready-{rest}"));
                if fs::rename(&path, &target).is_ok() {
                    ready.push(target);
                    total += bytes;
                }
            } else if name.starts_with("ready-") {
                ready.push(path);
                total += bytes;
            }
        }
        ready.sort();
        self.ready = ready.into();
        self.total_bytes = total;
        Ok(())
    }

    /// Appends `records` in order (one JSON line each) and syncs the file; past the
    /// size bound the rest of the batch is dropped.
    pub fn append(&mut self, records: &[Record]) -> io::Result<Appended> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        let mut spooled = 0;
        for record in records {
            let start = buf.len();
            serde_json::to_writer(&mut buf, record).map_err(io::Error::other)?;
            buf.push(b'\n');
            if self.total_bytes + buf.len() as u64 > self.max_bytes {
                buf.truncate(start);
                break;
            }
            spooled += 1;
        }
        let dropped = records.len() - spooled;
        if buf.is_empty() {
            return Ok(Appended { spooled, dropped });
        }
        let segment = match &mut self.current {
            Some(s) => s,
            None => self.current.insert(self.new_segment()?),
        };
        segment.file.write_all(&buf)?;
        segment.file.sync_data()?;
        segment.bytes += buf.len() as u64;
        self.total_bytes += buf.len() as u64;
        if segment.bytes >= SEGMENT_MAX_BYTES {
            self.seal();
        }
        Ok(Appended { spooled, dropped })
    }

    fn new_segment(&self) -> io::Result<Segment> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self
            .dir
            .join(format!("open-{nanos:020}-{}.jsonl", std::process::id()));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        if !try_lock(&file) {
            return Err(io::Error::other("cannot lock a new spool segment"));
        }
        // The directory entry itself must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        Ok(Segment {
            file,
            path,
            bytes: 0,
        })
    }

    /// Closes the segment being appended to, making it ready for replay.
    pub fn seal(&mut self) {
        let Some(segment) = self.current.take() else {
            return;
        };
        if segment.bytes == 0 {
            let _ = fs::remove_file(&segment.path);
            return;
        }
        let name = segment
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("open-"))
            .map(|rest| format!("ready-{rest}"));
        if let Some(name) = name {
            let target = self.dir.join(name);
            if fs::rename(&segment.path, &target).is_ok() {
                let at = self.ready.partition_point(|p| p < &target);
                self.ready.insert(at, target);
            }
        }
        // Dropping the file releases its lock.
    }

    /// The oldest complete segment nobody else is replaying, locked; the segment
    /// being appended to is sealed first when nothing else waits.
    pub fn next_ready(&mut self) -> Option<ReadySegment> {
        if self.ready.is_empty() {
            self.seal();
        }
        while let Some(path) = self.ready.pop_front() {
            let Ok(file) = OpenOptions::new().read(true).open(&path) else {
                continue; // replayed and removed by another process
            };
            if !try_lock(&file) {
                continue;
            }
            let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            return Some(ReadySegment { file, path, bytes });
        }
        None
    }

    /// The segment was written to PostgreSQL: removes it.
    pub fn finish(&mut self, segment: ReadySegment) {
        let _ = fs::remove_file(&segment.path);
        self.total_bytes = self.total_bytes.saturating_sub(segment.bytes);
    }

    /// The replay failed: the segment stays, first in line.
    pub fn put_back(&mut self, segment: ReadySegment) {
        self.ready.push_front(segment.path.clone());
    }
}

impl ReadySegment {
    /// The records in the file, and how many lines could not be read (the torn last
    /// line of a process killed while writing).
    pub fn read(&mut self) -> io::Result<(Vec<Record>, usize)> {
        let mut text = Vec::with_capacity(self.bytes as usize);
        self.file.read_to_end(&mut text)?;
        let mut records = Vec::new();
        let mut unreadable = 0;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice(line) {
                Ok(r) => records.push(r),
                Err(_) => unreadable += 1,
            }
        }
        Ok((records, unreadable))
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: whether this process now holds the file's lock.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock(2) on a descriptor this File owns for the whole call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversations::record::{Draft, Finished};
    use std::time::Duration;

    fn record(id: &str) -> Record {
        Draft::new(
            "u",
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap()
        .finish(Finished {
            request_id: id,
            user_id: Some(1),
            route: "/r",
            outcome: "ok",
            status: 200,
            tokens: None,
            duration: Duration::from_millis(5),
            ttfb: None,
        })
    }

    fn replay_all(spool: &mut Spool) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(mut seg) = spool.next_ready() {
            let (records, bad) = seg.read().unwrap();
            assert_eq!(bad, 0);
            ids.extend(records.into_iter().map(|r| r.request_id));
            spool.finish(seg);
        }
        ids
    }

    #[test]
    fn replays_oldest_first_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(!spool.has_pending());
        spool.append(&[record("a"), record("b")]).unwrap();
        spool.seal();
        spool.append(&[record("c")]).unwrap();
        assert!(spool.has_pending());
        assert_eq!(replay_all(&mut spool), ["a", "b", "c"]);
        assert!(!spool.has_pending());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn past_the_bound_records_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&record("x")).unwrap().len() as u64 + 1;
        let mut spool = Spool::open(dir.path(), one * 2).unwrap();
        let a = spool
            .append(&[record("a"), record("b"), record("c")])
            .unwrap();
        assert_eq!(
            a,
            Appended {
                spooled: 2,
                dropped: 1
            }
        );
        assert_eq!(spool.append(&[record("d")]).unwrap().dropped, 1);
        assert_eq!(replay_all(&mut spool), ["a", "b"]);
        assert_eq!(spool.append(&[record("e")]).unwrap().spooled, 1);
    }

    #[test]
    fn a_restarted_process_adopts_what_a_stopped_one_left() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut first = Spool::open(dir.path(), 1 << 20).unwrap();
            first.append(&[record("a")]).unwrap();
            // While it holds its open segment, a second process must leave it alone.
            let mut second = Spool::open(dir.path(), 1 << 20).unwrap();
            assert!(second.next_ready().is_none());
            assert!(second.bytes() > 0);
            // The first one dies without sealing: its lock goes with it.
        }
        let mut again = Spool::open(dir.path(), 1 << 20).unwrap();
        // A child another test thread is spawning can hold a copy of the dead
        // writer's descriptor, and so its lock, until it execs; the writer scans
        // again every few seconds, so adoption may take a later scan.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !again.has_pending() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            again.scan().unwrap();
        }
        assert!(again.has_pending());
        assert_eq!(replay_all(&mut again), ["a"]);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[record("a")]).unwrap();
        let path = spool.current.as_ref().unwrap().path.clone();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"request_id\":\"tor")
            .unwrap();
        let mut seg = spool.next_ready().unwrap();
        let (records, bad) = seg.read().unwrap();
        assert_eq!((records.len(), bad), (1, 1));
    }
}
