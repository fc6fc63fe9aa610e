//! Where log lines go: JSON on stderr through `tracing`. Pingora logs through
//! the `log` crate, one ERROR line for every client that disconnects mid-request,
//! sends garbage or fails its TLS handshake, so a flood of hostile clients
//! floods the log. The bridge here turns those lines into debug lines and a
//! count in `chatgate_client_errors_total{kind}`, with at most one warning a
//! minute saying how many there were; every other record passes unchanged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use tracing_log::LogTracer;

use crate::connections::deadline::TIMEOUT_MESSAGE;
use crate::metrics;

/// Shortest time between two warnings about client errors.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// JSON log lines on stderr; `RUST_LOG` picks the level (default `info`).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let hint = filter.max_level_hint();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return;
    }
    // Warnings and errors always reach the bridge, to be counted.
    let max = match hint.map(|h| h.into_level()) {
        Some(Some(tracing::Level::TRACE)) => LevelFilter::Trace,
        Some(Some(tracing::Level::DEBUG)) => LevelFilter::Debug,
        Some(Some(tracing::Level::INFO)) | None => LevelFilter::Info,
        _ => LevelFilter::Warn,
    };
    if log::set_boxed_logger(Box::new(PingoraLog::new())).is_ok() {
        log::set_max_level(max);
    }
}

/// The `log` to `tracing` bridge that quiets client-caused failures.
struct PingoraLog {
    inner: LogTracer,
    /// When the last warning went out, and client errors since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl PingoraLog {
    fn new() -> Self {
        PingoraLog {
            inner: LogTracer::new(),
            warned: Mutex::new((None, 0)),
        }
    }

    fn note_client_error(&self) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        warned.1 += 1;
        let now = Instant::now();
        if warned
            .0
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            return;
        }
        let count = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        drop(warned);
        tracing::warn!(
            target: "chatgate::client_errors",
            count,
            "client-caused connection errors (disconnects, garbage, slow headers) are logged at debug level; see chatgate_client_errors_total; at most one of these warnings a minute"
        );
    }
}

impl Log for PingoraLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn || self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if record.level() <= Level::Warn && record.target().starts_with("pingora") {
            let message = record.args().to_string();
            if let Some((kind, counted)) = client_caused(&message) {
                if !counted {
                    metrics::client_error(kind);
                }
                self.note_client_error();
                self.inner.log(
                    &Record::builder()
                        .args(format_args!("{message}"))
                        .level(Level::Debug)
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .build(),
                );
                return;
            }
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Whether a Pingora error line is about a client's failure: its
/// `chatgate_client_errors_total` kind, and whether it was counted already
/// (header timeouts are counted where they happen).
pub fn client_caused(message: &str) -> Option<(&'static str, bool)> {
    const DOWNSTREAM: &[&str] = &[
        "HTTP server fails to read from downstream",
        "HTTP server fails to write to downstream",
        "HTTP server fails to finish the request",
        "failed to send error response to downstream",
        "H2 handshake error",
    ];
    if message.contains(TIMEOUT_MESSAGE) {
        return Some(("header_timeout", true));
    }
    if message.starts_with("Downstream handshake") {
        return Some(("tls_handshake", false));
    }
    // Pingora's errors print their source first: "Fail to proxy: Downstream ReadError ...".
    let downstream = message
        .split_once(": ")
        .is_some_and(|(_, rest)| rest.starts_with("Downstream "));
    if !downstream && !DOWNSTREAM.iter().any(|p| message.starts_with(p)) {
        return None;
    }
    let has = |s: &str| message.contains(s);
    let kind = if has("ConnectionClosed")
        || has("reset by peer")
        || has("Broken pipe")
        || has("closed connection")
    {
        "disconnect"
    } else if has("InvalidHTTPHeader") || has("H1Error") || has("H2Error") || has("H2 handshake") {
        "bad_request"
    } else if has("ReadError") || has("ReadTimedout") || has("fails to read") {
        "read_error"
    } else if has("WriteError") || has("WriteTimedout") || has("write") {
        "write_error"
    } else {
        "other"
    };
    Some((kind, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_lines_about_clients_are_classified() {
        for (line, kind) in [
            (
                "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 5, downstream session type: HTTP/1.1",
                "disconnect",
            ),
            (
                "Fail to proxy: Downstream ReadError context: while reading request headers cause: Connection reset by peer (os error 104), downstream session type: HTTP/1.1",
                "disconnect",
            ),
            (
                "Fail to proxy: Downstream InvalidHTTPHeader context: buf: GET /\\x00",
                "bad_request",
            ),
            (
                "HTTP server fails to read from downstream: Downstream ReadError context: while reading request headers",
                "read_error",
            ),
            (
                "failed to send error response to downstream: Downstream WriteError cause: Broken pipe (os error 32)",
                "disconnect",
            ),
            (
                "Downstream handshake error from 127.0.0.1:5555: TLSHandshakeFailure",
                "tls_handshake",
            ),
        ] {
            assert_eq!(client_caused(line), Some((kind, false)), "{line}");
        }
        let timeout = format!(
            "Fail to proxy: Downstream ReadError context: while reading request headers cause: {TIMEOUT_MESSAGE}"
        );
        assert_eq!(client_caused(&timeout), Some(("header_timeout", true)));
    }

    #[test]
    fn other_pingora_lines_pass_unchanged() {
        for line in [
            "Fail to proxy: Upstream ConnectTimedout context: connecting to 10.0.0.1:80",
            "Fail to proxy: Internal InternalError context: chatgate answers every request locally",
            "Accept() failed Too many open files",
            "shutdown_signal error",
        ] {
            assert_eq!(client_caused(line), None, "{line}");
        }
    }
}
