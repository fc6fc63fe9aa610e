//! Dedicated threads for password hashing, running at the lowest CPU priority
//! (`SCHED_IDLE` on Linux, nice +10 elsewhere or where it is refused), so that a
//! flood of logins — each one a deliberately expensive argon2 computation — yields
//! the cores to chat traffic instead of competing.
//!
//! `SCHED_IDLE` rather than a nice value: a waking chat worker preempts an idle-class
//! thread at once, while a nice +10 thread could keep the core for a scheduler slice
//! (chat p99 under an `/auth` flood: 1.25-1.66× quiet with `SCHED_IDLE`, 2.85-10.5×
//! with nice +10, in alternating runs; benches/RESULTS.md). The price: on a machine
//! whose cores are kept busy by other work, logins wait for it (a login waits for a
//! free thread no longer than `auth.password_hash.queue_timeout`, see `password`).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// How much lower than the rest of the process hashing threads run where
/// `SCHED_IDLE` is not available.
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

/// Puts this thread in the idle scheduling class, or else raises its nice value.
/// On Linux both calls with `0` apply to the calling thread only. Failure just
/// leaves the priority as is.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that outlives the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
            return;
        }
    }
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, HASH_NICENESS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn runs_jobs_on_idle_class_threads() {
        // SAFETY: sched_getscheduler takes a plain integer.
        let before = unsafe { libc::sched_getscheduler(0) };
        let pool = HashPool::new(2).expect("pool");
        let (name, policy) = pool
            .run(|| {
                // SAFETY: sched_getscheduler takes a plain integer.
                let policy = unsafe { libc::sched_getscheduler(0) };
                (std::thread::current().name().map(String::from), policy)
            })
            .await
            .expect("result");
        assert!(name.is_some_and(|n| n.starts_with("chatgate-hash-")));
        // Any thread may lower its own priority: the idle class is never refused.
        assert_eq!(policy, libc::SCHED_IDLE);
        // Only the pool's threads: this (the test's) thread keeps its class.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, before);
    }

    #[tokio::test]
    async fn a_panicking_job_yields_none_and_the_pool_goes_on() {
        let pool = HashPool::new(1).expect("pool");
        let failed: Option<u32> = pool.run(|| panic!("boom")).await;
        assert_eq!(failed, None);
        assert_eq!(pool.run(|| 7).await, Some(7));
    }
}
