//! Chat routes: Bearer check, body validation and rewrite (all before any
//! upstream connection), the upstream call, then either `{"message": ...}` or
//! the SSE stream transcoded chunk by chunk with keep-alives, idle timeout and
//! cancellation when the client goes away. A stream whose upstream reports no usage
//! has its tokens counted here (marked estimated).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use super::{exchange, reply, ChatRoute, RequestCtx};
use crate::auth::Authenticator;
use crate::chat::reply::parse_completion;
use crate::chat::request::{build_openai_body_and_messages, parse_messages, UpstreamRequestSpec};
use crate::chat::sse_out::{write_error_event, KEEPALIVE_COMMENT};
use crate::chat::stream::{StreamStatus, StreamTranscoder};
use crate::chat::token_count::estimate_stream;
use crate::chat::DEFAULT_MAX_EVENT_BYTES;
use crate::config::RouteKind;
use crate::conversations::Draft;
use crate::error::{json_object1, upstream_failure_message, ApiError};
use crate::limits::Limiter;
use crate::metrics::ActiveStream;
use crate::traces::RequestTrace;
use crate::upstream::{OpenResponse, UpstreamError};

/// Handles one chat request; errors before the reply started are answered by the caller.
///
/// Each phase is boxed and awaited in turn, so this future stays a few pointers: the
/// request's future is held for as long as a stream is open, and the state of the
/// phases before the first byte (auth, limits, rewrite, connect, retries) would
/// otherwise stay reserved in it for every open stream.
pub(super) async fn handle(
    auth: &Authenticator,
    limiter: &Limiter,
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    let Some((open, upstream_body, deadline)) =
        Box::pin(open_call(auth, limiter, route, session, ctx)).await?
    else {
        return Ok(());
    };
    if route.settings.kind == RouteKind::ChatStream {
        Box::pin(stream_reply(
            route,
            session,
            ctx,
            open,
            upstream_body,
            deadline,
        ))
        .await;
        return Ok(());
    }
    drop(upstream_body);
    Box::pin(json_reply(route, session, ctx, open, deadline)).await
}

