//! Host-name resolution kept off the request path: names are looked up once
//! at start-up and then refreshed by a background service; requests only read
//! the last known addresses (Pingora's `HttpPeer::new` would block on DNS).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::Upstream;

/// Resolves `host:port` with the system resolver (blocking).
pub fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolved to no address"));
    }
    Ok(addrs)
}

/// Background service that re-resolves every named endpoint periodically.
pub struct DnsRefresher {
    upstreams: Vec<Arc<Upstream>>,
}

impl DnsRefresher {
    /// A refresher over these upstreams; it does nothing for IP literals.
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        DnsRefresher { upstreams }
    }

    /// Whether any endpoint needs DNS at all.
    pub fn is_needed(&self) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.endpoints.iter().any(|e| e.needs_dns()))
    }

    async fn refresh(&self, upstream: &Upstream) {
        for endpoint in upstream.endpoints.iter().filter(|e| e.needs_dns()) {
            let (host, port) = (endpoint.settings.host.clone(), endpoint.settings.port);
            match tokio::task::spawn_blocking(move || lookup(&host, port)).await {
                Ok(Ok(addrs)) => endpoint.set_addrs(addrs),
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %upstream.name(), endpoint = %endpoint.label, error = %e, "DNS refresh failed; keeping the last known addresses")
                }
                Err(e) => tracing::warn!(error = %e, "DNS refresh task failed"),
            }
        }
    }
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let now = Instant::now();
        let mut next_due: Vec<Instant> = self
            .upstreams
            .iter()
            .map(|u| now + u.settings.dns_refresh)
            .collect();
        loop {
            let wake = next_due
                .iter()
                .min()
                .copied()
                .unwrap_or(now + Duration::from_secs(60));
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            for (upstream, due) in self.upstreams.iter().zip(next_due.iter_mut()) {
                if *due <= now {
                    self.refresh(upstream).await;
                    *due = now + upstream.settings.dns_refresh;
                }
            }
        }
    }
}
