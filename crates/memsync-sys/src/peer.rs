//! Who is at the other end of a Unix socket (`SO_PEERCRED`), and a process
//! descriptor to learn when that process exits (`pidfd_open(2)`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::util::cvt;

/// The credentials of a socket's peer, as the kernel recorded them when it
/// connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

const _: () = assert!(size_of::<libc::ucred>() == 12);

/// `getsockopt(SO_PEERCRED)` on a connected Unix socket.
///
/// # Errors
///
/// The `getsockopt(2)` error (`ENOTCONN`, `ENOTSOCK`, ...).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes (one `ucred`) into
    // `cred`, a live, exclusively borrowed value of that size.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    })?;
    if len as usize != size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short ucred"));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// A process descriptor (`pidfd_open(2)`): readable once the process has
/// exited, and immune to pid reuse.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

impl Pidfd {
    /// Opens a descriptor for process `pid`.
    ///
    /// # Errors
    ///
    /// `ESRCH` if there is no such process; `ENOSYS` before Linux 5.3.
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of this process.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = cvt(ret)?;
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Whether the process has exited, waiting up to `timeout` (`None`:
    /// forever) for it.
    ///
    /// # Errors
    ///
    /// The `poll(2)` error.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> io::Result<bool> {
        Ok(crate::poll_readable(&[self.fd.as_fd()], timeout)?[0])
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_is_this_process_and_pidfd_sees_exit() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_credentials(a.as_fd()).unwrap();
        assert_eq!(c.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(c.uid, crate::euid());
        let me = Pidfd::open(c.pid).unwrap();
        assert!(!me.wait_exit(Some(Duration::ZERO)).unwrap());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let fd = Pidfd::open(pid).unwrap();
        child.wait().unwrap();
        assert!(fd.wait_exit(Some(Duration::from_secs(10))).unwrap());
    }
}
