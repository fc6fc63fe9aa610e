//! The operations listener: `/healthz` (the process serves), `/readyz` (the
//! credential store answers and every route has an endpoint that is up) and
//! `/metrics` (Prometheus text). Kept apart from the public listener so it can
//! stay private.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::auth::store::CredentialStore;
use crate::error::{error_body, json_object1, ApiError};
use crate::metrics;
use crate::upstream::health;
use crate::upstream::Upstream;

/// Answers the operations endpoints.
pub struct AdminApp {
    store: Arc<dyn CredentialStore>,
    /// (route path, its upstream) for the readiness check.
    routes: Vec<(String, Arc<Upstream>)>,
    /// Every upstream, for the endpoint gauges.
    upstreams: Vec<Arc<Upstream>>,
}

impl AdminApp {
    /// An admin app checking this store and these routes.
    pub fn new(
        store: Arc<dyn CredentialStore>,
        routes: Vec<(String, Arc<Upstream>)>,
        upstreams: Vec<Arc<Upstream>>,
    ) -> Self {
        AdminApp {
            store,
            routes,
            upstreams,
        }
    }

    async fn readiness(&self) -> Result<(), String> {
        self.store
            .ping()
            .await
            .map_err(|e| format!("credential store unreachable: {e}"))?;
        for (path, upstream) in &self.routes {
            if !upstream
                .endpoints
                .iter()
                .any(|e| e.health.is_up() && e.socket_addr().is_some())
            {
                return Err(format!(
                    "route {path}: no endpoint of upstream {} is up",
                    upstream.name()
                ));
            }
        }
        Ok(())
    }
}

fn json(status: u16, body: Vec<u8>) -> Response<Vec<u8>> {
    reply(status, body, "application/json")
}

fn reply(status: u16, body: Vec<u8>, content_type: &str) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_str(content_type)
            .unwrap_or(http::HeaderValue::from_static("text/plain")),
    );
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Headers are in and no body is read: the next request starts a new deadline.
        crate::connections::deadline::request_done(session.stream());
        let path = session.req_header().uri.path().to_string();
        let known = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
        if known && session.req_header().method != http::Method::GET {
            let error = ApiError::MethodNotAllowed { allow: "GET" };
            let mut resp = json(error.status(), error.body());
            for (name, value) in error.extra_headers() {
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, value);
                }
            }
            return resp;
        }
        match path.as_str() {
            "/healthz" => json(200, json_object1("status", "ok")),
            "/readyz" => match self.readiness().await {
                Ok(()) => json(200, json_object1("status", "ready")),
                Err(reason) => json(503, error_body(&format!("Not ready: {reason}"))),
            },
            "/metrics" => {
                health::publish(&self.upstreams);
                let (body, content_type) = metrics::render();
                reply(200, body, &content_type)
            }
            _ => json(404, error_body("Not found")),
        }
    }
}
