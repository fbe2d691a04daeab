//! The NBD server: serves any number of named [`Export`]s (each a memsync store) over TCP and
//! unix sockets, optionally with TLS.
//!
//! Per connection, one task reads requests and runs each one inline as long as the store
//! answers without waiting (the common case for memory and page-cache stores), batching the
//! small replies into one write; a request whose store must wait is moved to its own task, so
//! many requests are in flight and replies go out of order. Every reply is written as one
//! buffer (header and data together) under the connection's write lock.
//!
//! Per byte, a READ costs one copy out of the store into a reply buffer that the connection
//! reuses (so it is neither zeroed nor faulted in again) and the kernel's copy into the
//! socket; a large WRITE payload is read from the socket straight into a buffer of its own,
//! which becomes the `Bytes` the store gets.

mod handshake;
mod transmission;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use memsync_core::{DynStore, StoreUrl};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::proto::*;
use crate::transport::Transport;
use handshake::{Negotiated, Ready, handshake, transmission_flags};
pub(crate) use transmission::UNIX_SNDBUF;
use transmission::transmission;

/// Whether and how the server offers TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// Clients may upgrade with STARTTLS, or not.
    Optional,
    /// Every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD` until the
    /// client upgrades.
    Required,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "optional" | "on" => Ok(TlsMode::Optional),
            "required" | "require" => Ok(TlsMode::Required),
            _ => Err(format!("{s:?}: expected off, optional or required")),
        }
    }
}

/// One named export.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub store: DynStore,
    /// Serve read-only even if the store is writable.
    pub read_only: bool,
}

impl Export {
    pub fn new(name: impl Into<String>, store: DynStore) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            store,
            read_only: false,
        }
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The exports; the first one is also the default export (empty name).
    pub exports: Vec<Export>,
    pub tls_mode: TlsMode,
    /// Required unless `tls_mode` is `Off`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// Requests in flight per connection; the server stops reading when it is reached.
    pub max_in_flight: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size). A larger WRITE up
    /// to [`PORTABLE_MAX_PAYLOAD`] is skipped and failed with `NBD_EINVAL`; beyond that the
    /// connection is closed.
    pub max_payload: u32,
    /// Bytes of WRITE payloads held in memory at once, over all connections: a request takes
    /// its share before its payload is read, and the server stops reading from a connection
    /// until there is room. At least `max_payload`.
    pub payload_budget: usize,
    /// Time a client has from connecting to the end of option negotiation (TLS included);
    /// then it is disconnected and its connection slot freed.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    pub fn new(exports: Vec<Export>) -> Self {
        ServerConfig {
            exports,
            tls_mode: TlsMode::Off,
            tls: None,
            max_connections: 128,
            max_in_flight: 64,
            max_payload: DEFAULT_MAX_PAYLOAD,
            payload_budget: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of a running server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections being served (negotiating or in transmission).
    pub connections: usize,
    /// WRITE payload bytes held right now (being read, or waiting for the store).
    pub payload_bytes: usize,
    /// The most `payload_bytes` has been since the server started.
    pub payload_peak: usize,
}

struct Inner {
    cfg: ServerConfig,
    conns: Arc<Semaphore>,
    /// [`ServerConfig::payload_budget`], one permit per byte.
    budget: Arc<Semaphore>,
    payload_bytes: AtomicUsize,
    payload_peak: AtomicUsize,
    shutdown: watch::Sender<bool>,
}

/// One WRITE payload's share of the budget, from before its bytes are read until the store
/// has taken them.
struct PayloadCharge {
    inner: Arc<Inner>,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl PayloadCharge {
    fn new(inner: &Arc<Inner>, permit: OwnedSemaphorePermit) -> Self {
        let bytes = permit.num_permits();
        let now = inner.payload_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        inner.payload_peak.fetch_max(now, Ordering::SeqCst);
        PayloadCharge {
            inner: inner.clone(),
            bytes,
            _permit: permit,
        }
    }
}

impl Drop for PayloadCharge {
    fn drop(&mut self) {
        self.inner
            .payload_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A running server. Add listeners with [`Server::listen`] (or [`Server::listen_tcp`] /
/// [`Server::listen_unix`]), stop it with [`Server::shutdown`]. Dropping it stops it too,
/// without waiting: the listeners close at once and the connections end after their requests
/// in flight.
pub struct Server {
    inner: Arc<Inner>,
    accept_loops: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    /// Unix sockets bound by [`Server::listen`], removed when the server stops.
    sockets: parking_lot::Mutex<Vec<BoundSocket>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.inner.shutdown.send(true);
        for h in self.accept_loops.get_mut().drain(..) {
            h.abort();
        }
        for b in self.sockets.get_mut().drain(..) {
            b.remove();
        }
    }
}

/// Where a server listens, from `nbd://HOST[:PORT]` (port [`DEFAULT_PORT`] if omitted, host
/// 127.0.0.1 if that is omitted too) or `nbd+unix:///?socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT`, as given to `bind`.
    Tcp(String),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(s: &str) -> memsync_core::Result<Self> {
        let u = StoreUrl::parse(s)?;
        match u.scheme.as_str() {
            "nbd" => {
                if u.authority.as_deref().unwrap_or("").is_empty() {
                    return Ok(ListenAddr::Tcp(format!("127.0.0.1:{DEFAULT_PORT}")));
                }
                let (host, port) = crate::client::host_port(&u)?;
                Ok(ListenAddr::Tcp(format!("{host}:{port}")))
            }
            "nbd+unix" => {
                if u.authority.as_deref().is_some_and(|a| !a.is_empty()) {
                    return Err(
                        u.error("host", "nbd+unix takes no host (nbd+unix:///?socket=PATH)")
                    );
                }
                match u.param("socket") {
                    Some(p) if !p.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(p))),
                    _ => Err(u.error(
                        "query parameter \"socket\"",
                        "missing (nbd+unix:///?socket=PATH)",
                    )),
                }
            }
            other => Err(u.error("scheme", format!("{other:?} is not nbd or nbd+unix"))),
        }
    }
}

