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
use crate::connections::handshake::HandshakeGate;
use crate::connections::{self, ConnectionLimits, Guarded, MemoryTrimmer};
use crate::gateway::admin::AdminApp;
use crate::gateway::client_ip::TrustedProxies;
use crate::gateway::drain::{DrainWatch, Draining};
use crate::gateway::framing::FramingGuard;
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
        let public = config.listen.iter().map(|l| &l.address);
        for addr in public.chain(config.admin_listen.iter()) {
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
    if let Some(settings) = &config.tracing {
        crate::traces::init(settings)?;
    }
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
    let limits = &config.limits;
    let max_connections = limits.max_connections.unwrap_or_else(|| {
        connections::default_max_connections(
            connections::fd_soft_limit(),
            config.server.upstream_keepalive_pool_size,
        )
    });
    tracing::info!(
        max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        "connection caps"
    );
    let public_limits = Arc::new(ConnectionLimits::new(
        "public",
        max_connections,
        limits.max_connections_per_ip,
        TrustedProxies::new(config.trusted_proxies.clone()),
    ));
    let admin_limits = Arc::new(ConnectionLimits::new(
        "admin",
        connections::ADMIN_MAX_CONNECTIONS,
        0,
        TrustedProxies::default(),
    ));
    server.add_service(background_service(
        "memory trim",
        MemoryTrimmer::new(vec![public_limits.clone(), admin_limits.clone()]),
    ));
    let mut proxy = Service::new(
        "chatgate".to_string(),
        Guarded::new(
            // FramingGuard: Pingora's own empty 400s get the contract's JSON (see framing).
            FramingGuard::new(pingora::proxy::http_proxy(&server.configuration, gateway)),
            public_limits.clone(),
            limits.header_timeout,
        ),
    );
    // TLS connections are capped, and must send their ClientHello in time, before
    // Pingora's handshake (which would otherwise wait up to 60 s outside every cap).
    proxy
        .endpoints()
        .set_pre_tls_callback(Arc::new(HandshakeGate::new(
            public_limits,
            limits.header_timeout,
        )));
    for listener in &config.listen {
        // No L4 read buffer: Pingora's default is a 64 KiB zero-filled buffer per client
        // connection (measured ~90 KB RSS per open stream), while the HTTP/1 session already
        // reads headers and bodies into buffers of its own (and rustls into its own).
        let mut endpoint = ListenerConfig::tcp(listener.address.as_str())
            .l4_buffer(L4BufferSettings::default().read(0));
        if let Some(tls) = &listener.tls {
            let cert = tls
                .cert
                .as_ref()
                .ok_or_else(|| format!("listener {}: certificate not loaded", listener.address))?;
            endpoint = endpoint.tls(cert.tls_settings()?);
        }
        proxy.add_listener(endpoint);
    }
    server.add_service(proxy);

    if let Some(addr) = &config.admin_listen {
        let mut admin = Service::new(
            "chatgate admin".to_string(),
            Guarded::new(
                AdminApp::new(store, admin_routes, upstreams.clone()),
                admin_limits,
                config.limits.header_timeout,
            ),
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
    let listen: Vec<String> = config.listen.iter().map(|l| l.to_string()).collect();
    tracing::info!(listen = ?listen, admin = ?config.admin_listen, routes = config.routes.len(), "chatgate starting");
    // `run` returns once the server has stopped (unlike `run_forever`, which
    // exits), so the caller can write the queued log lines first.
    server.run(pingora::server::RunArgs::default());
    tracing::info!("chatgate stopped");
    Ok(())
}
