//! [`RegionConfig`]: how a [`LazyRegion`](crate::LazyRegion) is built.

use std::time::Duration;

use crate::error::{Error, sys};
use crate::pull::{PullPriority, Sequential};
use crate::source::ChunkSource;

/// What kind of memory backs a region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`), registered
    /// for MISSING faults and filled with `UFFDIO_MOVE` from a staging buffer
    /// (`UFFDIO_COPY` as a fallback, `UFFDIO_ZEROPAGE` for zero chunks). The
    /// fastest kind; only this process sees it.
    #[default]
    Anonymous,
    /// A memfd (shmem) mapped shared and registered for MISSING and MINOR
    /// faults: store data is written into the memfd's page cache and mapped
    /// with `UFFDIO_CONTINUE`. The memfd
    /// ([`LazyRegion::as_fd`](crate::LazyRegion::as_fd)) can be mapped by
    /// another process, which sees every chunk this region has filled. A
    /// chunk not filled yet is a hole of the memfd there: it reads as zeros,
    /// and a write into it is overwritten when the region fills the chunk.
    /// Such a process should touch only chunks the region reports present
    /// ([`LazyRegion::present_chunks`](crate::LazyRegion::present_chunks)).
    Memfd,
    /// The source's own memory
    /// ([`ChunkSource::shared_memory`](crate::ChunkSource::shared_memory): a file on tmpfs, e.g.
    /// a `file:` store or a cache whose directory is on tmpfs), mapped shared and registered for
    /// MISSING and MINOR faults: a fault asks the source to make the chunk resident
    /// ([`ChunkSource::make_resident`](crate::ChunkSource::make_resident): a cache fetches it
    /// into its local copy) and maps the source's pages with `UFFDIO_CONTINUE`. No staging
    /// buffer, no copy into the region and no fresh page per chunk: the only copies are the
    /// source's own (a cache's, from the socket into its local copy). A write through the
    /// region is a write to the source when the source allows it; otherwise the region is
    /// mapped read-only ([`LazyRegion::write_at`](crate::LazyRegion::write_at) fails, a raw
    /// write raises `SIGSEGV`). Dropping chunks keeps the source's pages (`MADV_DONTNEED`,
    /// never `MADV_REMOVE`). Not with a budget, write tracking or
    /// [`place`](crate::LazyRegion::place), which would change the source's bytes behind it.
    Shared,
    /// Private anonymous memory backed by reserved huge pages
    /// (`MAP_HUGETLB`, the default huge page size, 2 MiB here), registered
    /// for MISSING faults and filled with `UFFDIO_COPY` (the kernel cannot
    /// move pages into hugetlb memory; zero chunks are copied from a zeroed
    /// buffer too). The pages are never split, swapped or compacted and
    /// there is no first-touch allocation beyond taking a reserved page, but
    /// huge pages must be reserved first (`vm.nr_hugepages`, root only):
    /// creating the region fails with `ENOMEM` otherwise. The chunk size must
    /// be a multiple of the huge page size, and the region is a whole number
    /// of huge pages (the bytes past the store's size read as zeros).
    Hugetlb,
}

/// Which writes a region watches (registration with `UFFDIO_REGISTER_MODE_WP`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteTracking {
    /// None (the default): the region is registered for MISSING (and on
    /// memfd MINOR) faults only.
    #[default]
    Off,
    /// Writes to chunks a driver write-protected
    /// ([`LazyRegion::protect`](crate::LazyRegion::protect)) fault, and the
    /// fault is delivered to [`FaultHooks::write_protect`](crate::FaultHooks::write_protect).
    /// Chunks are installed with `UFFDIO_COPY` (not `MOVE`, which cannot
    /// install write-protected pages) while protected.
    Protect,
    /// The kernel tracks which pages are written (`UFFD_FEATURE_WP_ASYNC`):
    /// [`LazyRegion::dirty_chunks`](crate::LazyRegion::dirty_chunks) reads the
    /// chunks written since the last call and re-arms them in one
    /// `PAGEMAP_SCAN`. Fetched and placed chunks are installed
    /// write-protected (clean) with `UFFDIO_COPY`/`CONTINUE`, never `MOVE`.
    /// Linux 6.7+.
    Dirty,
}

/// The default chunk size: 2 MiB, one transparent huge page.
///
/// Sequential first touch is fastest with large chunks: the per-fault cost
/// (wake-ups) dominates small chunks; for 2 MiB chunks it is copying the
/// data and allocating the fresh huge page it is read into (then moved in
/// with one `UFFDIO_MOVE`). Allocation runs ahead on a helper thread
/// (pre-populated staging buffers). Regions touched sparsely and randomly
/// should use 4–64 KiB chunks, which make a random first touch cheaper,
/// above all through [`LazyRegion::read_at`](crate::LazyRegion::read_at).
/// Figures by chunk size: `docs/perf.md` (`memsync bench lazy`).
pub const DEFAULT_CHUNK_SIZE: usize = 2 << 20;

