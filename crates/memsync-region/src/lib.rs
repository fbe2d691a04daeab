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
//! pages are skipped and woken; `EAGAIN` drains pending events and retries.
//! A store that fails or stalls is retried with backoff until
//! [`RegionConfig::fetch_deadline`]; then the chunk is poisoned
//! (`UFFDIO_POISON`, the access gets `SIGBUS`) and the error is recorded
//! ([`LazyRegion::last_error`]) and logged. Partial data is never installed.
//!
//! The safe accessors ([`LazyRegion::read_at`], [`LazyRegion::write_at`])
//! avoid the fault altogether: they fetch a missing chunk on the calling
//! thread before touching it, which saves the cross-CPU wake-ups of the
//! fault path.

mod config;
pub mod pull;
mod region;
pub mod state;
mod stats;

pub use config::{Backing, DEFAULT_CHUNK_SIZE, RegionConfig};
pub use memsync_sys::Advice;
pub use pull::{FollowFaults, PullPriority, PullView, Sequential};
pub use region::{ChunkError, Error, LazyRegion, PullProgress};
pub use state::{ChunkBitmap, ChunkMap, ChunkState, Geometry};
pub use stats::{RegionStats, StatsSnapshot};
