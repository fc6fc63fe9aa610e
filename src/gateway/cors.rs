//! Cross-origin requests from browser pages: preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) are answered here, and an allowed
//! `Origin` is echoed exactly on every reply (see `reply::header`), never `*`.

use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::RequestCtx;
use crate::config::CorsSettings;

/// Methods the public routes take.
const ALLOWED_METHODS: &str = "POST, OPTIONS";
/// Reply headers a page may read besides the CORS-safelisted ones.
const EXPOSED_HEADERS: &str = "X-Request-Id, Retry-After";

/// Notes the request's `Origin` in `ctx` when it is allowed.
pub(super) fn admit(cors: &CorsSettings, session: &Session, ctx: &mut RequestCtx) {
    let origin = session
        .get_header(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if let Some(origin) = origin.filter(|o| cors.allows(o)) {
        ctx.cors_origin = Some(origin.to_string());
        ctx.cors_credentials = cors.allow_credentials;
    }
}

/// Whether the request is a CORS preflight.
pub(super) fn is_preflight(session: &Session) -> bool {
    session.req_header().method == http::Method::OPTIONS
        && session
            .get_header(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some()
}

/// Adds the CORS headers of an actual (non-preflight) reply.
pub(super) fn add_reply_headers(ctx: &RequestCtx, h: &mut ResponseHeader) -> pingora::Result<()> {
    h.insert_header(http::header::VARY, "Origin")?;
    if let Some(origin) = &ctx.cors_origin {
        h.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.as_str())?;
        h.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS)?;
        if ctx.cors_credentials {
            h.insert_header(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
    }
    Ok(())
}

/// Answers a preflight: 204, and the permissions when the origin is allowed
/// (without them the browser refuses the actual request).
pub(super) async fn answer_preflight(
    cors: &CorsSettings,
    session: &mut Session,
    ctx: &mut RequestCtx,
) {
    ctx.status = 204;
    let result = async {
        let mut h = ResponseHeader::build(204, Some(8))?;
        h.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        h.insert_header(http::header::VARY, "Origin")?;
        if let Some(origin) = &ctx.cors_origin {
            h.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.as_str())?;
            h.insert_header(http::header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS)?;
            h.insert_header(
                http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                cors.allowed_headers.join(", "),
            )?;
            h.insert_header(
                http::header::ACCESS_CONTROL_MAX_AGE,
                cors.max_age.as_secs().to_string(),
            )?;
            if ctx.cors_credentials {
                h.insert_header(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
            }
        }
        session.write_response_header(Box::new(h), true).await
    }
    .await;
    if result.is_err() {
        ctx.outcome = "client_gone";
    }
}