/// How a [`LazyRegion`](crate::LazyRegion) is built. Start from
/// [`RegionConfig::default`] and change fields.
pub struct RegionConfig {
    /// Bytes fetched and installed per fault: a power of two from the page
    /// size (4 KiB) to 2 MiB... or larger. Default [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: usize,
    /// Fault-handler threads (dedicated OS threads, not async workers).
    /// Default 2, whatever the number of CPUs: one handler can serve a fault
    /// while another waits for a slow store read, and each further handler
    /// polling the userfaultfd is one more thread woken by every fault. With
    /// [`pin_handlers`](Self::pin_handlers) (the default) they are pinned to
    /// the first two CPUs the process may use and all poll: one per CPU on a
    /// 2-CPU machine (the only size measured), while on a larger machine a
    /// fault from another CPU is answered across CPUs. Unpinned, only the
    /// first polls and the others stand by (see
    /// [`standby_after`](Self::standby_after)).
    pub handler_threads: usize,
    /// How long a handler keeps polling its userfaultfd without sleeping
    /// after its last event (adaptive spin-then-block). A sleeping handler
    /// costs a cross-CPU wake-up per fault; a spinning one answers sooner
    /// but burns a CPU, which on 2 CPUs competes with the application (the
    /// faulting thread's p99 becomes the spin window while it waits for the
    /// spinner to give up its CPU). A blocking handler is usually run on the
    /// faulting thread's CPU as soon as that thread blocks, so spinning buys
    /// nothing there: the default is `Duration::ZERO` (block at once).
    /// Figures: `docs/perf.md`.
    pub spin: Duration,
    /// How many of the handler threads spin (the others always block).
    /// Default 1.
    pub spin_threads: usize,
    /// Unpinned handlers only (ignored with [`pin_handlers`](Self::pin_handlers)):
    /// with more than one handler thread, only the first polls the
    /// userfaultfd, and the others stand by until it has been busy with one
    /// fault for this long (a slow or stalled store read), then serve faults
    /// beside it until it is free. Handlers that all poll the userfaultfd
    /// are all woken by every fault, which made unpinned random 4 KiB faults
    /// slower on a loaded 2-CPU machine (`docs/perf.md`). `None`: every
    /// handler polls. Default 1 ms.
    pub standby_after: Option<Duration>,
    /// Pin handler thread `k` to the `k`-th CPU this thread may use
    /// (`sched_setaffinity`; with more handlers than CPUs, round robin).
    /// With the default two handlers that is one per CPU only on a 2-CPU
    /// machine. With one handler per CPU, a fault is always
    /// answered by the handler on the faulting thread's CPU, which runs as
    /// soon as the faulting thread blocks: no cross-CPU wake-up on the fault
    /// path (the other handlers wake too, find no event and sleep again).
    /// Default `true`: pinned, random faults cost about the same on an idle
    /// or a loaded machine; unpinned they are fast while the other CPU is
    /// busy and several times slower when it is idle, because the scheduler
    /// then wakes the handler on the idle CPU, and waking a halted (virtual)
    /// CPU is slow (`docs/perf.md`). Raise
    /// [`handler_threads`](Self::handler_threads) to the number of CPUs the
    /// application faults from to keep this property on larger machines.
    pub pin_handlers: bool,
    /// Private anonymous or shared memfd memory.
    pub backing: Backing,
    /// Advise transparent huge pages (`MADV_HUGEPAGE`) for the region
    /// (anonymous backing): with 2 MiB chunks whole huge pages are moved in.
    /// Default `true`.
    pub huge_pages: bool,
    /// Start the background puller as soon as the region exists. Default
    /// `true`; otherwise call [`start_pull`](crate::LazyRegion::start_pull).
    pub prefetch: bool,
    /// Order of the background pull. Default [`Sequential`].
    pub priority: Box<dyn PullPriority>,
    /// Background puller threads, i.e. chunks the pull keeps in flight at
    /// once (they share one [`PullPriority`]). One is enough for a memory
    /// store; a remote store needs several to cover its round trip.
    /// Default 2; at least 1.
    pub pull_threads: usize,
    /// How long a fault may wait for the store (across retries) before its
    /// chunk is poisoned and the access gets `SIGBUS` (`read_at`/`write_at`
    /// get a [`ChunkError`](crate::ChunkError) instead). Default 30 s.
    ///
    /// This is the one clock of the stack below the region: the store's
    /// reads run in this deadline's [`Retry::scope`](memsync_core::Retry::scope),
    /// so a layer below that retries too (a cache, whose own `fetch_timeout`
    /// then does not apply) keeps retrying until this deadline and no longer,
    /// and the region does not start another round after it. Errors that
    /// retrying cannot help ([`StoreError::is_permanent`](memsync_core::StoreError::is_permanent))
    /// poison at once.
    pub fetch_deadline: Duration,
    /// Poison a chunk the store failed to deliver with `UFFDIO_POISON` when
    /// the kernel offers it (Linux 6.6+; detected from the `UFFDIO_API`
    /// features and the ioctls `UFFDIO_REGISTER` reports for the region).
    /// Without it, or with `false`, the chunk's range is replaced by a
    /// mapping that raises `SIGBUS` on every access (see the crate docs,
    /// "Failed chunks"): the same outcome for the application, at the cost
    /// of a kernel mapping per run of failed chunks. Default `true`; `false`
    /// forces the fallback (for tests of kernels without `UFFDIO_POISON`).
    pub use_poison: bool,
    /// First retry delay after a failed store read; doubles up to 100 ms.
    /// Default 1 ms.
    pub retry_backoff: Duration,
    /// Ask the store for its zero/hole extents once at creation (if it
    /// reports extents) and install zero chunks with `UFFDIO_ZEROPAGE`
    /// without reading them. Default `true`.
    pub zero_detect: bool,
    /// Let [`read_at`](crate::LazyRegion::read_at)/[`write_at`](crate::LazyRegion::write_at)
    /// fetch a missing chunk on the calling thread before touching it,
    /// instead of faulting and waiting for a handler: no fault, no wake-up.
    /// Default `true`. (Raw-pointer accesses always fault.)
    pub inline_resolve: bool,
    /// Install chunks larger than a page with `UFFDIO_MOVE` (falls back to
    /// `UFFDIO_COPY` when the kernel refuses); chunks of one page are always
    /// copied. Default `true`.
    pub use_move: bool,
    /// Open the userfaultfd with `UFFD_USER_MODE_ONLY`: `None` (default)
    /// tries a full userfaultfd first and falls back to user-mode-only when
    /// that is not permitted (unprivileged processes). In user-mode-only
    /// mode, kernel accesses to missing pages (e.g. `read(2)` into the
    /// region) fail with `EFAULT` instead of being served.
    pub user_mode_only: Option<bool>,
    /// With [`runtime`](Self::runtime): how long a fault handler (or an
    /// inline read) spins for the store's answer before it sleeps
    /// ([`memsync_core::exec::block_on`]). A sleeping thread whose CPU went
    /// idle pays a halted-CPU wake-up when the answer comes, so a store that
    /// answers within the spin (a loopback or LAN server) is served much
    /// sooner; a slower store costs at most this much CPU per fetch.
    /// Background pullers never spin. Default 50 µs, chosen with
    /// `memsync bench lazy` (NBD random faults; `docs/perf.md`): a longer
    /// spin gained nothing and raised the p99.
    pub store_spin: Duration,
    /// Which writes the region watches. Default [`WriteTracking::Off`].
    pub write_tracking: WriteTracking,
    /// At most this many bytes resident (rounded down to whole chunks, at
    /// least one): an evictor thread drops chunks beyond it, clean ones
    /// first, and writes dirty ones back to the source first (see
    /// [`ChunkSource::write_back`](crate::ChunkSource::write_back)). Chunks
    /// are then installed write-protected so that their first write is
    /// seen (one fault per chunk). Not with [`WriteTracking::Dirty`].
    /// Change it with [`LazyRegion::set_budget`](crate::LazyRegion::set_budget).
    /// Default `None` (no budget).
    pub budget: Option<usize>,
    /// Ask the kernel for `REMOVE` events (`UFFD_FEATURE_EVENT_REMOVE`), so
    /// that pages dropped by anyone (an application's `MADV_DONTNEED`) are
    /// seen and fetched again on their next touch. Each such drop then waits
    /// in the kernel until a handler thread has read its event, and so does
    /// [`LazyRegion::invalidate`](crate::LazyRegion::invalidate): while every
    /// handler waits on a slow fetch, an invalidation waits for one of them.
    /// `false` when only the driver drops pages (a shared region whose
    /// invalidations must never wait behind faults): `invalidate` then needs
    /// no handler thread, and pages the application drops itself are not
    /// supported (their next touch faults until the chunk is invalidated).
    /// Default `true`.
    pub remove_events: bool,
    /// Run store futures with `Handle::block_on` on this runtime instead of
    /// a small current-thread runtime per handler thread (use it for stores
    /// whose I/O is bound to a particular runtime).
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            handler_threads: 2,
            spin: Duration::ZERO,
            spin_threads: 1,
            standby_after: Some(Duration::from_millis(1)),
            pin_handlers: true,
            backing: Backing::Anonymous,
            huge_pages: true,
            prefetch: true,
            priority: Box::new(Sequential::default()),
            pull_threads: 2,
            fetch_deadline: Duration::from_secs(30),
            use_poison: true,
            retry_backoff: Duration::from_millis(1),
            zero_detect: true,
            inline_resolve: true,
            use_move: true,
            user_mode_only: None,
            write_tracking: WriteTracking::Off,
            budget: None,
            runtime: None,
            remove_events: true,
            store_spin: Duration::from_micros(50),
        }
    }
}

