//! Raw kernel ABI: ioctl request numbers, mode bits and `repr(C)` structs.
//!
//! Everything here is computed, not copied: each ioctl number is built with
//! the same `_IOC` arithmetic as `include/uapi/asm-generic/ioctl.h`, from the
//! size of the struct it carries. Each number and each struct size is then
//! *pinned* twice at compile time:
//!
//! * against the literal value of the kernel headers (on `x86_64` and
//!   `aarch64`, where the values are known), and
//! * against [`linux_raw_sys`]'s generated constant, where that crate has it
//!   (it lacks `UFFDIO_MOVE`, `UFFDIO_POISON`, `PAGEMAP_SCAN` and
//!   `USERFAULTFD_IOC_NEW`).
//!
//! A wrong struct layout or a typo therefore fails the build instead of
//! issuing the wrong ioctl at run time. The structs are re-exported from
//! [`linux_raw_sys::general`] so that callers of this module see the exact
//! kernel layouts.

use core::mem::size_of;

pub use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffd_msg, uffdio_api, uffdio_continue, uffdio_copy, uffdio_move,
    uffdio_poison, uffdio_range, uffdio_register, uffdio_writeprotect, uffdio_zeropage,
};

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as lio;

// ---------------------------------------------------------------------------
// _IOC arithmetic (include/uapi/asm-generic/ioctl.h and the arch overrides)
// ---------------------------------------------------------------------------

/// Number of bits of the ioctl "size" field on this architecture.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
pub const IOC_SIZEBITS: u32 = 13;
/// Number of bits of the ioctl "size" field on this architecture.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
pub const IOC_SIZEBITS: u32 = 14;

