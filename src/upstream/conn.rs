//! The upstream HTTP/1 client: connections opened here (TCP, or TLS with
//! rustls checked against `ca_file` or the platform's roots and the `sni`
//! name), each spoken by hyper's `client::conn::http1` in the task of the
//! request that holds it (no task of its own: no hop between threads per
//! exchange), and a bounded pool of idle ones per upstream. hyper reads into a buffer of a few
//! KiB that grows only for large events; Pingora's client held a fixed 64 KiB
//! body buffer per response, most of an open stream's memory.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pingora::tls::{ServerName, TlsConnector};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The request body type sent upstream.
pub type Body = Full<Bytes>;

/// Bytes hyper reads from an upstream socket at a time; a larger event
/// grows the buffer for as long as it is being read.
const READ_BUFFER: usize = 4 << 10;

/// hyper's connection state machine (socket reads and writes), type-erased
/// over TCP and TLS; `None` once it has ended.
type Driver = Option<Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>>;

/// One open upstream connection. Dropped without [`Pool::put`], it is closed
/// at once: a client that leaves cancels the upstream.
pub struct Conn {
    sender: SendRequest<Body>,
    driver: Driver,
    endpoint: usize,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
}

impl Conn {
    /// Waits until the connection can take a request (an error: it is closed).
    pub async fn ready(&mut self) -> hyper::Result<()> {
        driving(&mut self.driver, self.sender.ready()).await
    }

    /// Sends a request and waits for the response header.
    pub async fn send(
        &mut self,
        req: http::Request<Body>,
    ) -> hyper::Result<http::Response<Incoming>> {
        let response = self.sender.send_request(req);
        driving(&mut self.driver, response).await
    }

    /// The next frame of a response body received on this connection.
    pub async fn frame(&mut self, body: &mut Incoming) -> Option<hyper::Result<Frame<Bytes>>> {
        driving(&mut self.driver, http_body_util::BodyExt::frame(body)).await
    }

    fn is_closed(&self) -> bool {
        self.driver.is_none() || self.sender.is_closed()
    }
}

/// Runs `f` while moving the connection's bytes in the same task. When the
/// connection ends first it is dropped, which fails whatever `f` waits for.
async fn driving<F: Future>(driver: &mut Driver, f: F) -> F::Output {
    let mut f = pin!(f);
    std::future::poll_fn(|cx| {
        if let Some(d) = driver.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                *driver = None;
            }
        }
        f.as_mut().poll(cx)
    })
    .await
}

/// Opens connections to one upstream's endpoints.
pub struct Connector {
    tls: Option<Result<TlsConnector, String>>,
}

impl Connector {
    /// Plain TCP, or TLS trusting only `ca_file` when given (the platform's
    /// roots otherwise), as Pingora's connector did.
    pub fn new(tls: bool, ca_file: Option<&std::path::Path>) -> Self {
        Connector {
            tls: tls.then(|| tls_connector(ca_file)),
        }
    }

    /// A new connection to `addr`, TLS-checked against `sni`; the error is a
    /// short cause fit for a client (no key ever takes part in a connect).
    pub async fn connect(
        &self,
        endpoint: usize,
        addr: SocketAddr,
        sni: &str,
        tcp_timeout: Duration,
    ) -> Result<Conn, String> {
        let tcp = match tokio::time::timeout(tcp_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "connect timed out after {}",
                    humantime::format_duration(tcp_timeout)
                ))
            }
        };
        // Header and body go out in one vectored write; nothing waits for more.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp, endpoint).await,
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(tls)) => {
                let name = ServerName::try_from(sni.to_string())
                    .map_err(|_| format!("invalid TLS server name {sni:?}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                handshake(stream, endpoint).await
            }
        }
    }
}

fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<TlsConnector, String> {
    let mut config =
        crate::tls::client_config(ca_file).map_err(|e| format!("upstream TLS: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn handshake<S>(io: S, endpoint: usize) -> Result<Conn, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .read_buf_exact_size(Some(READ_BUFFER))
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Conn {
        sender,
        driver: Some(Box::pin(connection)),
        endpoint,
        reused: false,
    })
}

/// Idle connections of one upstream, newest last per endpoint, at most
/// `capacity` in all; each is kept `idle_timeout` at most.
pub struct Pool {
    idle: Mutex<Vec<VecDeque<(Instant, Conn)>>>,
    capacity: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// An empty pool for `endpoints` endpoints.
    pub fn new(endpoints: usize, capacity: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new((0..endpoints).map(|_| VecDeque::new()).collect()),
            capacity,
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `endpoint` that is still
    /// open and fresh; stale ones met on the way are closed.
    pub fn take(&self, endpoint: usize) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let queue = idle.get_mut(endpoint)?;
        self.expire(queue, now);
        while let Some((_, mut conn)) = queue.pop_back() {
            if !conn.is_closed() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read to its end.
    pub fn put(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = idle.iter().map(VecDeque::len).sum();
        let Some(queue) = idle.get_mut(conn.endpoint) else {
            return;
        };
        self.expire(queue, now);
        if total < self.capacity {
            queue.push_back((now, conn));
        }
    }

    fn expire(&self, queue: &mut VecDeque<(Instant, Conn)>, now: Instant) {
        while queue
            .front()
            .is_some_and(|(since, c)| now - *since >= self.idle_timeout || c.is_closed())
        {
            queue.pop_front();
        }
    }
}
