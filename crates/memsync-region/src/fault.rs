//! The fault path: [`Core`] serves the engine's events, claims chunks in
//! the chunk table, fetches them from the [`ChunkSource`] with retries until
//! the deadline and installs them with the [`Installer`], or makes a chunk
//! that cannot be fetched raise `SIGBUS`.
//!
//! Dependencies run one way: this module uses the installer, the engine's
//! event pump (to drain events when an install meets `EAGAIN`) and the
//! source; none of them calls back here except through [`EventHandler`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use memsync_core::{RetryPolicy, StoreError};
use memsync_sys::{Advice, Event, PageFaultFlags, SigbusFile};
use parking_lot::Mutex;

use crate::budget::Budget;
use crate::config::{Backing, RegionConfig, WriteTracking};
use crate::dirty::DirtyTracker;
use crate::engine::{Engine, EventHandler};
use crate::error::{ChunkError, Error, sys};
use crate::installer::{How, Installer, Step};
use crate::source::{ChunkSource, FaultHooks, WpAction};
use crate::state::{ChunkMap, ChunkState, Geometry};
use crate::stats::{RegionStats, add, inc};
use crate::worker::{Events, StagePool, Worker};
use memsync_core::chunks::{AtomicChunkBitmap, PullLease, background_pull};

pub(crate) const NO_FAULT: usize = usize::MAX;

/// Who fetches a chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fetcher<'a> {
    Fault,
    /// The background pull holding this lease (which the layers below see).
    Background(&'a Arc<PullLease>),
    Inline,
    Repair,
}

enum Fail {
    Stopped,
    Store(StoreError, u32),
    Install(io::Error),
}

#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) memfd: bool,
    /// [`Backing::Shared`]: the source's pages are mapped, never written by the region.
    pub(crate) shared: bool,
    pub(crate) hugetlb: bool,
    /// [`RegionConfig::fetch_deadline`](crate::RegionConfig::fetch_deadline) and
    /// [`RegionConfig::retry_backoff`](crate::RegionConfig::retry_backoff).
    pub(crate) retry: RetryPolicy,
    /// `UFFDIO_POISON` is wanted and works on this region.
    pub(crate) use_poison: bool,
    pub(crate) inline_resolve: bool,
    pub(crate) store_spin: Duration,
    pub(crate) runtime: Option<tokio::runtime::Handle>,
}

impl Settings {
    /// The region's pages live in a page cache (memfd or shared): a MINOR fault maps them
    /// again, and dropped pages keep their data there.
    pub(crate) fn page_cache(&self) -> bool {
        self.memfd || self.shared
    }

    pub(crate) fn new(cfg: &RegionConfig, use_poison: bool) -> Self {
        Self {
            memfd: cfg.backing == Backing::Memfd,
            shared: cfg.backing == Backing::Shared,
            hugetlb: cfg.backing == Backing::Hugetlb,
            retry: cfg.retry_policy(),
            use_poison,
            inline_resolve: cfg.inline_resolve,
            store_spin: cfg.store_spin,
            runtime: cfg.runtime.clone(),
        }
    }
}

/// What a [`Core`] is made of; the rest of it starts empty.
pub(crate) struct CoreParts {
    pub(crate) engine: Engine,
    pub(crate) geo: Geometry,
    pub(crate) source: Arc<dyn ChunkSource>,
    pub(crate) hooks: Arc<dyn FaultHooks>,
    /// One bit per chunk the source reports as zero.
    pub(crate) zero: Vec<u64>,
    pub(crate) cfg: Settings,
    pub(crate) use_move: bool,
    pub(crate) tracking: WriteTracking,
    pub(crate) dirty: Option<DirtyTracker>,
    /// Chunks the budget lets be resident (`None`: no budget).
    pub(crate) budget: Option<usize>,
}

