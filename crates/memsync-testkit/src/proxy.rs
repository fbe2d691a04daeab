//! A user-space TCP delay proxy, for RTT emulation where the kernel has no netem.
//!
//! Each direction of each connection is a *delay line* of kernel pipes: a reader splices
//! whatever bytes the socket has into a pipe (collecting for at most 1/16 of the one-way delay,
//! and never more than 1 ms or 1 MiB), stamps the piece with `first arrival + rtt/2` (and, with a
//! bandwidth cap, with the time the shared link would have finished sending it), and queues it;
//! a writer splices each piece into the other socket when its time comes. Payload never passes
//! through user space, so the proxy costs little CPU (`memsync bench mount`, case `proxy-cost`;
//! `docs/perf.md`). Many pieces are in flight at once, so throughput is
//! limited by the bandwidth (or the CPU), not by the delay: a window of W bytes in flight moves
//! W bytes per RTT, as over a real long link. The queue is bounded per direction, like a socket
//! buffer, in bytes ([`ProxyConfig::max_buffer`]) and in pieces ([`ProxyConfig::max_pieces`]:
//! each piece holds a pipe, two file descriptors, and a trickle of tiny messages would otherwise
//! open pipes until the process runs out of descriptors).
//!
//! A connection ends cleanly when each side has closed its sending half (each half-close is
//! passed on once the delay line has drained). When a side fails (a send into it fails, or a
//! read from it fails with an error such as a reset), the whole connection is torn down at once:
//! both sockets are shut down and closed, so the other peer sees the end instead of sending
//! into a line that nobody drains.
//!
//! Controls for failure tests: [`Proxy::cut_all`] closes every connection; [`Proxy::set_blocked`]
//! makes the link a black hole (queued and new data waits, new connections are closed at once)
//! until unblocked.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

use parking_lot::Mutex;
use rustix::net::{Shutdown, shutdown};
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PIECE: usize = 1 << 20;
/// Half of the timer's 1 ms resolution.
const TIMER_SLACK: Duration = Duration::from_micros(500);

/// Proxy settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Added round-trip time (half each way).
    pub rtt: Duration,
    /// Bandwidth cap per direction in bytes per second, shared by all connections.
    pub bandwidth: Option<u64>,
    /// Bytes queued per direction of a connection before the proxy stops reading.
    pub max_buffer: usize,
    /// Pieces (each a kernel pipe) queued per direction of a connection before the proxy stops
    /// reading. A piece collects for at most 1/16 of the one-way delay, so 64 pieces cover the
    /// delay line at full speed.
    pub max_pieces: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            rtt: Duration::ZERO,
            bandwidth: None,
            max_buffer: 128 << 20,
            max_pieces: 64,
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
    max_pieces: usize,
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
            max_pieces: cfg.max_pieces.max(1),
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
    let (client, up) = (Arc::new(client), Arc::new(up));
    let mut a = tokio::spawn(pipe(sh.clone(), 0, client.clone(), up.clone()));
    let mut b = tokio::spawn(pipe(sh.clone(), 1, up.clone(), client.clone()));
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        let end = tokio::select! {
            r = &mut a, if !a_done => { a_done = true; r.unwrap_or(End::Failed) }
            r = &mut b, if !b_done => { b_done = true; r.unwrap_or(End::Failed) }
            _ = cut.changed() => {
                sh.cut_count.fetch_add(1, Relaxed);
                End::Failed
            }
        };
        if end == End::Failed {
            break;
        }
    }
    // Tear down: the other direction may be blocked reading from a peer that waits for us, so
    // stop it, and shut both sockets so that both peers see the end now. The sockets close when
    // the aborted tasks let go of them.
    // (A finished JoinHandle must not be polled again.)
    if !a_done {
        a.abort();
        let _ = a.await;
    }
    if !b_done {
        b.abort();
        let _ = b.await;
    }
    for s in [&client, &up] {
        let _ = shutdown(&**s, Shutdown::Both);
    }
}

/// How one direction of a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The source closed its sending half; everything queued was delivered and the half-close
    /// passed on.
    Eof,
    /// A send or receive failed: the connection is dead.
    Failed,
}

async fn wait_unblocked(sh: &Shared) {
    let mut rx = sh.blocked.subscribe();
    let _ = rx.wait_for(|b| !*b).await;
}

/// A kernel pipe holding one piece of the delay line. Bytes are spliced from the source socket
/// into it and, when due, from it into the destination socket: the proxy never copies payload
/// through user space (loopback TCP hands over page references), which is what lets it move
/// several GB/s on two vCPUs.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Without CAP_SYS_RESOURCE the size is capped by fs.pipe-max-size and the per-user pipe
        // budget; a smaller pipe only means smaller pieces.
        let cap =
            fcntl_setpipe_size(&w, PIECE).or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))?;
        Ok(Pipe { r, w, cap })
    }
}

/// Spare pipes of one direction, reused so that a busy connection does not create and close
/// pipes per piece.
#[derive(Default)]
struct Pool(Mutex<Vec<Pipe>>);

