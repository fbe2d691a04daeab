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

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use memsync_core::{Caps, DynStore, ExtentKind, StoreError, StoreUrl};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::proto::*;
use crate::transport::Transport;

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

/// State negotiated during the handshake.
#[derive(Default, Clone, Debug)]
struct Negotiated {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name for which base:allocation was selected.
    meta: Option<String>,
}

enum HsEnd {
    Close,
    StartTls,
    Go(usize),
}

/// A connection that has finished negotiating: the stream, what was negotiated, the export.
enum Ready<S> {
    Plain(S, Negotiated, usize),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Negotiated, usize),
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

async fn handshake<S: Transport>(inner: &Inner, mut s: S) -> Option<Ready<S>> {
    let mut neg = Negotiated::default();
    // Greeting.
    let mut g = BytesMut::with_capacity(18);
    g.put_u64(NBDMAGIC);
    g.put_u64(IHAVEOPT);
    g.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&g).await.ok()?;
    let cflags = read_u32(&mut s).await.ok()?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        debug!("nbd: unknown client flags {cflags:#x}");
        return None;
    }
    neg.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    match negotiate(inner, &mut s, &mut neg, false).await {
        Ok(HsEnd::Go(i)) => Some(Ready::Plain(s, neg, i)),
        Ok(HsEnd::StartTls) => {
            let cfg = inner.cfg.tls.clone()?;
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let mut t = match acceptor.accept(s).await {
                Ok(t) => t,
                Err(e) => {
                    info!("nbd: TLS handshake failed: {e}");
                    return None;
                }
            };
            // Options negotiated before TLS do not carry over.
            let mut neg = Negotiated {
                no_zeroes: neg.no_zeroes,
                ..Default::default()
            };
            match negotiate(inner, &mut t, &mut neg, true).await {
                Ok(HsEnd::Go(i)) => Some(Ready::Tls(Box::new(t), neg, i)),
                _ => {
                    let _ = t.shutdown().await;
                    None
                }
            }
        }
        Ok(HsEnd::Close) | Err(_) => None,
    }
}

async fn read_u32<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

fn find_export(inner: &Inner, name: &str) -> Option<usize> {
    inner
        .cfg
        .exports
        .iter()
        .position(|e| e.name == name)
        .or_else(|| name.is_empty().then_some(0))
}

fn export_caps(e: &Export) -> (Caps, bool) {
    let caps = e.store.caps();
    (caps, e.read_only || caps.read_only)
}

