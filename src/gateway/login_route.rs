//! `POST /auth`: read the body, pull out the credentials in whichever form
//! they came, and answer `{"accessToken": ...}` or the error docs/api.md gives; failed
//! logins count against the name's and the address's brute-force limits.

use std::net::IpAddr;

use pingora::proxy::Session;

use super::{body, reply, RequestCtx};
use crate::auth::login::extract_credentials;
use crate::auth::Authenticator;
use crate::config::Limits;
use crate::error::{json_object1, ApiError};
use crate::limits::Limiter;

/// Handles one login request; errors are answered by the caller.
pub(super) async fn handle(
    auth: &Authenticator,
    limiter: &Limiter,
    limits: &Limits,
    client_ip: Option<IpAddr>,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    let body =
        match body::read_limited(session, limits.max_auth_body_bytes, limits.body_timeout).await {
            Ok(body) => body,
            Err(Some(e)) => return Err(e),
            Err(None) => {
                ctx.outcome = "client_gone";
                return Ok(());
            }
        };
    let req = session.req_header();
    let content_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let query = req.uri.query().map(str::to_string);
    let credentials = extract_credentials(content_type.as_deref(), body, query.as_deref()).await;
    let username = credentials.as_ref().map(|c| c.username.clone());
    let token = limiter
        .guard_login(username.as_deref(), client_ip, auth.login(credentials))
        .await?;
    let body = json_object1("accessToken", &token);
    reply::send_json(
        session,
        ctx,
        200,
        body,
        &[("Cache-Control", "no-store".into())],
    )
    .await;
    Ok(())
}
