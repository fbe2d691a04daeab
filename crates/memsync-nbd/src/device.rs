//! A store as a kernel block device (`/dev/nbdN`) through the kernel's own NBD client.
//!
//! The process serves the store on socket pairs: one end of each goes to the kernel (by the
//! generic netlink family `nbd`, or by ioctl where that is missing), the other is served by
//! this crate's [`Server`] from its transmission phase on (the kernel does no handshake).
//! Several pairs make a multi-conn device: every connection reaches the same store object, so
//! a flush on any of them covers the writes of all (`NBD_FLAG_CAN_MULTI_CONN` holds).
//!
//! What the kernel does when this process goes away (`drivers/block/nbd.c`):
//! - **netlink**: the device keeps its configuration. I/O sent before the crash fails after
//!   the request timeout; I/O after it waits up to the dead-connection timeout for
//!   [`Device::reattach`] (`NBD_CMD_RECONFIGURE` with new sockets), then fails with EIO. A
//!   reattach after that still restores service.
//! - **ioctl**: the thread in `NBD_DO_IT` dies with the process; the kernel shuts the sockets
//!   down and fails what is queued. No reattach is possible.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memsync_core::DynStore;
use memsync_core::layers::Chunked;
use memsync_sys::nbd::{self as knbd, ConnectConfig, NbdNetlink};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::proto::{TF_CAN_MULTI_CONN, TF_READ_ONLY};
use crate::server::{Export, Server, ServerConfig};

/// How to hand the sockets to the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interface {
    /// Netlink if the kernel has the `nbd` family, else the ioctls.
    #[default]
    Auto,
    /// Generic netlink only.
    Netlink,
    /// The ioctls only (`NBD_SET_SOCK`, `NBD_DO_IT` on a thread).
    Ioctl,
}

impl std::str::FromStr for Interface {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Interface::Auto),
            "netlink" => Ok(Interface::Netlink),
            "ioctl" => Ok(Interface::Ioctl),
            _ => Err(format!("{s:?}: expected auto, netlink or ioctl")),
        }
    }
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interface::Auto => "auto",
            Interface::Netlink => "netlink",
            Interface::Ioctl => "ioctl",
        })
    }
}

/// Settings of a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Socket pairs (kernel connections), 1 to [`MAX_CONNECTIONS`].
    pub connections: usize,
    pub interface: Interface,
    /// The kernel's request timeout. A request the store has not answered by then makes the
    /// kernel drop that connection (and retry on another, or wait for a reconnect), so it must
    /// exceed the store's slowest answer.
    pub timeout: Duration,
    /// How long I/O waits for a reattach once every connection is dead, before EIO (netlink
    /// only; the ioctl interface fails at once).
    pub dead_timeout: Duration,
    /// Written to `/sys/block/nbdN/backend` (netlink); a reattach must give the same.
    pub backend: String,
    /// Expose the device read-only even if the store is writable.
    pub read_only: bool,
    /// The logical block size; `None` picks 4096 when the size allows, else 512.
    pub block_size: Option<u64>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            connections: 1,
            interface: Interface::Auto,
            timeout: Duration::from_secs(60),
            dead_timeout: Duration::from_secs(30),
            backend: String::new(),
            read_only: false,
            block_size: None,
        }
    }
}

/// Most socket pairs a device takes.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request the kernel sends (`max_hw_sectors` 65536 × 512).
pub const KERNEL_MAX_REQUEST: u32 = 32 << 20;

fn inval(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// N of `/dev/nbdN` (the path need not exist: netlink creates missing devices).
pub fn device_index(path: &Path) -> io::Result<u32> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = real.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix("nbd")
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            inval(format!(
                "{}: not an NBD device path (/dev/nbdN)",
                path.display()
            ))
        })
}

