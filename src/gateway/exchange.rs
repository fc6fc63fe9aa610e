//! The steps every chat-like route shares: Bearer check and body (before any
//! upstream work), the rate/token reservation, opening the upstream call, and
//! reading a complete reply — each giving up at once when the client leaves.

use std::time::Instant;

use bytes::Bytes;
use pingora::proxy::Session;

use super::{body, ChatRoute, RequestCtx};
use crate::auth::{Authenticator, Caller};
use crate::error::ApiError;
use crate::limits::{estimate_tokens, Limiter};
use crate::traces::CallTrace;
use crate::upstream::{OpenResponse, UpstreamError};

/// Largest non-streaming upstream reply accepted.
const MAX_REPLY_BYTES: usize = 16 << 20;

/// Checks the caller's token, then reads the body under the route's limits.
/// `Ok(None)`: the client went away mid-body; there is nobody to answer.
pub(super) async fn admit(
    auth: &Authenticator,
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Option<(Caller, Bytes)>, ApiError> {
    let mut values = session
        .req_header()
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter();
    let authorization = values.next().map(|v| v.as_bytes().to_vec());
    if values.next().is_some() {
        // Which one would count is up to each hop; refuse rather than pick one.
        return Err(ApiError::InvalidRequest(
            "more than one Authorization header".into(),
        ));
    }
    // Boxed, like the reservation below: Redis calls' future state would
    // otherwise stay reserved in the request's future while a stream is open.
    let caller = Box::pin(auth.authorize(authorization.as_deref())).await?;
    ctx.user_id = Some(caller.user_id);
    let settings = &route.settings;
    match body::read_limited(session, settings.max_body_bytes, settings.body_timeout).await {
        Ok(raw) => Ok(Some((caller, raw))),
        Err(Some(e)) => Err(e),
        Err(None) => {
            ctx.outcome = "client_gone";
            Ok(None)
        }
    }
}

/// Reserves the caller's request and estimated tokens on this route (`completion`:
/// the request's own bound on the answer, else the route's estimate); settled from
/// the usage when the request is logged.
pub(super) async fn reserve(
    limiter: &Limiter,
    route: &ChatRoute,
    caller: &Caller,
    body_bytes: usize,
    completion: Option<u64>,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    let settings = &route.settings;
    let completion = completion.unwrap_or(settings.completion_estimate);
    let estimate = estimate_tokens(body_bytes, completion);
    let reservation = Box::pin(limiter.reserve(
        &caller.username,
        &settings.path,
        &settings.rate_limits,
        estimate,
    ))
    .await?;
    ctx.reservation = Some(reservation);
    Ok(())
}

/// Sends the request upstream (with the upstream's retries) and waits for a
/// 2xx header, noting attempts, endpoint and time to first byte in `ctx`.
/// `Ok(None)`: the client left first, and the call was dropped.
pub(super) async fn open_upstream(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: &Bytes,
    stream: bool,
    deadline: Instant,
) -> Result<Option<OpenResponse>, ApiError> {
    let upstream = &route.upstream;
    let call = CallTrace {
        request_id: &ctx.request_id,
        trace: ctx.trace.as_deref(),
        model: &route.settings.model,
    };
    // Boxed: connecting (TLS included) takes ~12 KB of future state, which would
    // otherwise stay reserved inside the request's future for the whole reply,
    // i.e. for every open stream.
    let opened = tokio::select! {
        biased;
        _ = session.downstream_session.read_body_or_idle(true) => None,
        opened = Box::pin(upstream.open(body, stream, deadline, &call)) => Some(opened),
    };
    let Some(opened) = opened else {
        ctx.outcome = "cancelled";
        return Ok(None);
    };
    let mut open = opened.map_err(|e| upstream_failed(ctx, &e))?;
    if let Some(trace) = ctx.trace.as_deref_mut() {
        trace.attempt_answered(open.span.take());
    }
    ctx.attempts = open.attempts;
    ctx.upstream_endpoint = Some(upstream.endpoints[open.endpoint].label.clone());
    ctx.time_to_first_byte = Some(open.first_byte_at.duration_since(ctx.started));
    Ok(Some(open))
}

/// Reads a whole non-streamed reply and returns the connection to the pool.
/// `Ok(None)`: the client left first.
pub(super) async fn read_reply(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut open: OpenResponse,
    deadline: Instant,
) -> Result<Option<(Bytes, Option<String>)>, ApiError> {
    let upstream = &route.upstream;
    let idle = upstream.settings.idle_timeout;
    let body = tokio::select! {
        biased;
        _ = session.downstream_session.read_body_or_idle(true) => {
            ctx.outcome = "cancelled";
            return Ok(None);
        }
        body = open.read_all(MAX_REPLY_BYTES, idle, deadline) => body,
    };
    let body = body.map_err(|e| upstream_failed(ctx, &e))?;
    if let Some(trace) = ctx.trace.as_deref_mut() {
        trace.reply_seen(&body);
    }
    let content_type = open.content_type().map(str::to_string);
    upstream.release(open).await;
    Ok(Some((body, content_type)))
}

/// An upstream failure before the reply started: the 500 of docs/api.md.
pub(super) fn upstream_failed(ctx: &mut RequestCtx, e: &UpstreamError) -> ApiError {
    ctx.outcome = "upstream_error";
    ApiError::Upstream(e.to_string())
}
