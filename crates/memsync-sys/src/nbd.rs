//! The kernel's NBD client (`drivers/block/nbd.c`): the generic netlink family `nbd`
//! (`include/uapi/linux/nbd-netlink.h`) and, for kernels or setups without it, the ioctls of
//! `include/uapi/linux/nbd.h`.
//!
//! The kernel speaks the NBD transmission phase on the sockets it is given (the handshake is
//! the caller's business, or skipped for a server in the same process): simple replies, no
//! structured replies, requests up to 32 MiB (`max_hw_sectors` 65536).
//!
//! Netlink (Linux 4.12+) can give several sockets at once (multi-conn), a dead-connection
//! timeout (I/O waits that long for [`NbdNetlink::reconfigure`] to bring new sockets before it
//! fails), a backend identifier (`/sys/block/nbdN/backend`, Linux 5.14+) and a status query.
//! The ioctl interface needs a thread that sits in [`do_it`] for as long as the device is
//! connected; a process that dies there takes the device down with it (I/O fails at once).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::netlink::{self, GenlSocket, MsgBuilder, NLM_F_ACK, NlError};
use crate::raw;
use crate::util::cvt;

/// `NBD_GENL_FAMILY_NAME`.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const NBD_GENL_VERSION: u8 = 1;

/// `NBD_ATTR_INDEX` (u32).
pub const NBD_ATTR_INDEX: u16 = 1;
/// `NBD_ATTR_SIZE_BYTES` (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// `NBD_ATTR_TIMEOUT` (u64, seconds).
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// `NBD_ATTR_SERVER_FLAGS` (u64: the NBD transmission flags).
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_ATTR_CLIENT_FLAGS` (u64: `NBD_CFLAG_*`).
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// `NBD_ATTR_SOCKETS` (nested `NBD_SOCK_ITEM`s).
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64, seconds).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// `NBD_ATTR_DEVICE_LIST` (nested `NBD_DEVICE_ITEM`s).
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
/// `NBD_ATTR_BACKEND_IDENTIFIER` (string).
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

/// `NBD_DEVICE_ITEM` (nested).
pub const NBD_DEVICE_ITEM: u16 = 1;
/// `NBD_DEVICE_INDEX` (u32).
pub const NBD_DEVICE_INDEX: u16 = 1;
/// `NBD_DEVICE_CONNECTED` (u8).
pub const NBD_DEVICE_CONNECTED: u16 = 2;
/// `NBD_SOCK_ITEM` (nested).
pub const NBD_SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD` (u32).
pub const NBD_SOCK_FD: u16 = 1;

/// `NBD_CMD_CONNECT`.
pub const NBD_CMD_CONNECT: u8 = 1;
/// `NBD_CMD_DISCONNECT`.
pub const NBD_CMD_DISCONNECT: u8 = 2;
/// `NBD_CMD_RECONFIGURE`.
pub const NBD_CMD_RECONFIGURE: u8 = 3;
/// `NBD_CMD_LINK_DEAD` (a multicast notification).
pub const NBD_CMD_LINK_DEAD: u8 = 4;
/// `NBD_CMD_STATUS`.
pub const NBD_CMD_STATUS: u8 = 5;

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// `NBD_CFLAG_DISCONNECT_ON_CLOSE`.
pub const NBD_CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

/// `NBD_MAJOR`: the block major number of `/dev/nbdN`.
pub const NBD_MAJOR: u32 = 43;

/// What [`NbdNetlink::connect`] configures.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// The device index (`/dev/nbdN`); `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size: a power of two from 512 to the page size.
    pub block_size: u64,
    /// NBD transmission flags (`NBD_FLAG_*`: read-only, flush, FUA, trim, multi-conn...).
    pub server_flags: u64,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// Request timeout (whole seconds; `None` keeps the kernel's default).
    pub timeout: Option<Duration>,
    /// How long I/O waits for a reconnect once every connection is dead (whole seconds;
    /// `None`: it fails at once).
    pub dead_conn_timeout: Option<Duration>,
    /// `/sys/block/nbdN/backend`; a reconfigure must name the same one.
    pub backend: Option<String>,
}

/// One device in an `NBD_CMD_STATUS` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// N of `/dev/nbdN`.
    pub index: u32,
    /// The device has a configuration (connected, or waiting for a reconnect).
    pub connected: bool,
}

/// The index in an `NBD_CMD_CONNECT` answer's attributes.
pub fn parse_connect_reply(attrs: &[u8]) -> Result<u32, NlError> {
    let a = netlink::parse_attrs(attrs)?;
    netlink::find(&a, NBD_ATTR_INDEX)
        .ok_or_else(|| NlError("no NBD_ATTR_INDEX in the connect answer".into()))?
        .u32()
}

