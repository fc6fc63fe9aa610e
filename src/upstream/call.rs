//! One chat-completions call to an upstream: endpoint and key choice, connect,
//! send, wait for the response header, and retry with backoff on connect
//! errors, first-byte timeouts, 429 and 5xx — always before the client has
//! received a byte, because the caller only gets a response once it is 2xx.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body_util::Full;
use hyper::body::Incoming;
use rand::Rng;

use super::conn::{Body, Conn};
use super::keys::PickedKey;
use super::Upstream;
use crate::chat::reply::upstream_error_message;
use crate::metrics::{self, AttemptOutcome};
use crate::traces::{AttemptSpan, CallTrace};

/// Largest upstream error body read to extract its message.
const ERROR_BODY_LIMIT: usize = 64 << 10;
/// Longest `Retry-After` honoured between attempts.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// How long idle pooled upstream connections are kept.
pub(super) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an upstream call failed; the Display text is the `<error>` part of
/// `Failed with chatbot.ChatCompletion: <error>`, and never holds a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// No TCP/TLS connection could be made (or the address is unknown).
    Connect { endpoint: String, cause: String },
    /// The upstream did not answer in time.
    Timeout { what: &'static str, after: Duration },
    /// The upstream answered with a non-2xx status.
    Status {
        status: u16,
        message: Option<String>,
    },
    /// The connection broke or the reply could not be read.
    Broken(String),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect { endpoint, cause } => {
                write!(f, "cannot connect to upstream {endpoint}: {cause}")
            }
            UpstreamError::Timeout { what, after } => {
                write!(
                    f,
                    "upstream timed out {what} (after {})",
                    humantime::format_duration(*after)
                )
            }
            UpstreamError::Status { status, message } => {
                let reason = http::StatusCode::from_u16(*status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                let status_line = if reason.is_empty() {
                    status.to_string()
                } else {
                    format!("{status} {reason}")
                };
                if matches!(status, 401 | 403) {
                    // What a backend says about a rejected key is about the key: fixed wording.
                    return write!(
                        f,
                        "upstream rejected the gateway's credentials ({status_line})"
                    );
                }
                write!(f, "upstream returned {status_line}")?;
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            UpstreamError::Broken(cause) => write!(f, "{cause}"),
        }
    }
}

/// A 2xx upstream response whose body has not been read yet.
pub struct OpenResponse {
    body: Incoming,
    /// Its connection; closed when this is dropped unless [`Upstream::release`]d.
    conn: Conn,
    content_type: Option<HeaderValue>,
    status: u16,
    /// The body was read to its end.
    done: bool,
    /// Index of the endpoint that answered.
    pub endpoint: usize,
    /// How many attempts it took (1 = no retry).
    pub attempts: u32,
    /// When the response header arrived.
    pub first_byte_at: Instant,
    /// The answering attempt's client span, still open (tracing on).
    pub span: Option<crate::traces::AnsweredSpan>,
}

impl OpenResponse {
    /// The next piece of the body; `None` at its clean end.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            match self.conn.frame(&mut self.body).await {
                None => {
                    self.done = true;
                    return Ok(None);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Ok(Some(data)),
                    // Empty pieces and trailers carry nothing for the client.
                    _ => continue,
                },
                Some(Err(e)) => {
                    return Err(UpstreamError::Broken(format!(
                        "upstream connection failed: {}",
                        hyper_cause(&e)
                    )))
                }
            }
        }
    }

    /// The whole body, bounded in size and in idle time between reads.
    pub async fn read_all(
        &mut self,
        limit: usize,
        idle: Duration,
        deadline: Instant,
    ) -> Result<Bytes, UpstreamError> {
        let mut body = BytesMut::new();
        loop {
            let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
            let chunk = tokio::time::timeout(wait, self.read_chunk())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    what: "while sending the reply",
                    after: wait,
                })??;
            match chunk {
                Some(c) => {
                    if body.len() + c.len() > limit {
                        return Err(UpstreamError::Broken(format!(
                            "upstream reply exceeds {limit} bytes"
                        )));
                    }
                    body.extend_from_slice(&c);
                }
                None => return Ok(body.freeze()),
            }
        }
    }

    /// The response's status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The response's `Content-Type`, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_ref().and_then(|v| v.to_str().ok())
    }
}

impl UpstreamError {
    /// The `outcome` label of an attempt that failed this way.
    pub fn outcome(&self) -> AttemptOutcome {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Broken(_) => {
                AttemptOutcome::ConnectError
            }
            UpstreamError::Timeout { .. } => AttemptOutcome::Timeout,
            UpstreamError::Status { status, .. } => AttemptOutcome::of_status(*status),
        }
    }
}

