//! Where a missing chunk comes from ([`ChunkSource`]) and what a driver is
//! told about faults ([`FaultHooks`]).
//!
//! Both are consumer-side traits: the region calls them, a driver
//! implements them. Every hook has a no-op default and `()` implements
//! them all, so a region without a driver pays nothing for them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use memsync_core::{Bytes, DynStore, Extent, SharedMemory, StoreError};

/// The future a [`ChunkSource`] returns (boxed, so sources can be trait
/// objects; a [`Store`](memsync_core::Store)'s own future is returned as
/// is).
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where the data of a missing chunk comes from, and where dirty chunks go
/// when the region must drop them.
///
/// The region reads one chunk at a time (`offset` is the chunk's offset,
/// `buf` its data length), retries a failed read with backoff until
/// [`RegionConfig::fetch_deadline`](crate::RegionConfig::fetch_deadline),
/// and never installs partial data. A read may run on several threads at
/// once, for different chunks.
pub trait ChunkSource: Send + Sync + fmt::Debug + 'static {
    /// Bytes of data (the region's length).
    fn size(&self) -> u64;

    /// The source's alignment for reads: chunks must be a multiple of it.
    fn block_size(&self) -> u64 {
        1
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()>;

    /// The extents of `offset..offset + len` (whether they read as zeros),
    /// asked once when the region is created, or `None` if the source does
    /// not know (every chunk is read then).
    fn extents(&self, offset: u64, len: u64) -> Option<SourceFuture<'_, Vec<Extent>>> {
        let _ = (offset, len);
        None
    }

    /// Saves the data of a dirty chunk before the region drops it (the
    /// budget's evictor, [`LazyRegion::evict`](crate::LazyRegion::evict)).
    /// The default refuses: dirty chunks are then kept resident.
    fn write_back(&self, offset: u64, data: Bytes) -> SourceFuture<'_, ()> {
        let _ = (offset, data);
        Box::pin(async { Err(StoreError::Unsupported { op: "write_back" }) })
    }

    /// The memory holding the source's bytes that a [`Backing::Shared`](crate::Backing::Shared)
    /// region maps (see [`Store::shared_memory`](memsync_core::Store::shared_memory)); `None`
    /// by default.
    fn shared_memory(&self) -> Option<SharedMemory> {
        None
    }

    /// Makes `offset..offset + len` resident in [`shared_memory`](Self::shared_memory) (see
    /// [`Store::make_resident`](memsync_core::Store::make_resident)). Retried like a read.
    fn make_resident(&self, offset: u64, len: u64) -> SourceFuture<'_, ()> {
        let _ = (offset, len);
        Box::pin(async {
            Err(StoreError::Unsupported {
                op: "make_resident",
            })
        })
    }
}

/// The [`Store`](memsync_core::Store)-backed source: a missing chunk is read
/// from the store (the behaviour of [`LazyRegion::new`](crate::LazyRegion::new)).
/// Write-back writes to the store.
#[derive(Debug, Clone)]
pub struct StoreSource(pub DynStore);

impl ChunkSource for StoreSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn block_size(&self) -> u64 {
        self.0.caps().block_size.max(1)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
        self.0.read(offset, buf)
    }

    fn extents(&self, offset: u64, len: u64) -> Option<SourceFuture<'_, Vec<Extent>>> {
        self.0.caps().extents.then(|| self.0.extents(offset, len))
    }

    fn write_back(&self, offset: u64, data: Bytes) -> SourceFuture<'_, ()> {
        self.0.write(offset, data)
    }

    fn shared_memory(&self) -> Option<SharedMemory> {
        self.0.shared_memory()
    }

    fn make_resident(&self, offset: u64, len: u64) -> SourceFuture<'_, ()> {
        self.0.make_resident(offset, len)
    }
}

/// What a driver does about a write to a write-protected page
/// ([`FaultHooks::write_protect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WpAction {
    /// Remove the protection from the page's chunk and let the write go
    /// on (the default).
    Unprotect,
    /// Keep the writer waiting: the driver calls
    /// [`LazyRegion::unprotect`](crate::LazyRegion::unprotect) later (e.g.
    /// once it owns the chunk).
    Hold,
}

/// Fault hooks: what a driver is told about the region's faults. Called on
/// a handler thread: return quickly and never touch the region's missing
/// memory from a hook (the handler would wait for itself).
pub trait FaultHooks: Send + Sync + fmt::Debug + 'static {
    /// A fault on chunk `chunk`, which was missing, is about to be served
    /// from the source.
    fn missing(&self, chunk: usize) {
        let _ = chunk;
    }

    /// A MINOR fault on chunk `chunk` (memfd backing: the data is in the
    /// page cache and is mapped again).
    fn minor(&self, chunk: usize) {
        let _ = chunk;
    }

    /// A write hit write-protected chunk `chunk` (see
    /// [`LazyRegion::protect`](crate::LazyRegion::protect)); `addr` is the
    /// faulting page.
    fn write_protect(&self, chunk: usize, addr: usize) -> WpAction {
        let _ = (chunk, addr);
        WpAction::Unprotect
    }

    /// Pages of chunks `chunks` were dropped (`MADV_DONTNEED`/`MADV_REMOVE`,
    /// or [`LazyRegion::invalidate`](crate::LazyRegion::invalidate)).
    fn remove(&self, chunks: std::ops::Range<usize>) {
        let _ = chunks;
    }
}

/// No hooks.
impl FaultHooks for () {}
