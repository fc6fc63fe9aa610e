//! The Pingora glue: a `ProxyHttp` whose `request_filter` answers every request locally
//! (returning `Ok(true)`), so `upstream_peer` is never reached. Routing, knob resolution
//! and response planning call the pure modules; this file only reads and writes bytes.
//!
//! Chat request: read body (413 over 16 MiB) → log it → key checks (429/401) → parse (400)
//! → knobs (400) → outcome (fail-first 503 / `status` error / completion / stream)
//! → first-byte delay → respond. Pauses watch the client so a departure is seen at once.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use subtle::ConstantTimeEq;

use super::knobs::{split_directive, Knobs};
use super::reply::{Chunking, Reply};
use super::request::ChatRequest;
use super::stats::{LoggedRequest, RequestLog, Stats, StreamGuard};
use super::wire::{
    completion_body, error_body, error_kind, plan_stream, ChunkEncoder, ResponseMeta, Step, Usage,
};
use super::SimOptions;

/// Largest chat request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

const HEALTH_BODY: &[u8] = br#"{"status":"ok"}"#;
const MODELS_BODY: &[u8] = br#"{"object":"list","data":[{"id":"simulated","object":"model","created":0,"owned_by":"chatgate-simulator"}]}"#;

/// The error a planned cut returns so Pingora drops the connection without a terminator.
const CUT: ErrorType = ErrorType::Custom("SimulatedCut");

/// The simulator application; one per service, shared by its connections.
pub struct Simulator {
    options: SimOptions,
    stats: Arc<Stats>,
    log: RequestLog,
    /// Chat requests that reached the fail-first check since start or reset.
    fail_first_seen: AtomicU64,
    next_id: AtomicU64,
}

/// Which handler a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Health,
    Models,
    Stats,
    Requests,
    Reset,
    /// Known path, wrong method; carries the `Allow` value.
    WrongMethod(&'static str),
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let (wanted, route) = if path.ends_with("/chat/completions") {
        (Method::POST, Route::Chat)
    } else {
        match path {
            "/health" => (Method::GET, Route::Health),
            "/_sim/stats" => (Method::GET, Route::Stats),
            "/_sim/requests" => (Method::GET, Route::Requests),
            "/_sim/reset" => (Method::POST, Route::Reset),
            _ if path.ends_with("/models") => (Method::GET, Route::Models),
            _ => return Route::NotFound,
        }
    };
    if *method == wanted {
        route
    } else if wanted == Method::POST {
        Route::WrongMethod("POST")
    } else {
        Route::WrongMethod("GET")
    }
}

/// What a chat request is answered with, decided before the first-byte delay.
enum Outcome {
    Error {
        status: u16,
        message: Cow<'static, str>,
        retry_after: Option<u64>,
    },
    Completion,
    Stream,
}