/// A unix socket a server bound, identified by its inode so that a file put there by someone
/// else since is left alone.
struct BoundSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl BoundSocket {
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Bind a unix socket listener at `path`. A socket file there that nobody listens on (left by
/// a server that died) is replaced; anything else there (a regular file, a directory, a socket
/// someone listens on) is an error and is left as it is.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let err = |kind, what: &str| io::Error::new(kind, format!("{}: {what}", path.display()));
    let with_path = |e: io::Error| err(e.kind(), &e.to_string());
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(err(
                    io::ErrorKind::AddrInUse,
                    "a server is listening on this socket",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(with_path)?;
            }
            Err(e) => return Err(err(e.kind(), &format!("checking the existing socket: {e}"))),
        },
        Ok(_) => {
            return Err(err(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket (not replacing it)",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e)),
    }
    UnixListener::bind(path).map_err(with_path)
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.inner.cfg.exports.iter().map(|e| &e.name).collect();
        f.debug_struct("Server").field("exports", &names).finish()
    }
}

impl Server {
    /// Check the configuration and build a server.
    pub fn new(cfg: ServerConfig) -> io::Result<Self> {
        let inval = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_owned());
        if cfg.exports.is_empty() {
            return Err(inval("no exports"));
        }
        for (i, e) in cfg.exports.iter().enumerate() {
            if e.name.len() > MAX_STRING || e.name.contains('\0') {
                return Err(inval("export name too long or contains NUL"));
            }
            if cfg.exports[..i].iter().any(|o| o.name == e.name) {
                return Err(inval(&format!("export {:?} given twice", e.name)));
            }
        }
        if cfg.tls_mode != TlsMode::Off && cfg.tls.is_none() {
            return Err(inval("TLS mode needs a certificate and key"));
        }
        if cfg.payload_budget < cfg.max_payload as usize
            || cfg.payload_budget > Semaphore::MAX_PERMITS
        {
            return Err(inval(
                "the payload budget must be at least the maximum payload",
            ));
        }
        let (tx, _) = watch::channel(false);
        let conns = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
        let budget = Arc::new(Semaphore::new(cfg.payload_budget));
        Ok(Server {
            inner: Arc::new(Inner {
                cfg,
                conns,
                budget,
                payload_bytes: AtomicUsize::new(0),
                payload_peak: AtomicUsize::new(0),
                shutdown: tx,
            }),
            accept_loops: parking_lot::Mutex::new(Vec::new()),
            sockets: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Bind `addr` and serve the connections accepted there; returns the URL served (with the
    /// port the system chose for port 0). A unix socket is bound with [`bind_unix`] and
    /// removed when the server stops.
    pub async fn listen(&self, addr: &ListenAddr) -> io::Result<String> {
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("listening on {a}: {e}")))?;
                let url = format!("nbd://{}", l.local_addr()?);
                self.listen_tcp(l);
                Ok(url)
            }
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::MetadataExt;
                let l = bind_unix(p)?;
                let m = std::fs::symlink_metadata(p)?;
                self.sockets.lock().push(BoundSocket {
                    path: p.clone(),
                    id: (m.dev(), m.ino()),
                });
                self.listen_unix(l);
                Ok(format!("nbd+unix:///?socket={}", p.display()))
            }
        }
    }

