//! Prometheus metrics: every metric chatgate exports, defined once here and
//! registered in the default registry of the `prometheus` crate that
//! `pingora-prometheus` re-exports (the one `/metrics` gathers from).
//!
//! Labels carry only configured names (route paths, upstream names, endpoint
//! `host:port`) and fixed outcome words, so cardinality is bounded and no
//! user name, token or key can ever appear in one.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use pingora_prometheus::prometheus::{
    self, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    TextEncoder,
};

/// Latency buckets in seconds, from 5 ms to 10 minutes (LLM calls are slow).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Gaps between stream events, from 1 ms to 1 minute.
const GAP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

// Metric names, help texts and labels are constants of this file, so
// registering can only fail on a programming error (a duplicate name); the
// unit tests below register every metric.
fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec!(name, help, labels).expect("metric definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register_int_gauge_vec!(name, help, labels).expect("metric definition")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    register_histogram_vec!(name, help, labels, buckets.to_vec()).expect("metric definition")
}

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_requests_total",
        "Requests answered on the public listener, by route and HTTP status.",
        &["route", "status"],
    )
});
static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "chatgate_request_duration_seconds",
        "Time from request start to the last byte of the reply, by route.",
        &["route"],
        LATENCY_BUCKETS,
    )
});
static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_upstream_requests_total",
        "Upstream attempts by outcome: ok, http_4xx, http_5xx, connect_error, timeout, cancelled.",
        &["upstream", "endpoint", "outcome"],
    )
});
static UPSTREAM_RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_upstream_retries_total",
        "Upstream attempts beyond the first of a request.",
        &["upstream"],
    )
});
static UPSTREAM_TTFB: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "chatgate_upstream_time_to_first_byte_seconds",
        "Time from starting an upstream attempt to its response header.",
        &["upstream"],
        LATENCY_BUCKETS,
    )
});
static STREAM_GAP: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "chatgate_stream_inter_event_seconds",
        "Time between consecutive pieces of a streamed answer sent to the client.",
        &["route"],
        GAP_BUCKETS,
    )
});
static ACTIVE_STREAMS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_active_streams",
        "Streamed replies in progress.",
        &["route"],
    )
});
static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_tokens_total",
        "Tokens used, by route, kind (prompt, completion) and source (upstream: reported by the upstream; estimated: counted by chatgate because the upstream reported none).",
        &["route", "kind", "source"],
    )
});
static AUTH_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_auth_attempts_total",
        "Login attempts on /auth by outcome: ok, missing, bad_credentials, rate_limited, store_error, busy.",
        &["outcome"],
    )
});
static ENDPOINT_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_upstream_endpoint_up",
        "1 while an upstream endpoint takes traffic (health check passing, not ejected), else 0.",
        &["upstream", "endpoint"],
    )
});
static OPEN_CONNECTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_open_connections",
        "Downstream connections open now, by listener (public, admin).",
        &["listener"],
    )
});
static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_connections_refused_total",
        "Connections closed at once because a cap was full, by listener and reason: max_connections, max_connections_per_ip.",
        &["listener", "reason"],
    )
});
static CLIENT_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_client_errors_total",
        "Connections a client broke, logged at debug level only, by kind: header_timeout, disconnect, read_error, write_error, bad_request, tls_handshake, other.",
        &["kind"],
    )
});
static REDIS_BREAKER_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_redis_breaker_open",
        "1 from the moment the Redis circuit breaker opens (calls fail at once) until a call succeeds again, else 0; only with a Redis credential store.",
        &[],
    )
});
/// The label values of a metric without labels.
const NO_LABELS: &[&str] = &[];
/// Batch write times of the conversation record, from 1 ms to 10 s.
const WRITE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
static CONV_WRITTEN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_conversation_log_written_total",
        "Conversation records written to PostgreSQL (replays from the spool included).",
        &[],
    )
});
static CONV_SPOOLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_conversation_log_spooled_total",
        "Conversation records put in the local spool because PostgreSQL did not take them.",
        &[],
    )
});
static CONV_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_conversation_log_dropped_total",
        "Conversation records lost, by reason: queue_full, spool_full, spool_error, spool_unreadable.",
        &["reason"],
    )
});
static CONV_QUEUED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_conversation_log_queued",
        "Conversation records in memory, waiting for the writer.",
        &[],
    )
});
static CONV_SPOOL_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_conversation_log_spool_bytes",
        "Bytes of conversation records waiting in the local spool.",
        &[],
    )
});
static CONV_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_conversation_log_up",
        "1 while the conversation record's PostgreSQL connection is open, else 0.",
        &[],
    )
});
static CONV_WRITE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "chatgate_conversation_log_write_seconds",
        "Time to write one batch of conversation records to PostgreSQL.",
        &[],
        WRITE_BUCKETS,
    )
});
static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "chatgate_build_info",
        "Always 1; the label says which chatgate version runs.",
        &["version"],
    )
});