impl Simulator {
    pub fn new(options: SimOptions) -> Simulator {
        Simulator {
            options,
            stats: Arc::default(),
            log: RequestLog::default(),
            fail_first_seen: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    async fn chat(&self, session: &mut Session) -> Result<()> {
        self.stats.count_chat_request();
        let Some(body) = read_body(session).await? else {
            // The unread rest of the body makes the connection unusable.
            session.set_keepalive(None);
            let message = format!("Request body exceeds {MAX_BODY_BYTES} bytes.");
            return self.send_error(session, 413, &message, None).await;
        };
        let (parsed, parse_error) = match serde_json::from_slice(&body) {
            Ok(value) => (value, None),
            Err(e) => (serde_json::Value::Null, Some(e.to_string())),
        };
        let logged = Arc::new(LoggedRequest {
            method: session.req_header().method.to_string(),
            path: session.req_header().uri.to_string(),
            headers: header_map(session.req_header()),
            include_usage: parsed
                .pointer("/stream_options/include_usage")
                .and_then(serde_json::Value::as_bool)
                == Some(true),
            body: parsed,
            body_bytes: body.len(),
        });
        self.log.push(Arc::clone(&logged));

        if let Some((status, message, retry_after)) = self.check_key(session.req_header()) {
            return self.send_error(session, status, message, retry_after).await;
        }
        if let Some(error) = parse_error {
            let message = super::request::RequestError::BadJson(error).to_string();
            return self.send_error(session, 400, &message, None).await;
        }
        let request = match ChatRequest::from_json(&logged.body) {
            Ok(request) => request,
            Err(e) => return self.send_error(session, 400, &e.to_string(), None).await,
        };
        let (mut knobs, echo) = match self.resolve_knobs(session.req_header(), &request.last_user) {
            Ok(resolved) => resolved,
            Err(e) => return self.send_error(session, 400, &e.to_string(), None).await,
        };

        knobs.error_message = knobs.quote_key.message(bearer_token(session.req_header()));
        let outcome = self.outcome(&knobs, request.stream);
        let guard = matches!(outcome, Outcome::Stream).then(|| self.stats.start_stream());
        if !knobs.first_byte_delay.is_zero() {
            // On error the guard drops and counts the stream as cancelled.
            pause(session, knobs.first_byte_delay).await?;
        }
        self.answer(session, outcome, &knobs, &request, echo, guard)
            .await
    }

    /// Writes the decided outcome; `guard` is the live stream, if the outcome is one.
    async fn answer(
        &self,
        session: &mut Session,
        outcome: Outcome,
        knobs: &Knobs,
        request: &ChatRequest<'_>,
        echo: &str,
        guard: Option<StreamGuard>,
    ) -> Result<()> {
        let chunking = match knobs.chunks {
            Some(n) => Chunking::Count(n),
            None => Chunking::Size(knobs.chunk_size),
        };
        let id = self.next_id();
        let meta = ResponseMeta {
            id: &id,
            created: crate::unix_time::unix_now(),
            model: request.model,
        };
        match outcome {
            Outcome::Error {
                status,
                message,
                retry_after,
            } => {
                self.send_error(session, status, &message, retry_after)
                    .await
            }
            Outcome::Completion => {
                let reply = Reply::build(&knobs.reply, echo, chunking);
                let usage = knobs
                    .usage
                    .then(|| Usage::count(request.prompt_chars, reply.pieces.len()));
                let body = completion_body(meta, &reply.text, usage);
                self.send(session, 200, body, &[]).await
            }
            Outcome::Stream => {
                let reply = Reply::build(&knobs.reply, echo, chunking);
                let usage = (knobs.usage && knobs.stream_usage && request.include_usage)
                    .then(|| Usage::count(request.prompt_chars, reply.pieces.len()));
                let steps = plan_stream(&ChunkEncoder::new(meta), &reply, knobs, usage);
                let played = self.play_stream(session, steps).await;
                // A planned cut is a finished plan; any other error means the client left.
                if played.is_ok() || played.as_ref().is_err_and(|e| e.etype() == &CUT) {
                    if let Some(guard) = guard {
                        guard.complete();
                    }
                }
                played
            }
        }
    }

    /// `Some((status, message, retry_after))` when the API key is refused.
    fn check_key(&self, header: &RequestHeader) -> Option<(u16, &'static str, Option<u64>)> {
        let options = &self.options;
        if options.require_key.is_empty() && options.rate_limited_key.is_empty() {
            return None;
        }
        let key = bearer_token(header);
        // Keys are secrets: compared in constant time, like a real backend should.
        let same = |k: &String, key: &str| bool::from(k.as_bytes().ct_eq(key.as_bytes()));
        if key.is_some_and(|key| options.rate_limited_key.iter().any(|k| same(k, key))) {
            return Some((429, "Rate limit reached", Some(1)));
        }
        let known = key.is_some_and(|key| options.require_key.iter().any(|k| same(k, key)));
        if !options.require_key.is_empty() && !known {
            return Some((401, "Incorrect API key provided", None));
        }
        None
    }

    /// Process options, then `x-sim-*` headers, then the `#sim` directive; returns the
    /// knobs and the text to echo (the last user message without the directive line).
    fn resolve_knobs<'a>(
        &self,
        header: &RequestHeader,
        last_user: &'a str,
    ) -> Result<(Knobs, &'a str), super::knobs::KnobError> {
        let mut knobs = Knobs::from_options(&self.options);
        knobs.apply_headers(
            header
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        )?;
        match split_directive(last_user) {
            Some((args, rest)) => {
                knobs.apply_directive(args)?;
                Ok((knobs, rest))
            }
            None => Ok((knobs, last_user)),
        }
    }

    fn outcome(&self, knobs: &Knobs, stream: bool) -> Outcome {
        if self.options.fail_first > 0
            && self.fail_first_seen.fetch_add(1, Ordering::Relaxed) < self.options.fail_first
        {
            return Outcome::Error {
                status: 503,
                message: Cow::Borrowed("simulated 503"),
                retry_after: None,
            };
        }
        if let Some(status) = knobs.status {
            return Outcome::Error {
                status,
                message: Cow::Owned(
                    knobs
                        .error_message
                        .clone()
                        .unwrap_or_else(|| format!("simulated {status}")),
                ),
                retry_after: knobs.retry_after,
            };
        }
        if stream {
            Outcome::Stream
        } else {
            Outcome::Completion
        }
    }

    async fn play_stream(&self, session: &mut Session, steps: Vec<Step>) -> Result<()> {
        let mut header = self.header(200, "text/event-stream")?;
        header.insert_header("cache-control", "no-cache")?;
        // Without a length Pingora would frame by close; chunked flushes every write.
        header.insert_header("transfer-encoding", "chunked")?;
        session.write_response_header(header, false).await?;
        let count = steps.len();
        let mut ended = false;
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Send(bytes) => {
                    ended = index + 1 == count;
                    session.write_response_body(Some(bytes), ended).await?;
                }
                Step::Pause(duration) => pause(session, duration).await?,
                Step::Cut => return Err(Error::explain(CUT, "planned connection cut")),
            }
        }
        if !ended {
            session.write_response_body(None, true).await?;
        }
        Ok(())
    }

    fn header(&self, status: u16, content_type: &'static str) -> Result<Box<ResponseHeader>> {
        let mut header = ResponseHeader::build_no_case(status, Some(6))?;
        header.insert_header("content-type", content_type)?;
        if let Some(name) = &self.options.name {
            header.insert_header("x-sim-name", name.as_str())?;
        }
        Ok(Box::new(header))
    }

    /// Writes a complete JSON response with a `Content-Length`.
    async fn send(
        &self,
        session: &mut Session,
        status: u16,
        body: Bytes,
        extra: &[(&'static str, &str)],
    ) -> Result<()> {
        let mut header = self.header(status, "application/json")?;
        header.insert_header("content-length", body.len().to_string())?;
        for &(name, value) in extra {
            header.insert_header(name, value)?;
        }
        session.write_response_header(header, false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn send_error(
        &self,
        session: &mut Session,
        status: u16,
        message: &str,
        retry_after: Option<u64>,
    ) -> Result<()> {
        let (kind, code) = error_kind(status);
        let body = error_body(message, kind, code);
        match retry_after {
            Some(seconds) => {
                let seconds = seconds.to_string();
                self.send(session, status, body, &[("retry-after", &seconds)])
                    .await
            }
            None => self.send(session, status, body, &[]).await,
        }
    }

    fn next_id(&self) -> String {
        format!(
            "chatcmpl-sim{}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn reset(&self) {
        self.stats.reset();
        self.log.clear();
        self.fail_first_seen.store(0, Ordering::Relaxed);
    }
}

#[async_trait]
impl ProxyHttp for Simulator {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// No compression or other modules: replies are written exactly as planned.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut Self::CTX) -> Result<bool> {
        let route = route(
            &session.req_header().method,
            session.req_header().uri.path(),
        );
        if !matches!(route, Route::Stats | Route::Requests | Route::Reset) {
            self.stats.count_request();
        }
        if route != Route::Chat {
            session.drain_request_body().await?;
        }
        match route {
            Route::Chat => self.chat(session).await?,
            Route::Health => {
                let body = Bytes::from_static(HEALTH_BODY);
                self.send(session, 200, body, &[]).await?;
            }
            Route::Models => {
                let body = Bytes::from_static(MODELS_BODY);
                self.send(session, 200, body, &[]).await?;
            }
            Route::Stats => {
                let body = serde_json::to_vec(&self.stats.snapshot()).unwrap_or_default();
                self.send(session, 200, body.into(), &[]).await?;
            }
            Route::Requests => {
                let body = Bytes::from(self.log.to_json());
                self.send(session, 200, body, &[]).await?;
            }
            Route::Reset => {
                self.reset();
                let body = Bytes::from_static(HEALTH_BODY);
                self.send(session, 200, body, &[]).await?;
            }
            Route::WrongMethod(allow) => {
                let body = error_body("Method not allowed.", "invalid_request_error", None);
                self.send(session, 405, body, &[("allow", allow)]).await?;
            }
            Route::NotFound => {
                let message = format!(
                    "Unknown request URL: {} {}",
                    session.req_header().method,
                    session.req_header().uri.path()
                );
                self.send_error(session, 404, &message, None).await?;
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the simulator has no upstream")
    }

    /// A planned cut or a departed client gets nothing more; anything else a bare 500
    /// when no header went out yet. The connection is never reused after an error.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let mut error_code = 0;
        if !is_quiet(e) && session.response_written().is_none() {
            error_code = 500;
            // The connection is dropped right after, so a failed write changes nothing.
            let _ = self.send_error(session, 500, "simulator error", None).await;
        }
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// No per-request log lines for planned cuts and clients that left.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, e: &Error) -> bool {
        is_quiet(e)
    }
}

fn is_quiet(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
    ) || e.etype() == &CUT
}

/// Sleeps for `duration` unless the client leaves first (then the read error is returned).
async fn pause(session: &mut Session, duration: Duration) -> Result<()> {
    let sleep = tokio::time::sleep(duration);
    tokio::pin!(sleep);
    // The request body was read completely, so this only resolves when the client closes
    // the connection (or sends bytes it should not).
    let result = tokio::select! {
        () = &mut sleep => return Ok(()),
        read = session.downstream_session.read_body_or_idle(true) => read,
    };
    result?;
    sleep.await;
    Ok(())
}

/// Reads the whole request body; `None` when it exceeds [`MAX_BODY_BYTES`].
async fn read_body(session: &mut Session) -> Result<Option<Bytes>> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(0);
    if declared > MAX_BODY_BYTES {
        return Ok(None);
    }
    let mut body = BytesMut::with_capacity(declared);
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// Lower-case header names to values; repeated headers joined with `", "`.
fn header_map(header: &RequestHeader) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in header.headers.iter() {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_string())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// The token of `Authorization: Bearer <token>` (scheme matched case-insensitively).
fn bearer_token(header: &RequestHeader) -> Option<&str> {
    let value = header
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_suffix_and_method() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(route(&post, "/v1/chat/completions"), Route::Chat);
        assert_eq!(route(&post, "/openai/v1/chat/completions"), Route::Chat);
        assert_eq!(
            route(&get, "/v1/chat/completions"),
            Route::WrongMethod("POST")
        );
        assert_eq!(route(&get, "/health"), Route::Health);
        assert_eq!(route(&get, "/v1/models"), Route::Models);
        assert_eq!(route(&get, "/_sim/stats"), Route::Stats);
        assert_eq!(route(&get, "/_sim/requests"), Route::Requests);
        assert_eq!(route(&post, "/_sim/reset"), Route::Reset);
        assert_eq!(route(&get, "/_sim/reset"), Route::WrongMethod("POST"));
        assert_eq!(route(&post, "/health"), Route::WrongMethod("GET"));
        assert_eq!(route(&get, "/nope"), Route::NotFound);
    }

    #[test]
    fn bearer_token_is_read_with_any_scheme_case() {
        let mut header = RequestHeader::build("POST", b"/", None).unwrap();
        assert_eq!(bearer_token(&header), None);
        header.insert_header("authorization", "bearer k1").unwrap();
        assert_eq!(bearer_token(&header), Some("k1"));
        header.insert_header("authorization", "Basic k1").unwrap();
        assert_eq!(bearer_token(&header), None);
    }

    #[test]
    fn key_checks_prefer_rate_limit_then_require() {
        let sim = Simulator::new(SimOptions {
            require_key: vec!["good".into()],
            rate_limited_key: vec!["slow".into()],
            ..SimOptions::default()
        });
        let with = |key: Option<&str>| {
            let mut header = RequestHeader::build("POST", b"/", None).unwrap();
            if let Some(key) = key {
                header
                    .insert_header("authorization", format!("Bearer {key}"))
                    .unwrap();
            }
            sim.check_key(&header)
        };
        assert_eq!(with(Some("good")), None);
        assert_eq!(
            with(Some("slow")),
            Some((429, "Rate limit reached", Some(1)))
        );
        assert_eq!(
            with(Some("bad")),
            Some((401, "Incorrect API key provided", None))
        );
        assert_eq!(with(None), Some((401, "Incorrect API key provided", None)));
    }

    #[test]
    fn header_map_joins_repeats() {
        let mut header = RequestHeader::build("POST", b"/", None).unwrap();
        header.append_header("x-a", "1").unwrap();
        header.append_header("X-A", "2").unwrap();
        header.insert_header("Host", "h").unwrap();
        let map = header_map(&header);
        assert_eq!(map.get("x-a").map(String::as_str), Some("1, 2"));
        assert_eq!(map.get("host").map(String::as_str), Some("h"));
    }
}
