//! Dedicated threads for password hashing, running at a lower CPU priority
//! (nice +10), so that a flood of logins — each one a deliberately expensive
//! argon2 computation — yields the cores to chat traffic instead of competing.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// How much lower than the rest of the process hashing threads run.
const HASH_NICENESS: libc::c_int = 10;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of low-priority worker threads taking jobs from one queue.
/// The threads end when the pool is dropped.
pub struct HashPool {
    jobs: Mutex<Sender<Job>>,
}

impl HashPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("chatgate-hash-{i}"))
                .spawn(move || worker(&rx))?;
        }
        Ok(HashPool {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `work` on a pool thread; `None` if the pool is gone or the work panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .ok()?;
        result.await.ok()
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(job) = job else { return };
        // A panicking job drops its result sender; the caller sees `None`.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// Raises this thread's nice value. On Linux, PRIO_PROCESS with `who = 0`
/// applies to the calling thread only. Failure just leaves the priority as is.
fn lower_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, HASH_NICENESS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_low_priority_threads() {
        let pool = HashPool::new(2).expect("pool");
        let (name, nice) = pool
            .run(|| {
                // SAFETY: getpriority takes plain integers.
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, 0) };
                (std::thread::current().name().map(String::from), nice)
            })
            .await
            .expect("result");
        assert!(name.is_some_and(|n| n.starts_with("chatgate-hash-")));
        assert!(nice >= HASH_NICENESS, "nice {nice}");
    }

    #[tokio::test]
    async fn a_panicking_job_yields_none_and_the_pool_goes_on() {
        let pool = HashPool::new(1).expect("pool");
        let failed: Option<u32> = pool.run(|| panic!("boom")).await;
        assert_eq!(failed, None);
        assert_eq!(pool.run(|| 7).await, Some(7));
    }
}
