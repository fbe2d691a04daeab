//! A FUSE frontend: any [`Store`](memsync_core::Store) as one file, `MOUNTPOINT/NAME`.
//!
//! The file belongs to the user who mounts it, mode 0600, and by default only that user can reach
//! the mount at all (the kernel refuses everyone else, root included): the file is a live view of
//! the remote, so a write by anyone reaches it. [`FuseOptions::allow_other`] lets other users in,
//! and [`FuseOptions::mode`] sets the permission bits the kernel then checks
//! (`default_permissions`). Whoever may, can open, read, write and `mmap(MAP_SHARED)` the file,
//! and punch holes in it or zero ranges of it with `fallocate(2)`. It is served in page-cache
//! mode (not `direct_io`): reads fill the kernel page cache (kept across opens), writes through
//! a shared mapping reach the store when the kernel writes the pages back (`msync`, `munmap`,
//! `fsync`, or periodic writeback), and `fsync` on the file flushes the store (for a managed
//! mount's cache: everything reaches the remote). Mounting uses the pure-Rust `fuser` crate
//! calling `mount(2)` directly: it needs root (or CAP_SYS_ADMIN) but no libfuse and no
//! fusermount. Requests are served by several threads, each with its own `/dev/fuse` clone; a
//! thread waits for its store call with [`memsync_core::exec::block_on`], the fault handlers'
//! way of waiting too ([`FuseOptions::store_spin`]).

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, TimeOrNow,
    WriteFlags,
};
use memsync_core::{DynStore, StoreError};
use tokio::runtime::Handle;

const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

/// FUSE frontend settings.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// The file's name in the mount.
    pub name: String,
    /// Request-handling threads.
    pub threads: usize,
    /// Largest kernel readahead, in bytes (capped by what the kernel offers).
    pub max_readahead: u32,
    /// Serve the file read-only.
    pub read_only: bool,
    /// Let users other than the one mounting reach the mount (`allow_other`); what they may do
    /// is then decided by [`FuseOptions::mode`]. Off by default.
    pub allow_other: bool,
    /// Permission bits of the file (owner: the mounting user), checked by the kernel. Write
    /// bits are dropped for a read-only file.
    pub mode: u32,
    /// How long a request thread spins for its store call's answer before sleeping (zero: it
    /// sleeps at once). Spinning saves the wake-up of a sleeping CPU per request and costs
    /// that CPU time; see [`memsync_core::exec::block_on`].
    pub store_spin: Duration,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            name: "data".into(),
            threads: 4,
            max_readahead: 4 << 20,
            read_only: false,
            allow_other: false,
            mode: 0o600,
            store_spin: Duration::ZERO,
        }
    }
}

struct Fs {
    store: DynStore,
    rt: Handle,
    spin: Duration,
    name: String,
    size: u64,
    read_only: bool,
    max_readahead: u32,
    mode: u32,
    allow_other: bool,
    uid: u32,
    gid: u32,
    time: SystemTime,
}

