//! TLS listeners: caps and a deadline before the handshake.
//!
//! Pingora runs a TLS handshake (for up to 60 s) before it hands the connection
//! to the app, so [`super::Guarded`] alone would count a TLS connection only
//! once its handshake is done: a flood of connections that never finish one
//! would hold file descriptors outside every cap. [`HandshakeGate`] runs right
//! after accept, before the handshake: it takes the connection's [`Slot`] (or
//! closes it at once past a cap), waits for the ClientHello for at most
//! `limits.header_timeout`, and parks the slot under the socket's descriptor
//! and peer address until `Guarded` picks it up. A handshake that fails leaves
//! its slot parked; a parked slot whose socket is gone (the descriptor closed,
//! or now another peer's) is freed on the next sweep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use tokio::io::AsyncReadExt;

use super::{ConnectionLimits, Refusal, Slot};
use crate::metrics;

/// What a connection closed before its handshake fails with (also how the log
/// filter knows the refusal is counted already).
pub const REFUSED_MESSAGE: &str = "connection refused before its TLS handshake";
/// What a ClientHello later than the deadline fails with.
pub const HELLO_TIMEOUT_MESSAGE: &str = "TLS ClientHello took longer than limits.header_timeout";

/// Pingora gives up on a handshake after 60 s; a slot parked longer is freed whatever its socket says.
const PARKED_AT_MOST: Duration = Duration::from_secs(65);
/// Parked slots are looked at no more often than this (and before any refusal).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// TLS record header: content type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE_RECORD: u8 = 0x16;
/// The largest TLS record a ClientHello can come in (2^14 plus expansion).
const RECORD_MAX: usize = (1 << 14) + 2048;

/// Slots of connections in their TLS handshake, by descriptor and peer.
#[derive(Debug, Default)]
pub struct Parked {
    slots: Mutex<ParkedSlots>,
}

#[derive(Debug, Default)]
struct ParkedSlots {
    by_socket: HashMap<(RawFd, SocketAddr), (Slot, Instant)>,
    swept: Option<Instant>,
}

impl Parked {
    pub(super) fn park(&self, fd: RawFd, peer: SocketAddr, slot: Slot) {
        let mut parked = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // A stale entry under the same key is a socket that is gone: its slot goes
        // (dropped outside this lock, like every slot here).
        let stale = parked.by_socket.insert((fd, peer), (slot, Instant::now()));
        drop(parked);
        drop(stale);
    }

    /// The slot parked for this handshaken connection, if any.
    pub fn take(&self, fd: RawFd, peer: SocketAddr) -> Option<Slot> {
        let mut parked = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        parked.by_socket.remove(&(fd, peer)).map(|(slot, _)| slot)
    }

    /// Frees the slots of sockets that are gone; `force` looks even if a sweep just ran.
    pub fn sweep(&self, force: bool) {
        let now = Instant::now();
        let gone = {
            let mut parked = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if !force
                && parked
                    .swept
                    .is_some_and(|at| now.duration_since(at) < SWEEP_EVERY)
            {
                return;
            }
            parked.swept = Some(now);
            let keys: Vec<_> = parked
                .by_socket
                .iter()
                .filter(|((fd, peer), (_, since))| {
                    now.duration_since(*since) > PARKED_AT_MOST || peer_of(*fd) != Some(*peer)
                })
                .map(|(key, _)| *key)
                .collect();
            keys.iter()
                .filter_map(|key| parked.by_socket.remove(key))
                .collect::<Vec<_>>()
        };
        // Slots drop (and take the limits' lock) outside this one.
        drop(gone);
    }

    /// Connections parked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        let parked = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        parked.by_socket.len()
    }
}

