//! Lazy memory regions: memory of a store's size that fills itself from the
//! store the first time each chunk is touched (post-copy through
//! userfaultfd), plus a background puller that fills the rest.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memsync_region::{LazyRegion, RegionConfig};
//! # fn demo(store: memsync_core::DynStore) -> Result<(), Box<dyn std::error::Error>> {
//! let region = LazyRegion::new(store, RegionConfig::default())?;
//! let mut buf = [0u8; 16];
//! region.read_at(4096, &mut buf)?; // fetched from the store on first touch
//! region.write_at(0, b"local")?;   // fetched, then written (stays local)
//! println!("{}", region.stats().snapshot());
//! # Ok(()) }
//! ```
//!
//! # How a fault is served
//!
//! The region is registered with a userfaultfd. A touch of a missing page
//! wakes one of the dedicated handler threads (adaptive spin-then-block),
//! which claims the page's chunk in a lock-free state array (so concurrent
//! faults on one chunk fetch it once), reads it from the store into a
//! per-thread staging buffer and installs it with one ioctl: `UFFDIO_MOVE`
//! (anonymous memory; the pages move, nothing is copied), `UFFDIO_COPY` as a
//! fallback, `UFFDIO_ZEROPAGE` for chunks the store reports as zero, or a
//! write into the memfd plus `UFFDIO_CONTINUE` (memfd backing). `EEXIST`
//! pages are skipped and woken; `EAGAIN` reads the pending events (any
//! fault among them is served by the same thread after its install) and
//! retries. A store that fails or stalls is retried with backoff until
//! [`RegionConfig::fetch_deadline`]; then the chunk raises `SIGBUS` (see
//! [Failed chunks](#failed-chunks)) and the error is recorded
//! ([`LazyRegion::last_error`]) and logged. Partial data is never installed.
//!
//! By default two handler threads serve faults, pinned one to each of the
//! first two CPUs the process may use ([`RegionConfig::pin_handlers`],
//! [`RegionConfig::handler_threads`]): on a 2-CPU machine that is one per
//! CPU, so the handler on the faulting thread's CPU runs the moment that
//! thread blocks. Both poll the userfaultfd and each reads one message at
//! a time, so a fault queued behind one whose store read is slow is taken
//! by the other handler. Unpinned, only one handler polls; the others stand
//! by and join in when it has been busy with one fault for
//! [`RegionConfig::standby_after`] (a slow store read), so a fault wakes one
//! thread, which the scheduler usually runs on the faulting thread's CPU the
//! moment that thread blocks. Staging buffers whose pages moved into the
//! region are refilled with fresh pages by a helper thread ahead of time
//! (`MADV_POPULATE_WRITE`), and the background puller fetches the chunks
//! just past the last fault without yielding to it (read-ahead), so a
//! sequential reader's copy, page allocation and installs overlap on both
//! CPUs.
//!
//! # Driving a region
//!
//! The region is an engine that a driver (live migration, a shared region,
//! a memory budget) can steer (the workspace's `ARCHITECTURE.md`, section
//! "The region engine", shows its parts):
//!
//! * [`LazyRegion::with_source`]: missing chunks come from any
//!   [`ChunkSource`] ([`StoreSource`] is the store-backed one), and
//!   [`FaultHooks`] hear about missing, minor, write-protect faults and
//!   removed pages (no-op defaults; `()` has none).
//! * [`LazyRegion::place`] installs data that arrived from elsewhere,
//!   racing safely with faults on the chunk (exactly one of the fetch and
//!   the place installs); [`LazyRegion::invalidate`] drops chunks so that
//!   the next touch fetches them again.
//! * [`LazyRegion::protect`]/[`LazyRegion::unprotect`]
//!   ([`WriteTracking::Protect`]) deliver writes to protected chunks to
//!   [`FaultHooks::write_protect`].
//! * [`LazyRegion::dirty_chunks`] ([`WriteTracking::Dirty`]) and
//!   [`DirtyTracker`] over any mapping: the chunks written since the last
//!   call, read and re-armed in one `PAGEMAP_SCAN`.
//! * [`RegionConfig::budget`]: at most N bytes resident; a clock evictor
//!   drops clean chunks first and writes dirty ones back first.
//!
//! # Failed chunks
//!
//! A chunk the store cannot deliver before the deadline is never read as
//! wrong bytes, and the threads faulting on it do not wait forever: its
//! missing pages are made to raise `SIGBUS`, for good, then the waiting
//! threads are woken and get it.
//!
//! * With `UFFDIO_POISON` (Linux 6.6+; detected from the `UFFDIO_API`
//!   features and the ioctls `UFFDIO_REGISTER` reports for the region, see
//!   [`RegionConfig::use_poison`] and [`LazyRegion::uses_poison`]), the
//!   pages get poison markers.
//! * Without it (e.g. Linux 6.1 LTS), or when it fails, the chunk's range is
//!   replaced (`MAP_FIXED`) by a shared mapping of an empty memfd sealed
//!   against growing ([`memsync_sys::SigbusFile`]): every access lies past
//!   the end of the file, which raises a synchronous `SIGBUS`
//!   (`BUS_ADRERR`, with the faulting address) in whichever thread touches
//!   it, and a kernel access (e.g. `read(2)` into it) fails with `EFAULT`.
//!   The costs: one kernel mapping per run of failed chunks (counted
//!   against `vm.max_map_count`), local writes to pages of the chunk that
//!   were present are dropped with it, and the region does not ask for
//!   `UFFD_FEATURE_EVENT_UNMAP` (with it, that `mmap` would wait until a
//!   handler reads the unmap event, and the handler doing it cannot).
//! * Only if both fail is the chunk left absent: the error is logged and
//!   recorded with `poisoned: false`, and the next access retries the store
//!   with a new deadline.
//!
//! A chunk is [`Poisoned`](ChunkState::Poisoned) only once its pages raise
//! `SIGBUS`; the safe accessors then report it as a [`ChunkError`] without
//! touching it. A poisoned chunk whose pages were dropped since
//! (`MADV_DONTNEED` removes poison markers) is poisoned again on its next
//! fault.
//!
//! Rejected: sending `SIGBUS` to the faulting thread with `tgkill(2)` (the
//! fault message carries its id with `UFFD_FEATURE_THREAD_ID`). That signal
//! is asynchronous (`SI_TKILL`, no address): a `SIGBUS` handler that returns
//! lets the thread fault again, one that inspects the address (JVMs,
//! databases, [`memsync_sys::SigbusResolver`]) is misled, every other
//! thread waiting on the chunk or touching it later needs a signal of its
//! own, and a kernel access is interrupted instead of failing. Retrying
//! until the store answers would leave the faulting thread waiting for as
//! long as the store fails.
//!
//! # `fork()`
//!
//! The region is not inherited: its mapping is `MADV_DONTFORK`, so a child
//! has nothing mapped there (an access raises `SIGSEGV`, a kernel access
//! fails with `EFAULT`). A child that inherited it would read every chunk
//! not fetched yet as zeros, because the child's copy is not registered
//! with the userfaultfd. Serving the child's faults would need
//! `UFFD_FEATURE_EVENT_FORK`, which needs `CAP_SYS_PTRACE`, and makes the
//! forking thread wait inside `fork()`, holding the allocator's locks, until
//! a handler reads the event, while the handlers allocate as they fetch: a
//! `fork()` during a fetch would deadlock. A child that needs the data can
//! map the memfd of a [`Backing::Memfd`] region, or open the store itself.
//!
//! Not used: `UFFD_FEATURE_SIGBUS` (resolving a fault in a `SIGBUS` handler
//! on the faulting thread). Fetching from a [`Store`](memsync_core::Store)
//! runs async Rust that allocates and takes locks, none of it
//! async-signal-safe: a fault taken while the thread holds the allocator's
//! or the store's lock would deadlock in the handler. A sound handler could
//! only install data already in memory with async-signal-safe `ioctl`s and
//! would otherwise have to hand the fault to a handler thread anyway (the
//! cross-CPU path it was meant to avoid, plus signal delivery), and a
//! process-wide `SIGBUS` handler would have to coexist with the
//! application's and with the `SIGBUS` of poisoned chunks. The safe
//! accessors below resolve on the faulting thread without a signal.
//!
//! The experiment [`memsync_sys::SigbusResolver`] measures that alternative
//! (`memsync bench lazy`, case `rand-4k-first-touch`, subject
//! `sigbus-on-thread`; figures in `docs/perf.md`): it `UFFDIO_COPY`s each
//! page from a mapping already holding the data, the best case of a store
//! that answers at once. Resolving on the faulting thread beats the handler
//! threads but stays behind the inline path (the trap, signal delivery and
//! return), and only for data already in memory: any store that must be
//! asked still needs a thread.
//!
//! The safe accessors ([`LazyRegion::read_at`], [`LazyRegion::write_at`])
//! avoid the fault altogether: they fetch a missing chunk on the calling
//! thread before touching it, which saves the cross-CPU wake-ups of the
//! fault path.

mod budget;
mod config;
mod dirty;
mod drive;
mod engine;
mod error;
mod evictor;
mod exec;
mod fault;
mod foreign;
mod installer;
pub mod pull;
mod puller;
mod region;
mod running;
mod source;
pub mod state;
mod stats;
mod worker;

pub use config::{Backing, DEFAULT_CHUNK_SIZE, RegionConfig, WriteTracking};
pub use dirty::DirtyTracker;
pub use error::{ChunkError, Error};
pub use foreign::{ForeignOptions, ForeignRange, ForeignRegion};
pub use memsync_core::chunks::PullProgress;
pub use memsync_sys::Advice;
pub use pull::{FollowFaults, PullPriority, PullView, Sequential};
pub use region::LazyRegion;
pub use source::{ChunkSource, FaultHooks, SourceFuture, StoreSource, WpAction};
pub use state::{ChunkBitmap, ChunkMap, ChunkState, Geometry};
pub use stats::{RegionStats, RegionStatsSnapshot};
