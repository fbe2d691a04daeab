//! Owned memory mappings, `madvise(2)`, `memfd_create(2)` and page sizes.
//!
//! See [`Mapping`](crate::Mapping#memory-model) for how the memory of a
//! mapping may be accessed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use crate::util::{cvt, cvt_r};

const WORD: usize = size_of::<usize>();

/// The base page size of the system (`sysconf(_SC_PAGESIZE)`), cached.
#[must_use]
pub fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let cached = PAGE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf(3) only reads a configuration value; it has no
    // memory-safety preconditions.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let size = usize::try_from(raw)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096);
    PAGE.store(size, Ordering::Relaxed);
    size
}

/// The PMD ("transparent huge page") size: the unit in which the kernel can
/// map, and `UFFDIO_MOVE` can move, anonymous memory with a single page-table
/// entry. Read from `/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`,
/// falling back to 2 MiB.
#[must_use]
pub fn pmd_size() -> usize {
    static PMD: AtomicUsize = AtomicUsize::new(0);
    let cached = PMD.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let size = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|s| s.is_power_of_two())
        .unwrap_or(2 << 20);
    PMD.store(size, Ordering::Relaxed);
    size
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn round_up(len: usize, to: usize) -> io::Result<usize> {
    debug_assert!(to.is_power_of_two());
    len.checked_add(to - 1)
        .map(|l| l & !(to - 1))
        .ok_or_else(|| invalid("length overflows"))
}

/// How [`Mapping::anonymous_with`] maps memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOptions {
    /// Pre-fault every page (`MAP_POPULATE`, or `MADV_POPULATE_WRITE` for an
    /// aligned mapping).
    pub populate: bool,
    /// Back the mapping with hugetlbfs pages of the default huge page size
    /// (`MAP_HUGETLB`). Fails with `ENOMEM` when no huge pages are reserved
    /// (`vm.nr_hugepages`). The length must be a multiple of the huge page size.
    pub hugetlb: bool,
    /// Alignment of the start address, a power of two; `0` means the page
    /// size. Align to [`pmd_size`] to let the kernel back the mapping with
    /// transparent huge pages and let `UFFDIO_MOVE` move whole huge pages.
    pub align: usize,
}

/// An owned `mmap(2)` region, unmapped on drop. The length is always a
/// whole number of pages.
///
/// # Memory model
///
/// A [`Mapping`] is treated like memory shared with another process: its
/// bytes may change at any time without Rust being told. The kernel changes
/// them when a userfaultfd installs or moves pages, when
/// [`Advice::DontNeed`] or [`Advice::Remove`] drops pages, and other
/// processes or aliases change them when the mapping is shared. Therefore a
/// `Mapping` never hands out `&[u8]` or `&mut [u8]` into its memory. All its
/// safe accessors ([`read_at`](Mapping::read_at),
/// [`write_at`](Mapping::write_at), [`fill`](Mapping::fill)) copy with relaxed
/// atomic loads and stores, so concurrent use from several threads is free
/// of data races: overlapping concurrent accesses give unspecified (possibly
/// torn) bytes, never undefined behaviour.
///
/// Accessing a page can block or kill the process, by design:
///
/// * a missing page of a range registered with a userfaultfd in
///   [`RegisterMode::MISSING`](crate::RegisterMode::MISSING) blocks the accessing
///   thread until a handler resolves the fault (or the userfaultfd is
///   closed);
/// * a write to a write-protected page of a range registered in WP mode blocks
///   until the handler un-protects it;
/// * a page poisoned with [`Uffd::poison`](crate::Uffd::poison), or a page
///   beyond the end of a truncated file, raises `SIGBUS`, which kills the
///   process.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Stands for memory of another process ([`Mapping::placeholder`]).
    placeholder: bool,
    /// Mapped without `PROT_WRITE` ([`Mapping::shared_fd_with`]).
    read_only: bool,
}