/// Accounts for one attempt in the metrics and the endpoint's passive health;
/// dropped unfinished (the client went away mid-attempt) it counts as cancelled.
struct AttemptRecord<'u> {
    upstream: &'u Upstream,
    endpoint: usize,
    started: Instant,
    finished: bool,
}

impl<'u> AttemptRecord<'u> {
    fn start(upstream: &'u Upstream, endpoint: usize) -> Self {
        AttemptRecord {
            upstream,
            endpoint,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(mut self, outcome: AttemptOutcome, first_byte_at: Option<Instant>) {
        self.finished = true;
        let e = &self.upstream.endpoints[self.endpoint];
        let ttfb = first_byte_at.map(|t| t.saturating_duration_since(self.started));
        metrics::upstream_attempt(self.upstream.name(), &e.label, outcome, ttfb);
        e.health.observe_attempt(outcome);
    }
}

impl Drop for AttemptRecord<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let e = &self.upstream.endpoints[self.endpoint];
            metrics::upstream_attempt(
                self.upstream.name(),
                &e.label,
                AttemptOutcome::Cancelled,
                None,
            );
        }
    }
}

/// What an attempt sends besides the body: the reply's request id and trace context.
struct Outgoing<'a> {
    request_id: &'a str,
    trace_headers: &'a [(&'static str, String)],
}

/// Why one attempt failed and what that means for the next.
struct AttemptFailure {
    error: UpstreamError,
    retryable: bool,
    retry_after: Option<Duration>,
    /// The key was refused (401/403) or throttled (429): rest it.
    blame_key: bool,
}

