//! Requests Pingora refuses before any `ProxyHttp` hook runs (a malformed request line,
//! a bad `Content-Length`, a header section over its limits): Pingora writes a canned,
//! empty-bodied `400 Bad Request` itself. [`FramingGuard`] wraps each public connection's
//! stream and turns exactly that canned reply into the JSON error of docs/api.md, with an
//! `X-Request-Id`, and counts it as a request of route `unparsed`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;
use crate::metrics;

/// Serves `inner` (the Pingora HTTP proxy) on streams that rewrite Pingora's own 400.
pub struct FramingGuard<A> {
    inner: Arc<A>,
}

impl<A> FramingGuard<A> {
    /// Wraps an app.
    pub fn new(inner: A) -> Self {
        FramingGuard {
            inner: Arc::new(inner),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for FramingGuard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let guarded: Stream = Box::new(Guarded::new(stream));
        self.inner.process_new(guarded, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Whether a write is the head of Pingora's canned 400 (`gen_error_response(400)`: a
/// `Server: Pingora` header and `Content-Length: 0`); chatgate's own replies never carry
/// a `Server` header.
fn is_pingoras_400(buf: &[u8]) -> bool {
    const STATUS: &[u8] = b"HTTP/1.1 400 ";
    if !buf.starts_with(STATUS) {
        return false;
    }
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = buf[..end].to_ascii_lowercase();
    memchr::memmem::find(&head, b"\r\nserver: pingora").is_some()
        && memchr::memmem::find(&head, b"\r\ncontent-length: 0").is_some()
}

/// The reply written instead: the 400 body of docs/api.md, then the close Pingora intended.
fn contract_400() -> Vec<u8> {
    let error = ApiError::InvalidRequest("malformed HTTP request".into());
    let body = error.body();
    let mut out = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Request-Id: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len(),
        super::fresh_request_id()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A connection's stream; everything passes through, except Pingora's canned 400.
#[derive(Debug)]
struct Guarded {
    inner: Stream,
    /// The replacement still to be written for the canned head being written now, and
    /// that head's length (what the caller is told was written).
    replacing: Option<(Vec<u8>, usize, usize)>,
    opened: Instant,
}

impl Guarded {
    fn new(inner: Stream) -> Self {
        Guarded {
            inner,
            replacing: None,
            opened: Instant::now(),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.replacing.is_none() && is_pingoras_400(buf) {
            // Pingora's canned reply has no body: the head is the whole reply.
            let end = memchr::memmem::find(buf, b"\r\n\r\n").map_or(buf.len(), |e| e + 4);
            metrics::request_done("unparsed", 400, self.opened.elapsed());
            tracing::debug!("request refused by Pingora's parser; answered with JSON");
            self.replacing = Some((contract_400(), 0, end));
        }
        let this = &mut *self;
        let Some((reply, written, head_len)) = this.replacing.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < reply.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &reply[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let head_len = *head_len;
        this.replacing = None;
        Poll::Ready(Ok(head_len))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

crate::stream_wrap::forward_stream_traits!(Guarded);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_pingoras_canned_400() {
        let canned = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\n\r\n";
        assert!(is_pingoras_400(canned));
        assert!(is_pingoras_400(
            b"HTTP/1.1 400 Bad Request\r\nserver: Pingora\r\ncontent-length: 0\r\n\r\n"
        ));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 52\r\nx-request-id: abc\r\n\r\n";
        assert!(!is_pingoras_400(ours));
        assert!(!is_pingoras_400(
            b"HTTP/1.1 200 OK\r\nServer: Pingora\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!is_pingoras_400(b"{\"message\": \"HTTP/1.1 400 \"}"));
        let reply = String::from_utf8(contract_400()).unwrap();
        assert!(
            reply.ends_with(
                "\r\n\r\n{\"errorMessage\": \"Invalid request: malformed HTTP request\"}"
            ),
            "{reply}"
        );
    }
}