/// Transmission flags, advertised from the store's capabilities.
fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let (caps, ro) = export_caps(e);
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
    if ro {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_WRITE_ZEROES;
        if caps.trim {
            f |= TF_SEND_TRIM;
        }
        if caps.fast_zero {
            f |= TF_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if caps.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

fn block_sizes(e: &Export, max_payload: u32) -> Info {
    let caps = e.store.caps();
    let min = caps.block_size.clamp(1, 64 * 1024) as u32;
    let max = max_payload.max(min);
    let preferred = (caps.preferred_io.clamp(min.into(), max.into()) as u32).max(4096.min(max));
    Info::BlockSize {
        min,
        preferred,
        max,
    }
}

const MAX_OPTIONS: usize = 4096;

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    s: &mut S,
    neg: &mut Negotiated,
    tls: bool,
) -> io::Result<HsEnd> {
    let cfg = &inner.cfg;
    let mut shutting_down = inner.shutdown.subscribe();
    let mut out = BytesMut::new();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        if *shutting_down.borrow() {
            return Ok(HsEnd::Close);
        }
        tokio::select! {
            r = s.read_exact(&mut h) => { r?; }
            _ = shutting_down.changed() => return Ok(HsEnd::Close),
        }
        let hdr =
            parse_option_header(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.clear();
        if hdr.len > MAX_OPTION_LEN {
            if hdr.len > 16 << 20 || hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            tokio::io::copy(&mut (&mut *s).take(hdr.len.into()), &mut tokio::io::sink()).await?;
            encode_opt_reply(&mut out, hdr.option, REP_ERR_TOO_BIG, b"option too large");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        let mut data = vec![0u8; hdr.len as usize];
        s.read_exact(&mut data).await?;
        let err = |out: &mut BytesMut, code: u32, msg: &str| {
            encode_opt_reply(out, hdr.option, code, truncate_str(msg, 1024).as_bytes())
        };
        if *shutting_down.borrow_and_update() && hdr.option != OPT_ABORT {
            if hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            err(&mut out, REP_ERR_SHUTDOWN, "server shutting down");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        if cfg.tls_mode == TlsMode::Required
            && !tls
            && !matches!(hdr.option, OPT_STARTTLS | OPT_ABORT)
        {
            if hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            err(&mut out, REP_ERR_TLS_REQD, "TLS is required on this server");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        let opt = match parse_option(hdr.option, &data) {
            Ok(o) => o,
            Err(e) => {
                if hdr.option == OPT_EXPORT_NAME {
                    return Ok(HsEnd::Close);
                }
                err(&mut out, REP_ERR_INVALID, &e.to_string());
                s.write_all(&out).await?;
                s.flush().await?;
                continue;
            }
        };
        let mut end = None;
        match opt {
            Opt::ExportName(name) => {
                let Some(i) = find_export(inner, &name) else {
                    debug!("nbd: EXPORT_NAME {name:?}: no such export");
                    return Ok(HsEnd::Close);
                };
                let e = &cfg.exports[i];
                out.put_u64(e.store.size());
                out.put_u16(transmission_flags(e, neg.structured));
                if !neg.no_zeroes {
                    out.put_bytes(0, EXPORT_NAME_ZEROES);
                }
                end = Some(HsEnd::Go(i));
            }
            Opt::Abort => {
                encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                end = Some(HsEnd::Close);
            }
            Opt::List => {
                for e in &cfg.exports {
                    encode_opt_reply(
                        &mut out,
                        hdr.option,
                        REP_SERVER,
                        &encode_rep_server(&e.name, &e.description),
                    );
                }
                encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
            }
            Opt::StartTls => {
                if tls {
                    err(&mut out, REP_ERR_INVALID, "TLS is already active");
                } else if cfg.tls_mode == TlsMode::Off {
                    err(
                        &mut out,
                        REP_ERR_POLICY,
                        "TLS is not enabled on this server",
                    );
                } else {
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                    end = Some(HsEnd::StartTls);
                }
            }
            Opt::Info { go, name, requests } => match find_export(inner, &name) {
                None => err(
                    &mut out,
                    REP_ERR_UNKNOWN,
                    &format!("no export named {name:?}"),
                ),
                Some(i) => {
                    let e = &cfg.exports[i];
                    let mut infos = vec![Info::Export {
                        size: e.store.size(),
                        flags: transmission_flags(e, neg.structured),
                    }];
                    if requests.contains(&INFO_NAME) {
                        infos.push(Info::Name(e.name.clone()));
                    }
                    if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
                        infos.push(Info::Description(e.description.clone()));
                    }
                    infos.push(block_sizes(e, cfg.max_payload));
                    for i in &infos {
                        encode_opt_reply(&mut out, hdr.option, REP_INFO, &encode_info(i));
                    }
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                    if go {
                        if neg
                            .meta
                            .as_deref()
                            .is_some_and(|m| m != e.name && !(m.is_empty() && i == 0))
                        {
                            // Contexts were selected for another export.
                            neg.meta = None;
                        }
                        end = Some(HsEnd::Go(i));
                    }
                }
            },
            Opt::StructuredReply => {
                if neg.extended {
                    err(
                        &mut out,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if neg.structured {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    neg.structured = true;
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::ExtendedHeaders => {
                if neg.extended {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    neg.extended = true;
                    neg.structured = true;
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::MetaContext { set, name, queries } => {
                if !neg.structured {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else if find_export(inner, &name).is_none() {
                    err(
                        &mut out,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    );
                } else {
                    let selected = if set {
                        queries.iter().any(|q| q == META_BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries
                                .iter()
                                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                    };
                    if selected {
                        let mut d = BytesMut::new();
                        d.put_u32(if set { 1 } else { 0 });
                        d.put_slice(META_BASE_ALLOCATION.as_bytes());
                        encode_opt_reply(&mut out, hdr.option, REP_META_CONTEXT, &d);
                    }
                    if set {
                        neg.meta = selected.then_some(name);
                    }
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::Unknown(o) => err(
                &mut out,
                REP_ERR_UNSUP,
                &format!("option {o} is not supported"),
            ),
        }
        s.write_all(&out).await?;
        s.flush().await?;
        if let Some(e) = end {
            return Ok(e);
        }
    }
    Ok(HsEnd::Close)
}

/// One connection in transmission.
struct Conn {
    store: DynStore,
    size: u64,
    caps: Caps,
    read_only: bool,
    structured: bool,
    extended: bool,
    meta: bool,
    max_payload: u32,
    /// Read reply buffers, kept between requests.
    pool: Arc<Pool>,
    /// A range the store last reported as data (no hole of 4 KiB or more): reads inside it
    /// skip the extents query. Only data is remembered: if it has become zero since, the read
    /// sends the zeros as data, which is still right, whereas a remembered hole could hide
    /// data written since.
    data_hint: parking_lot::Mutex<(u64, u64)>,
}

/// Reply batches smaller than this are collected and written together.
const BATCH: usize = 64 * 1024;

/// Send buffer asked for on unix sockets. The default (208 KiB) is smaller than one 256 KiB
/// read reply, so every such reply would wait for the client to drain the socket half-way.
/// Linux caps it at `net.core.wmem_max`. (TCP sockets keep the kernel's auto-tuning.)
const UNIX_SNDBUF: usize = 4 << 20;

/// A reply ready to be written.
enum Reply {
    Buf(BytesMut),
    Pooled(PoolBuf),
}

impl From<BytesMut> for Reply {
    fn from(b: BytesMut) -> Self {
        Reply::Buf(b)
    }
}

impl std::ops::Deref for Reply {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Reply::Buf(b) => b,
            Reply::Pooled(p) => p,
        }
    }
}

/// Buffers kept per connection for read replies. They stay initialised, so a read neither
/// zeroes its buffer nor faults fresh pages in: the store overwrites the bytes it returns.
#[derive(Default)]
struct Pool {
    free: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept in one connection's pool.
const POOL_KEEP: usize = 4;
/// Larger buffers are not kept.
const POOL_MAX_BUF: usize = (4 << 20) + 64;

impl Pool {
    /// A buffer of `len` initialised bytes (whatever they hold).
    fn get(self: &Arc<Self>, len: usize) -> PoolBuf {
        if len > POOL_MAX_BUF {
            return PoolBuf {
                buf: vec![0; len],
                len,
                pool: None,
            };
        }
        let mut buf = self.free.lock().pop().unwrap_or_default();
        if buf.len() < len {
            // Only the growth is zeroed, once per buffer.
            buf.resize(len, 0);
        }
        PoolBuf {
            buf,
            len,
            pool: Some(self.clone()),
        }
    }
}

/// A buffer from a [`Pool`]; it goes back when dropped.
struct PoolBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<Pool>>,
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            let mut free = p.free.lock();
            if free.len() < POOL_KEEP {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// Write payloads at least this long are read from the socket straight into their own
/// buffer; shorter ones are copied out of the connection's read buffer (which batches many
/// small requests into one read).
const DIRECT_MIN: usize = 16 * 1024;
/// How much the connection's read buffer asks for at once.
const RX_CHUNK: usize = 64 * 1024;
/// What it asks for right after a large write, when the next bytes are most likely a header
/// followed by another large payload that should not be copied through this buffer.
const RX_SMALL: usize = 1024;
/// A direct payload read also takes up to this many bytes beyond the payload (usually the
/// next request's header), saving one read call per request; they are moved to the read
/// buffer.
const RX_EXTRA: usize = 512;

/// The read half of a connection with a small buffer for request headers and short payloads.
struct Rx<R> {
    r: R,
    buf: BytesMut,
    /// Ask for [`RX_SMALL`] bytes only on the next refill.
    small: bool,
}

impl<R: AsyncRead + Unpin> Rx<R> {
    fn new(r: R) -> Self {
        Rx {
            r,
            buf: BytesMut::with_capacity(RX_CHUNK),
            small: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Read once into the buffer (at least one byte, or an error).
    async fn refill(&mut self, at_least: usize) -> io::Result<()> {
        let want = if std::mem::take(&mut self.small) {
            RX_SMALL
        } else {
            RX_CHUNK
        }
        .max(at_least);
        self.buf.reserve(want);
        let n = (&mut self.r)
            .take(want as u64)
            .read_buf(&mut self.buf)
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Buffer at least `n` bytes.
    async fn fill(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            self.refill(n - self.buf.len()).await?;
        }
        Ok(())
    }

    /// The next `len` bytes as a buffer of their own.
    async fn payload(&mut self, len: usize) -> io::Result<Bytes> {
        let have = self.buf.len().min(len);
        if have == len {
            // A copy of its own: a store that keeps the bytes must not pin the read buffer.
            let p = Bytes::copy_from_slice(&self.buf[..len]);
            self.buf.advance(len);
            return Ok(p);
        }
        let mut p = BytesMut::with_capacity(len + RX_EXTRA);
        p.extend_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        while p.len() < len {
            let want = len - p.len();
            if want < DIRECT_MIN {
                self.refill(0).await?;
                let k = want.min(self.buf.len());
                p.extend_from_slice(&self.buf[..k]);
                self.buf.advance(k);
            } else {
                // The read buffer is empty here, so bytes read past the payload go to it in
                // order.
                let n = (&mut self.r)
                    .take((want + RX_EXTRA) as u64)
                    .read_buf(&mut p)
                    .await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        if p.len() > len {
            self.buf.extend_from_slice(&p[len..]);
            p.truncate(len);
        }
        self.small = len >= DIRECT_MIN && self.buf.len() < RX_SMALL;
        Ok(p.freeze())
    }

    /// Discard the next `n` bytes.
    async fn skip(&mut self, n: u64) -> io::Result<()> {
        let have = (self.buf.len() as u64).min(n) as usize;
        self.buf.advance(have);
        let left = n - have as u64;
        let got = tokio::io::copy(&mut (&mut self.r).take(left), &mut tokio::io::sink()).await?;
        if got != left {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

async fn transmission<S: Transport>(inner: Arc<Inner>, s: S, neg: Negotiated, export: usize) {
    let e = &inner.cfg.exports[export];
    let (caps, read_only) = export_caps(e);
    let conn = Arc::new(Conn {
        store: e.store.clone(),
        size: e.store.size(),
        caps,
        read_only,
        structured: neg.structured,
        extended: neg.extended,
        meta: neg.meta.is_some(),
        max_payload: inner.cfg.max_payload,
        pool: Arc::default(),
        data_hint: parking_lot::Mutex::new((0, 0)),
    });
    let (r, w) = s.halves();
    let mut rx = Rx::new(r);
    let w = Arc::new(Mutex::new(w));
    let max_in_flight = inner.cfg.max_in_flight.max(1);
    let sem = Arc::new(Semaphore::new(max_in_flight));
    let hlen = if conn.extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut stop = inner.shutdown.subscribe();
    let mut pending = BytesMut::with_capacity(BATCH);
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    loop {
        if rx.buffered() < hlen {
            // About to wait for the client: send what is ready first.
            if !pending.is_empty() {
                if write_reply(&w, &pending).await.is_err() {
                    break;
                }
                pending.clear();
            }
            let got = if rx.buffered() == 0 {
                if *stop.borrow() {
                    break;
                }
                tokio::select! {
                    r = rx.fill(hlen) => r,
                    _ = stop.changed() => break,
                }
            } else {
                rx.fill(hlen).await
            };
            if got.is_err() {
                break; // EOF or a truncated header: this connection ends
            }
        }
        hdr[..hlen].copy_from_slice(&rx.buf[..hlen]);
        rx.buf.advance(hlen);
        let req = match parse_request(&hdr[..hlen], conn.extended) {
            Ok(r) => r,
            Err(e) => {
                info!("nbd: closing connection: {e}");
                break;
            }
        };
        if req.typ == CMD_DISC {
            break;
        }
        if req.typ == CMD_WRITE && req.len > conn.max_payload.into() {
            // The client broke the advertised limit. Up to the size the protocol asks servers
            // to tolerate, the payload is skipped (never buffered) and the request fails;
            // beyond it the connection ends.
            if req.len > PORTABLE_MAX_PAYLOAD || rx.skip(req.len).await.is_err() {
                info!("nbd: closing connection: a write of {} bytes", req.len);
                break;
            }
            let rep = conn.error(&req, EINVAL, "write larger than the maximum payload");
            pending.extend_from_slice(&rep);
            continue;
        }
        // Every wait below may last until other requests finish: the replies ready so far go
        // out first.
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if flush_pending(&w, &mut pending).await.is_err() {
                    break;
                }
                let Ok(p) = sem.clone().acquire_owned().await else {
                    break;
                };
                p
            }
        };
        let mut payload = None;
        let mut charge = None;
        if req.typ == CMD_WRITE && req.len > 0 {
            let len = req.len as usize;
            // The payload's share of the global budget is taken before a byte of it is read.
            let n = req.len as u32;
            let p = match inner.budget.clone().try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => {
                    if flush_pending(&w, &mut pending).await.is_err() {
                        break;
                    }
                    let Ok(p) = inner.budget.clone().acquire_many_owned(n).await else {
                        break;
                    };
                    p
                }
            };
            charge = Some(PayloadCharge::new(&inner, p));
            if rx.buffered() < len && flush_pending(&w, &mut pending).await.is_err() {
                break;
            }
            match rx.payload(len).await {
                Ok(p) => payload = Some(p),
                Err(_) => break,
            }
        }
        let mut fut: Pin<Box<dyn Future<Output = Reply> + Send>> =
            Box::pin(handle(conn.clone(), req, payload));
        match poll_once(fut.as_mut()) {
            Poll::Ready(rep) => {
                drop(fut);
                drop(charge);
                drop(permit);
                if rep.len() < BATCH {
                    pending.extend_from_slice(&rep);
                    if pending.len() >= BATCH {
                        if write_reply(&w, &pending).await.is_err() {
                            break;
                        }
                        pending.clear();
                    }
                } else {
                    if !pending.is_empty() {
                        if write_reply(&w, &pending).await.is_err() {
                            break;
                        }
                        pending.clear();
                    }
                    if write_reply(&w, &rep).await.is_err() {
                        break;
                    }
                }
            }
            Poll::Pending => {
                let w = w.clone();
                tokio::spawn(async move {
                    let rep = fut.await;
                    // The store has the payload: its budget is free for the next one, even
                    // if the client is slow to take the reply.
                    drop(charge);
                    let _ = write_reply(&w, &rep).await;
                    drop(permit);
                });
            }
        }
    }
    if !pending.is_empty() {
        let _ = write_reply(&w, &pending).await;
    }
    // Finish the requests still in flight, then close.
    let _ = sem.acquire_many(max_in_flight as u32).await;
    let mut g = w.lock().await;
    let _ = g.flush().await;
    let _ = g.shutdown().await;
}

/// Poll a future once without a task context: a store that answers without waiting is
/// served right here, with no task hop.
fn poll_once(f: Pin<&mut (dyn Future<Output = Reply> + Send)>) -> Poll<Reply> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// Write the batched replies, if any.
async fn flush_pending<W: AsyncWrite + Unpin>(
    w: &Mutex<W>,
    pending: &mut BytesMut,
) -> io::Result<()> {
    if !pending.is_empty() {
        write_reply(w, pending).await?;
        pending.clear();
    }
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &Mutex<W>, buf: &[u8]) -> io::Result<()> {
    let mut g = w.lock().await;
    g.write_all(buf).await?;
    g.flush().await
}

impl Conn {
    fn ext_off(&self, req: &Request) -> Option<u64> {
        self.extended.then_some(req.offset)
    }

    fn ok(&self, req: &Request) -> BytesMut {
        let mut b = BytesMut::with_capacity(32);
        if self.extended || (self.structured && req.typ == CMD_READ) {
            encode_chunk_header(
                &mut b,
                self.ext_off(req),
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            );
        } else {
            encode_simple_reply(&mut b, 0, req.cookie);
        }
        b
    }

    fn error(&self, req: &Request, errno: u32, msg: &str) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        if self.structured {
            let mut p = BytesMut::new();
            encode_error_payload(&mut p, errno, msg, None);
            encode_chunk_header(
                &mut b,
                self.ext_off(req),
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                p.len() as u64,
            );
            b.extend_from_slice(&p);
        } else {
            encode_simple_reply(&mut b, errno, req.cookie);
        }
        b
    }

    fn store_error(&self, req: &Request, e: &StoreError) -> BytesMut {
        self.error(req, wire_errno(e.errno()), &e.to_string())
    }

    /// `None` if `offset..offset+len` is within the export.
    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.len)
            .is_some_and(|end| end <= self.size)
    }
}

/// Flags each command accepts.
fn allowed_flags(c: &Conn, typ: u16) -> u16 {
    let base = CMD_FLAG_FUA | if c.extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    match typ {
        CMD_READ => CMD_FLAG_FUA | if c.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE => base,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

async fn handle(c: Arc<Conn>, req: Request, payload: Option<Bytes>) -> Reply {
    if req.typ == CMD_READ && req.flags & !allowed_flags(&c, req.typ) == 0 {
        if req.len > c.max_payload.into() {
            return c
                .error(&req, EOVERFLOW, "read larger than the maximum payload")
                .into();
        }
        if !c.in_range(&req) {
            return c
                .error(&req, EINVAL, "read beyond the end of the export")
                .into();
        }
        if req.len == 0 {
            return c.ok(&req).into();
        }
        return read(&c, &req).await;
    }
    handle_other(&c, req, payload).await.into()
}

/// Every command but a valid READ.
async fn handle_other(c: &Conn, req: Request, payload: Option<Bytes>) -> BytesMut {
    if req.flags & !allowed_flags(c, req.typ) != 0 {
        return c.error(&req, EINVAL, "flag not valid for this command");
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.typ {
        CMD_WRITE => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "write beyond the end of the export");
            }
            let data = payload.unwrap_or_default();
            if !data.is_empty()
                && let Err(e) = c.store.write(req.offset, data).await
            {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_FLUSH => finish(c, &req, true).await,
        CMD_TRIM => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.caps.trim {
                return c.error(&req, EINVAL, "trim is not supported by this export");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "trim beyond the end of the export");
            }
            if req.len > 0
                && let Err(e) = c.store.trim(req.offset, req.len).await
            {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_WRITE_ZEROES => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "write zeroes beyond the end of the export");
            }
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if fast && (!c.caps.fast_zero || no_hole) {
                return c.error(&req, ENOTSUP, "fast zeroing is not possible here");
            }
            let r = if req.len == 0 {
                Ok(())
            } else if no_hole {
                write_zero_buffers(c, req.offset, req.len).await
            } else {
                c.store.write_zeroes(req.offset, req.len).await
            };
            if let Err(e) = r {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_CACHE => {
            if !c.in_range(&req) {
                return c.error(&req, EINVAL, "cache beyond the end of the export");
            }
            c.ok(&req)
        }
        CMD_BLOCK_STATUS => block_status(c, &req).await,
        _ => c.error(&req, EINVAL, "unknown command"),
    }
}

async fn finish(c: &Conn, req: &Request, flush: bool) -> BytesMut {
    if flush && let Err(e) = c.store.flush().await {
        return c.store_error(req, &e);
    }
    c.ok(req)
}

async fn write_zero_buffers(c: &Conn, offset: u64, len: u64) -> memsync_core::Result<()> {
    let step = (1u64 << 20).min(len);
    let zeros = Bytes::from(vec![0u8; step as usize]);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(step);
        c.store.write(pos, zeros.slice(..n as usize)).await?;
        pos += n;
    }
    Ok(())
}

/// Reads at least this long, on stores that report extents, are answered with hole chunks
/// for their zero ranges.
const SPARSE_READ_MIN: u64 = 64 * 1024;

/// How far ahead of a read the store's extents are asked for, so that a sequential reader
/// through data costs one extents query per this many bytes (see `Conn::data_hint`).
const EXTENT_WINDOW: u64 = 8 << 20;

/// Pieces of a structured read: `(offset, len, is_hole)`. Empty means one data piece.
async fn sparse_pieces(c: &Conn, req: &Request) -> Vec<(u64, u64, bool)> {
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    if !c.caps.extents || req.flags & CMD_FLAG_DF != 0 || req.len < SPARSE_READ_MIN {
        return pieces;
    }
    let end = req.offset + req.len;
    {
        let h = c.data_hint.lock();
        if h.0 <= req.offset && end <= h.1 {
            return pieces;
        }
    }
    let qlen = req.len.max(EXTENT_WINDOW).min(c.size - req.offset);
    let Ok(ex) = c.store.extents(req.offset, qlen).await else {
        return pieces;
    };
    let mut pos = req.offset;
    // End of the run of data from the request's offset.
    let mut data_end = Some(req.offset);
    for e in ex {
        if e.offset != pos || e.len == 0 {
            break;
        }
        let hole = e.kind.reads_zero() && e.len >= 4096;
        if hole {
            data_end = None;
        } else if let Some(d) = data_end.as_mut() {
            *d = e.offset + e.len;
        }
        if pos < end {
            let plen = e.len.min(end - pos);
            match pieces.last_mut() {
                Some(last) if last.2 == hole => last.1 += plen,
                _ => pieces.push((pos, plen, hole)),
            }
        }
        pos += e.len;
        if pos >= end && data_end.is_none() {
            break;
        }
    }
    if pos < end {
        // The extents do not cover the request: read it all as data.
        pieces.clear();
        return pieces;
    }
    if let Some(d) = data_end
        && d >= end
    {
        *c.data_hint.lock() = (req.offset, d);
    }
    if pieces.len() == 1 && !pieces[0].2 {
        pieces.clear();
    }
    pieces
}

async fn read(c: &Conn, req: &Request) -> Reply {
    let len = req.len as usize;
    if !c.structured {
        let mut b = c.pool.get(SIMPLE_REPLY_LEN + len);
        encode_simple_reply(&mut &mut b[..SIMPLE_REPLY_LEN], 0, req.cookie);
        return match c.store.read(req.offset, &mut b[SIMPLE_REPLY_LEN..]).await {
            Ok(()) => Reply::Pooled(b),
            Err(e) => c.store_error(req, &e).into(),
        };
    }
    let mut pieces = sparse_pieces(c, req).await;
    if pieces.is_empty() {
        pieces.push((req.offset, req.len, false));
    }
    let hlen = if c.extended {
        EXTENDED_REPLY_LEN
    } else {
        STRUCTURED_REPLY_LEN
    };
    let total: usize = pieces
        .iter()
        .map(|p| hlen + if p.2 { 12 } else { 8 + p.1 as usize })
        .sum();
    let mut b = c.pool.get(total);
    let mut at = 0;
    let n = pieces.len();
    for (i, &(off, plen, hole)) in pieces.iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let (typ, clen) = if hole {
            (REPLY_TYPE_OFFSET_HOLE, 12)
        } else {
            (REPLY_TYPE_OFFSET_DATA, 8 + plen)
        };
        let mut h = &mut b[at..at + hlen + 8];
        encode_chunk_header(&mut h, c.ext_off(req), flags, typ, req.cookie, clen);
        h.put_u64(off);
        at += hlen + 8;
        if hole {
            b[at..at + 4].copy_from_slice(&(plen as u32).to_be_bytes());
            at += 4;
        } else {
            let data = &mut b[at..at + plen as usize];
            if let Err(e) = c.store.read(off, data).await {
                return c.store_error(req, &e).into();
            }
            at += plen as usize;
        }
    }
    debug_assert_eq!(at, total);
    Reply::Pooled(b)
}

/// Most descriptors in one block status reply.
const MAX_REPLY_DESCRIPTORS: usize = 64 * 1024;

async fn block_status(c: &Conn, req: &Request) -> BytesMut {
    if !c.meta {
        return c.error(req, EINVAL, "no metadata context was negotiated");
    }
    if req.len == 0 || !c.in_range(req) {
        return c.error(req, EINVAL, "block status range is empty or beyond the end");
    }
    // Descriptor lengths are 32-bit in compact mode; keep each query well inside that.
    let qlen = req.len.min(if c.extended { 1 << 40 } else { 1 << 31 });
    let ex = match c.store.extents(req.offset, qlen).await {
        Ok(ex) => ex,
        Err(e) => return c.store_error(req, &e),
    };
    let mut d: Vec<Descriptor> = Vec::new();
    for e in ex {
        let flags = match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => STATE_ZERO,
            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
        };
        match d.last_mut() {
            Some(l) if l.flags == flags => l.len += e.len,
            _ => {
                if d.len() == MAX_REPLY_DESCRIPTORS {
                    break;
                }
                d.push(Descriptor { len: e.len, flags })
            }
        }
    }
    if d.is_empty() {
        d.push(Descriptor {
            len: qlen,
            flags: 0,
        });
    }
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        d.truncate(1);
    }
    let mut p = BytesMut::new();
    encode_block_status(&mut p, 1, c.extended, &d);
    let typ = if c.extended {
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        REPLY_TYPE_BLOCK_STATUS
    };
    let mut b = BytesMut::with_capacity(p.len() + 32);
    encode_chunk_header(
        &mut b,
        c.ext_off(req),
        REPLY_FLAG_DONE,
        typ,
        req.cookie,
        p.len() as u64,
    );
    b.extend_from_slice(&p);
    b
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
