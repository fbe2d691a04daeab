//! Safe Linux system interfaces for memsync: userfaultfd, `PAGEMAP_SCAN`,
//! owned memory mappings, memfd and descriptor passing.
//!
//! This is the **only crate of the workspace that contains `unsafe`** (the
//! others `forbid(unsafe_code)`). Every `unsafe` block carries a `SAFETY:`
//! argument, and the public API is safe except for the few functions that
//! act on arbitrary addresses ([`madvise`], [`Uffd::register_raw`],
//! [`Uffd::move_pages_raw`]), each with a documented contract. Other crates
//! never need a raw pointer: they use [`Mapping`]'s bounds-checked
//! [`read_at`](Mapping::read_at)/[`write_at`](Mapping::write_at)/[`fill`](Mapping::fill).
//!
//! No bindgen, no `userfaultfd` crate: the structs come from
//! [`linux_raw_sys`] and every ioctl number is computed with const `_IOC`
//! arithmetic and pinned at compile time (see [`raw`]), including those
//! newer than common system headers (`UFFDIO_MOVE`, `UFFDIO_POISON`,
//! `PAGEMAP_SCAN`, `USERFAULTFD_IOC_NEW`).
//!
//! # Overview
//!
//! * [`Uffd`]: a userfaultfd. [`Uffd::open`] (via `/dev/userfaultfd` or the
//!   syscall), [`Uffd::api`] handshake with [`Features`],
//!   [`Uffd::register`] a [`Mapping`] with a [`RegisterMode`], read
//!   [`Event`]s ([`Uffd::read_events`], [`Uffd::next_event`]) and resolve
//!   faults with [`Uffd::copy`], [`Uffd::zeropage`], [`Uffd::move_pages`],
//!   [`Uffd::continue_range`], [`Uffd::poison`],
//!   [`Uffd::write_unprotect`] and [`Uffd::wake`].
//! * [`PagemapScanner`]: `PAGEMAP_SCAN` queries, and write-tracking with
//!   [`Features::WP_ASYNC`] ([`ScanArgs::written_and_rearm`]).
//! * [`Mapping`], [`madvise`], [`memfd_create`], [`ftruncate`],
//!   [`page_size`], [`pmd_size`]: memory; [`SigbusFile`] and
//!   [`Mapping::map_sigbus`] make a range raise `SIGBUS` on any access.
//! * [`Staging`]: a private buffer that is filled through a `&mut [u8]` and
//!   then moved (`UFFDIO_MOVE`) or copied into a registered range.
//! * [`send_fds`]/[`recv_fds`]: `SCM_RIGHTS`.
//! * [`SigbusResolver`]: an experiment, not used by the lazy region:
//!   resolving MISSING faults on the faulting thread in a process-wide
//!   `SIGBUS` handler (`UFFD_FEATURE_SIGBUS`) from data already in memory.
//! * [`nbd`]: the kernel's NBD client, by generic netlink ([`nbd::NbdNetlink`], on
//!   [`netlink::GenlSocket`], a raw netlink socket with a safe message builder and parser)
//!   or by ioctl ([`nbd::set_sock`], [`nbd::do_it`], ...).
//! * [`poll_readable`], [`gettid`], [`euid`]: small helpers for handler
//!   threads and tests; [`read_after_fork`]: what a forked child sees.
//!
//! # Errors
//!
//! Every fallible call returns [`std::io::Error`] carrying the raw errno
//! (check it with [`io::Error::raw_os_error`](std::io::Error::raw_os_error)),
//! with two exceptions. [`Uffd::open`] wraps both of its failures in an
//! [`OpenError`] that explains how to get permission. And the resolving
//! ioctls (`COPY`, `ZEROPAGE`, `MOVE`, `CONTINUE`, `POISON`) map the two
//! errnos that are part of normal operation to an [`Install`] value:
//!
//! | kernel result | returned |
//! |---|---|
//! | success | `Ok(Install::Done(bytes))` |
//! | `EEXIST`, nothing done | `Ok(Install::Exists)`: page already there; [`Uffd::wake`] the range |
//! | `EAGAIN` (or `EEXIST` after progress) | `Ok(Install::Again { done })`: `done` bytes installed; drain events, retry the rest |
//! | any other errno | `Err(io::Error)` |
//!
//! # A fault handler
//!
//! ```no_run
//! use std::time::Duration;
//! use memsync_sys::{CopyMode, Event, Features, Install, Mapping, OpenFlags, RegisterMode, Uffd};
//!
//! # fn main() -> std::io::Result<()> {
//! let region = Mapping::anonymous(1 << 20)?;
//! let (uffd, _) = Uffd::with_features(OpenFlags::default(), Features::THREAD_ID)?;
//! uffd.register(&region, RegisterMode::MISSING)?;
//! // ... another thread touches `region` ...
//! while let Some(event) = uffd.next_event(Some(Duration::from_secs(1)))? {
//!     if let Event::PageFault { addr, .. } = event {
//!         let page = addr & !(memsync_sys::page_size() - 1);
//!         let data = vec![0xAB; memsync_sys::page_size()];
//!         match uffd.copy(page, &data, CopyMode::empty())? {
//!             Install::Done(_) => {}
//!             Install::Exists => uffd.wake(page, data.len())?,
//!             Install::Again { .. } => { /* drain events, then retry */ }
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Platform
//!
//! Linux only. `UFFDIO_MOVE` and [`Features::MOVE`] need Linux 6.8,
//! `UFFDIO_POISON` 6.6, `PAGEMAP_SCAN` and [`Features::WP_ASYNC`] 6.7,
//! `/dev/userfaultfd` 6.1; older kernels answer `EINVAL`/`ENOTTY` and do
//! not report the feature bits.

#![cfg(target_os = "linux")]

mod fdpass;
mod mem;
pub mod nbd;
pub mod netlink;
mod pagemap;
mod peer;
pub mod raw;
mod sigbus;
mod staging;
mod uffd;
mod util;

pub use fdpass::{MAX_FDS_PER_MESSAGE, recv_fds, send_fds};
pub use mem::{
    Advice, MapOptions, Mapping, MemfdFlags, SigbusFile, ftruncate, madvise, memfd_create,
    page_size, pmd_size,
};
pub use pagemap::{PageCategories, PageRegion, PagemapScanner, ScanArgs, ScanFlags, ScanResult};
pub use peer::{PeerCred, Pidfd, peer_credentials};
pub use sigbus::{MAX_SIGBUS_REGIONS, SigbusResolver};
pub use staging::Staging;
pub use uffd::{
    ApiInfo, ContinueMode, CopyMode, Event, Features, Install, Ioctls, MoveMode, OpenError,
    OpenFlags, PageFaultFlags, RegisterMode, Remap, RemapRange, Uffd, UffdMsg,
};
pub use util::{
    allowed_cpus, current_cpu, euid, gettid, poll_readable, read_after_fork, set_thread_affinity,
    write_back_pages,
};

// The handler-thread design relies on these being shareable.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Uffd>();
    shareable::<Mapping>();
    shareable::<PagemapScanner>();
    shareable::<Staging>();
    shareable::<SigbusResolver>();
};
