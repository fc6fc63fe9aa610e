//! `kind: openai` routes: the same Bearer check as chat routes, the client's
//! OpenAI chat-completions body forwarded with the route's model policy, and
//! the upstream reply passed back byte for byte (streams flushed per piece,
//! usage read on the side for the metrics and the access log).

use std::time::{Duration, Instant};

use pingora::proxy::Session;

use super::{exchange, reply, ChatRoute, RequestCtx};
use crate::auth::Authenticator;
use crate::chat::openai::{apply_model_policy, reply_usage};
use crate::chat::reply::parse_completion;
use crate::chat::sse_in::{UpstreamEvent, UpstreamSseParser};
use crate::conversations::Draft;
use crate::error::ApiError;
use crate::limits::Limiter;
use crate::metrics::ActiveStream;
use crate::upstream::{OpenResponse, UpstreamError};

/// Largest single upstream SSE event parsed for usage (larger ones are still passed on).
const MAX_UPSTREAM_EVENT_BYTES: usize = 1 << 20;

/// Handles one OpenAI-format request; errors before the reply started are answered by the caller.
pub(super) async fn handle(
    auth: &Authenticator,
    limiter: &Limiter,
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    let Some((caller, raw)) = exchange::admit(auth, route, session, ctx).await? else {
        return Ok(());
    };
    let settings = &route.settings;
    let request = apply_model_policy(&raw, &settings.model, &settings.allowed_models)
        .map_err(ApiError::InvalidRequest)?;
    exchange::reserve(limiter, route, &caller, raw.len(), ctx).await?;
    drop(raw);
    let upstream_body = bytes::Bytes::from(request.body);
    if settings.conversation_log {
        ctx.conversation = Draft::new(&caller.username, &upstream_body).map(Box::new);
    }

    let deadline = Instant::now() + route.upstream.settings.total_timeout;
    let opened = exchange::open_upstream(
        route,
        session,
        ctx,
        &upstream_body,
        request.stream,
        deadline,
    )
    .await?;
    drop(upstream_body);
    let Some(open) = opened else { return Ok(()) };
    if request.stream {
        pass_stream(route, session, ctx, open, deadline).await;
        return Ok(());
    }
    let Some((body, content_type)) =
        exchange::read_reply(route, session, ctx, open, deadline).await?
    else {
        return Ok(());
    };
    let content_type = content_type.unwrap_or_else(|| "application/json".to_string());
    ctx.tokens = reply_usage(&body).map(|u| (u.prompt_tokens, u.completion_tokens));
    ctx.status = 200;
    let sent = async {
        let h = reply::header(200, ctx, &content_type, Some(body.len()))?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body.clone()), true).await
    }
    .await;
    if sent.is_err() {
        ctx.outcome = "client_gone";
    } else if let Some(draft) = ctx.conversation.as_deref_mut() {
        draft.set_answer(parse_completion(&body).map_or_else(|_| String::new(), |c| c.content));
    }
    Ok(())
}

/// Passes the upstream's SSE body through unchanged, piece by piece. If the
/// upstream breaks off, the client's connection is cut too (no closing
/// chunk), so its SDK reports an incomplete stream rather than a short answer.
async fn pass_stream(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut open: OpenResponse,
    deadline: Instant,
) {
    let upstream = &route.upstream;
    let mut active = ActiveStream::start(&route.settings.path);
    ctx.status = 200;
    let content_type = open
        .content_type()
        .unwrap_or("text/event-stream")
        .to_string();
    let started = async {
        let mut h = reply::header(200, ctx, &content_type, None)?;
        h.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
        h.insert_header("X-Accel-Buffering", "no")?;
        if session.req_header().version == http::Version::HTTP_11 {
            h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        session.write_response_header(Box::new(h), false).await
    }
    .await;
    if started.is_err() {
        ctx.outcome = "client_gone";
        return;
    }
    // The answer text of the piece in hand, when the exchange is recorded.
    let mut text = ctx.conversation.as_deref_mut().map(|draft| {
        draft.answer_started();
        String::new()
    });

    let mut parser = UpstreamSseParser::new(MAX_UPSTREAM_EVENT_BYTES);
    let mut usage = None;
    let idle = upstream.settings.idle_timeout;
    let failure = loop {
        let wait_until = (Instant::now() + idle).min(deadline);
        let piece = tokio::select! {
            biased;
            _ = session.downstream_session.read_body_or_idle(true) => {
                ctx.outcome = "cancelled";
                break None;
            }
            piece = tokio::time::timeout_at(wait_until.into(), open.read_chunk()) => piece,
        };
        let piece = match piece {
            Err(_) => {
                break Some(timeout_cause(
                    deadline,
                    upstream.settings.total_timeout,
                    idle,
                ))
            }
            Ok(Err(e)) => break Some(e.to_string()),
            Ok(Ok(None)) => {
                if session.write_response_body(None, true).await.is_err() {
                    ctx.outcome = "client_gone";
                }
                // Usage parsing is best effort: a body the parser refuses is still passed on.
                let _ = parser.finish(&mut |event| take_usage(event, &mut usage, None));
                break None;
            }
            Ok(Ok(Some(piece))) => piece,
        };
        let _ = parser.feed(&piece, &mut |event| {
            take_usage(event, &mut usage, text.as_mut())
        });
        if session
            .write_response_body(Some(piece), false)
            .await
            .is_err()
        {
            ctx.outcome = "cancelled";
            break None;
        }
        active.sent();
        if let (Some(draft), Some(text)) = (ctx.conversation.as_deref_mut(), text.as_mut()) {
            draft.answer_sent(text);
            text.clear();
        }
    };
    ctx.tokens = usage.map(|u: crate::chat::Usage| (u.prompt_tokens, u.completion_tokens));
    match failure {
        Some(cause) => {
            ctx.outcome = "upstream_error";
            ctx.abort = true;
            tracing::debug!(request_id = %ctx.request_id, cause = %cause, "pass-through stream failed after the first byte");
        }
        None if ctx.outcome == "ok" => upstream.release(open).await,
        None => {
            // Dropping `open` closes the upstream connection, cancelling the generation.
        }
    }
}

/// Notes the usage an event reports and, when kept, the answer text it carries.
fn take_usage(
    event: UpstreamEvent<'_>,
    usage: &mut Option<crate::chat::Usage>,
    text: Option<&mut String>,
) {
    match (event, text) {
        (UpstreamEvent::Usage(u), _) => *usage = Some(u),
        (UpstreamEvent::Delta(delta), Some(text)) => text.push_str(&delta),
        _ => {}
    }
}

fn timeout_cause(deadline: Instant, total: Duration, idle: Duration) -> String {
    if Instant::now() >= deadline {
        UpstreamError::Timeout {
            what: "before the reply was complete",
            after: total,
        }
        .to_string()
    } else {
        UpstreamError::Timeout {
            what: "while streaming (idle)",
            after: idle,
        }
        .to_string()
    }
}