// SAFETY: a `Mapping` owns its region exclusively (nothing else unmaps it),
// the region is valid for the whole lifetime of the value no matter which
// thread uses or drops it, and every safe access goes through atomic loads
// and stores, so sharing it between threads cannot cause a data race.
unsafe impl Send for Mapping {}
// SAFETY: see the `Send` impl: `&Mapping` only allows atomic accesses.
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

/// Calls mmap(2) and converts the result.
///
/// # Safety
///
/// If `flags` contains `MAP_FIXED`, `[addr, addr + len)` must be a range
/// that the caller owns and that nothing else uses (it is replaced).
unsafe fn mmap_raw(
    addr: *mut libc::c_void,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> io::Result<NonNull<u8>> {
    // SAFETY: without MAP_FIXED, mmap(2) only creates a new mapping at an
    // address the kernel chooses among unused ones, which cannot affect any
    // existing Rust object; with MAP_FIXED the caller guarantees that the
    // replaced range is theirs to replace.
    let ptr = unsafe { libc::mmap(addr, len, prot, flags, fd, offset) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// Reserves `len` bytes of address space aligned to `align` (inaccessible,
/// uncommitted) and returns its start. The caller owns the reservation and
/// must map over it with `MAP_FIXED` or unmap it.
fn reserve_aligned(len: usize, align: usize) -> io::Result<usize> {
    let total = len
        .checked_add(align)
        .ok_or_else(|| invalid("length overflows"))?;
    // SAFETY: no MAP_FIXED, so this only creates a new, private reservation.
    let raw = unsafe {
        mmap_raw(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?
    };
    let raw = raw.as_ptr() as usize;
    let start = (raw + align - 1) & !(align - 1);
    let head = start - raw;
    let tail = total - head - len;
    if head > 0 {
        // SAFETY: `[raw, start)` is part of the reservation just created by
        // this function, which nothing else knows about.
        unsafe { libc::munmap(raw as *mut libc::c_void, head) };
    }
    if tail > 0 {
        // SAFETY: `[start + len, raw + total)` is the tail of the same
        // private reservation.
        unsafe { libc::munmap((start + len) as *mut libc::c_void, tail) };
    }
    Ok(start)
}

impl Mapping {
    /// Maps `len` bytes (rounded up to whole pages) of private anonymous,
    /// zero-filled, read-write memory.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero length; the `mmap(2)` error otherwise.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::anonymous_with(len, MapOptions::default())
    }

    /// Maps private anonymous memory with [`MapOptions`].
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero length or an alignment that is not a power
    /// of two; the `mmap(2)`/`madvise(2)` error otherwise.
    pub fn anonymous_with(len: usize, opts: MapOptions) -> io::Result<Self> {
        if len == 0 {
            return Err(invalid("zero-length mapping"));
        }
        let page = page_size();
        let len = round_up(len, page)?;
        let align = if opts.align == 0 { page } else { opts.align };
        if !align.is_power_of_two() {
            return Err(invalid("alignment must be a power of two"));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if opts.hugetlb {
            flags |= libc::MAP_HUGETLB;
        }
        if align <= page {
            if opts.populate {
                flags |= libc::MAP_POPULATE;
            }
            // SAFETY: no MAP_FIXED: a fresh mapping that nothing else uses.
            let ptr = unsafe { mmap_raw(std::ptr::null_mut(), len, prot, flags, -1, 0)? };
            return Ok(Self {
                ptr,
                len,
                placeholder: false,
                read_only: false,
            });
        }
        let start = reserve_aligned(len, align)?;
        // SAFETY: `[start, start + len)` is the reservation returned by
        // `reserve_aligned`, owned by this function and used by nothing else;
        // MAP_FIXED atomically replaces it.
        let mapped = unsafe {
            mmap_raw(
                start as *mut libc::c_void,
                len,
                prot,
                flags | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(e) => {
                // SAFETY: the reservation is still ours and unused; release it.
                unsafe { libc::munmap(start as *mut libc::c_void, len) };
                return Err(e);
            }
        };
        let mapping = Self {
            ptr,
            len,
            placeholder: false,
            read_only: false,
        };
        if opts.populate {
            mapping.advise(0, len, Advice::PopulateWrite)?;
        }
        Ok(mapping)
    }

    /// Reserves `len` bytes of address space (private anonymous memory,
    /// `MAP_NORESERVE`, never touched) that stand for memory of another
    /// process, e.g. the guest memory of a VMM whose userfaultfd a handler
    /// received ([`Uffd::with_remap`](crate::Uffd::with_remap) translates
    /// its addresses). Nothing registers or reads it;
    /// [`map_sigbus`](Self::map_sigbus) refuses it, since replacing pages
    /// here would not make the other process's accesses fail.
    ///
    /// # Errors
    ///
    /// As for [`anonymous_with`](Self::anonymous_with).
    pub fn placeholder(len: usize, align: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(invalid("zero-length mapping"));
        }
        let page = page_size();
        let len = round_up(len, page)?;
        let align = align.max(page);
        if !align.is_power_of_two() {
            return Err(invalid("alignment must be a power of two"));
        }
        let start = reserve_aligned(len, align)?;
        // SAFETY: `[start, start + len)` is the reservation returned by
        // `reserve_aligned`, owned by this function and used by nothing else;
        // MAP_FIXED atomically replaces it. MAP_NORESERVE: guest memory may
        // be larger than this host's commit limit, and this is never touched.
        let mapped = unsafe {
            mmap_raw(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        match mapped {
            Ok(ptr) => Ok(Self {
                ptr,
                len,
                placeholder: true,
                read_only: false,
            }),
            Err(e) => {
                // SAFETY: the reservation is still ours and unused; release it.
                unsafe { libc::munmap(start as *mut libc::c_void, len) };
                Err(e)
            }
        }
    }

    /// Whether this is a [`placeholder`](Self::placeholder).
    #[must_use]
    pub fn is_placeholder(&self) -> bool {
        self.placeholder
    }

    /// Maps `len` bytes of `fd` starting at byte `offset` (a multiple of the
    /// page size) as a shared, read-write mapping (`MAP_SHARED`).
    ///
    /// Writes through the mapping go to the file (for a memfd: its shmem page
    /// cache) and are seen by every other mapping of it. Accessing pages
    /// beyond the end of the file raises `SIGBUS`: size the file first, e.g.
    /// with [`ftruncate`].
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero length; the `mmap(2)` error otherwise (e.g.
    /// `EACCES` if `fd` is not open read-write).
    pub fn shared_fd(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Self> {
        Self::shared_fd_with(fd, len, offset, true)
    }

    /// As [`shared_fd`](Self::shared_fd), mapped read-only unless `writable`
    /// (`PROT_READ` only: a write through it raises `SIGSEGV`, and the
    /// descriptor may be read-only). The write accessors must not be used on
    /// a read-only mapping.
    ///
    /// # Errors
    ///
    /// As for [`shared_fd`](Self::shared_fd).
    pub fn shared_fd_with(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
        writable: bool,
    ) -> io::Result<Self> {
        if len == 0 {
            return Err(invalid("zero-length mapping"));
        }
        let len = round_up(len, page_size())?;
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        // SAFETY: no MAP_FIXED: a fresh mapping that nothing else uses. The
        // descriptor is borrowed for the call; the mapping keeps its own
        // reference to the file afterwards.
        let ptr = unsafe {
            mmap_raw(
                std::ptr::null_mut(),
                len,
                if writable {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                },
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )?
        };
        Ok(Self {
            ptr,
            len,
            placeholder: false,
            read_only: !writable,
        })
    }

    /// Whether the mapping was made without `PROT_WRITE`.
    #[must_use]
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Start of the mapping as a raw pointer. Dereferencing it is subject to
    /// the [memory model](Mapping#memory-model) of this type; prefer the safe accessors.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Start address of the mapping (page aligned).
    #[must_use]
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length of the mapping in bytes (a whole number of pages).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: mappings are never empty. Present for API symmetry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address range `addr()..addr() + len()`.
    #[must_use]
    pub fn range(&self) -> std::ops::Range<usize> {
        self.addr()..self.addr() + self.len
    }

    /// Whether `addr` lies inside the mapping.
    #[must_use]
    pub fn contains(&self, addr: usize) -> bool {
        self.range().contains(&addr)
    }

    /// Panics unless `off..off + len` lies inside the mapping.
    #[track_caller]
    fn check(&self, off: usize, len: usize) {
        match off.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => panic!(
                "range {off:#x}+{len:#x} out of bounds of a mapping of {:#x} bytes",
                self.len
            ),
        }
    }

    /// Copies `buf.len()` bytes starting at offset `off` of the mapping into
    /// `buf`.
    ///
    /// May block on a userfaultfd-registered missing page until a handler
    /// resolves it, and raises `SIGBUS` on a poisoned page (see the
    /// [memory model](Mapping#memory-model)).
    ///
    /// # Panics
    ///
    /// If `off..off + buf.len()` is out of bounds.
    #[track_caller]
    pub fn read_at(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        let n = buf.len();
        let mut i = 0;
        while i < n {
            let p = self.as_ptr().wrapping_add(off + i);
            if n - i >= WORD && p.addr().is_multiple_of(WORD) {
                // SAFETY: `p..p + WORD` is in bounds (checked above) of this
                // live read-write mapping and word aligned. Safe code only
                // ever accesses the mapping atomically, so an atomic view of
                // the word cannot race with a non-atomic Rust access.
                let word =
                    unsafe { AtomicUsize::from_ptr(p.cast::<usize>()) }.load(Ordering::Relaxed);
                buf[i..i + WORD].copy_from_slice(&word.to_ne_bytes());
                i += WORD;
            } else {
                // SAFETY: `p` is in bounds of the live mapping; see above.
                buf[i] = unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Relaxed);
                i += 1;
            }
        }
    }

    /// The 8-byte word at offset `off` as an [`AtomicU64`], for atomic
    /// read-modify-write instructions on the mapping (e.g. a counter shared
    /// through a distributed region). An access may block on a missing or
    /// write-protected page, or raise `SIGBUS`, as any access (see the
    /// [memory model](Mapping#memory-model)).
    ///
    /// # Panics
    ///
    /// If `off` is not a multiple of 8 or `off..off + 8` is out of bounds.
    #[track_caller]
    #[must_use]
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert!(
            off.is_multiple_of(8),
            "offset {off:#x} is not 8-byte aligned"
        );
        let p = self.as_ptr().wrapping_add(off);
        // SAFETY: `p..p + 8` is in bounds (checked above) of this live
        // read-write mapping, 8-byte aligned (the mapping is page aligned),
        // and the reference borrows `self`, so it cannot outlive the
        // mapping. Safe code only ever accesses the mapping atomically, so
        // an atomic view of the word cannot race with a non-atomic access.
        unsafe { AtomicU64::from_ptr(p.cast::<u64>()) }
    }

    /// Reads `len` bytes at offset `off` into a new vector; see
    /// [`read_at`](Self::read_at).
    ///
    /// # Panics
    ///
    /// If `off..off + len` is out of bounds.
    #[track_caller]
    #[must_use]
    pub fn read_vec(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_at(off, &mut v);
        v
    }

    /// Stores the bytes produced by `byte_at(i)` / `word_at(i)` at
    /// `off..off + len` with atomic stores.
    #[track_caller]
    fn store(
        &self,
        off: usize,
        len: usize,
        byte_at: impl Fn(usize) -> u8,
        word_at: impl Fn(usize) -> usize,
    ) {
        self.check(off, len);
        assert!(!self.read_only, "write to a read-only mapping");
        let mut i = 0;
        while i < len {
            let p = self.as_ptr().wrapping_add(off + i);
            if len - i >= WORD && p.addr().is_multiple_of(WORD) {
                // SAFETY: `p..p + WORD` is in bounds (checked above) of this
                // live read-write mapping and word aligned; safe code only
                // accesses the mapping atomically (see `read_at`).
                unsafe { AtomicUsize::from_ptr(p.cast::<usize>()) }
                    .store(word_at(i), Ordering::Relaxed);
                i += WORD;
            } else {
                // SAFETY: `p` is in bounds of the live mapping; see above.
                unsafe { AtomicU8::from_ptr(p) }.store(byte_at(i), Ordering::Relaxed);
                i += 1;
            }
        }
    }

    /// Copies `data` into the mapping at offset `off`.
    ///
    /// Takes `&self`: the mapping is shared memory (see the
    /// [memory model](Mapping#memory-model)). May block on a registered missing or
    /// write-protected page, and raises `SIGBUS` on a poisoned page.
    ///
    /// # Panics
    ///
    /// If `off..off + data.len()` is out of bounds, or the mapping is
    /// read-only.
    #[track_caller]
    pub fn write_at(&self, off: usize, data: &[u8]) {
        self.store(
            off,
            data.len(),
            |i| data[i],
            |i| {
                let mut word = [0u8; WORD];
                word.copy_from_slice(&data[i..i + WORD]);
                usize::from_ne_bytes(word)
            },
        );
    }

    /// Sets `len` bytes at offset `off` to `byte`. Blocks and faults like
    /// [`write_at`](Self::write_at).
    ///
    /// # Panics
    ///
    /// If `off..off + len` is out of bounds.
    #[track_caller]
    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        let word = usize::from_ne_bytes([byte; WORD]);
        self.store(off, len, |_| byte, |_| word);
    }

    /// `madvise(2)` on `off..off + len` of this mapping (`off` page aligned).
    ///
    /// Safe for every [`Advice`]: the destructive ones only change the bytes
    /// of this mapping, which its [memory model](Mapping#memory-model) allows. With a
    /// userfaultfd registered with [`Features::EVENT_REMOVE`](crate::Features::EVENT_REMOVE),
    /// `DontNeed` and `Remove` block until the handler reads the
    /// [`Event::Remove`](crate::Event::Remove).
    ///
    /// # Errors
    ///
    /// The `madvise(2)` error (`EINVAL` for an unaligned offset or advice the
    /// mapping does not support).
    ///
    /// # Panics
    ///
    /// If `off..off + len` is out of bounds.
    #[track_caller]
    pub fn advise(&self, off: usize, len: usize, advice: Advice) -> io::Result<()> {
        self.check(off, len);
        // SAFETY: the range lies inside this mapping, whose contents Rust
        // never assumes to be stable (see the module docs), so discarding or
        // populating its pages cannot invalidate any reference.
        unsafe { madvise(self.as_ptr().add(off), len, advice) }
    }

    /// Writes the dirty pages of a shared file mapping in `off..off + len`
    /// back to the file and waits for it (`msync(2)` with `MS_SYNC`), e.g.
    /// to hand writes through the mapping of a FUSE file to its server.
    ///
    /// # Errors
    ///
    /// The `msync(2)` error (`EINVAL` for an unaligned offset, `EIO` when
    /// the write-back failed).
    ///
    /// # Panics
    ///
    /// If `off..off + len` is out of bounds.
    #[track_caller]
    pub fn sync(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len);
        // SAFETY: the range lies inside this mapping; msync(2) only writes
        // its pages back to the file and changes no memory.
        cvt_r(|| unsafe { libc::msync(self.as_ptr().add(off).cast(), len, libc::MS_SYNC) })
            .map(drop)
    }

    /// Moves the mapping to a new address (`mremap(2)` with
    /// `MREMAP_MAYMOVE | MREMAP_FIXED`), keeping its contents. With a
    /// userfaultfd registered with [`Features::EVENT_REMAP`](crate::Features::EVENT_REMAP)
    /// this blocks until the handler reads the [`Event::Remap`](crate::Event::Remap),
    /// and the registration moves along; without it, the registration is
    /// dropped for the moved range.
    ///
    /// # Errors
    ///
    /// The `mmap(2)`/`mremap(2)` error; the mapping is unchanged then.
    pub fn relocate(&mut self) -> io::Result<()> {
        let target = reserve_aligned(self.len, page_size())?;
        // SAFETY: the source is this mapping, exclusively borrowed so no
        // other Rust code is using it; the target is the private reservation
        // just made, which MREMAP_FIXED replaces.
        let ret = unsafe {
            libc::mremap(
                self.as_ptr().cast(),
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut libc::c_void,
            )
        };
        if ret == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: the reservation is still ours and unused.
            unsafe { libc::munmap(target as *mut libc::c_void, self.len) };
            return Err(err);
        }
        self.ptr = NonNull::new(ret.cast::<u8>())
            .ok_or_else(|| io::Error::other("mremap returned NULL"))?;
        Ok(())
    }

    /// Makes every access to `off..off + len` raise `SIGBUS` from now on, by
    /// mapping `file` over the range (`MAP_FIXED | MAP_SHARED`, read-write,
    /// at file offset `off`, so that neighbouring ranges given the same file
    /// merge into one kernel mapping). The pages that were there are
    /// dropped.
    ///
    /// The range stops being registered with any userfaultfd. A thread
    /// blocked on a fault there keeps waiting until it is woken
    /// ([`Uffd::wake`](crate::Uffd::wake) still works on the range), then
    /// faults again and gets the `SIGBUS`. If the range is registered with a
    /// userfaultfd that has [`Features::EVENT_UNMAP`](crate::Features::EVENT_UNMAP),
    /// this call blocks until a handler reads the resulting
    /// [`Event::Unmap`](crate::Event::Unmap).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a range that is not page aligned; the `mmap(2)`
    /// error otherwise (`ENOMEM` when the process has reached
    /// `vm.max_map_count` mappings). After an error the range is unchanged,
    /// or on kernels before 6.12 possibly unmapped (accesses then raise
    /// `SIGSEGV`).
    ///
    /// # Panics
    ///
    /// If `off..off + len` is out of bounds.
    #[track_caller]
    pub fn map_sigbus(&self, off: usize, len: usize, file: &SigbusFile) -> io::Result<()> {
        self.check(off, len);
        if self.placeholder {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a placeholder stands for another process's memory: a SIGBUS mapping here would not reach it",
            ));
        }
        let page = page_size();
        if !off.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
            return Err(invalid("range to map over is not page aligned"));
        }
        let offset = libc::off_t::try_from(off).map_err(|_| invalid("offset too large"))?;
        // SAFETY: the range lies inside this mapping, which owns it, and
        // whose contents Rust never assumes to be stable (see the memory
        // model): replacing its pages cannot invalidate any reference. The
        // mapping's `Drop` unmaps the whole range, the new part included.
        unsafe {
            mmap_raw(
                self.as_ptr().add(off).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.fd.as_raw_fd(),
                offset,
            )
        }
        .map(drop)
    }
}