/// The logical block size for a device of `size` bytes: `want` if given (a power of two from
/// 512 to 4096 that divides the size), else 4096 or 512.
pub fn block_size(size: u64, want: Option<u64>) -> io::Result<u64> {
    if let Some(b) = want {
        if !b.is_power_of_two() || !(512..=4096).contains(&b) {
            return Err(inval(format!(
                "block size {b}: must be a power of two from 512 to 4096"
            )));
        }
        if !size.is_multiple_of(b) {
            return Err(inval(format!(
                "block size {b} does not divide the store's size {size}"
            )));
        }
        return Ok(b);
    }
    if size == 0 {
        return Err(inval(
            "the store is empty: a device needs at least 512 bytes",
        ));
    }
    if size.is_multiple_of(4096) {
        Ok(4096)
    } else if size.is_multiple_of(512) {
        Ok(512)
    } else {
        Err(inval(format!(
            "the store's size {size} is not a multiple of 512 bytes, which a block device needs"
        )))
    }
}

/// What the kernel and sysfs say about a device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub index: u32,
    /// `NBD_CMD_STATUS`: configured (connected or waiting for a reconnect); `None` without
    /// netlink.
    pub connected: Option<bool>,
    /// `/sys/block/nbdN/pid`: the process that started the device.
    pub pid: Option<u32>,
    /// `/sys/block/nbdN/backend` (netlink devices on Linux 5.14+).
    pub backend: Option<String>,
    /// `/sys/block/nbdN/size` × 512.
    pub size: Option<u64>,
}

fn sys_read(index: u32, what: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/{what}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The state of `/dev/nbd{index}`.
pub fn device_state(index: u32) -> io::Result<DeviceState> {
    let connected = match NbdNetlink::open()? {
        Some(mut nl) => Some(nl.status(Some(index))?.iter().any(|d| d.connected)),
        None => None,
    };
    Ok(DeviceState {
        index,
        connected,
        pid: sys_read(index, "pid").and_then(|s| s.parse().ok()),
        backend: sys_read(index, "backend").filter(|s| !s.is_empty()),
        size: sys_read(index, "size")
            .and_then(|s| s.parse::<u64>().ok())
            .map(|s| s * 512),
    })
}

/// A process id that is alive (signal 0 would reach it, or it exists as another user's).
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The serving half: the server and its live connections.
struct Serving {
    server: Arc<Server>,
    live: watch::Receiver<usize>,
}

impl Serving {
    /// Serve `store` on `n` new socket pairs; returns the kernel's ends.
    fn start(store: DynStore, n: usize, read_only: bool) -> io::Result<(Self, Vec<StdUnixStream>)> {
        let mut export = Export::new("", store);
        export.read_only = read_only;
        let mut cfg = ServerConfig::new(vec![export]);
        cfg.max_connections = n;
        cfg.max_payload = KERNEL_MAX_REQUEST;
        let server = Arc::new(Server::new(cfg)?);
        let (tx, live) = watch::channel(n);
        let tx = Arc::new(tx);
        let mut kernel_ends = Vec::with_capacity(n);
        for _ in 0..n {
            let (ours, theirs) = StdUnixStream::pair()?;
            ours.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(&ours).set_send_buffer_size(crate::server::UNIX_SNDBUF);
            let ours = tokio::net::UnixStream::from_std(ours)?;
            let (server, tx) = (server.clone(), tx.clone());
            tokio::spawn(async move {
                server.serve_transmission(ours, 0).await;
                tx.send_modify(|n| *n -= 1);
            });
            kernel_ends.push(theirs);
        }
        Ok((Serving { server, live }, kernel_ends))
    }

    fn flags(&self) -> u64 {
        // One store object behind every connection: a flush on one covers all.
        u64::from(self.server.export_flags(0) | TF_CAN_MULTI_CONN)
    }
}

fn fds(ends: &[StdUnixStream]) -> Vec<BorrowedFd<'_>> {
    ends.iter().map(|s| s.as_fd()).collect()
}

