//! [`LazyRegion`]: the façade over the engine. It builds the parts
//! (engine, chunk table, source, handler and puller threads) and offers the
//! safe accessors and the driver operations.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memsync_core::DynStore;
use memsync_sys::{Advice, Features};

use crate::config::{Backing, RegionConfig, WriteTracking};
use crate::dirty::DirtyTracker;
use crate::engine::{Engine, EngineSetup};
use crate::error::{ChunkError, Error, sys};
use crate::exec::Exec;
use crate::fault::{Core, CoreParts, Fetcher, Settings};
use crate::puller::Puller;
use crate::running::Running;
use crate::source::{ChunkSource, FaultHooks, StoreSource};
use crate::state::{ChunkBitmap, ChunkState, Geometry};

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
    run: Running,
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
        Self::with_source(Arc::new(StoreSource(store)), Arc::new(()), cfg)
    }

    /// Creates a region of `source.size()` bytes whose missing chunks come
    /// from `source`, telling `hooks` about its faults.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new).
    pub fn with_source(
        source: Arc<dyn ChunkSource>,
        hooks: Arc<dyn FaultHooks>,
        mut cfg: RegionConfig,
    ) -> Result<Self, Error> {
        let page = cfg.install_page()?;
        let bs = source.block_size().max(1);
        if !(cfg.chunk_size as u64).is_multiple_of(bs) && bs > 1 {
            return Err(Error::Config(format!(
                "chunk size {} is not a multiple of the store's block size {bs} (wrap it in Chunked)",
                cfg.chunk_size
            )));
        }
        let geo = Geometry::new(source.size(), cfg.chunk_size, page).ok_or_else(|| {
            Error::Config(format!("cannot map a store of {} bytes", source.size()))
        })?;
        if cfg.budget.is_some() && cfg.write_tracking == WriteTracking::Dirty {
            return Err(Error::Config(
                "a budget needs synchronous write protection: not with WriteTracking::Dirty".into(),
            ));
        }
        let shared = if cfg.backing == Backing::Shared {
            Some(cfg.shared_memory(&*source)?)
        } else {
            None
        };
        let engine = Engine::open(EngineSetup {
            backing: cfg.backing,
            map_len: geo.map_len(),
            page,
            huge_pages: cfg.huge_pages,
            user_mode_only: cfg.user_mode_only,
            wp: cfg.write_tracking != WriteTracking::Off || cfg.budget.is_some(),
            wp_async: cfg.write_tracking == WriteTracking::Dirty,
            remove_events: cfg.remove_events,
            spin: cfg.spin,
            standby_after: cfg.standby(),
            shared,
        })?;
        let use_poison = cfg.use_poison
            && engine.uffd.features().contains(Features::POISON)
            && engine.ioctls.contains(memsync_sys::Ioctls::POISON);
        if cfg.use_poison && !use_poison {
            tracing::info!(
                "memsync-region: no UFFDIO_POISON on this kernel: a failed chunk is replaced by a SIGBUS mapping"
            );
        }
        // A chunk of one page is installed faster by a copy: a move clears the staging page's
        // entry and flushes it from the TLB of every other CPU that runs this process (an IPI
        // per page, dear on a VM), which costs more than copying 4 KiB (docs/perf.md, "Where
        // the lazy region's time goes"). Larger chunks keep the move, which spares the copy of
        // a huge page.
        let use_move = cfg.use_move
            && geo.chunk_size() > geo.page_size()
            && cfg.backing == Backing::Anonymous
            && engine.uffd.features().contains(Features::MOVE)
            && engine.ioctls.contains(memsync_sys::Ioctls::MOVE);
        // Shared: a zero chunk is mapped from the source like any other (its pages exist
        // once it is resident; installing zeros would write them into the source).
        let zero = if cfg.zero_detect && cfg.backing != Backing::Shared {
            zero_map(&*source, &geo, cfg.runtime.as_ref(), None)?
        } else {
            Vec::new()
        };
        let dirty = if cfg.write_tracking == WriteTracking::Dirty {
            // Unpopulated pages count as written until protected: protect
            // them all (WP_UNPOPULATED leaves markers), so only writes show.
            engine
                .uffd
                .write_protect(engine.base(), engine.map.len())
                .map_err(sys("write-protecting the region for dirty tracking"))?;
            Some(
                DirtyTracker::over(engine.base(), geo.map_len(), geo.chunk_size(), None)
                    .map_err(sys("opening /proc/self/pagemap"))?,
            )
        } else {
            None
        };
        let core = Core::new(CoreParts {
            engine,
            geo,
            source,
            hooks,
            zero,
            cfg: Settings::new(&cfg, use_poison),
            use_move,
            tracking: cfg.write_tracking,
            dirty,
            budget: cfg.budget.map(|b| (b / cfg.chunk_size).max(1)),
        })?;
        let pull = Arc::new(Puller::new(cfg.take_priority(), cfg.prefetch));
        Ok(Self {
            run: Running::start(core, pull, &cfg)?,
        })
    }

    /// Start of the region's memory (2 MiB aligned). See the type's
    /// lifetime rules before dereferencing it.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.run.core.engine.map.as_ptr()
    }

    /// Start address of the region.
    #[must_use]
    pub fn addr(&self) -> usize {
        self.run.core.engine.map.addr()
    }

    /// Length in bytes (the store's size).
    #[must_use]
    pub fn len(&self) -> usize {
        self.run.core.geo.size() as usize
    }

    /// Always `false` (stores are never empty).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the userfaultfd was opened with `UFFD_USER_MODE_ONLY`.
    #[must_use]
    pub fn user_mode_only(&self) -> bool {
        self.run.core.engine.user_mode_only
    }

    /// The 8-byte word at offset `off` as an atomic (read-modify-write
    /// instructions through the fault path: a missing page faults and is
    /// fetched, a write to a protected one goes to the write-protect hook).
    ///
    /// # Panics
    ///
    /// If `off` is not 8-byte aligned or out of bounds.
    #[track_caller]
    #[must_use]
    pub fn atomic_u64(&self, off: usize) -> &std::sync::atomic::AtomicU64 {
        self.check(off, 8);
        self.run.core.engine.map.atomic_u64(off)
    }

    /// Whether a chunk the store fails to deliver is poisoned with
    /// `UFFDIO_POISON` (`false`: its range is replaced by a mapping that
    /// raises `SIGBUS`; see [`RegionConfig::use_poison`]).
    #[must_use]
    pub fn uses_poison(&self) -> bool {
        self.run.core.cfg.use_poison
    }

    /// The memfd behind a [`Backing::Memfd`] region (map it with
    /// `MAP_SHARED` in another process to see the filled chunks), `None`
    /// for anonymous memory.
    #[must_use]
    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        self.run.core.engine.memfd.as_ref().map(AsFd::as_fd)
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
        let inner = &*self.run.core;
        let inline = inner.cfg.inline_resolve && tokio::runtime::Handle::try_current().is_err();
        for i in inner.geo.chunks_in(off, len) {
            let wait_until = Instant::now() + inner.cfg.retry.deadline + Duration::from_secs(1);
            let mut sleep = Duration::from_micros(1);
            loop {
                match inner.chunks.get(i) {
                    ChunkState::Present => break,
                    ChunkState::Absent if inline => {
                        if inner.chunks.try_claim(i).is_ok() {
                            let mut w = inner
                                .take_worker()
                                .map_err(|e| {
                                    inner.chunk_error(
                                        i,
                                        0,
                                        false,
                                        format!("creating a worker: {e}"),
                                    )
                                })
                                .inspect_err(|_| inner.chunks.abandon(i))?;
                            let r = inner.fetch(&mut w, i, Fetcher::Inline);
                            inner.put_worker(w);
                            r?;
                        }
                    }
                    // Let the access fault; a handler fetches it.
                    ChunkState::Absent => break,
                    ChunkState::Fetching | ChunkState::Dropping => {
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
        let errors = self.run.core.errors.lock();
        errors
            .iter()
            .rev()
            .find(|e| e.chunk == i)
            .cloned()
            .unwrap_or_else(|| {
                self.run
                    .core
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
        self.run.core.engine.map.read_at(off, buf);
        Ok(())
    }

    /// Copies `data` into the region at offset `off`, fetching missing
    /// chunks first: the rest of each chunk keeps the store's data. Written
    /// bytes stay local (on [`Backing::Shared`] they are the source's).
    ///
    /// # Errors
    ///
    /// The [`ChunkError`] of a chunk the store could not deliver (nothing was
    /// written to it then), or of the first chunk of the range when the region
    /// is read-only (a [`Backing::Shared`] region over a source whose memory
    /// must not be written through a mapping).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn write_at(&self, off: usize, data: &[u8]) -> Result<(), ChunkError> {
        let core = &*self.run.core;
        if core.engine.map.is_read_only() {
            self.check(off, data.len());
            let i = core.geo.chunk_of(off);
            return Err(core.chunk_error(
                i,
                0,
                false,
                "the region maps its source's memory read-only (Backing::Shared)".into(),
            ));
        }
        self.prefetch(off, data.len())?;
        self.run.core.engine.map.write_at(off, data);
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
        self.run.core.engine.map.read_at(off, buf);
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
        self.run.core.engine.map.write_at(off, data);
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
        self.run.core.engine.map.advise(off, len, advice)
    }

    /// Installs `data` as chunk `chunk` (data that arrived from elsewhere,
    /// e.g. pushed by a migration source or another host), if the chunk is
    /// absent: `Ok(true)` when this call installed it. Races safely with
    /// faults, the background puller and other calls: of a fetch and a
    /// place of one chunk exactly one installs, a fault waiting on the
    /// chunk is woken with the winner's bytes, and `Ok(false)` tells that
    /// the chunk was not absent (present, being fetched, dropping or
    /// poisoned) and nothing changed. To replace a present chunk,
    /// [`invalidate`](Self::invalidate) it first.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `chunk` is not a chunk index or `data` is not the
    /// chunk's data length ([`Geometry::chunk`]); the install's error.
    pub fn place(&self, chunk: usize, data: &[u8]) -> io::Result<bool> {
        let inner = &*self.run.core;
        if chunk >= inner.geo.chunks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk {chunk} out of range ({} chunks)", inner.geo.chunks()),
            ));
        }
        let mut w = inner.take_worker()?;
        let r = inner.place(&mut w, chunk, data);
        inner.put_worker(w);
        r
    }

    /// Drops the chunks overlapping `off..off + len`, whole, with any local
    /// writes to them: they become absent, and the next touch faults and
    /// fetches them from the source again. A fetch or place in progress is
    /// waited for first; poisoned chunks are left as they are. Returns the
    /// number of chunks dropped. Call it from a thread of your own, never
    /// from a [`FaultHooks`] callback (the drop needs a handler thread).
    ///
    /// # Errors
    ///
    /// The `madvise(2)` error (the chunk then stays as it was).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn invalidate(&self, off: usize, len: usize) -> io::Result<usize> {
        self.check(off, len);
        let inner = &*self.run.core;
        let range = inner.geo.chunks_in(off, len);
        let n = inner.drop_chunks(range.clone())?;
        if !range.is_empty() {
            inner.hooks.remove(range);
        }
        Ok(n)
    }

    /// Write-protects the chunks overlapping `off..off + len` (needs
    /// [`WriteTracking::Protect`]): a write to one of them faults, and the
    /// fault goes to [`FaultHooks::write_protect`], which lifts the
    /// protection of that chunk (the default) or holds the writer until
    /// [`unprotect`](Self::unprotect). Reads are not affected. Absent chunks
    /// are installed protected when they are fetched or placed.
    ///
    /// # Errors
    ///
    /// `Unsupported` without [`WriteTracking::Protect`]; the ioctl's error.
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn protect(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len);
        for i in self.run.core.geo.chunks_in(off, len) {
            self.run.core.set_protection(i, true)?;
        }
        Ok(())
    }

    /// Lifts the write protection of the chunks overlapping
    /// `off..off + len` and wakes the writers held on them.
    ///
    /// # Errors
    ///
    /// As for [`protect`](Self::protect).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    #[track_caller]
    pub fn unprotect(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len);
        for i in self.run.core.geo.chunks_in(off, len) {
            self.run.core.set_protection(i, false)?;
        }
        Ok(())
    }

    /// The chunks written since the last call (since the region was made,
    /// the first time), as byte ranges of whole chunks (adjacent ones
    /// merged, the last clamped to [`len`](Self::len)), re-armed in the same
    /// `PAGEMAP_SCAN`: a write racing with the call is reported by this call
    /// or the next, never lost. Fetched and placed chunks are clean; any
    /// write, through a pointer or [`write_at`](Self::write_at), makes its
    /// chunk dirty. Needs [`WriteTracking::Dirty`].
    ///
    /// # Errors
    ///
    /// `Unsupported` without [`WriteTracking::Dirty`]; the scan's error.
    pub fn dirty_chunks(&self) -> io::Result<Vec<std::ops::Range<usize>>> {
        let t = self.dirty_tracker()?;
        let len = self.len();
        Ok(t.collect()?
            .into_iter()
            .filter(|r| r.start < len)
            .map(|r| r.start..r.end.min(len))
            .collect())
    }

    /// The region's [`DirtyTracker`] (with [`WriteTracking::Dirty`]), e.g.
    /// for [`DirtyTracker::collect_bitmap`]; its ranges are relative to the
    /// mapping, which may reach past [`len`](Self::len) to a page boundary.
    ///
    /// # Errors
    ///
    /// `Unsupported` without [`WriteTracking::Dirty`].
    pub fn dirty_tracker(&self) -> io::Result<&DirtyTracker> {
        self.run.core.dirty.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "dirty tracking needs RegionConfig::write_tracking = WriteTracking::Dirty",
            )
        })
    }

    /// Changes the budget (see [`RegionConfig::budget`]): at most `bytes`
    /// resident, rounded down to whole chunks (at least one); `None` lifts
    /// the limit. The evictor catches up in the background.
    ///
    /// # Errors
    ///
    /// `Unsupported` if the region was not built with a budget (its chunks
    /// are not write-protected, so their writes cannot be seen).
    pub fn set_budget(&self, bytes: Option<usize>) -> io::Result<()> {
        let b = &self.run.core.budget;
        if !b.enabled {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the region was built without RegionConfig::budget",
            ));
        }
        let chunk = self.run.core.geo.chunk_size();
        b.limit.store(
            bytes.map_or(usize::MAX, |x| (x / chunk).max(1)),
            std::sync::atomic::Ordering::Relaxed,
        );
        b.notify();
        Ok(())
    }

    /// Evicts up to `n` chunks now, on this thread, as the evictor would
    /// (clock order, clean first, dirty ones written back first). Returns
    /// how many were evicted.
    ///
    /// # Errors
    ///
    /// `Unsupported` without a budget; the write-back's or `madvise(2)`'s
    /// error.
    pub fn evict(&self, n: usize) -> io::Result<usize> {
        let inner = &*self.run.core;
        if !inner.budget.enabled {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the region was built without RegionConfig::budget",
            ));
        }
        let w = inner.take_worker()?;
        let mut done = 0;
        let r = (|| {
            while done < n && inner.evict_one(&w.exec)? {
                done += 1;
            }
            Ok(done)
        })();
        inner.put_worker(w);
        r
    }

    /// Bytes of the chunks present now.
    #[must_use]
    pub fn resident_bytes(&self) -> usize {
        self.present_count() * self.run.core.geo.chunk_size()
    }

    /// The state of chunk `i`.
    ///
    /// # Panics
    ///
    /// If `i` is not a chunk index.
    #[must_use]
    pub fn chunk_state(&self, i: usize) -> ChunkState {
        self.run.core.chunks.get(i)
    }

    /// Which chunks are present (a snapshot).
    #[must_use]
    pub fn present_chunks(&self) -> ChunkBitmap {
        self.run.core.chunks.present_bitmap()
    }

    crate::running::engine_accessors!();
}