/// Shared by the region handle and its threads.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) engine: Engine,
    /// Mapped over a failed chunk when it cannot be poisoned.
    pub(crate) sigbus: SigbusFile,
    pub(crate) geo: Geometry,
    pub(crate) source: Arc<dyn ChunkSource>,
    pub(crate) hooks: Arc<dyn FaultHooks>,
    pub(crate) chunks: ChunkMap,
    pub(crate) zero: Vec<u64>,
    pub(crate) cfg: Settings,
    pub(crate) stats: RegionStats,
    pub(crate) errors: Mutex<Vec<ChunkError>>,
    pub(crate) last_fault: AtomicUsize,
    /// Faults being served (the puller stays out of their way).
    pub(crate) urgent: AtomicUsize,
    pub(crate) use_move: AtomicBool,
    /// Workers of inline fetches.
    pub(crate) pool: Mutex<Vec<Worker>>,
    pub(crate) stage: StagePool,
    pub(crate) tracking: WriteTracking,
    /// Chunks a driver write-protected ([`WriteTracking::Protect`]).
    pub(crate) protected: AtomicChunkBitmap,
    /// Striped by chunk: a handler that finds a chunk's bit clear and lifts its protection
    /// holds the chunk's stripe from the check to the end of the ioctl, and a driver's
    /// `protect` sets the bit under it, so a stale write-protect fault can never lift a
    /// protection set after its check (the driver would copy the chunk, then see writes land
    /// in it).
    pub(crate) protect_locks: Box<[Mutex<()>]>,
    /// Set by the handler that read the `REMOVE` event of a driver's drop.
    pub(crate) remove_ack: AtomicChunkBitmap,
    /// With [`WriteTracking::Dirty`].
    pub(crate) dirty: Option<DirtyTracker>,
    pub(crate) budget: Budget,
}

const PROTECT_STRIPES: usize = 64;

impl Core {
    /// The stripe of [`protect_locks`](Self::protect_locks) of chunk `i`.
    pub(crate) fn protect_lock(&self, i: usize) -> &Mutex<()> {
        &self.protect_locks[i % PROTECT_STRIPES]
    }

    pub(crate) fn new(p: CoreParts) -> Result<Self, Error> {
        let n = p.geo.chunks();
        Ok(Self {
            engine: p.engine,
            sigbus: SigbusFile::new().map_err(sys("creating the SIGBUS file"))?,
            geo: p.geo,
            source: p.source,
            hooks: p.hooks,
            chunks: ChunkMap::new(n),
            zero: p.zero,
            cfg: p.cfg,
            stats: RegionStats::default(),
            errors: Mutex::new(Vec::new()),
            last_fault: AtomicUsize::new(NO_FAULT),
            urgent: AtomicUsize::new(0),
            use_move: AtomicBool::new(p.use_move),
            pool: Mutex::new(Vec::new()),
            stage: StagePool::default(),
            tracking: p.tracking,
            protected: AtomicChunkBitmap::new(n),
            protect_locks: (0..PROTECT_STRIPES).map(|_| Mutex::new(())).collect(),
            remove_ack: AtomicChunkBitmap::new(n),
            dirty: p.dirty,
            budget: Budget::new(n, p.budget),
        })
    }

    pub(crate) fn base(&self) -> usize {
        self.engine.base()
    }

