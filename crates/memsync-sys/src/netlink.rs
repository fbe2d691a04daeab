//! Generic netlink on a raw `NETLINK_GENERIC` socket: a message builder, a parser of the
//! kernel's replies, and [`GenlSocket`] (request, ACK, errors; family ids resolved by name).
//!
//! No libnl. Messages are `nlmsghdr` + `genlmsghdr` + attributes (`nlattr`: length, type,
//! payload padded to 4 bytes), all in native byte order, as `include/uapi/linux/netlink.h`
//! and `genetlink.h` define them. The builder and the parser are safe code; only the socket
//! calls use `unsafe`. The parser treats every byte from the socket as outside input: a
//! truncated, overlong or misaligned message or attribute is an error, never a panic.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::util::{cvt, cvt_r};

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct genlmsghdr)`.
pub const GENL_HDRLEN: usize = 4;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: usize = 4;

/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error, or with error 0 an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a multipart dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`.
pub const NLMSG_OVERRUN: u16 = 4;
/// `GENL_ID_CTRL`: the generic netlink controller's family id.
pub const GENL_ID_CTRL: u16 = 0x10;

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;

/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER`.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// `NLA_TYPE_MASK`.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (NUL-terminated string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// Against libc where it has them.
const _: () = {
    assert!(NLMSG_HDRLEN == size_of::<libc::nlmsghdr>());
    assert!(GENL_HDRLEN == size_of::<libc::genlmsghdr>());
    assert!(NLA_HDRLEN == size_of::<libc::nlattr>());
    assert!(NLMSG_ERROR as libc::c_int == libc::NLMSG_ERROR);
    assert!(NLMSG_DONE as libc::c_int == libc::NLMSG_DONE);
    assert!(NLMSG_NOOP as libc::c_int == libc::NLMSG_NOOP);
    assert!(NLMSG_OVERRUN as libc::c_int == libc::NLMSG_OVERRUN);
    assert!(GENL_ID_CTRL as libc::c_int == libc::GENL_ID_CTRL);
    assert!(NLM_F_REQUEST as libc::c_int == libc::NLM_F_REQUEST);
    assert!(NLM_F_MULTI as libc::c_int == libc::NLM_F_MULTI);
    assert!(NLM_F_ACK as libc::c_int == libc::NLM_F_ACK);
    assert!(NLA_F_NESTED as libc::c_int == libc::NLA_F_NESTED);
    assert!(NLA_F_NET_BYTEORDER as libc::c_int == libc::NLA_F_NET_BYTEORDER);
    assert!(CTRL_CMD_GETFAMILY as libc::c_int == libc::CTRL_CMD_GETFAMILY);
    assert!(CTRL_ATTR_FAMILY_ID as libc::c_int == libc::CTRL_ATTR_FAMILY_ID);
    assert!(CTRL_ATTR_FAMILY_NAME as libc::c_int == libc::CTRL_ATTR_FAMILY_NAME);
};

/// Most attributes [`parse_attrs`] accepts in one attribute list.
pub const MAX_ATTRS: usize = 4096;
/// Most messages [`parse_messages`] accepts in one datagram.
pub const MAX_MESSAGES: usize = 1024;
/// Bytes a received datagram may have (larger ones are reported truncated).
pub const RECV_BUF: usize = 64 * 1024;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A malformed netlink message or attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlError(pub String);

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed netlink reply: {}", self.0)
    }
}

impl std::error::Error for NlError {}

impl From<NlError> for io::Error {
    fn from(e: NlError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

fn bad(msg: impl Into<String>) -> NlError {
    NlError(msg.into())
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

/// Builds one generic netlink request: header, then attributes (nests by
/// [`begin_nest`](Self::begin_nest)/[`end_nest`](Self::end_nest)).
#[derive(Debug, Clone)]
pub struct MsgBuilder {
    buf: Vec<u8>,
}

/// An open nest, closed by [`MsgBuilder::end_nest`].
#[derive(Debug)]
#[must_use]
pub struct Nest(usize);

impl MsgBuilder {
    /// A request to generic netlink family `family` (`NLM_F_REQUEST` is always set).
    pub fn genl(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MsgBuilder { buf }
    }

    fn put(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + data.len();
        let len16 = u16::try_from(len).expect("netlink attribute larger than 64 KiB");
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// A `u8` attribute.
    pub fn put_u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.put(ty, &[v])
    }
    /// A `u16` attribute.
    pub fn put_u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// A `u32` attribute.
    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// A `u64` attribute.
    pub fn put_u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// A NUL-terminated string attribute (`NLA_STRING`/`NLA_NUL_STRING`).
    pub fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(ty, &v)
    }

    /// Open a nested attribute; what is put until [`end_nest`](Self::end_nest) goes inside.
    pub fn begin_nest(&mut self, ty: u16) -> Nest {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        Nest(at)
    }

    /// Close a nest: its length now covers everything put since it was opened.
    pub fn end_nest(&mut self, n: Nest) -> &mut Self {
        let len = u16::try_from(self.buf.len() - n.0).expect("nest larger than 64 KiB");
        self.buf[n.0..n.0 + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("netlink message larger than 4 GiB");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

// ---------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    /// `nlmsg_type`: a family id, or `NLMSG_ERROR`/`NLMSG_DONE`/...
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// The bytes after the header.
    pub payload: &'a [u8],
}

/// Split a received datagram into its messages.
pub fn parse_messages(buf: &[u8]) -> Result<Vec<Msg<'_>>, NlError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if out.len() == MAX_MESSAGES {
            return Err(bad(format!("more than {MAX_MESSAGES} messages")));
        }
        if rest.len() < NLMSG_HDRLEN {
            return Err(bad(format!(
                "{} bytes left, less than a header",
                rest.len()
            )));
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(bad(format!(
                "message length {len} with {} bytes left",
                rest.len()
            )));
        }
        out.push(Msg {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes")),
            pid: u32::from_ne_bytes(rest[12..16].try_into().expect("4 bytes")),
            payload: &rest[NLMSG_HDRLEN..len],
        });
        // The last message may lack its padding.
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// What one message says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `NLMSG_ERROR` with error 0: the request succeeded.
    Ack,
    /// `NLMSG_ERROR` with an errno (positive here).
    Error(i32),
    /// `NLMSG_DONE`.
    Done,
    /// `NLMSG_NOOP` (to be skipped).
    Noop,
    /// A generic netlink message: command, version, attributes.
    Genl {
        /// `genlmsghdr.cmd`.
        cmd: u8,
        /// `genlmsghdr.version`.
        version: u8,
        /// The attribute bytes after the generic header.
        attrs: &'a [u8],
    },
}

/// Interpret one message.
pub fn parse_reply<'a>(m: &Msg<'a>) -> Result<Reply<'a>, NlError> {
    match m.ty {
        NLMSG_ERROR => {
            if m.payload.len() < 4 {
                return Err(bad("error message without an error code"));
            }
            let e = i32::from_ne_bytes(m.payload[0..4].try_into().expect("4 bytes"));
            match e {
                0 => Ok(Reply::Ack),
                e if e < 0 && e > -4096 => Ok(Reply::Error(-e)),
                e => Err(bad(format!("error code {e} is not a negative errno"))),
            }
        }
        NLMSG_DONE => Ok(Reply::Done),
        NLMSG_NOOP => Ok(Reply::Noop),
        NLMSG_OVERRUN => Err(bad("the kernel reports an overrun")),
        _ => {
            if m.payload.len() < GENL_HDRLEN {
                return Err(bad("generic netlink message without its header"));
            }
            Ok(Reply::Genl {
                cmd: m.payload[0],
                version: m.payload[1],
                attrs: &m.payload[GENL_HDRLEN..],
            })
        }
    }
}

/// One attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// The type without the `NLA_F_*` bits.
    pub ty: u16,
    /// `NLA_F_NESTED` was set.
    pub nested: bool,
    /// The payload (without padding).
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    fn fixed<const N: usize>(&self, what: &str) -> Result<[u8; N], NlError> {
        self.data.try_into().map_err(|_| {
            bad(format!(
                "attribute {} ({what}) has {} bytes, not {N}",
                self.ty,
                self.data.len()
            ))
        })
    }
    /// The payload as a `u8`.
    pub fn u8(&self) -> Result<u8, NlError> {
        Ok(self.fixed::<1>("u8")?[0])
    }
    /// The payload as a `u16`.
    pub fn u16(&self) -> Result<u16, NlError> {
        Ok(u16::from_ne_bytes(self.fixed("u16")?))
    }
    /// The payload as a `u32`.
    pub fn u32(&self) -> Result<u32, NlError> {
        Ok(u32::from_ne_bytes(self.fixed("u32")?))
    }
    /// The payload as a `u64`.
    pub fn u64(&self) -> Result<u64, NlError> {
        Ok(u64::from_ne_bytes(self.fixed("u64")?))
    }
    /// The payload as a string (up to its first NUL), which must be UTF-8.
    pub fn str(&self) -> Result<&'a str, NlError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.data.len());
        std::str::from_utf8(&self.data[..end])
            .map_err(|_| bad(format!("attribute {}: string is not UTF-8", self.ty)))
    }
    /// The payload as a list of attributes.
    pub fn nested(&self) -> Result<Vec<Attr<'a>>, NlError> {
        parse_attrs(self.data)
    }
}

/// Parse an attribute list.
pub fn parse_attrs(buf: &[u8]) -> Result<Vec<Attr<'_>>, NlError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if out.len() == MAX_ATTRS {
            return Err(bad(format!("more than {MAX_ATTRS} attributes")));
        }
        if rest.len() < NLA_HDRLEN {
            return Err(bad(format!(
                "{} bytes left, less than an attribute header",
                rest.len()
            )));
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let raw_ty = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < NLA_HDRLEN || len > rest.len() {
            return Err(bad(format!(
                "attribute length {len} with {} bytes left",
                rest.len()
            )));
        }
        out.push(Attr {
            ty: raw_ty & NLA_TYPE_MASK,
            nested: raw_ty & NLA_F_NESTED != 0,
            data: &rest[NLA_HDRLEN..len],
        });
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// The first attribute of type `ty`, if any.
pub fn find<'a, 'b>(attrs: &'b [Attr<'a>], ty: u16) -> Option<&'b Attr<'a>> {
    attrs.iter().find(|a| a.ty == ty)
}

/// The family id in a `CTRL_CMD_GETFAMILY` reply's attributes.
pub fn parse_family_id(attrs: &[u8]) -> Result<u16, NlError> {
    let attrs = parse_attrs(attrs)?;
    find(&attrs, CTRL_ATTR_FAMILY_ID)
        .ok_or_else(|| bad("no CTRL_ATTR_FAMILY_ID in the controller's reply"))?
        .u16()
}

// ---------------------------------------------------------------------------
// Socket
// ---------------------------------------------------------------------------

/// A `NETLINK_GENERIC` socket that sends one request at a time and collects its answer.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    port: u32,
}

/// The answer to one request: the generic netlink messages before the acknowledgement, each
/// as (command, attribute bytes).
pub type Answer = Vec<(u8, Vec<u8>)>;

impl GenlSocket {
    /// Open and bind a socket. `timeout` bounds each wait for the kernel's answer.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        })?;
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `sockaddr_nl` is a plain C struct; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a live `sockaddr_nl` of `len` bytes, only read by bind(2).
        cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
        let mut got_len = len;
        // SAFETY: `addr` is a live, writable `sockaddr_nl`; getsockname(2) writes at most
        // `got_len` bytes into it and updates `got_len`.
        cvt(unsafe {
            libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &raw mut got_len)
        })?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_usec: timeout.subsec_micros().into(),
        };
        // SAFETY: `tv` is a live `timeval`, read by setsockopt(2) for its size.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        // Truncated acknowledgements: an error answer need not echo the whole request.
        let one: libc::c_int = 1;
        // SAFETY: `one` is a live `c_int`, read by setsockopt(2) for its size. Kernels
        // without NETLINK_CAP_ACK (before 4.3) refuse it; the answer is then only longer.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_CAP_ACK,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(GenlSocket {
            fd,
            seq: 1,
            port: addr.nl_pid,
        })
    }

    /// The next sequence number, for [`MsgBuilder::genl`].
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Send a request built with `seq` (and `NLM_F_ACK`), and collect the messages answering
    /// it until its acknowledgement. An error answer is returned as the errno's `io::Error`.
    pub fn request(&mut self, msg: &[u8], seq: u32) -> io::Result<Answer> {
        // SAFETY: `msg` is a live buffer of `msg.len()` bytes, only read by send(2); the
        // destination is the socket's default (the kernel).
        let n = cvt_r(|| unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        })?;
        if n as usize != msg.len() {
            return Err(io::Error::other("netlink request sent in part"));
        }
        let mut buf = vec![0u8; RECV_BUF];
        let mut out = Vec::new();
        loop {
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes; recv(2) writes
            // at most that many. MSG_TRUNC makes it return the datagram's real length.
            let n = cvt_r(|| unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            })
            .map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "no answer from the kernel")
                } else {
                    e
                }
            })? as usize;
            if n > buf.len() {
                return Err(NlError(format!("a datagram of {n} bytes was truncated")).into());
            }
            for m in parse_messages(&buf[..n])? {
                if m.seq != seq || (m.pid != self.port && m.pid != 0) {
                    continue; // an answer to an earlier request, or a notification
                }
                match parse_reply(&m)? {
                    Reply::Ack | Reply::Done => return Ok(out),
                    Reply::Error(e) => return Err(io::Error::from_raw_os_error(e)),
                    Reply::Noop => {}
                    Reply::Genl { cmd, attrs, .. } => {
                        out.push((cmd, attrs.to_vec()));
                    }
                }
            }
        }
    }

    /// The id of generic netlink family `name`, or `None` if the kernel has no such family
    /// (its module not loaded, or not built).
    pub fn family(&mut self, name: &str) -> io::Result<Option<u16>> {
        let seq = self.next_seq();
        let mut b = MsgBuilder::genl(GENL_ID_CTRL, NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1);
        b.put_str(CTRL_ATTR_FAMILY_NAME, name);
        match self.request(&b.finish(), seq) {
            Ok(answer) => {
                let (_, attrs) = answer.first().ok_or_else(|| {
                    io::Error::from(NlError("no answer to CTRL_CMD_GETFAMILY".into()))
                })?;
                Ok(Some(parse_family_id(attrs)?))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_lays_out_header_attributes_and_nests() {
        let mut b = MsgBuilder::genl(0x20, NLM_F_ACK, 7, 1, 1);
        b.put_u32(1, 5).put_u64(2, 1 << 40);
        let n = b.begin_nest(7);
        let i = b.begin_nest(1);
        b.put_u32(1, 42);
        b.end_nest(i);
        b.end_nest(n);
        b.put_str(10, "abc");
        let msg = b.finish();
        assert_eq!(msg.len() % 4, 0);
        let ms = parse_messages(&msg).unwrap();
        assert_eq!(ms.len(), 1);
        assert_eq!(ms[0].ty, 0x20);
        assert_eq!(ms[0].flags, NLM_F_ACK | NLM_F_REQUEST);
        assert_eq!(ms[0].seq, 7);
        let Reply::Genl {
            cmd,
            version,
            attrs,
        } = parse_reply(&ms[0]).unwrap()
        else {
            panic!("not genl")
        };
        assert_eq!((cmd, version), (1, 1));
        let a = parse_attrs(attrs).unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].u32().unwrap(), 5);
        assert_eq!(a[1].u64().unwrap(), 1 << 40);
        assert!(a[2].nested);
        let socks = a[2].nested().unwrap();
        assert_eq!(socks.len(), 1);
        assert_eq!(socks[0].ty, 1);
        assert_eq!(socks[0].nested().unwrap()[0].u32().unwrap(), 42);
        assert_eq!(a[3].str().unwrap(), "abc");
        assert_eq!(a[3].data, b"abc\0");
    }

    fn msg(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&3u32.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn errors_and_acks() {
        let ack = msg(NLMSG_ERROR, &0i32.to_ne_bytes());
        let err = msg(NLMSG_ERROR, &(-libc::EBUSY).to_ne_bytes());
        let mut both = ack.clone();
        both.extend_from_slice(&err);
        let ms = parse_messages(&both).unwrap();
        assert_eq!(parse_reply(&ms[0]).unwrap(), Reply::Ack);
        assert_eq!(parse_reply(&ms[1]).unwrap(), Reply::Error(libc::EBUSY));
        for bad_code in [1i32, -5000, i32::MIN] {
            let m = msg(NLMSG_ERROR, &bad_code.to_ne_bytes());
            assert!(parse_reply(&parse_messages(&m).unwrap()[0]).is_err());
        }
        assert!(parse_reply(&parse_messages(&msg(NLMSG_ERROR, &[0, 0])).unwrap()[0]).is_err());
        assert!(parse_reply(&parse_messages(&msg(0x20, &[1, 1])).unwrap()[0]).is_err());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = msg(0x20, &[1, 1, 0, 0, 8, 0, 1, 0, 5, 0, 0, 0]);
        assert!(parse_messages(&good).is_ok());
        // Truncated anywhere: an error (or fewer bytes that still parse), never a panic.
        for cut in 0..good.len() {
            let _ = parse_messages(&good[..cut]);
        }
        assert!(parse_messages(&good[..10]).is_err());
        let mut long = good.clone();
        long[0] = 200;
        assert!(parse_messages(&long).is_err());
        let mut short = good.clone();
        short[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_messages(&short).is_err());
        // Attributes: length below the header, beyond the buffer, wrong fixed size.
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert!(parse_attrs(&[9, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_attrs(&[1, 0]).is_err());
        let a = parse_attrs(&[6, 0, 1, 0, 7, 0, 0, 0]).unwrap();
        assert_eq!(a[0].u16().unwrap(), 7);
        assert!(a[0].u32().is_err());
        assert!(a[0].u8().is_err());
        assert!(
            parse_attrs(&[6, 0, 1, 0, 0xff, 0xfe, 0, 0]).unwrap()[0]
                .str()
                .is_err()
        );
    }

    #[test]
    fn too_many_attributes_is_an_error() {
        let one = [4u8, 0, 1, 0];
        let buf: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(4 * (MAX_ATTRS + 1))
            .collect();
        assert!(parse_attrs(&buf).is_err());
        assert_eq!(parse_attrs(&buf[..4 * MAX_ATTRS]).unwrap().len(), MAX_ATTRS);
    }

    /// The controller itself ("nlctrl") is in every kernel: a real round trip through the
    /// socket, the request builder and the reply parser.
    #[test]
    fn resolves_the_controller_family_and_misses_an_absent_one() {
        let mut s = GenlSocket::open(Duration::from_secs(10)).unwrap();
        assert_eq!(s.family("nlctrl").unwrap(), Some(GENL_ID_CTRL));
        assert_eq!(s.family("memsync-none").unwrap(), None);
        // Sequence numbers move on; a second request on the same socket works.
        assert_eq!(s.family("nlctrl").unwrap(), Some(GENL_ID_CTRL));
    }
}