/// `_IOC_NONE`: no data transfer.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
pub const IOC_NONE: u32 = 1;
/// `_IOC_WRITE`: userspace writes, the kernel reads.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
pub const IOC_WRITE: u32 = 4;
/// `_IOC_NONE`: no data transfer.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
pub const IOC_NONE: u32 = 0;
/// `_IOC_WRITE`: userspace writes, the kernel reads.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: the kernel writes, userspace reads.
pub const IOC_READ: u32 = 2;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC(dir, type, nr, size)`. Fails const evaluation if `size` does not fit.
#[must_use]
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl payload too large");
    assert!(ty < (1 << IOC_TYPEBITS) && nr < (1 << IOC_NRBITS));
    (dir << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
}

/// `_IO(type, nr)`: an ioctl without payload.
#[must_use]
pub const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

/// `_IOR(type, nr, T)`: the kernel writes a `T` (of `size` bytes).
#[must_use]
pub const fn ior(ty: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, ty, nr, size)
}

/// `_IOW(type, nr, T)`: the kernel reads a `T` (of `size` bytes).
#[must_use]
pub const fn iow(ty: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_WRITE, ty, nr, size)
}

/// `_IOWR(type, nr, T)`: the kernel reads and writes a `T` (of `size` bytes).
#[must_use]
pub const fn iowr(ty: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

/// `_IOC_SIZE(nr)`: the payload size encoded in an ioctl number.
#[must_use]
pub const fn ioc_size(nr: u32) -> usize {
    ((nr >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// `_IOC_NR(nr)`: the command number encoded in an ioctl number.
#[must_use]
pub const fn ioc_nr(nr: u32) -> u32 {
    (nr >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}

/// `_IOC_TYPE(nr)`: the type ("magic") byte encoded in an ioctl number.
#[must_use]
pub const fn ioc_type(nr: u32) -> u32 {
    (nr >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)
}

/// `_IOC_DIR(nr)`: the direction bits encoded in an ioctl number.
#[must_use]
pub const fn ioc_dir(nr: u32) -> u32 {
    nr >> IOC_DIRSHIFT
}

// ---------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------

/// `UFFDIO`, the ioctl type byte of userfaultfd (0xAA).
pub const UFFDIO: u32 = 0xAA;
/// `UFFD_API`, the API version passed to `UFFDIO_API`.
pub const UFFD_API: u64 = 0xAA;

/// Command number of `UFFDIO_REGISTER` (also its bit in the `ioctls` masks).
pub const _UFFDIO_REGISTER: u32 = 0x00;
/// Command number of `UFFDIO_UNREGISTER`.
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
/// Command number of `UFFDIO_WAKE`.
pub const _UFFDIO_WAKE: u32 = 0x02;
/// Command number of `UFFDIO_COPY`.
pub const _UFFDIO_COPY: u32 = 0x03;
/// Command number of `UFFDIO_ZEROPAGE`.
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
/// Command number of `UFFDIO_MOVE`.
pub const _UFFDIO_MOVE: u32 = 0x05;
/// Command number of `UFFDIO_WRITEPROTECT`.
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
/// Command number of `UFFDIO_CONTINUE`.
pub const _UFFDIO_CONTINUE: u32 = 0x07;
/// Command number of `UFFDIO_POISON`.
pub const _UFFDIO_POISON: u32 = 0x08;
/// Command number of `UFFDIO_API`.
pub const _UFFDIO_API: u32 = 0x3F;

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u32 = iowr(UFFDIO, _UFFDIO_API, size_of::<uffdio_api>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u32 = iowr(UFFDIO, _UFFDIO_REGISTER, size_of::<uffdio_register>());
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: u32 = ior(UFFDIO, _UFFDIO_UNREGISTER, size_of::<uffdio_range>());
/// `UFFDIO_WAKE = _IOR(UFFDIO, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u32 = ior(UFFDIO, _UFFDIO_WAKE, size_of::<uffdio_range>());
/// `UFFDIO_COPY = _IOWR(UFFDIO, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u32 = iowr(UFFDIO, _UFFDIO_COPY, size_of::<uffdio_copy>());
/// `UFFDIO_ZEROPAGE = _IOWR(UFFDIO, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u32 = iowr(UFFDIO, _UFFDIO_ZEROPAGE, size_of::<uffdio_zeropage>());
/// `UFFDIO_MOVE = _IOWR(UFFDIO, 0x05, struct uffdio_move)` (Linux 6.8+).
pub const UFFDIO_MOVE: u32 = iowr(UFFDIO, _UFFDIO_MOVE, size_of::<uffdio_move>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u32 = iowr(
    UFFDIO,
    _UFFDIO_WRITEPROTECT,
    size_of::<uffdio_writeprotect>(),
);
/// `UFFDIO_CONTINUE = _IOWR(UFFDIO, 0x07, struct uffdio_continue)`.
pub const UFFDIO_CONTINUE: u32 = iowr(UFFDIO, _UFFDIO_CONTINUE, size_of::<uffdio_continue>());
/// `UFFDIO_POISON = _IOWR(UFFDIO, 0x08, struct uffdio_poison)` (Linux 6.6+).
pub const UFFDIO_POISON: u32 = iowr(UFFDIO, _UFFDIO_POISON, size_of::<uffdio_poison>());
/// `USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)`, issued on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u32 = io(UFFDIO, 0x00);

/// `UFFD_USER_MODE_ONLY`: only handle faults raised by user-mode accesses.
pub const UFFD_USER_MODE_ONLY: u32 = 1;

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_WP`.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP`.
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_POISON_MODE_DONTWAKE`.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE_MODE_DONTWAKE`.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN (fs/proc/task_mmu.c, Linux 6.7+)
// ---------------------------------------------------------------------------

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`, issued on `/proc/PID/pagemap`.
pub const PAGEMAP_SCAN: u32 = iowr(b'f' as u32, 16, size_of::<pm_scan_arg>());
/// `PM_SCAN_WP_MATCHING`: write-protect the reported pages (atomically with the scan).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on ranges not registered for async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

// ---------------------------------------------------------------------------
// NBD (include/uapi/linux/nbd.h) and the block layer
// ---------------------------------------------------------------------------

/// The ioctl type byte of the NBD ioctls (0xab).
pub const NBD_IOCTL_TYPE: u32 = 0xab;
/// `NBD_SET_SOCK = _IO(0xab, 0)`.
pub const NBD_SET_SOCK: u32 = io(NBD_IOCTL_TYPE, 0);
/// `NBD_SET_BLKSIZE = _IO(0xab, 1)`.
pub const NBD_SET_BLKSIZE: u32 = io(NBD_IOCTL_TYPE, 1);
/// `NBD_SET_SIZE = _IO(0xab, 2)`.
pub const NBD_SET_SIZE: u32 = io(NBD_IOCTL_TYPE, 2);
/// `NBD_DO_IT = _IO(0xab, 3)`.
pub const NBD_DO_IT: u32 = io(NBD_IOCTL_TYPE, 3);
/// `NBD_CLEAR_SOCK = _IO(0xab, 4)`.
pub const NBD_CLEAR_SOCK: u32 = io(NBD_IOCTL_TYPE, 4);
/// `NBD_CLEAR_QUE = _IO(0xab, 5)`.
pub const NBD_CLEAR_QUE: u32 = io(NBD_IOCTL_TYPE, 5);
/// `NBD_SET_SIZE_BLOCKS = _IO(0xab, 7)`.
pub const NBD_SET_SIZE_BLOCKS: u32 = io(NBD_IOCTL_TYPE, 7);
/// `NBD_DISCONNECT = _IO(0xab, 8)`.
pub const NBD_DISCONNECT: u32 = io(NBD_IOCTL_TYPE, 8);
/// `NBD_SET_TIMEOUT = _IO(0xab, 9)`.
pub const NBD_SET_TIMEOUT: u32 = io(NBD_IOCTL_TYPE, 9);
/// `NBD_SET_FLAGS = _IO(0xab, 10)`.
pub const NBD_SET_FLAGS: u32 = io(NBD_IOCTL_TYPE, 10);
/// `BLKFLSBUF = _IO(0x12, 97)`: write back and drop a block device's buffers.
pub const BLKFLSBUF: u32 = io(0x12, 97);

// ---------------------------------------------------------------------------
// Compile-time pins
// ---------------------------------------------------------------------------

// Struct sizes, against the kernel headers' values.
const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_move>() == 40);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffdio_poison>() == 32);
const _: () = assert!(size_of::<uffd_msg>() == 32);
const _: () = assert!(size_of::<pm_scan_arg>() == 96);
const _: () = assert!(size_of::<page_region>() == 24);

// Ioctl numbers, against the literal values of the kernel headers. The
// generic encoding with 64-bit-only structs gives identical numbers on these
// architectures.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const _: () = {
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    assert!(UFFDIO_MOVE == 0xc028_aa05);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
    assert!(UFFDIO_CONTINUE == 0xc020_aa07);
    assert!(UFFDIO_POISON == 0xc020_aa08);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
    assert!(PAGEMAP_SCAN == 0xc060_6610);
};

// Ioctl numbers, against linux-raw-sys (generated from the kernel headers for
// every architecture) where it has them.
const _: () = {
    assert!(UFFDIO_API == lio::UFFDIO_API);
    assert!(UFFDIO_REGISTER == lio::UFFDIO_REGISTER);
    assert!(UFFDIO_UNREGISTER == lio::UFFDIO_UNREGISTER);
    assert!(UFFDIO_WAKE == lio::UFFDIO_WAKE);
    assert!(UFFDIO_COPY == lio::UFFDIO_COPY);
    assert!(UFFDIO_ZEROPAGE == lio::UFFDIO_ZEROPAGE);
    assert!(UFFDIO_WRITEPROTECT == lio::UFFDIO_WRITEPROTECT);
    assert!(UFFDIO_CONTINUE == lio::UFFDIO_CONTINUE);
};

// Every other constant, against linux-raw-sys.
const _: () = {
    assert!(UFFDIO == g::UFFDIO);
    assert!(UFFDIO == g::USERFAULTFD_IOC);
    assert!(UFFD_API == g::UFFD_API as u64);
    assert!(UFFD_USER_MODE_ONLY == g::UFFD_USER_MODE_ONLY);
    assert!(_UFFDIO_REGISTER == g::_UFFDIO_REGISTER);
    assert!(_UFFDIO_UNREGISTER == g::_UFFDIO_UNREGISTER);
    assert!(_UFFDIO_WAKE == g::_UFFDIO_WAKE);
    assert!(_UFFDIO_COPY == g::_UFFDIO_COPY);
    assert!(_UFFDIO_ZEROPAGE == g::_UFFDIO_ZEROPAGE);
    assert!(_UFFDIO_MOVE == g::_UFFDIO_MOVE);
    assert!(_UFFDIO_WRITEPROTECT == g::_UFFDIO_WRITEPROTECT);
    assert!(_UFFDIO_CONTINUE == g::_UFFDIO_CONTINUE);
    assert!(_UFFDIO_POISON == g::_UFFDIO_POISON);
    assert!(_UFFDIO_API == g::_UFFDIO_API);
    assert!(UFFDIO_REGISTER_MODE_MISSING == g::UFFDIO_REGISTER_MODE_MISSING as u64);
    assert!(UFFDIO_REGISTER_MODE_WP == g::UFFDIO_REGISTER_MODE_WP as u64);
    assert!(UFFDIO_REGISTER_MODE_MINOR == g::UFFDIO_REGISTER_MODE_MINOR as u64);
    assert!(UFFDIO_COPY_MODE_DONTWAKE == g::UFFDIO_COPY_MODE_DONTWAKE as u64);
    assert!(UFFDIO_COPY_MODE_WP == g::UFFDIO_COPY_MODE_WP as u64);
    assert!(UFFDIO_ZEROPAGE_MODE_DONTWAKE == g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64);
    assert!(UFFD_EVENT_PAGEFAULT as u32 == g::UFFD_EVENT_PAGEFAULT);
    assert!(UFFD_EVENT_FORK as u32 == g::UFFD_EVENT_FORK);
    assert!(UFFD_EVENT_REMAP as u32 == g::UFFD_EVENT_REMAP);
    assert!(UFFD_EVENT_REMOVE as u32 == g::UFFD_EVENT_REMOVE);
    assert!(UFFD_EVENT_UNMAP as u32 == g::UFFD_EVENT_UNMAP);
    assert!(UFFD_PAGEFAULT_FLAG_WRITE == g::UFFD_PAGEFAULT_FLAG_WRITE as u64);
    assert!(UFFD_PAGEFAULT_FLAG_WP == g::UFFD_PAGEFAULT_FLAG_WP as u64);
    assert!(UFFD_PAGEFAULT_FLAG_MINOR == g::UFFD_PAGEFAULT_FLAG_MINOR as u64);
    assert!(PM_SCAN_WP_MATCHING == g::PM_SCAN_WP_MATCHING as u64);
    assert!(PM_SCAN_CHECK_WPASYNC == g::PM_SCAN_CHECK_WPASYNC as u64);
};

// NBD and block ioctls, against the literal values of the headers (the same on every
// architecture: `_IO` has no size and direction 0 except on the few with other `_IOC_NONE`)
// and against linux-raw-sys.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const _: () = {
    assert!(NBD_SET_SOCK == 0xab00);
    assert!(NBD_SET_BLKSIZE == 0xab01);
    assert!(NBD_SET_SIZE == 0xab02);
    assert!(NBD_DO_IT == 0xab03);
    assert!(NBD_CLEAR_SOCK == 0xab04);
    assert!(NBD_CLEAR_QUE == 0xab05);
    assert!(NBD_SET_SIZE_BLOCKS == 0xab07);
    assert!(NBD_DISCONNECT == 0xab08);
    assert!(NBD_SET_TIMEOUT == 0xab09);
    assert!(NBD_SET_FLAGS == 0xab0a);
    assert!(BLKFLSBUF == 0x1261);
};
const _: () = {
    assert!(NBD_SET_SOCK == lio::NBD_SET_SOCK);
    assert!(NBD_SET_BLKSIZE == lio::NBD_SET_BLKSIZE);
    assert!(NBD_SET_SIZE == lio::NBD_SET_SIZE);
    assert!(NBD_DO_IT == lio::NBD_DO_IT);
    assert!(NBD_CLEAR_SOCK == lio::NBD_CLEAR_SOCK);
    assert!(NBD_CLEAR_QUE == lio::NBD_CLEAR_QUE);
    assert!(NBD_SET_SIZE_BLOCKS == lio::NBD_SET_SIZE_BLOCKS);
    assert!(NBD_DISCONNECT == lio::NBD_DISCONNECT);
    assert!(NBD_SET_TIMEOUT == lio::NBD_SET_TIMEOUT);
    assert!(NBD_SET_FLAGS == lio::NBD_SET_FLAGS);
    assert!(BLKFLSBUF == lio::BLKFLSBUF);
};

// The encoded payload sizes decode back to the struct sizes (guards the
// size-field width on every architecture).
const _: () = {
    assert!(ioc_size(UFFDIO_MOVE) == size_of::<uffdio_move>());
    assert!(ioc_size(UFFDIO_POISON) == size_of::<uffdio_poison>());
    assert!(ioc_size(PAGEMAP_SCAN) == size_of::<pm_scan_arg>());
    assert!(ioc_nr(UFFDIO_MOVE) == _UFFDIO_MOVE && ioc_type(UFFDIO_MOVE) == UFFDIO);
    assert!(ioc_dir(USERFAULTFD_IOC_NEW) == IOC_NONE);
};

/// Every userfaultfd/pagemap ioctl number with its name, for tests and
/// diagnostics (`(name, number, payload size)`).
#[must_use]
pub const fn ioctl_numbers() -> [(&'static str, u32, usize); 12] {
    [
        ("UFFDIO_API", UFFDIO_API, size_of::<uffdio_api>()),
        (
            "UFFDIO_REGISTER",
            UFFDIO_REGISTER,
            size_of::<uffdio_register>(),
        ),
        (
            "UFFDIO_UNREGISTER",
            UFFDIO_UNREGISTER,
            size_of::<uffdio_range>(),
        ),
        ("UFFDIO_WAKE", UFFDIO_WAKE, size_of::<uffdio_range>()),
        ("UFFDIO_COPY", UFFDIO_COPY, size_of::<uffdio_copy>()),
        (
            "UFFDIO_ZEROPAGE",
            UFFDIO_ZEROPAGE,
            size_of::<uffdio_zeropage>(),
        ),
        ("UFFDIO_MOVE", UFFDIO_MOVE, size_of::<uffdio_move>()),
        (
            "UFFDIO_WRITEPROTECT",
            UFFDIO_WRITEPROTECT,
            size_of::<uffdio_writeprotect>(),
        ),
        (
            "UFFDIO_CONTINUE",
            UFFDIO_CONTINUE,
            size_of::<uffdio_continue>(),
        ),
        ("UFFDIO_POISON", UFFDIO_POISON, size_of::<uffdio_poison>()),
        ("USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW, 0),
        ("PAGEMAP_SCAN", PAGEMAP_SCAN, size_of::<pm_scan_arg>()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_sizes_match_structs() {
        for (name, nr, size) in ioctl_numbers() {
            assert_eq!(ioc_size(nr), size, "{name}: size field");
            if name == "PAGEMAP_SCAN" {
                assert_eq!(ioc_type(nr), u32::from(b'f'), "{name}: type");
            } else {
                assert_eq!(ioc_type(nr), UFFDIO, "{name}: type");
            }
        }
    }

    #[test]
    fn directions() {
        assert_eq!(ioc_dir(UFFDIO_COPY), IOC_READ | IOC_WRITE);
        assert_eq!(ioc_dir(UFFDIO_WAKE), IOC_READ);
        assert_eq!(ioc_dir(UFFDIO_UNREGISTER), IOC_READ);
        assert_eq!(ioc_dir(USERFAULTFD_IOC_NEW), IOC_NONE);
        assert_eq!(ioc_dir(iow(1, 2, 8)), IOC_WRITE);
        assert_eq!(ioc_dir(ior(1, 2, 8)), IOC_READ);
    }
}
