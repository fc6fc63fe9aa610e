//! Assembling the Pingora server from a validated [`Config`]: the public
//! gateway service, the admin listener, background DNS refresh and health
//! checks, and any extra services (the demo's simulator).

use std::sync::Arc;

use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::Opt;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;

use crate::auth::store::CredentialStore;
use crate::auth::{open_store_shared, Authenticator};
use crate::config::Config;
use crate::gateway::admin::AdminApp;
use crate::gateway::client_ip::TrustedProxies;
use crate::gateway::drain::{DrainWatch, Draining};
use crate::gateway::{ChatRoute, Gateway};
use crate::limits::{Limiter, UsageWriter};
use crate::upstream::health::HealthChecker;
use crate::upstream::resolve::DnsRefresher;
use crate::upstream::Upstream;

/// Pingora's process switches, passed through from `chatgate serve`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFlags {
    /// Take over the listeners of a running instance (graceful upgrade).
    pub upgrade: bool,
    /// Run in the background.
    pub daemon: bool,
    /// Check that the server can start, then exit.
    pub test: bool,
}

/// What a caller adds to the configured services.
#[derive(Default)]
pub struct Extras {
    /// More services to run in the same process (the demo's simulator).
    pub services: Vec<Box<dyn ServiceWithDependents>>,
    /// A ready credential store to use instead of opening the configured one.
    pub store: Option<Arc<dyn CredentialStore>>,
}

/// Builds every service and runs the server until it is told to stop.
pub fn run(config: Config, flags: ProcessFlags, extras: Extras) -> Result<(), String> {
    if !flags.upgrade {
        // Pingora reports a busy port only inside a service task and keeps
        // running without the listener; refuse to start instead.
        for addr in config.listen.iter().chain(config.admin_listen.iter()) {
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        }
    }
    let opt = Opt {
        upgrade: flags.upgrade,
        daemon: flags.daemon,
        test: flags.test,
        nocapture: false,
        conf: None,
    };
    crate::metrics::init();
    let mut server = Server::new_with_opt_and_conf(opt, config.server.server_conf());
    server.bootstrap();

    let (store, shared_redis) = match extras.store {
        Some(store) => (store, None),
        None => open_store_shared(&config.auth.credentials)
            .map_err(|e| format!("credential store: {e}"))?,
    };
    let limiter = Arc::new(Limiter::new(config.rate_limits.clone(), shared_redis));
    let usage_writer = UsageWriter::new(limiter.clone());
    if usage_writer.is_needed() {
        server.add_service(background_service("usage writer", usage_writer));
    }
    let auth = Arc::new(Authenticator::new(&config.auth, store.clone())?);
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| {
            Arc::new(Upstream::new(
                u.clone(),
                config.server.upstream_keepalive_pool_size,
            ))
        })
        .collect();
    let routes: Vec<ChatRoute> = config
        .routes
        .iter()
        .map(|r| ChatRoute {
            settings: r.clone(),
            upstream: upstreams[r.upstream].clone(),
            include_usage: upstreams[r.upstream].settings.stream_usage,
        })
        .collect();
    let admin_routes = routes
        .iter()
        .map(|r| (r.settings.path.clone(), r.upstream.clone()))
        .collect();

    let draining = Draining::default();
    server.add_service(background_service(
        "drain watch",
        DrainWatch::new(server.watch_execution_phase(), draining.clone()),
    ));
    let conversation_log = config.conversation_log.clone().map(|settings| {
        let (log, writer) = crate::conversations::ConversationLog::new(settings);
        server.add_service(background_service("conversation log", writer));
        Arc::new(log)
    });
    let mut gateway = Gateway::new(
        auth,
        routes,
        config.limits,
        config.cors.clone(),
        draining,
        limiter,
        TrustedProxies::new(config.trusted_proxies.clone()),
    );
    if let Some(log) = conversation_log {
        gateway = gateway.with_conversation_log(log);
    }
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "chatgate");
    for addr in &config.listen {
        // No L4 read buffer: Pingora's default is a 64 KiB zero-filled buffer per client
        // connection (measured ~90 KB RSS per open stream), while the HTTP/1 session already
        // reads headers and bodies into buffers of its own.
        proxy.add_listener(
            ListenerConfig::tcp(addr.as_str()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    server.add_service(proxy);

    if let Some(addr) = &config.admin_listen {
        let mut admin = Service::new(
            "chatgate admin".to_string(),
            AdminApp::new(store, admin_routes, upstreams.clone()),
        );
        admin.add_tcp(addr);
        server.add_service(admin);
    }
    let checker = HealthChecker::new(upstreams.clone());
    if checker.is_needed() {
        server.add_service(background_service("health checks", checker));
    }
    let refresher = DnsRefresher::new(upstreams);
    if refresher.is_needed() {
        server.add_service(background_service("dns refresh", refresher));
    }
    for service in extras.services {
        server.add_boxed_service(service);
    }
    tracing::info!(listen = ?config.listen, admin = ?config.admin_listen, routes = config.routes.len(), "chatgate starting");
    server.run_forever();
}