/// The devices in an `NBD_CMD_STATUS` answer's attributes.
pub fn parse_status_reply(attrs: &[u8]) -> Result<Vec<DeviceStatus>, NlError> {
    let a = netlink::parse_attrs(attrs)?;
    let Some(list) = netlink::find(&a, NBD_ATTR_DEVICE_LIST) else {
        return Err(NlError(
            "no NBD_ATTR_DEVICE_LIST in the status answer".into(),
        ));
    };
    let mut out = Vec::new();
    for item in list.nested()? {
        if item.ty != NBD_DEVICE_ITEM {
            return Err(NlError(format!(
                "attribute {} in the device list is not NBD_DEVICE_ITEM",
                item.ty
            )));
        }
        let f = item.nested()?;
        let index = netlink::find(&f, NBD_DEVICE_INDEX)
            .ok_or_else(|| NlError("a device item without NBD_DEVICE_INDEX".into()))?
            .u32()?;
        let connected = netlink::find(&f, NBD_DEVICE_CONNECTED)
            .ok_or_else(|| NlError("a device item without NBD_DEVICE_CONNECTED".into()))?
            .u8()?
            != 0;
        out.push(DeviceStatus { index, connected });
    }
    Ok(out)
}

fn put_sockets(b: &mut MsgBuilder, sockets: &[BorrowedFd<'_>]) -> io::Result<()> {
    let list = b.begin_nest(NBD_ATTR_SOCKETS);
    for s in sockets {
        let fd = u32::try_from(s.as_raw_fd())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative descriptor"))?;
        let item = b.begin_nest(NBD_SOCK_ITEM);
        b.put_u32(NBD_SOCK_FD, fd);
        b.end_nest(item);
    }
    b.end_nest(list);
    Ok(())
}

/// The `nbd` generic netlink family.
#[derive(Debug)]
pub struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
}

impl NbdNetlink {
    /// Open a netlink socket and resolve the `nbd` family; `Ok(None)` if the kernel has no
    /// such family (the `nbd` module is not loaded, or the kernel predates 4.12).
    pub fn open() -> io::Result<Option<Self>> {
        // Connecting waits for the device's queue to freeze; a minute is ample.
        let mut sock = GenlSocket::open(Duration::from_secs(60))?;
        Ok(sock
            .family(NBD_GENL_FAMILY_NAME)?
            .map(|family| NbdNetlink { sock, family }))
    }

    fn msg(&mut self, cmd: u8) -> (MsgBuilder, u32) {
        let seq = self.sock.next_seq();
        (
            MsgBuilder::genl(self.family, NLM_F_ACK, seq, cmd, NBD_GENL_VERSION),
            seq,
        )
    }