impl std::fmt::Debug for RegionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionConfig")
            .field("chunk_size", &self.chunk_size)
            .field("handler_threads", &self.handler_threads)
            .field("spin", &self.spin)
            .field("spin_threads", &self.spin_threads)
            .field("standby_after", &self.standby_after)
            .field("pin_handlers", &self.pin_handlers)
            .field("backing", &self.backing)
            .field("huge_pages", &self.huge_pages)
            .field("prefetch", &self.prefetch)
            .field("priority", &self.priority)
            .field("pull_threads", &self.pull_threads)
            .field("fetch_deadline", &self.fetch_deadline)
            .field("use_poison", &self.use_poison)
            .field("retry_backoff", &self.retry_backoff)
            .field("zero_detect", &self.zero_detect)
            .field("inline_resolve", &self.inline_resolve)
            .field("use_move", &self.use_move)
            .field("user_mode_only", &self.user_mode_only)
            .field("store_spin", &self.store_spin)
            .field("write_tracking", &self.write_tracking)
            .field("budget", &self.budget)
            .field("remove_events", &self.remove_events)
            .finish_non_exhaustive()
    }
}

/// The longest pause between store reads of one chunk.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

impl RegionConfig {
    /// The source's shared memory for a [`Backing::Shared`] region, checked against the rest of
    /// the configuration.
    pub(crate) fn shared_memory(
        &self,
        source: &dyn ChunkSource,
    ) -> Result<memsync_core::SharedMemory, Error> {
        if self.budget.is_some() || self.write_tracking != WriteTracking::Off {
            return Err(Error::Config(
                "Backing::Shared maps the source's own memory: no budget or write tracking (they \
                 would drop or protect the source's pages)"
                    .into(),
            ));
        }
        let m = source.shared_memory().ok_or_else(|| {
            Error::Config(
                "Backing::Shared needs a source with shared memory (a file: store or a cache \
                 directory on tmpfs)"
                    .into(),
            )
        })?;
        let file_len = m
            .file
            .metadata()
            .map_err(sys("reading the size of the source's shared memory"))?
            .len();
        if file_len < m.offset.saturating_add(source.size()) {
            return Err(Error::Config(format!(
                "the source's shared memory holds {file_len} bytes, fewer than its offset {} plus \
                 its size {}",
                m.offset,
                source.size()
            )));
        }
        Ok(m)
    }

