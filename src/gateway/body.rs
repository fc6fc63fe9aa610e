//! Reading a request body into memory under a size limit and a time limit. The
//! declared `Content-Length` is checked first, so an oversized upload is refused
//! before it is read; a body that trickles in (slowloris) or never ends is cut off.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::ApiError;

/// Longest wait for the next piece of a body.
const MAX_READ_GAP: Duration = Duration::from_secs(10);

/// Reads the whole request body, or fails with 413 once it exceeds `limit`.
/// A client that breaks off mid-body, or has not sent it all `within`, yields
/// `Err(None)`: the connection is closed without an answer.
pub(super) async fn read_limited(
    session: &mut Session,
    limit: usize,
    within: Duration,
) -> Result<Bytes, Option<ApiError>> {
    let previous = session.get_read_timeout();
    session.set_read_timeout(Some(within.min(MAX_READ_GAP)));
    let read = tokio::time::timeout(within, read_body(session, limit)).await;
    session.set_read_timeout(previous);
    match read {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(
                within_ms = within.as_millis() as u64,
                "request body not received in time"
            );
            session.set_keepalive(None);
            Err(None)
        }
    }
}

async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, Option<ApiError>> {
    let declared = session
        .get_header(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Some(ApiError::BodyTooLarge { limit }));
    }
    let expects_continue = session
        .get_header(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && session.write_continue_response().await.is_err() {
        return Err(None);
    }
    // A declared length is only a promise: start small, grow with what arrives.
    let mut body = BytesMut::with_capacity(declared.map_or(4096, |n| n.min(64 << 10) as usize));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(Some(ApiError::BodyTooLarge { limit }));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                tracing::debug!(error = %e.etype().as_str(), "client broke off while sending the body");
                session.set_keepalive(None);
                return Err(None);
            }
        }
    }
}