static LOG_LINES_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "chatgate_log_lines_dropped_total",
        "Log lines dropped because the log writer thread was behind (stderr too slow)."
    )
    .expect("metric definition")
});

static TRACE_SPANS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "chatgate_trace_spans_dropped_total",
        "Finished spans not delivered to the OTLP collector: export queue full, or the export failed.",
        &["reason"],
    )
});

/// Registers every metric and sets the constant ones (build info, the auth
/// outcomes at zero); labelled series appear with their first use. Call once
/// at start-up.
pub fn init() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_REQUESTS);
    LazyLock::force(&UPSTREAM_RETRIES);
    LazyLock::force(&UPSTREAM_TTFB);
    LazyLock::force(&STREAM_GAP);
    LazyLock::force(&ACTIVE_STREAMS);
    LazyLock::force(&TOKENS);
    LazyLock::force(&ENDPOINT_UP);
    LazyLock::force(&OPEN_CONNECTIONS);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&LOG_LINES_DROPPED);
    for kind in CLIENT_ERROR_KINDS {
        CLIENT_ERRORS.with_label_values(&[kind]);
    }
    for reason in ["queue_full", "export_failed"] {
        TRACE_SPANS_DROPPED.with_label_values(&[reason]);
    }
    for outcome in AuthOutcome::ALL {
        AUTH_ATTEMPTS.with_label_values(&[outcome.as_str()]);
    }
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
}

/// The Prometheus text exposition of every registered metric.
pub fn render() -> (Vec<u8>, String) {
    sync_log_lines_dropped();
    let encoder = TextEncoder::new();
    let mut out = Vec::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    (out, encoder.format_type().to_string())
}

/// Brings `chatgate_log_lines_dropped_total` up to the log writer's own count.
fn sync_log_lines_dropped() {
    // Two scrapes at once must not both add the same difference.
    static SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SYNC.lock().unwrap_or_else(|p| p.into_inner());
    let behind = crate::logs::lines_dropped().saturating_sub(LOG_LINES_DROPPED.get());
    if behind > 0 {
        LOG_LINES_DROPPED.inc_by(behind);
    }
}

/// The `kind`s of `chatgate_client_errors_total`.
pub const CLIENT_ERROR_KINDS: [&str; 7] = [
    "header_timeout",
    "disconnect",
    "read_error",
    "write_error",
    "bad_request",
    "tls_handshake",
    "other",
];

/// Sets how many downstream connections `listener` has open.
pub fn open_connections(listener: &str, open: i64) {
    OPEN_CONNECTIONS.with_label_values(&[listener]).set(open);
}

/// A connection closed at once because a cap was full.
pub fn connection_refused(listener: &str, reason: crate::connections::Refusal) {
    CONNECTIONS_REFUSED
        .with_label_values(&[listener, reason.as_str()])
        .inc();
}

/// A failure the client caused (one of [`CLIENT_ERROR_KINDS`]).
pub fn client_error(kind: &str) {
    CLIENT_ERRORS.with_label_values(&[kind]).inc();
}

