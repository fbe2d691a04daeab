//! [`DirtyTracker`]: which chunks of a mapping were written, from the
//! kernel's async write protection (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+).
//!
//! Every page starts write-protected; the kernel resolves a write to a
//! protected page itself (no event, no handler thread) and marks the page
//! written. [`DirtyTracker::collect`] reads the written pages and protects
//! them again in one `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`, so a write
//! racing with the scan is either reported now or left for the next scan,
//! never lost. The cost to a writer is one minor fault per page on the
//! first write after each scan (see `memsync bench lazy`, case
//! `dirty-tracked-writer`).

use std::io;
use std::ops::Range;

use memsync_core::chunks::ChunkBitmap;
use memsync_sys::{
    Features, Mapping, OpenFlags, PageCategories, PageRegion, PagemapScanner, RegisterMode,
    ScanArgs, ScanFlags, Uffd,
};
use parking_lot::Mutex;

/// Reads and re-arms the written chunks of a range registered for async
/// write protection: a [`LazyRegion`](crate::LazyRegion) with
/// [`WriteTracking::Dirty`](crate::WriteTracking::Dirty) (see
/// [`LazyRegion::dirty_chunks`](crate::LazyRegion::dirty_chunks)), or any
/// [`Mapping`] ([`DirtyTracker::new`]).
#[derive(Debug)]
pub struct DirtyTracker {
    scanner: PagemapScanner,
    start: usize,
    len: usize,
    chunk: usize,
    /// The userfaultfd of a tracker over a plain mapping (the region's own
    /// otherwise). Closing it ends the tracking.
    _uffd: Option<Uffd>,
    out: Mutex<Vec<PageRegion>>,
}

impl DirtyTracker {
    /// Tracks writes to `mapping` in chunks of `chunk` bytes (a power of two,
    /// at least a page): opens a userfaultfd with `WP_ASYNC` (user-mode-only
    /// where a full one is not permitted), registers the mapping for
    /// write protection and protects all of it, so nothing is dirty at
    /// first. The mapping must not be registered with another userfaultfd.
    ///
    /// # Errors
    ///
    /// `Unsupported` on a kernel without `WP_ASYNC` or `PAGEMAP_SCAN`;
    /// `InvalidInput` for a bad chunk size; the system call's error.
    pub fn new(mapping: &Mapping, chunk: usize) -> io::Result<Self> {
        let supported = Uffd::probe_features()?;
        if !supported.contains(Features::WP_ASYNC) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7+)",
            ));
        }
        let open = |user_mode_only| {
            Uffd::open(OpenFlags {
                nonblock: true,
                cloexec: true,
                user_mode_only,
            })
        };
        let uffd = match open(false) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => open(true)?,
            r => r?,
        };
        // WP_ASYNC only: nobody reads this descriptor's events, so it must
        // raise none (no EVENT_REMOVE, no MISSING registration).
        uffd.api(Features::WP_ASYNC)?;
        uffd.register(mapping, RegisterMode::WP)?;
        uffd.write_protect(mapping.addr(), mapping.len())?;
        Self::over(mapping.addr(), mapping.len(), chunk, Some(uffd))
    }

    /// A tracker of `start..start + len`, already registered for async write
    /// protection (by `uffd`, kept open, or by the caller's own).
    pub(crate) fn over(
        start: usize,
        len: usize,
        chunk: usize,
        uffd: Option<Uffd>,
    ) -> io::Result<Self> {
        if !chunk.is_power_of_two() || chunk < memsync_sys::page_size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk size {chunk} must be a power of two of at least a page"),
            ));
        }
        Ok(Self {
            scanner: PagemapScanner::new()?,
            start,
            len,
            chunk,
            _uffd: uffd,
            out: Mutex::new(Vec::with_capacity(256)),
        })
    }

    /// Chunk size of the reported ranges.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// The chunks written since the last call (or since the tracker was
    /// made), one bit per chunk of the range, and re-arms them.
    ///
    /// # Errors
    ///
    /// The `PAGEMAP_SCAN` error (`EPERM` if part of the range is no longer
    /// registered for async write protection).
    pub fn collect_bitmap(&self) -> io::Result<ChunkBitmap> {
        let args = ScanArgs::written_and_rearm(self.start, self.start + self.len);
        self.scan(&args)
    }

    /// The chunks written since the last call, as byte ranges relative to
    /// the start of the range (adjacent chunks merged; the last range ends
    /// at the range's end), and re-arms them in the same scan.
    ///
    /// # Errors
    ///
    /// As for [`collect_bitmap`](Self::collect_bitmap).
    pub fn collect(&self) -> io::Result<Vec<Range<usize>>> {
        Ok(self.ranges(&self.collect_bitmap()?))
    }

    /// Whether any page of `off..off + len` was written since it was last
    /// collected, without re-arming anything (the evictor's question).
    ///
    /// # Errors
    ///
    /// As for [`collect_bitmap`](Self::collect_bitmap).
    pub fn peek(&self, off: usize, len: usize) -> io::Result<bool> {
        let end = (off + len).min(self.len);
        let args = ScanArgs {
            flags: ScanFlags::CHECK_WPASYNC,
            category_mask: PageCategories::WRITTEN,
            return_mask: PageCategories::WRITTEN,
            max_pages: 1,
            ..ScanArgs::new(self.start + off, self.start + end)
        };
        let mut out = self.out.lock();
        out.clear();
        Ok(self.scanner.scan(&args, &mut out)?.regions > 0)
    }

    /// Byte ranges of the set chunks of `bits`.
    #[must_use]
    pub fn ranges(&self, bits: &ChunkBitmap) -> Vec<Range<usize>> {
        bits.runs()
            .map(|r| r.start * self.chunk..(r.end * self.chunk).min(self.len))
            .collect()
    }

    fn scan(&self, args: &ScanArgs) -> io::Result<ChunkBitmap> {
        let mut bits = ChunkBitmap::new(self.len.div_ceil(self.chunk));
        let mut out = self.out.lock();
        out.clear();
        self.scanner.scan_all(args, &mut out)?;
        for r in out.iter() {
            let (s, e) = (r.start() - self.start, r.end() - self.start);
            bits.set_range(s / self.chunk..e.div_ceil(self.chunk));
        }
        Ok(bits)
    }
}
