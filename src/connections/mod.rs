//! Downstream connection accounting: caps on open connections (in all and per
//! client address), the open-connection gauge, the header deadline, and giving
//! memory back to the system after a burst of connections has closed.
//!
//! [`Guarded`] wraps a listener's app (the gateway's Pingora proxy, the admin
//! app): Pingora calls its `process_new` once per accepted connection and it
//! returns when the connection is over, so a [`Slot`] held across that call
//! counts exactly the open connections. A connection past a cap is closed at
//! once, before a byte is read.

pub mod deadline;
pub mod handshake;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::gateway::client_ip::TrustedProxies;
use crate::metrics;
use deadline::HeaderDeadline;

/// File descriptors kept out of the default `limits.max_connections`: listeners,
/// the log, Redis, DNS, health checks and other odds and ends.
pub const FD_RESERVE: u64 = 64;
/// Connections the admin listener may hold, apart from the public cap.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

/// The default `limits.max_connections`: half of what the open-file soft limit
/// leaves after [`FD_RESERVE`], the admin listener's reserve and the idle
/// upstream keep-alive pool (counted as at most a quarter of the limit), since
/// every client connection may hold one upstream connection while its request
/// is in flight. At least 16.
pub fn default_max_connections(fd_soft_limit: u64, upstream_pool: usize) -> usize {
    let pool = (upstream_pool as u64).min(fd_soft_limit / 4);
    let reserved = FD_RESERVE + ADMIN_MAX_CONNECTIONS as u64 + pool;
    (fd_soft_limit.saturating_sub(reserved) / 2).max(16) as usize
}

/// The process's open-file soft limit (`ulimit -Sn`).
pub fn fd_soft_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener's `max_connections` are open.
    MaxConnections,
    /// The client address holds `max_connections_per_ip` already.
    MaxConnectionsPerIp,
}

impl Refusal {
    /// The `reason` label of `chatgate_connections_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// The open connections of one listener (or group of listeners) and their caps.
#[derive(Debug)]
pub struct ConnectionLimits {
    listener: &'static str,
    max: usize,
    /// 0: no per-address cap.
    per_ip: usize,
    /// Peers that are trusted proxies carry many clients: no per-address cap.
    trusted: TrustedProxies,
    open: AtomicUsize,
    /// The most connections open at once since the last memory trim.
    peak: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Slots of TLS connections taken before their handshake (see [`handshake`]).
    parked: handshake::Parked,
}

impl ConnectionLimits {
    /// Caps for the listener named `listener` in the metrics.
    pub fn new(listener: &'static str, max: usize, per_ip: usize, trusted: TrustedProxies) -> Self {
        metrics::open_connections(listener, 0);
        ConnectionLimits {
            listener,
            max,
            per_ip,
            trusted,
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            parked: handshake::Parked::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a slot for a new connection from `peer`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, Refusal> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnections);
        }
        let ip = peer
            .map(crate::gateway::client_ip::canonical)
            .filter(|ip| self.per_ip > 0 && !self.trusted.trusts(*ip));
        if let Some(ip) = ip {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
            let count = by_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip {
                drop(by_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::MaxConnectionsPerIp);
            }
            *count += 1;
        }
        self.peak.fetch_max(before + 1, Ordering::Relaxed);
        metrics::open_connections(self.listener, before as i64 + 1);
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

/// One open connection; dropping it (the connection ended) frees its place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let limits = &self.limits;
        if let Some(ip) = self.ip {
            let mut by_ip = limits.by_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = by_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
        let now = limits.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::open_connections(limits.listener, now as i64);
    }
}

/// A listener's app behind the connection caps and the header deadline.
pub struct Guarded<A> {
    app: Arc<A>,
    limits: Arc<ConnectionLimits>,
    header_timeout: Duration,
}

impl<A> Guarded<A> {
    /// `app` with `limits` and `header_timeout` applied to every connection.
    pub fn new(app: A, limits: Arc<ConnectionLimits>, header_timeout: Duration) -> Self {
        Guarded {
            app: Arc::new(app),
            limits,
            header_timeout,
        }
    }
}

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        // A TLS connection took its slot before its handshake.
        let parked = peer.and_then(|p| self.limits.parked.take(stream.id(), p));
        let _slot = match parked.map_or_else(|| self.limits.admit(peer.map(|p| p.ip())), Ok) {
            Ok(slot) => slot,
            Err(refusal) => {
                metrics::connection_refused(self.limits.listener, refusal);
                tracing::debug!(peer = ?peer, reason = refusal.as_str(), "connection refused");
                return None;
            }
        };
        // HTTP/2 (ALPN on a TLS listener) multiplexes requests on one stream: the
        // gateway cannot say when "the" headers are in, so only HTTP/1 gets the deadline.
        let stream: Stream = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            stream
        } else {
            Box::new(HeaderDeadline::new(stream, self.header_timeout))
        };
        // Pingora's HTTP app serves every request of the connection (keep-alive
        // included) inside this call, so the slot lives exactly as long.
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Connections closed since the peak that make a trim worth it.
const TRIM_AFTER_CLOSED: usize = 64;
/// How often the trimmer looks.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Gives freed heap back to the system once a burst of connections has closed:
/// glibc keeps the per-thread arenas that thousands of connection buffers grew,
/// so RSS stays at the flood's peak without `malloc_trim`.
pub struct MemoryTrimmer {
    limits: Vec<Arc<ConnectionLimits>>,
}

