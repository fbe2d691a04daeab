//! A memsync sync peer (`memsync sync --listen ADDR STORE`) and the client side of it,
//! [`RemoteDest`]. The protocol is in `PROTOCOL.md`; the peer computes its digests where its
//! data is, keeps its own index, and answers requests in order while working on several at once.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use memsync_core::wire;
use memsync_core::{DynStore, Result, StoreError, StoreUrl, async_trait};
use memsync_nbd::transport::Transport;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::dest::{Dest, DestStats, LocalDest, PatchOutcome, Run};
use crate::digest::{Digest, Layout};
use crate::proto::{MAX_DIGESTS, Msg};

/// Read one frame; `None` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    count: &AtomicU64,
) -> io::Result<Option<Msg>> {
    wire::read_frame(r, count, usize::MAX).await
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg, count: &AtomicU64) -> io::Result<()> {
    let f = m.encode();
    count.fetch_add(f.len() as u64, Relaxed);
    w.write_all(&f).await
}

fn store_err(e: io::Error, what: &str) -> StoreError {
    StoreError::backend_with(format!("sync peer: {what}"), e)
}

/// How a peer serves.
#[derive(Clone, Debug, Default)]
pub struct PeerConfig {
    /// Accept only TLS connections with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The file under the store (a `file:` store), for its persisted index.
    pub index_file: Option<PathBuf>,
}

/// A peer serving one store to sync clients, one sync at a time.
pub struct Peer {
    store: DynStore,
    cfg: PeerConfig,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Bytes received and sent over all connections.
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Peer({:?})", self.store)
    }
}

enum Job {
    Reply(tokio::task::JoinHandle<Msg>),
    Commit,
}

fn reply_of<T>(r: Result<T>, ok: impl FnOnce(T) -> Msg) -> Msg {
    match r {
        Ok(v) => ok(v),
        Err(e) => Msg::Error(e.chain()),
    }
}

impl Peer {
    pub fn new(store: DynStore, cfg: PeerConfig) -> Arc<Self> {
        Arc::new(Peer {
            store,
            cfg,
            one_at_a_time: tokio::sync::Mutex::new(()),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        })
    }