/// `n` finished spans dropped for `reason` (`queue_full` or `export_failed`).
pub fn trace_spans_dropped(reason: &'static str, n: u64) {
    TRACE_SPANS_DROPPED.with_label_values(&[reason]).inc_by(n);
}

/// Registers the conversation record's metrics (when it is configured) at zero.
pub fn conversation_log_init() {
    CONV_WRITTEN.with_label_values(NO_LABELS);
    CONV_SPOOLED.with_label_values(NO_LABELS);
    for reason in [
        "queue_full",
        "spool_full",
        "spool_error",
        "spool_unreadable",
    ] {
        CONV_DROPPED.with_label_values(&[reason]);
    }
    CONV_QUEUED.with_label_values(NO_LABELS);
    CONV_SPOOL_BYTES.with_label_values(NO_LABELS);
    CONV_UP.with_label_values(NO_LABELS);
    LazyLock::force(&CONV_WRITE);
}

/// Whether the Redis circuit breaker is open (see [`crate::breaker`]).
pub fn redis_breaker_open(open: bool) {
    REDIS_BREAKER_OPEN
        .with_label_values(NO_LABELS)
        .set(i64::from(open));
}

/// Conversation records: `n` more in the memory queue (negative: taken out).
pub fn conversation_queued(n: i64) {
    CONV_QUEUED.with_label_values(NO_LABELS).add(n);
}

/// Conversation records: a batch of `n` new rows written in `took`.
pub fn conversation_written(n: u64, took: Duration) {
    CONV_WRITTEN.with_label_values(NO_LABELS).inc_by(n);
    CONV_WRITE
        .with_label_values(NO_LABELS)
        .observe(took.as_secs_f64());
}

/// Conversation records: `n` put in the spool.
pub fn conversation_spooled(n: u64) {
    CONV_SPOOLED.with_label_values(NO_LABELS).inc_by(n);
}

/// Conversation records: `n` lost for `reason`.
pub fn conversation_dropped(reason: &str, n: u64) {
    CONV_DROPPED.with_label_values(&[reason]).inc_by(n);
}

/// Conversation records: the spool's size and whether PostgreSQL is connected.
pub fn conversation_state(spool_bytes: u64, up: bool) {
    CONV_SPOOL_BYTES
        .with_label_values(NO_LABELS)
        .set(i64::try_from(spool_bytes).unwrap_or(i64::MAX));
    CONV_UP.with_label_values(NO_LABELS).set(i64::from(up));
}

/// One finished request on the public listener.
pub fn request_done(route: &str, status: u16, duration: Duration) {
    REQUESTS
        .with_label_values(&[route, &status.to_string()])
        .inc();
    REQUEST_DURATION
        .with_label_values(&[route])
        .observe(duration.as_secs_f64());
}

/// Token usage of one request; `estimated`: counted by chatgate, not the upstream.
pub fn tokens(route: &str, prompt: u64, completion: u64, estimated: bool) {
    let source = if estimated { "estimated" } else { "upstream" };
    TOKENS
        .with_label_values(&[route, "prompt", source])
        .inc_by(prompt);
    TOKENS
        .with_label_values(&[route, "completion", source])
        .inc_by(completion);
}

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx response header arrived.
    Ok,
    /// A 4xx response.
    Http4xx,
    /// A 5xx (or other non-2xx) response.
    Http5xx,
    /// No connection, or it broke before the response header.
    ConnectError,
    /// No response header in time.
    Timeout,
    /// The client went away while the attempt was under way.
    Cancelled,
}

impl AttemptOutcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::Http4xx => "http_4xx",
            AttemptOutcome::Http5xx => "http_5xx",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a response with this status.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => AttemptOutcome::Ok,
            400..=499 => AttemptOutcome::Http4xx,
            _ => AttemptOutcome::Http5xx,
        }
    }
}

