//! The Pingora glue: one `ProxyHttp` service that answers every request from
//! `request_filter` and drives its own upstream call (see `chat_route`).
//!
//! ```text
//!  client ──► early_request_filter ──► request_filter ──────────────► logging
//!                                        │  route by path
//!                                        ├─ CORS preflight  cors: answered locally (OPTIONS)
//!                                        ├─ /auth ........ login_route: parse, failed-login limits,
//!                                        │                 verify, issue JWT
//!                                        ├─ chat routes .. chat_route: Bearer check, read + validate
//!                                        │                 body, reserve rate/token limits, rewrite,
//!                                        │                 upstream::call (retries),
//!                                        │                 JSON reply or SSE transcoding
//!                                        ├─ openai routes  openai_route: Bearer check, model policy,
//!                                        │                 upstream::call, reply passed through
//!                                        └─ else ......... 404 / 405
//!                      (returns Ok(true): Pingora's upstream_peer and the
//!                       body/response filters never run; Err only to cut a
//!                       broken pass-through stream without its closing chunk)
//! ```
//!
//! `logging` settles a chat call's token reservation from the usage (the upstream's,
//! or on streams without any, chatgate's own count), then writes the access line and
//! the per-request metrics, and hands a recorded route's finished exchange to the
//! conversation log (a queue; see `conversations`).
//!
//! Why not Pingora's proxy phases: the body must be validated and rewritten
//! before any upstream connection is opened, retries on 429/5xx need the body
//! again (Pingora replays at most 64 KiB), and the SSE transcoder needs timers
//! (keep-alives, idle timeout) that the synchronous body filters cannot run.

pub mod admin;
mod body;
mod chat_route;
pub mod client_ip;
mod cors;
pub mod drain;
mod exchange;
pub mod framing;
mod login_route;
mod openai_route;
mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::auth::Authenticator;
use crate::config::{CorsSettings, Limits, RouteKind, RouteSettings};
use crate::connections;
use crate::conversations::{ConversationLog, Draft, Finished};
use crate::error::ApiError;
use crate::limits::{Limiter, Reservation};
use crate::metrics::{self, AuthOutcome};
use crate::upstream::Upstream;
use client_ip::TrustedProxies;

/// A chat route resolved against its upstream.
pub struct ChatRoute {
    /// The route as configured.
    pub settings: RouteSettings,
    /// The upstream it sends to.
    pub upstream: Arc<Upstream>,
    /// Whether streaming requests ask for usage (the upstream's `stream_usage`).
    pub include_usage: bool,
}

/// The public gateway service.
pub struct Gateway {
    auth: Arc<Authenticator>,
    routes: HashMap<String, Arc<ChatRoute>>,
    limits: Limits,
    limiter: Arc<Limiter>,
    cors: Option<CorsSettings>,
    draining: drain::Draining,
    trusted_proxies: TrustedProxies,
    /// Where finished exchanges are recorded, when the conversation log is on.
    conversations: Option<Arc<ConversationLog>>,
}

impl Gateway {
    /// The address the request came from (see [`client_ip`]).
    fn client_ip(&self, session: &Session) -> Option<std::net::IpAddr> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        self.trusted_proxies
            .client_ip(peer, &session.req_header().headers)
    }

    /// A gateway over these routes.
    pub fn new(
        auth: Arc<Authenticator>,
        routes: Vec<ChatRoute>,
        limits: Limits,
        cors: Option<CorsSettings>,
        draining: drain::Draining,
        limiter: Arc<Limiter>,
        trusted_proxies: TrustedProxies,
    ) -> Self {
        Gateway {
            trusted_proxies,
            limiter,
            auth,
            routes: routes
                .into_iter()
                .map(|r| (r.settings.path.clone(), Arc::new(r)))
                .collect(),
            limits,
            cors,
            draining,
            conversations: None,
        }
    }

    /// Records the exchanges of routes with `conversation_log` on into `log`.
    pub fn with_conversation_log(mut self, log: Arc<ConversationLog>) -> Self {
        self.conversations = Some(log);
        self
    }
}

