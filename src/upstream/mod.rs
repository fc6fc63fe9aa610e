//! Upstream LLM backends: endpoints with addresses resolved off the request
//! path (`resolve`), rotating API keys (`keys`), and the call with retries and
//! timeouts (`call`) over hyper's HTTP/1 client and a pool of its own (`conn`).

pub mod call;
pub mod conn;
pub mod health;
pub mod keys;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{EndpointSettings, UpstreamSettings};
pub use call::{OpenResponse, UpstreamError};
use health::EndpointHealth;
use keys::KeyPool;

/// One backend address with its currently known socket addresses.
pub struct Endpoint {
    /// As configured.
    pub settings: EndpointSettings,
    /// `host:port`, for logs and metric labels.
    pub label: String,
    /// Value of the `Host` header sent to it.
    host_header: String,
    /// TLS server name.
    sni: String,
    addrs: RwLock<Vec<SocketAddr>>,
    next_addr: AtomicUsize,
    /// Active check and passive ejection state.
    pub health: EndpointHealth,
}

impl Endpoint {
    fn new(settings: &EndpointSettings, upstream: &UpstreamSettings) -> Self {
        let default_port = if upstream.tls { 443 } else { 80 };
        let label = settings.label();
        let host_header = upstream.host_header.clone().unwrap_or_else(|| {
            if settings.port == default_port {
                settings.host.clone()
            } else {
                label.clone()
            }
        });
        let literal: Vec<SocketAddr> = settings
            .host
            .parse::<std::net::IpAddr>()
            .map(|ip| vec![SocketAddr::new(ip, settings.port)])
            .unwrap_or_default();
        Endpoint {
            settings: settings.clone(),
            label,
            host_header,
            sni: upstream
                .sni
                .clone()
                .unwrap_or_else(|| settings.host.clone()),
            addrs: RwLock::new(literal),
            next_addr: AtomicUsize::new(0),
            health: EndpointHealth::new(upstream.eject_after_failures, upstream.eject_cooldown),
        }
    }

    /// Whether the host is a name that needs DNS (not an IP literal).
    pub fn needs_dns(&self) -> bool {
        self.settings.host.parse::<std::net::IpAddr>().is_err()
    }

    /// The next resolved address in rotation, if any is known.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.read().unwrap_or_else(|p| p.into_inner());
        if addrs.is_empty() {
            return None;
        }
        let i = self.next_addr.fetch_add(1, Ordering::Relaxed) % addrs.len();
        Some(addrs[i])
    }

    /// Replaces the known addresses (after a DNS lookup).
    pub fn set_addrs(&self, new: Vec<SocketAddr>) {
        *self.addrs.write().unwrap_or_else(|p| p.into_inner()) = new;
    }
}

/// A configured upstream, ready to take calls.
pub struct Upstream {
    /// Its validated settings.
    pub settings: Arc<UpstreamSettings>,
    /// Its endpoints, in config order.
    pub endpoints: Vec<Endpoint>,
    /// Endpoint indexes repeated by weight, walked round-robin.
    schedule: Vec<usize>,
    cursor: AtomicUsize,
    /// Its API keys.
    pub keys: KeyPool,
    connector: conn::Connector,
    /// Idle connections to its endpoints.
    pool: conn::Pool,
    /// `<base_path>/chat/completions`.
    chat_path: String,
}

/// Longest weighted cycle; larger weight sums are cut to this many slots.
const MAX_SCHEDULE: usize = 1024;