    /// Accept connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (s, from) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                let r = match me.cfg.tls.clone() {
                    Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(s).await {
                        Ok(t) => me.handle(t).await,
                        Err(e) => Err(store_err(e, "TLS handshake")),
                    },
                    None => me.handle(s).await,
                };
                match r {
                    Ok(()) => tracing::info!("sync peer: {from} done"),
                    Err(e) => tracing::warn!("sync peer: {from}: {}", e.chain()),
                }
            });
        }
    }

    /// Serve one connection.
    pub async fn handle<T: Transport>(self: &Arc<Self>, conn: T) -> Result<()> {
        let (mut r, w) = conn.halves();
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let (size, chunk_size, want) = match read_frame(&mut r, &self.received).await {
            Ok(Some(Msg::Hello {
                size,
                chunk_size,
                want_digests,
            })) => (size, chunk_size, want_digests),
            Ok(None) => return Ok(()),
            Ok(Some(m)) => return Err(StoreError::backend(format!("expected hello, got {m:?}"))),
            Err(e) => return Err(store_err(e, "reading hello")),
        };
        if size != self.store.size() {
            let m = format!(
                "the peer's store has {} bytes, the client's source {size}: sync needs equal sizes",
                self.store.size()
            );
            return refuse(&mut w, m, &self.sent).await;
        }
        let _one = self.one_at_a_time.lock().await;
        let dest = match LocalDest::new(
            self.store.clone(),
            chunk_size,
            self.cfg.index_file.as_deref(),
        ) {
            Ok(d) => Arc::new(d),
            Err(e) => return refuse(&mut w, e.chain(), &self.sent).await,
        };
        let io = |e| store_err(e, "writing");
        if want {
            let digests = match dest.digests().await {
                Ok(d) => d,
                Err(e) => return refuse(&mut w, e.chain(), &self.sent).await,
            };
            let index_used = dest.index_status() == crate::index::IndexStatus::Used;
            write_msg(&mut w, &Msg::Ready { index_used }, &self.sent)
                .await
                .map_err(io)?;
            for (k, part) in digests.chunks(MAX_DIGESTS).enumerate() {
                let m = Msg::Digests {
                    first: (k * MAX_DIGESTS) as u64,
                    digests: part.to_vec(),
                };
                write_msg(&mut w, &m, &self.sent).await.map_err(io)?;
            }
        } else {
            write_msg(&mut w, &Msg::Ready { index_used: false }, &self.sent)
                .await
                .map_err(io)?;
        }
        w.flush().await.map_err(io)?;

        // Requests are worked on concurrently (spawned), replies go out in request order.
        let (tx, mut rx) = mpsc::channel::<Job>(4096);
        let wdest = dest.clone();
        let me = self.clone();
        let writer = tokio::spawn(async move {
            let mut broken: Option<io::Error> = None;
            while let Some(job) = rx.recv().await {
                let msg = match job {
                    Job::Reply(h) => h
                        .await
                        .unwrap_or_else(|e| Msg::Error(format!("peer task failed: {e}"))),
                    Job::Commit => reply_of(wdest.commit().await, Msg::Committed),
                };
                if broken.is_some() {
                    continue; // keep draining: every spawned patch must finish before the end
                }
                let mut r = write_msg(&mut w, &msg, &me.sent).await;
                if r.is_ok() && rx.is_empty() {
                    r = w.flush().await;
                }
                if let Err(e) = r {
                    broken = Some(e);
                }
            }
            let _ = w.flush().await;
            broken
        });
        let mut result = Ok(());
        loop {
            let m = match read_frame(&mut r, &self.received).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    result = Err(store_err(e, "reading a request"));
                    break;
                }
            };
            let d = dest.clone();
            let job = match m {
                Msg::PageReq { chunk } => Job::Reply(tokio::spawn(async move {
                    reply_of(d.page_digests(chunk).await, |digests| Msg::PageDigests {
                        chunk,
                        digests,
                    })
                })),
                Msg::Patch {
                    chunk,
                    digest,
                    runs,
                } => Job::Reply(tokio::spawn(async move {
                    reply_of(d.patch(chunk, digest, runs).await, |o| Msg::Patched {
                        chunk,
                        applied: o == PatchOutcome::Applied,
                    })
                })),
                Msg::Commit => Job::Commit,
                other => {
                    result = Err(StoreError::backend(format!("unexpected request {other:?}")));
                    break;
                }
            };
            if tx.send(job).await.is_err() {
                break;
            }
        }
        drop(tx);
        let broken = writer.await.ok().flatten();
        // Whatever ended the connection, every patch that arrived whole was applied; make them
        // durable and keep the index right for the next sync.
        dest.commit().await.map_err(|e| e.context("final commit"))?;
        if let (Ok(()), Some(e)) = (&result, broken) {
            result = Err(store_err(e, "writing a reply"));
        }
        result
    }
}

/// Tell the client why, then end the connection.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, msg: String, count: &AtomicU64) -> Result<()> {
    let _ = write_msg(w, &Msg::Error(msg.clone()), count).await;
    let _ = w.flush().await;
    Err(StoreError::backend(msg))
}

/// Where a peer is: `memsync://HOST:PORT` or `memsyncs://HOST:PORT?tls-ca=FILE[&tls-hostname=N]`.
#[derive(Clone)]
pub struct PeerAddr {
    pub addr: String,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerAddr({}, tls: {})", self.addr, self.tls.is_some())
    }
}

/// The URL schemes of a sync peer.
pub fn is_peer_url(s: &str) -> bool {
    s.starts_with("memsync://") || s.starts_with("memsyncs://")
}

impl PeerAddr {
    pub fn parse(s: &str) -> Result<Self> {
        let url = StoreUrl::parse(s)?;
        let tls = match url.scheme.as_str() {
            "memsync" => false,
            "memsyncs" => true,
            _ => return Err(url.error("scheme", "a sync peer is memsync:// or memsyncs://")),
        };
        url.ensure_params(if tls {
            &["tls-ca", "tls-hostname"]
        } else {
            &[]
        })?;
        let addr = url
            .authority
            .clone()
            .filter(|a| !a.is_empty() && a.contains(':'))
            .ok_or_else(|| url.error("host", "expected HOST:PORT"))?;
        let tls = if tls {
            Some(memsync_nbd::client_tls_from_url(&url, &addr, "memsyncs")?)
        } else {
            None
        };
        Ok(PeerAddr { addr, tls })
    }
}