fn errno(e: &StoreError) -> Errno {
    tracing::debug!("fuse: {}", e.chain());
    Errno::from_i32(e.errno())
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Fs {
    /// A store call from a request thread.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        memsync_core::exec::block_on(&self.rt, f, self.spin)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: match (dir, self.read_only) {
                (true, _) if self.allow_other => 0o755,
                (true, _) => 0o700,
                (false, true) => (self.mode & 0o555) as u16,
                (false, false) => self.mode as u16,
            },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == OsStr::new(&self.name) {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO && ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        // The file has the store's fixed size; ownership and mode are fixed too. Time updates
        // are accepted and ignored.
        if size.is_some_and(|s| s != self.size) || mode.is_some() || uid.is_some() || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.read_only && acc != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = offset.saturating_add(u64::from(size)).min(self.size);
        if offset >= end {
            return reply.data(&[]);
        }
        let n = (end - offset) as usize;
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < n {
                b.resize(n, 0);
            }
            let buf = &mut b[..n];
            match self.block_on(self.store.read(offset, buf)) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if offset >= self.size {
            return reply.error(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(self.size - offset) as usize;
        match self.block_on(self.store.write(offset, Bytes::copy_from_slice(&data[..n]))) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.ok();
        }
        match self.block_on(self.store.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// `fallocate(2)`: punching a hole (`FALLOC_FL_PUNCH_HOLE`, which Linux requires with
    /// `KEEP_SIZE`) trims the store and `FALLOC_FL_ZERO_RANGE` zeroes it; the kernel writes back
    /// and drops the page cache of the range around the call. Plain allocation within the file
    /// is a no-op (the store has its fixed size); anything that would change the size, and the
    /// other modes, are refused.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let end = offset.saturating_add(length);
        if end > self.size && !keep {
            return reply.error(Errno::EFBIG);
        }
        if op != 0 && self.read_only {
            return reply.error(Errno::EROFS);
        }
        let end = end.min(self.size);
        let len = end.saturating_sub(offset);
        let r = match op {
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE if keep => {
                self.block_on(self.store.trim(offset.min(self.size), len))
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                self.block_on(self.store.write_zeroes(offset.min(self.size), len))
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

/// A mounted FUSE file. Unmount with [`FuseMount::unmount`]; dropping it unmounts too.
pub struct FuseMount {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    file: PathBuf,
    /// The device of the mount's files: it names the connection in `/sys/fs/fuse/connections`.
    /// Taken at mount time, since a `stat` later may wait for a server that no longer answers.
    dev: Option<u64>,
    /// The unmount has ended: the connection's number (and the mount point) may belong to
    /// another mount now, so an [`AbortHandle`] must leave them alone.
    ended: Arc<AtomicBool>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FuseMount({})", self.file.display())
    }
}

/// Mount `store` as `mountpoint/NAME`. Store calls run on `rt` (from the FUSE threads, which
/// must not be runtime threads: they block on the calls).
pub fn mount(
    store: DynStore,
    rt: Handle,
    mountpoint: &Path,
    opts: FuseOptions,
) -> io::Result<FuseMount> {
    if opts.name.is_empty() || opts.name.contains('/') || opts.name == "." || opts.name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {:?}", opts.name),
        ));
    }
    let fs = Fs {
        size: store.size(),
        read_only: opts.read_only || store.caps().read_only,
        store,
        rt,
        spin: opts.store_spin,
        name: opts.name.clone(),
        max_readahead: opts.max_readahead,
        mode: opts.mode & 0o777,
        allow_other: opts.allow_other,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
        time: SystemTime::now(),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("memsync".into()),
        MountOption::Subtype("memsync".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        // The kernel checks the mode, owner and group of the file for every access.
        MountOption::DefaultPermissions,
    ];
    if fs.read_only {
        cfg.mount_options.push(MountOption::RO);
    }
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;
    let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
    let file = mountpoint.join(&opts.name);
    let dev = lift_strict_dirty_limit(&file);
    Ok(FuseMount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        file,
        dev,
        ended: Arc::new(AtomicBool::new(false)),
    })
}

/// The kernel gives every FUSE mount a strict dirty limit of its own (`strict_limit` in
/// `/sys/class/bdi/MAJ:MIN`: 1% of the dirty threshold, with throttling from about half of it),
/// meant for servers that may be slow or hostile. Here the server is this process, and a writer
/// through a shared mapping that had dirtied more than that waited in `balance_dirty_pages`
/// while single pages were written back (see `docs/perf.md`). Without it the mount still counts
/// against the global dirty limits and keeps its 1% share under global pressure, and `fsync`
/// still writes back every page. Only root may write the knob; without it the mount works,
/// slower. Returns the device of the mount's files.
fn lift_strict_dirty_limit(file: &Path) -> Option<u64> {
    // The `stat` waits for the INIT exchange, and so the mount's device exists.
    let dev = match std::fs::metadata(file) {
        Ok(m) => std::os::unix::fs::MetadataExt::dev(&m),
        Err(e) => {
            tracing::debug!("fuse: stat {}: {e}", file.display());
            return None;
        }
    };
    let knob = bdi_dir(dev).join("strict_limit");
    if let Err(e) = std::fs::write(&knob, "0") {
        tracing::debug!("fuse: writing 0 to {}: {e}", knob.display());
    }
    Some(dev)
}

/// Where the kernel lists FUSE connections (the `fusectl` file system).
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The `abort` file of the connection whose files have device `dev`: the kernel names a
/// connection by its superblock's device number in its own encoding (`MKDEV`: major << 20 |
/// minor; FUSE mounts have major 0, so this is the minor).
fn abort_file(dev: u64) -> PathBuf {
    let kdev = (rustix::fs::major(dev) << 20) | rustix::fs::minor(dev);
    PathBuf::from(format!("{FUSECTL}/{kdev}/abort"))
}

/// The sysfs directory of the backing device of a FUSE mount whose files have device `dev`.
pub fn bdi_dir(dev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ))
}

