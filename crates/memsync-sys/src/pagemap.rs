//! `PAGEMAP_SCAN` (Linux 6.7+): query page categories of an address range,
//! and with [`ScanFlags::WP_MATCHING`] atomically re-arm userfaultfd
//! async write protection of the pages it reports: the kernel's dirty
//! tracking for [`Features::WP_ASYNC`](crate::Features::WP_ASYNC) ranges.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use bitflags::bitflags;

use crate::raw;
use crate::util::cvt;

bitflags! {
    /// `PAGE_IS_*` page categories.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageCategories: u64 {
        /// In a range registered for async write protection.
        const WPALLOWED = 1 << 0;
        /// Written since it was last write-protected (async WP).
        const WRITTEN = 1 << 1;
        /// File backed (including shmem).
        const FILE = 1 << 2;
        /// Present in memory.
        const PRESENT = 1 << 3;
        /// Swapped out.
        const SWAPPED = 1 << 4;
        /// Mapped to the shared zero page.
        const PFNZERO = 1 << 5;
        /// Part of a huge page (THP or hugetlb).
        const HUGE = 1 << 6;
        /// Soft-dirty.
        const SOFT_DIRTY = 1 << 7;
        /// A guard region (`MADV_GUARD_INSTALL`, Linux 6.14+).
        const GUARD = 1 << 8;
    }

    /// `PM_SCAN_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// Write-protect every reported page (re-arm async WP), atomically
        /// with the report.
        const WP_MATCHING = raw::PM_SCAN_WP_MATCHING;
        /// Fail with `EPERM` if the range contains memory not registered for
        /// async write protection.
        const CHECK_WPASYNC = raw::PM_SCAN_CHECK_WPASYNC;
    }
}

const _: () = {
    use linux_raw_sys::general as g;
    assert!(PageCategories::WPALLOWED.bits() == g::PAGE_IS_WPALLOWED as u64);
    assert!(PageCategories::WRITTEN.bits() == g::PAGE_IS_WRITTEN as u64);
    assert!(PageCategories::FILE.bits() == g::PAGE_IS_FILE as u64);
    assert!(PageCategories::PRESENT.bits() == g::PAGE_IS_PRESENT as u64);
    assert!(PageCategories::SWAPPED.bits() == g::PAGE_IS_SWAPPED as u64);
    assert!(PageCategories::PFNZERO.bits() == g::PAGE_IS_PFNZERO as u64);
    assert!(PageCategories::HUGE.bits() == g::PAGE_IS_HUGE as u64);
    assert!(PageCategories::SOFT_DIRTY.bits() == g::PAGE_IS_SOFT_DIRTY as u64);
    assert!(PageCategories::GUARD.bits() == g::PAGE_IS_GUARD as u64);
};

/// One run of pages with the same (reported) categories
/// (`struct page_region`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const _: () = assert!(size_of::<PageRegion>() == size_of::<raw::page_region>());
const _: () = assert!(align_of::<PageRegion>() == align_of::<raw::page_region>());

impl PageRegion {
    /// Start address.
    #[must_use]
    pub fn start(&self) -> usize {
        self.start as usize
    }

    /// End address (exclusive).
    #[must_use]
    pub fn end(&self) -> usize {
        self.end as usize
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }

    /// Whether the region is empty (never for a kernel-reported region).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The categories of the region, restricted to the scan's `return_mask`.
    #[must_use]
    pub fn categories(&self) -> PageCategories {
        PageCategories::from_bits_retain(self.categories)
    }
}

impl fmt::Debug for PageRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PageRegion({:#x}..{:#x}, {:?})",
            self.start,
            self.end,
            self.categories()
        )
    }
}

/// Arguments of [`PagemapScanner::scan`].
///
/// A page matches when `(categories ^ category_inverted) & category_mask ==
/// category_mask` (all of the mask) and, if `category_anyof_mask` is not
/// empty, `(categories ^ category_inverted) & category_anyof_mask` is not
/// empty. Adjacent matching pages with equal `categories & return_mask` are
/// merged into one [`PageRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanArgs {
    /// Start address (page aligned).
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// Scan flags.
    pub flags: ScanFlags,
    /// Categories a page must all have.
    pub category_mask: PageCategories,
    /// Categories to invert before matching (match their absence).
    pub category_inverted: PageCategories,
    /// Categories of which a page must have at least one (ignored if empty).
    pub category_anyof_mask: PageCategories,
    /// Categories reported in [`PageRegion::categories`] (and used to merge
    /// adjacent pages into regions).
    pub return_mask: PageCategories,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: usize,
}

