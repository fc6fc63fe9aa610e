//! A deadline for a request's headers as a whole. Pingora's header read timer
//! restarts on every byte, so a client dripping one byte a minute holds its
//! connection forever; this stream wrapper fails the read once
//! `limits.header_timeout` has passed since the connection opened (first
//! request) or since the first byte of a later request on a kept-alive one.
//!
//! The gateway says when the headers are in (`early_request_filter`) and when
//! the request is over (`logging`); between the two the deadline is off, so
//! request bodies keep their own `limits.body_timeout`. Idle time between
//! requests is Pingora's keep-alive timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics;

/// The deadline runs: request headers are being read.
const HEADERS: u8 = 0;
/// Headers are in; the request is being handled (its body has its own timeout).
const IN_REQUEST: u8 = 1;
/// Between requests: the next byte read starts the deadline again.
const IDLE: u8 = 2;

/// What a read past the deadline fails with (also how the log filter knows it).
pub const TIMEOUT_MESSAGE: &str = "request headers took longer than limits.header_timeout";

/// A downstream stream whose request headers must arrive within a deadline.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    timeout: Duration,
    phase: AtomicU8,
    deadline: Pin<Box<Sleep>>,
}

impl HeaderDeadline {
    /// Wraps a freshly accepted stream; the first request's headers are due
    /// `timeout` from now.
    pub fn new(inner: Stream, timeout: Duration) -> Self {
        HeaderDeadline {
            inner,
            timeout,
            phase: AtomicU8::new(HEADERS),
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

fn with_deadline(stream: Option<&Stream>, phase: u8) {
    if let Some(d) = stream.and_then(|s| (**s).as_any().downcast_ref::<HeaderDeadline>()) {
        d.phase.store(phase, Ordering::Release);
    }
}

/// The request's headers are in: stop the deadline while it is handled.
pub fn headers_done(stream: Option<&Stream>) {
    with_deadline(stream, IN_REQUEST);
}

/// The request is over: the next request's first byte starts a new deadline.
pub fn request_done(stream: Option<&Stream>) {
    with_deadline(stream, IDLE);
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.phase.load(Ordering::Acquire) {
            HEADERS => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    metrics::client_error("header_timeout");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        TIMEOUT_MESSAGE,
                    )));
                }
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            IDLE => {
                let before = buf.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                    this.phase.store(HEADERS, Ordering::Release);
                    this.deadline.as_mut().reset(Instant::now() + this.timeout);
                }
                read
            }
            _ => Pin::new(&mut this.inner).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

crate::stream_wrap::forward_stream_traits!(HeaderDeadline);