impl Drop for LazyRegion {
    fn drop(&mut self) {
        self.run.stop();
        // Then the userfaultfd is closed and the memory unmapped (field
        // order of `Engine`) when the last reference goes, which is now.
        let map = &self.run.core.engine.map;
        let _ = self.run.core.engine.uffd.unregister(map.addr(), map.len());
    }
}

/// One bit per chunk that the store reports as entirely zero or hole
/// (empty if it reports no extents), asked in windows of 1 GiB.
///
/// `within` bounds the whole query: past it, the query in flight is
/// dropped and [`StoreError::Timeout`](memsync_core::StoreError::Timeout)
/// returned. `None` waits as long as the store takes.
pub(crate) fn zero_map(
    store: &dyn ChunkSource,
    geo: &Geometry,
    handle: Option<&tokio::runtime::Handle>,
    within: Option<Duration>,
) -> Result<Vec<u64>, Error> {
    const WINDOW: u64 = 1 << 30;
    let size = store.size();
    let chunk = geo.chunk_size() as u64;
    let deadline = within.map(|d| tokio::time::Instant::now() + d);
    std::thread::scope(|s| {
        s.spawn(|| {
            let exec = Exec::new(handle, Duration::ZERO).map_err(sys("creating a runtime"))?;
            let mut bits = vec![0u64; geo.chunks().div_ceil(64)];
            let mut pos = 0;
            while pos < size {
                let len = WINDOW.min(size - pos);
                let Some(query) = store.extents(pos, len) else {
                    return Ok(Vec::new());
                };
                let answer = match deadline {
                    None => exec.block_on(query),
                    Some(d) => exec.block_on(async {
                        tokio::time::timeout_at(d, query).await.unwrap_or_else(|_| {
                            Err(memsync_core::StoreError::Timeout {
                                op: "extents",
                                after_ms: within.map_or(0, |w| {
                                    u64::try_from(w.as_millis()).unwrap_or(u64::MAX)
                                }),
                            })
                        })
                    }),
                };
                let extents = answer.map_err(|source| Error::Store {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use memsync_sys::PageFaultFlags;

    use crate::engine::EventHandler;
    use crate::{ChunkSource, ChunkState, LazyRegion, RegionConfig, SourceFuture};

    /// A source of ones that accepts write-backs (and forgets them).
    #[derive(Debug)]
    struct Ones(usize);

    impl ChunkSource for Ones {
        fn size(&self) -> u64 {
            self.0 as u64
        }
        fn read<'a>(&'a self, _offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
            buf.fill(1);
            Box::pin(async { Ok(()) })
        }
        fn write_back(&self, _offset: u64, _data: memsync_core::Bytes) -> SourceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    const CHUNK: usize = 16 * 1024;

    /// Four chunks of ones under a budget of four (chunks are installed write-protected, and
    /// nothing is evicted unless a test does it), with one handler thread.
    fn budget_region() -> (Arc<LazyRegion>, Arc<crate::fault::Core>) {
        let cfg = RegionConfig {
            chunk_size: CHUNK,
            prefetch: false,
            handler_threads: 1,
            budget: Some(4 * CHUNK),
            fetch_deadline: Duration::from_secs(10),
            ..RegionConfig::default()
        };
        let r = Arc::new(
            LazyRegion::with_source(Arc::new(Ones(4 * CHUNK)), Arc::new(()), cfg).unwrap(),
        );
        let core = Arc::clone(&r.run.core);
        (r, core)
    }

    /// Writes 7 at offset 100 on a thread of its own; the receiver hears when it is done.
    fn spawn_writer(
        r: &Arc<LazyRegion>,
    ) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let r = Arc::clone(r);
        let t = std::thread::spawn(move || {
            r.write_faulting(100, &[7]);
            let _ = tx.send(());
        });
        (t, rx)
    }

    /// A write-protect fault can reach a handler after the chunk it hit was dropped, with
    /// the writer still waiting and the dropper's wake already spent: the writer's fault
    /// saw the page protected (the evictor had protected it to write it back), and by the
    /// time the writer entered the kernel's wait the evictor had dropped the pages, marked
    /// the chunk absent and woken the range; the wait found the page missing and slept.
    /// The handler then finds the chunk absent with no owner to wake the writer. It used to
    /// leave it waiting until another access fetched the chunk (never, if none came: a
    /// writer of `budget_eviction_loses_no_concurrent_write` hung once in a 6.12 guest).
    /// This plays the evictor by hand and withholds its wake, which is what that
    /// interleaving amounts to.
    #[test]
    fn a_late_write_protect_fault_on_a_dropped_chunk_wakes_the_writer() {
        let (r, core) = budget_region();
        let mut b = [0u8; 1];
        r.read_faulting(0, &mut b);
        assert_eq!(b, [1]);
        assert_eq!(core.chunks.get(0), ChunkState::Present);

        // The evictor takes the chunk (it is clean: no write-back, no re-protection needed,
        // it was installed protected) ...
        core.chunks.apply(0, &ChunkState::EVICT).unwrap();
        // ... a writer faults on it and waits ...
        let (writer, rx) = spawn_writer(&r);
        let until = Instant::now() + Duration::from_secs(10);
        while core.stats.wp_faults.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < until, "the write did not fault");
            std::thread::sleep(Duration::from_millis(1));
        }
        // ... the evictor drops the pages and marks the chunk absent, and its wake is spent
        // before the writer waits (so it is not sent here).
        core.zap(0).unwrap();
        core.budget.dirty.clear(0);
        core.chunks.apply(0, &ChunkState::DROPPED).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "nothing woke the writer yet"
        );
        // The handler reads the writer's fault only now.
        let mut w = core.take_worker().unwrap();
        core.on_fault(
            &mut w,
            core.base() + 100,
            PageFaultFlags::WP,
            Instant::now(),
        );
        core.put_worker(w);
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the writer was never woken"
        );
        writer.join().unwrap();
        let mut back = [0u8; 2];
        r.read_faulting(99, &mut back);
        assert_eq!(back, [1, 7], "the write landed in the refetched chunk");
    }

    /// An eviction that fails after it took a dirty chunk (its pages could not be dropped)
    /// gives the chunk back: present, still dirty, and a writer held by the write protection
    /// the eviction set is woken and writes. The chunk used to stay `Dropping` and
    /// write-protected, with its writers waiting forever.
    #[test]
    fn a_failed_eviction_gives_the_chunk_back_and_wakes_its_writers() {
        let (r, core) = budget_region();
        r.write_faulting(0, &[5]);
        // The handler that lifted the protection for the write may still hold the chunk
        // (the writer is woken before the chunk is marked present again).
        let until = Instant::now() + Duration::from_secs(10);
        while core.chunks.get(0) != ChunkState::Present {
            assert!(Instant::now() < until, "{:?}", core.chunks.get(0));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(core.budget.dirty.get(0), "the write made the chunk dirty");
        crate::drive::FAIL_ZAP.store(core.base(), Ordering::SeqCst);
        let exec = crate::exec::Exec::new(None, Duration::ZERO).unwrap();
        assert!(core.evict_chunk(0, &exec).is_err());
        crate::drive::FAIL_ZAP.store(0, Ordering::SeqCst);
        assert_eq!(core.chunks.get(0), ChunkState::Present);
        assert!(
            core.budget.dirty.get(0),
            "still dirty after the failed eviction"
        );
        // The eviction protected the chunk for its write-back: a write faults and must go on.
        let (writer, rx) = spawn_writer(&r);
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the writer was never let through"
        );
        writer.join().unwrap();
        let mut back = [0u8; 2];
        r.read_faulting(99, &mut back);
        assert_eq!(back, [1, 7]);
        let mut first = [0u8; 1];
        r.read_faulting(0, &mut first);
        assert_eq!(first, [5], "the earlier write is still there");
    }
}
