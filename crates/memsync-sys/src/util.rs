//! Small syscall helpers: errno conversion, `poll(2)`, thread and user ids.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Converts a `-1`-means-error return value into an [`io::Result`].
pub(crate) fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] but retries the call while it fails with `EINTR`.
pub(crate) fn cvt_r<T: Copy + PartialEq + From<i8>>(mut f: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Converts an optional timeout into the remaining milliseconds for
/// `poll(2)` (`-1`: forever), rounding up.
fn poll_ms(deadline: Option<Instant>) -> libc::c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// Polls `pfds` for `POLLIN`, retrying `EINTR` until `deadline`. Returns
/// whether any descriptor is ready. Does not allocate.
fn poll_raw(pfds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let nfds = libc::nfds_t::try_from(pfds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    loop {
        for p in pfds.iter_mut() {
            p.revents = 0;
        }
        // SAFETY: `pfds` is a live, exclusively borrowed array of exactly
        // `nfds` initialised `pollfd` structs; poll(2) only writes their
        // `revents` fields. The callers hold borrows of the descriptors, so
        // they stay open during the call.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, poll_ms(deadline)) };
        match cvt(ret) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

const READY: libc::c_short = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

/// Waits until `fd` is readable or `timeout` passes; see [`poll_readable`].
/// Does not allocate (safe to use in a userfaultfd handler thread while
/// another thread's `fork` holds the allocator's locks).
pub(crate) fn poll_one(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    Ok(poll_raw(&mut pfd, timeout)? && pfd[0].revents & READY != 0)
}

/// Waits until at least one of `fds` is readable, or `timeout` passes
/// (`None` waits forever).
///
/// Returns one flag per descriptor, in order; all `false` means the timeout
/// expired. A descriptor also counts as readable when `poll(2)` reports
/// `POLLHUP`, `POLLERR` or `POLLNVAL` for it, so that the following `read`
/// reports the condition instead of the caller waiting forever. `EINTR` is
/// retried with the remaining time.
///
/// A fault-handler thread typically polls its (non-blocking) userfaultfd
/// together with the read end of a pipe that is written to ask it to stop.
///
/// # Errors
///
/// The `poll(2)` error.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    poll_raw(&mut pfds, timeout)?;
    Ok(pfds.iter().map(|p| p.revents & READY != 0).collect())
}

/// The calling thread's kernel thread id (`gettid(2)`), as reported in
/// [`Event::PageFault`](crate::Event::PageFault)'s `thread_id`.
#[must_use]
pub fn gettid() -> u32 {
    // SAFETY: gettid(2) has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid.unsigned_abs()
}

/// The effective user id of the process (`geteuid(2)`).
#[must_use]
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