    /// `NBD_CMD_CONNECT`: configure a device on `sockets` (the kernel takes its own reference
    /// to each; the caller may close its descriptors afterwards) and start it. Returns the
    /// device index. Needs `CAP_SYS_ADMIN`; `EBUSY` if the device is in use.
    pub fn connect(&mut self, cfg: &ConnectConfig, sockets: &[BorrowedFd<'_>]) -> io::Result<u32> {
        let (mut b, seq) = self.msg(NBD_CMD_CONNECT);
        if let Some(i) = cfg.index {
            b.put_u32(NBD_ATTR_INDEX, i);
        }
        b.put_u64(NBD_ATTR_SIZE_BYTES, cfg.size);
        b.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, cfg.block_size);
        b.put_u64(NBD_ATTR_SERVER_FLAGS, cfg.server_flags);
        b.put_u64(NBD_ATTR_CLIENT_FLAGS, cfg.client_flags);
        if let Some(t) = cfg.timeout {
            b.put_u64(NBD_ATTR_TIMEOUT, t.as_secs().max(1));
        }
        if let Some(t) = cfg.dead_conn_timeout {
            b.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t.as_secs().max(1));
        }
        if let Some(id) = &cfg.backend {
            b.put_str(NBD_ATTR_BACKEND_IDENTIFIER, id);
        }
        put_sockets(&mut b, sockets)?;
        let answer = self.sock.request(&b.finish(), seq)?;
        let (_, attrs) = answer
            .iter()
            .find(|(cmd, _)| *cmd == NBD_CMD_CONNECT)
            .ok_or_else(|| io::Error::from(NlError("no answer to NBD_CMD_CONNECT".into())))?;
        Ok(parse_connect_reply(attrs)?)
    }

    /// `NBD_CMD_RECONFIGURE`: give a connected device whose connections died new sockets
    /// (each replaces a dead one; sockets beyond the dead ones are not taken), and optionally
    /// new timeouts. `backend` must match the one the device was connected with.
    pub fn reconfigure(
        &mut self,
        index: u32,
        sockets: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
        dead_conn_timeout: Option<Duration>,
        backend: Option<&str>,
    ) -> io::Result<()> {
        let (mut b, seq) = self.msg(NBD_CMD_RECONFIGURE);
        b.put_u32(NBD_ATTR_INDEX, index);
        if let Some(t) = timeout {
            b.put_u64(NBD_ATTR_TIMEOUT, t.as_secs().max(1));
        }
        if let Some(t) = dead_conn_timeout {
            b.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t.as_secs().max(1));
        }
        if let Some(id) = backend {
            b.put_str(NBD_ATTR_BACKEND_IDENTIFIER, id);
        }
        if !sockets.is_empty() {
            put_sockets(&mut b, sockets)?;
        }
        self.sock.request(&b.finish(), seq)?;
        Ok(())
    }

    /// `NBD_CMD_DISCONNECT`: send `NBD_CMD_DISC` on every connection, shut the sockets down
    /// and fail what is still queued.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let (mut b, seq) = self.msg(NBD_CMD_DISCONNECT);
        b.put_u32(NBD_ATTR_INDEX, index);
        self.sock.request(&b.finish(), seq)?;
        Ok(())
    }

    /// `NBD_CMD_STATUS` of one device, or of all with `None`.
    pub fn status(&mut self, index: Option<u32>) -> io::Result<Vec<DeviceStatus>> {
        let (mut b, seq) = self.msg(NBD_CMD_STATUS);
        if let Some(i) = index {
            b.put_u32(NBD_ATTR_INDEX, i);
        }
        let answer = self.sock.request(&b.finish(), seq)?;
        let mut out = Vec::new();
        for (cmd, attrs) in &answer {
            if *cmd == NBD_CMD_STATUS {
                out.extend(parse_status_reply(attrs)?);
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// ioctl interface
// ---------------------------------------------------------------------------

fn nbd_ioctl(dev: &File, req: u32, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every NBD ioctl takes its argument by value (an integer or a descriptor
    // number), never as a pointer, so the kernel reads no memory of ours; `dev` is a live
    // descriptor for the duration of the call.
    cvt(unsafe { libc::ioctl(dev.as_raw_fd(), req as _, arg) })
}

/// `NBD_SET_SOCK`: add a connected socket (the kernel takes its own reference). Every
/// socket of a device must be added by the thread that calls [`do_it`].
pub fn set_sock(dev: &File, sock: BorrowedFd<'_>) -> io::Result<()> {
    let fd = libc::c_ulong::try_from(sock.as_raw_fd())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative descriptor"))?;
    nbd_ioctl(dev, raw::NBD_SET_SOCK, fd).map(drop)
}

/// `NBD_SET_BLKSIZE`: the logical block size (a power of two from 512 to the page size).
pub fn set_blksize(dev: &File, bytes: u64) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_SET_BLKSIZE, bytes as libc::c_ulong).map(drop)
}

/// `NBD_SET_SIZE_BLOCKS`: the size in blocks of the size set by [`set_blksize`].
pub fn set_size_blocks(dev: &File, blocks: u64) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_SET_SIZE_BLOCKS, blocks as libc::c_ulong).map(drop)
}

/// `NBD_SET_FLAGS`: the NBD transmission flags.
pub fn set_flags(dev: &File, flags: u64) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_SET_FLAGS, flags as libc::c_ulong).map(drop)
}

/// `NBD_SET_TIMEOUT`: the request timeout in seconds.
pub fn set_timeout(dev: &File, t: Duration) -> io::Result<()> {
    nbd_ioctl(
        dev,
        raw::NBD_SET_TIMEOUT,
        t.as_secs().max(1) as libc::c_ulong,
    )
    .map(drop)
}

/// `NBD_DO_IT`: start the device and block until it is disconnected (by [`disconnect`], or
/// every connection failing). A signal that interrupts it disconnects the device.
pub fn do_it(dev: &File) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_DO_IT, 0).map(drop)
}

/// `NBD_DISCONNECT`: ask the server to disconnect (`NBD_CMD_DISC` on every connection);
/// [`do_it`] returns once the connections are closed.
pub fn disconnect(dev: &File) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_DISCONNECT, 0).map(drop)
}

/// `NBD_CLEAR_SOCK`: drop the sockets and fail queued requests (after [`do_it`] returned).
pub fn clear_sock(dev: &File) -> io::Result<()> {
    nbd_ioctl(dev, raw::NBD_CLEAR_SOCK, 0).map(drop)
}