/// What one request did, for the access log line.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    route: String,
    status: u16,
    user_id: Option<u64>,
    upstream_endpoint: Option<String>,
    attempts: u32,
    time_to_first_byte: Option<Duration>,
    /// Prompt and completion tokens of the call.
    tokens: Option<(u64, u64)>,
    /// `tokens` were counted by chatgate (the upstream streamed no usage).
    tokens_estimated: bool,
    outcome: &'static str,
    /// Rate/token limits taken for a chat call, settled in `logging`.
    reservation: Option<Reservation>,
    /// The request's `Origin`, when CORS is on and it is allowed (echoed back).
    cors_origin: Option<String>,
    /// Whether replies carry `Access-Control-Allow-Credentials: true`.
    cors_credentials: bool,
    /// Cut the connection instead of finishing the reply (a broken pass-through stream).
    abort: bool,
    /// The conversation record being collected (routes with `conversation_log` on).
    conversation: Option<Box<Draft>>,
    /// The request's trace (tracing on, or an incoming `traceparent` to pass on).
    trace: Option<Box<crate::traces::RequestTrace>>,
}

/// Longest accepted client `X-Request-Id`.
const MAX_REQUEST_ID: usize = 128;

/// The client's request id when it is short and plain, else a fresh one.
fn request_id(session: &Session) -> String {
    let sane = |v: &[u8]| {
        !v.is_empty()
            && v.len() <= MAX_REQUEST_ID
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    };
    match session.get_header("x-request-id").map(|v| v.as_bytes()) {
        Some(v) if sane(v) => String::from_utf8_lossy(v).into_owned(),
        _ => fresh_request_id(),
    }
}

/// What a finished `/auth` request counts as in `chatgate_auth_attempts_total`;
/// `None` for requests that were no login attempt (body too large, client gone).
fn login_outcome(result: &Result<(), ApiError>, outcome: &str) -> Option<AuthOutcome> {
    match result {
        Ok(()) if outcome == "ok" => Some(AuthOutcome::Ok),
        Ok(()) => None,
        Err(ApiError::CredentialsMissing) => Some(AuthOutcome::Missing),
        Err(ApiError::CredentialsRejected) => Some(AuthOutcome::BadCredentials),
        Err(ApiError::TooManyRequests { .. }) => Some(AuthOutcome::RateLimited),
        Err(ApiError::HashersBusy { .. }) => Some(AuthOutcome::Busy),
        Err(ApiError::CredentialStoreUnavailable) => Some(AuthOutcome::StoreError),
        Err(_) => None,
    }
}

