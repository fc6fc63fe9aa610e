//! `chatgate demo`: the whole seed flow on one machine with nothing else
//! installed — an in-memory user store holding the seed's example account, a
//! random JWT secret, and the built-in simulator as the upstream.

use std::sync::Arc;

use rand::RngCore;

use crate::auth::password::{PasswordParams, Passwords};
use crate::auth::store::file::FileStore;
use crate::auth::store::CredentialStore;
use crate::chat::DataFormat;
use crate::config::{
    parse_host_port, AuthSettings, Config, CredentialSettings, EndpointSettings, Limits, Listener,
    RouteKind, RouteSettings, Secret, ServerSettings, UpstreamSettings,
};
use crate::server::{self, Extras, ProcessFlags};
use crate::simulator::{simulator_service, SimOptions, SimTls};

/// The seed document's example account.
const DEMO_USER: &str = "temporary_user";
const DEMO_PASSWORD: &str = "default_password";
/// The seed document's per-route system prompt.
const SYSTEM_PROMPT: &str = "You are the openEuler community assistant, your name is XiaoZhi.";

/// Options of `chatgate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Address of the operations listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: String,
    /// Address of the built-in simulator the chat routes use.
    #[arg(long, default_value = "127.0.0.1:18000")]
    simulator_listen: String,
    #[command(flatten)]
    pub(super) log: super::LogArgs,
}

/// Runs the demo; returns the exit code if it stops.
pub fn run(args: DemoArgs) -> i32 {
    let prepared = demo_config(&args).and_then(|c| Ok((demo_store(c.auth.password)?, c)));
    let (store, config) = match prepared {
        Ok(pair) => pair,
        Err(e) => return super::fail(&e),
    };
    banner(&args.listen);
    let conf = Arc::new(config.server.server_conf());
    let sim = match simulator_service(
        &conf,
        &args.simulator_listen,
        SimOptions::default(),
        &SimTls::default(),
    ) {
        Ok(sim) => sim,
        Err(e) => return super::fail(&format!("simulator: {e}")),
    };
    let extras = Extras {
        services: vec![Box::new(sim)],
        store: Some(store),
    };
    match server::run(config, ProcessFlags::default(), extras) {
        Ok(()) => 0,
        Err(e) => super::fail(&e),
    }
}

fn demo_config(args: &DemoArgs) -> Result<Config, String> {
    let mut secret = vec![0u8; 48];
    rand::rng().fill_bytes(&mut secret);
    let (sim_host, sim_port) = parse_host_port(&args.simulator_listen)?;
    let mut upstream = UpstreamSettings::with_defaults(
        "simulator",
        vec![EndpointSettings {
            host: sim_host,
            port: sim_port,
            weight: 1,
        }],
    );
    upstream.retries = 1;
    let route = |path: &str, kind| RouteSettings {
        path: path.into(),
        kind,
        upstream: 0,
        model: "chatgate-simulator".into(),
        allowed_models: Vec::new(),
        system_prompt: Some(SYSTEM_PROMPT.into()),
        params: serde_json::Map::new(),
        data_format: DataFormat::Text,
        keepalive_interval: std::time::Duration::from_secs(15),
        max_body_bytes: Limits::default().max_body_bytes,
        body_timeout: Limits::default().body_timeout,
        rate_limits: crate::limits::ChatLimits::default(),
        completion_estimate: crate::limits::LimitSettings::default().completion_estimate,
        conversation_log: false,
    };
    for addr in [&args.listen, &args.admin_listen, &args.simulator_listen] {
        addr.parse::<std::net::SocketAddr>()
            .map_err(|_| format!("{addr:?} is not an IP:port address"))?;
    }
    let password = PasswordParams::default();
    Ok(Config {
        tracing: None,
        source: "<demo>".into(),
        listen: vec![Listener::plain(args.listen.as_str())],
        admin_listen: Some(args.admin_listen.clone()),
        server: ServerSettings {
            threads: 2,
            pid_file: "/tmp/chatgate-demo.pid".into(),
            upgrade_sock: "/tmp/chatgate-demo-upgrade.sock".into(),
            grace_period_seconds: 1,
            graceful_shutdown_timeout_seconds: 1,
            ..ServerSettings::default()
        },
        rate_limits: crate::limits::LimitSettings::default(),
        limits: Limits::default(),
        trusted_proxies: Vec::new(),
        conversation_log: None,
        auth: AuthSettings {
            token_ttl: std::time::Duration::from_secs(7 * 86400),
            algorithm: crate::auth::token::TokenAlgorithm::HS256,
            secret: Secret::new(secret),
            previous_secrets: Vec::new(),
            jwt_leeway: crate::auth::token::DEFAULT_LEEWAY,
            password,
            hash_concurrency: 1,
            hash_queue_timeout: crate::auth::password::DEFAULT_QUEUE_TIMEOUT,
            user_cache_ttl: std::time::Duration::from_secs(5),
            on_store_error: crate::limits::OnStoreError::Allow,
            credentials: CredentialSettings::Memory,
        },
        upstreams: vec![Arc::new(upstream)],
        routes: vec![
            route("/chatCompletion", RouteKind::Chat),
            route("/chatCompletionStream", RouteKind::ChatStream),
        ],
        cors: None,
    })
}

/// The in-memory store holding the seed's example account.
fn demo_store(password: PasswordParams) -> Result<Arc<dyn CredentialStore>, String> {
    let store = FileStore::in_memory();
    let hash = Passwords::hash_blocking(&password, DEMO_PASSWORD).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime
        .block_on(store.create_user(DEMO_USER, &hash))
        .map_err(|e| format!("cannot create the demo user: {e}"))?;
    Ok(Arc::new(store))
}

fn banner(listen: &str) {
    let port = listen.rsplit(':').next().unwrap_or("8080");
    eprintln!(
        r#"
================================================================================
 chatgate DEMO MODE — for trying it out only. Users live in memory, the JWT
 secret is random and dies with the process, the upstream is the built-in
 simulator (it echoes your last message). Never expose this to a network.
================================================================================
 Try it:
   TOKEN=$(curl -s -F username={DEMO_USER} -F password={DEMO_PASSWORD} localhost:{port}/auth | sed 's/.*"accessToken": *"\([^"]*\)".*/\1/')
   curl -s localhost:{port}/chatCompletion -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d '[{{"role":"user","Content":"What is your name."}}]'
   curl -sN localhost:{port}/chatCompletionStream -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d '[{{"role":"user","Content":"Hello, XiaoZhi."}}]'
"#
    );
}