/// One upstream attempt and, when a response header came, how long it took.
pub fn upstream_attempt(
    upstream: &str,
    endpoint: &str,
    outcome: AttemptOutcome,
    first_byte: Option<Duration>,
) {
    UPSTREAM_REQUESTS
        .with_label_values(&[upstream, endpoint, outcome.as_str()])
        .inc();
    if let Some(d) = first_byte {
        UPSTREAM_TTFB
            .with_label_values(&[upstream])
            .observe(d.as_secs_f64());
    }
}

/// An attempt beyond the first for one request.
pub fn upstream_retry(upstream: &str) {
    UPSTREAM_RETRIES.with_label_values(&[upstream]).inc();
}

/// Sets whether an endpoint currently takes traffic.
pub fn endpoint_up(upstream: &str, endpoint: &str, up: bool) {
    ENDPOINT_UP
        .with_label_values(&[upstream, endpoint])
        .set(i64::from(up));
}

/// How a login attempt on `/auth` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// A token was issued.
    Ok,
    /// No usable username/password in the request.
    Missing,
    /// Unknown user, wrong password or disabled user.
    BadCredentials,
    /// Refused by a rate limit before the password was checked.
    RateLimited,
    /// The credential store could not be reached.
    StoreError,
    /// Every password hashing thread stayed busy for the queue timeout (a login flood).
    Busy,
}

impl AuthOutcome {
    const ALL: [AuthOutcome; 6] = [
        AuthOutcome::Ok,
        AuthOutcome::Missing,
        AuthOutcome::BadCredentials,
        AuthOutcome::RateLimited,
        AuthOutcome::StoreError,
        AuthOutcome::Busy,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Missing => "missing",
            AuthOutcome::BadCredentials => "bad_credentials",
            AuthOutcome::RateLimited => "rate_limited",
            AuthOutcome::StoreError => "store_error",
            AuthOutcome::Busy => "busy",
        }
    }
}

/// Counts one login attempt.
pub fn auth_attempt(outcome: AuthOutcome) {
    AUTH_ATTEMPTS.with_label_values(&[outcome.as_str()]).inc();
}

/// Counts a streamed reply as active until dropped, and times the gaps
/// between the pieces sent; dropping it on any exit path (finish, failure,
/// client gone, panic) brings the gauge back down.
pub struct ActiveStream {
    route: String,
    last_sent: Instant,
}

impl ActiveStream {
    /// Starts counting a stream on `route`.
    pub fn start(route: &str) -> Self {
        ACTIVE_STREAMS.with_label_values(&[route]).inc();
        ActiveStream {
            route: route.to_string(),
            last_sent: Instant::now(),
        }
    }

    /// Records that a piece of the answer was just sent to the client.
    pub fn sent(&mut self) {
        let now = Instant::now();
        STREAM_GAP
            .with_label_values(&[self.route.as_str()])
            .observe(now.duration_since(self.last_sent).as_secs_f64());
        self.last_sent = now;
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        ACTIVE_STREAMS
            .with_label_values(&[self.route.as_str()])
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> String {
        String::from_utf8(render().0).unwrap_or_default()
    }

    #[test]
    fn active_stream_gauge_returns_to_zero_on_drop() {
        init();
        {
            let mut s = ActiveStream::start("/unit-test-stream");
            s.sent();
            assert!(scrape().contains("chatgate_active_streams{route=\"/unit-test-stream\"} 1"));
        }
        assert!(scrape().contains("chatgate_active_streams{route=\"/unit-test-stream\"} 0"));
    }

    #[test]
    fn every_metric_is_listed_after_init() {
        init();
        let text = scrape();
        for name in [
            "chatgate_build_info{version=",
            "chatgate_auth_attempts_total{outcome=\"rate_limited\"} ",
            "chatgate_client_errors_total{kind=\"header_timeout\"} ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn status_outcomes() {
        assert_eq!(AttemptOutcome::of_status(204), AttemptOutcome::Ok);
        assert_eq!(AttemptOutcome::of_status(429), AttemptOutcome::Http4xx);
        assert_eq!(AttemptOutcome::of_status(503), AttemptOutcome::Http5xx);
    }
}