/// A random v4 UUID (simple form) from the thread-local generator: `Uuid::new_v4` would
/// ask the kernel for randomness, one syscall per request.
fn fresh_request_id() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .simple()
        .to_string()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            route: String::new(),
            status: 0,
            user_id: None,
            upstream_endpoint: None,
            attempts: 0,
            time_to_first_byte: None,
            tokens: None,
            tokens_estimated: false,
            outcome: "ok",
            reservation: None,
            cors_origin: None,
            cors_credentials: false,
            abort: false,
            conversation: None,
            trace: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // The headers are in: their deadline stops (the body has its own).
        connections::deadline::headers_done(session.as_downstream().stream());
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        let req = session.req_header();
        ctx.trace = crate::traces::start_request(&req.headers, req.method.as_str());
        if self.draining.is_set() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(self.limits.keepalive_timeout.as_secs()));
        }
        let path = session.req_header().uri.path().to_string();
        let is_post = session.req_header().method == http::Method::POST;
        if let Some(cors) = &self.cors {
            cors::admit(cors, session, ctx);
            if cors::is_preflight(session) {
                let known = path == "/auth" || self.routes.contains_key(&path);
                ctx.route = if known { path } else { "unmatched".into() };
                if known {
                    cors::answer_preflight(cors, session, ctx).await;
                } else {
                    reply::send_error(session, ctx, &ApiError::NotFound).await;
                }
                return Ok(true);
            }
        }
        let result = if path == "/auth" {
            ctx.route = "/auth".into();
            if is_post {
                let client_ip = self.client_ip(session);
                let result = Box::pin(login_route::handle(
                    &self.auth,
                    &self.limiter,
                    &self.limits,
                    client_ip,
                    session,
                    ctx,
                ))
                .await;
                if let Some(outcome) = login_outcome(&result, ctx.outcome) {
                    metrics::auth_attempt(outcome);
                }
                result
            } else {
                Err(ApiError::MethodNotAllowed { allow: "POST" })
            }
        } else if let Some(route) = self.routes.get(&path) {
            ctx.route = route.settings.path.clone();
            if !is_post {
                Err(ApiError::MethodNotAllowed { allow: "POST" })
            } else {
                // Boxed, each handler: this future lives as long as the request (a
                // stream's whole life), and only one handler's state is ever needed.
                let (auth, limiter) = (&*self.auth, &*self.limiter);
                if route.settings.kind == RouteKind::Openai {
                    Box::pin(openai_route::handle(auth, limiter, route, session, ctx)).await
                } else {
                    Box::pin(chat_route::handle(auth, limiter, route, session, ctx)).await
                }
            }
        } else {
            ctx.route = "unmatched".into();
            Err(ApiError::NotFound)
        };
        if let Err(error) = result {
            reply::send_error(session, ctx, &error).await;
        }
        if ctx.abort {
            // Pingora would end the body properly after Ok(true); an error makes
            // it drop the connection instead (fail_to_proxy below writes nothing).
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "upstream stream broke off; cutting the client's stream too",
            ));
        }
        Ok(true)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        _e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> pingora::proxy::FailToProxy {
        // request_filter's deliberate abort gets here after the reply started:
        // write nothing. Anything else that failed before a reply gets a 500.
        if !ctx.abort && ctx.status == 0 {
            let error = ApiError::Internal("request failed".into());
            reply::send_error(session, ctx, &error).await;
        }
        pingora::proxy::FailToProxy {
            error_code: ctx.status,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _e: &pingora::Error,
    ) -> bool {
        ctx.abort
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // request_filter answers every request; reaching here is a bug.
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "chatgate answers every request locally",
        ))
    }

    async fn logging(
        &self,
        session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        // The next request on this connection gets a fresh header deadline.
        connections::deadline::request_done(session.as_downstream().stream());
        if let Some(reservation) = ctx.reservation.take() {
            let answered = ctx.status == 200 || ctx.tokens.is_some();
            self.limiter
                .settle(reservation, ctx.tokens, answered, ctx.tokens_estimated)
                .await;
        }
        let duration = ctx.started.elapsed();
        // 499 (as nginx logs it): the client left before any reply was sent.
        let status = if ctx.status == 0 { 499 } else { ctx.status };
        // Tokens first: a scrape that sees the request counted sees its tokens too.
        if let Some((prompt, completion)) = ctx.tokens {
            metrics::tokens(&ctx.route, prompt, completion, ctx.tokens_estimated);
        }
        metrics::request_done(&ctx.route, status, duration);
        if let (Some(draft), Some(log)) = (ctx.conversation.take(), &self.conversations) {
            log.submit(draft.finish(Finished {
                request_id: &ctx.request_id,
                user_id: ctx.user_id,
                route: &ctx.route,
                outcome: ctx.outcome,
                status,
                tokens: ctx.tokens,
                duration,
                ttfb: ctx.time_to_first_byte,
            }));
        }
        let req = session.req_header();
        if let Some(trace) = ctx.trace.take() {
            trace.end(crate::traces::RequestEnd {
                route: &ctx.route,
                method: req.method.as_str(),
                status,
                request_id: &ctx.request_id,
                user_id: ctx.user_id,
                outcome: ctx.outcome,
                tokens: ctx.tokens,
                tokens_estimated: ctx.tokens_estimated,
            });
        }
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            client_ip = self.client_ip(session).map(tracing::field::display),
            route = %ctx.route,
            method = %req.method,
            status,
            outcome = ctx.outcome,
            user_id = ctx.user_id,
            upstream_endpoint = ctx.upstream_endpoint.as_deref(),
            attempts = ctx.attempts,
            bytes_in = session.body_bytes_read(),
            bytes_out = session.body_bytes_sent(),
            duration_ms = duration.as_secs_f64() * 1000.0,
            ttfb_ms = ctx.time_to_first_byte.map(|d| d.as_secs_f64() * 1000.0),
            prompt_tokens = ctx.tokens.map(|t| t.0),
            completion_tokens = ctx.tokens.map(|t| t.1),
            tokens_estimated = ctx.tokens.is_some().then_some(ctx.tokens_estimated),
            "request"
        );
    }
}
