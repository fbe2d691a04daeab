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

/// Write back the dirty page cache of `fd` (the whole file) and wait for it, with
/// `sync_file_range(2)` (`WAIT_BEFORE | WRITE | WAIT_AFTER`). Unlike `fsync(2)` it asks the
/// file system for no flush of its own: on a FUSE file it sends the WRITEs of the dirty pages
/// but no FSYNC, so the server is asked to store the data, not to make it durable anywhere.
///
/// # Errors
///
/// The `sync_file_range(2)` error (e.g. `ENOTCONN` from an aborted FUSE connection).
pub fn write_back_pages(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range(2) takes a descriptor that `fd` keeps open for the call and
    // plain integers (offset 0, length 0: to the end of the file); it touches no memory of ours.
    cvt_r(|| unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, flags) })?;
    Ok(())
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

/// What a child forked from this process finds at `addr..addr + len` of its
/// copy of the address space, for tests of what `fork(2)` does to a
/// mapping (e.g. [`Advice::DontFork`](crate::Advice::DontFork), or a
/// userfaultfd registration the child does not inherit).
///
/// The child copies the range into a pipe with `write(2)`, so it is the
/// kernel that reads it: a range the child does not have mapped is an
/// `EFAULT` error, not a crash. The child does nothing else (no allocation,
/// no lock) and exits with `_exit(2)`.
///
/// # Errors
///
/// The child's `write(2)` error (`EFAULT` for an unmapped range); `TimedOut`
/// if it has not finished after `timeout` (it is killed then); the
/// `pipe(2)`, `fork(2)` or `waitpid(2)` error.
pub fn read_after_fork(addr: usize, len: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    let deadline = Instant::now() + timeout;
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into the array, which is
    // exactly two ints long.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these descriptors, which nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child of a multi-threaded process may only make
    // async-signal-safe calls: it only calls write(2) and _exit(2) on
    // values computed before the fork.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        let mut done = 0;
        while done < len {
            // SAFETY: write(2) only reads `[addr + done, addr + len)`
            // through the kernel, which reports an unmapped address as
            // EFAULT; nothing in this process refers to the child's copy.
            let n = unsafe {
                libc::write(
                    wr.as_raw_fd(),
                    (addr + done) as *const libc::c_void,
                    (len - done).min(1 << 16),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if e == libc::EINTR {
                    continue;
                }
                // SAFETY: _exit(2) ends the child without running any
                // destructor or atexit handler of the parent's state.
                unsafe { libc::_exit(e) };
            }
            done += n.unsigned_abs();
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    let mut pipe = std::fs::File::from(rd);
    let mut data = Vec::with_capacity(len);
    let mut buf = [0u8; 1 << 16];
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !poll_one(pipe.as_fd(), Some(left))? {
            timed_out = true;
            break;
        }
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) writes one int to `status`, which outlives the
        // call; `pid` is our own unreaped child.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if timed_out || Instant::now() > deadline {
            // SAFETY: kill(2) only sends a signal, to our unreaped child,
            // which the blocking waitpid below then reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, &raw mut status, 0) };
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the forked child did not finish in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if libc::WIFSIGNALED(status) {
        return Err(io::Error::other(format!(
            "the forked child was killed by signal {}",
            libc::WTERMSIG(status)
        )));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(data),
        e => Err(io::Error::from_raw_os_error(e)),
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