    /// The retry policy of fetches: [`fetch_deadline`](Self::fetch_deadline), backing off from
    /// [`retry_backoff`](Self::retry_backoff) to 100 ms.
    pub(crate) fn retry_policy(&self) -> memsync_core::RetryPolicy {
        memsync_core::RetryPolicy::new(self.fetch_deadline, self.retry_backoff, MAX_BACKOFF)
    }

    /// The page size chunks are installed in (a huge page with
    /// [`Backing::Hugetlb`]), once the chunk size is checked against it.
    pub(crate) fn install_page(&self) -> Result<usize, Error> {
        let page = memsync_sys::page_size();
        let chunk = self.chunk_size;
        if !chunk.is_power_of_two() || chunk < page || chunk > 1 << 30 {
            return Err(Error::Config(format!(
                "chunk size {chunk} must be a power of two from {page} bytes to 1 GiB"
            )));
        }
        if self.backing != Backing::Hugetlb {
            return Ok(page);
        }
        // hugetlb memory is installed in whole huge pages.
        let huge = memsync_sys::pmd_size();
        if chunk < huge {
            return Err(Error::Config(format!(
                "hugetlb regions need chunks of at least one huge page ({huge} bytes), not {chunk}"
            )));
        }
        Ok(huge)
    }

    /// The pull order, for the puller (the rest of the configuration is
    /// still read by the threads it starts).
    pub(crate) fn take_priority(&mut self) -> Box<dyn PullPriority> {
        std::mem::replace(&mut self.priority, Box::new(Sequential::default()))
    }

    /// How long unpinned standby handlers wait before joining in (pinned
    /// handlers each serve their own CPU: all of them poll).
    pub(crate) fn standby(&self) -> Option<Duration> {
        if self.pin_handlers {
            None
        } else {
            self.standby_after
        }
    }
}
