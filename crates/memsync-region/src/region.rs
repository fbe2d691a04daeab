//! [`LazyRegion`] and its engine: fault-handler threads, the background
//! puller, fetching with retries, and installing chunks.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use memsync_core::{DynStore, StoreError};
use memsync_sys::{
    Advice, ContinueMode, CopyMode, Event, Features, Install, MapOptions, Mapping, MemfdFlags,
    MoveMode, OpenFlags, PageFaultFlags, RegisterMode, SigbusFile, Staging, Uffd, UffdMsg,
    ftruncate, memfd_create, page_size, poll_readable,
};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::{Backing, RegionConfig};
use crate::pull::{PullPriority, PullView};
use crate::state::{ChunkBitmap, ChunkMap, ChunkState, Geometry};
use crate::stats::{RegionStats, add, inc};

/// Why a region could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store failed (e.g. while reporting its extents).
    #[error("{context}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The configuration or the kernel cannot work together.
    #[error("invalid region configuration: {0}")]
    Config(String),
}

fn sys(context: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Sys { context, source }
}

/// A chunk the region could not fetch: reported by
/// [`LazyRegion::last_error`], [`LazyRegion::errors`] and returned by
/// [`LazyRegion::read_at`]/[`LazyRegion::write_at`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chunk {chunk} (bytes {offset}+{len}) could not be fetched after {attempts} attempt(s){}: {message}", if *.poisoned { ", poisoned" } else { "" })]
pub struct ChunkError {
    /// Chunk index.
    pub chunk: usize,
    /// Byte offset of the chunk.
    pub offset: u64,
    /// Bytes of data in the chunk.
    pub len: u64,
    /// Store reads attempted.
    pub attempts: u32,
    /// Whether the chunk's pages were poisoned (accesses raise `SIGBUS`).
    pub poisoned: bool,
    /// The last error, with its cause chain.
    pub message: String,
    /// When the fetch was given up.
    pub at: SystemTime,
}

/// Background pull progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullProgress {
    /// Chunks present (by any path).
    pub present_chunks: usize,
    /// Chunks of the region.
    pub total_chunks: usize,
    /// Chunks the puller fetched.
    pub pulled_chunks: u64,
    /// Bytes the puller read from the store.
    pub pulled_bytes: u64,
    /// The puller is enabled (started and not paused).
    pub running: bool,
    /// The puller found nothing left to pull.
    pub done: bool,
}

/// Runs store futures: a private current-thread runtime or a shared handle
/// (with how long to spin for the answer before sleeping).
#[derive(Debug)]
enum Exec {
    Own(tokio::runtime::Runtime),
    Shared(tokio::runtime::Handle, Duration),
}

impl Exec {
    fn new(handle: Option<&tokio::runtime::Handle>, spin: Duration) -> io::Result<Self> {
        Ok(match handle {
            Some(h) => Self::Shared(h.clone(), spin),
            None => Self::Own(
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()?,
            ),
        })
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        match self {
            Self::Own(rt) => rt.block_on(f),
            Self::Shared(h, spin) if spin.is_zero() => h.block_on(f),
            Self::Shared(h, spin) => {
                // The runtime's workers drive its I/O and timers; this thread
                // only polls the future, so any waker will do.
                let _g = h.enter();
                spin_block_on(f, *spin)
            }
        }
    }
}