/// A store attached to `/dev/nbdN`. Detach it with [`Device::detach`]; dropping it leaves the
/// device to the kernel's dead-connection handling, as a crash would.
pub struct Device {
    path: PathBuf,
    index: u32,
    interface: Interface,
    size: u64,
    serving: Serving,
    /// The `NBD_DO_IT` thread of an ioctl device.
    ioctl: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .field("index", &self.index)
            .field("interface", &self.interface)
            .finish()
    }
}

/// A store whose alignment the kernel's block size does not meet gets a chunking layer.
fn fit_store(store: DynStore, block: u64) -> io::Result<DynStore> {
    let align = store.caps().block_size.max(1);
    if block.is_multiple_of(align) {
        return Ok(store);
    }
    Ok(Arc::new(
        Chunked::new(store, align).map_err(io::Error::other)?,
    ))
}

impl Device {
    /// Serve `store` as the device at `path` (`/dev/nbdN`), which must be free.
    pub async fn attach(path: &Path, store: DynStore, cfg: &DeviceConfig) -> io::Result<Device> {
        let index = device_index(path)?;
        if cfg.connections == 0 || cfg.connections > MAX_CONNECTIONS {
            return Err(inval(format!(
                "connections: {} (1 to {MAX_CONNECTIONS})",
                cfg.connections
            )));
        }
        let size = store.size();
        let block = block_size(size, cfg.block_size)?;
        let read_only = cfg.read_only || store.caps().read_only;
        let store = fit_store(store, block)?;
        let netlink = match cfg.interface {
            Interface::Ioctl => None,
            Interface::Netlink | Interface::Auto => {
                let nl = tokio::task::spawn_blocking(NbdNetlink::open).await??;
                if nl.is_none() && cfg.interface == Interface::Netlink {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the kernel has no \"nbd\" netlink family (is the nbd module loaded?)",
                    ));
                }
                nl
            }
        };
        let (serving, ends) = Serving::start(store, cfg.connections, read_only)?;
        let mut flags = serving.flags();
        if read_only {
            flags |= u64::from(TF_READ_ONLY);
        }
        match netlink {
            Some(mut nl) => {
                let cc = ConnectConfig {
                    index: Some(index),
                    size,
                    block_size: block,
                    server_flags: flags,
                    client_flags: 0,
                    timeout: Some(cfg.timeout),
                    dead_conn_timeout: Some(cfg.dead_timeout),
                    backend: (!cfg.backend.is_empty()).then(|| cfg.backend.clone()),
                };
                // The kernel may read the device (partition scan) before the call returns:
                // the server runs on the runtime meanwhile, the call on a blocking thread.
                let got = tokio::task::spawn_blocking(move || {
                    let r = nl.connect(&cc, &fds(&ends));
                    drop(ends); // the kernel holds its own references
                    r
                })
                .await?
                .map_err(|e| {
                    let hint = match e.raw_os_error() {
                        Some(libc::EBUSY) => " (the device is in use)",
                        Some(libc::EPERM) => " (needs CAP_SYS_ADMIN)",
                        _ => "",
                    };
                    io::Error::new(
                        e.kind(),
                        format!("NBD_CMD_CONNECT of {}: {e}{hint}", path.display()),
                    )
                })?;
                if got != index {
                    warn!("nbd: asked for nbd{index}, the kernel configured nbd{got}");
                }
                info!(
                    "nbd: {} attached by netlink ({} connections)",
                    path.display(),
                    cfg.connections
                );
                Ok(Device {
                    path: path.to_path_buf(),
                    index: got,
                    interface: Interface::Netlink,
                    size,
                    serving,
                    ioctl: None,
                })
            }
            None => {
                let thread = start_ioctl(path, ends, block, size, flags, cfg.timeout)?;
                // NBD_DO_IT blocks for the device's whole life; it has started once sysfs
                // shows the pid it records.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if thread.is_finished() {
                        let r = thread
                            .join()
                            .unwrap_or_else(|_| Err(io::Error::other("NBD_DO_IT thread panicked")));
                        return Err(match r {
                            Ok(()) => io::Error::other("the device stopped at once"),
                            Err(e) => e,
                        });
                    }
                    if sys_read(index, "pid").is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the device did not start (no /sys/block/nbdN/pid)",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                info!(
                    "nbd: {} attached by ioctl ({} connections)",
                    path.display(),
                    cfg.connections
                );
                Ok(Device {
                    path: path.to_path_buf(),
                    index,
                    interface: Interface::Ioctl,
                    size,
                    serving,
                    ioctl: Some(thread),
                })
            }
        }
    }

    /// Serve `store` to a netlink device whose server died (`NBD_CMD_RECONFIGURE`): new
    /// sockets replace its dead connections. The store must have the device's size; `backend`
    /// in `cfg` must be the one it was attached with.
    pub async fn reattach(path: &Path, store: DynStore, cfg: &DeviceConfig) -> io::Result<Device> {
        let index = device_index(path)?;
        let state = tokio::task::spawn_blocking(move || device_state(index)).await??;
        match state.connected {
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "a reattach needs the \"nbd\" netlink family (is the nbd module loaded?)",
                ));
            }
            Some(false) => {
                return Err(inval(format!(
                    "{} is not connected: nothing to reattach (attach it without --reconnect)",
                    path.display()
                )));
            }
            Some(true) => {}
        }
        if let Some(pid) = state.pid
            && pid != std::process::id()
            && pid_alive(pid)
        {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by process {pid}, which is alive",
                    path.display()
                ),
            ));
        }
        let size = store.size();
        if let Some(dev) = state.size
            && dev != size
        {
            return Err(inval(format!(
                "the store has {size} bytes, the device {dev}: not the store it was attached with"
            )));
        }
        if let Some(b) = &state.backend
            && !cfg.backend.is_empty()
            && *b != cfg.backend
        {
            return Err(inval(format!(
                "{} is backed by {b:?}, not {:?}",
                path.display(),
                cfg.backend
            )));
        }
        let block = block_size(size, cfg.block_size)?;
        let read_only = cfg.read_only || store.caps().read_only;
        let store = fit_store(store, block)?;
        let (serving, ends) = Serving::start(store, cfg.connections, read_only)?;
        let (timeout, dead) = (cfg.timeout, cfg.dead_timeout);
        let backend = (!cfg.backend.is_empty()).then(|| cfg.backend.clone());
        tokio::task::spawn_blocking(move || {
            let mut nl = NbdNetlink::open()?
                .ok_or_else(|| io::Error::other("the nbd netlink family went away"))?;
            let r = nl.reconfigure(
                index,
                &fds(&ends),
                Some(timeout),
                Some(dead),
                backend.as_deref(),
            );
            drop(ends);
            r
        })
        .await?
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("NBD_CMD_RECONFIGURE of {}: {e}", path.display()),
            )
        })?;
        info!("nbd: {} reattached", path.display());
        Ok(Device {
            path: path.to_path_buf(),
            index,
            interface: Interface::Netlink,
            size,
            serving,
            ioctl: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The interface the device was attached with (never `Auto`).
    pub fn interface(&self) -> Interface {
        self.interface
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Connections the kernel still holds.
    pub fn live_connections(&self) -> usize {
        *self.serving.live.borrow()
    }

    /// Resolves when the kernel has closed every connection (someone disconnected the device,
    /// or a reattach gave sockets the kernel did not take).
    pub async fn closed(&self) {
        let mut live = self.serving.live.clone();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Write back the device's dirty pages (a flush reaches the store), disconnect it, wait
    /// for the connections to end and flush the store.
    pub async fn detach(mut self) -> io::Result<()> {
        let path = self.path.clone();
        let index = self.index;
        let interface = self.interface;
        let ioctl = self.ioctl.take();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Pages written through the page cache (or a mapping) but not yet sent.
            match File::open(&path) {
                Ok(f) => {
                    if let Err(e) = f.sync_all() {
                        warn!("nbd: syncing {}: {e}", path.display());
                    }
                }
                Err(e) => warn!("nbd: opening {} to sync it: {e}", path.display()),
            }
            match interface {
                Interface::Ioctl => {
                    let dev = OpenOptions::new().read(true).write(true).open(&path)?;
                    knbd::disconnect(&dev)?;
                    if let Some(t) = ioctl {
                        t.join().unwrap_or_else(|_| {
                            Err(io::Error::other("NBD_DO_IT thread panicked"))
                        })?;
                    }
                }
                _ => {
                    let mut nl = NbdNetlink::open()?
                        .ok_or_else(|| io::Error::other("the nbd netlink family went away"))?;
                    nl.disconnect(index)?;
                }
            }
            Ok(())
        })
        .await??;
        self.serving
            .server
            .shutdown()
            .await
            .map_err(|e| io::Error::other(format!("flushing the store: {e}")))?;
        info!("nbd: {} detached", self.path.display());
        Ok(())
    }
}

/// Configure an ioctl device and run `NBD_DO_IT` on a thread of its own (every socket must be
/// added by the thread that starts the device).
fn start_ioctl(
    path: &Path,
    ends: Vec<StdUnixStream>,
    block: u64,
    size: u64,
    flags: u64,
    timeout: Duration,
) -> io::Result<std::thread::JoinHandle<io::Result<()>>> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let name = path.display().to_string();
    let thread =
        std::thread::Builder::new()
            .name("nbd-do-it".into())
            .spawn(move || -> io::Result<()> {
                let setup = (|| -> io::Result<()> {
                    knbd::set_blksize(&dev, block)?;
                    knbd::set_size_blocks(&dev, size / block)?;
                    knbd::set_flags(&dev, flags)?;
                    knbd::set_timeout(&dev, timeout)?;
                    for s in &ends {
                        knbd::set_sock(&dev, s.as_fd())?;
                    }
                    Ok(())
                })();
                drop(ends);
                if let Err(e) = setup {
                    let _ = knbd::clear_sock(&dev);
                    let e = io::Error::new(e.kind(), format!("configuring {name} by ioctl: {e}"));
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
                let _ = tx.send(Ok(()));
                let r = knbd::do_it(&dev);
                let _ = knbd::clear_sock(&dev);
                r.map_err(|e| io::Error::new(e.kind(), format!("NBD_DO_IT on {name}: {e}")))
            })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("NBD_DO_IT thread panicked")))
            .err()
            .unwrap_or_else(|| io::Error::other("the ioctl thread ended without a word"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_core::StoreExt;

    #[test]
    fn device_paths() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        for bad in ["/dev/nbd", "/dev/sda", "/dev/nbd1p1", "nbdx", "/dev/nbd-1"] {
            assert!(device_index(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(1 << 30, None).unwrap(), 4096);
        assert_eq!(block_size(4096 + 512, None).unwrap(), 512);
        assert!(block_size(1000, None).is_err());
        assert!(block_size(0, None).is_err());
        assert_eq!(block_size(1 << 20, Some(1024)).unwrap(), 1024);
        assert!(block_size(1 << 20, Some(8192)).is_err());
        assert!(block_size(1 << 20, Some(1000)).is_err());
        assert!(block_size(4096 + 512, Some(4096)).is_err());
    }

    /// One request as the kernel's client writes it (`struct nbd_request`: the command's
    /// flags in the high half of the type word), and its simple reply.
    async fn kernel_request(
        s: &mut tokio::net::UnixStream,
        typ: u32,
        cookie: u64,
        from: u64,
        payload: &[u8],
        len: u32,
    ) -> (u32, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&typ.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&from.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        s.write_all(&req).await.unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(rep[0..4].try_into().unwrap()),
            0x6744_6698
        );
        assert_eq!(u64::from_be_bytes(rep[8..16].try_into().unwrap()), cookie);
        let err = u32::from_be_bytes(rep[4..8].try_into().unwrap());
        let mut data = Vec::new();
        if typ & 0xffff == 0 && err == 0 {
            data.resize(len as usize, 0);
            s.read_exact(&mut data).await.unwrap();
        }
        (err, data)
    }

    /// The serving half without a kernel: each socket pair speaks the transmission phase at
    /// once, with simple replies, as `drivers/block/nbd.c` expects, and one store is behind
    /// every connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_pairs_serve_the_kernel_protocol() {
        let store: DynStore = Arc::new(memsync_local::MemStore::new(1 << 20));
        let (serving, ends) = Serving::start(store.clone(), 2, false).unwrap();
        let flags = serving.flags();
        assert_ne!(flags & u64::from(TF_CAN_MULTI_CONN), 0);
        assert_ne!(flags & u64::from(crate::proto::TF_SEND_FLUSH), 0);
        assert_ne!(flags & u64::from(crate::proto::TF_SEND_TRIM), 0);
        assert_eq!(flags & u64::from(TF_READ_ONLY), 0);
        let mut k: Vec<tokio::net::UnixStream> = ends
            .into_iter()
            .map(|e| {
                e.set_nonblocking(true).unwrap();
                tokio::net::UnixStream::from_std(e).unwrap()
            })
            .collect();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
        // WRITE with FUA on connection 0, READ on connection 1.
        let (e, _) = kernel_request(&mut k[0], 1 | 1 << 16, 1 << 32 | 5, 4096, &data, 8192).await;
        assert_eq!(e, 0);
        let (e, got) = kernel_request(&mut k[1], 0, 6, 4096, &[], 8192).await;
        assert_eq!(e, 0);
        assert_eq!(got, data);
        // FLUSH (no offset or length, as the kernel sends it), TRIM, a read past the end.
        assert_eq!(kernel_request(&mut k[1], 3, 7, 0, &[], 0).await.0, 0);
        assert_eq!(kernel_request(&mut k[0], 4, 8, 4096, &[], 4096).await.0, 0);
        let (e, got) = kernel_request(&mut k[0], 0, 9, 4096, &[], 8192).await;
        assert_eq!(e, 0);
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert_eq!(&got[4096..], &data[4096..]);
        assert_ne!(
            kernel_request(&mut k[0], 0, 10, 1 << 20, &[], 4096).await.0,
            0
        );
        assert_eq!(*serving.live.borrow(), 2);
        // NBD_CMD_DISC on one connection ends it; a closed socket ends the other.
        {
            use tokio::io::AsyncWriteExt;
            let mut req = Vec::new();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&2u32.to_be_bytes());
            req.extend_from_slice(&[0; 20]);
            k[0].write_all(&req).await.unwrap();
        }
        let mut live = serving.live.clone();
        live.wait_for(|n| *n == 1).await.unwrap();
        drop(k);
        live.wait_for(|n| *n == 0).await.unwrap();
        serving.server.shutdown().await.unwrap();
        assert_eq!(
            &store.read_bytes(8192, 4096).await.unwrap()[..],
            &data[4096..]
        );
    }

    #[tokio::test]
    async fn a_read_only_store_is_advertised_read_only() {
        let (serving, _ends) =
            Serving::start(Arc::new(memsync_local::MemStore::new(1 << 20)), 1, true).unwrap();
        assert_ne!(serving.flags() & u64::from(TF_READ_ONLY), 0);
    }

    #[test]
    fn interfaces_parse() {
        assert_eq!("auto".parse::<Interface>().unwrap(), Interface::Auto);
        assert_eq!("ioctl".parse::<Interface>().unwrap(), Interface::Ioctl);
        assert_eq!("netlink".parse::<Interface>().unwrap(), Interface::Netlink);
        assert!("nl".parse::<Interface>().is_err());
    }
}
