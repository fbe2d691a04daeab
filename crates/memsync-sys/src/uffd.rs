//! userfaultfd(2): creation, the API handshake, registration, the resolving
//! ("install") ioctls and event messages.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;
use std::time::Duration;

use bitflags::bitflags;

use crate::mem::Mapping;
use crate::raw;
use crate::util::{cvt, cvt_r, poll_one};

bitflags! {
    /// `UFFD_FEATURE_*`: optional behaviours negotiated by [`Uffd::api`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Report `UFFD_PAGEFAULT_FLAG_WP` in write-protect fault messages.
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// Deliver [`Event::Fork`] (needs `CAP_SYS_PTRACE`).
        const EVENT_FORK = 1 << 1;
        /// Deliver [`Event::Remap`] on `mremap(2)` (and keep the registration).
        const EVENT_REMAP = 1 << 2;
        /// Deliver [`Event::Remove`] on `MADV_DONTNEED`/`MADV_REMOVE`.
        const EVENT_REMOVE = 1 << 3;
        /// Allow MISSING registration of hugetlbfs mappings.
        const MISSING_HUGETLBFS = 1 << 4;
        /// Allow MISSING registration of shmem mappings (memfd, `MAP_SHARED|MAP_ANONYMOUS`).
        const MISSING_SHMEM = 1 << 5;
        /// Deliver [`Event::Unmap`] on `munmap(2)`.
        const EVENT_UNMAP = 1 << 6;
        /// Raise `SIGBUS` instead of delivering MISSING faults.
        const SIGBUS = 1 << 7;
        /// Report the faulting thread id in [`Event::PageFault`].
        const THREAD_ID = 1 << 8;
        /// Allow MINOR registration of hugetlbfs mappings.
        const MINOR_HUGETLBFS = 1 << 9;
        /// Allow MINOR registration of shmem mappings.
        const MINOR_SHMEM = 1 << 10;
        /// Report the exact faulting address instead of the page start.
        const EXACT_ADDRESS = 1 << 11;
        /// Allow WP registration of hugetlbfs and shmem mappings.
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// Write-protect unpopulated pages too (PTE markers).
        const WP_UNPOPULATED = 1 << 13;
        /// `UFFDIO_POISON` is available.
        const POISON = 1 << 14;
        /// Resolve WP faults in the kernel (dirty tracking via `PAGEMAP_SCAN`).
        const WP_ASYNC = 1 << 15;
        /// `UFFDIO_MOVE` is available.
        const MOVE = 1 << 16;
    }

    /// A bit mask of the ioctls the kernel supports, as returned by
    /// `UFFDIO_API` (for the descriptor) and `UFFDIO_REGISTER` (for the range).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << raw::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << raw::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << raw::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << raw::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << raw::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << raw::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << raw::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << raw::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << raw::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << raw::_UFFDIO_API;
    }

    /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are delivered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RegisterMode: u64 {
        /// Faults on missing pages (anonymous: never touched or dropped;
        /// shmem: holes).
        const MISSING = raw::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to pages write-protected with [`Uffd::write_protect`].
        const WP = raw::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped
        /// (shmem/hugetlbfs), resolved with [`Uffd::continue_range`].
        const MINOR = raw::UFFDIO_REGISTER_MODE_MINOR;
    }

    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the threads waiting on the range (wake them later
        /// with [`Uffd::wake`]).
        const DONTWAKE = raw::UFFDIO_COPY_MODE_DONTWAKE;
        /// Install the pages write-protected (range registered with WP).
        const WP = raw::UFFDIO_COPY_MODE_WP;
    }

    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = raw::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Skip source holes instead of failing with `ENOENT`; the matching
        /// destination pages stay missing.
        const ALLOW_SRC_HOLES = raw::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }

    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = raw::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map the pages write-protected.
        const WP = raw::UFFDIO_CONTINUE_MODE_WP;
    }

    /// `UFFD_PAGEFAULT_FLAG_*` of a [`Event::PageFault`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageFaultFlags: u64 {
        /// The access was a write.
        const WRITE = raw::UFFD_PAGEFAULT_FLAG_WRITE;
        /// A write hit a write-protected page (WP mode).
        const WP = raw::UFFD_PAGEFAULT_FLAG_WP;
        /// A MINOR fault (page in the page cache but not mapped).
        const MINOR = raw::UFFD_PAGEFAULT_FLAG_MINOR;
    }
}

/// How [`Uffd::open`] creates the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFlags {
    /// `O_NONBLOCK` (default `true`): [`Uffd::read_events`] returns `Ok(0)`
    /// instead of blocking when no message is pending. Needed for
    /// [`Uffd::poll_readable`] and timeouts in [`Uffd::next_event`]: the
    /// kernel answers `poll(2)` on a *blocking* userfaultfd with `POLLERR`,
    /// because a pending fault can be resolved (by another thread) between
    /// the poll and the read, which would then block.
    pub nonblock: bool,
    /// `O_CLOEXEC` (default `true`).
    pub cloexec: bool,
    /// `UFFD_USER_MODE_ONLY`: only faults raised by user-mode accesses are
    /// delivered; a kernel access (e.g. `read(2)` into a missing page) fails
    /// with `EFAULT` instead. This is what lets an unprivileged process use
    /// the `userfaultfd(2)` syscall when `vm.unprivileged_userfaultfd = 0`.
    pub user_mode_only: bool,
}

impl Default for OpenFlags {
    fn default() -> Self {
        Self {
            nonblock: true,
            cloexec: true,
            user_mode_only: false,
        }
    }
}

impl OpenFlags {
    fn raw(self) -> libc::c_int {
        let mut f = 0;
        if self.nonblock {
            f |= libc::O_NONBLOCK;
        }
        if self.cloexec {
            f |= libc::O_CLOEXEC;
        }
        if self.user_mode_only {
            f |= raw::UFFD_USER_MODE_ONLY as libc::c_int;
        }
        f
    }
}

