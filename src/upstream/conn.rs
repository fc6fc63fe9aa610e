//! The upstream HTTP/1 client: connections opened here (TCP, or TLS with
//! rustls checked against `ca_file` or the platform's roots and the `sni`
//! name), each driven by hyper's `client::conn::http1` in its own task, and a
//! bounded pool of idle ones per upstream. hyper reads into a buffer of a few
//! KiB that grows only for large events; Pingora's client held a fixed 64 KiB
//! body buffer per response, most of an open stream's memory.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pingora::tls::{ClientConfig, RootCertStore, ServerName, TlsConnector};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

/// The request body type sent upstream.
pub type Body = Full<Bytes>;

/// Bytes hyper reads from an upstream socket at a time; a larger event
/// grows the buffer for as long as it is being read.
const READ_BUFFER: usize = 4 << 10;

/// One open upstream connection. Dropped without [`Pool::put`], it is closed
/// at once (its task is aborted): a client that leaves cancels the upstream.
pub struct Conn {
    /// Sends the next request on it.
    pub sender: SendRequest<Body>,
    driver: AbortHandle,
    endpoint: usize,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
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
    let mut roots = RootCertStore::empty();
    let loaded = match ca_file {
        Some(path) => pingora::tls::load_ca_file_into_store(path, &mut roots),
        None => pingora::tls::load_platform_certs_incl_env_into_store(&mut roots),
    };
    loaded.map_err(|e| format!("cannot load the upstream CA certificates: {e}"))?;
    pingora::tls::install_default_crypto_provider();
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
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
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    })
    .abort_handle();
    Ok(Conn {
        sender,
        driver,
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
            if !conn.sender.is_closed() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read to its end.
    pub fn put(&self, conn: Conn) {
        if conn.sender.is_closed() {
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
            .is_some_and(|(since, c)| now - *since >= self.idle_timeout || c.sender.is_closed())
        {
            queue.pop_front();
        }
    }
}
