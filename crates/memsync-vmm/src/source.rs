//! [`SnapshotSource`]: guest memory read from a store, with the pages the
//! guest dropped since (balloon) reading as zeros.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use memsync_core::{DynStore, Extent};
use memsync_region::{ChunkSource, SourceFuture};

/// A window `0..size` of a store (the guest memory file's layout) in which
/// the pages marked [`remove`](Self::remove)d read as zeros from then on.
///
/// A page dropped by the guest must not come back with the snapshot's
/// bytes: the region's engine reports every `REMOVE` event here the moment
/// it is read (before any fault read after it is served), and a fault
/// after it reads zeros. One race is left to the kernel's ordering: a
/// fetch whose store read finished before the `REMOVE` was read installs
/// the snapshot's bytes, and if that install lands after the VMM's
/// `madvise` dropped the pages, they stay (for a page that was never
/// installed before, which the guest gave away unread).
#[derive(Debug)]
pub struct SnapshotSource {
    store: DynStore,
    size: u64,
    page: u64,
    removed: Vec<AtomicU64>,
}

impl SnapshotSource {
    /// The first `size` bytes of `store`, with removal tracked per `page`.
    ///
    /// # Errors
    ///
    /// If the store is smaller than `size`, or `page` is not a power of two.
    pub fn new(store: DynStore, size: u64, page: u64) -> Result<Self, crate::Error> {
        if store.size() < size {
            return Err(crate::Error::Protocol(format!(
                "the guest memory is {size} bytes, the store only {}",
                store.size()
            )));
        }
        if !page.is_power_of_two() {
            return Err(crate::Error::Protocol(format!(
                "page size {page} is not a power of two"
            )));
        }
        let pages = size.div_ceil(page);
        Ok(Self {
            store,
            size,
            page,
            removed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// From now on, the pages inside `range` read as zeros (partial pages
    /// at the ends keep their data).
    pub fn remove(&self, range: Range<u64>) {
        let first = range.start.div_ceil(self.page);
        let end = (range.end.min(self.size)) / self.page;
        for p in first..end {
            self.removed[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
        }
    }

    /// Whether the page at `offset` was removed.
    #[must_use]
    pub fn is_removed(&self, offset: u64) -> bool {
        let p = offset / self.page;
        self.removed
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    /// The store behind it.
    #[must_use]
    pub fn store(&self) -> &DynStore {
        &self.store
    }
}

impl ChunkSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.store.caps().block_size.max(1)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            let pages = (offset..offset + len).step_by(self.page as usize);
            let any_removed = pages.clone().any(|o| self.is_removed(o));
            if any_removed && pages.clone().all(|o| self.is_removed(o)) {
                buf.fill(0);
                return Ok(());
            }
            self.store.read(offset, buf).await?;
            if any_removed {
                for o in pages.filter(|&o| self.is_removed(o)) {
                    let s = (o - offset) as usize;
                    let e = (s + self.page as usize).min(buf.len());
                    buf[s..e].fill(0);
                }
            }
            Ok(())
        })
    }

    /// The store's extents, when it reports them (`Caps::extents`): the
    /// region installs the chunks that are entirely zero or hole as zero
    /// pages without reading them. (Removed pages only add zeros, so the
    /// store's zero extents stay true here.)
    fn extents(&self, offset: u64, len: u64) -> Option<SourceFuture<'_, Vec<Extent>>> {
        if !self.store.caps().extents {
            return None;
        }
        let len = len.min(self.size.saturating_sub(offset));
        Some(self.store.extents(offset, len))
    }
}
