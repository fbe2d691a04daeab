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

/// The CPU the calling thread is running on (`sched_getcpu(3)`); it may
/// change at any moment unless the thread is pinned.
///
/// # Errors
///
/// The `sched_getcpu(3)` error (`ENOSYS` where unsupported).
pub fn current_cpu() -> io::Result<usize> {
    // SAFETY: sched_getcpu(3) has no preconditions and touches no memory
    // of the caller.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).map_err(|_| io::Error::last_os_error())
}

/// The CPUs the calling thread may run on (`sched_getaffinity(2)`), in
/// ascending order: under a cpuset they need not be `0..n`.
///
/// # Errors
///
/// The `sched_getaffinity(2)` error.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0
    // is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: `c < max`, the number of bits in the set.
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restricts the calling thread to the CPUs in `cpus` (`sched_setaffinity(2)`
/// with pid 0); an empty slice allows every CPU the process may use
/// (`sched_getaffinity` of the process is not consulted: all CPUs up to
/// `CPU_SETSIZE`).
///
/// # Errors
///
/// `InvalidInput` for a CPU number of `CPU_SETSIZE` (1024) or more; the
/// `sched_setaffinity(2)` error otherwise (`EINVAL` if no listed CPU is
/// online or allowed).
pub fn set_thread_affinity(cpus: &[usize]) -> io::Result<()> {
    let max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpus.is_empty() {
        for c in 0..max {
            // SAFETY: `c < max`, the number of bits in the set.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    } else {
        for &c in cpus {
            if c >= max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "CPU number out of range",
                ));
            }
            // SAFETY: `c < max` was checked just above.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread; the call only changes scheduling.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod affinity_tests {
    use super::*;

    #[test]
    fn pin_to_current_cpu_and_back() {
        let cpu = current_cpu().unwrap();
        set_thread_affinity(&[cpu]).unwrap();
        for _ in 0..100 {
            assert_eq!(current_cpu().unwrap(), cpu);
            std::thread::yield_now();
        }
        set_thread_affinity(&[]).unwrap();
        assert!(set_thread_affinity(&[1 << 20]).is_err());
        let allowed = allowed_cpus().unwrap();
        assert!(allowed.contains(&cpu), "{allowed:?} lacks {cpu}");
        assert!(allowed.windows(2).all(|w| w[0] < w[1]));
    }
}