impl Upstream {
    /// Sends a chat-completions request body and waits for a 2xx response
    /// header, retrying as configured within `deadline`.
    pub async fn open(
        &self,
        body: &Bytes,
        stream: bool,
        deadline: Instant,
        call: &CallTrace<'_>,
    ) -> Result<OpenResponse, UpstreamError> {
        let s = &self.settings;
        let mut tried: Vec<usize> = Vec::new();
        let mut last_key: Option<usize> = None;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let endpoint = self.pick_endpoint(&tried);
            let key = self.keys.pick(last_key);
            if attempt > 1 {
                metrics::upstream_retry(&s.name);
            }
            let record = AttemptRecord::start(self, endpoint);
            let e = &self.endpoints[endpoint].settings;
            let span = AttemptSpan::start(call, &e.host, e.port, attempt);
            let sent = Outgoing {
                request_id: call.request_id,
                trace_headers: &span.headers,
            };
            let failure = match self
                .attempt(endpoint, key, body, stream, deadline, &sent)
                .await
            {
                Ok(mut open) => {
                    record.finish(AttemptOutcome::Ok, Some(open.first_byte_at));
                    open.attempts = attempt;
                    let status = open.status();
                    open.span = span.answered(open.first_byte_at, status, stream);
                    return Ok(open);
                }
                Err(f) => {
                    let outcome = f.error.outcome();
                    record.finish(outcome, None);
                    let status = match &f.error {
                        UpstreamError::Status { status, .. } => Some(*status),
                        _ => None,
                    };
                    span.failed(outcome.as_str(), status);
                    f
                }
            };
            if let (true, Some(k)) = (failure.blame_key, key) {
                let rest = failure
                    .retry_after
                    .unwrap_or(s.key_cooldown)
                    .max(s.key_cooldown);
                self.keys.cool_down(k.index, rest);
            }
            tracing::debug!(upstream = %s.name, endpoint = %self.endpoints[endpoint].label, attempt, error = %failure.error, "upstream attempt failed");
            if !tried.contains(&endpoint) {
                tried.push(endpoint);
            }
            last_key = key.map(|k| k.index);
            if !failure.retryable || attempt > s.retries {
                return Err(failure.error);
            }
            let pause = backoff(
                s.retry_backoff,
                s.retry_backoff_max,
                attempt,
                failure.retry_after,
            );
            if Instant::now() + pause >= deadline {
                return Err(failure.error);
            }
            tokio::time::sleep(pause).await;
        }
    }

    fn request(
        &self,
        endpoint: usize,
        key: Option<PickedKey<'_>>,
        body: &Bytes,
        stream: bool,
        sent: &Outgoing<'_>,
    ) -> Result<http::Request<Body>, http::Error> {
        let mut req = http::Request::post(self.chat_path.as_str())
            .header(
                http::header::HOST,
                self.endpoints[endpoint].host_header.as_str(),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(
                http::header::ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .header(
                http::header::USER_AGENT,
                concat!("chatgate/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(k) = key {
            req = req.header(http::header::AUTHORIZATION, k.authorization);
        }
        req = req.header("X-Request-Id", sent.request_id);
        for (name, value) in sent.trace_headers {
            req = req.header(*name, value.as_str());
        }
        req.body(Full::new(body.clone()))
    }

    /// A pooled connection to `endpoint` ready for a request, or a new one.
    async fn connection(&self, endpoint: usize, wait: Duration) -> Result<Conn, String> {
        while let Some(mut conn) = self.pool.take(endpoint) {
            // Ready at once unless the previous response's end is still being
            // processed; an error means the server closed it while idle.
            if let Ok(Ok(())) = tokio::time::timeout(wait, conn.ready()).await {
                return Ok(conn);
            }
        }
        self.fresh_connection(endpoint, wait).await
    }

    async fn attempt(
        &self,
        endpoint: usize,
        key: Option<PickedKey<'_>>,
        body: &Bytes,
        stream: bool,
        deadline: Instant,
        sent: &Outgoing<'_>,
    ) -> Result<OpenResponse, AttemptFailure> {
        let s = &self.settings;
        let label = &self.endpoints[endpoint].label;
        let connect_failure = |cause: String| AttemptFailure {
            error: UpstreamError::Connect {
                endpoint: label.clone(),
                cause,
            },
            retryable: true,
            retry_after: None,
            blame_key: false,
        };
        // A pooled connection may have been closed by the server while idle;
        // such a failure gets one fresh connection without counting as an attempt.
        let mut fresh_tries = 0;
        let (conn, response, first_byte_at) = loop {
            let req = self
                .request(endpoint, key, body, stream, sent)
                .map_err(|e| connect_failure(format!("cannot build request: {e}")))?;
            let connect_wait =
                (s.connect_timeout * 2).min(deadline.saturating_duration_since(Instant::now()));
            let mut conn = if fresh_tries == 0 {
                self.connection(endpoint, connect_wait).await
            } else {
                self.fresh_connection(endpoint, connect_wait).await
            }
            .map_err(connect_failure)?;
            let wait = s
                .first_byte_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, conn.send(req)).await {
                Ok(Ok(response)) => break (conn, response, Instant::now()),
                Ok(Err(e)) if conn.reused && fresh_tries == 0 => {
                    tracing::debug!(error = %hyper_cause(&e), "pooled upstream connection failed; retrying on a fresh one");
                    fresh_tries += 1;
                    continue;
                }
                Ok(Err(e)) => {
                    return Err(AttemptFailure {
                        error: UpstreamError::Broken(format!(
                            "upstream connection failed before the reply: {}",
                            hyper_cause(&e)
                        )),
                        retryable: true,
                        retry_after: None,
                        blame_key: false,
                    })
                }
                Err(_) => {
                    return Err(AttemptFailure {
                        error: UpstreamError::Timeout {
                            what: "waiting for the first byte",
                            after: wait,
                        },
                        retryable: true,
                        retry_after: None,
                        blame_key: false,
                    })
                }
            }
        };
        let (head, body) = response.into_parts();
        let status = head.status.as_u16();
        let retry_after = head
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(RETRY_AFTER_CAP));
        let mut open = OpenResponse {
            body,
            conn,
            // Copied: hyper's header values are slices of its first read buffer, and
            // a clone would keep that whole buffer (4 KiB) for as long as a stream is open.
            content_type: head
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()),
            status,
            done: false,
            endpoint,
            attempts: 1,
            first_byte_at,
            span: None,
        };
        if (200..300).contains(&status) {
            return Ok(open);
        }
        let idle = Duration::from_secs(5).min(s.first_byte_timeout);
        let message = match open.read_all(ERROR_BODY_LIMIT, idle, deadline).await {
            Ok(body) => {
                self.release(open).await;
                // 401/403 are told in fixed words; other messages lose every key first.
                upstream_error_message(&body)
                    .filter(|_| !matches!(status, 401 | 403))
                    .map(|m| self.redact(&m))
            }
            Err(_) => None,
        };
        Err(AttemptFailure {
            error: UpstreamError::Status { status, message },
            retryable: status == 429
                || status >= 500
                || ((status == 401 || status == 403) && self.keys.len() > 1),
            retry_after,
            blame_key: matches!(status, 401 | 403 | 429),
        })
    }

    /// A new connection to `endpoint`, bypassing the pool.
    async fn fresh_connection(&self, endpoint: usize, wait: Duration) -> Result<Conn, String> {
        let e = &self.endpoints[endpoint];
        let addr = e
            .socket_addr()
            .ok_or_else(|| "host name not resolved".to_string())?;
        let tcp_wait = self.settings.connect_timeout.min(wait);
        tokio::time::timeout(
            wait,
            self.connector.connect(endpoint, addr, &e.sni, tcp_wait),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "connect timed out after {}",
                humantime::format_duration(wait)
            ))
        })
    }

    /// Returns a fully read response's connection to the pool; one not read
    /// to its end is closed.
    pub async fn release(&self, open: OpenResponse) {
        if open.done {
            self.pool.put(open.conn);
        }
    }
}