/// An empty memfd sealed against growing (`F_SEAL_GROW`): every page of a
/// shared mapping of it lies past the end of the file, for good, so any
/// access raises a synchronous `SIGBUS` (`BUS_ADRERR`, with the address) in
/// the accessing thread, and a kernel access (e.g. `read(2)` into it) fails
/// with `EFAULT`. Map it over a range with [`Mapping::map_sigbus`]; the
/// mappings keep the file alive, this value can be dropped.
#[derive(Debug)]
pub struct SigbusFile {
    fd: OwnedFd,
}

impl SigbusFile {
    /// Creates the file.
    ///
    /// # Errors
    ///
    /// The `memfd_create(2)` or `fcntl(2)` error.
    pub fn new() -> io::Result<Self> {
        let fd = memfd_create(
            "memsync-sigbus",
            MemfdFlags {
                allow_sealing: true,
                ..MemfdFlags::default()
            },
        )?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on an open descriptor this function owns takes
        // an integer argument and touches no memory of the caller.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
        Ok(Self { fd })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the region was mapped by this value, is owned by it alone,
        // and no reference into it can outlive `self` (none is ever handed
        // out). A failure cannot be reported from drop and would only leak.
        unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
    }
}

/// Advice for [`Mapping::advise`] and [`madvise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages. Private anonymous memory reads back
    /// as zeros (or raises a userfault when registered); shared memory keeps
    /// its file contents.
    DontNeed,
    /// `MADV_REMOVE`: free the backing store of a shared mapping (punch a
    /// hole); the range reads back as zeros for every mapper.
    Remove,
    /// `MADV_HUGEPAGE`: allow transparent huge pages.
    HugePage,
    /// `MADV_NOHUGEPAGE`: forbid transparent huge pages.
    NoHugePage,
    /// `MADV_POPULATE_READ` (Linux 5.14+): pre-fault readable.
    PopulateRead,
    /// `MADV_POPULATE_WRITE` (Linux 5.14+): pre-fault writable.
    PopulateWrite,
    /// `MADV_WILLNEED`: read ahead.
    WillNeed,
    /// `MADV_DONTFORK`: a child created by `fork(2)` gets nothing mapped
    /// here (an access faults with `SIGSEGV`, a kernel access with
    /// `EFAULT`) instead of a copy of the range.
    DontFork,
    /// `MADV_DOFORK`: undo [`DontFork`](Self::DontFork).
    DoFork,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Self::DontNeed => libc::MADV_DONTNEED,
            Self::Remove => libc::MADV_REMOVE,
            Self::HugePage => libc::MADV_HUGEPAGE,
            Self::NoHugePage => libc::MADV_NOHUGEPAGE,
            Self::PopulateRead => libc::MADV_POPULATE_READ,
            Self::PopulateWrite => libc::MADV_POPULATE_WRITE,
            Self::WillNeed => libc::MADV_WILLNEED,
            Self::DontFork => libc::MADV_DONTFORK,
            Self::DoFork => libc::MADV_DOFORK,
        }
    }

    /// Whether the advice can change the contents of the range
    /// ([`DontNeed`](Self::DontNeed), [`Remove`](Self::Remove)).
    #[must_use]
    pub fn is_destructive(self) -> bool {
        matches!(self, Self::DontNeed | Self::Remove)
    }
}

