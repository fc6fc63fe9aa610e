//! Reading a request body into memory under a size limit and a time limit. The
//! declared `Content-Length` is checked first, so an oversized upload is refused
//! before it is read; a body that trickles in (slowloris) or never ends is cut off.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::ApiError;

/// Longest wait for the next piece of a body.
const MAX_READ_GAP: Duration = Duration::from_secs(10);

/// Reads the whole request body, or fails with 413 once it exceeds `limit`, 400 when its
/// chunked framing is broken, 408 when it has not all arrived `within` (or a piece takes
/// longer than [`MAX_READ_GAP`]). A client that breaks off mid-body yields `Err(None)`:
/// there is nobody left to answer.
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
            Err(Some(ApiError::BodyTimeout))
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
                session.set_keepalive(None);
                return Err(body_error(&e));
            }
        }
    }
}

/// What a failed body read is answered with: Pingora's chunked-framing errors (its
/// `InvalidChunk`, `InvalidTrailerEnd` error types) are the client's malformed request,
/// a read timeout is a body that stopped arriving; anything else means the client left.
fn body_error(e: &pingora::Error) -> Option<ApiError> {
    match e.etype() {
        pingora::ErrorType::ReadTimedout => {
            tracing::debug!("request body stopped arriving");
            Some(ApiError::BodyTimeout)
        }
        pingora::ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd") => {
            tracing::debug!(error = %e, "malformed chunked request body");
            Some(ApiError::InvalidRequest("malformed chunked body".into()))
        }
        other => {
            tracing::debug!(error = %other.as_str(), "client broke off while sending the body");
            None
        }
    }
}