    /// Serve connections accepted on a TCP listener (sets TCP_NODELAY on each).
    pub fn listen_tcp(&self, l: TcpListener) {
        let inner = self.inner.clone();
        let mut stop = inner.shutdown.subscribe();
        let h = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            debug!(%peer, "nbd: connection");
                            spawn_conn(&inner, s);
                        }
                        Err(e) => { warn!("nbd: accept: {e}"); tokio::time::sleep(std::time::Duration::from_millis(20)).await; }
                    },
                    _ = stop.changed() => break,
                }
            }
        });
        self.accept_loops.lock().push(h);
    }

    /// Serve connections accepted on a unix socket listener.
    pub fn listen_unix(&self, l: UnixListener) {
        let inner = self.inner.clone();
        let mut stop = inner.shutdown.subscribe();
        let h = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((s, _)) => {
                            let _ = socket2::SockRef::from(&s).set_send_buffer_size(UNIX_SNDBUF);
                            spawn_conn(&inner, s)
                        }
                        Err(e) => { warn!("nbd: accept: {e}"); tokio::time::sleep(std::time::Duration::from_millis(20)).await; }
                    },
                    _ = stop.changed() => break,
                }
            }
        });
        self.accept_loops.lock().push(h);
    }

    /// Serve one already-connected stream (for tests and embedding) until it ends.
    pub async fn serve_stream<S: Transport>(&self, s: S) {
        if let Ok(p) = self.inner.conns.clone().acquire_owned().await {
            serve_conn(self.inner.clone(), s, p).await;
        }
    }

    /// Serve a stream that starts in the transmission phase, with no handshake: the kernel's
    /// NBD client on a socket it was given by netlink or ioctl. Requests get simple replies
    /// (no structured replies, compact headers), as after `NBD_OPT_EXPORT_NAME`.
    pub async fn serve_transmission<S: Transport>(&self, s: S, export: usize) {
        if export >= self.inner.cfg.exports.len() {
            warn!("nbd: no export {export} to serve");
            return;
        }
        if let Ok(_p) = self.inner.conns.clone().acquire_owned().await {
            transmission(self.inner.clone(), s, Negotiated::default(), export).await;
        }
    }

    /// The transmission flags export `export` is advertised with to a client without
    /// structured replies (from its store's capabilities), e.g. for the kernel's client.
    pub fn export_flags(&self, export: usize) -> u16 {
        transmission_flags(&self.inner.cfg.exports[export], false)
    }

    /// Connections being served right now.
    pub fn connections(&self) -> usize {
        self.inner.cfg.max_connections.max(1) - self.inner.conns.available_permits()
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.connections(),
            payload_bytes: self.inner.payload_bytes.load(Ordering::SeqCst),
            payload_peak: self.inner.payload_peak.load(Ordering::SeqCst),
        }
    }

    /// Stop accepting, let every connection finish its in-flight requests, then flush every
    /// export's store.
    pub async fn shutdown(&self) -> memsync_core::Result<()> {
        let _ = self.inner.shutdown.send(true);
        let loops: Vec<_> = std::mem::take(&mut *self.accept_loops.lock());
        for h in loops {
            let _ = h.await;
        }
        for b in std::mem::take(&mut *self.sockets.lock()) {
            b.remove();
        }
        let n = self.inner.cfg.max_connections.max(1) as u32;
        // Every connection holds a permit until it is done.
        let _all = self.inner.conns.acquire_many(n).await;
        for e in &self.inner.cfg.exports {
            e.store.flush().await?;
        }
        Ok(())
    }
}

fn spawn_conn<S: Transport>(inner: &Arc<Inner>, s: S) {
    match inner.conns.clone().try_acquire_owned() {
        Ok(p) => {
            tokio::spawn(serve_conn(inner.clone(), s, p));
        }
        Err(_) => warn!(
            "nbd: connection refused: {} connections already",
            inner.cfg.max_connections
        ),
    }
}

async fn serve_conn<S: Transport>(inner: Arc<Inner>, s: S, _permit: OwnedSemaphorePermit) {
    // The whole handshake has one deadline: a client that stops talking (or talks forever)
    // must not keep its connection slot.
    let limit = inner.cfg.handshake_timeout;
    match tokio::time::timeout(limit, handshake(&inner, s)).await {
        Ok(Some(Ready::Plain(s, neg, i))) => transmission(inner, s, neg, i).await,
        Ok(Some(Ready::Tls(t, neg, i))) => transmission(inner, *t, neg, i).await,
        Ok(None) => {}
        Err(_) => info!("nbd: closing a connection that did not finish negotiating in {limit:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_default_to_the_nbd_port() {
        let p = |s: &str| ListenAddr::parse(s).unwrap();
        assert_eq!(
            p("nbd://"),
            ListenAddr::Tcp(format!("127.0.0.1:{DEFAULT_PORT}"))
        );
        assert_eq!(
            p("nbd://localhost"),
            ListenAddr::Tcp("localhost:10809".into())
        );
        assert_eq!(p("nbd://0.0.0.0:0"), ListenAddr::Tcp("0.0.0.0:0".into()));
        assert_eq!(p("nbd://[::1]"), ListenAddr::Tcp("[::1]:10809".into()));
        assert_eq!(p("nbd://[::1]:99"), ListenAddr::Tcp("[::1]:99".into()));
        assert_eq!(
            p("nbd+unix:///?socket=/tmp/x.sock"),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "nbd+unix:///",
            "nbd+unix://host/?socket=/x",
            "nbd://h:99999",
            "nbds://h",
            "file:/x",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