type Waiter = oneshot::Sender<Result<Msg>>;

/// What the connection's tasks share. It holds no sender of the frame queue: dropping the
/// [`RemoteDest`] ends the writer, which shuts the stream down, and the reader then sees the end.
struct Conn {
    /// Waiters in request order; `None` once replies can no longer come.
    pending: Mutex<Option<VecDeque<Waiter>>>,
    sent: AtomicU64,
    received: AtomicU64,
}

/// A peer as the destination of a sync.
pub struct RemoteDest {
    layout: Layout,
    tx: mpsc::UnboundedSender<Bytes>,
    conn: Arc<Conn>,
    digests: Mutex<Option<oneshot::Receiver<Result<Vec<Digest>>>>>,
}

impl fmt::Debug for RemoteDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteDest({:?})", self.layout)
    }
}

fn lost() -> StoreError {
    StoreError::backend("sync peer: connection lost")
}

impl RemoteDest {
    /// Connect and say hello. With `want_digests` the peer starts computing its digests at
    /// once (they arrive while the source is hashed here).
    pub async fn connect(
        addr: &PeerAddr,
        size: u64,
        chunk_size: u64,
        want_digests: bool,
    ) -> Result<Arc<Self>> {
        let layout = Layout::new(size, chunk_size)?;
        let tcp = TcpStream::connect(&addr.addr)
            .await
            .map_err(|e| store_err(e, &format!("connecting to {}", addr.addr)))?;
        let _ = tcp.set_nodelay(true);
        match &addr.tls {
            Some((cfg, name)) => {
                let t = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| store_err(e, "TLS handshake"))?;
                Self::start(t, layout, want_digests).await
            }
            None => Self::start(tcp, layout, want_digests).await,
        }
    }

    async fn start<T: Transport>(conn: T, layout: Layout, want: bool) -> Result<Arc<Self>> {
        let (mut r, w) = conn.halves();
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let hello = Msg::Hello {
            size: layout.size,
            chunk_size: layout.chunk_size,
            want_digests: want,
        };
        write_msg(&mut w, &hello, &sent)
            .await
            .and(w.flush().await)
            .map_err(|e| store_err(e, "sending hello"))?;
        match read_frame(&mut r, &received).await {
            Ok(Some(Msg::Ready { .. })) => {}
            Ok(Some(Msg::Error(m))) => return Err(StoreError::backend(format!("sync peer: {m}"))),
            Ok(Some(m)) => {
                return Err(StoreError::backend(format!(
                    "sync peer: expected ready, got {m:?}"
                )));
            }
            Ok(None) => return Err(lost()),
            Err(e) => return Err(store_err(e, "reading ready")),
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let c = Arc::new(Conn {
            pending: Mutex::new(Some(VecDeque::new())),
            sent,
            received,
        });
        let wc = c.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                wc.sent.fetch_add(f.len() as u64, Relaxed);
                let mut r = w.write_all(&f).await;
                if r.is_ok() && rx.is_empty() {
                    r = w.flush().await;
                }
                if r.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        let (dtx, drx) = oneshot::channel();
        let rc = c.clone();
        tokio::spawn(async move {
            // Answer every waiter with the error and refuse later calls.
            let fail_all = |e: StoreError, rc: &Conn| {
                for w in rc.pending.lock().take().into_iter().flatten() {
                    let _ = w.send(Err(StoreError::backend(e.chain())));
                }
            };
            if want {
                match read_digests(&mut r, layout, &rc.received).await {
                    Ok(d) => {
                        let _ = dtx.send(Ok(d));
                    }
                    Err(e) => {
                        let _ = dtx.send(Err(StoreError::backend(e.chain())));
                        fail_all(e, &rc);
                        return;
                    }
                }
            }
            loop {
                let m = match read_frame(&mut r, &rc.received).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        fail_all(store_err(e, "reading a reply"), &rc);
                        break;
                    }
                };
                let waiter = rc.pending.lock().as_mut().and_then(|p| p.pop_front());
                match (m, waiter) {
                    (Msg::Error(e), w) => {
                        let e = StoreError::backend(format!("sync peer: {e}"));
                        if let Some(w) = w {
                            let _ = w.send(Err(StoreError::backend(e.chain())));
                        }
                        fail_all(e, &rc);
                        break;
                    }
                    (m, Some(w)) => {
                        let _ = w.send(Ok(m));
                    }
                    (m, None) => {
                        tracing::warn!("sync peer sent an unrequested {m:?}");
                        fail_all(StoreError::backend("sync peer: unrequested reply"), &rc);
                        break;
                    }
                }
            }
            fail_all(lost(), &rc);
        });
        Ok(Arc::new(RemoteDest {
            layout,
            tx,
            conn: c,
            digests: Mutex::new(want.then_some(drx)),
        }))
    }

    async fn call(&self, m: Msg) -> Result<Msg> {
        let (tx, rx) = oneshot::channel();
        {
            // Queue the waiter and the frame under one lock, so replies match in order.
            let mut p = self.conn.pending.lock();
            let Some(p) = p.as_mut() else {
                return Err(lost());
            };
            p.push_back(tx);
            if self.tx.send(m.encode()).is_err() {
                p.pop_back();
                return Err(lost());
            }
        }
        rx.await.map_err(|_| lost())?
    }
}