impl MemoryTrimmer {
    /// Watches these listeners' connection counts.
    pub fn new(limits: Vec<Arc<ConnectionLimits>>) -> Self {
        MemoryTrimmer { limits }
    }

    /// One look: trims when at least [`TRIM_AFTER_CLOSED`] connections closed
    /// since the peak; returns whether it did.
    pub fn check(&self) -> bool {
        let mut closed = 0;
        for l in &self.limits {
            // Slots that failed TLS handshakes left parked go first.
            l.parked.sweep(false);
            let open = l.open();
            closed += l.peak.swap(open, Ordering::Relaxed).saturating_sub(open);
        }
        if closed < TRIM_AFTER_CLOSED {
            return false;
        }
        trim();
        tracing::debug!(
            closed,
            "returned freed memory to the system after a connection burst"
        );
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[async_trait]
impl BackgroundService for MemoryTrimmer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize, trusted: &[&str]) -> Arc<ConnectionLimits> {
        let nets = trusted.iter().map(|n| n.parse().expect("net")).collect();
        Arc::new(ConnectionLimits::new(
            "test",
            max,
            per_ip,
            TrustedProxies::new(nets),
        ))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn the_total_cap_refuses_past_max_and_frees_on_drop() {
        let l = limits(2, 0, &[]);
        let a = l.admit(ip("10.0.0.1")).expect("first");
        let _b = l.admit(ip("10.0.0.2")).expect("second");
        assert_eq!(
            l.admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::MaxConnections
        );
        assert_eq!(l.open(), 2);
        drop(a);
        assert_eq!(l.open(), 1);
        assert!(l.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn the_per_address_cap_counts_each_address_apart() {
        let l = limits(10, 2, &[]);
        let a1 = l.admit(ip("10.0.0.1")).expect("a1");
        let _a2 = l
            .admit(ip("::ffff:10.0.0.1"))
            .expect("a2 (same address, mapped)");
        assert_eq!(
            l.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::MaxConnectionsPerIp
        );
        assert_eq!(l.open(), 2, "a refusal gives its place back");
        let _b = l.admit(ip("10.0.0.2")).expect("another address");
        drop(a1);
        assert!(l.admit(ip("10.0.0.1")).is_ok());
        assert_eq!(l.by_ip.lock().unwrap().len(), 2);
    }

    #[test]
    fn trusted_proxies_have_no_per_address_cap() {
        let l = limits(10, 1, &["10.1.0.0/16"]);
        let _a = l.admit(ip("10.1.0.5")).expect("a");
        let _b = l
            .admit(ip("10.1.0.5"))
            .expect("b: a proxy carries many clients");
        let _c = l.admit(ip("10.2.0.5")).expect("c");
        assert!(l.admit(ip("10.2.0.5")).is_err());
    }

    #[test]
    fn the_default_cap_leaves_room_for_upstream_and_admin_sockets() {
        // (1024 - 64 - 32 - 128) / 2
        assert_eq!(default_max_connections(1024, 128), 400);
        assert_eq!(default_max_connections(65536, 128), 32656);
        assert_eq!(default_max_connections(100, 128), 16);
        // A huge pool counts as a quarter of the limit: (20000 - 96 - 5000) / 2
        assert_eq!(default_max_connections(20000, 20000), 7452);
    }

    #[test]
    fn the_trimmer_runs_after_a_burst_closed() {
        let l = limits(1000, 0, &[]);
        let trimmer = MemoryTrimmer::new(vec![l.clone()]);
        let slots: Vec<Slot> = (0..100).map(|_| l.admit(None).expect("slot")).collect();
        assert!(!trimmer.check(), "nothing closed yet");
        drop(slots);
        assert!(trimmer.check());
        assert!(!trimmer.check(), "the peak starts again from what is open");
    }
}