/// `BLKFLSBUF`: write back and drop the device's page cache.
pub fn flush_buffers(dev: &File) -> io::Result<()> {
    nbd_ioctl(dev, raw::BLKFLSBUF, 0).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_attrs(items: &[(u32, u8)]) -> Vec<u8> {
        let mut b = MsgBuilder::genl(0x20, 0, 1, NBD_CMD_STATUS, 1);
        let list = b.begin_nest(NBD_ATTR_DEVICE_LIST);
        for &(i, c) in items {
            let it = b.begin_nest(NBD_DEVICE_ITEM);
            b.put_u32(NBD_DEVICE_INDEX, i)
                .put_u8(NBD_DEVICE_CONNECTED, c);
            b.end_nest(it);
        }
        b.end_nest(list);
        b.finish()[netlink::NLMSG_HDRLEN + netlink::GENL_HDRLEN..].to_vec()
    }

    #[test]
    fn status_answers_parse() {
        assert_eq!(
            parse_status_reply(&status_attrs(&[(0, 1), (3, 0)])).unwrap(),
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 3,
                    connected: false
                }
            ]
        );
        assert_eq!(parse_status_reply(&status_attrs(&[])).unwrap(), vec![]);
        assert!(parse_status_reply(&[]).is_err());
        // A device item with a wrong-size index, or without a field: errors.
        let mut b = MsgBuilder::genl(0x20, 0, 1, NBD_CMD_STATUS, 1);
        let list = b.begin_nest(NBD_ATTR_DEVICE_LIST);
        let it = b.begin_nest(NBD_DEVICE_ITEM);
        b.put_u16(NBD_DEVICE_INDEX, 1)
            .put_u8(NBD_DEVICE_CONNECTED, 1);
        b.end_nest(it);
        b.end_nest(list);
        let m = b.finish();
        assert!(parse_status_reply(&m[20..]).is_err());
        let mut b = MsgBuilder::genl(0x20, 0, 1, NBD_CMD_STATUS, 1);
        let list = b.begin_nest(NBD_ATTR_DEVICE_LIST);
        let it = b.begin_nest(NBD_DEVICE_ITEM);
        b.put_u32(NBD_DEVICE_INDEX, 1);
        b.end_nest(it);
        b.end_nest(list);
        let m = b.finish();
        assert!(parse_status_reply(&m[20..]).is_err());
    }

    #[test]
    fn connect_answers_parse() {
        let mut b = MsgBuilder::genl(0x20, 0, 1, NBD_CMD_CONNECT, 1);
        b.put_u32(NBD_ATTR_INDEX, 5);
        let m = b.finish();
        assert_eq!(parse_connect_reply(&m[20..]).unwrap(), 5);
        assert!(parse_connect_reply(&[]).is_err());
        assert!(parse_connect_reply(&[5, 0, 1, 0, 5, 0, 0, 0]).is_err());
    }

    #[test]
    fn a_connect_request_carries_every_attribute() {
        // The request as the kernel would parse it: build it the way `connect` does.
        let mut b = MsgBuilder::genl(0x20, NLM_F_ACK, 9, NBD_CMD_CONNECT, 1);
        b.put_u32(NBD_ATTR_INDEX, 2);
        b.put_u64(NBD_ATTR_SIZE_BYTES, 1 << 30);
        // Descriptors 0 and 1 only lend their numbers here.
        let s0 = std::io::stdin();
        let s1 = std::io::stdout();
        use std::os::fd::AsFd;
        put_sockets(&mut b, &[s0.as_fd(), s1.as_fd()]).unwrap();
        let m = b.finish();
        let attrs = netlink::parse_attrs(&m[20..]).unwrap();
        let socks = netlink::find(&attrs, NBD_ATTR_SOCKETS).unwrap();
        assert!(socks.nested);
        let items = socks.nested().unwrap();
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|i| {
                assert_eq!(i.ty, NBD_SOCK_ITEM);
                netlink::find(&i.nested().unwrap(), NBD_SOCK_FD)
                    .unwrap()
                    .u32()
                    .unwrap()
            })
            .collect();
        assert_eq!(fds, vec![0, 1]);
    }

    /// The family is found exactly when the module is loaded (the controller may load it on
    /// the way); a kernel without it (this host) is `None`, not an error.
    #[test]
    fn open_finds_the_family_iff_the_module_is_loaded() {
        let r = NbdNetlink::open().unwrap();
        let loaded = std::path::Path::new("/sys/module/nbd").exists();
        assert_eq!(r.is_some(), loaded);
    }
}