/// Both failures of [`Uffd::open`]; the payload of the returned
/// [`io::Error`] (reach it with [`io::Error::get_ref`] and downcast).
#[derive(Debug)]
pub struct OpenError {
    /// Why `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` failed.
    pub device: io::Error,
    /// Why the `userfaultfd(2)` syscall failed.
    pub syscall: io::Error,
    /// Whether `UFFD_USER_MODE_ONLY` was requested.
    pub user_mode_only: bool,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot create a userfaultfd: /dev/userfaultfd: {}; userfaultfd(2) syscall: {}",
            self.device, self.syscall
        )?;
        match self.syscall.raw_os_error() {
            Some(libc::EPERM) if !self.user_mode_only => write!(
                f,
                " (hint: with vm.unprivileged_userfaultfd = 0 an unprivileged process needs \
                 UFFD_USER_MODE_ONLY (OpenFlags::user_mode_only, Uffd::new_user_mode), \
                 CAP_SYS_PTRACE, read-write access to /dev/userfaultfd, or \
                 `sysctl vm.unprivileged_userfaultfd=1`)"
            ),
            Some(libc::EPERM) => {
                write!(
                    f,
                    " (hint: check the vm.unprivileged_userfaultfd sysctl and seccomp filters)"
                )
            }
            Some(libc::ENOSYS) => write!(f, " (hint: the kernel lacks CONFIG_USERFAULTFD)"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.syscall)
    }
}

/// The result of [`Uffd::api`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature this kernel supports (not only the requested ones).
    pub supported: Features,
    /// The features now enabled on the descriptor: the requested ones, plus
    /// [`Features::WP_UNPOPULATED`] which the kernel implies for
    /// [`Features::WP_ASYNC`].
    pub enabled: Features,
    /// The ioctls available on the descriptor itself.
    pub ioctls: Ioctls,
}

/// Outcome of a resolving ("install") ioctl: `UFFDIO_COPY`, `ZEROPAGE`,
/// `MOVE`, `CONTINUE` and `POISON`.
///
/// The kernel reports progress in the struct's count field (`copy`,
/// `zeropage`, `move`, `mapped`, `updated`): a byte count, or `-errno`.
/// This type maps it as follows; every other errno is returned as an
/// [`io::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Install {
    /// The whole range was installed (the byte count) and, unless
    /// `DONTWAKE` was given, the waiting threads were woken.
    Done(usize),
    /// `EEXIST`: the first page of the range is already present (another
    /// handler, or an earlier call, resolved it). Nothing was installed.
    /// Threads may still wait on it: call [`Uffd::wake`] on the range.
    Exists,
    /// `EAGAIN`: stopped after `done` bytes (possibly 0), which were
    /// installed and woken. Either the address space is changing (a
    /// non-cooperative event such as [`Event::Remove`] is pending: read the
    /// events, then retry) or a later page of the range already exists
    /// (retrying the rest from `dst + done` will report
    /// [`Exists`](Self::Exists)).
    Again {
        /// Bytes installed before stopping.
        done: usize,
    },
}

impl Install {
    fn from_ioctl(ret: io::Result<()>, count: i64, len: usize) -> io::Result<Self> {
        let done = usize::try_from(count).unwrap_or(0);
        match ret {
            Ok(()) => Ok(Self::Done(if done == 0 { len } else { done })),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) if done == 0 => Ok(Self::Exists),
                Some(libc::EEXIST | libc::EAGAIN) => Ok(Self::Again { done }),
                _ => Err(e),
            },
        }
    }

    /// Whether the whole range was installed.
    #[must_use]
    pub fn is_done(self) -> bool {
        matches!(self, Self::Done(_))
    }
}

/// An owned userfaultfd.
///
/// All ioctls take `&self` and are thread-safe, so a `Uffd` can be shared
/// (e.g. in an `Arc`) between a fault-handler thread and the threads that
/// register ranges. Dropping it closes the descriptor, which unregisters all
/// its ranges and wakes every thread still waiting on a fault (their faults
/// then resolve as if no userfaultfd existed).
///
/// # Addresses
///
/// Addresses and lengths are plain `usize`s and must be page aligned (the
/// kernel answers `EINVAL` otherwise). The ioctls that take them are safe
/// because the kernel only acts on ranges registered with *this*
/// userfaultfd, and in the calling process a range can only be registered
/// through [`register`](Self::register) (a [`Mapping`], whose contents Rust
/// never assumes stable) or the `unsafe` [`register_raw`](Self::register_raw).
/// A userfaultfd of another process (received over a socket, or from an
/// [`Event::Fork`]) acts on that process's address space.
pub struct Uffd {
    fd: OwnedFd,
    /// Set by the handshake, or lazily from fdinfo for an inherited
    /// descriptor.
    enabled: OnceLock<Features>,
    nonblocking: bool,
    /// Whether the descriptor came from a fork event or `from_fd` (its
    /// handshake was done elsewhere).
    inherited: bool,
    /// Set by [`Uffd::with_remap`]: addresses are translated.
    remap: Option<Remap>,
}

impl fmt::Debug for Uffd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uffd")
            .field("fd", &self.fd.as_raw_fd())
            .field("enabled", &self.enabled.get())
            .field("nonblocking", &self.nonblocking)
            .finish()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(uffd: Uffd) -> Self {
        uffd.fd
    }
}

/// Reads the enabled features of a userfaultfd from `/proc/self/fdinfo`
/// (`API:\taa:<features>:<ioctls>`), if its handshake is done.
fn fdinfo_features(fd: RawFd) -> Option<Features> {
    const INITIALIZED: u64 = 1 << 31;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let api = info.lines().find_map(|l| l.strip_prefix("API:"))?;
    let bits = u64::from_str_radix(api.trim().split(':').nth(1)?, 16).ok()?;
    (bits & INITIALIZED != 0).then(|| Features::from_bits_truncate(bits))
}

impl Uffd {
    fn from_new_fd(fd: OwnedFd, flags: OpenFlags) -> Self {
        Self {
            fd,
            enabled: OnceLock::new(),
            nonblocking: flags.nonblock,
            inherited: false,
            remap: None,
        }
    }