/// Wakes a thread that polls a future by hand: sets a flag it spins on and
/// unparks it in case it gave up spinning.
struct SpinWaker {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl std::task::Wake for SpinWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Polls `f` to completion on this thread, spinning up to `spin` for each
/// wake-up before parking. A parked thread whose vCPU went idle costs a
/// halted-vCPU wake-up (~50 µs on this VM) when the answer comes; a store
/// that answers within the spin (memory behind a loopback server, a LAN)
/// is seen at once.
fn spin_block_on<F: Future>(f: F, spin: Duration) -> F::Output {
    let w = Arc::new(SpinWaker {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = std::task::Waker::from(Arc::clone(&w));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        let t0 = Instant::now();
        while !w.woken.swap(false, Ordering::Acquire) {
            if t0.elapsed() >= spin {
                while !w.woken.swap(false, Ordering::Acquire) {
                    std::thread::park();
                }
                break;
            }
            std::hint::spin_loop();
        }
    }
}

/// Per-thread fetch state: a staging buffer of one chunk, an executor and
/// faults put aside while draining events.
#[derive(Debug)]
struct Worker {
    /// Data is read into `staging[cur..cur + chunk]`; moved pages leave a
    /// hole, so `cur` advances after every move and the buffer is swapped
    /// for a pre-populated one from the [`StagePool`] when used up.
    staging: Staging,
    cur: usize,
    chunk: usize,
    exec: Exec,
    msg: [UffdMsg; 1],
    /// Events read while draining: a buffer of its own, because a drain
    /// happens while the message in `msg` is being served.
    drained: Vec<UffdMsg>,
    deferred: Vec<(usize, PageFaultFlags, Instant)>,
}

/// Length of a staging buffer for `chunk`-byte chunks and whether it uses
/// transparent huge pages: one chunk for chunks of a huge page or more
/// (each move takes whole huge pages), otherwise one huge page's worth of
/// small pages that successive chunks are carved from (so refilling the
/// buffer happens once per many small chunks, off the fault path).
fn staging_layout(chunk: usize) -> (usize, bool) {
    let pmd = memsync_sys::pmd_size();
    if chunk >= pmd {
        (chunk, true)
    } else {
        (pmd, false)
    }
}

fn new_staging(chunk: usize) -> io::Result<Staging> {
    let (len, huge) = staging_layout(chunk);
    Staging::with_huge_pages(len, huge)
}

impl Worker {
    fn new(
        chunk: usize,
        handle: Option<&tokio::runtime::Handle>,
        spin: Duration,
    ) -> io::Result<Self> {
        Ok(Self {
            staging: new_staging(chunk)?,
            cur: 0,
            chunk,
            exec: Exec::new(handle, spin)?,
            msg: [UffdMsg::default()],
            drained: (0..16).map(|_| UffdMsg::default()).collect(),
            deferred: Vec::new(),
        })
    }
}

/// Staging buffers whose pages are allocated ahead of time by a helper
/// thread (`MADV_POPULATE_WRITE`), so that a fetch that moves its pages
/// into the region does not also pay for allocating and zeroing the next
/// buffer's pages (for 2 MiB chunks that is as long as reading the data):
/// allocation runs on the other CPU, overlapped with fetches and installs.
#[derive(Debug, Default)]
struct StagePool {
    ready: Mutex<Vec<Staging>>,
    empty: Mutex<Vec<Staging>>,
    cv: Condvar,
}

impl StagePool {
    /// Gives `w` a fresh buffer after its current one was used up: a
    /// pre-populated one if there is one (the used one goes to the helper),
    /// otherwise the used one again (its pages are allocated while it is
    /// filled).
    fn recycle(&self, w: &mut Worker, stats: &RegionStats) {
        w.cur = 0;
        let fresh = self.ready.lock().pop();
        inc(if fresh.is_some() {
            &stats.staging_ready
        } else {
            &stats.staging_cold
        });
        if let Some(b) = fresh {
            let used = std::mem::replace(&mut w.staging, b);
            self.empty.lock().push(used);
            self.cv.notify_one();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Fault,
    Background,
    Inline,
    Repair,
}

enum Fail {
    Stopped,
    Store(StoreError, u32),
    Install(io::Error),
}

#[derive(Debug, Default)]
struct PullState {
    running: bool,
    done: bool,
    generation: u64,
    pulled_chunks: u64,
    pulled_bytes: u64,
}

#[derive(Debug)]
struct Settings {
    spin: Duration,
    spin_threads: usize,
    standby_after: Option<Duration>,
    memfd: bool,
    hugetlb: bool,
    fetch_deadline: Duration,
    /// `UFFDIO_POISON` is wanted and works on this region.
    use_poison: bool,
    retry_backoff: Duration,
    inline_resolve: bool,
    store_spin: Duration,
    runtime: Option<tokio::runtime::Handle>,
}

/// Shared by the region handle and its threads. Field order matters for
/// drop: the userfaultfd is closed before the memory is unmapped.
#[derive(Debug)]
struct Inner {
    uffd: Uffd,
    map: Mapping,
    memfd: Option<File>,
    /// Mapped over a failed chunk when it cannot be poisoned.
    sigbus: SigbusFile,
    geo: Geometry,
    store: DynStore,
    chunks: ChunkMap,
    zero: Vec<u64>,
    cfg: Settings,
    stats: RegionStats,
    errors: Mutex<Vec<ChunkError>>,
    stop: AtomicBool,
    stop_tx: watch::Sender<bool>,
    wake_rx: UnixStream,
    last_fault: AtomicUsize,
    urgent: AtomicUsize,
    use_move: AtomicBool,
    pull: Mutex<PullState>,
    pull_cv: Condvar,
    pool: Mutex<Vec<Worker>>,
    stage: StagePool,
    epoch: Instant,
    busy_since: AtomicU64,
    last_busy: AtomicU64,
    standby_lock: Mutex<()>,
    standby_cv: Condvar,
    user_mode_only: bool,
}

const NO_FAULT: usize = usize::MAX;
/// After this long without faults the standby handlers sleep until the
/// next fault instead of napping.
const STANDBY_IDLE_NS: u64 = 50_000_000;
const MAX_BACKOFF: Duration = Duration::from_millis(100);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Inner {
    fn base(&self) -> usize {
        self.map.addr()
    }

    fn is_zero(&self, i: usize) -> bool {
        self.zero
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Fetches and installs chunk `i`, which the caller has claimed
    /// (`Fetching`). Leaves it `Present`, `Poisoned` (fault/inline paths
    /// after the deadline) or `Absent` (background failure, shutdown).
    fn fetch(&self, w: &mut Worker, i: usize, src: Source) -> Result<(), ChunkError> {
        let (off, data_len, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        let zero = self.is_zero(i);
        let res = if zero {
            self.install_zero(w, off, dst, inst_len)
        } else {
            self.read_chunk(w, off, data_len, inst_len).and_then(|()| {
                let how = if src == Source::Repair {
                    How::Copy
                } else if self.cfg.memfd {
                    How::Continue
                } else if self.use_move.load(Ordering::Relaxed) {
                    How::Move
                } else {
                    How::Copy
                };
                self.install(w, off, dst, inst_len, how)
                    .map_err(Fail::Install)
            })
        };
        match res {
            Ok(()) => {
                if zero {
                    inc(&self.stats.chunks_zero);
                } else {
                    add(&self.stats.bytes_fetched, data_len);
                }
                match src {
                    Source::Fault | Source::Repair => inc(&self.stats.chunks_fault),
                    Source::Inline => inc(&self.stats.chunks_inline),
                    Source::Background => {
                        inc(&self.stats.chunks_background);
                        if !zero {
                            add(&self.stats.bytes_background, data_len);
                        }
                        let mut p = self.pull.lock();
                        p.pulled_chunks += 1;
                        p.pulled_bytes += data_len as u64;
                    }
                }
                // `false`: invalidated by a REMOVE meanwhile; it stays absent
                // and is fetched again on its next touch. Installs do not
                // wake: the waiters are woken only once the chunk is marked
                // present, so a returning access sees a consistent state.
                let _ = self.chunks.finish(i);
                let _ = self.uffd.wake(dst, inst_len);
                Ok(())
            }
            Err(Fail::Stopped) => {
                self.chunks.abandon(i);
                let _ = self.uffd.wake(dst, inst_len);
                Err(self.chunk_error(i, 0, false, "the region is shutting down".into()))
            }
            Err(Fail::Install(e)) => {
                self.chunks.abandon(i);
                let _ = self.uffd.wake(dst, inst_len);
                let err =
                    self.chunk_error(i, 1, false, format!("installing the chunk failed: {e}"));
                tracing::error!(chunk = i, error = %e, "memsync-region: install failed");
                self.errors.lock().push(err.clone());
                Err(err)
            }
            Err(Fail::Store(e, attempts)) if src == Source::Background => {
                // The fault path retries with its own deadline.
                self.chunks.abandon(i);
                let _ = self.uffd.wake(dst, inst_len);
                let err = self.chunk_error(i, attempts, false, e.chain());
                tracing::warn!(chunk = i, error = %err, "memsync-region: background pull gave up on a chunk");
                self.errors.lock().push(err.clone());
                Err(err)
            }
            Err(Fail::Store(e, attempts)) => {
                let how = self.make_sigbus(w, off, dst, inst_len);
                let err = self.chunk_error(i, attempts, how.is_some(), e.chain());
                self.errors.lock().push(err.clone());
                if let Some(how) = how {
                    inc(&self.stats.chunks_poisoned);
                    self.chunks.poison(i);
                    tracing::error!(chunk = i, error = %err, how, "memsync-region: store failed until the deadline; chunk poisoned");
                } else {
                    self.chunks.abandon(i);
                    tracing::error!(chunk = i, error = %err, "memsync-region: store failed until the deadline, and the chunk could not be made to raise SIGBUS: the next access retries the store");
                }
                // Waiters fault again and get SIGBUS (or, unpoisoned, a new fetch).
                let _ = self.uffd.wake(dst, inst_len);
                Err(err)
            }
        }
    }

    fn chunk_error(&self, i: usize, attempts: u32, poisoned: bool, message: String) -> ChunkError {
        let (off, data_len, _) = self.geo.chunk(i);
        ChunkError {
            chunk: i,
            offset: off as u64,
            len: data_len as u64,
            attempts,
            poisoned,
            message,
            at: SystemTime::now(),
        }
    }

    /// Makes the missing pages of the chunk at region offset `off` (`len`
    /// bytes at `dst`) raise `SIGBUS` for good, without waking its waiters:
    /// with `UFFDIO_POISON` where the kernel has it, otherwise (or when it
    /// fails) by mapping the [`SigbusFile`] over the whole chunk. Returns how,
    /// or `None` if neither worked (the pages are still missing).
    fn make_sigbus(
        &self,
        w: &mut Worker,
        off: usize,
        dst: usize,
        len: usize,
    ) -> Option<&'static str> {
        if self.cfg.use_poison {
            match self.poison(w, dst, len) {
                Ok(()) => return Some("UFFDIO_POISON"),
                Err(e) => {
                    tracing::warn!(error = %e, "memsync-region: UFFDIO_POISON failed; mapping a SIGBUS file over the chunk instead");
                }
            }
        }
        // No UFFD_FEATURE_EVENT_UNMAP is enabled, so this does not wait for
        // a handler to read an unmap event (it may be the only handler).
        match self.map.map_sigbus(off, len, &self.sigbus) {
            Ok(()) => {
                // As the rest of the region: not inherited by fork().
                let _ = self.map.advise(off, len, Advice::DontFork);
                Some("SIGBUS mapping")
            }
            Err(e) => {
                tracing::error!(error = %e, "memsync-region: mapping a SIGBUS file over a failed chunk failed");
                None
            }
        }
    }

    /// `UFFDIO_POISON` on the missing pages of `dst..dst + len` (present
    /// ones are skipped), without waking.
    fn poison(&self, w: &mut Worker, dst: usize, len: usize) -> io::Result<()> {
        let page = self.geo.page_size();
        let mut pos = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pos < len {
            match self.uffd.poison(dst + pos, len - pos, true)? {
                Install::Done(_) => pos = len,
                Install::Exists => pos += page,
                Install::Again { done } => {
                    pos += done;
                    if Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "UFFDIO_POISON kept returning EAGAIN",
                        ));
                    }
                    // A pending event (e.g. a MADV_DONTNEED) holds it up.
                    self.drain_events(w);
                }
            }
        }
        Ok(())
    }

    /// Reads store bytes `off..off + data_len` into the worker's staging
    /// buffer with retries and backoff until the deadline, and zeroes the
    /// tail up to `inst_len`.
    fn read_chunk(
        &self,
        w: &mut Worker,
        off: usize,
        data_len: usize,
        inst_len: usize,
    ) -> Result<(), Fail> {
        let start = Instant::now();
        let deadline = start + self.cfg.fetch_deadline;
        let mut backoff = self.cfg.retry_backoff.max(Duration::from_micros(100));
        let mut attempts = 0u32;
        let Worker {
            staging, exec, cur, ..
        } = w;
        let cur = *cur;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let buf = &mut staging.as_mut_slice()[cur..cur + data_len];
            let mut stop_rx = self.stop_tx.subscribe();
            let t = Instant::now();
            let res = exec.block_on(async {
                tokio::select! {
                    biased;
                    _ = stop_rx.wait_for(|s| *s) => None,
                    r = tokio::time::timeout(remaining, self.store.read(off as u64, buf)) => Some(match r {
                        Ok(r) => r,
                        Err(_) => Err(StoreError::Timeout {
                            op: "read",
                            after_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
                        }),
                    }),
                }
            });
            match res {
                None => return Err(Fail::Stopped),
                Some(Ok(())) => {
                    self.stats.fetch_latency.record(t.elapsed());
                    break;
                }
                Some(Err(e)) => {
                    inc(&self.stats.store_errors);
                    let e = e.context(format!("reading chunk at {off}+{data_len} from the store"));
                    tracing::debug!(attempt = attempts, error = %e.chain(), "memsync-region: store read failed");
                    if Instant::now() + backoff >= deadline {
                        return Err(Fail::Store(e, attempts));
                    }
                    let stopped = exec.block_on(async {
                        tokio::select! {
                            biased;
                            _ = stop_rx.wait_for(|s| *s) => true,
                            () = tokio::time::sleep(backoff) => false,
                        }
                    });
                    if stopped {
                        return Err(Fail::Stopped);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if inst_len > data_len {
            staging.as_mut_slice()[cur + data_len..cur + inst_len].fill(0);
        }
        Ok(())
    }

    fn install_zero(&self, w: &mut Worker, off: usize, dst: usize, len: usize) -> Result<(), Fail> {
        if self.cfg.memfd {
            // shmem has no zero page: write zeros into the page cache.
            w.staging.as_mut_slice()[w.cur..w.cur + len].fill(0);
            return self
                .install(w, off, dst, len, How::Continue)
                .map_err(Fail::Install);
        }
        if self.cfg.hugetlb {
            // hugetlb has no UFFDIO_ZEROPAGE: copy zeros.
            w.staging.as_mut_slice()[w.cur..w.cur + len].fill(0);
            return self
                .install(w, off, dst, len, How::Copy)
                .map_err(Fail::Install);
        }
        self.install(w, off, dst, len, How::Zero)
            .map_err(Fail::Install)
    }

    /// Installs `len` bytes at `dst` (region offset `off`) from the staging
    /// buffer without waking the waiters (the caller wakes the range). Pages
    /// that already exist are skipped; `EAGAIN` drains events and retries
    /// the rest.
    fn install(
        &self,
        w: &mut Worker,
        off: usize,
        dst: usize,
        len: usize,
        how: How,
    ) -> io::Result<()> {
        let r = self.install_from_staging(w, off, dst, len, how);
        if how == How::Move {
            // Moved pages leave their staging range empty (whether all,
            // some or none moved): fill the next range next time.
            w.cur += w.chunk;
            if w.cur + w.chunk > w.staging.len() {
                self.stage.recycle(w, &self.stats);
            }
        }
        r
    }

    fn install_from_staging(
        &self,
        w: &mut Worker,
        off: usize,
        dst: usize,
        len: usize,
        mut how: How,
    ) -> io::Result<()> {
        if how == How::Continue {
            let file = self
                .memfd
                .as_ref()
                .ok_or_else(|| io::Error::other("no memfd"))?;
            file.write_all_at(&w.staging.as_slice()[w.cur..w.cur + len], off as u64)?;
        }
        let page = self.geo.page_size();
        let mut pos = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        let cur = w.cur;
        while pos < len {
            let (d, n) = (dst + pos, len - pos);
            let r = match how {
                How::Move => w
                    .staging
                    .move_to(&self.uffd, d, cur + pos, n, MoveMode::DONTWAKE),
                How::Copy => w
                    .staging
                    .copy_to(&self.uffd, d, cur + pos, n, CopyMode::DONTWAKE),
                How::Zero => self.uffd.zeropage(d, n, true),
                How::Continue => self.uffd.continue_range(d, n, ContinueMode::DONTWAKE),
            };
            match r {
                Ok(Install::Done(_)) => {
                    pos = len;
                    match how {
                        How::Move => inc(&self.stats.installs_move),
                        How::Copy => inc(&self.stats.installs_copy),
                        How::Continue => inc(&self.stats.installs_continue),
                        How::Zero => {}
                    }
                }
                Ok(Install::Exists) => {
                    pos += page;
                }
                Ok(Install::Again { done }) => {
                    pos += done;
                    inc(&self.stats.install_retries);
                    if Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "install kept returning EAGAIN",
                        ));
                    }
                    self.drain_events(w);
                }
                // MOVE refuses pages shared since a fork (EBUSY), holes
                // (ENOENT) and unsuitable ranges: copy instead. Pages moved
                // before the error exist now and are skipped by the copy.
                Err(e) if how == How::Move => {
                    if matches!(
                        errno(&e),
                        libc_errno::EINVAL | libc_errno::ENOTTY | libc_errno::EOPNOTSUPP
                    ) {
                        tracing::warn!(error = %e, "memsync-region: UFFDIO_MOVE unusable, falling back to UFFDIO_COPY");
                        self.use_move.store(false, Ordering::Relaxed);
                    }
                    how = How::Copy;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads pending events without blocking: non-fault events are applied
    /// at once (that is what `EAGAIN` waits for), faults are put aside.
    fn drain_events(&self, w: &mut Worker) {
        let n = self.uffd.read_events(&mut w.drained).unwrap_or(0);
        if n == 0 {
            std::thread::yield_now();
            return;
        }
        let now = Instant::now();
        for k in 0..n {
            match w.drained[k].event() {
                Event::PageFault { addr, flags, .. } => w.deferred.push((addr, flags, now)),
                ev => self.on_event(w, ev, now),
            }
        }
    }

    fn on_event(&self, w: &mut Worker, ev: Event, t0: Instant) {
        match ev {
            Event::PageFault { addr, flags, .. } => self.on_fault(w, addr, flags, t0),
            Event::Remove { start, end } => {
                inc(&self.stats.removes);
                // Anonymous memory: the pages are gone, refetch on the next
                // touch. memfd: MADV_DONTNEED keeps the page cache (the next
                // touch is a MINOR fault); MADV_REMOVE punches a hole, which
                // the next touch repairs (MISSING fault on a present chunk).
                if !self.cfg.memfd
                    && let Some(r) = self.chunk_span(start, end)
                {
                    for i in r {
                        self.chunks.invalidate(i);
                    }
                }
            }
            _ => {}
        }
    }

    fn chunk_span(&self, start: usize, end: usize) -> Option<std::ops::Range<usize>> {
        let base = self.base();
        let (s, e) = (start.max(base), end.min(base + self.map.len()));
        (s < e).then(|| self.geo.chunks_in(s - base, e - s))
    }

    fn on_fault(&self, w: &mut Worker, addr: usize, flags: PageFaultFlags, t0: Instant) {
        inc(&self.stats.faults);
        let page = self.geo.page_size();
        let addr = addr & !(page - 1);
        if !self.map.contains(addr) {
            return;
        }
        let i = self.geo.chunk_of(addr - self.base());
        self.last_fault.store(i, Ordering::Relaxed);
        match self.chunks.try_claim(i) {
            Ok(()) => {
                self.urgent.fetch_add(1, Ordering::AcqRel);
                let _ = self.fetch(w, i, Source::Fault);
                self.urgent.fetch_sub(1, Ordering::AcqRel);
                self.stats.fault_latency.record(t0.elapsed());
            }
            // The fetcher's install wakes this fault.
            Err(ChunkState::Fetching) => inc(&self.stats.faults_waited),
            Err(ChunkState::Present) => {
                inc(&self.stats.faults_spurious);
                if !self.cfg.memfd {
                    let _ = self.uffd.wake(addr, page);
                } else if flags.contains(PageFaultFlags::MINOR) {
                    // Data is in the page cache (e.g. after MADV_DONTNEED):
                    // map the chunk again.
                    let (off, _, inst) = self.geo.chunk(i);
                    let dst = self.base() + off;
                    let mut pos = 0;
                    while pos < inst {
                        match self
                            .uffd
                            .continue_range(dst + pos, inst - pos, ContinueMode::empty())
                        {
                            Ok(Install::Done(_)) => pos = inst,
                            Ok(Install::Exists) => pos += page,
                            Ok(Install::Again { done }) => {
                                pos += done;
                                self.drain_events(w);
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = self.uffd.wake(dst, inst);
                } else if self.chunks.try_reclaim(i).is_ok() {
                    // A hole was punched into a present chunk (MADV_REMOVE):
                    // refill the missing pages only.
                    self.urgent.fetch_add(1, Ordering::AcqRel);
                    let _ = self.fetch(w, i, Source::Repair);
                    self.urgent.fetch_sub(1, Ordering::AcqRel);
                } else {
                    let _ = self.uffd.wake(addr, page);
                }
            }
            Err(ChunkState::Poisoned) => {
                // Its pages were dropped since they were poisoned
                // (MADV_DONTNEED removes poison markers), or the fault is
                // older than the poisoning: poison what is missing again.
                let (off, _, inst) = self.geo.chunk(i);
                if self.make_sigbus(w, off, self.base() + off, inst).is_none() {
                    self.chunks.unpoison(i);
                }
                let _ = self.uffd.wake(self.base() + off, inst);
            }
            Err(ChunkState::Absent) => {
                let _ = self.uffd.wake(addr, page);
            }
        }
    }

    /// Serves the faults this worker read while draining events (an install
    /// that met `EAGAIN` reads every pending event): nobody else will.
    fn serve_deferred(&self, w: &mut Worker) {
        while let Some((addr, flags, t0)) = w.deferred.pop() {
            self.on_fault(w, addr, flags, t0);
        }
    }

    fn handler_main(&self, mut w: Worker, spin: bool, primary: bool) {
        match self.cfg.standby_after {
            Some(after) if !primary => self.standby_main(w, after),
            _ => self.serve(&mut w, spin, primary, &|| true, Duration::from_millis(200)),
        }
    }

    /// Nanoseconds since the region was created, never 0.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) | 1
    }

    /// The primary handler starts serving events.
    fn mark_busy(&self) {
        let now = self.now_ns();
        self.busy_since.store(now, Ordering::Release);
        let prev = self.last_busy.swap(now, Ordering::AcqRel);
        if self.cfg.standby_after.is_some() && now.saturating_sub(prev) > STANDBY_IDLE_NS {
            // First fault after a quiet spell: wake the standby handlers
            // from their long sleep (they nap briefly while faults come).
            let _g = self.standby_lock.lock();
            self.standby_cv.notify_all();
        }
    }

    /// Reads and serves userfaultfd events until `go()` is false when there
    /// is nothing to do, or the region stops. The primary handler records
    /// when it is busy, for the standby handlers.
    fn serve(
        &self,
        w: &mut Worker,
        spin: bool,
        primary: bool,
        go: &dyn Fn() -> bool,
        poll_timeout: Duration,
    ) {
        let mut last = Instant::now();
        loop {
            if self.stopping() {
                return;
            }
            if !w.deferred.is_empty() {
                if primary {
                    self.mark_busy();
                }
                self.serve_deferred(w);
            }
            // One message at a time: a fault read here is served before the
            // next read, so faults read together would wait behind a slow
            // store read while another handler could serve them. The price,
            // measured with 4 threads faulting random 4 KiB chunks from
            // memory at once on 2 vCPUs: ~15% (~1.3 µs a fault) against
            // reading up to 16 messages.
            let n = match self.uffd.read_events(&mut w.msg) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "memsync-region: reading userfaultfd events failed");
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            if n > 0 {
                if primary {
                    self.mark_busy();
                }
                let ev = w.msg[0].event();
                self.on_event(w, ev, Instant::now());
                last = Instant::now();
                continue;
            }
            if primary {
                self.busy_since.store(0, Ordering::Release);
            }
            if !go() {
                return;
            }
            if spin && last.elapsed() < self.cfg.spin {
                std::hint::spin_loop();
                continue;
            }
            let _ = poll_readable(
                &[self.uffd.as_fd(), self.wake_rx.as_fd()],
                Some(poll_timeout),
            );
            last = Instant::now();
        }
    }

    /// A standby handler: does not poll the userfaultfd (so a fault wakes
    /// only the primary handler, the one the scheduler tends to run on the
    /// faulting thread's CPU) until the primary has been busy with one
    /// batch of events for `after` (e.g. a stalled store read); then it
    /// serves events beside it until the primary is free again.
    fn standby_main(&self, mut w: Worker, after: Duration) {
        let after_ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        // Naps wake the other CPU: keep them rare (a takeover comes within
        // `after` + one nap; measured, 0.5 ms naps raised the random 4 KiB
        // fault p99 from ~18 to ~40 µs).
        let nap = (after * 4).max(Duration::from_millis(2));
        loop {
            if self.stopping() {
                return;
            }
            let b = self.busy_since.load(Ordering::Acquire);
            let now = self.now_ns();
            if b != 0 && now.saturating_sub(b) >= after_ns {
                inc(&self.stats.standby_takeovers);
                let go = || self.busy_since.load(Ordering::Acquire) != 0;
                self.serve(&mut w, false, false, &go, Duration::from_millis(1));
                continue;
            }
            if now.saturating_sub(self.last_busy.load(Ordering::Acquire)) < STANDBY_IDLE_NS {
                std::thread::sleep(nap);
            } else {
                let mut g = self.standby_lock.lock();
                // Checked under the lock: `mark_busy` notifies under it.
                if self
                    .now_ns()
                    .saturating_sub(self.last_busy.load(Ordering::Acquire))
                    >= STANDBY_IDLE_NS
                    && !self.stopping()
                {
                    self.standby_cv.wait_for(&mut g, Duration::from_millis(100));
                }
            }
        }
    }

    /// Allocates the pages of used staging buffers ahead of time.
    fn stager_main(&self) {
        loop {
            let mut buf = {
                let mut empty = self.stage.empty.lock();
                loop {
                    if self.stopping() {
                        return;
                    }
                    if let Some(b) = empty.pop() {
                        break b;
                    }
                    self.stage
                        .cv
                        .wait_for(&mut empty, Duration::from_millis(100));
                }
            };
            if let Err(e) = buf.populate() {
                // Only an optimisation: the pages are allocated on use then.
                tracing::debug!(error = %e, "memsync-region: populating a staging buffer failed");
            }
            self.stage.ready.lock().push(buf);
        }
    }

    fn puller_main(&self, shared: &Mutex<PullShared>, mut w: Worker) {
        let n = self.chunks.len();
        // Chunks just past the last fault that are pulled without yielding
        // to faults being served: 8 MiB, at least 2 chunks.
        let readahead = ((8 << 20) / self.geo.chunk_size()).max(2);
        loop {
            let seen_gen = {
                let mut st = self.pull.lock();
                loop {
                    if self.stopping() {
                        return;
                    }
                    if st.running && !st.done {
                        break;
                    }
                    self.pull_cv.wait_for(&mut st, Duration::from_millis(100));
                }
                st.generation
            };
            let lf = self.last_fault.load(Ordering::Relaxed);
            let next = {
                let mut sh = shared.lock();
                let sh = &mut *sh;
                if sh.seen_gen != seen_gen {
                    sh.seen_gen = seen_gen;
                    sh.skip.clear();
                    sh.skip.resize(n, false);
                }
                let view = PullView {
                    chunks: &self.chunks,
                    skip: &sh.skip,
                    last_fault: (lf != NO_FAULT).then_some(lf),
                };
                match sh.prio.next_chunk(&view) {
                    Some(i) if view.wanted(i) => {
                        sh.bogus = 0;
                        Some(i)
                    }
                    Some(_) => {
                        sh.bogus += 1;
                        if sh.bogus > 64 {
                            sh.bogus = 0;
                            view.next_wanted_from(0)
                        } else {
                            continue;
                        }
                    }
                    None => None,
                }
            };
            // Faults first: while one is being served, stay out of the way
            // (sleeping, so the CPU is free for the fault and the staging
            // helper), unless this chunk lies just ahead of the last fault:
            // then it is read-ahead for the faulting thread, and fetching it
            // now, beside the fault, is what keeps a sequential reader from
            // faulting at all.
            if let Some(i) = next
                && !(lf != NO_FAULT && i > lf && i - lf <= readahead)
            {
                let until = Instant::now() + Duration::from_millis(5);
                while self.urgent.load(Ordering::Acquire) > 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            match next {
                Some(i) => {
                    // Another puller may have taken it meanwhile: then this
                    // one just asks for the next.
                    if self.chunks.try_claim(i).is_ok() {
                        let failed = self.fetch(&mut w, i, Source::Background).is_err();
                        self.serve_deferred(&mut w);
                        if failed {
                            let mut sh = shared.lock();
                            if sh.seen_gen == seen_gen {
                                sh.skip[i] = true;
                            }
                        }
                    }
                }
                None => {
                    if self.chunks.any_fetching() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let mut st = self.pull.lock();
                    if st.generation == seen_gen {
                        st.done = true;
                        self.pull_cv.notify_all();
                    }
                }
            }
        }
    }
}

/// What the puller threads share: the pull order and the chunks given up
/// in this pull generation.
struct PullShared {
    prio: Box<dyn PullPriority>,
    skip: Vec<bool>,
    seen_gen: u64,
    bogus: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Move,
    Copy,
    Zero,
    Continue,
}

/// The errno values this module matches on (the workspace has no libc
/// dependency outside memsync-sys).
mod libc_errno {
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
    pub const EOPNOTSUPP: i32 = 95;
}

/// A memory region of a store's size that fills itself from the store the
/// first time each chunk is touched (userfaultfd post-copy).
///
/// # Memory and lifetime rules
///
/// * The region's memory is `as_ptr()..as_ptr() + len()` (the mapping is
///   rounded up to whole pages; the bytes past `len()` read as zeros). It
///   starts 2 MiB aligned.
/// * Safe access goes through [`read_at`](Self::read_at) and
///   [`write_at`](Self::write_at), which fetch missing chunks on the
///   calling thread (no fault) and report a chunk the store could not
///   deliver as an error instead of a `SIGBUS`.
/// * Raw-pointer access ([`as_ptr`](Self::as_ptr)) is `unsafe` for the
///   caller: a missing page blocks the accessing thread until a handler
///   thread installs its chunk; a chunk the store failed to deliver before
///   [`RegionConfig::fetch_deadline`] is poisoned and the access raises
///   `SIGBUS` (see the crate docs, "Failed chunks"). The memory must not be
///   accessed through a raw pointer after the region is dropped.
/// * The region is not inherited by `fork()` (`MADV_DONTFORK`): in a child
///   nothing is mapped there, and an access raises `SIGSEGV`. (Inherited,
///   the chunks not fetched yet would read as zeros in the child.)
/// * Dropping the region stops the handler and puller threads (cancelling
///   store reads in progress), unregisters the range, closes the
///   userfaultfd and unmaps the memory. A thread still blocked on a fault
///   at that moment is woken and sees a zero page, then the memory is
///   unmapped under it (`SIGSEGV` on its next access): finish every raw
///   access before dropping.
/// * Local writes stay in local memory (nothing is written back to the
///   store). `MADV_DONTNEED` on anonymous backing drops pages: their chunks
///   are fetched again from the store on the next touch, so local writes
///   to the dropped pages are lost (other pages of such a chunk keep
///   theirs). On memfd backing `MADV_DONTNEED` keeps the data (it stays in
///   the memfd), and pages removed with `MADV_REMOVE` are refetched.
/// * The store must not change while the region lives (a chunk is fetched
///   at most once, at an unspecified time).
/// * The mapping belongs to the region: do not `mremap`, `munmap` or
///   `mprotect` it, nor undo its `MADV_DONTFORK`. (Moving it with `mremap`
///   would leave the region serving the old addresses; the kernel would
///   drop the userfaultfd registration of the moved range, so its missing
///   pages would read as zeros instead of the store's data.)
#[derive(Debug)]
pub struct LazyRegion {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    wake_tx: UnixStream,
}

impl LazyRegion {
    /// Creates a region of `store.size()` bytes backed by `store`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid chunk size or a kernel without the
    /// needed userfaultfd features; [`Error::Sys`] if mapping or the
    /// userfaultfd fails; [`Error::Store`] if the extents query fails.
    pub fn new(store: DynStore, cfg: RegionConfig) -> Result<Self, Error> {
        let page = page_size();
        if !cfg.chunk_size.is_power_of_two() || cfg.chunk_size < page || cfg.chunk_size > 1 << 30 {
            return Err(Error::Config(format!(
                "chunk size {} must be a power of two from {page} bytes to 1 GiB",
                cfg.chunk_size
            )));
        }
        let bs = store.caps().block_size.max(1);
        if !(cfg.chunk_size as u64).is_multiple_of(bs) && bs > 1 {
            return Err(Error::Config(format!(
                "chunk size {} is not a multiple of the store's block size {bs} (wrap it in Chunked)",
                cfg.chunk_size
            )));
        }
        let hugetlb = cfg.backing == Backing::Hugetlb;
        // hugetlb memory is installed in whole huge pages: make them the
        // geometry's pages.
        let page = if hugetlb {
            memsync_sys::pmd_size()
        } else {
            page
        };
        if hugetlb && cfg.chunk_size < page {
            return Err(Error::Config(format!(
                "hugetlb regions need chunks of at least one huge page ({page} bytes), not {}",
                cfg.chunk_size
            )));
        }
        let geo = Geometry::new(store.size(), cfg.chunk_size, page).ok_or_else(|| {
            Error::Config(format!("cannot map a store of {} bytes", store.size()))
        })?;
        let memfd_mode = cfg.backing == Backing::Memfd;
        let (uffd, user_mode_only) = open_uffd(memfd_mode, hugetlb, cfg.user_mode_only)?;
        let align = memsync_sys::pmd_size().max(page);
        let (map, memfd) = if memfd_mode {
            let fd = memfd_create("memsync-region", MemfdFlags::default())
                .map_err(sys("memfd_create"))?;
            ftruncate(fd.as_fd(), geo.map_len() as u64).map_err(sys("sizing the memfd"))?;
            let map = Mapping::shared_fd(fd.as_fd(), geo.map_len(), 0)
                .map_err(sys("mapping the memfd"))?;
            (map, Some(File::from(fd)))
        } else if hugetlb {
            let map = Mapping::anonymous_with(
                geo.map_len(),
                MapOptions {
                    align,
                    hugetlb: true,
                    ..MapOptions::default()
                },
            )
            .map_err(sys(
                "mapping the region with huge pages (are enough reserved in vm.nr_hugepages?)",
            ))?;
            (map, None)
        } else {
            let map = Mapping::anonymous_with(
                geo.map_len(),
                MapOptions {
                    align,
                    ..MapOptions::default()
                },
            )
            .map_err(sys("mapping the region"))?;
            if cfg.huge_pages {
                let _ = map.advise(0, map.len(), Advice::HugePage);
            }
            (map, None)
        };
        let mode = if memfd_mode {
            RegisterMode::MISSING | RegisterMode::MINOR
        } else {
            RegisterMode::MISSING
        };
        let ioctls = uffd
            .register(&map, mode)
            .map_err(sys("registering the region with the userfaultfd"))?;
        let use_poison = cfg.use_poison
            && uffd.features().contains(Features::POISON)
            && ioctls.contains(memsync_sys::Ioctls::POISON);
        if cfg.use_poison && !use_poison {
            tracing::info!(
                "memsync-region: no UFFDIO_POISON on this kernel: a failed chunk is replaced by a SIGBUS mapping"
            );
        }
        // A forked child would see the chunks never fetched as zeros (the
        // userfaultfd registration is not inherited): it gets nothing here.
        map.advise(0, map.len(), Advice::DontFork)
            .map_err(sys("MADV_DONTFORK on the region"))?;
        let sigbus = SigbusFile::new().map_err(sys("creating the SIGBUS file"))?;
        let use_move = cfg.use_move
            && !memfd_mode
            && !hugetlb
            && uffd.features().contains(Features::MOVE)
            && ioctls.contains(memsync_sys::Ioctls::MOVE);

        let zero = if cfg.zero_detect && store.caps().extents {
            zero_map(&store, &geo, cfg.runtime.as_ref())?
        } else {
            Vec::new()
        };

        let (wake_tx, wake_rx) = UnixStream::pair().map_err(sys("creating the wake-up socket"))?;
        let (stop_tx, _) = watch::channel(false);
        let threads_n = cfg.handler_threads.max(1);
        let inner = Arc::new(Inner {
            uffd,
            map,
            memfd,
            sigbus,
            geo,
            chunks: ChunkMap::new(geo.chunks()),
            store,
            zero,
            cfg: Settings {
                spin: cfg.spin,
                spin_threads: cfg.spin_threads,
                // Pinned handlers each serve their own CPU: all of them poll.
                standby_after: if cfg.pin_handlers {
                    None
                } else {
                    cfg.standby_after
                },
                memfd: memfd_mode,
                hugetlb,
                fetch_deadline: cfg.fetch_deadline,
                use_poison,
                retry_backoff: cfg.retry_backoff,
                inline_resolve: cfg.inline_resolve,
                store_spin: cfg.store_spin,
                runtime: cfg.runtime.clone(),
            },
            stats: RegionStats::default(),
            errors: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            stop_tx,
            wake_rx,
            last_fault: AtomicUsize::new(NO_FAULT),
            urgent: AtomicUsize::new(0),
            use_move: AtomicBool::new(use_move),
            pull: Mutex::new(PullState {
                running: cfg.prefetch,
                ..PullState::default()
            }),
            pull_cv: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            stage: StagePool::default(),
            epoch: Instant::now(),
            busy_since: AtomicU64::new(0),
            last_busy: AtomicU64::new(0),
            standby_lock: Mutex::new(()),
            standby_cv: Condvar::new(),
            user_mode_only,
        });
        let mut region = Self {
            inner,
            threads: Vec::new(),
            wake_tx,
        };
        // Pin to the CPUs this thread may use (under a cpuset they are not
        // `0..n`); if they cannot be read, do not pin.
        let cpus = if cfg.pin_handlers {
            memsync_sys::allowed_cpus().unwrap_or_default()
        } else {
            Vec::new()
        };
        for t in 0..threads_n {
            let w = Worker::new(geo.chunk_size(), cfg.runtime.as_ref(), cfg.store_spin)
                .map_err(sys("creating a handler"))?;
            let inner = Arc::clone(&region.inner);
            let spin = t < inner.cfg.spin_threads && !inner.cfg.spin.is_zero();
            let pin = cfg
                .pin_handlers
                .then(|| cpus.get(t % cpus.len().max(1)).copied())
                .flatten();
            let h = std::thread::Builder::new()
                .name(format!("memsync-fault-{t}"))
                .spawn(move || {
                    if let Some(cpu) = pin
                        && let Err(e) = memsync_sys::set_thread_affinity(&[cpu])
                    {
                        tracing::debug!(cpu, error = %e, "memsync-region: pinning a fault handler failed");
                    }
                    inner.handler_main(w, spin, t == 0);
                })
                .map_err(sys("spawning a fault-handler thread"))?;
            region.threads.push(h);
        }
        if use_move {
            // Spare staging buffers, populated ahead by a helper thread:
            // up to 16 MiB, at most 4 buffers.
            let (blen, _) = staging_layout(geo.chunk_size());
            let spares = if blen <= 8 << 20 {
                ((16 << 20) / blen).clamp(1, 4)
            } else {
                0
            };
            if spares > 0 {
                let mut empty = region.inner.stage.empty.lock();
                for _ in 0..spares {
                    empty.push(
                        new_staging(geo.chunk_size()).map_err(sys("mapping a staging buffer"))?,
                    );
                }
                drop(empty);
                let inner = Arc::clone(&region.inner);
                let h = std::thread::Builder::new()
                    .name("memsync-stage".into())
                    .spawn(move || inner.stager_main())
                    .map_err(sys("spawning the staging thread"))?;
                region.threads.push(h);
            }
        }
        let shared = Arc::new(Mutex::new(PullShared {
            prio: cfg.priority,
            skip: Vec::new(),
            seen_gen: u64::MAX,
            bogus: 0,
        }));
        for _ in 0..cfg.pull_threads.max(1) {
            // Background work does not spin: nobody waits for it.
            let w = Worker::new(geo.chunk_size(), cfg.runtime.as_ref(), Duration::ZERO)
                .map_err(sys("creating the puller"))?;
            let inner = Arc::clone(&region.inner);
            let shared = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name("memsync-pull".into())
                .spawn(move || inner.puller_main(&shared, w))
                .map_err(sys("spawning the puller thread"))?;
            region.threads.push(h);
        }
        Ok(region)
    }

    /// Start of the region's memory (2 MiB aligned). See the type's
    /// lifetime rules before dereferencing it.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.map.as_ptr()
    }

    /// Start address of the region.
    #[must_use]
    pub fn addr(&self) -> usize {
        self.inner.map.addr()
    }

    /// Length in bytes (the store's size).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.geo.size() as usize
    }

    /// Always `false` (stores are never empty).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The chunk layout.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// Whether the userfaultfd was opened with `UFFD_USER_MODE_ONLY`.
    #[must_use]
    pub fn user_mode_only(&self) -> bool {
        self.inner.user_mode_only
    }

    /// Whether a chunk the store fails to deliver is poisoned with
    /// `UFFDIO_POISON` (`false`: its range is replaced by a mapping that
    /// raises `SIGBUS`; see [`RegionConfig::use_poison`]).
    #[must_use]
    pub fn uses_poison(&self) -> bool {
        self.inner.cfg.use_poison
    }

    /// The memfd behind a [`Backing::Memfd`] region (map it with
    /// `MAP_SHARED` in another process to see the filled chunks), `None`
    /// for anonymous memory.
    #[must_use]
    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.memfd.as_ref().map(AsFd::as_fd)
    }

    #[track_caller]
    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len()),
            "range {off}+{len} out of bounds of a region of {} bytes",
            self.len()
        );
    }

    /// Makes sure the chunks overlapping `off..off + len` are present,
    /// fetching absent ones on this thread (if [`RegionConfig::inline_resolve`]
    /// and not inside an async runtime) and waiting for ones being fetched.
    ///
    /// # Errors
    ///
    /// The [`ChunkError`] of a chunk that could not be fetched.
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn prefetch(&self, off: usize, len: usize) -> Result<(), ChunkError> {
        self.check(off, len);
        let inner = &*self.inner;
        let inline = inner.cfg.inline_resolve && tokio::runtime::Handle::try_current().is_err();
        for i in inner.geo.chunks_in(off, len) {
            let wait_until = Instant::now() + inner.cfg.fetch_deadline + Duration::from_secs(1);
            let mut sleep = Duration::from_micros(1);
            loop {
                match inner.chunks.get(i) {
                    ChunkState::Present => break,
                    ChunkState::Absent if inline => {
                        if inner.chunks.try_claim(i).is_ok() {
                            let mut w = match inner.pool.lock().pop() {
                                Some(w) => w,
                                None => Worker::new(
                                    inner.geo.chunk_size(),
                                    inner.cfg.runtime.as_ref(),
                                    inner.cfg.store_spin,
                                )
                                .map_err(|e| {
                                    inner.chunk_error(
                                        i,
                                        0,
                                        false,
                                        format!("creating a worker: {e}"),
                                    )
                                })
                                .inspect_err(|_| inner.chunks.abandon(i))?,
                            };
                            let r = inner.fetch(&mut w, i, Source::Inline);
                            inner.serve_deferred(&mut w);
                            inner.pool.lock().push(w);
                            r?;
                        }
                    }
                    // Let the access fault; a handler fetches it.
                    ChunkState::Absent => break,
                    ChunkState::Fetching => {
                        if Instant::now() > wait_until {
                            break;
                        }
                        if sleep < Duration::from_micros(50) {
                            std::thread::yield_now();
                        } else {
                            std::thread::sleep(sleep);
                        }
                        sleep = (sleep * 2).min(Duration::from_millis(1));
                    }
                    ChunkState::Poisoned => {
                        return Err(self.error_of(i));
                    }
                }
            }
        }
        Ok(())
    }

    fn error_of(&self, i: usize) -> ChunkError {
        let errors = self.inner.errors.lock();
        errors
            .iter()
            .rev()
            .find(|e| e.chunk == i)
            .cloned()
            .unwrap_or_else(|| {
                self.inner
                    .chunk_error(i, 0, true, "the chunk is poisoned".into())
            })
    }

    /// Copies `buf.len()` bytes at offset `off` into `buf`, fetching missing
    /// chunks first (see [`prefetch`](Self::prefetch)).
    ///
    /// # Errors
    ///
    /// The [`ChunkError`] of a chunk the store could not deliver; `buf` is
    /// left unspecified then.
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn read_at(&self, off: usize, buf: &mut [u8]) -> Result<(), ChunkError> {
        self.prefetch(off, buf.len())?;
        self.inner.map.read_at(off, buf);
        Ok(())
    }

    /// Copies `data` into the region at offset `off`, fetching missing
    /// chunks first: the rest of each chunk keeps the store's data. Written
    /// bytes stay local.
    ///
    /// # Errors
    ///
    /// The [`ChunkError`] of a chunk the store could not deliver (nothing was
    /// written to it then).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn write_at(&self, off: usize, data: &[u8]) -> Result<(), ChunkError> {
        self.prefetch(off, data.len())?;
        self.inner.map.write_at(off, data);
        Ok(())
    }

    /// Reads through the page fault path only (no inline fetch): every
    /// missing page faults and is served by a handler thread. For tests and
    /// benchmarks of the fault path; a chunk the store cannot deliver raises
    /// `SIGBUS`.
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn read_faulting(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        self.inner.map.read_at(off, buf);
    }

    /// Writes through the page fault path only; see
    /// [`read_faulting`](Self::read_faulting).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn write_faulting(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        self.inner.map.write_at(off, data);
    }

