//! [`Installer`]: puts pages into the region with one userfaultfd ioctl per
//! run (`UFFDIO_MOVE`, `COPY`, `ZEROPAGE`, `CONTINUE`, `POISON`,
//! `WRITEPROTECT`).
//!
//! It never reads events: when the kernel answers `EAGAIN` (a
//! non-cooperative event such as a `MADV_DONTNEED` is pending) it returns
//! [`Step::Again`] with how far it got, and the caller reads the pending
//! events and calls again from there. `EEXIST` means the page is already
//! there: it is skipped (the caller wakes the range). This keeps the
//! dependencies one way: the fault path uses the installer and the event
//! pump, the installer uses neither.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use memsync_sys::{ContinueMode, CopyMode, Install, MoveMode, Staging, Uffd};

use crate::stats::{RegionStats, inc};

/// How a chunk's pages are installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum How {
    /// `UFFDIO_MOVE` from the staging buffer (the pages move).
    Move,
    /// `UFFDIO_COPY` from the staging buffer.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    Zero,
    /// The data is written into the memfd, then `UFFDIO_CONTINUE` maps it.
    Continue,
}

/// Where an install stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The whole range is installed (or was already there).
    Done,
    /// `EAGAIN`: bytes up to `pos` are done; read the pending events and
    /// call again from `pos`.
    Again { pos: usize },
}

/// The install operations of one region. Cheap to build: it borrows the
/// userfaultfd, the memfd and the counters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Installer<'a> {
    pub(crate) uffd: &'a Uffd,
    pub(crate) memfd: Option<&'a File>,
    pub(crate) page: usize,
    pub(crate) stats: &'a RegionStats,
    /// Cleared when the kernel refuses `UFFDIO_MOVE` for good.
    pub(crate) use_move: &'a AtomicBool,
}

/// The errno values this module matches on (the workspace has no libc
/// dependency outside memsync-sys).
mod libc_errno {
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
    pub const EOPNOTSUPP: i32 = 95;
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Installer<'_> {
    /// For [`How::Continue`]: writes the staged data into the memfd's page
    /// cache at region offset `off` (before the first [`install`](Self::install)).
    pub(crate) fn fill_page_cache(&self, src: &[u8], off: usize) -> io::Result<()> {
        let file = self.memfd.ok_or_else(|| io::Error::other("no memfd"))?;
        file.write_all_at(src, off as u64)
    }

    /// Installs `len` bytes at `dst` from `staging[cur..]` (write-protected
    /// if `wp`), starting `from`
    /// bytes in, without waking the waiters (the caller wakes the range).
    /// Pages that already exist are skipped. A move the kernel refuses
    /// switches `how` to [`How::Copy`] (pages moved before the error exist
    /// and are skipped by the copy).
    pub(crate) fn install(
        &self,
        (staging, cur): (&mut Staging, usize),
        dst: usize,
        len: usize,
        from: usize,
        how: &mut How,
        wp: bool,
    ) -> io::Result<Step> {
        let mut pos = from;
        // MOVE cannot install write-protected pages.
        if wp && *how == How::Move {
            *how = How::Copy;
        }
        let (copy, cont) = if wp {
            (
                CopyMode::DONTWAKE | CopyMode::WP,
                ContinueMode::DONTWAKE | ContinueMode::WP,
            )
        } else {
            (CopyMode::DONTWAKE, ContinueMode::DONTWAKE)
        };
        while pos < len {
            let (d, n) = (dst + pos, len - pos);
            let r = match *how {
                How::Move => staging.move_to(self.uffd, d, cur + pos, n, MoveMode::DONTWAKE),
                How::Copy => staging.copy_to(self.uffd, d, cur + pos, n, copy),
                How::Zero => self.uffd.zeropage(d, n, true),
                How::Continue => self.uffd.continue_range(d, n, cont),
            };
            match r {
                Ok(Install::Done(_)) => {
                    pos = len;
                    match *how {
                        How::Move => inc(&self.stats.installs_move),
                        How::Copy => inc(&self.stats.installs_copy),
                        How::Continue => inc(&self.stats.installs_continue),
                        How::Zero => {}
                    }
                }
                Ok(Install::Exists) => pos += self.page,
                Ok(Install::Again { done }) => {
                    inc(&self.stats.install_retries);
                    return Ok(Step::Again { pos: pos + done });
                }
                // MOVE refuses pages shared since a fork (EBUSY), holes
                // (ENOENT) and unsuitable ranges: copy instead.
                Err(e) if *how == How::Move => {
                    if matches!(
                        errno(&e),
                        libc_errno::EINVAL | libc_errno::ENOTTY | libc_errno::EOPNOTSUPP
                    ) {
                        tracing::warn!(error = %e, "memsync-region: UFFDIO_MOVE unusable, falling back to UFFDIO_COPY");
                        self.use_move.store(false, Ordering::Relaxed);
                    }
                    *how = How::Copy;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Done)
    }

    /// `UFFDIO_CONTINUE` (waking) over `dst..dst + len` from `from`: maps
    /// page-cache pages that are already there (a MINOR fault).
    pub(crate) fn remap(&self, dst: usize, len: usize, from: usize, wp: bool) -> io::Result<Step> {
        let mut pos = from;
        let mode = if wp {
            ContinueMode::WP
        } else {
            ContinueMode::empty()
        };
        while pos < len {
            match self.uffd.continue_range(dst + pos, len - pos, mode)? {
                Install::Done(_) => pos = len,
                Install::Exists => pos += self.page,
                Install::Again { done } => return Ok(Step::Again { pos: pos + done }),
            }
        }
        Ok(Step::Done)
    }

    /// `UFFDIO_POISON` on the missing pages of `dst..dst + len` from `from`
    /// (present ones are skipped), without waking.
    pub(crate) fn poison(&self, dst: usize, len: usize, from: usize) -> io::Result<Step> {
        let mut pos = from;
        while pos < len {
            match self.uffd.poison(dst + pos, len - pos, true)? {
                Install::Done(_) => pos = len,
                Install::Exists => pos += self.page,
                Install::Again { done } => return Ok(Step::Again { pos: pos + done }),
            }
        }
        Ok(Step::Done)
    }

    /// `UFFDIO_WRITEPROTECT` on or off. `EAGAIN` becomes [`Step::Again`]
    /// (from the start: the ioctl reports no progress).
    pub(crate) fn write_protect(&self, dst: usize, len: usize, on: bool) -> io::Result<Step> {
        let r = if on {
            self.uffd.write_protect(dst, len)
        } else {
            self.uffd.write_unprotect(dst, len, false)
        };
        match r {
            Ok(()) => Ok(Step::Done),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Again { pos: 0 }),
            Err(e) => Err(e),
        }
    }
}
