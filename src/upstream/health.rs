//! Endpoint health: active HTTP checks run by a background service (the probe
//! is Pingora's `HttpHealthCheck` from its load-balancing crate), and passive
//! ejection after consecutive failed calls, for a cool-down. The balancer in
//! `super` skips endpoints that are down unless every endpoint is.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{Endpoint, Upstream};
use crate::config::{HealthCheckSettings, UpstreamSettings};
use crate::metrics::{self, AttemptOutcome};

/// The health state of one endpoint.
pub struct EndpointHealth {
    /// The last active check passed (true until a check says otherwise).
    checked_up: AtomicBool,
    /// Failed calls in a row (connect errors, timeouts, 5xx).
    failures: AtomicU32,
    /// Until when a passive ejection lasts.
    ejected_until: Mutex<Option<Instant>>,
    eject_after: u32,
    cooldown: Duration,
}

impl EndpointHealth {
    /// A healthy endpoint ejected after `eject_after` failed calls in a row
    /// (0: never) for `cooldown`.
    pub fn new(eject_after: u32, cooldown: Duration) -> Self {
        EndpointHealth {
            checked_up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            eject_after,
            cooldown,
        }
    }

    /// Whether the endpoint takes traffic now.
    pub fn is_up(&self) -> bool {
        self.checked_up.load(Ordering::Relaxed) && !self.is_ejected(Instant::now())
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| now < t)
    }

    /// Records how a call to this endpoint went; returns true when it just got ejected.
    pub fn observe_attempt(&self, outcome: AttemptOutcome) -> bool {
        match outcome {
            AttemptOutcome::Ok | AttemptOutcome::Http4xx => {
                self.failures.store(0, Ordering::Relaxed);
                false
            }
            AttemptOutcome::Cancelled => false,
            AttemptOutcome::Http5xx | AttemptOutcome::ConnectError | AttemptOutcome::Timeout => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if self.eject_after == 0 || n < self.eject_after {
                    return false;
                }
                self.failures.store(0, Ordering::Relaxed);
                let mut until = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
                *until = Some(Instant::now() + self.cooldown);
                true
            }
        }
    }

    /// Records an active check result; returns true when the state flipped.
    pub fn observe_check(&self, up: bool) -> bool {
        self.checked_up.swap(up, Ordering::Relaxed) != up
    }
}

/// Runs the configured active health checks of every upstream.
pub struct HealthChecker {
    upstreams: Vec<Arc<Upstream>>,
}

impl HealthChecker {
    /// A checker for these upstreams (those without `health_check` are skipped).
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        HealthChecker { upstreams }
    }

    /// Whether any upstream has an active check configured.
    pub fn is_needed(&self) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.settings.health_check.is_some())
    }
}

/// Pingora's HTTP probe set up for one endpoint: its TLS name, `Host` header,
/// the check path, the timeout, and any 2xx counting as healthy.
fn probe(
    endpoint: &Endpoint,
    upstream: &UpstreamSettings,
    check: &HealthCheckSettings,
) -> Option<HttpHealthCheck> {
    let mut hc = HttpHealthCheck::new(&endpoint.host_header, upstream.tls);
    let mut req = RequestHeader::build("GET", check.path.as_bytes(), None).ok()?;
    req.insert_header(http::header::HOST, endpoint.host_header.as_str())
        .ok()?;
    req.insert_header(
        http::header::USER_AGENT,
        concat!("chatgate-health/", env!("CARGO_PKG_VERSION")),
    )
    .ok()?;
    hc.req = req;
    hc.peer_template.sni = endpoint.sni.clone();
    hc.peer_template.options.connection_timeout = Some(check.timeout);
    hc.peer_template.options.read_timeout = Some(check.timeout);
    hc.peer_template.options.write_timeout = Some(check.timeout);
    hc.validator = Some(Box::new(|resp| {
        if resp.status.is_success() {
            Ok(())
        } else {
            pingora::Error::e_explain(
                pingora::ErrorType::CustomCode("unhealthy status", resp.status.as_u16()),
                "during health check",
            )
        }
    }));
    Some(hc)
}

/// One check of one endpoint at its current address.
async fn check_once(endpoint: &Endpoint, hc: &HttpHealthCheck, timeout: Duration) -> bool {
    let Some(addr) = endpoint.socket_addr() else {
        return false;
    };
    let Ok(backend) = Backend::new(&addr.to_string()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, hc.check(&backend)).await,
        Ok(Ok(()))
    )
}

/// Checks one upstream's endpoints every interval until shutdown.
async fn check_upstream(upstream: Arc<Upstream>, mut shutdown: ShutdownWatch) {
    let Some(check) = upstream.settings.health_check.clone() else {
        return;
    };
    let probes: Vec<Option<HttpHealthCheck>> = upstream
        .endpoints
        .iter()
        .map(|e| probe(e, &upstream.settings, &check))
        .collect();
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        let results = futures::future::join_all(upstream.endpoints.iter().zip(&probes).map(
            |(e, hc)| async move {
                match hc {
                    Some(hc) => check_once(e, hc, check.timeout).await,
                    None => false,
                }
            },
        ))
        .await;
        for (e, up) in upstream.endpoints.iter().zip(results) {
            if e.health.observe_check(up) {
                tracing::warn!(upstream = %upstream.name(), endpoint = %e.label, up, "upstream endpoint health changed");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        let tasks = self
            .upstreams
            .iter()
            .filter(|u| u.settings.health_check.is_some())
            .map(|u| check_upstream(u.clone(), shutdown.clone()));
        futures::future::join_all(tasks).await;
    }
}

/// Publishes every endpoint's state in `chatgate_upstream_endpoint_up`
/// (called before each scrape, so ejections that lapsed show as up again).
pub fn publish(upstreams: &[Arc<Upstream>]) {
    for u in upstreams {
        for e in &u.endpoints {
            metrics::endpoint_up(u.name(), &e.label, e.health.is_up());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_for_the_cooldown() {
        let h = EndpointHealth::new(3, Duration::from_millis(50));
        assert!(!h.observe_attempt(AttemptOutcome::ConnectError));
        assert!(!h.observe_attempt(AttemptOutcome::Http5xx));
        // A success (or a 4xx, which says nothing about the endpoint) resets the count.
        assert!(!h.observe_attempt(AttemptOutcome::Http4xx));
        assert!(!h.observe_attempt(AttemptOutcome::Timeout));
        assert!(!h.observe_attempt(AttemptOutcome::Cancelled));
        assert!(!h.observe_attempt(AttemptOutcome::Timeout));
        assert!(h.is_up());
        assert!(h.observe_attempt(AttemptOutcome::Timeout));
        assert!(!h.is_up());
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.is_up());
    }

    #[test]
    fn zero_disables_ejection_and_checks_flip_state() {
        let h = EndpointHealth::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            assert!(!h.observe_attempt(AttemptOutcome::ConnectError));
        }
        assert!(h.is_up());
        assert!(h.observe_check(false));
        assert!(!h.observe_check(false));
        assert!(!h.is_up());
        assert!(h.observe_check(true));
        assert!(h.is_up());
    }
}
