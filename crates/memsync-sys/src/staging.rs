//! [`Staging`]: a private buffer that a fault handler reads data into and
//! then *moves* into a userfaultfd-registered range (`UFFDIO_MOVE`), so the
//! data is written once and never copied again.

use std::fmt;
use std::io;

use crate::mem::{Advice, MapOptions, Mapping, page_size, pmd_size};
use crate::uffd::{CopyMode, Install, MoveMode, Uffd};

/// A private anonymous buffer handed out as `&mut [u8]` (so a store can
/// read straight into it) whose pages can then be moved into a
/// userfaultfd-registered range with [`move_to`](Self::move_to), or copied
/// with [`copy_to`](Self::copy_to).
///
/// Buffers of at least [`pmd_size`] bytes are aligned to it and advised
/// `MADV_HUGEPAGE`, so that (where transparent huge pages are available)
/// filling one allocates whole huge pages and `UFFDIO_MOVE` moves each with
/// a single page-table update.
///
/// After a move, the moved range of the buffer is empty again: it reads as
/// zeros and its next write allocates fresh pages. This is why moving takes
/// `&mut self`: no slice of the buffer can be alive while its pages go.
///
/// Pages that were present when the process forked are shared copy-on-write
/// with the child until written again, and `UFFDIO_MOVE` refuses shared
/// pages (`EBUSY`): fall back to [`copy_to`](Self::copy_to) then.
pub struct Staging {
    map: Mapping,
}

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging")
            .field("addr", &format_args!("{:#x}", self.map.addr()))
            .field("len", &self.map.len())
            .finish()
    }
}

impl Staging {
    /// Maps a staging buffer of `len` bytes rounded up to whole pages.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero length; the `mmap(2)` error otherwise.
    pub fn new(len: usize) -> io::Result<Self> {
        Self::with_huge_pages(len, len >= pmd_size())
    }

    /// Maps a staging buffer of `len` bytes rounded up to whole pages, with
    /// transparent huge pages advised (`huge`: aligned to [`pmd_size`],
    /// `MADV_HUGEPAGE`) or forbidden (`MADV_NOHUGEPAGE`). Forbid them for a
    /// buffer whose pages are moved out a few at a time: moving part of a
    /// huge page first has to split it.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero length; the `mmap(2)` error otherwise.
    pub fn with_huge_pages(len: usize, huge: bool) -> io::Result<Self> {
        let pmd = pmd_size();
        let align = if huge { pmd } else { page_size() };
        let map = Mapping::anonymous_with(
            len,
            MapOptions {
                align,
                ..MapOptions::default()
            },
        )?;
        // Only a hint: THP may be disabled, then pages stay small.
        let advice = if huge {
            Advice::HugePage
        } else {
            Advice::NoHugePage
        };
        let _ = map.advise(0, map.len(), advice);
        Ok(Self { map })
    }

    /// Pre-faults every page of the buffer writable (`MADV_POPULATE_WRITE`):
    /// allocates (and zeroes) the pages that are missing, e.g. after a move,
    /// so that the next fill of the buffer does not fault. Contents of
    /// present pages are kept. Call it on another thread ahead of time to
    /// take page allocation off a latency-critical path.
    ///
    /// # Errors
    ///
    /// The `madvise(2)` error (`EINVAL` before Linux 5.14, `ENOMEM` when
    /// memory runs out).
    pub fn populate(&mut self) -> io::Result<()> {
        self.map.advise(0, self.map.len(), Advice::PopulateWrite)
    }

    /// Length in bytes (a whole number of pages).
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always `false`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start address of the buffer.
    #[must_use]
    pub fn addr(&self) -> usize {
        self.map.addr()
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the buffer is a private anonymous read-write mapping of
        // `len` bytes owned by `self` alone: it is never registered with a
        // userfaultfd by this type, never shared, and its contents only
        // change through this exclusive borrow or `move_to` (which also
        // takes `&mut self`). So for the borrow's lifetime the bytes behave
        // like an ordinary heap allocation (every byte is initialised: fresh
        // anonymous pages read as zeros).
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }

    /// The whole buffer, read-only.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as for `as_mut_slice`; a shared borrow of `self` excludes
        // every way of changing the contents (they need `&mut self`).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.map.len() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the staging buffer",
            )),
        }
    }

    /// Moves the pages at `offset..offset + len` of the buffer to `dst`
    /// (`UFFDIO_MOVE`), resolving MISSING faults there; that part of the
    /// buffer is empty afterwards. `offset`, `len` and `dst` must be page
    /// aligned; with [`pmd_size`]-aligned `dst`, `offset` and `len`, huge
    /// pages move whole.
    ///
    /// # Errors
    ///
    /// As for [`Uffd::move_pages`] (`EBUSY` for pages shared since a fork:
    /// use [`copy_to`](Self::copy_to) then).
    pub fn move_to(
        &mut self,
        uffd: &Uffd,
        dst: usize,
        offset: usize,
        len: usize,
        mode: MoveMode,
    ) -> io::Result<Install> {
        self.check(offset, len)?;
        uffd.move_pages(dst, &self.map, offset, len, mode)
    }

    /// Copies `offset..offset + len` of the buffer to `dst` (`UFFDIO_COPY`);
    /// the buffer keeps its contents.
    ///
    /// # Errors
    ///
    /// As for [`Uffd::copy`].
    pub fn copy_to(
        &self,
        uffd: &Uffd,
        dst: usize,
        offset: usize,
        len: usize,
        mode: CopyMode,
    ) -> io::Result<Install> {
        self.check(offset, len)?;
        uffd.copy(dst, &self.as_slice()[offset..offset + len], mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_keeps_contents_and_allows_writes() {
        for huge in [false, true] {
            let mut s = Staging::with_huge_pages(4 << 20, huge).unwrap();
            s.as_mut_slice()[..5].copy_from_slice(b"hello");
            s.populate().unwrap();
            assert_eq!(&s.as_slice()[..5], b"hello");
            assert!(s.as_slice()[5..].iter().all(|&b| b == 0));
            let n = s.len();
            s.as_mut_slice()[n - 1] = 7;
            assert_eq!(s.as_slice()[n - 1], 7);
        }
    }
}
