//! The gateway's one error type and its one mapping onto the status codes and
//! `{"errorMessage": ...}` bodies of docs/api.md. Handlers return `ApiError`; only
//! [`ApiError::status`] and [`ApiError::message`] decide what the client sees.

use std::time::Duration;

/// Every way a request can fail in a way the client is told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No route for the path.
    NotFound,
    /// Known path, wrong method; carries the value of the `Allow` header.
    MethodNotAllowed { allow: &'static str },
    /// `/auth` without a usable username/password pair.
    CredentialsMissing,
    /// `/auth` with an unknown user, a wrong password or a disabled user.
    CredentialsRejected,
    /// Authorization header missing or not `Bearer <token>`.
    BearerMissing,
    /// Token forged, expired, not yet valid, revoked, or its user disabled.
    TokenRejected,
    /// The request body is not what the route takes; the text says what is wrong.
    InvalidRequest(String),
    /// The request body is larger than the configured limit.
    BodyTooLarge { limit: usize },
    /// The request body stopped arriving before it was complete (`limits.body_timeout`,
    /// or a read gap of 10 s).
    BodyTimeout,
    /// A rate limit was hit; the client may retry after this long.
    TooManyRequests { retry_after: Duration },
    /// `/auth` found every password hashing thread busy for the whole queue timeout
    /// (a login flood); answered like a rate limit.
    HashersBusy { retry_after: Duration },
    /// The credential store (Redis, users file) could not be reached.
    CredentialStoreUnavailable,
    /// The upstream LLM call failed before any answer byte was sent.
    Upstream(String),
    /// A bug or an unexpected local failure; the text is a short cause.
    Internal(String),
}

impl ApiError {
    /// The HTTP status docs/api.md assigns to this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::CredentialsMissing
            | ApiError::CredentialsRejected
            | ApiError::BearerMissing
            | ApiError::TokenRejected => 401,
            ApiError::InvalidRequest(_) => 400,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::BodyTimeout => 408,
            ApiError::TooManyRequests { .. } | ApiError::HashersBusy { .. } => 429,
            ApiError::CredentialStoreUnavailable => 503,
            ApiError::Upstream(_) | ApiError::Internal(_) => 500,
        }
    }

    /// The `errorMessage` text docs/api.md assigns to this error.
    pub fn message(&self) -> String {
        match self {
            ApiError::NotFound => "Not found".into(),
            ApiError::MethodNotAllowed { .. } => "Method not allowed".into(),
            ApiError::CredentialsMissing => {
                "Authentication failed: cannot find username/password in request body.".into()
            }
            ApiError::CredentialsRejected => {
                "Authentication failed: cannot authenticate with provided username and password."
                    .into()
            }
            ApiError::BearerMissing => "Invalid token: empty or not starts with 'Bearer '".into(),
            ApiError::TokenRejected => "Invalid token: expired or fake token.".into(),
            ApiError::InvalidRequest(what) => format!("Invalid request: {what}"),
            ApiError::BodyTooLarge { limit } => {
                format!("Invalid request: body exceeds {limit} bytes")
            }
            ApiError::BodyTimeout => "Invalid request: body not received in time".into(),
            ApiError::TooManyRequests { retry_after } | ApiError::HashersBusy { retry_after } => {
                format!(
                    "Too many requests: retry after {} seconds.",
                    retry_after_secs(*retry_after)
                )
            }
            ApiError::CredentialStoreUnavailable => {
                "Service unavailable: credential store unreachable.".into()
            }
            ApiError::Upstream(cause) => upstream_failure_message(cause),
            ApiError::Internal(cause) => format!("Internal error: {cause}"),
        }
    }

    /// Extra response headers this error carries (`Allow`, `Retry-After`).
    pub fn extra_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::MethodNotAllowed { allow } => vec![("Allow", (*allow).to_string())],
            ApiError::TooManyRequests { retry_after } | ApiError::HashersBusy { retry_after } => {
                vec![("Retry-After", retry_after_secs(*retry_after).to_string())]
            }
            _ => Vec::new(),
        }
    }

    /// The full JSON body, `{"errorMessage": "<text>"}`.
    pub fn body(&self) -> Vec<u8> {
        error_body(&self.message())
    }
}

/// `Failed with chatbot.ChatCompletion: <cause>`, the text of every upstream
/// failure, both as a 500 body and inside a mid-stream `event: error`.
pub fn upstream_failure_message(cause: &str) -> String {
    format!("Failed with chatbot.ChatCompletion: {cause}")
}

/// Whole seconds for `Retry-After`, rounded up and never 0.
fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// A one-field JSON object in the contract's layout: `{"<key>": <string>}`.
pub fn json_object1(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 16);
    out.push(b'{');
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, key);
    out.extend_from_slice(b": ");
    let _ = serde_json::to_writer(&mut out, value);
    out.push(b'}');
    out
}

/// `{"errorMessage": "<text>"}`.
pub fn error_body(message: &str) -> Vec<u8> {
    json_object1("errorMessage", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_match_the_contract_texts() {
        assert_eq!(
            ApiError::BearerMissing.body(),
            br#"{"errorMessage": "Invalid token: empty or not starts with 'Bearer '"}"#.to_vec()
        );
        assert_eq!(
            ApiError::BodyTooLarge { limit: 1048576 }.message(),
            "Invalid request: body exceeds 1048576 bytes"
        );
        assert_eq!(
            ApiError::Upstream("upstream returned 503".into()).message(),
            "Failed with chatbot.ChatCompletion: upstream returned 503"
        );
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let e = ApiError::TooManyRequests {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(e.message(), "Too many requests: retry after 2 seconds.");
        assert_eq!(e.extra_headers(), vec![("Retry-After", "2".to_string())]);
        let e = ApiError::TooManyRequests {
            retry_after: Duration::ZERO,
        };
        assert_eq!(e.extra_headers(), vec![("Retry-After", "1".to_string())]);
    }

    #[test]
    fn busy_hashers_are_answered_like_a_rate_limit() {
        let busy = ApiError::HashersBusy {
            retry_after: Duration::from_millis(250),
        };
        let limited = ApiError::TooManyRequests {
            retry_after: Duration::from_millis(250),
        };
        assert_eq!(busy.status(), 429);
        assert_eq!(busy.body(), limited.body());
        assert_eq!(busy.extra_headers(), vec![("Retry-After", "1".to_string())]);
    }

    #[test]
    fn json_escapes_quotes_and_controls() {
        assert_eq!(
            json_object1("message", "a\"b\n"),
            br#"{"message": "a\"b\n"}"#.to_vec()
        );
        assert_eq!(
            json_object1("message", "你\u{1}"),
            "{\"message\": \"你\\u0001\"}".as_bytes()
        );
    }
}
