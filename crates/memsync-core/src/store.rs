//! The narrow async [`Store`] trait and what a store declares about itself.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::{Result, StoreError};

/// What a store declares about itself. Layers and frontends read these instead of probing, and
/// frontends (NBD, FUSE) advertise exactly these, so they must be truthful.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Caps {
    /// Writes, trims and write-zeroes fail with [`StoreError::ReadOnly`].
    pub read_only: bool,
    /// Every request's offset and length must be a multiple of this (1 = byte-addressable).
    /// Wrap a store whose `block_size > 1` in [`crate::layers::Chunked`] to accept any range.
    pub block_size: u64,
    /// The request size the store handles best (for example its chunk size, or 1 MiB for a file).
    pub preferred_io: u64,
    /// Largest request a caller should send in one call; larger ones are still accepted by
    /// stores that split internally, but this is the size that maps to one backend operation.
    pub max_io: u64,
    /// `trim` discards data (reads of trimmed ranges then return zeros).
    pub trim: bool,
    /// `write_zeroes` is cheaper than writing a buffer of zeros.
    pub fast_zero: bool,
    /// `extents` reports real holes/zero ranges (otherwise it reports one data extent).
    pub extents: bool,
    /// `flush` does real work (data may sit in volatile caches until flushed).
    pub flush: bool,
    /// Several concurrent clients of this store see each other's flushed writes (NBD multi-conn).
    pub multi_conn: bool,
}

impl Caps {
    /// Byte-addressable, writable, no optional operations; a starting point for a store.
    pub const fn basic() -> Self {
        Caps {
            read_only: false,
            block_size: 1,
            preferred_io: 64 * 1024,
            max_io: 32 * 1024 * 1024,
            trim: false,
            fast_zero: false,
            extents: false,
            flush: false,
            multi_conn: true,
        }
    }
}

impl Default for Caps {
    fn default() -> Self {
        Caps::basic()
    }
}

/// What an [`Extent`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated data (may still happen to be zero).
    Data,
    /// Known to read as zeros, but backed by allocated storage.
    Zero,
    /// Unallocated: reads as zeros and takes no space.
    Hole,
}

impl ExtentKind {
    /// Reads of this extent are known to return zeros.
    pub fn reads_zero(self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Hole)
    }
}

/// A contiguous range of a store with one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Memory that holds a store's bytes and that a frontend may map (`MAP_SHARED`) instead of
/// copying them out ([`Store::shared_memory`]): a file on tmpfs, whose pages are shmem, so a
/// userfaultfd region can map them with MINOR faults (`UFFDIO_CONTINUE`) and no copy.
#[derive(Clone, Debug)]
pub struct SharedMemory {
    /// The file (on tmpfs, or a memfd).
    pub file: Arc<std::fs::File>,
    /// The file offset of the store's byte 0 (a multiple of the page size).
    pub offset: u64,
    /// Whether a write through a mapping is a write to the store. When `false`, map it
    /// read-only: the store keeps state about its bytes (a cache's dirty chunks) that a write
    /// through memory would bypass.
    pub writable: bool,
}