impl FuseMount {
    /// The file: `mountpoint/NAME`.
    pub fn file_path(&self) -> &Path {
        &self.file
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount. If the file is still open or mapped somewhere, the mount is detached lazily
    /// (it disappears from the namespace now and goes away when the last user lets go).
    pub fn unmount(mut self) -> io::Result<()> {
        self.do_unmount()
    }

    /// Write the file's dirty page cache (pages written through shared mappings) back to the
    /// store, without asking the store to flush (see [`memsync_sys::write_back_pages`]): for a
    /// managed mount, this puts them into the local cache and needs no remote.
    pub fn write_back(&self) -> io::Result<()> {
        let f = std::fs::File::open(&self.file)?;
        memsync_sys::write_back_pages(std::os::fd::AsFd::as_fd(&f))
    }

    /// A handle that can give up on this mount from another thread while something waits for
    /// it (an unmount, an `fsync` its own server cannot finish): see [`AbortHandle::abort`].
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            dev: self.dev,
            mountpoint: self.mountpoint.clone(),
            ended: self.ended.clone(),
        }
    }

    fn do_unmount(&mut self) -> io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        let r = s.umount_and_join();
        if !matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EBUSY)) {
            // Unmounted (or failed for good): the kernel may give the connection's number to
            // the next FUSE mount. Detached instead (below), the connection stays ours until
            // its last user lets go.
            self.ended.store(true, Ordering::SeqCst);
        }
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Still open or mapped: detach now; the session thread ends when the last user
                // lets go.
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Gives up on a [`FuseMount`] without waiting for anything it serves.
#[derive(Clone, Debug)]
pub struct AbortHandle {
    dev: Option<u64>,
    mountpoint: PathBuf,
    ended: Arc<AtomicBool>,
}

impl AbortHandle {
    /// Abort the kernel connection (`/sys/fs/fuse/connections/N/abort`, mounting `fusectl`
    /// there if needed), so that every request waiting for this server (an `fsync`, an
    /// application's read, the write-back of an unmount) fails with `ENOTCONN` at once and
    /// dirty pages not yet written back are dropped; then detach the mount point. The request
    /// threads are not joined: one may still wait for its store call. Returns whether the
    /// connection was aborted; without root only the detach is done, and the connection ends
    /// when this process exits and closes `/dev/fuse`.
    ///
    /// After the mount's unmount has ended this does nothing (and returns false): its
    /// connection number and mount point may then belong to another mount, which an abort
    /// would kill. (Left: the instant between the kernel's unmount and the session's join.)
    pub fn abort(&self) -> io::Result<bool> {
        if self.ended.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let aborted = self.dev.is_some_and(abort_connection);
        match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH) {
            // Already unmounted (the unmount it interrupted got that far).
            Err(rustix::io::Errno::INVAL) => {}
            r => r?,
        }
        Ok(aborted)
    }
}

/// Write `1` to the connection's `abort` file; `fusectl` is mounted first if it is not (as
/// systemd does at boot). Best effort: false if that failed.
fn abort_connection(dev: u64) -> bool {
    let file = abort_file(dev);
    if !Path::new(FUSECTL).is_dir() {
        tracing::debug!("fuse: no {FUSECTL}");
        return false;
    }
    if !file.exists()
        && let Err(e) = rustix::mount::mount(
            "fusectl",
            FUSECTL,
            "fusectl",
            rustix::mount::MountFlags::empty(),
            None,
        )
    {
        tracing::debug!("fuse: mounting fusectl on {FUSECTL}: {e}");
    }
    match std::fs::write(&file, "1") {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("fuse: writing 1 to {}: {e}", file.display());
            false
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::warn!("fuse: unmounting {}: {e}", self.mountpoint.display());
        }
    }
}
