//! A user-space TCP delay proxy, for RTT emulation where the kernel has no netem.
//!
//! Each direction of each connection is a *delay line*: a reader takes whatever bytes the
//! socket has (up to 256 KiB at a time), stamps them with `arrival + rtt/2` (and, with a
//! bandwidth cap, with the time the shared link would have finished sending them), and queues
//! them; a writer sends each piece when its time comes. Many pieces are in flight at once, so
//! throughput is limited by the bandwidth (or the CPU), not by the delay: a window of W bytes
//! in flight moves W bytes per RTT, as over a real long link. The queue is bounded per direction
//! ([`ProxyConfig::max_buffer`]), like a socket buffer.
//!
//! Controls for failure tests: [`Proxy::cut_all`] closes every connection; [`Proxy::set_blocked`]
//! makes the link a black hole (queued and new data waits, new connections are closed at once)
//! until unblocked.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PIECE: usize = 256 * 1024;

/// Proxy settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Added round-trip time (half each way).
    pub rtt: Duration,
    /// Bandwidth cap per direction in bytes per second, shared by all connections.
    pub bandwidth: Option<u64>,
    /// Bytes queued per direction of a connection before the proxy stops reading.
    pub max_buffer: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            rtt: Duration::ZERO,
            bandwidth: None,
            max_buffer: 128 << 20,
        }
    }
}

/// Proxy counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes forwarded client → upstream.
    pub up_bytes: u64,
    /// Bytes forwarded upstream → client.
    pub down_bytes: u64,
    /// Connections accepted (including refused ones).
    pub accepted: u64,
    /// Connections refused because the proxy was blocked or the upstream was unreachable.
    pub refused: u64,
    /// Connections closed by [`Proxy::cut_all`].
    pub cut: u64,
}

struct Shared {
    upstream: String,
    rtt_ns: AtomicU64,
    /// 0 = unlimited.
    bandwidth: AtomicU64,
    max_buffer: usize,
    blocked: watch::Sender<bool>,
    cut: watch::Sender<u64>,
    link_free: [Mutex<Instant>; 2],
    bytes: [AtomicU64; 2],
    accepted: AtomicU64,
    refused: AtomicU64,
    cut_count: AtomicU64,
    live: AtomicU64,
    stopped: AtomicBool,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({} -> {})", self.addr, self.shared.upstream)
    }
}

impl Proxy {
    /// Listen on `listen` (e.g. `127.0.0.1:0`) and forward to `upstream` (`HOST:PORT`).
    pub async fn start(listen: &str, upstream: &str, cfg: ProxyConfig) -> io::Result<Proxy> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            rtt_ns: AtomicU64::new(cfg.rtt.as_nanos() as u64),
            bandwidth: AtomicU64::new(cfg.bandwidth.unwrap_or(0)),
            max_buffer: cfg.max_buffer.max(PIECE),
            blocked: watch::channel(false).0,
            cut: watch::channel(0).0,
            link_free: [Mutex::new(now), Mutex::new(now)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut_count: AtomicU64::new(0),
            live: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        sh.accepted.fetch_add(1, Relaxed);
                        tokio::spawn(handle(sh.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("proxy: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Ok(Proxy {
            shared,
            addr,
            accept,
        })
    }

    /// Where the proxy listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Change the added round-trip time (applies to data read from now on).
    pub fn set_rtt(&self, rtt: Duration) {
        self.shared.rtt_ns.store(rtt.as_nanos() as u64, Relaxed);
    }

    /// Change the bandwidth cap (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .bandwidth
            .store(bytes_per_sec.unwrap_or(0), Relaxed);
    }

    /// Black-hole the link (`true`) or let it flow again (`false`).
    pub fn set_blocked(&self, blocked: bool) {
        self.shared.blocked.send_replace(blocked);
    }

    /// Close every open connection now.
    pub fn cut_all(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Connections open now.
    pub fn connections(&self) -> u64 {
        self.shared.live.load(Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            up_bytes: s.bytes[0].load(Relaxed),
            down_bytes: s.bytes[1].load(Relaxed),
            accepted: s.accepted.load(Relaxed),
            refused: s.refused.load(Relaxed),
            cut: s.cut_count.load(Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, SeqCst);
        self.accept.abort();
        self.cut_all();
    }
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Relaxed);
    }
}

async fn handle(sh: Arc<Shared>, client: TcpStream) {
    if *sh.blocked.borrow() || sh.stopped.load(SeqCst) {
        sh.refused.fetch_add(1, Relaxed);
        return;
    }
    let mut cut = sh.cut.subscribe();
    let up = match TcpStream::connect(&sh.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("proxy: connecting to {}: {e}", sh.upstream);
            sh.refused.fetch_add(1, Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    sh.live.fetch_add(1, Relaxed);
    let _live = LiveGuard(sh.clone());
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    let a = tokio::spawn(pipe(sh.clone(), 0, cr, uw));
    let b = tokio::spawn(pipe(sh.clone(), 1, ur, cw));
    let (aa, ba) = (a.abort_handle(), b.abort_handle());
    tokio::select! {
        _ = async { let _ = a.await; let _ = b.await; } => {}
        _ = cut.changed() => {
            sh.cut_count.fetch_add(1, Relaxed);
            aa.abort();
            ba.abort();
        }
    }
}

async fn wait_unblocked(sh: &Shared) {
    let mut rx = sh.blocked.subscribe();
    let _ = rx.wait_for(|b| !*b).await;
}

/// One direction: a delay line from `r` to `w`.
async fn pipe(sh: Arc<Shared>, dir: usize, mut r: OwnedReadHalf, mut w: OwnedWriteHalf) {
    let budget = Arc::new(Semaphore::new(sh.max_buffer));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, Bytes, tokio::sync::OwnedSemaphorePermit)>();
    let reader = {
        let sh = sh.clone();
        let budget = budget.clone();
        async move {
            loop {
                let Ok(permit) = budget.clone().acquire_many_owned(PIECE as u32).await else {
                    return;
                };
                let mut buf = BytesMut::with_capacity(PIECE);
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        // Hold budget for the bytes read, not for the whole piece.
                        let permit = {
                            let mut p = permit;
                            p.split(n).unwrap_or(p)
                        };
                        let now = Instant::now();
                        let half = Duration::from_nanos(sh.rtt_ns.load(Relaxed) / 2);
                        let bw = sh.bandwidth.load(Relaxed);
                        let due = if bw > 0 {
                            let mut free = sh.link_free[dir].lock();
                            let start = (*free).max(now);
                            let done = start
                                + Duration::from_nanos(
                                    (n as u128 * 1_000_000_000 / bw as u128) as u64,
                                );
                            *free = done;
                            done + half
                        } else {
                            now + half
                        };
                        if tx.send((due, buf.freeze(), permit)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let writer = async {
        while let Some((due, data, permit)) = rx.recv().await {
            if *sh.blocked.borrow() {
                wait_unblocked(&sh).await;
            }
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if w.write_all(&data).await.is_err() {
                return;
            }
            sh.bytes[dir].fetch_add(data.len() as u64, Relaxed);
            drop(permit);
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
