//! One chat-completions call to an upstream: endpoint and key choice, connect,
//! send, wait for the response header, and retry with backoff on connect
//! errors, first-byte timeouts, 429 and 5xx — always before the client has
//! received a byte, because the caller only gets a response once it is 2xx.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use rand::Rng;

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
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
    session: HttpSession,
    peer: HttpPeer,
    /// Index of the endpoint that answered.
    pub endpoint: usize,
    /// How many attempts it took (1 = no retry).
    pub attempts: u32,
    /// When the response header arrived.
    pub first_byte_at: Instant,
    /// The answering attempt's client span, still open (tracing on).
    pub span: Option<opentelemetry::Context>,
}

impl OpenResponse {
    /// The next piece of the body; `None` at its clean end.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        self.session.read_response_body().await.map_err(|e| {
            UpstreamError::Broken(format!(
                "upstream connection failed: {}",
                e.etype().as_str()
            ))
        })
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
        self.session
            .response_header()
            .map_or(0, |h| h.status.as_u16())
    }

    /// The response's `Content-Type`, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.session
            .response_header()
            .and_then(|h| h.headers.get(http::header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
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
                    open.span = span.answered(open.first_byte_at, status);
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

    fn peer(&self, endpoint: usize) -> Result<HttpPeer, UpstreamError> {
        let e = &self.endpoints[endpoint];
        let addr = e.socket_addr().ok_or_else(|| UpstreamError::Connect {
            endpoint: e.label.clone(),
            cause: "host name not resolved".into(),
        })?;
        let s = &self.settings;
        let mut peer = HttpPeer::new(addr, s.tls, e.sni.clone());
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.total_connection_timeout = Some(s.connect_timeout * 2);
        peer.options.write_timeout = Some(s.first_byte_timeout);
        peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
        peer.options.alpn = ALPN::H1;
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        Ok(peer)
    }

    fn request_header(
        &self,
        endpoint: usize,
        key: Option<PickedKey<'_>>,
        body_len: usize,
        stream: bool,
        sent: &Outgoing<'_>,
    ) -> pingora::Result<RequestHeader> {
        let mut req = RequestHeader::build("POST", self.chat_path.as_bytes(), Some(6))?;
        req.insert_header(
            http::header::HOST,
            self.endpoints[endpoint].host_header.as_str(),
        )?;
        req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        req.insert_header(http::header::CONTENT_LENGTH, body_len.to_string())?;
        req.insert_header(
            http::header::ACCEPT,
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        )?;
        req.insert_header(
            http::header::USER_AGENT,
            concat!("chatgate/", env!("CARGO_PKG_VERSION")),
        )?;
        if let Some(k) = key {
            req.insert_header(http::header::AUTHORIZATION, k.authorization)?;
        }
        req.insert_header("X-Request-Id", sent.request_id)?;
        for (name, value) in sent.trace_headers {
            req.insert_header(*name, value.as_str())?;
        }
        Ok(req)
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
        let peer = self.peer(endpoint).map_err(|error| AttemptFailure {
            error,
            retryable: true,
            retry_after: None,
            blame_key: false,
        })?;
        let req = self
            .request_header(endpoint, key, body.len(), stream, sent)
            .map_err(|e| {
                connect_failure(format!("cannot build request: {}", e.etype().as_str()))
            })?;
        // A pooled connection may have been closed by the server while idle;
        // such a failure gets one fresh connection without counting as an attempt.
        let mut fresh_tries = 0;
        let (mut session, first_byte_at) = loop {
            let connect_wait =
                (s.connect_timeout * 2).min(deadline.saturating_duration_since(Instant::now()));
            let (mut session, reused) =
                match tokio::time::timeout(connect_wait, self.connector.get_http_session(&peer))
                    .await
                {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(e)) => return Err(connect_failure(connect_cause(&e))),
                    Err(_) => {
                        return Err(connect_failure(format!(
                            "connect timed out after {}",
                            humantime::format_duration(connect_wait)
                        )))
                    }
                };
            let wait = s
                .first_byte_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let outcome = tokio::time::timeout(wait, async {
                let cork = Cork::hold(&session);
                session.write_request_header(Box::new(req.clone())).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await?;
                drop(cork);
                loop {
                    session.read_response_header().await?;
                    let informational = session
                        .response_header()
                        .is_some_and(|h| h.status.is_informational());
                    if !informational {
                        return Ok::<(), Box<pingora::Error>>(());
                    }
                }
            })
            .await;
            match outcome {
                Ok(Ok(())) => break (session, Instant::now()),
                Ok(Err(e)) if reused && fresh_tries == 0 => {
                    tracing::debug!(error = %e.etype().as_str(), "pooled upstream connection failed; retrying on a fresh one");
                    fresh_tries += 1;
                    continue;
                }
                Ok(Err(e)) => {
                    return Err(AttemptFailure {
                        error: UpstreamError::Broken(format!(
                            "upstream connection failed before the reply: {}",
                            e.etype().as_str()
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
        if let HttpSession::H1(h1) = &mut session {
            h1.respect_keepalive();
        }
        let Some(header) = session.response_header() else {
            return Err(connect_failure("no response header".into()));
        };
        let status = header.status.as_u16();
        if (200..300).contains(&status) {
            return Ok(OpenResponse {
                session,
                peer,
                endpoint,
                attempts: 1,
                first_byte_at,
                span: None,
            });
        }
        let retry_after = header
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(RETRY_AFTER_CAP));
        let mut open = OpenResponse {
            session,
            peer,
            endpoint,
            attempts: 1,
            first_byte_at,
            span: None,
        };
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

    /// Returns a fully read response's connection to the pool (or closes it).
    pub async fn release(&self, mut open: OpenResponse) {
        if open.session.response_done() {
            // Boxed: Pingora's release future is ~5 KB, reserved otherwise in
            // every caller's future (a streaming reply's included) for its lifetime.
            Box::pin(self.connector.release_http_session(
                open.session,
                &open.peer,
                Some(POOL_IDLE_TIMEOUT),
            ))
            .await;
        }
    }
}

/// Holds back a plain-TCP upstream connection's partial segments (`TCP_CORK`)
/// while the request is written; dropping it sends them. Pingora's HTTP/1
/// client flushes the header and the body separately, which would otherwise
/// cost two segments (and two wake-ups of the upstream) per request.
/// TLS connections are left alone.
struct Cork(Option<RawFd>);

impl Cork {
    fn hold(session: &HttpSession) -> Cork {
        let fd = match session {
            HttpSession::H1(h1) => h1
                .stream()
                .as_any()
                .downcast_ref::<L4Stream>()
                .map(AsRawFd::as_raw_fd),
            _ => None,
        };
        Cork(fd.filter(|&fd| set_cork(fd, true)))
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            set_cork(fd, false);
        }
    }
}

/// Sets or clears `TCP_CORK`; false if the socket refused.
fn set_cork(fd: RawFd, on: bool) -> bool {
    let value: libc::c_int = on.into();
    // SAFETY: `fd` is the open socket of a session the caller holds for the
    // guard's whole life; the option value is a valid c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// A short cause for a connect error, without addresses' secrets (there are none) or keys.
fn connect_cause(e: &pingora::Error) -> String {
    match e.root_cause().to_string() {
        cause if cause.is_empty() => e.etype().as_str().to_string(),
        cause => cause,
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
    use super::*;

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
