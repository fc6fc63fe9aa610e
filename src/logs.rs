//! Where log lines go: stderr through `tracing`, as JSON lines (the default
//! when stderr is no terminal) or as text for a person (`--log-format`).
//! Lines are formatted on the request path into the formatter's reused buffer
//! and written by a background thread in batches, so a request never waits
//! for a write; when that thread falls behind, lines are dropped and counted
//! in `chatgate_log_lines_dropped_total`.
//!
//! Pingora logs through the `log` crate: its start-up chatter comes out at
//! debug level, and its ERROR line for every client that disconnects
//! mid-request, sends garbage or fails its TLS handshake becomes a debug line
//! and a count in `chatgate_client_errors_total{kind}`, with at most one
//! warning a minute saying how many there were.

mod json;
mod writer;

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use tracing_log::LogTracer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use json::JsonLine;
use writer::{BatchWriter, WriterGuard};

use crate::connections::deadline::TIMEOUT_MESSAGE;
use crate::connections::handshake::{HELLO_TIMEOUT_MESSAGE, REFUSED_MESSAGE};
use crate::metrics;

/// Shortest time between two warnings about client errors.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Bytes of lines waiting for the writer thread before new lines are dropped
/// (some 16,000 access lines).
const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Text when stderr is a terminal, JSON otherwise.
    #[default]
    Auto,
    /// One JSON object a line.
    Json,
    /// One line of text an event, for a person.
    Text,
}

impl LogFormat {
    /// `Auto` resolved against whether stderr is a terminal.
    fn resolve(self, tty: bool) -> LogFormat {
        match self {
            LogFormat::Auto if tty => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            chosen => chosen,
        }
    }
}

/// The background writer, for its count of dropped lines.
static WRITER: OnceLock<BatchWriter> = OnceLock::new();

/// Log lines dropped since start (the source of `chatgate_log_lines_dropped_total`).
pub fn lines_dropped() -> u64 {
    WRITER.get().map_or(0, BatchWriter::dropped)
}

/// Keeps the writer thread; dropping it writes the lines still queued (up to
/// a second). Hold it until the process is about to exit.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WriterGuard>,
}

/// Installs the global subscriber: `format` on stderr, `RUST_LOG` picks the
/// level (default `info`). `background: false` writes each line at once
/// instead, for processes that fork after this call (`serve --daemon`) or
/// exit without returning (`serve --test`).
pub fn init(format: LogFormat, background: bool) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let hint = filter.max_level_hint();
    let stderr = std::io::stderr();
    let tty = stderr.is_terminal();
    let format = format.resolve(tty);
    let colour = tty && std::env::var_os("NO_COLOR").is_none();
    let background = background
        .then(|| BatchWriter::start(stderr, QUEUE_BYTES))
        .and_then(Result::ok);
    let guard = if let Some((writer, guard)) = background {
        if !install(format, colour, filter, writer.clone()) {
            return LogGuard { _writer: None };
        }
        let _ = WRITER.set(writer);
        Some(guard)
    } else {
        if !install(format, colour, filter, std::io::stderr) {
            return LogGuard { _writer: None };
        }
        None
    };
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
    LogGuard { _writer: guard }
}

/// Sets the global subscriber; false if one was set already.
fn install<W>(format: LogFormat, colour: bool, filter: EnvFilter, writer: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let set = if format == LogFormat::Text {
        tracing::subscriber::set_global_default(builder.with_ansi(colour).finish())
    } else {
        tracing::subscriber::set_global_default(
            builder.with_ansi(false).event_format(JsonLine).finish(),
        )
    };
    set.is_ok()
}

/// The `log` to `tracing` bridge that quiets Pingora: start-up chatter to
/// debug, client-caused failures to debug plus a count.
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

    /// Passes `record` on at debug level.
    fn as_debug(&self, record: &Record<'_>) {
        self.inner.log(
            &Record::builder()
                .args(*record.args())
                .level(Level::Debug)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }
}

impl Log for PingoraLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn || self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !record.target().starts_with("pingora") {
            return self.inner.log(record);
        }
        if record.level() == Level::Info {
            // "Bootstrap starting", "Starting service: ...": start-up chatter.
            return self.as_debug(record);
        }
        if record.level() <= Level::Warn {
            let message = record.args().to_string();
            if let Some((kind, counted)) = client_caused(&message) {
                if !counted {
                    metrics::client_error(kind);
                }
                self.note_client_error();
                return self.as_debug(record);
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
    if message.contains(TIMEOUT_MESSAGE) || message.contains(HELLO_TIMEOUT_MESSAGE) {
        return Some(("header_timeout", true));
    }
    if message.contains(REFUSED_MESSAGE) {
        // Counted in chatgate_connections_refused_total.
        return Some(("refused", true));
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
    fn auto_is_text_on_a_terminal_only() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
    }

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