    pub(crate) fn installer(&self) -> Installer<'_> {
        Installer {
            uffd: &self.engine.uffd,
            memfd: self.engine.memfd.as_ref(),
            page: self.geo.page_size(),
            stats: &self.stats,
            use_move: &self.use_move,
        }
    }

    /// How data from the staging buffer is installed.
    pub(crate) fn how(&self) -> How {
        if self.cfg.page_cache() {
            How::Continue
        } else if self.use_move.load(Ordering::Relaxed) {
            How::Move
        } else {
            How::Copy
        }
    }

    /// Whether chunk `i` is installed write-protected: every chunk under
    /// dirty tracking (fetched data is clean), a protected one otherwise.
    pub(crate) fn wp_for(&self, i: usize) -> bool {
        if self.budget.enabled {
            // Clean until the first write, which faults and marks it dirty.
            return true;
        }
        match self.tracking {
            WriteTracking::Off => false,
            WriteTracking::Dirty => true,
            WriteTracking::Protect => {
                // Pairs with the fence in `protect`: either this fetch sees
                // the bit, or `protect` sees the chunk claimed and waits.
                std::sync::atomic::fence(Ordering::SeqCst);
                self.protected.get(i)
            }
        }
    }

    fn is_zero(&self, i: usize) -> bool {
        self.zero
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.engine.stopping()
    }

    /// A worker for a fetch on the calling thread.
    pub(crate) fn take_worker(&self) -> io::Result<Worker> {
        match self.pool.lock().pop() {
            Some(w) => Ok(w),
            None => Worker::new(
                self.geo.chunk_size(),
                self.cfg.runtime.as_ref(),
                self.cfg.store_spin,
            ),
        }
    }

    /// Returns a worker taken with [`take_worker`](Self::take_worker), after
    /// serving the faults it read while draining.
    pub(crate) fn put_worker(&self, mut w: Worker) {
        Engine::serve_deferred(self, &mut w);
        self.pool.lock().push(w);
    }

    /// Fetches and installs chunk `i`, which the caller has claimed
    /// (`Fetching`). Leaves it `Present`, `Poisoned` (fault/inline paths
    /// after the deadline) or `Absent` (background failure, shutdown).
    pub(crate) fn fetch(&self, w: &mut Worker, i: usize, by: Fetcher) -> Result<(), ChunkError> {
        // A repair fills only the holes of a present chunk: its other pages
        // keep what was written to them, and so their chunk its dirty bit.
        if !matches!(by, Fetcher::Repair) {
            self.budget.claimed(i);
        }
        let (off, data_len, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        let zero = self.is_zero(i);
        let wp = self.wp_for(i);
        let res = if zero {
            self.install_zero(w, off, dst, inst_len, wp)
        } else {
            let pull = match by {
                Fetcher::Background(lease) => Some(lease),
                _ => None,
            };
            self.read_chunk(w, off, data_len, inst_len, pull)
                .and_then(|()| {
                    let how = if self.cfg.shared {
                        How::Continue
                    } else if matches!(by, Fetcher::Repair) {
                        How::Copy
                    } else {
                        self.how()
                    };
                    self.install(w, off, dst, inst_len, how, wp)
                        .map_err(Fail::Install)
                })
        };
        let uffd = &self.engine.uffd;
        match res {
            Ok(()) => {
                if zero {
                    inc(&self.stats.chunks_zero);
                } else {
                    add(&self.stats.bytes_fetched, data_len);
                }
                match by {
                    Fetcher::Fault => inc(&self.stats.chunks_fault),
                    Fetcher::Repair => inc(&self.stats.chunks_repaired),
                    Fetcher::Inline => inc(&self.stats.chunks_inline),
                    Fetcher::Background(_) => {
                        inc(&self.stats.chunks_background);
                        if !zero {
                            add(&self.stats.bytes_background, data_len);
                        }
                    }
                }
                // `false`: invalidated by a REMOVE meanwhile; it stays absent
                // and is fetched again on its next touch. Installs do not
                // wake: the waiters are woken only once the chunk is marked
                // present, so a returning access sees a consistent state.
                if self.chunks.finish(i) {
                    self.budget.installed(i, self.chunks.present_count());
                }
                let _ = uffd.wake(dst, inst_len);
                Ok(())
            }
            Err(Fail::Stopped) => {
                self.chunks.abandon(i);
                let _ = uffd.wake(dst, inst_len);
                Err(self.chunk_error(i, 0, false, "the region is shutting down".into()))
            }
            Err(Fail::Install(e)) => {
                self.chunks.abandon(i);
                let _ = uffd.wake(dst, inst_len);
                let err =
                    self.chunk_error(i, 1, false, format!("installing the chunk failed: {e}"));
                tracing::error!(chunk = i, error = %e, "memsync-region: install failed");
                self.errors.lock().push(err.clone());
                Err(err)
            }
            Err(Fail::Store(e, attempts)) if matches!(by, Fetcher::Background(_)) => {
                // The fault path retries with its own deadline.
                self.chunks.abandon(i);
                let _ = uffd.wake(dst, inst_len);
                let err = self.chunk_error(i, attempts, false, e.chain());
                tracing::warn!(chunk = i, error = %err, "memsync-region: background pull gave up on a chunk");
                self.errors.lock().push(err.clone());
                Err(err)
            }
            Err(Fail::Store(e, attempts)) => {
                let how = self.make_sigbus(&mut w.ev, off, dst, inst_len);
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
                let _ = uffd.wake(dst, inst_len);
                Err(err)
            }
        }
    }

    pub(crate) fn chunk_error(
        &self,
        i: usize,
        attempts: u32,
        poisoned: bool,
        message: String,
    ) -> ChunkError {
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

    /// Runs an installer step to the end: on `EAGAIN` reads the pending
    /// events (this is what the kernel waits for) and goes on, for at most
    /// `limit`.
    pub(crate) fn until_done(
        &self,
        ev: &mut Events,
        limit: Duration,
        what: &'static str,
        mut step: impl FnMut(usize) -> io::Result<Step>,
    ) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        let mut pos = 0;
        loop {
            match step(pos)? {
                Step::Done => return Ok(()),
                Step::Again { pos: p } => {
                    pos = p;
                    if Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, what));
                    }
                    self.engine.drain_events(self, ev);
                }
            }
        }
    }

    /// Makes the missing pages of the chunk at region offset `off` (`len`
    /// bytes at `dst`) raise `SIGBUS` for good, without waking its waiters:
    /// with `UFFDIO_POISON` where the kernel has it, otherwise (or when it
    /// fails) by mapping the [`SigbusFile`] over the whole chunk. Returns how,
    /// or `None` if neither worked (the pages are still missing).
    pub(crate) fn make_sigbus(
        &self,
        ev: &mut Events,
        off: usize,
        dst: usize,
        len: usize,
    ) -> Option<&'static str> {
        if self.cfg.use_poison {
            let inst = self.installer();
            match self.until_done(
                ev,
                Duration::from_secs(5),
                "UFFDIO_POISON kept returning EAGAIN",
                |from| inst.poison(dst, len, from),
            ) {
                Ok(()) => return Some("UFFDIO_POISON"),
                Err(e) => {
                    tracing::warn!(error = %e, "memsync-region: UFFDIO_POISON failed; mapping a SIGBUS file over the chunk instead");
                }
            }
        }
        // No UFFD_FEATURE_EVENT_UNMAP is enabled, so this does not wait for
        // a handler to read an unmap event (it may be the only handler).
        let map = &self.engine.map;
        match map.map_sigbus(off, len, &self.sigbus) {
            Ok(()) => {
                // As the rest of the region: not inherited by fork().
                let _ = map.advise(off, len, Advice::DontFork);
                Some("SIGBUS mapping")
            }
            Err(e) => {
                tracing::error!(error = %e, "memsync-region: mapping a SIGBUS file over a failed chunk failed");
                None
            }
        }
    }

    /// Reads source bytes `off..off + data_len` into the worker's staging
    /// buffer with retries and backoff until the deadline, and zeroes the
    /// tail up to `inst_len`.
    ///
    /// The region owns the deadline of its fetches: the read runs in the
    /// deadline's [`Retry::scope`](memsync_core::Retry::scope), so a layer
    /// below that retries too (a cache) retries until this deadline instead
    /// of its own and returns only when it passed (or on a permanent
    /// error): then this loop does not try again, and the stack has one
    /// clock.
    fn read_chunk(
        &self,
        w: &mut Worker,
        off: usize,
        data_len: usize,
        inst_len: usize,
        pull: Option<&Arc<PullLease>>,
    ) -> Result<(), Fail> {
        let mut retry = self.cfg.retry.start();
        let Worker {
            staging, exec, cur, ..
        } = w;
        let cur = *cur;
        loop {
            let remaining = retry.remaining();
            let mut stop_rx = self.engine.stop_tx.subscribe();
            let t = Instant::now();
            let read = if self.cfg.shared {
                // The source's pages are the region's: make them resident, copy nothing.
                self.source.make_resident(off as u64, data_len as u64)
            } else {
                self.source
                    .read(off as u64, &mut staging.as_mut_slice()[cur..cur + data_len])
            };
            let read = retry.scope(read);
            // A cache below serves the puller's reads as its pull, not as demand (see
            // `memsync_core::chunks::background_pull`).
            let read = async {
                match pull {
                    Some(lease) => background_pull(lease, read).await,
                    None => read.await,
                }
            };
            let res = exec.block_on(async {
                tokio::select! {
                    biased;
                    _ = stop_rx.wait_for(|s| *s) => None,
                    r = tokio::time::timeout(remaining, read) => Some(match r {
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
                    let pause = retry.failed(&e);
                    tracing::debug!(attempt = retry.attempts(), error = %e.chain(), "memsync-region: store read failed");
                    let Some(backoff) = pause else {
                        return Err(Fail::Store(e, retry.attempts()));
                    };
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
                    if retry.remaining().is_zero() {
                        return Err(Fail::Store(e, retry.attempts()));
                    }
                }
            }
        }
        if inst_len > data_len && !self.cfg.shared {
            staging.as_mut_slice()[cur + data_len..cur + inst_len].fill(0);
        }
        Ok(())
    }

    fn install_zero(
        &self,
        w: &mut Worker,
        off: usize,
        dst: usize,
        len: usize,
        wp: bool,
    ) -> Result<(), Fail> {
        let how = if self.cfg.memfd {
            // shmem has no zero page: write zeros into the page cache.
            How::Continue
        } else if self.cfg.hugetlb || wp {
            // hugetlb has no UFFDIO_ZEROPAGE, and it cannot write-protect:
            // copy zeros.
            How::Copy
        } else {
            How::Zero
        };
        if how != How::Zero {
            w.buf(len).fill(0);
        }
        self.install(w, off, dst, len, how, wp)
            .map_err(Fail::Install)
    }

    /// Installs `len` bytes at `dst` (region offset `off`) from the staging
    /// buffer without waking the waiters (the caller wakes the range).
    /// Pages that already exist are skipped; `EAGAIN` drains events and
    /// retries the rest.
    pub(crate) fn install(
        &self,
        w: &mut Worker,
        off: usize,
        dst: usize,
        len: usize,
        how: How,
        wp: bool,
    ) -> io::Result<()> {
        // MOVE cannot install write-protected pages.
        let how = if wp && how == How::Move {
            How::Copy
        } else {
            how
        };
        let inst = self.installer();
        // Shared: the source made the pages resident; there is nothing to write.
        let r = if how == How::Continue && !self.cfg.shared {
            inst.fill_page_cache(&w.staging.as_slice()[w.cur..w.cur + len], off)
        } else {
            Ok(())
        }
        .and_then(|()| {
            let mut cur_how = how;
            let Worker {
                staging, cur, ev, ..
            } = w;
            self.until_done(
                ev,
                Duration::from_secs(10),
                "install kept returning EAGAIN",
                |from| inst.install((staging, *cur), dst, len, from, &mut cur_how, wp),
            )
        });
        if how == How::Move {
            self.stage.advance(w, &self.stats);
        }
        r
    }

    /// A write hit write-protected chunk `i`: ask the hooks, then (by
    /// default) lift the protection of the chunk, which wakes the writer.
    pub(crate) fn on_wp_fault(&self, w: &mut Worker, i: usize, addr: usize) {
        inc(&self.stats.wp_faults);
        // Under a budget the chunk is owned while its protection is lifted,
        // so the evictor cannot copy it in between and drop the write that
        // follows. A chunk someone else owns (the evictor, a fetch, another
        // handler) is left alone: its owner wakes the writer when done, and
        // the write faults again if the page is still protected.
        let owned = self.budget.enabled && {
            self.budget.dirty.set(i);
            match self.chunks.try_reclaim(i) {
                Ok(()) => true,
                // The owner wakes the writer once it is done: it was
                // enqueued before this handler read its fault, and the
                // owner's wake follows this check.
                Err(ChunkState::Fetching | ChunkState::Dropping) => return,
                // No owner to wake the writer: the chunk was dropped (or
                // poisoned) since the fault was raised. The writer may have
                // entered the kernel's wait after the dropper's wake (the
                // fault saw the page protected, the wait found it gone), so
                // wake it here: it faults again, as a missing page. Without
                // this it waited until some other access fetched the chunk,
                // for good if none came.
                Err(_) => {
                    inc(&self.stats.faults_spurious);
                    let page = self.geo.page_size();
                    let _ = self.engine.uffd.wake(addr & !(page - 1), page);
                    return;
                }
            }
        };
        if self.tracking == WriteTracking::Protect {
            let g = self.protect_lock(i).lock();
            if self.protected.get(i) {
                drop(g);
                if self.hooks.write_protect(i, addr) == WpAction::Unprotect {
                    let _g = self.protect_lock(i).lock();
                    self.lift_protection(w, i);
                }
            } else {
                // Not protected for the driver (it lifted the protection after this fault
                // was raised, or the page was installed protected just before): lift it,
                // under the lock, so that a `protect` racing with this fault either comes
                // after the lift or is seen here.
                self.lift_protection(w, i);
                drop(g);
            }
        } else {
            self.lift_protection(w, i);
        }
        if owned {
            let _ = self.chunks.finish(i);
            let (off, _, inst_len) = self.geo.chunk(i);
            let _ = self.engine.uffd.wake(self.base() + off, inst_len);
        }
    }

    fn lift_protection(&self, w: &mut Worker, i: usize) {
        self.protected.clear(i);
        let (off, _, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        let inst = self.installer();
        if let Err(e) = self.until_done(
            &mut w.ev,
            Duration::from_secs(10),
            "UFFDIO_WRITEPROTECT kept returning EAGAIN",
            |_| inst.write_protect(dst, inst_len, false),
        ) {
            tracing::error!(chunk = i, error = %e, "memsync-region: lifting write protection failed");
        }
    }

    fn chunk_span(&self, start: usize, end: usize) -> Option<std::ops::Range<usize>> {
        let base = self.base();
        let (s, e) = (start.max(base), end.min(base + self.engine.map.len()));
        (s < e).then(|| self.geo.chunks_in(s - base, e - s))
    }
}

impl EventHandler for Core {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn stats(&self) -> &RegionStats {
        &self.stats
    }

    fn on_other(&self, ev: Event) {
        if let Event::Remove { start, end } = ev {
            inc(&self.stats.removes);
            let Some(r) = self.chunk_span(start, end) else {
                return;
            };
            let mut theirs = false;
            for i in r.clone() {
                if self.chunks.get(i) == ChunkState::Dropping {
                    // A driver's own drop: it waits for this acknowledgement
                    // before the chunk may be fetched again, and tells the
                    // hooks itself.
                    self.remove_ack.set(i);
                } else if !self.cfg.page_cache() {
                    // Anonymous memory: the pages are gone, refetch on the
                    // next touch. memfd: MADV_DONTNEED keeps the page cache
                    // (the next touch is a MINOR fault); MADV_REMOVE punches
                    // a hole, which the next touch repairs (MISSING fault on
                    // a present chunk).
                    self.chunks.invalidate(i);
                    theirs = true;
                }
            }
            if theirs {
                self.hooks.remove(r);
            }
        }
    }

    fn on_fault(&self, w: &mut Worker, addr: usize, flags: PageFaultFlags, t0: Instant) {
        inc(&self.stats.faults);
        let page = self.geo.page_size();
        let addr = addr & !(page - 1);
        if !self.engine.map.contains(addr) {
            return;
        }
        let uffd = &self.engine.uffd;
        let i = self.geo.chunk_of(addr - self.base());
        if flags.contains(PageFaultFlags::WP) {
            self.on_wp_fault(w, i, addr);
            return;
        }
        self.last_fault.store(i, Ordering::Relaxed);
        match self.chunks.try_claim(i) {
            Ok(()) => {
                self.hooks.missing(i);
                self.urgent.fetch_add(1, Ordering::AcqRel);
                let _ = self.fetch(w, i, Fetcher::Fault);
                self.urgent.fetch_sub(1, Ordering::AcqRel);
                self.stats.fault_latency.record(t0.elapsed());
            }
            // The fetcher's install wakes this fault.
            Err(ChunkState::Dropping) if !flags.contains(PageFaultFlags::MINOR) => {
                inc(&self.stats.faults_waited);
            }
            Err(ChunkState::Fetching) => inc(&self.stats.faults_waited),
            // A MINOR fault of a dropping memfd chunk (the evictor reading
            // it before it writes it back) is mapped again like a present
            // one: nobody else would.
            Err(ChunkState::Present | ChunkState::Dropping) => {
                inc(&self.stats.faults_spurious);
                if !self.cfg.page_cache() {
                    let _ = uffd.wake(addr, page);
                } else if flags.contains(PageFaultFlags::MINOR) {
                    // Data is in the page cache (e.g. after MADV_DONTNEED):
                    // map the chunk again.
                    self.hooks.minor(i);
                    let (off, _, inst) = self.geo.chunk(i);
                    let dst = self.base() + off;
                    let installer = self.installer();
                    let wp = self.wp_for(i);
                    let _ = self.until_done(&mut w.ev, Duration::from_secs(86400), "", |from| {
                        installer.remap(dst, inst, from, wp)
                    });
                    let _ = uffd.wake(dst, inst);
                } else if self.chunks.try_reclaim(i).is_ok() {
                    // A hole was punched into a present chunk (MADV_REMOVE):
                    // refill the missing pages only.
                    self.urgent.fetch_add(1, Ordering::AcqRel);
                    let _ = self.fetch(w, i, Fetcher::Repair);
                    self.urgent.fetch_sub(1, Ordering::AcqRel);
                } else {
                    let _ = uffd.wake(addr, page);
                }
            }
            Err(ChunkState::Poisoned) => {
                // Its pages were dropped since they were poisoned
                // (MADV_DONTNEED removes poison markers), or the fault is
                // older than the poisoning: poison what is missing again.
                let (off, _, inst) = self.geo.chunk(i);
                if self
                    .make_sigbus(&mut w.ev, off, self.base() + off, inst)
                    .is_none()
                {
                    self.chunks.unpoison(i);
                }
                let _ = uffd.wake(self.base() + off, inst);
            }
            Err(ChunkState::Absent) => {
                let _ = uffd.wake(addr, page);
            }
        }
    }
}
