//! A tiny FUSE file system whose `fsync` fails on demand, for testing what a store does after
//! a failed fsync (there is no device-mapper here to make a real disk fail).
//!
//! One flat directory of regular files held in memory; files can be created, read, written,
//! resized, renamed and removed. While [`FailFs::set_fail_fsync`] is on, `fsync` and `fsyncdir`
//! answer EIO and, like a kernel that could not write dirty pages back, drop the writes made
//! since the last successful fsync of the file (they read as the old bytes); once it is off
//! again they succeed, as a real file system's later fsync does.
//! Mounting needs root (or CAP_SYS_ADMIN) and `/dev/fuse`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL,
    TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(0);

#[derive(Default)]
struct File {
    /// What reads see.
    data: Vec<u8>,
    /// What the last successful fsync made durable.
    synced: Vec<u8>,
}

#[derive(Default)]
struct State {
    names: HashMap<String, u64>,
    files: HashMap<u64, File>,
}

struct Fs {
    state: Arc<parking_lot::Mutex<State>>,
    fail: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    next_ino: AtomicU64,
}

fn attr(ino: u64, size: u64) -> FileAttr {
    let dir = ino == 1;
    let t = SystemTime::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Fs {
    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        if ino == 1 {
            return Some(attr(1, 0));
        }
        let st = self.state.lock();
        st.files.get(&ino).map(|f| attr(ino, f.data.len() as u64))
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), Errno> {
        let mut st = self.state.lock();
        if self.fail.load(SeqCst) {
            self.failures.fetch_add(1, SeqCst);
            // The pages that could not be written are dropped: the old bytes come back.
            if let Some(f) = ino.and_then(|i| st.files.get_mut(&i)) {
                f.data = f.synced.clone();
            }
            return Err(Errno::EIO);
        }
        if let Some(f) = ino.and_then(|i| st.files.get_mut(&i)) {
            f.synced = f.data.clone();
        }
        Ok(())
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = (parent.0 == 1)
            .then(|| {
                self.state
                    .lock()
                    .names
                    .get(&*name.to_string_lossy())
                    .copied()
            })
            .flatten();
        match ino.and_then(|i| self.attr_of(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
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
        if let Some(size) = size {
            let mut st = self.state.lock();
            match st.files.get_mut(&ino.0) {
                Some(f) => f.data.resize(size as usize, 0),
                None => return reply.error(Errno::ENOENT),
            }
        }
        match self.attr_of(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        let name = name.to_string_lossy().into_owned();
        let ino = {
            let mut st = self.state.lock();
            match st.names.get(&name) {
                Some(&i) => i,
                None => {
                    let i = self.next_ino.fetch_add(1, SeqCst);
                    st.names.insert(name, i);
                    st.files.insert(i, File::default());
                    i
                }
            }
        };
        let a = self.attr_of(ino).expect("just created");
        reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != 1 && self.attr_of(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        // Every read and write reaches this process (no page cache to keep coherent).
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
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
        let st = self.state.lock();
        let Some(f) = st.files.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = (offset as usize).min(f.data.len());
        let end = (start + size as usize).min(f.data.len());
        reply.data(&f.data[start..end]);
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
        let mut st = self.state.lock();
        let Some(f) = st.files.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let end = offset as usize + data.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset as usize..end].copy_from_slice(data);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
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
        match self.sync(Some(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.sync(None) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let st = self.state.lock();
        let mut entries = vec![
            (1u64, FileType::Directory, ".".to_owned()),
            (1, FileType::Directory, "..".to_owned()),
        ];
        let mut names: Vec<_> = st.names.iter().collect();
        names.sort();
        entries.extend(
            names
                .into_iter()
                .map(|(n, &i)| (i, FileType::RegularFile, n.clone())),
        );
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state.lock();
        match (parent.0 == 1)
            .then(|| st.names.remove(&*name.to_string_lossy()))
            .flatten()
        {
            Some(i) => {
                st.files.remove(&i);
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 != 1 || newparent.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        let mut st = self.state.lock();
        let Some(i) = st.names.remove(&*name.to_string_lossy()) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(old) = st.names.insert(newname.to_string_lossy().into_owned(), i) {
            st.files.remove(&old);
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }
}

/// A mounted [`FailFs`]; unmounted when dropped.
pub struct FailFs {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    fail: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
}

impl std::fmt::Debug for FailFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailFs({})", self.mountpoint.display())
    }
}

impl FailFs {
    /// Mount an empty file system at `mountpoint` (an existing directory).
    pub fn mount(mountpoint: &Path) -> io::Result<FailFs> {
        let fail = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let fs = Fs {
            state: Arc::default(),
            fail: fail.clone(),
            failures: failures.clone(),
            next_ino: AtomicU64::new(2),
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("memsync-failfs".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        cfg.acl = SessionACL::Owner;
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
        Ok(FailFs {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            fail,
            failures,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Make `fsync` fail with EIO (and lose the unsynced writes) while `on`.
    pub fn set_fail_fsync(&self, on: bool) {
        self.fail.store(on, SeqCst);
    }

    /// How many fsyncs failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(SeqCst)
    }
}

impl Drop for FailFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && s.umount_and_join().is_err()
        {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .output();
        }
    }
}