    /// `madvise(2)` on a page-aligned range of the region (e.g.
    /// [`Advice::DontNeed`] to drop pages; see the type's rules for what
    /// happens to them).
    ///
    /// # Errors
    ///
    /// The `madvise(2)` error.
    ///
    /// # Panics
    ///
    /// If the range is outside the mapping.
    pub fn advise(&self, off: usize, len: usize, advice: Advice) -> io::Result<()> {
        self.inner.map.advise(off, len, advice)
    }

    /// The state of chunk `i`.
    ///
    /// # Panics
    ///
    /// If `i` is not a chunk index.
    #[must_use]
    pub fn chunk_state(&self, i: usize) -> ChunkState {
        self.inner.chunks.get(i)
    }

    /// Which chunks are present (a snapshot).
    #[must_use]
    pub fn present_chunks(&self) -> ChunkBitmap {
        self.inner.chunks.present_bitmap()
    }

    /// Number of present chunks.
    #[must_use]
    pub fn present_count(&self) -> usize {
        self.inner.chunks.present_count()
    }

    /// Whether every chunk is present.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.present_count() == self.inner.chunks.len()
    }

    /// Live statistics.
    #[must_use]
    pub fn stats(&self) -> &RegionStats {
        &self.inner.stats
    }

    /// The most recent chunk failure.
    #[must_use]
    pub fn last_error(&self) -> Option<ChunkError> {
        self.inner.errors.lock().last().cloned()
    }

    /// Every chunk failure so far, oldest first.
    #[must_use]
    pub fn errors(&self) -> Vec<ChunkError> {
        self.inner.errors.lock().clone()
    }

    /// Starts (or restarts from scratch, retrying chunks it gave up on) the
    /// background pull.
    pub fn start_pull(&self) {
        let mut st = self.inner.pull.lock();
        st.running = true;
        st.done = false;
        st.generation += 1;
        self.inner.pull_cv.notify_all();
    }

    /// Pauses the background pull after the chunk in progress.
    pub fn pause_pull(&self) {
        self.inner.pull.lock().running = false;
    }

    /// Resumes a paused background pull where it stopped.
    pub fn resume_pull(&self) {
        let mut st = self.inner.pull.lock();
        st.running = true;
        self.inner.pull_cv.notify_all();
    }

    /// Background pull progress.
    #[must_use]
    pub fn progress(&self) -> PullProgress {
        let st = self.inner.pull.lock();
        PullProgress {
            present_chunks: self.present_count(),
            total_chunks: self.inner.chunks.len(),
            pulled_chunks: st.pulled_chunks,
            pulled_bytes: st.pulled_bytes,
            running: st.running,
            done: st.done,
        }
    }

    /// Waits until the background pull has nothing left to do (`true`), or
    /// `timeout` passes (`false`).
    pub fn wait_pull(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.pull.lock();
        while !st.done {
            if self.inner.pull_cv.wait_until(&mut st, deadline).timed_out() {
                return st.done;
            }
        }
        true
    }
}