impl Upstream {
    /// Builds the upstream; host names are resolved here, once, before the
    /// server takes traffic, and refreshed later by [`resolve::DnsRefresher`].
    pub fn new(settings: Arc<UpstreamSettings>, keepalive_pool_size: usize) -> Self {
        let endpoints: Vec<Endpoint> = settings
            .endpoints
            .iter()
            .map(|e| Endpoint::new(e, &settings))
            .collect();
        let schedule = interleave(&settings.endpoints);
        let chat_path = format!("{}/chat/completions", settings.base_path);
        let upstream = Upstream {
            keys: KeyPool::new(&settings.api_keys),
            endpoints,
            schedule,
            cursor: AtomicUsize::new(0),
            connector: conn::Connector::new(settings.tls, settings.ca_file.as_deref()),
            pool: conn::Pool::new(
                settings.endpoints.len(),
                keepalive_pool_size,
                call::POOL_IDLE_TIMEOUT,
            ),
            chat_path,
            settings,
        };
        for e in upstream.endpoints.iter().filter(|e| e.needs_dns()) {
            match resolve::lookup(&e.settings.host, e.settings.port) {
                Ok(addrs) => e.set_addrs(addrs),
                Err(err) => {
                    tracing::warn!(upstream = %upstream.settings.name, endpoint = %e.label, error = %err, "cannot resolve upstream endpoint yet; will retry in the background")
                }
            }
        }
        upstream
    }

    /// An upstream error text fit for a client or a log line: this upstream's keys,
    /// pieces of them and anything credential-shaped removed, cut short
    /// ([`crate::redact::upstream_text`]).
    pub fn redact(&self, text: &str) -> String {
        let keys: Vec<String> = self
            .settings
            .api_keys
            .iter()
            .map(|k| k.expose_str())
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        crate::redact::upstream_text(text, &keys)
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The next endpoint by weight, preferring ones that are up and not yet
    /// tried for this request.
    fn pick_endpoint(&self, tried: &[usize]) -> usize {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        pick(&self.schedule, start, tried, |i| {
            self.endpoints[i].health.is_up()
        })
    }
}

/// Walks the weighted `schedule` from `start` and takes the first endpoint
/// that is up and untried; failing that, one that is up; then one untried;
/// then the slot at `start` (every endpoint down: traffic still flows).
fn pick(schedule: &[usize], start: usize, tried: &[usize], is_up: impl Fn(usize) -> bool) -> usize {
    let n = schedule.len();
    let walk = || (0..n).map(|step| schedule[(start + step) % n]);
    walk()
        .find(|i| !tried.contains(i) && is_up(*i))
        .or_else(|| walk().find(|i| is_up(*i)))
        .or_else(|| walk().find(|i| !tried.contains(i)))
        .unwrap_or(schedule[start % n])
}

/// A weighted round-robin order: endpoint `i` appears `weight_i` times per
/// cycle, spread out (smooth weighted round-robin, as nginx does it).
fn interleave(endpoints: &[EndpointSettings]) -> Vec<usize> {
    let weights: Vec<i64> = endpoints
        .iter()
        .map(|e| i64::from(e.weight.max(1)))
        .collect();
    let total: i64 = weights.iter().sum();
    let cycle = (total as usize).clamp(1, MAX_SCHEDULE);
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(cycle);
    for _ in 0..cycle {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        current[best] -= total;
        order.push(best);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(weight: u32) -> EndpointSettings {
        EndpointSettings {
            host: "127.0.0.1".into(),
            port: 1,
            weight,
        }
    }

    #[test]
    fn pick_skips_down_and_tried_endpoints_unless_nothing_else_is_left() {
        let schedule = interleave(&[ep(1), ep(1), ep(1)]);
        let all_up = |_| true;
        assert_eq!(pick(&schedule, 0, &[], all_up), 0);
        assert_eq!(pick(&schedule, 0, &[0], all_up), 1);
        let one_down = |i| i != 1;
        assert_eq!(pick(&schedule, 1, &[], one_down), 2);
        assert_eq!(pick(&schedule, 1, &[0, 2], one_down), 2);
        let all_down = |_| false;
        assert_eq!(pick(&schedule, 1, &[1], all_down), 2);
        assert_eq!(pick(&schedule, 1, &[0, 1, 2], all_down), 1);
    }

    #[test]
    fn smooth_weighted_order() {
        assert_eq!(interleave(&[ep(1), ep(1)]), vec![0, 1]);
        assert_eq!(interleave(&[ep(2), ep(1)]), vec![0, 1, 0]);
        let order = interleave(&[ep(5), ep(1), ep(1)]);
        assert_eq!(order.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(order.len(), 7);
    }
}
