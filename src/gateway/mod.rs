//! The Pingora glue: one `ProxyHttp` service that answers every request from
//! `request_filter` and drives its own upstream call (see `chat_route`).
//!
//! ```text
//!  client ──► early_request_filter ──► request_filter ──────────────► logging
//!                                        │  route by path
//!                                        ├─ /auth ........ login_route: parse, verify, issue JWT
//!                                        ├─ chat routes .. chat_route: Bearer check, read + validate
//!                                        │                 body, rewrite, upstream::call (retries),
//!                                        │                 JSON reply or SSE transcoding
//!                                        └─ else ......... 404 / 405
//!                      (returns Ok(true): Pingora's upstream_peer and the
//!                       body/response filters never run)
//! ```
//!
//! Why not Pingora's proxy phases: the body must be validated and rewritten
//! before any upstream connection is opened, retries on 429/5xx need the body
//! again (Pingora replays at most 64 KiB), and the SSE transcoder needs timers
//! (keep-alives, idle timeout) that the synchronous body filters cannot run.

pub mod admin;
mod body;
mod chat_route;
mod login_route;
mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::auth::Authenticator;
use crate::config::{Limits, RouteSettings};
use crate::error::ApiError;
use crate::upstream::Upstream;

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
}

impl Gateway {
    /// A gateway over these routes.
    pub fn new(auth: Arc<Authenticator>, routes: Vec<ChatRoute>, limits: Limits) -> Self {
        Gateway {
            auth,
            routes: routes
                .into_iter()
                .map(|r| (r.settings.path.clone(), Arc::new(r)))
                .collect(),
            limits,
        }
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
    tokens: Option<(u64, u64)>,
    outcome: &'static str,
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
            outcome: "ok",
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        let path = session.req_header().uri.path().to_string();
        let is_post = session.req_header().method == http::Method::POST;
        let result = if path == "/auth" {
            ctx.route = "/auth".into();
            if is_post {
                login_route::handle(&self.auth, self.limits.max_auth_body_bytes, session, ctx).await
            } else {
                Err(ApiError::MethodNotAllowed { allow: "POST" })
            }
        } else if let Some(route) = self.routes.get(&path) {
            ctx.route = route.settings.path.clone();
            if is_post {
                chat_route::handle(&self.auth, route, session, ctx).await
            } else {
                Err(ApiError::MethodNotAllowed { allow: "POST" })
            }
        } else {
            ctx.route = "unmatched".into();
            Err(ApiError::NotFound)
        };
        if let Err(error) = result {
            reply::send_error(session, ctx, &error).await;
        }
        Ok(true)
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
        let req = session.req_header();
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            route = %ctx.route,
            method = %req.method,
            status = ctx.status,
            outcome = ctx.outcome,
            user_id = ctx.user_id,
            upstream_endpoint = ctx.upstream_endpoint.as_deref(),
            attempts = ctx.attempts,
            bytes_in = session.body_bytes_read(),
            bytes_out = session.body_bytes_sent(),
            duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
            ttfb_ms = ctx.time_to_first_byte.map(|d| d.as_secs_f64() * 1000.0),
            prompt_tokens = ctx.tokens.map(|t| t.0),
            completion_tokens = ctx.tokens.map(|t| t.1),
            "request"
        );
    }
}
