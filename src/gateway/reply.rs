//! Writing complete replies downstream: JSON bodies with the headers every
//! reply carries (`X-Request-Id`, `Content-Type`, `nosniff`), and errors
//! through [`ApiError`]'s one mapping.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::RequestCtx;

/// How long an early reply waits for the rest of an unread request body.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
use crate::error::ApiError;

/// A response header with the headers common to every reply (and the CORS
/// headers when the request came from an allowed origin).
pub(super) fn header(
    status: u16,
    ctx: &RequestCtx,
    content_type: &str,
    content_length: Option<usize>,
) -> pingora::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header(http::header::CONTENT_TYPE, content_type)?;
    if let Some(n) = content_length {
        h.insert_header(http::header::CONTENT_LENGTH, n.to_string())?;
    }
    h.insert_header("X-Request-Id", ctx.request_id.as_str())?;
    h.insert_header("X-Content-Type-Options", "nosniff")?;
    if ctx.cors_origin.is_some() {
        super::cors::add_reply_headers(ctx, &mut h)?;
    }
    Ok(h)
}

/// Sends a complete JSON reply; `extra` headers are added as given.
pub(super) async fn send_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) {
    ctx.status = status;
    let result = async {
        let mut h = header(status, ctx, "application/json", Some(body.len()))?;
        for (name, value) in extra {
            h.insert_header(*name, value.as_str())?;
        }
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await
    }
    .await;
    if let Err(e) = result {
        ctx.outcome = "client_gone";
        tracing::debug!(request_id = %ctx.request_id, error = %e.etype().as_str(), "could not write reply");
    }
}

/// Sends an error as docs/api.md says: its status, its extra headers, and
/// `{"errorMessage": ...}`.
pub(super) async fn send_error(session: &mut Session, ctx: &mut RequestCtx, error: &ApiError) {
    if ctx.outcome == "ok" {
        ctx.outcome = "error";
    }
    let mut extra = error.extra_headers();
    if ctx.route == "/auth" {
        extra.push(("Cache-Control", "no-store".into()));
    }
    send_json(session, ctx, error.status(), error.body(), &extra).await;
    // A body that stopped arriving is not waited for again.
    if *error != ApiError::BodyTimeout {
        discard_unread_body(session).await;
    }
}

/// After an early reply, reads (and drops) what the client is still sending,
/// for a bounded time, so that closing the socket with unread data does not
/// reset the connection before the client has read the reply. A client that
/// waits for `100 Continue` was never told to send, so there is nothing to read.
async fn discard_unread_body(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    let awaits_continue = session
        .get_header(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drained = !awaits_continue
        && tokio::time::timeout(DRAIN_TIME, session.drain_request_body())
            .await
            .is_ok_and(|r| r.is_ok());
    if !drained {
        session.set_keepalive(None);
    }
}