impl Drop for LazyRegion {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.stop.store(true, Ordering::Release);
        inner.stop_tx.send_replace(true);
        {
            let _st = inner.pull.lock();
            inner.pull_cv.notify_all();
        }
        {
            let _e = inner.stage.empty.lock();
            inner.stage.cv.notify_all();
        }
        {
            let _g = inner.standby_lock.lock();
            inner.standby_cv.notify_all();
        }
        let _ = self.wake_tx.write_all(&[1]);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Waiting faults are woken and resolve as ordinary faults; then the
        // userfaultfd is closed and the memory unmapped (field order of
        // `Inner`) when the last reference goes, which is now.
        let _ = inner.uffd.unregister(inner.map.addr(), inner.map.len());
    }
}

fn open_uffd(
    memfd: bool,
    hugetlb: bool,
    force_user_mode: Option<bool>,
) -> Result<(Uffd, bool), Error> {
    let open = |user_mode_only| {
        Uffd::open(OpenFlags {
            nonblock: true,
            cloexec: true,
            user_mode_only,
        })
    };
    let (uffd, umo) = match force_user_mode {
        Some(u) => (open(u).map_err(sys("opening a userfaultfd"))?, u),
        None => match open(false) {
            Ok(u) => (u, false),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => (
                open(true).map_err(sys("opening a user-mode-only userfaultfd"))?,
                true,
            ),
            Err(e) => {
                return Err(Error::Sys {
                    context: "opening a userfaultfd",
                    source: e,
                });
            }
        },
    };
    let supported = Uffd::probe_features().map_err(sys("probing userfaultfd features"))?;
    let required = if memfd {
        Features::MISSING_SHMEM | Features::MINOR_SHMEM
    } else if hugetlb {
        Features::MISSING_HUGETLBFS
    } else {
        Features::empty()
    };
    if !supported.contains(required) {
        return Err(Error::Config(format!(
            "the kernel lacks userfaultfd features {:?}",
            required - supported
        )));
    }
    // Not EVENT_UNMAP: a failed chunk may be replaced by a SIGBUS mapping,
    // and with unmap events that mmap would wait until a handler has read
    // its event, which the handler doing it cannot.
    let optional = Features::MOVE | Features::POISON | Features::EVENT_REMOVE;
    uffd.api(required | (optional & supported))
        .map_err(sys("userfaultfd handshake"))?;
    Ok((uffd, umo))
}