async fn read_digests<R: AsyncRead + Unpin>(
    r: &mut R,
    layout: Layout,
    count: &AtomicU64,
) -> Result<Vec<Digest>> {
    let n = layout.chunks();
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        match read_frame(r, count).await {
            Ok(Some(Msg::Digests { first, digests })) => {
                if first != out.len() as u64 || out.len() as u64 + digests.len() as u64 > n {
                    return Err(StoreError::backend(format!(
                        "sync peer sent digests {first}+{} out of order (have {} of {n})",
                        digests.len(),
                        out.len()
                    )));
                }
                out.extend(digests);
            }
            Ok(Some(Msg::Error(m))) => return Err(StoreError::backend(format!("sync peer: {m}"))),
            Ok(Some(m)) => {
                return Err(StoreError::backend(format!(
                    "sync peer: expected digests, got {m:?}"
                )));
            }
            Ok(None) => return Err(lost()),
            Err(e) => return Err(store_err(e, "reading digests")),
        }
    }
    Ok(out)
}

fn unexpected(m: Msg, want: &str) -> StoreError {
    StoreError::backend(format!("sync peer: expected {want}, got {m:?}"))
}

#[async_trait]
impl Dest for RemoteDest {
    fn layout(&self) -> Layout {
        self.layout
    }

    async fn digests(&self) -> Result<Vec<Digest>> {
        let rx = self.digests.lock().take().ok_or_else(|| {
            StoreError::backend("the peer's digests were not asked for (or taken)")
        })?;
        rx.await.map_err(|_| lost())?
    }

    async fn page_digests(&self, i: u64) -> Result<Vec<u64>> {
        match self.call(Msg::PageReq { chunk: i }).await? {
            Msg::PageDigests { chunk, digests } if chunk == i => Ok(digests),
            m => Err(unexpected(m, &format!("page digests of chunk {i}"))),
        }
    }

    async fn patch(&self, i: u64, digest: Digest, runs: Vec<Run>) -> Result<PatchOutcome> {
        let m = Msg::Patch {
            chunk: i,
            digest,
            runs,
        };
        match self.call(m).await? {
            Msg::Patched { chunk, applied } if chunk == i => Ok(if applied {
                PatchOutcome::Applied
            } else {
                PatchOutcome::Mismatch
            }),
            m => Err(unexpected(m, &format!("patched chunk {i}"))),
        }
    }

    async fn commit(&self) -> Result<DestStats> {
        match self.call(Msg::Commit).await? {
            Msg::Committed(s) => Ok(s),
            m => Err(unexpected(m, "committed")),
        }
    }

    fn wire(&self) -> (u64, u64) {
        (
            self.conn.sent.load(Relaxed),
            self.conn.received.load(Relaxed),
        )
    }
}