    /// Creates a userfaultfd.
    ///
    /// Tries `/dev/userfaultfd` with `USERFAULTFD_IOC_NEW` first (which
    /// works for whoever may open the device, regardless of
    /// `vm.unprivileged_userfaultfd`), then the `userfaultfd(2)` syscall.
    ///
    /// # Errors
    ///
    /// If both fail: an error of the syscall's kind whose payload is an
    /// [`OpenError`] naming both failures and hinting at
    /// `vm.unprivileged_userfaultfd` and [`OpenFlags::user_mode_only`].
    pub fn open(flags: OpenFlags) -> io::Result<Self> {
        let raw_flags = flags.raw();
        let device = match Self::open_device(raw_flags) {
            Ok(fd) => return Ok(Self::from_new_fd(fd, flags)),
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes one integer argument and returns a
        // new descriptor or -1; it touches no memory of the caller.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, raw_flags) };
        match cvt(ret) {
            Ok(fd) => {
                let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
                // SAFETY: the syscall just returned this new descriptor,
                // which nothing else owns.
                Ok(Self::from_new_fd(
                    unsafe { OwnedFd::from_raw_fd(fd) },
                    flags,
                ))
            }
            Err(syscall) => Err(io::Error::new(
                syscall.kind(),
                OpenError {
                    device,
                    syscall,
                    user_mode_only: flags.user_mode_only,
                },
            )),
        }
    }

    fn open_device(raw_flags: libc::c_int) -> io::Result<OwnedFd> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument
        // (no pointer) and returns a new descriptor; `dev` is open for the
        // whole call.
        let fd = cvt(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                raw::USERFAULTFD_IOC_NEW as libc::Ioctl,
                raw_flags,
            )
        })?;
        // SAFETY: the ioctl just returned this new descriptor, which nothing
        // else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// [`open`](Self::open) with `UFFD_USER_MODE_ONLY` and `O_CLOEXEC`: works
    /// without privileges even when `vm.unprivileged_userfaultfd = 0`.
    /// [`Features::EVENT_FORK`] still needs `CAP_SYS_PTRACE`.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open).
    pub fn new_user_mode() -> io::Result<Self> {
        Self::open(OpenFlags {
            user_mode_only: true,
            ..OpenFlags::default()
        })
    }

    /// Opens with `flags` and performs the [`api`](Self::api) handshake
    /// requesting `features`.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open) and [`api`](Self::api).
    pub fn with_features(flags: OpenFlags, features: Features) -> io::Result<(Self, ApiInfo)> {
        let uffd = Self::open(flags)?;
        let info = uffd.api(features)?;
        Ok((uffd, info))
    }

    /// Takes ownership of a descriptor that must be a userfaultfd (e.g.
    /// received with [`recv_fds`](crate::recv_fds)). Its enabled features are
    /// read from `/proc/self/fdinfo`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `/proc/self/fd/N` does not name a userfaultfd (the
    /// descriptor is closed then); the `readlink` error if `/proc` is not
    /// available.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if target.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor is {}, not a userfaultfd", target.display()),
            ));
        }
        Ok(Self::from_inherited(fd))
    }

    /// Makes this descriptor (typically another process's, from
    /// [`from_fd`](Self::from_fd)) work in the local addresses of `remap`:
    /// every ioctl translates its range to the other process's addresses
    /// (a range must lie inside one [`RemapRange`]; `InvalidInput`
    /// otherwise), and [`read_events`](Self::read_events) translates fault
    /// addresses and `REMOVE` ranges back (a fault outside every range is
    /// reported at address 0; a `REMOVE` is clipped to the first range it
    /// meets, and one that meets none is reported as empty at 0).
    #[must_use]
    pub fn with_remap(mut self, remap: Remap) -> Self {
        self.remap = Some(remap);
        self
    }

    /// The translation set by [`with_remap`](Self::with_remap).
    #[must_use]
    pub fn remap(&self) -> Option<&Remap> {
        self.remap.as_ref()
    }

    /// The address an ioctl on local `addr..addr + len` is given.
    fn real(&self, addr: usize, len: usize) -> io::Result<usize> {
        match &self.remap {
            None => Ok(addr),
            Some(r) => r.to_remote(addr, len).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {addr:#x}+{len:#x} is not inside one remapped range"),
                )
            }),
        }
    }

    /// Wraps a descriptor whose handshake was done elsewhere. Does not
    /// allocate (it runs while decoding a fork event, see
    /// [`Event::Fork`]); the features are read lazily.
    fn from_inherited(fd: OwnedFd) -> Self {
        // SAFETY: F_GETFL on an open descriptor only returns its status flags.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        let nonblocking = fl != -1 && fl & libc::O_NONBLOCK != 0;
        Self {
            fd,
            enabled: OnceLock::new(),
            nonblocking,
            inherited: true,
            remap: None,
        }
    }

    /// Queries the features this kernel supports, using a throw-away
    /// descriptor: a descriptor's handshake can be done only once (a second
    /// `UFFDIO_API` fails with `EINVAL`), and asking for no feature reports
    /// the supported set. Falls back to `UFFD_USER_MODE_ONLY` when the
    /// process may not create a full userfaultfd.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open) and [`api`](Self::api).
    pub fn probe_features() -> io::Result<Features> {
        let uffd = match Self::open(OpenFlags::default()) {
            Ok(u) => u,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Self::new_user_mode()?,
            Err(e) => return Err(e),
        };
        Ok(uffd.api(Features::empty())?.supported)
    }

    /// Runs the `UFFDIO_API` handshake, enabling `requested`. Must precede
    /// every other ioctl and `read`, and can be done once per descriptor
    /// (use a fresh descriptor, or [`probe_features`](Self::probe_features),
    /// to query support first).
    ///
    /// # Errors
    ///
    /// `EINVAL` if a requested feature is unsupported or the handshake was
    /// already done; `EPERM` for [`Features::EVENT_FORK`] without
    /// `CAP_SYS_PTRACE`.
    pub fn api(&self, requested: Features) -> io::Result<ApiInfo> {
        let mut arg = raw::uffdio_api {
            api: raw::UFFD_API,
            features: requested.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`
        // (its size is encoded in the number and pinned in `raw`), which
        // `arg` is; it changes no memory mapping.
        unsafe { self.ioctl(raw::UFFDIO_API, &mut arg) }?;
        let mut enabled = requested;
        if enabled.contains(Features::WP_ASYNC) {
            enabled |= Features::WP_UNPOPULATED;
        }
        let _ = self.enabled.set(enabled);
        Ok(ApiInfo {
            supported: Features::from_bits_retain(arg.features),
            enabled,
            ioctls: Ioctls::from_bits_retain(arg.ioctls),
        })
    }

    /// The features enabled by the handshake (empty before it). For a
    /// descriptor from [`Event::Fork`] or [`from_fd`](Self::from_fd) they are
    /// inherited and read from `/proc/self/fdinfo`.
    #[must_use]
    pub fn features(&self) -> Features {
        if let Some(f) = self.enabled.get() {
            return *f;
        }
        if self.inherited
            && let Some(f) = fdinfo_features(self.fd.as_raw_fd())
        {
            return *self.enabled.get_or_init(|| f);
        }
        Features::empty()
    }

    /// Issues an ioctl whose payload is `arg`.
    ///
    /// # Safety
    ///
    /// `req` must be an ioctl whose payload is exactly a `T` (so the kernel
    /// reads and writes only `*arg`), and every other effect of the ioctl
    /// must be sound for the caller.
    unsafe fn ioctl<T>(&self, req: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is a valid, exclusively borrowed `T` for the whole
        // call and the caller guarantees that `req` transfers exactly a `T`
        // and that its other effects are sound. The descriptor is owned by
        // `self` and therefore open.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                req as libc::Ioctl,
                std::ptr::from_mut(arg),
            )
        };
        cvt(ret).map(drop)
    }

    /// Registers the whole of `mapping`; see [`register_range`](Self::register_range).
    ///
    /// # Errors
    ///
    /// As for [`register_range`](Self::register_range).
    pub fn register(&self, mapping: &Mapping, mode: RegisterMode) -> io::Result<Ioctls> {
        self.register_range(mapping, 0, mapping.len(), mode)
    }

    /// Registers `offset..offset + len` of `mapping` (`UFFDIO_REGISTER`):
    /// faults of the kinds in `mode` are delivered to this descriptor instead
    /// of being resolved by the kernel. Returns the ioctls usable on the
    /// range.
    ///
    /// The registration belongs to the mapping's VMAs: it ends when they are
    /// unmapped and follows them through `mremap` with
    /// [`Features::EVENT_REMAP`]. A range can be registered with one
    /// userfaultfd at a time.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the range is outside the mapping; `EINVAL` for an
    /// unaligned range, a mode the mapping type does not support (e.g. MINOR
    /// on private anonymous memory) or before the handshake; `EBUSY` if
    /// another userfaultfd holds the range.
    pub fn register_range(
        &self,
        mapping: &Mapping,
        offset: usize,
        len: usize,
        mode: RegisterMode,
    ) -> io::Result<Ioctls> {
        let end = offset.checked_add(len).filter(|&e| e <= mapping.len());
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the mapping",
            ));
        }
        // SAFETY: the range lies inside `mapping`, whose contents Rust never
        // assumes to be stable and which never hands out references into its
        // memory, so whatever a handler installs (or blocks) there cannot
        // invalidate any Rust value.
        unsafe { self.register_raw(mapping.addr() + offset, len, mode) }
    }

    /// Registers an arbitrary range of the address space.
    ///
    /// # Safety
    ///
    /// Once registered, the contents of missing pages in the range are
    /// whatever the handler installs, and accesses may block. The caller
    /// must ensure that no Rust value, reference or allocation relies on
    /// the contents of `[addr, addr + len)` (e.g. zero-initialised memory
    /// that was never touched) while it is registered.
    ///
    /// # Errors
    ///
    /// As for [`register_range`](Self::register_range).
    pub unsafe fn register_raw(
        &self,
        addr: usize,
        len: usize,
        mode: RegisterMode,
    ) -> io::Result<Ioctls> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_register {
            range: raw::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER transfers exactly one `uffdio_register`;
        // its effect on the range is the caller's responsibility.
        unsafe { self.ioctl(raw::UFFDIO_REGISTER, &mut arg) }?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters `addr..addr + len` (`UFFDIO_UNREGISTER`), waking threads
    /// waiting on MISSING faults there (they then fault normally).
    ///
    /// # Errors
    ///
    /// `EINVAL` for an unaligned or unmapped range.
    pub fn unregister(&self, addr: usize, len: usize) -> io::Result<()> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_range {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`; removing a
        // registration only returns the range to normal fault handling.
        unsafe { self.ioctl(raw::UFFDIO_UNREGISTER, &mut arg) }
    }

    /// Wakes the threads waiting on faults in `addr..addr + len`
    /// (`UFFDIO_WAKE`), after a `DONTWAKE` install or [`Install::Exists`].
    ///
    /// # Errors
    ///
    /// `EINVAL` for an unaligned or empty range.
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_range {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range` and only wakes
        // sleeping threads (which re-check their fault).
        unsafe { self.ioctl(raw::UFFDIO_WAKE, &mut arg) }
    }

    /// Resolves MISSING faults by copying `src` into the missing pages at
    /// `dst..dst + src.len()` (`UFFDIO_COPY`).
    ///
    /// `src.len()` must be a multiple of the page size. `src` must not lie in
    /// a range registered with this descriptor (the kernel's read of it
    /// would fault to this very handler).
    ///
    /// # Errors
    ///
    /// See [`Install`] for `EEXIST`/`EAGAIN`; `ENOENT` if `dst` is not
    /// registered with this descriptor; `EINVAL` for unaligned arguments;
    /// `ESRCH` if the process owning the range exited.
    pub fn copy(&self, dst: usize, src: &[u8], mode: CopyMode) -> io::Result<Install> {
        let dst = self.real(dst, src.len())?;
        let mut arg = raw::uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: mode.bits(),
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY transfers one `uffdio_copy`. The kernel reads
        // `src` (a live shared borrow, and only through copy_from_user) and
        // writes only missing pages of ranges registered with this
        // descriptor, which is sound by the registration contract (see the
        // type docs).
        let ret = unsafe { self.ioctl(raw::UFFDIO_COPY, &mut arg) };
        Install::from_ioctl(ret, arg.copy, src.len())
    }

    /// Resolves MISSING faults by mapping zero pages at `dst..dst + len`
    /// (`UFFDIO_ZEROPAGE`).
    ///
    /// # Errors
    ///
    /// As for [`copy`](Self::copy).
    pub fn zeropage(&self, dst: usize, len: usize, dont_wake: bool) -> io::Result<Install> {
        let dst = self.real(dst, len)?;
        let mut arg = raw::uffdio_zeropage {
            range: raw::uffdio_range {
                start: dst as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                raw::UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE transfers one `uffdio_zeropage` and only
        // fills missing pages of ranges registered with this descriptor.
        let ret = unsafe { self.ioctl(raw::UFFDIO_ZEROPAGE, &mut arg) };
        Install::from_ioctl(ret, arg.zeropage, len)
    }

    /// Resolves MISSING faults by *moving* the pages at
    /// `src_offset..src_offset + len` of `src` to `dst` (`UFFDIO_MOVE`, needs
    /// [`Features::MOVE`]): no copy, and whole transparent huge pages move
    /// at once when both sides are [`pmd_size`](crate::pmd_size) aligned.
    /// Afterwards the source range is empty (reads back as zeros).
    ///
    /// `src` must be private anonymous memory whose pages are not shared
    /// (e.g. a staging [`Mapping::anonymous`] filled with
    /// [`Mapping::write_at`]).
    ///
    /// # Errors
    ///
    /// See [`Install`] for `EEXIST`/`EAGAIN`; `InvalidInput` if the source
    /// range is outside `src`; `ENOENT` for a source hole without
    /// [`MoveMode::ALLOW_SRC_HOLES`]; `EBUSY` for a shared or pinned source
    /// page; `EINVAL` for unaligned or unsuitable (non-anonymous) ranges.
    pub fn move_pages(
        &self,
        dst: usize,
        src: &Mapping,
        src_offset: usize,
        len: usize,
        mode: MoveMode,
    ) -> io::Result<Install> {
        let end = src_offset.checked_add(len).filter(|&e| e <= src.len());
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "source range outside the mapping",
            ));
        }
        // SAFETY: the source range lies inside `src`, a `Mapping`, whose
        // contents Rust never assumes to be stable, so emptying it is sound.
        unsafe { self.move_pages_raw(dst, src.addr() + src_offset, len, mode) }
    }

    /// [`move_pages`](Self::move_pages) from an arbitrary source address.
    ///
    /// # Safety
    ///
    /// The pages of `[src, src + len)` are taken away (the range then reads
    /// as zeros or faults): no Rust value, reference or allocation may rely
    /// on their contents.
    ///
    /// # Errors
    ///
    /// As for [`move_pages`](Self::move_pages).
    pub unsafe fn move_pages_raw(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        mode: MoveMode,
    ) -> io::Result<Install> {
        let dst = self.real(dst, len)?;
        let mut arg = raw::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: mode.bits(),
            move_: 0,
        };
        // SAFETY: UFFDIO_MOVE transfers one `uffdio_move`; it fills only
        // missing pages of ranges registered with this descriptor (sound by
        // the registration contract) and empties the source range, which
        // the caller vouches for.
        let ret = unsafe { self.ioctl(raw::UFFDIO_MOVE, &mut arg) };
        Install::from_ioctl(ret, arg.move_, len)
    }

    /// Resolves MINOR faults by mapping the page-cache pages already present
    /// at `addr..addr + len` (`UFFDIO_CONTINUE`, range registered with
    /// [`RegisterMode::MINOR`]).
    ///
    /// # Errors
    ///
    /// See [`Install`]; `EFAULT` if a page is not in the page cache.
    pub fn continue_range(
        &self,
        addr: usize,
        len: usize,
        mode: ContinueMode,
    ) -> io::Result<Install> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_continue {
            range: raw::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE transfers one `uffdio_continue` and maps
        // existing file pages into ranges registered with this descriptor.
        let ret = unsafe { self.ioctl(raw::UFFDIO_CONTINUE, &mut arg) };
        Install::from_ioctl(ret, arg.mapped, len)
    }

    /// Marks the missing pages at `addr..addr + len` as poisoned
    /// (`UFFDIO_POISON`, needs [`Features::POISON`]): any later access raises
    /// `SIGBUS`, as for a hardware memory error. Use it for pages whose
    /// contents were lost.
    ///
    /// # Errors
    ///
    /// See [`Install`].
    pub fn poison(&self, addr: usize, len: usize, dont_wake: bool) -> io::Result<Install> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_poison {
            range: raw::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                raw::UFFDIO_POISON_MODE_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON transfers one `uffdio_poison` and only marks
        // missing pages of ranges registered with this descriptor; touching
        // them raises SIGBUS, which terminates rather than corrupts.
        let ret = unsafe { self.ioctl(raw::UFFDIO_POISON, &mut arg) };
        Install::from_ioctl(ret, arg.updated, len)
    }

    fn writeprotect(&self, addr: usize, len: usize, mode: u64) -> io::Result<()> {
        let addr = self.real(addr, len)?;
        let mut arg = raw::uffdio_writeprotect {
            range: raw::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `uffdio_writeprotect` and
        // only changes write permission (never contents) of ranges
        // registered in WP mode with this descriptor.
        unsafe { self.ioctl(raw::UFFDIO_WRITEPROTECT, &mut arg) }
    }

    /// Write-protects `addr..addr + len` (`UFFDIO_WRITEPROTECT` with
    /// `MODE_WP`; range registered with [`RegisterMode::WP`]). Writes then
    /// fault with [`PageFaultFlags::WP`], or with [`Features::WP_ASYNC`] are
    /// resolved by the kernel and recorded for `PAGEMAP_SCAN`.
    ///
    /// # Errors
    ///
    /// `EAGAIN` (`ErrorKind::WouldBlock`) while a non-cooperative event is
    /// pending: read events and retry. `ENOENT` if the range is not
    /// registered in WP mode.
    pub fn write_protect(&self, addr: usize, len: usize) -> io::Result<()> {
        self.writeprotect(addr, len, raw::UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `addr..addr + len`, waking the writers
    /// waiting there unless `dont_wake`.
    ///
    /// # Errors
    ///
    /// As for [`write_protect`](Self::write_protect).
    pub fn write_unprotect(&self, addr: usize, len: usize, dont_wake: bool) -> io::Result<()> {
        self.writeprotect(
            addr,
            len,
            if dont_wake {
                raw::UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            } else {
                0
            },
        )
    }

    /// Whether the descriptor is non-blocking (`O_NONBLOCK`), which
    /// [`poll_readable`](Self::poll_readable) requires.
    #[must_use]
    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking
    }

    /// Waits up to `timeout` (`None`: forever) for a message to read.
    ///
    /// The descriptor must be non-blocking ([`OpenFlags::nonblock`], the
    /// default): the kernel answers `poll(2)` on a blocking userfaultfd with
    /// `POLLERR`. A `true` is a hint, not a promise: another reader may take
    /// the message first, and the read then returns `Ok(0)`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a blocking descriptor; the `poll(2)` error.
    pub fn poll_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        if !self.nonblocking {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "poll on a blocking userfaultfd always reports POLLERR; open it with OpenFlags::nonblock",
            ));
        }
        poll_one(self.as_fd(), timeout)
    }

    /// Reads up to `buf.len()` messages with one `read(2)`. Returns how many
    /// were read: `0` on a non-blocking descriptor with nothing pending
    /// (`EAGAIN`). Blocks otherwise. Decode them with [`UffdMsg::event`].
    ///
    /// Any fork descriptor still held by a message of `buf` (an
    /// [`Event::Fork`] not decoded yet) is closed first.
    ///
    /// # Errors
    ///
    /// The `read(2)` error; `EINVAL` before the handshake.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        for msg in buf.iter_mut() {
            msg.clear();
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is an exclusively borrowed array of `UffdMsg`, which
        // are plain 32-byte `repr(C)` blocks valid for every bit pattern
        // (and hold no descriptor after `clear`), so the kernel may write up
        // to `bytes` bytes of messages into it.
        let ret =
            cvt_r(|| unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) });
        match ret {
            Ok(n) => {
                let n = n.unsigned_abs() / size_of::<UffdMsg>();
                if let Some(r) = &self.remap {
                    for msg in &mut buf[..n] {
                        msg.translate_to_local(r);
                    }
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Reads and decodes a single message; `None` on a non-blocking
    /// descriptor with nothing pending.
    ///
    /// # Errors
    ///
    /// As for [`read_events`](Self::read_events).
    pub fn read_event(&self) -> io::Result<Option<Event>> {
        let mut msg = [UffdMsg::default()];
        Ok(match self.read_events(&mut msg)? {
            0 => None,
            _ => Some(msg[0].event()),
        })
    }

    /// Waits up to `timeout` (`None`: forever) for a message and reads one:
    /// `None` if none arrived in time. On a blocking descriptor only
    /// `timeout = None` is possible (a plain blocking read).
    ///
    /// # Errors
    ///
    /// As for [`poll_readable`](Self::poll_readable) and
    /// [`read_events`](Self::read_events).
    pub fn next_event(&self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        if !self.nonblocking && timeout.is_none() {
            return self.read_event();
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if !self.poll_readable(left)? {
                return Ok(None);
            }
            // Another reader may have taken the message: poll again.
            if let Some(event) = self.read_event()? {
                return Ok(Some(event));
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
        }
    }
}

/// One raw userfaultfd message (`struct uffd_msg`, 32 bytes), filled by
/// [`Uffd::read_events`] and decoded by [`UffdMsg::event`].
///
/// A message can only be created empty ([`Default`]), so every non-empty
/// message came from the kernel. A fork message owns the new descriptor it
/// carries until [`event`](Self::event) hands it out; dropping or re-reading
/// the message closes it.
#[repr(C, align(8))]
#[derive(Default)]
pub struct UffdMsg {
    bytes: [u8; 32],
}

const _: () = assert!(size_of::<UffdMsg>() == size_of::<raw::uffd_msg>());

impl fmt::Debug for UffdMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UffdMsg")
            .field("event", &self.kind())
            .field("arg", &[self.word(1), self.word(2), self.word(3)])
            .finish()
    }
}

impl Drop for UffdMsg {
    fn drop(&mut self) {
        self.clear();
    }
}

impl UffdMsg {
    /// The raw event code (`UFFD_EVENT_*`; 0 for an empty message).
    #[must_use]
    pub fn kind(&self) -> u8 {
        self.bytes[0]
    }

    /// The raw bytes of the message.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    fn word(&self, i: usize) -> u64 {
        let mut w = [0; 8];
        w.copy_from_slice(&self.bytes[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(w)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut w = [0; 4];
        w.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_ne_bytes(w)
    }

    /// Takes the descriptor of a fork message, emptying the message.
    fn take_fork_fd(&mut self) -> Option<OwnedFd> {
        if self.kind() != raw::UFFD_EVENT_FORK {
            return None;
        }
        let fd = RawFd::try_from(self.u32_at(8)).ok();
        self.bytes = [0; 32];
        // SAFETY: a non-empty message can only have been written by the
        // kernel in `Uffd::read_events` (messages are created empty and
        // their bytes are private). A fork message carries a descriptor the
        // kernel installed in this process for the reader, which nothing
        // else owns; the message was emptied above, so this is the only
        // `OwnedFd` ever made from it.
        fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn set_word(&mut self, i: usize, v: u64) {
        self.bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }

    /// Rewrites the addresses of a fault or `REMOVE` message into the local
    /// addresses of `r` (see [`Uffd::with_remap`]).
    fn translate_to_local(&mut self, r: &Remap) {
        match self.kind() {
            raw::UFFD_EVENT_PAGEFAULT => {
                let a = usize::try_from(self.word(2))
                    .ok()
                    .and_then(|a| r.to_local(a));
                self.set_word(2, a.unwrap_or(0) as u64);
            }
            raw::UFFD_EVENT_REMOVE => {
                let span = usize::try_from(self.word(1))
                    .ok()
                    .zip(usize::try_from(self.word(2)).ok())
                    .and_then(|(s, e)| r.span_to_local(s, e));
                let (s, e) = span.unwrap_or((0, 0));
                self.set_word(1, s as u64);
                self.set_word(2, e as u64);
            }
            _ => {}
        }
    }

    /// Empties the message, closing a fork descriptor it still holds.
    fn clear(&mut self) {
        drop(self.take_fork_fd());
        self.bytes = [0; 32];
    }

    /// Decodes the message.
    ///
    /// Addresses are the page start unless [`Features::EXACT_ADDRESS`] is
    /// enabled. Decoding an [`Event::Fork`] moves its descriptor out and
    /// empties the message: decoding it again gives `Event::Unknown(0)`.
    pub fn event(&mut self) -> Event {
        let addr = |w: u64| usize::try_from(w).unwrap_or(usize::MAX);
        match self.kind() {
            raw::UFFD_EVENT_PAGEFAULT => {
                let tid = self.u32_at(24);
                Event::PageFault {
                    addr: addr(self.word(2)),
                    flags: PageFaultFlags::from_bits_retain(self.word(1)),
                    thread_id: (tid != 0).then_some(tid),
                }
            }
            raw::UFFD_EVENT_FORK => match self.take_fork_fd() {
                Some(fd) => Event::Fork {
                    uffd: Uffd::from_inherited(fd),
                },
                None => Event::Unknown(raw::UFFD_EVENT_FORK),
            },
            raw::UFFD_EVENT_REMAP => Event::Remap {
                from: addr(self.word(1)),
                to: addr(self.word(2)),
                len: addr(self.word(3)),
            },
            raw::UFFD_EVENT_REMOVE => Event::Remove {
                start: addr(self.word(1)),
                end: addr(self.word(2)),
            },
            raw::UFFD_EVENT_UNMAP => Event::Unmap {
                start: addr(self.word(1)),
                end: addr(self.word(2)),
            },
            other => Event::Unknown(other),
        }
    }
}

/// A decoded userfaultfd message.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted in a registered range and waits for it to be
    /// resolved (with an install ioctl, [`Uffd::write_unprotect`] or
    /// [`Uffd::wake`]).
    PageFault {
        /// Faulting address (page aligned unless [`Features::EXACT_ADDRESS`]).
        addr: usize,
        /// Kind of access.
        flags: PageFaultFlags,
        /// Kernel thread id of the faulting thread, with
        /// [`Features::THREAD_ID`].
        thread_id: Option<u32>,
    },
    /// The process forked ([`Features::EVENT_FORK`]): the child's copies of
    /// the registered ranges are registered with this new descriptor, whose
    /// handshake is already done (same features, same `O_NONBLOCK`).
    ///
    /// The forking thread waits inside `fork()` until this message is read,
    /// and libc's `fork()` holds internal locks meanwhile (glibc: the
    /// `malloc` arenas). The reading thread must therefore not allocate
    /// between polling and reading: [`Uffd::next_event`],
    /// [`Uffd::read_event`], [`Uffd::read_events`],
    /// [`Uffd::poll_readable`] and decoding the message do not, but
    /// starting a thread does: start the handler thread before forking.
    Fork {
        /// The child's userfaultfd, owned by the reader.
        uffd: Uffd,
    },
    /// A registered range moved ([`Features::EVENT_REMAP`]); `mremap(2)`
    /// waits until this message is read.
    Remap {
        /// Old start address.
        from: usize,
        /// New start address.
        to: usize,
        /// Length of the old range.
        len: usize,
    },
    /// Pages of a registered range were dropped by `MADV_DONTNEED` or
    /// `MADV_REMOVE` ([`Features::EVENT_REMOVE`]); they are missing again.
    /// While this is pending, install ioctls return [`Install::Again`].
    Remove {
        /// Start of the range.
        start: usize,
        /// End of the range (exclusive).
        end: usize,
    },
    /// A registered range was unmapped ([`Features::EVENT_UNMAP`]).
    Unmap {
        /// Start of the range.
        start: usize,
        /// End of the range (exclusive).
        end: usize,
    },
    /// An event code this crate does not know (or an empty message: 0).
    Unknown(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_mapping() {
        let eexist = || Err(io::Error::from_raw_os_error(libc::EEXIST));
        let eagain = || Err(io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(
            Install::from_ioctl(Ok(()), 8192, 8192).unwrap(),
            Install::Done(8192)
        );
        assert_eq!(
            Install::from_ioctl(eexist(), -i64::from(libc::EEXIST), 4096).unwrap(),
            Install::Exists
        );
        assert_eq!(
            Install::from_ioctl(eagain(), -i64::from(libc::EAGAIN), 4096).unwrap(),
            Install::Again { done: 0 }
        );
        // The early mmap_changing check returns EAGAIN without writing the count.
        assert_eq!(
            Install::from_ioctl(eagain(), 0, 4096).unwrap(),
            Install::Again { done: 0 }
        );
        assert_eq!(
            Install::from_ioctl(eagain(), 4096, 8192).unwrap(),
            Install::Again { done: 4096 }
        );
        let e = Install::from_ioctl(Err(io::Error::from_raw_os_error(libc::ENOENT)), -2, 4096);
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn empty_message_decodes_unknown() {
        let mut m = UffdMsg::default();
        assert!(matches!(m.event(), Event::Unknown(0)));
        assert_eq!(m.as_bytes(), &[0; 32]);
    }

    #[test]
    fn open_error_mentions_sysctl() {
        let e = OpenError {
            device: io::Error::from_raw_os_error(libc::EACCES),
            syscall: io::Error::from_raw_os_error(libc::EPERM),
            user_mode_only: false,
        };
        let s = e.to_string();
        assert!(
            s.contains("/dev/userfaultfd") && s.contains("vm.unprivileged_userfaultfd"),
            "{s}"
        );
    }

    #[test]
    fn feature_bits_match_kernel_headers() {
        use linux_raw_sys::general as g;
        let pairs = [
            (
                Features::PAGEFAULT_FLAG_WP,
                g::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ),
            (Features::EVENT_FORK, g::UFFD_FEATURE_EVENT_FORK),
            (Features::EVENT_REMAP, g::UFFD_FEATURE_EVENT_REMAP),
            (Features::EVENT_REMOVE, g::UFFD_FEATURE_EVENT_REMOVE),
            (
                Features::MISSING_HUGETLBFS,
                g::UFFD_FEATURE_MISSING_HUGETLBFS,
            ),
            (Features::MISSING_SHMEM, g::UFFD_FEATURE_MISSING_SHMEM),
            (Features::EVENT_UNMAP, g::UFFD_FEATURE_EVENT_UNMAP),
            (Features::SIGBUS, g::UFFD_FEATURE_SIGBUS),
            (Features::THREAD_ID, g::UFFD_FEATURE_THREAD_ID),
            (Features::MINOR_HUGETLBFS, g::UFFD_FEATURE_MINOR_HUGETLBFS),
            (Features::MINOR_SHMEM, g::UFFD_FEATURE_MINOR_SHMEM),
            (Features::EXACT_ADDRESS, g::UFFD_FEATURE_EXACT_ADDRESS),
            (
                Features::WP_HUGETLBFS_SHMEM,
                g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ),
            (Features::WP_UNPOPULATED, g::UFFD_FEATURE_WP_UNPOPULATED),
            (Features::POISON, g::UFFD_FEATURE_POISON),
            (Features::WP_ASYNC, g::UFFD_FEATURE_WP_ASYNC),
            (Features::MOVE, g::UFFD_FEATURE_MOVE),
        ];
        assert_eq!(pairs.len(), Features::all().iter().count());
        for (ours, theirs) in pairs {
            assert_eq!(ours.bits(), u64::from(theirs), "{ours:?}");
        }
    }
}

/// One range of a [`Remap`]: `len` bytes at local address `local` stand for
/// the other process's memory at `remote`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemapRange {
    /// Start in this process (e.g. in a [`Mapping::placeholder`]).
    pub local: usize,
    /// Start in the process whose userfaultfd it is.
    pub remote: usize,
    /// Length in bytes.
    pub len: usize,
}

/// A translation between local addresses and another process's memory, for
/// a userfaultfd received from it (see [`Uffd::with_remap`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remap {
    /// Sorted by `local`.
    by_local: Vec<RemapRange>,
    /// Indices into `by_local`, sorted by `remote`.
    by_remote: Vec<usize>,
}

impl Remap {
    /// Builds the table.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty range, an address range that overflows,
    /// or ranges that overlap on either side.
    pub fn new(mut ranges: Vec<RemapRange>) -> io::Result<Self> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        for r in &ranges {
            if r.len == 0 {
                return Err(bad("empty remapped range"));
            }
            if r.local.checked_add(r.len).is_none() || r.remote.checked_add(r.len).is_none() {
                return Err(bad("remapped range overflows the address space"));
            }
        }
        ranges.sort_by_key(|r| r.local);
        if ranges
            .windows(2)
            .any(|w| w[0].local + w[0].len > w[1].local)
        {
            return Err(bad("remapped ranges overlap locally"));
        }
        let mut by_remote: Vec<usize> = (0..ranges.len()).collect();
        by_remote.sort_by_key(|&i| ranges[i].remote);
        if by_remote
            .windows(2)
            .any(|w| ranges[w[0]].remote + ranges[w[0]].len > ranges[w[1]].remote)
        {
            return Err(bad("remapped ranges overlap in the other process"));
        }
        Ok(Self {
            by_local: ranges,
            by_remote,
        })
    }

    /// The ranges, sorted by local address.
    #[must_use]
    pub fn ranges(&self) -> &[RemapRange] {
        &self.by_local
    }

    /// The remote address of local `addr..addr + len`, if it lies inside
    /// one range.
    #[must_use]
    pub fn to_remote(&self, addr: usize, len: usize) -> Option<usize> {
        let k = self
            .by_local
            .partition_point(|r| r.local <= addr)
            .checked_sub(1)?;
        let r = &self.by_local[k];
        let off = addr - r.local;
        (off.checked_add(len)? <= r.len).then(|| r.remote + off)
    }

    fn remote_index(&self, addr: usize) -> Option<&RemapRange> {
        let k = self
            .by_remote
            .partition_point(|&i| self.by_local[i].remote <= addr)
            .checked_sub(1)?;
        let r = &self.by_local[self.by_remote[k]];
        (addr - r.remote < r.len).then_some(r)
    }

    /// The local address of remote `addr`.
    #[must_use]
    pub fn to_local(&self, addr: usize) -> Option<usize> {
        self.remote_index(addr).map(|r| r.local + (addr - r.remote))
    }

    /// The local range of remote `start..end`, clipped to the first range
    /// it meets.
    #[must_use]
    pub fn span_to_local(&self, start: usize, end: usize) -> Option<(usize, usize)> {
        if start >= end {
            return None;
        }
        let r = match self.remote_index(start) {
            Some(r) => r,
            None => {
                // The first range starting inside start..end.
                let k = self
                    .by_remote
                    .partition_point(|&i| self.by_local[i].remote < start);
                let r = &self.by_local[*self.by_remote.get(k)?];
                if r.remote >= end {
                    return None;
                }
                r
            }
        };
        let s = start.max(r.remote);
        let e = end.min(r.remote + r.len);
        Some((r.local + (s - r.remote), r.local + (e - r.remote)))
    }
}

#[cfg(test)]
mod remap_tests {
    use super::*;

    #[test]
    fn remap_translates_both_ways_and_rejects_overlaps() {
        let r = Remap::new(vec![
            RemapRange {
                local: 0x10_0000,
                remote: 0x7000_0000,
                len: 0x2000,
            },
            RemapRange {
                local: 0x10_2000,
                remote: 0x5000_0000,
                len: 0x1000,
            },
        ])
        .unwrap();
        assert_eq!(r.to_remote(0x10_0000, 0x2000), Some(0x7000_0000));
        assert_eq!(r.to_remote(0x10_1000, 0x2000), None, "straddles two ranges");
        assert_eq!(r.to_remote(0x10_2000, 0x1000), Some(0x5000_0000));
        assert_eq!(r.to_remote(0xf_f000, 0x1000), None);
        assert_eq!(r.to_local(0x7000_1fff), Some(0x10_1fff));
        assert_eq!(r.to_local(0x7000_2000), None);
        assert_eq!(r.to_local(0x5000_0000), Some(0x10_2000));
        assert_eq!(
            r.span_to_local(0x4fff_f000, 0x5000_8000),
            Some((0x10_2000, 0x10_3000))
        );
        assert_eq!(r.span_to_local(0x6000_0000, 0x6000_1000), None);
        let overlap = |a: usize, b: usize| {
            Remap::new(vec![
                RemapRange {
                    local: a,
                    remote: 0,
                    len: 0x2000,
                },
                RemapRange {
                    local: b,
                    remote: 0x1000,
                    len: 0x1000,
                },
            ])
        };
        assert!(overlap(0, 0x4000).is_err(), "remote overlap");
        assert!(
            Remap::new(vec![RemapRange {
                local: 0,
                remote: 0,
                len: 0
            }])
            .is_err()
        );
    }

    #[test]
    fn fault_messages_are_translated() {
        let r = Remap::new(vec![RemapRange {
            local: 0x1000,
            remote: 0x9000,
            len: 0x1000,
        }])
        .unwrap();
        let mut m = UffdMsg::default();
        m.bytes[0] = raw::UFFD_EVENT_PAGEFAULT;
        m.set_word(2, 0x9000);
        m.translate_to_local(&r);
        assert!(matches!(m.event(), Event::PageFault { addr: 0x1000, .. }));
        m.bytes[0] = raw::UFFD_EVENT_PAGEFAULT;
        m.set_word(2, 0x3000);
        m.translate_to_local(&r);
        assert!(matches!(m.event(), Event::PageFault { addr: 0, .. }));
        m.bytes[0] = raw::UFFD_EVENT_REMOVE;
        m.set_word(1, 0x8000);
        m.set_word(2, 0xa000);
        m.translate_to_local(&r);
        assert!(matches!(
            m.event(),
            Event::Remove {
                start: 0x1000,
                end: 0x2000
            }
        ));
    }
}