/// A fixed-size, byte-addressable resource that memsync moves data to and from.
///
/// Everything in memsync is a `Store`: local memory, files and directories, remote NBD exports,
/// Redis, S3, and the layers (chunking, caching, stats, fault injection) stacked on top of them.
/// Frontends (a userfaultfd region, an NBD export, a FUSE file) expose any `Store`.
///
/// # Contract
/// - `size()` never changes for the life of the value.
/// - Ranges must lie within `0..size()`, otherwise [`StoreError::OutOfRange`]; a zero-length
///   request within bounds succeeds and does nothing.
/// - If `caps().block_size > 1`, offsets and lengths must be multiples of it, otherwise
///   [`StoreError::Misaligned`].
/// - A completed `write` is visible to every later `read` of the same store value. It is durable
///   only after a later `flush` completes.
/// - Concurrent calls are allowed; concurrent writes to overlapping ranges leave one of the
///   written values per byte range a store documents as atomic (at least its `block_size`).
/// - Errors never leave partially written data reported as success.
///
/// # Example
/// ```
/// use memsync_core::{Store, StoreExt};
/// # async fn demo(store: &dyn Store) -> memsync_core::Result<()> {
/// store.write(4096, bytes::Bytes::from_static(b"hello")).await?;
/// let back = store.read_bytes(4096, 5).await?;
/// assert_eq!(&back[..], b"hello");
/// store.flush().await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Size in bytes. Fixed for the life of the store.
    fn size(&self) -> u64;

    /// What the store supports; see [`Caps`].
    fn caps(&self) -> Caps;

    /// The identity recorded when the store was created ([`crate::StoreMeta`]), for stores that
    /// keep one (`dir:`, Redis, S3); layers pass their store's on. Lets a user of the store (a
    /// cache, a sync index) tell whether it is still the store it was set up for.
    fn identity(&self) -> Option<crate::id::StoreId> {
        None
    }

    /// Fill `buf` with the bytes at `offset..offset + buf.len()`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write `data` at `offset`. `Bytes` lets stores and layers keep or split the buffer
    /// without copying it.
    async fn write(&self, offset: u64, data: Bytes) -> Result<()>;

    /// An optional fast path for a caller that only passes a read's bytes on (a server
    /// sending them to a socket): the bytes of `offset..offset + len` as buffers the store
    /// shares instead of copying, in order, their lengths summing to `len`. They are the bytes
    /// `read` would return at this moment and do not change with later writes.
    /// `None` (the default) when the store has no such buffers, or not for this range; the
    /// caller then uses `read`. Errors are `read`'s.
    async fn read_shared(&self, offset: u64, len: u64) -> Option<Result<Vec<Bytes>>> {
        let _ = (offset, len);
        None
    }

    /// Make every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// The session (connection) that answers requests now. A store that reconnects after a
    /// failure (`memsync_cache::Reconnect`) starts a new session each time, and a `flush` in
    /// one session makes durable only the writes completed in that session, unless
    /// `caps().multi_conn` (NBD guarantees nothing more: writes acknowledged on a connection
    /// that died before its flush may be lost). A caller that needs to know takes the session
    /// before each write and after the flush, and writes again what was written in another.
    /// Stores without sessions always return 0; layers forward it.
    fn session(&self) -> u64 {
        0
    }

    /// Discard a range; later reads return zeros. Only if `caps().trim`.
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(StoreError::Unsupported { op: "trim" })
    }

    /// Make a range read as zeros. The default writes zero buffers; stores with
    /// `caps().fast_zero` do better.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), self.caps().block_size, offset, len)?;
        if self.caps().read_only {
            return Err(StoreError::ReadOnly);
        }
        // At most 1 MiB (or one block, if larger) per write, and a multiple of the block size.
        let block = self.caps().block_size.max(1);
        let step = self
            .caps()
            .max_io
            .clamp(block.max(4096), block.max(1 << 20));
        let step = crate::range::align_down(step, block).max(block);
        let zeros = Bytes::from(vec![0u8; step as usize]);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(step);
            self.write(pos, zeros.slice(..n as usize)).await?;
            pos += n;
        }
        Ok(())
    }

    /// Describe `offset..offset + len` as a sorted, gap-free list of extents covering exactly
    /// that range. Stores without `caps().extents` report one data extent.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), 1, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }

    /// The shared memory that holds this store's bytes, if it has one a frontend may map
    /// instead of reading (`None`, the default: read through [`read`](Self::read)). A store
    /// that returns one also implements [`make_resident`](Self::make_resident). Layers that
    /// change bytes on their way (`Inject`, `Chunked`) do not pass it on.
    fn shared_memory(&self) -> Option<SharedMemory> {
        None
    }

    /// Makes the bytes `offset..offset + len` resident in [`shared_memory`](Self::shared_memory):
    /// when it returns `Ok`, every page of the file covering the range is in its page cache and
    /// holds the store's bytes (a store that fetches them from elsewhere, a cache, fetches them
    /// first). The default: [`StoreError::Unsupported`].
    async fn make_resident(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(StoreError::Unsupported {
            op: "make_resident",
        })
    }
}

/// A shared, type-erased store: what URLs open to and what frontends take.
pub type DynStore = Arc<dyn Store>;

#[async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn caps(&self) -> Caps {
        (**self).caps()
    }
    fn identity(&self) -> Option<crate::id::StoreId> {
        (**self).identity()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        (**self).write(offset, data).await
    }
    async fn read_shared(&self, offset: u64, len: u64) -> Option<Result<Vec<Bytes>>> {
        (**self).read_shared(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
    fn session(&self) -> u64 {
        (**self).session()
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        (**self).trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        (**self).extents(offset, len).await
    }
    fn shared_memory(&self) -> Option<SharedMemory> {
        (**self).shared_memory()
    }
    async fn make_resident(&self, offset: u64, len: u64) -> Result<()> {
        (**self).make_resident(offset, len).await
    }
}

/// Conveniences on every store.
#[async_trait]
pub trait StoreExt: Store {
    /// Read `len` bytes into a new buffer.
    async fn read_bytes(&self, offset: u64, len: usize) -> Result<Bytes> {
        let mut buf = BytesMut::zeroed(len);
        self.read(offset, &mut buf).await?;
        Ok(buf.freeze())
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Check that `offset..offset+len` lies within `size` and is aligned to `align`.
///
/// Every store calls this first, so that out-of-range and misaligned requests fail the same way
/// everywhere (and arithmetic overflow in a hostile request cannot wrap).
pub fn check_range(size: u64, align: u64, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if end <= size => {}
        _ => return Err(StoreError::OutOfRange { offset, len, size }),
    }
    if align > 1 && (!offset.is_multiple_of(align) || !len.is_multiple_of(align)) {
        return Err(StoreError::Misaligned { offset, len, align });
    }
    Ok(())
}

/// Check a write-type request: in range, aligned, and the store is writable.
pub fn check_write(caps: &Caps, size: u64, offset: u64, len: u64) -> Result<()> {
    if caps.read_only {
        return Err(StoreError::ReadOnly);
    }
    check_range(size, caps.block_size, offset, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(100, 1, 0, 100).is_ok());
        assert!(check_range(100, 1, 100, 0).is_ok());
        assert!(matches!(
            check_range(100, 1, 50, 51),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(100, 1, u64::MAX, 2),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(8192, 4096, 1, 4095),
            Err(StoreError::Misaligned { .. })
        ));
        assert!(check_range(8192, 4096, 4096, 4096).is_ok());
    }
}