/// One bit per chunk that the store reports as entirely zero or hole.
fn zero_map(
    store: &DynStore,
    geo: &Geometry,
    handle: Option<&tokio::runtime::Handle>,
) -> Result<Vec<u64>, Error> {
    const WINDOW: u64 = 1 << 30;
    let size = store.size();
    let chunk = geo.chunk_size() as u64;
    std::thread::scope(|s| {
        s.spawn(|| {
            let exec = Exec::new(handle, Duration::ZERO).map_err(sys("creating a runtime"))?;
            let mut bits = vec![0u64; geo.chunks().div_ceil(64)];
            let mut pos = 0;
            while pos < size {
                let len = WINDOW.min(size - pos);
                let extents =
                    exec.block_on(store.extents(pos, len))
                        .map_err(|source| Error::Store {
                            context: format!("querying the store's extents at {pos}+{len}"),
                            source,
                        })?;
                // Merge adjacent zero extents into runs, then mark the
                // chunks lying entirely inside a run.
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for e in extents.iter().filter(|e| e.kind.reads_zero()) {
                    match runs.last_mut() {
                        Some(r) if r.1 == e.offset => r.1 = e.end(),
                        _ => runs.push((e.offset, e.end())),
                    }
                }
                for (start, end) in runs {
                    let mut i = start.div_ceil(chunk);
                    while i * chunk < end && ((i + 1) * chunk).min(size) <= end {
                        bits[(i / 64) as usize] |= 1 << (i % 64);
                        i += 1;
                    }
                }
                pos += len;
            }
            Ok(bits)
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Config("the extents query panicked".into())))
    })
}