/// The peer address of the socket `fd` refers to now, if it is a connected socket.
fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into the storage it is given.
    let rc = unsafe {
        libc::getpeername(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a =
                unsafe { *(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe {
                *(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// The pre-handshake step of a TLS listener (see the module comment).
pub struct HandshakeGate {
    limits: Arc<ConnectionLimits>,
    header_timeout: Duration,
}

impl HandshakeGate {
    /// A gate taking slots from `limits` (whose [`Parked`] the listener's `Guarded` reads).
    pub fn new(limits: Arc<ConnectionLimits>, header_timeout: Duration) -> Self {
        HandshakeGate {
            limits,
            header_timeout,
        }
    }

    fn admit(&self, peer: SocketAddr) -> Result<Slot, Refusal> {
        let parked = &self.limits.parked;
        parked.sweep(false);
        self.limits.admit(Some(peer.ip())).or_else(|_| {
            // Before refusing, free what failed handshakes left behind.
            parked.sweep(true);
            self.limits.admit(Some(peer.ip()))
        })
    }
}

fn refused(what: &str) -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::AcceptError, what.to_string())
}

#[async_trait]
impl PreTlsProcess for HandshakeGate {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let Some(peer) = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
        else {
            // Not an inet socket (a unix listener): nothing to cap by address.
            return Ok(());
        };
        let slot = match self.admit(peer) {
            Ok(slot) => slot,
            Err(refusal) => {
                metrics::connection_refused(self.limits.listener, refusal);
                return Err(refused(REFUSED_MESSAGE));
            }
        };
        match tokio::time::timeout(self.header_timeout, read_hello(stream)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(pingora::Error::because(
                    pingora::ErrorType::ReadError,
                    "reading the TLS ClientHello",
                    e,
                ))
            }
            Err(_) => {
                metrics::client_error("header_timeout");
                return Err(refused(HELLO_TIMEOUT_MESSAGE));
            }
        }
        self.limits.parked.park(stream.as_raw_fd(), peer, slot);
        Ok(())
    }
}

/// Reads the first TLS record (the ClientHello) and puts it back for the handshake.
/// Anything that is not a handshake record is put back at once for rustls to refuse.
async fn read_hello(stream: &mut L4Stream) -> std::io::Result<()> {
    let mut buf = vec![0; RECORD_HEADER];
    stream.read_exact(&mut buf).await?;
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf[0] == HANDSHAKE_RECORD && len <= RECORD_MAX {
        buf.resize(RECORD_HEADER + len, 0);
        stream.read_exact(&mut buf[RECORD_HEADER..]).await?;
    }
    stream.rewind(&buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::client_ip::TrustedProxies;
    use std::net::{TcpListener, TcpStream};

    fn limits(max: usize, per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits::new(
            "test",
            max,
            per_ip,
            TrustedProxies::new(Vec::new()),
        ))
    }

    /// A connected pair on loopback: (listener, client end, server end, the client's address).
    fn connected() -> (TcpListener, TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        (listener, client, server, peer)
    }

    #[test]
    fn a_parked_slot_is_freed_once_its_socket_is_gone() {
        let (_listener, client, server, peer) = connected();
        let l = limits(10, 0);
        let slot = l.admit(Some(peer.ip())).unwrap();
        l.parked.park(server.as_raw_fd(), peer, slot);
        l.parked.sweep(true);
        assert_eq!(
            (l.parked.len(), l.open()),
            (1, 1),
            "a live socket keeps its slot"
        );
        let fd = server.as_raw_fd();
        drop(server);
        drop(client);
        l.parked.sweep(true);
        assert_eq!((l.parked.len(), l.open()), (0, 0), "a closed one frees it");
        assert!(l.parked.take(fd, peer).is_none());
    }

    #[test]
    fn a_parked_slot_goes_to_the_handshaken_connection() {
        let (_listener, _client, server, peer) = connected();
        let l = limits(10, 0);
        l.parked
            .park(server.as_raw_fd(), peer, l.admit(Some(peer.ip())).unwrap());
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(
            l.parked.take(server.as_raw_fd(), other).is_none(),
            "same descriptor, other peer"
        );
        let slot = l
            .parked
            .take(server.as_raw_fd(), peer)
            .expect("parked slot");
        assert_eq!((l.parked.len(), l.open()), (0, 1));
        drop(slot);
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn peers_are_read_from_live_sockets_only() {
        let (listener, client, server, peer) = connected();
        assert_eq!(peer_of(server.as_raw_fd()), Some(peer));
        assert_eq!(
            peer_of(client.as_raw_fd()),
            Some(listener.local_addr().unwrap())
        );
        assert_eq!(
            peer_of(listener.as_raw_fd()),
            None,
            "a listening socket has no peer"
        );
    }
}
