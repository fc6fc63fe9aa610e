//! Reading a request body into memory under a size limit. The declared
//! `Content-Length` is checked first, so an oversized upload is refused
//! before it is read.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::ApiError;

/// Reads the whole request body, or fails with 413 once it exceeds `limit`.
/// A client that breaks off mid-body yields `Err(None)`: nobody to answer.
pub(super) async fn read_limited(
    session: &mut Session,
    limit: usize,
) -> Result<Bytes, Option<ApiError>> {
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
    let mut body = BytesMut::with_capacity(declared.map_or(4096, |n| n as usize));
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
                return Err(None);
            }
        }
    }
}