impl Pool {
    fn get(&self) -> io::Result<Pipe> {
        match self.0.lock().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }
    fn put(&self, p: Pipe) {
        let mut v = self.0.lock();
        if v.len() < 64 {
            v.push(p);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Splice what `src` has (up to the pipe's free space) into `pipe`, without waiting.
/// `Ok(None)`: nothing available now; `Ok(Some(0))`: end of stream.
fn splice_in(src: &TcpStream, pipe: &Pipe, room: usize) -> io::Result<Option<usize>> {
    match src.try_io(Interest::READABLE, || {
        splice(
            src,
            None,
            &pipe.w,
            None,
            room,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )
        .map_err(io::Error::from)
    }) {
        Ok(n) => Ok(Some(n)),
        Err(e) if would_block(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How long a piece keeps collecting bytes before it is sealed and stamped: a small fraction of
/// the one-way delay (so the timing error is at most ~6%), and never more than 1 ms.
fn coalesce_for(half: Duration) -> Duration {
    (half / 16).min(Duration::from_millis(1))
}

/// One direction: a delay line from `src` to `dst`.
async fn pipe(sh: Arc<Shared>, dir: usize, src: Arc<TcpStream>, dst: Arc<TcpStream>) -> End {
    let budget = Arc::new(Semaphore::new(sh.max_buffer));
    let pool = Arc::new(Pool::default());
    // The channel's bound caps the pipes of this direction: `max_pieces` queued, one being
    // filled, one being sent.
    let (tx, mut rx) =
        mpsc::channel::<(Instant, Pipe, usize, tokio::sync::OwnedSemaphorePermit)>(sh.max_pieces);
    let reader = {
        let sh = sh.clone();
        let budget = budget.clone();
        let pool = pool.clone();
        async move {
            loop {
                let Ok(permit) = budget.clone().acquire_many_owned(PIECE as u32).await else {
                    return End::Failed;
                };
                let pipe = match pool.get() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("proxy: cannot create a pipe ({e}); closing the connection");
                        return End::Failed;
                    }
                };
                let room = pipe.cap.min(PIECE);
                let mut len = 0usize;
                let mut end = None;
                // When the first bytes arrived, and the one-way delay then.
                let mut first: Option<(Instant, Duration)> = None;
                // Wait for the first bytes, then keep collecting for the coalescing interval.
                // The piece is due `rtt/2` after its *first* bytes arrived, so collecting adds
                // no delay to a lone message (a request, a small reply); later bytes of the
                // piece travel at most the coalescing interval (1/16 of the delay) faster.
                loop {
                    match splice_in(&src, &pipe, room - len) {
                        Ok(Some(0)) => {
                            end = Some(End::Eof);
                            break;
                        }
                        Ok(Some(n)) => {
                            len += n;
                            let now = Instant::now();
                            let (at, half) = *first.get_or_insert_with(|| {
                                (now, Duration::from_nanos(sh.rtt_ns.load(Relaxed) / 2))
                            });
                            if len >= room || now >= at + coalesce_for(half) {
                                break;
                            }
                        }
                        Ok(None) => match first {
                            None => {
                                if src.readable().await.is_err() {
                                    end = Some(End::Failed);
                                    break;
                                }
                            }
                            Some((at, half)) => {
                                let until = at + coalesce_for(half);
                                let ready = tokio::time::timeout_at(until, src.readable()).await;
                                if !matches!(ready, Ok(Ok(()))) {
                                    break;
                                }
                            }
                        },
                        Err(_) => {
                            end = Some(End::Failed);
                            break;
                        }
                    }
                }
                if let Some((now, half)) = first {
                    // Hold budget for the bytes read, not for the whole piece.
                    let permit = {
                        let mut p = permit;
                        p.split(len).unwrap_or(p)
                    };
                    let bw = sh.bandwidth.load(Relaxed);
                    let due = if bw > 0 {
                        let mut free = sh.link_free[dir].lock();
                        let start = (*free).max(now);
                        let done = start
                            + Duration::from_nanos(
                                (len as u128 * 1_000_000_000 / bw as u128) as u64,
                            );
                        *free = done;
                        done + half
                    } else {
                        now + half
                    };
                    if tx.send((due, pipe, len, permit)).await.is_err() {
                        return End::Failed;
                    }
                }
                if let Some(end) = end {
                    return end;
                }
            }
        }
    };
    let writer = async {
        while let Some((due, pipe, len, permit)) = rx.recv().await {
            if *sh.blocked.borrow() {
                wait_unblocked(&sh).await;
            }
            // The timer wakes in the millisecond tick after its deadline (somewhere in
            // [deadline, deadline + 1 ms)): aim half a tick early so the delay is right on
            // average instead of always up to 1 ms long.
            if let Some(aim) = due.checked_sub(TIMER_SLACK)
                && aim > Instant::now()
            {
                tokio::time::sleep_until(aim).await;
            }
            let mut left = len;
            while left > 0 {
                let r = dst.try_io(Interest::WRITABLE, || {
                    splice(
                        &pipe.r,
                        None,
                        &*dst,
                        None,
                        left,
                        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                    )
                    .map_err(io::Error::from)
                });
                match r {
                    Ok(0) => return End::Failed,
                    Ok(n) => left -= n,
                    Err(e) if would_block(&e) => {
                        if dst.writable().await.is_err() {
                            return End::Failed;
                        }
                    }
                    Err(_) => return End::Failed,
                }
            }
            sh.bytes[dir].fetch_add(len as u64, Relaxed);
            pool.put(pipe);
            drop(permit);
        }
        let _ = shutdown(&*dst, Shutdown::Write);
        End::Eof
    };
    tokio::pin!(reader, writer);
    // A writer that fails must stop its reader too: otherwise the reader keeps taking the
    // source's bytes until the budget runs out and then waits forever, and the source's peer
    // never learns that its data goes nowhere.
    tokio::select! {
        w = &mut writer => w,
        r = &mut reader => match r {
            End::Eof => writer.await,
            End::Failed => End::Failed,
        },
    }
}