impl ScanArgs {
    /// Scans `start..end` for every page, reporting every category that Linux 6.7 knows, so
    /// not [`PageCategories::GUARD`]: a mask holding a category the kernel does not know fails
    /// the scan with `EINVAL` (6.7–6.13 reject `GUARD`); ask for it explicitly on 6.14+.
    #[must_use]
    pub fn new(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            flags: ScanFlags::empty(),
            category_mask: PageCategories::empty(),
            category_inverted: PageCategories::empty(),
            category_anyof_mask: PageCategories::empty(),
            return_mask: PageCategories::all().difference(PageCategories::GUARD),
            max_pages: 0,
        }
    }

    /// The dirty-tracking scan of an async-WP range: report the pages
    /// written since the last scan and write-protect them again
    /// (`WP_MATCHING | CHECK_WPASYNC`, category and return mask `WRITTEN`).
    #[must_use]
    pub fn written_and_rearm(start: usize, end: usize) -> Self {
        Self {
            flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
            category_mask: PageCategories::WRITTEN,
            return_mask: PageCategories::WRITTEN,
            ..Self::new(start, end)
        }
    }
}

/// The result of [`PagemapScanner::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct ScanResult {
    /// Regions appended to the output vector.
    pub regions: usize,
    /// Where the walk stopped: `end` when the whole range was scanned,
    /// earlier when the output vector or `max_pages` was exhausted (scan
    /// again from here).
    pub walk_end: usize,
}

impl ScanResult {
    /// Whether the whole requested range was walked.
    #[must_use]
    pub fn complete(&self, args: &ScanArgs) -> bool {
        self.walk_end >= args.end
    }
}

/// An open `/proc/PID/pagemap` for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct PagemapScanner {
    file: File,
}

impl AsFd for PagemapScanner {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl PagemapScanner {
    /// Opens `/proc/self/pagemap` (the calling process).
    ///
    /// # Errors
    ///
    /// The `open(2)` error.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Opens `/proc/PID/pagemap` of another process (needs ptrace-read
    /// access to it).
    ///
    /// # Errors
    ///
    /// The `open(2)` error.
    pub fn for_pid(pid: u32) -> io::Result<Self> {
        Ok(Self {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Runs one `PAGEMAP_SCAN`, appending matching regions to `out` (into
    /// its spare capacity; 256 entries are reserved if it has none).
    ///
    /// # Errors
    ///
    /// `EINVAL` for bad arguments (unaligned start, unknown bits); `EPERM` with [`ScanFlags::CHECK_WPASYNC`] on memory
    /// not registered for async write protection; `ENOTTY` before Linux 6.7.
    pub fn scan(&self, args: &ScanArgs, out: &mut Vec<PageRegion>) -> io::Result<ScanResult> {
        if out.capacity() == out.len() {
            out.reserve(256);
        }
        let old_len = out.len();
        let spare = out.spare_capacity_mut();
        let mut arg = raw::pm_scan_arg {
            size: size_of::<raw::pm_scan_arg>() as u64,
            flags: args.flags.bits(),
            start: args.start as u64,
            end: args.end as u64,
            walk_end: 0,
            vec: spare.as_mut_ptr() as u64,
            vec_len: spare.len() as u64,
            max_pages: args.max_pages as u64,
            category_inverted: args.category_inverted.bits(),
            category_mask: args.category_mask.bits(),
            category_anyof_mask: args.category_anyof_mask.bits(),
            return_mask: args.return_mask.bits(),
        };
        let vec_len = spare.len();
        // SAFETY: PAGEMAP_SCAN reads and writes one `pm_scan_arg` (`arg`,
        // exclusively borrowed) and writes at most `vec_len` `page_region`s
        // (layout-identical to `PageRegion`, pinned above) to `vec`, which
        // points at that many spare, exclusively borrowed slots of `out`.
        // Its only other effect, WP_MATCHING, changes write protection (not
        // contents) of pages registered for async WP.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                raw::PAGEMAP_SCAN as libc::Ioctl,
                &raw mut arg,
            )
        };
        let n = usize::try_from(cvt(ret)?).map_err(io::Error::other)?;
        if n > vec_len {
            return Err(io::Error::other(
                "PAGEMAP_SCAN reported more regions than it was given room for",
            ));
        }
        // SAFETY: the kernel initialised the first `n <= vec_len` spare
        // slots with `page_region`s; `PageRegion` is plain data valid for
        // any bit pattern.
        unsafe { out.set_len(old_len + n) };
        Ok(ScanResult {
            regions: n,
            walk_end: arg.walk_end as usize,
        })
    }

    /// Scans the whole range, repeating [`scan`](Self::scan) from `walk_end`
    /// until the walk reaches `end` (so `max_pages` only bounds each call).
    /// A region may be reported in two pieces where one call stopped.
    /// Returns the number of regions appended.
    ///
    /// # Errors
    ///
    /// As for [`scan`](Self::scan).
    pub fn scan_all(&self, args: &ScanArgs, out: &mut Vec<PageRegion>) -> io::Result<usize> {
        let mut args = *args;
        let mut total = 0;
        loop {
            let r = self.scan(&args, out)?;
            total += r.regions;
            if r.walk_end >= args.end || r.walk_end <= args.start {
                return Ok(total);
            }
            args.start = r.walk_end;
        }
    }
}
