//! Passing descriptors over Unix sockets (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::util::cvt_r;

/// The kernel's limit on descriptors per `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

const FD_SIZE: usize = size_of::<RawFd>();

/// A control-message buffer aligned for `cmsghdr`.
fn cmsg_buffer(max_fds: usize) -> (Vec<u64>, usize) {
    let payload = u32::try_from(max_fds * FD_SIZE).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    (vec![0u64; space.div_ceil(8)], space)
}

/// `CMSG_LEN` for `n` descriptors.
fn cmsg_len(n: usize) -> usize {
    let payload = u32::try_from(n * FD_SIZE).unwrap_or(u32::MAX);
    // SAFETY: CMSG_LEN is pure arithmetic on its argument.
    unsafe { libc::CMSG_LEN(payload) as usize }
}

/// Sends `data` with the descriptors `fds` attached (`sendmsg(2)` with
/// `SCM_RIGHTS`, `MSG_NOSIGNAL`). Returns the number of bytes of `data`
/// sent; on a short send the descriptors went with the first part.
///
/// # Errors
///
/// `InvalidInput` if `data` is empty (a stream socket would drop the
/// descriptors) or more than [`MAX_FDS_PER_MESSAGE`] descriptors are given;
/// the `sendmsg(2)` error otherwise.
pub fn send_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_fds needs at least one data byte",
        ));
    }
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let (mut cbuf, space) = cmsg_buffer(fds.len());
    // SAFETY: `msghdr` is a plain C struct for which all-zero is a valid
    // (empty) value; this also zeroes private padding fields on some libcs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `cbuf`, a live buffer of `space` bytes
        // aligned for `cmsghdr` and sized with CMSG_SPACE for `fds.len()`
        // descriptors, so CMSG_FIRSTHDR returns a non-null pointer to the
        // header at its start and CMSG_DATA points at room for exactly
        // `fds.len()` `c_int`s inside it; the data is written unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = cmsg_len(fds.len()) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` describes `data` (borrowed, only read by the kernel) and
    // the initialised control buffer; all of them outlive the call. The
    // descriptors are borrowed, so they are open while the kernel dups them.
    let sent =
        cvt_r(|| unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) })?;
    Ok(sent.unsigned_abs())
}

/// Receives data into `buf` and up to `max_fds` descriptors
/// (`recvmsg(2)` with `MSG_CMSG_CLOEXEC`). Returns the byte count (0 at end
/// of stream) and the received descriptors, now owned by the caller.
///
/// # Errors
///
/// `InvalidData` if the sender attached more than `max_fds` descriptors (the
/// kernel drops the excess, and this function closes the rest rather than
/// return a partial set); the `recvmsg(2)` error otherwise.
pub fn recv_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let (mut cbuf, space) = cmsg_buffer(max_fds);
    // SAFETY: all-zero is a valid empty `msghdr` (see `send_fds`).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        debug_assert!(space >= cmsg_len(max_fds));
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // CMSG_LEN rather than CMSG_SPACE: the padding of CMSG_SPACE can
        // leave room for one more descriptor than asked for.
        msg.msg_controllen = cmsg_len(max_fds) as _;
    }
    // SAFETY: `msg` describes `buf` and `cbuf`, exclusively borrowed live
    // buffers of the stated lengths that the kernel may fill.
    let n =
        cvt_r(|| unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let mut fds = Vec::new();
    if max_fds > 0 {
        // SAFETY: the kernel filled `cbuf` with `msg.msg_controllen` bytes of
        // well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR walk only
        // within that length and return null at its end.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and points at a complete header
            // inside `cbuf` (see above).
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let header = cmsg_len(0);
                let count = (hdr.cmsg_len as usize).saturating_sub(header) / FD_SIZE;
                // SAFETY: the SCM_RIGHTS payload holds `count` descriptors
                // within the header's length; they were just installed in
                // this process by recvmsg for us, so nothing else owns them
                // and each becomes exactly one `OwnedFd`.
                unsafe {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
            }
            // SAFETY: `cmsg` is a valid header of the control buffer
            // described by `msg`; CMSG_NXTHDR returns the next one or null.
            cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "peer sent more than {max_fds} descriptors; the message's descriptors were dropped"
            ),
        ));
    }
    Ok((n.unsigned_abs(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn round_trip_and_limits() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f =
            std::fs::File::from(crate::memfd_create("t", crate::MemfdFlags::default()).unwrap());
        f.write_all(b"xyz").unwrap();
        assert_eq!(send_fds(&a, b"hi", &[f.as_fd(), f.as_fd()]).unwrap(), 2);
        let mut buf = [0; 8];
        let (n, fds) = recv_fds(&b, &mut buf, 4).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 2));
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        let mut s = String::new();
        g.seek(SeekFrom::Start(0)).unwrap();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "xyz");

        assert!(send_fds(&a, b"", &[]).is_err());
        send_fds(&a, b"x", &[f.as_fd(), f.as_fd()]).unwrap();
        let err = recv_fds(&b, &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        send_fds(&a, b"plain", &[]).unwrap();
        let (n, fds) = recv_fds(&b, &mut buf, 0).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"plain"[..], 0));
    }
}
