//! A built-in OpenAI-compatible backend for tests, load benchmarks and `chatgate demo`.
//! It runs on Pingora like the gateway and answers every request locally; its behaviour
//! (reply text, chunking, delays, errors, cuts, stalls) is set by knobs, see [`knobs`].
//!
//! Endpoints: `POST <prefix>/chat/completions`, `GET /health`, `GET <prefix>/models`, and
//! for tests `GET /_sim/stats`, `GET /_sim/requests`, `POST /_sim/reset`.

pub mod knobs;
pub mod reply;
pub mod request;
mod service;
pub mod stats;
pub mod wire;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;

use reply::ReplySpec;

/// Per-process defaults for every knob plus the process-only switches.
///
/// `Default` is a plain fast echo. Each knob can be overridden per request by an
/// `x-sim-<knob>` header or a `#sim key=value ...` first line in the last user message.
#[derive(clap::Args, Clone, PartialEq, Eq)]
pub struct SimOptions {
    /// Characters per streamed content chunk.
    #[arg(long, value_name = "CHARS", default_value_t = 4, value_parser = parse_positive)]
    pub chunk_size: usize,
    /// Split the reply into exactly this many content chunks (overrides --chunk-size).
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub chunks: Option<usize>,
    /// Delay before the response header, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub first_byte_delay_ms: u64,
    /// Delay between streamed content chunks, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub chunk_delay_ms: u64,
    /// Send a role-only first chunk in streams (on|off).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = knobs::parse_switch)]
    pub role_chunk: bool,
    /// Report token usage (on|off); streams also need stream_options.include_usage.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = knobs::parse_switch)]
    pub usage: bool,
    /// Streams: send usage when include_usage asks for it (on|off; off: never, like llama.cpp).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = knobs::parse_switch)]
    pub stream_usage: bool,
    /// Answer every chat request with this HTTP status (400-599) and an OpenAI error body.
    #[arg(long, value_name = "CODE")]
    pub status: Option<u16>,
    /// Retry-After seconds to send along with --status.
    #[arg(long, value_name = "SECONDS")]
    pub retry_after: Option<u64>,
    /// Streams: after N content chunks send an error event and end the stream.
    #[arg(long, value_name = "N")]
    pub error_after: Option<usize>,
    /// Streams: after N content chunks close the connection without finishing the body.
    #[arg(long, value_name = "N")]
    pub cut_after: Option<usize>,
    /// Streams: after N content chunks go silent for --stall-ms without closing.
    #[arg(long, value_name = "N")]
    pub stall_after: Option<usize>,
    /// How long a stall lasts, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 600_000)]
    pub stall_ms: u64,
    /// Reply text: echo, lorem:<n>, newlines, multibyte or text:<literal>.
    #[arg(long, value_name = "SPEC", default_value = "echo")]
    pub reply: ReplySpec,
    /// Accept only `Authorization: Bearer <KEY>` (repeatable); others get 401.
    #[arg(long, value_name = "KEY")]
    pub require_key: Vec<String>,
    /// Answer this key with 429 and Retry-After: 1 (repeatable).
    #[arg(long, value_name = "KEY")]
    pub rate_limited_key: Vec<String>,
    /// Answer the first N chat requests with 503, then serve normally.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_first: u64,
    /// Name echoed in the `x-sim-name` response header.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            chunk_size: 4,
            chunks: None,
            first_byte_delay_ms: 0,
            chunk_delay_ms: 0,
            role_chunk: true,
            usage: true,
            stream_usage: true,
            status: None,
            retry_after: None,
            error_after: None,
            cut_after: None,
            stall_after: None,
            stall_ms: 600_000,
            reply: ReplySpec::Echo,
            require_key: Vec::new(),
            rate_limited_key: Vec::new(),
            fail_first: 0,
            name: None,
        }
    }
}

impl std::fmt::Debug for SimOptions {
    /// Like a derived `Debug`, but API keys are only counted, never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimOptions")
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunks)
            .field("first_byte_delay_ms", &self.first_byte_delay_ms)
            .field("chunk_delay_ms", &self.chunk_delay_ms)
            .field("role_chunk", &self.role_chunk)
            .field("usage", &self.usage)
            .field("stream_usage", &self.stream_usage)
            .field("status", &self.status)
            .field("retry_after", &self.retry_after)
            .field("error_after", &self.error_after)
            .field("cut_after", &self.cut_after)
            .field("stall_after", &self.stall_after)
            .field("stall_ms", &self.stall_ms)
            .field("reply", &self.reply)
            .field("require_key", &Redacted(self.require_key.len()))
            .field("rate_limited_key", &Redacted(self.rate_limited_key.len()))
            .field("fail_first", &self.fail_first)
            .field("name", &self.name)
            .finish()
    }
}

struct Redacted(usize);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} redacted>", self.0)
    }
}

fn parse_positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a whole number of at least 1, got `{value}`"
        )),
    }
}

/// Certificate and key for serving the simulator over TLS (to test verified upstream TLS).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct SimTls {
    /// PEM certificate chain; with --tls-key the simulator speaks HTTPS instead of HTTP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<String>,
}

/// A Pingora service that serves the simulator on the TCP address `listen`, over TLS when
/// `tls` names a certificate and key.
///
/// Its counters and request log belong to this service alone, so several simulators in
/// one process (e.g. several fake upstream endpoints) stay apart.
pub fn simulator_service(
    conf: &Arc<ServerConf>,
    listen: &str,
    options: SimOptions,
    tls: &SimTls,
) -> std::io::Result<impl pingora::services::Service + 'static> {
    let mut service = pingora::proxy::http_proxy_service_with_name(
        conf,
        service::Simulator::new(options),
        "chatgate simulator",
    );
    match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => service
            .add_tls(listen, cert, key)
            .map_err(|e| std::io::Error::other(format!("TLS certificate or key: {e}")))?,
        _ => service.add_tcp(listen),
    }
    Ok(service)
}

/// Runs a simulator on `listen` in its own Pingora server until the process is stopped.
///
/// Returns only when `listen` cannot be bound (checked up front, because Pingora would
/// otherwise panic inside a service thread and leave the process running deaf).
/// SIGINT stops at once; SIGTERM drains for at most a second.
pub fn run_standalone(
    listen: &str,
    options: SimOptions,
    tls: &SimTls,
) -> std::io::Result<Infallible> {
    drop(std::net::TcpListener::bind(listen)?);
    let conf = ServerConf {
        threads: 2,
        // A test backend has nothing worth a long graceful drain.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let service = simulator_service(&server.configuration, listen, options, tls)?;
    server.add_service(service);
    server.run_forever()
}