/// `madvise(2)` on an arbitrary range.
///
/// # Safety
///
/// For a [destructive](Advice::is_destructive) advice, the range may change
/// contents under any Rust reference or allocation covering it: the caller
/// must ensure that no live reference, allocation or value relies on the
/// contents of `[addr, addr + len)` (e.g. it is part of a [`Mapping`], whose
/// contents are never assumed stable). The other advices do not change
/// contents and have no further requirement.
///
/// # Errors
///
/// The `madvise(2)` error.
pub unsafe fn madvise(addr: *mut u8, len: usize, advice: Advice) -> io::Result<()> {
    // SAFETY: madvise(2) validates the range itself (EINVAL/ENOMEM for
    // unaligned or unmapped addresses); the only memory effect is on the
    // contents of the range, which the caller vouches for.
    cvt_r(|| unsafe { libc::madvise(addr.cast(), len, advice.raw()) }).map(drop)
}

/// Flags for [`memfd_create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemfdFlags {
    /// `MFD_CLOEXEC` (default `true`).
    pub cloexec: bool,
    /// `MFD_HUGETLB`: back the file with hugetlbfs pages.
    pub hugetlb: bool,
    /// `MFD_ALLOW_SEALING`.
    pub allow_sealing: bool,
}

impl Default for MemfdFlags {
    fn default() -> Self {
        Self {
            cloexec: true,
            hugetlb: false,
            allow_sealing: false,
        }
    }
}