/// Everything before the reply: Bearer check, body, reservation, rewrite, and the
/// upstream call up to a 2xx header. `Ok(None)`: the client left; nobody to answer.
async fn open_call(
    auth: &Authenticator,
    limiter: &Limiter,
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Option<(OpenResponse, Bytes, Instant)>, ApiError> {
    let Some((caller, raw)) = exchange::admit(auth, route, session, ctx).await? else {
        return Ok(None);
    };
    let settings = &route.settings;
    let messages = parse_messages(&raw).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    exchange::reserve(limiter, route, &caller, raw.len(), None, ctx).await?;
    drop(raw);
    let stream = settings.kind == RouteKind::ChatStream;
    let (upstream_body, messages_at) = build_openai_body_and_messages(
        &messages,
        &UpstreamRequestSpec {
            model: &settings.model,
            system_prompt: settings.system_prompt.as_deref(),
            params: &settings.params,
            stream,
            include_usage: route.include_usage,
        },
    );
    drop(messages);
    if settings.conversation_log {
        ctx.conversation = Draft::with_messages(
            &caller.username,
            &settings.model,
            &upstream_body[messages_at],
        )
        .map(Box::new);
    }
    let upstream_body = Bytes::from(upstream_body);

    let deadline = Instant::now() + route.upstream.settings.total_timeout;
    let opened =
        exchange::open_upstream(route, session, ctx, &upstream_body, stream, deadline).await?;
    Ok(opened.map(|open| (open, upstream_body, deadline)))
}

/// Reads a whole upstream reply and answers `{"message": ...}`.
async fn json_reply(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    open: OpenResponse,
    deadline: Instant,
) -> Result<(), ApiError> {
    let Some((body, _)) = exchange::read_reply(route, session, ctx, open, deadline).await? else {
        return Ok(());
    };
    let completion = parse_completion(&body)
        .map_err(|e| ApiError::Upstream(route.upstream.redact(&e.to_string())))?;
    ctx.tokens = completion
        .usage
        .map(|u| (u.prompt_tokens, u.completion_tokens));
    reply::send_json(
        session,
        ctx,
        200,
        json_object1("message", &completion.content),
        &[],
    )
    .await;
    if let Some(draft) = ctx.conversation.as_deref_mut() {
        if ctx.outcome == "ok" {
            draft.set_answer(completion.content);
        }
    }
    Ok(())
}

/// What ended the upstream read loop.
enum StreamEnd {
    Finished,
    Failed(String),
    ClientGone,
}

/// Streams the upstream's chunks to the client as the SSE events of docs/api.md. The request
/// `body` is kept to count its tokens if the upstream reports no usage.
async fn stream_reply(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut open: OpenResponse,
    body: Bytes,
    deadline: Instant,
) {
    let settings = &route.settings;
    let upstream = &route.upstream;
    // Counted in chatgate_active_streams until dropped, on every way out.
    let mut active = ActiveStream::start(&settings.path);
    ctx.status = 200;
    // Small: it lives as long as the stream, and grows for large events.
    let mut out = BytesMut::with_capacity(1024);
    let mut transcoder = StreamTranscoder::new(settings.data_format, DEFAULT_MAX_EVENT_BYTES);
    if ctx.conversation.is_some() {
        transcoder.keep_text();
    }
    let recording = ctx.trace.as_deref().is_some_and(RequestTrace::is_recording);
    if recording {
        transcoder.keep_finish();
    }
    let mut awaiting_first_token = recording;
    transcoder.start(&mut out);
    let started = async {
        let mut h = reply::header(200, ctx, "text/event-stream; charset=utf-8", None)?;
        h.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
        h.insert_header("X-Accel-Buffering", "no")?;
        if session.req_header().version == http::Version::HTTP_11 {
            // Without a length Pingora would fall back to close-delimited
            // framing; chunked keeps the connection reusable and each write
            // is flushed as it happens.
            h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(out.split().freeze()), false)
            .await
    }
    .await;
    if started.is_err() {
        ctx.outcome = "client_gone";
        return;
    }
    if let Some(draft) = ctx.conversation.as_deref_mut() {
        draft.answer_started();
    }

    let idle = upstream.settings.idle_timeout;
    let keepalive_every = settings.keepalive_interval;
    let mut last_upstream_byte = Instant::now();
    let mut next_keepalive = Instant::now() + keepalive_every;
    let end = loop {
        let mut keepalive = false;
        let idle_deadline = (last_upstream_byte + idle).min(deadline);
        let status = tokio::select! {
            biased;
            _ = session.downstream_session.read_body_or_idle(true) => break StreamEnd::ClientGone,
            chunk = tokio::time::timeout_at(idle_deadline.into(), open.read_chunk()) => match chunk {
                Err(_) if Instant::now() >= deadline => break StreamEnd::Failed(
                    UpstreamError::Timeout { what: "before the reply was complete", after: upstream.settings.total_timeout }.to_string()),
                Err(_) => break StreamEnd::Failed(
                    UpstreamError::Timeout { what: "while streaming (idle)", after: idle }.to_string()),
                Ok(Err(e)) => break StreamEnd::Failed(e.to_string()),
                Ok(Ok(Some(piece))) => {
                    last_upstream_byte = Instant::now();
                    transcoder.feed(&piece, &mut out)
                }
                Ok(Ok(None)) => transcoder.finish(&mut out),
            },
            _ = tokio::time::sleep_until(next_keepalive.into()) => {
                out.extend_from_slice(KEEPALIVE_COMMENT);
                keepalive = true;
                StreamStatus::Open
            }
        };
        if awaiting_first_token && transcoder.events_sent() > 0 {
            awaiting_first_token = false;
            if let Some(trace) = ctx.trace.as_deref() {
                trace.first_token();
            }
        }
        if !out.is_empty() {
            next_keepalive = Instant::now() + keepalive_every;
            let finished = matches!(status, StreamStatus::Finished);
            if session
                .write_response_body(Some(out.split().freeze()), finished)
                .await
                .is_err()
            {
                break StreamEnd::ClientGone;
            }
            if !keepalive {
                active.sent();
                if let Some(draft) = ctx.conversation.as_deref_mut() {
                    draft.answer_sent(&transcoder.take_text());
                }
            }
        }
        match status {
            StreamStatus::Open => continue,
            StreamStatus::Finished => break StreamEnd::Finished,
            StreamStatus::Failed(cause) => break StreamEnd::Failed(cause),
        }
    };
    ctx.tokens = transcoder
        .usage()
        .map(|u| (u.prompt_tokens, u.completion_tokens));
    let completion = transcoder.take_completion();
    if let (Some(trace), Some(seen)) = (ctx.trace.as_deref_mut(), transcoder.take_finish()) {
        trace.stream_seen(seen);
    }
    drop(transcoder);
    match end {
        StreamEnd::Finished => {
            // Drain what follows [DONE] (usually nothing) so the connection can be reused.
            let rest = open
                .read_all(
                    DEFAULT_MAX_EVENT_BYTES,
                    Duration::from_millis(200),
                    deadline,
                )
                .await;
            if rest.is_ok() {
                upstream.release(open).await;
            }
        }
        StreamEnd::Failed(cause) => {
            drop(open);
            // The cause may hold the upstream's own error text, which may quote its key.
            let cause = upstream.redact(&cause);
            ctx.outcome = "upstream_error";
            write_error_event(&upstream_failure_message(&cause), &mut out);
            let _ = session
                .write_response_body(Some(out.split().freeze()), true)
                .await;
            tracing::debug!(request_id = %ctx.request_id, cause = %cause, "stream failed after the first event");
        }
        StreamEnd::ClientGone => {
            // Closes the upstream connection, cancelling the generation (before any count).
            drop(open);
            ctx.outcome = "cancelled";
        }
    }
    if ctx.tokens.is_none() {
        // After the client's last byte: counting never delays the answer.
        ctx.tokens = Some(estimate_stream(body, completion).await);
        ctx.tokens_estimated = true;
    }
}
