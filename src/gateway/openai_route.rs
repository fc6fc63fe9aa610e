//! `kind: openai` routes: the same Bearer check as chat routes, the client's
//! OpenAI chat-completions body forwarded with the route's model policy, and
//! the upstream reply passed back byte for byte (streams flushed per piece,
//! usage read on the side for the metrics, limits and the access log). Streams
//! always ask for usage; the usage chunk the client did not ask for is removed,
//! and when the upstream sends none the tokens are counted here (marked estimated).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use super::{exchange, reply, ChatRoute, RequestCtx};
use crate::auth::Authenticator;
use crate::chat::openai::{apply_model_policy, reply_usage};
use crate::chat::reply::parse_completion;
use crate::chat::sse_in::{UpstreamEvent, UpstreamSseParser};
use crate::chat::token_count::{estimate_stream, CompletionText};
use crate::chat::usage_strip::UsageChunkFilter;
use crate::chat::{FinishSeen, Usage, DEFAULT_MAX_EVENT_BYTES};
use crate::conversations::Draft;
use crate::error::ApiError;
use crate::limits::Limiter;
use crate::metrics::ActiveStream;
use crate::traces::RequestTrace;
use crate::upstream::{OpenResponse, UpstreamError};

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
    let request = apply_model_policy(
        &raw,
        &settings.model,
        &settings.allowed_models,
        route.include_usage,
    )
    .map_err(ApiError::InvalidRequest)?;
    let completion = request.max_completion;
    exchange::reserve(limiter, route, &caller, raw.len(), completion, ctx).await?;
    drop(raw);
    let upstream_body = Bytes::from(request.body);
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
    let Some(open) = opened else { return Ok(()) };
    if request.stream {
        let strip_usage = request.strip_usage.then(UsageChunkFilter::new);
        let passed = pass_stream(
            route,
            session,
            ctx,
            open,
            upstream_body,
            strip_usage,
            deadline,
        );
        Box::pin(passed).await;
        return Ok(());
    }
    drop(upstream_body);
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

/// Passes the upstream's SSE body through unchanged, piece by piece, but for the
/// usage chunk when `strip` is given. If the upstream breaks off, the client's
/// connection is cut too (no closing chunk), so its SDK reports an incomplete stream
/// rather than a short answer. `body`, the request, is counted if no usage comes.
async fn pass_stream(
    route: &ChatRoute,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut open: OpenResponse,
    body: Bytes,
    mut strip: Option<UsageChunkFilter>,
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
    // Events beyond the bound are still passed on, just not parsed for usage.
    let mut parser = UpstreamSseParser::new(DEFAULT_MAX_EVENT_BYTES);
    let recording = ctx.trace.as_deref().is_some_and(RequestTrace::is_recording);
    if recording {
        parser.report_finish();
    }
    let mut awaiting_first_token = recording;
    let mut seen = Seen {
        // The answer text of the piece in hand, when the exchange is recorded.
        text: ctx.conversation.as_deref_mut().map(|draft| {
            draft.answer_started();
            String::new()
        }),
        finish: recording.then(FinishSeen::default),
        ..Seen::default()
    };
    let mut out = BytesMut::new();
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
                let rest = strip.as_mut().map(|filter| {
                    filter.finish(&mut out);
                    out.split().freeze()
                });
                let rest = rest.filter(|rest| !rest.is_empty());
                if session.write_response_body(rest, true).await.is_err() {
                    ctx.outcome = "client_gone";
                }
                // Usage parsing is best effort: a body the parser refuses is still passed on.
                let _ = parser.finish(&mut |event| seen.take(event));
                break None;
            }
            Ok(Ok(Some(piece))) => piece,
        };
        let _ = parser.feed(&piece, &mut |event| seen.take(event));
        if awaiting_first_token && seen.answered {
            awaiting_first_token = false;
            if let Some(trace) = ctx.trace.as_deref() {
                trace.first_token();
            }
        }
        let piece = match strip.as_mut() {
            Some(filter) => {
                filter.feed(&piece, &mut out);
                out.split().freeze()
            }
            None => piece,
        };
        if piece.is_empty() {
            continue;
        }
        if session
            .write_response_body(Some(piece), false)
            .await
            .is_err()
        {
            ctx.outcome = "cancelled";
            break None;
        }
        active.sent();
        if let (Some(draft), Some(text)) = (ctx.conversation.as_deref_mut(), seen.text.as_mut()) {
            draft.answer_sent(text);
            text.clear();
        }
    };
    ctx.tokens = seen.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
    if let (Some(trace), Some(finish)) = (ctx.trace.as_deref_mut(), seen.finish.take()) {
        trace.stream_seen(finish);
    }
    match failure {
        Some(cause) => {
            drop(open);
            ctx.outcome = "upstream_error";
            ctx.abort = true;
            tracing::debug!(request_id = %ctx.request_id, cause = %cause, "pass-through stream failed after the first byte");
        }
        None if ctx.outcome == "ok" => upstream.release(open).await,
        None => {
            // Closes the upstream connection, cancelling the generation (before any count).
            drop(open);
        }
    }
    if ctx.tokens.is_none() {
        // After the client's last byte: counting never delays the answer.
        ctx.tokens = Some(estimate_stream(body, seen.completion).await);
        ctx.tokens_estimated = true;
    }
}

/// What the stream said, read on the side: its usage, its text while no usage came,
/// (when the exchange is recorded) the text of the piece in hand, and (when the trace
/// is recorded) the model and finish reasons.
#[derive(Default)]
struct Seen {
    usage: Option<Usage>,
    completion: CompletionText,
    text: Option<String>,
    finish: Option<FinishSeen>,
    /// A piece of answer text came.
    answered: bool,
}

impl Seen {
    fn take(&mut self, event: UpstreamEvent<'_>) {
        match event {
            UpstreamEvent::Usage(u) => {
                self.usage = Some(u);
                self.completion.clear();
            }
            UpstreamEvent::Delta(text) => {
                self.answered = true;
                if let Some(kept) = self.text.as_mut() {
                    kept.push_str(&text);
                }
                if self.usage.is_none() {
                    self.completion.push(&text);
                }
            }
            UpstreamEvent::Finish { reason, model } => {
                if let Some(finish) = self.finish.as_mut() {
                    finish.note(&reason, model.as_deref());
                }
            }
            UpstreamEvent::Done | UpstreamEvent::Error(_) => {}
        }
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