/// Creates an anonymous shmem file (`memfd_create(2)`) of size zero.
///
/// # Errors
///
/// `InvalidInput` if `name` contains a NUL byte; the syscall's error
/// otherwise.
pub fn memfd_create(name: &str, flags: MemfdFlags) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| invalid("memfd name contains a NUL byte"))?;
    let mut raw = 0;
    if flags.cloexec {
        raw |= libc::MFD_CLOEXEC;
    }
    if flags.hugetlb {
        raw |= libc::MFD_HUGETLB;
    }
    if flags.allow_sealing {
        raw |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), raw) })?;
    // SAFETY: memfd_create just returned this new descriptor, which nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the size of the file behind `fd` (`ftruncate(2)`).
///
/// # Errors
///
/// The syscall's error (`InvalidInput` for a size beyond `off_t`).
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| invalid("size too large"))?;
    // SAFETY: ftruncate(2) on a borrowed, open descriptor has no
    // memory-safety preconditions (shrinking a mapped file makes accesses
    // past its end raise SIGBUS, which is documented, not undefined).
    cvt_r(|| unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_fill_unaligned() {
        let m = Mapping::anonymous(3 * page_size()).unwrap();
        assert_eq!(m.len(), 3 * page_size());
        assert_eq!(m.addr() % page_size(), 0);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_at(4093, &data);
        assert_eq!(m.read_vec(4093, 1000), data);
        assert_eq!(m.read_vec(4092, 1), [0]);
        m.fill(5, 19, 0xAB);
        assert_eq!(
            m.read_vec(4, 21),
            [[0].as_slice(), &[0xAB; 19], &[0]].concat()
        );
        m.fill(m.len() - 1, 1, 1);
        assert_eq!(m.read_vec(m.len() - 1, 1), [1]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_panics() {
        let m = Mapping::anonymous(1).unwrap();
        m.write_at(m.len() - 1, &[1, 2]);
    }

    #[test]
    fn aligned_and_populated() {
        let align = 2 << 20;
        let m = Mapping::anonymous_with(
            align,
            MapOptions {
                populate: true,
                align,
                ..MapOptions::default()
            },
        )
        .unwrap();
        assert_eq!(m.addr() % align, 0);
        m.advise(0, m.len(), Advice::HugePage).unwrap();
        m.write_at(align - 3, &[1, 2, 3]);
        m.advise(0, m.len(), Advice::DontNeed).unwrap();
        assert_eq!(m.read_vec(align - 3, 3), [0, 0, 0]);
    }

    #[test]
    fn hugetlb_mapping() {
        let _pages = match memsync_testkit::hugepages::HugePages::reserve(1) {
            Ok(g) => g,
            Err(why) => {
                memsync_testkit::skip::skip("hugetlb_mapping", &why);
                return;
            }
        };
        let huge = 2 << 20;
        let opts = MapOptions {
            hugetlb: true,
            ..MapOptions::default()
        };
        let m = Mapping::anonymous_with(huge, opts).expect("a reserved huge page");
        m.write_at(huge - 1, &[9]);
        assert_eq!(m.read_vec(huge - 1, 1), [9]);
    }

    #[test]
    fn relocate_keeps_contents() {
        let mut m = Mapping::anonymous(2 * page_size()).unwrap();
        m.write_at(100, b"hello");
        let old = m.addr();
        m.relocate().unwrap();
        assert_ne!(m.addr(), old);
        assert_eq!(m.read_vec(100, 5), b"hello");
    }

    #[test]
    fn memfd_shared_aliases() {
        let fd = memfd_create("memsync-test", MemfdFlags::default()).unwrap();
        ftruncate(fd.as_fd(), page_size() as u64).unwrap();
        let a = Mapping::shared_fd(fd.as_fd(), page_size(), 0).unwrap();
        let b = Mapping::shared_fd(fd.as_fd(), page_size(), 0).unwrap();
        a.write_at(10, b"alias");
        assert_eq!(b.read_vec(10, 5), b"alias");
        assert!(memfd_create("a\0b", MemfdFlags::default()).is_err());
    }

    use std::os::fd::AsFd;
}