/// A short cause for a failed exchange: hyper's own words (they never hold
/// request data), and the I/O error beneath when there is one.
fn hyper_cause(e: &hyper::Error) -> String {
    let io = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|io| io.to_string());
    match io {
        Some(io) => format!("{e}: {io}"),
        None => e.to_string(),
    }
}

/// Exponential backoff with equal jitter (a random wait between half the step and the
/// whole step), at least `Retry-After` (capped). Not full jitter: a retry after a 429
/// or 5xx should never come at once, and half the step still spreads the callers.
fn backoff(base: Duration, max: Duration, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt - 1).min(16)).min(max);
    let jittered = if exp.is_zero() {
        exp
    } else {
        rand::rng().random_range(exp / 2..=exp)
    };
    jittered.max(retry_after.unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const NO_TRACE: crate::traces::CallTrace<'static> = crate::traces::CallTrace {
        request_id: "test-request",
        trace: None,
        model: "m",
    };
    use crate::config::{EndpointSettings, UpstreamSettings};

    /// A local HTTP/1 server counting its connections; each connection answers
    /// `answers` requests (read at its start) and drops the next one unanswered.
    async fn counting_server(answers: Arc<AtomicUsize>) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let limit = answers.load(Ordering::SeqCst);
                let served = Arc::new(AtomicUsize::new(0));
                let service = hyper::service::service_fn(move |_req| {
                    let n = served.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n >= limit {
                            return Err("dropped unanswered");
                        }
                        Ok(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn connections_are_pooled_and_a_stale_one_is_replaced_within_the_attempt() {
        let answers = Arc::new(AtomicUsize::new(usize::MAX));
        let (port, accepted) = counting_server(answers.clone()).await;
        let endpoint = EndpointSettings {
            host: "127.0.0.1".into(),
            port,
            weight: 1,
        };
        let mut settings = UpstreamSettings::with_defaults("local", vec![endpoint]);
        settings.retries = 0;
        let upstream = Upstream::new(Arc::new(settings), 8);
        let body = Bytes::from_static(b"{}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let call = || async {
            let mut open = upstream
                .open(&body, false, deadline, &NO_TRACE)
                .await
                .expect("open");
            let reply = open
                .read_all(1024, Duration::from_secs(5), deadline)
                .await
                .expect("body");
            assert_eq!(&reply[..], b"{}");
            open
        };

        for _ in 0..3 {
            let open = call().await;
            upstream.release(open).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");

        // A response not read to its end closes its connection.
        let unread = upstream
            .open(&body, false, deadline, &NO_TRACE)
            .await
            .expect("open");
        upstream.release(unread).await;
        upstream.release(call().await).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The next connection answers once; the request after that, sent on it
        // from the pool, is dropped: a fresh connection carries it in the same attempt.
        answers.store(1, Ordering::SeqCst);
        drop(upstream.pool.take(0));
        upstream.release(call().await).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        let open = call().await;
        assert_eq!(open.attempts, 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn status_error_text_names_status_reason_and_message() {
        let e = UpstreamError::Status {
            status: 429,
            message: Some("Rate limit reached".into()),
        };
        assert_eq!(
            e.to_string(),
            "upstream returned 429 Too Many Requests: Rate limit reached"
        );
        let e = UpstreamError::Status {
            status: 503,
            message: None,
        };
        assert_eq!(e.to_string(), "upstream returned 503 Service Unavailable");
        for status in [401, 403] {
            let e = UpstreamError::Status {
                status,
                message: Some("Incorrect API key provided: sk-abc".into()),
            };
            let reason = if status == 401 {
                "Unauthorized"
            } else {
                "Forbidden"
            };
            assert_eq!(
                e.to_string(),
                format!("upstream rejected the gateway's credentials ({status} {reason})")
            );
        }
    }

    #[test]
    fn backoff_grows_within_bounds_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..8 {
            let b = backoff(base, max, attempt, None);
            let ceiling = base.saturating_mul(1 << (attempt - 1)).min(max);
            assert!(b <= ceiling && b >= ceiling / 2, "attempt {attempt}: {b:?}");
        }
        assert_eq!(
            backoff(base, max, 1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }
}
