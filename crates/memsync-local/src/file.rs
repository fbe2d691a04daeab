//! `file:` — a regular file or a block device.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use memsync_core::range::{align_down, align_up};
use memsync_core::{
    Bytes, Caps, Extent, ExtentKind, Result, SharedMemory, Store, StoreError, async_trait,
    check_range, check_write,
};
use rustix::fs::{FallocateFlags, SeekFrom as RSeek};
use rustix::io::Errno;

use crate::mem::push_extent;
use crate::util::{StickyFsync, blocking, usize_of};

/// Block devices only accept `fallocate` on logical-block boundaries; 4096 is a multiple of
/// every logical block size in use. The unaligned edges of a range are written as zeros.
const BLOCK_ALIGN: u64 = 4096;

/// How to open a [`FileStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// Size of the store. A missing regular file is created with this size, a shorter one is
    /// extended to it. Required to create a file; a file larger than this is an error (it is
    /// never truncated), and so is a block device of another size.
    pub size: Option<u64>,
    /// `Some(true)`: create the file if missing (needs `size`). `Some(false)`: never create.
    /// `None`: create it if missing and `size` is given.
    pub create: Option<bool>,
    /// Open read-only: writes, trims and write-zeroes fail with [`StoreError::ReadOnly`].
    pub read_only: bool,
}

impl FileOptions {
    /// Options with a size (create or extend the file to it).
    pub fn with_size(size: u64) -> Self {
        FileOptions {
            size: Some(size),
            ..Default::default()
        }
    }

    /// Read-only options.
    pub fn read_only() -> Self {
        FileOptions {
            read_only: true,
            ..Default::default()
        }
    }
}

/// A store on a regular file or a block device (`file:PATH`).
///
/// Reads and writes are positioned (`pread`/`pwrite`) on one shared descriptor, so concurrent
/// requests do not serialise on a file position. They are made directly in the async fns, not
/// through `spawn_blocking`: a `pread` from the page cache costs less than handing the call to
/// another thread and waking the task again across CPUs (`docs/perf.md`). Only `flush`
/// (`fdatasync`, which waits for the device) goes to tokio's blocking pool.
///
/// `trim` punches holes (`FALLOC_FL_PUNCH_HOLE`), `write_zeroes` uses `FALLOC_FL_ZERO_RANGE`
/// (falling back to punching, then to writing zeros, where the file system lacks it), and
/// `extents` reports holes with `SEEK_DATA`/`SEEK_HOLE` on regular files, remembering the data
/// runs it found (shared by the stores of one process on the same file, forgotten where a punch
/// or a zeroed range may have made a hole). Errors name the path and the range and keep the OS
/// error as their cause.
///
/// # Example
/// ```
/// use memsync_core::{Bytes, Store, StoreExt};
/// use memsync_local::{FileOptions, FileStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> memsync_core::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.img");
/// let store = FileStore::open(&path, FileOptions::with_size(1 << 20))?;
/// store.write(4096, Bytes::from_static(b"persistent")).await?;
/// store.flush().await?;
/// assert_eq!(&store.read_bytes(4096, 10).await?[..], b"persistent");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FileStore {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// `FALLOC_FL_PUNCH_HOLE` works here (probed at open).
    punch_hole: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` has not failed with EOPNOTSUPP yet.
    zero_range: AtomicBool,
    fsync_failed: Arc<StickyFsync>,
    /// Data runs found by `extents`, shared by every store of this process on the same file.
    runs: Arc<DataRuns>,
    /// `lseek(2)` calls made by `extents`.
    lseeks: AtomicU64,
    /// A regular file on tmpfs ([`Store::shared_memory`]).
    tmpfs: bool,
}

/// Runs of data that `SEEK_DATA`/`SEEK_HOLE` found in one file, so that a run is looked up once,
/// not once per `extents` call. On tmpfs a `SEEK_HOLE` walks the page cache from its offset to
/// the next hole (for a dense file: to its end), and the NBD server asks 8 MiB of extents ahead
/// for each structured read: sequential reads of a dense file on `/dev/shm` made that walk again
/// for every window, quadratic in the file's size (`docs/perf.md`).
///
/// Only data is remembered, never a hole: writes only turn holes into data, so a remembered run
/// stays data after any write, and a range reported as data that reads as zeros would still
/// read correctly, whereas a hole reported over written data would make clients skip it. What
/// can turn data into a hole (a punch, a zeroed range) calls [`DataRuns::forget`] after it is
/// done, which also bumps a generation: a run looked up across it is not remembered.
///
/// Writes made to the file outside this process are not seen: they can only add data, except a
/// hole punched from outside, which is then reported as data (it reads as zeros, correctly).
#[derive(Debug, Default)]
struct DataRuns {
    inner: Mutex<Runs>,
}

#[derive(Debug, Default)]
struct Runs {
    /// Disjoint, non-adjacent runs: start -> end.
    runs: BTreeMap<u64, u64>,
    /// Bumped by every forget.
    generation: u64,
}

/// Remembered runs per file; beyond this the lowest is dropped (a dense file is one run).
const MAX_RUNS: usize = 256;

impl DataRuns {
    /// The runs of the file `file` (by device and inode), shared with every other store of this
    /// process open on it.
    fn of(file: &File) -> Arc<DataRuns> {
        type Table = Mutex<HashMap<(u64, u64), Weak<DataRuns>>>;
        static FILES: OnceLock<Table> = OnceLock::new();
        let Ok(m) = file.metadata() else {
            return Arc::default();
        };
        let mut t = FILES.get_or_init(Table::default).lock();
        if let Some(r) = t.get(&(m.dev(), m.ino())).and_then(Weak::upgrade) {
            return r;
        }
        t.retain(|_, w| w.strong_count() > 0);
        let r: Arc<DataRuns> = Arc::default();
        t.insert((m.dev(), m.ino()), Arc::downgrade(&r));
        r
    }

    /// The end of the remembered run that holds `pos`.
    fn data_until(&self, pos: u64) -> Option<u64> {
        let g = self.inner.lock();
        let (_, &end) = g.runs.range(..=pos).next_back()?;
        (end > pos).then_some(end)
    }

    /// Taken before looking a run up, given back to [`DataRuns::remember`].
    fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// Remember `start..end` as data, unless something was forgotten since `generation`.
    fn remember(&self, generation: u64, start: u64, end: u64) {
        let mut g = self.inner.lock();
        if g.generation != generation || end <= start {
            return;
        }
        let (mut s, mut e) = (start, end);
        let touching: Vec<u64> = g
            .runs
            .range(..=end)
            .rev()
            .take_while(|&(_, &re)| re >= start)
            .map(|(&rs, _)| rs)
            .collect();
        for rs in touching {
            let re = g.runs.remove(&rs).unwrap_or(rs);
            (s, e) = (s.min(rs), e.max(re));
        }
        if g.runs.len() >= MAX_RUNS {
            g.runs.pop_first();
        }
        g.runs.insert(s, e);
    }

    /// `start..end` may read as a hole from now on: remember no data there. Called after the
    /// change, so that a lookup that saw the file before it is not remembered.
    fn forget(&self, start: u64, end: u64) {
        let mut g = self.inner.lock();
        g.generation += 1;
        let hit: Vec<(u64, u64)> = g
            .runs
            .range(..end)
            .rev()
            .take_while(|&(_, &re)| re > start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in hit {
            g.runs.remove(&rs);
            if rs < start {
                g.runs.insert(rs, start);
            }
            if re > end {
                g.runs.insert(end, re);
            }
        }
    }
}

fn open_err(path: &Path, what: &str, e: io::Error) -> StoreError {
    StoreError::io("open", e).context(format!("file store {}: {what}", path.display()))
}

fn config_err(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Config(format!("file store {}: {why}", path.display()))
}

impl FileStore {
    /// Open (or create, see [`FileOptions`]) a regular file or block device.
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        if opts.read_only && opts.create == Some(true) {
            return Err(config_err(path, "readonly and create cannot be combined"));
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(open_err(path, "stat", e)),
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let file = match &meta {
            None => {
                if opts.read_only || opts.create == Some(false) {
                    return Err(open_err(path, "does not exist", Errno::NOENT.into()));
                }
                let Some(size) = opts.size else {
                    return Err(config_err(path, "does not exist; give size= to create it"));
                };
                let file = oo
                    .create(true)
                    .open(path)
                    .map_err(|e| open_err(path, "create", e))?;
                file.set_len(size)
                    .map_err(|e| open_err(path, "set size", e))?;
                tracing::debug!(path = %path.display(), size, "created file store");
                file
            }
            Some(m) if m.is_dir() => {
                return Err(config_err(
                    path,
                    "is a directory (use dir: for a directory of chunks)",
                ));
            }
            Some(m) if !(m.is_file() || m.file_type().is_block_device()) => {
                return Err(config_err(
                    path,
                    "is neither a regular file nor a block device",
                ));
            }
            Some(_) => oo.open(path).map_err(|e| open_err(path, "open", e))?,
        };
        let block_device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        let mut current = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| open_err(path, "seek", e))?;
        match opts.size {
            Some(want) if want > current && !block_device => {
                if opts.read_only {
                    return Err(config_err(
                        path,
                        format!("is {current} bytes; cannot extend to size={want} read-only"),
                    ));
                }
                file.set_len(want)
                    .map_err(|e| open_err(path, "extend", e))?;
                current = want;
            }
            Some(want) if want != current => {
                let what = if block_device { "block device" } else { "file" };
                return Err(config_err(
                    path,
                    format!(
                        "{what} is {current} bytes, size={want} does not match (never truncated)"
                    ),
                ));
            }
            _ => {}
        }
        let punch_hole = if opts.read_only {
            false
        } else if block_device || punches_holes(&file) {
            true
        } else {
            // Punching past the end of the file changes nothing but tells whether the file
            // system supports it.
            let probe_at = align_up(current, BLOCK_ALIGN).unwrap_or(current);
            let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            !matches!(rustix::fs::fallocate(&file, mode, probe_at, BLOCK_ALIGN), Err(e) if unsupported(e))
        };
        let runs = DataRuns::of(&file);
        let tmpfs = !block_device && on_tmpfs(&file);
        Ok(FileStore {
            file: Arc::new(file),
            path: path.to_owned(),
            size: current,
            read_only: opts.read_only,
            block_device,
            punch_hole: AtomicBool::new(punch_hole),
            zero_range: AtomicBool::new(!opts.read_only),
            fsync_failed: Arc::default(),
            runs,
            lseeks: AtomicU64::new(0),
            tmpfs,
        })
    }

    /// The `lseek(2)` calls (`SEEK_DATA`, `SEEK_HOLE`) `extents` has made on this store.
    pub fn lseeks(&self) -> u64 {
        self.lseeks.load(Ordering::Relaxed)
    }

    /// The path the store was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store is a block device (not a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> StoreError {
        StoreError::io(op, e).context(format!("{}: {len} bytes at {offset}", self.path.display()))
    }

    /// Write zeros with `pwrite`, the fallback when `fallocate` cannot do it.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; usize_of(len.min(crate::util::WRITE_PIECE as u64))];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..usize_of(n)], pos)
                .map_err(|e| self.err("pwrite", pos, n, e))?;
            pos += n;
        }
        Ok(())
    }

    /// Make `offset..offset+len` read as zeros with `fallocate(mode)`. Returns `false` (having
    /// changed nothing) if the file system does not support `mode`.
    fn fallocate_zero(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<bool> {
        let end = offset + len;
        let (start, stop) = if self.block_device {
            (
                align_up(offset, BLOCK_ALIGN).unwrap_or(end).min(end),
                align_down(end, BLOCK_ALIGN),
            )
        } else {
            (offset, end)
        };
        if stop <= start {
            self.write_zero_bytes(offset, len)?;
            return Ok(true);
        }
        match rustix::fs::fallocate(&*self.file, mode, start, stop - start) {
            Ok(()) => self.runs.forget(start, stop),
            Err(e) if unsupported(e) => return Ok(false),
            Err(e) => {
                // Part of the range may be a hole now.
                self.runs.forget(start, stop);
                return Err(self.err("fallocate", start, stop - start, e.into()));
            }
        }
        self.write_zero_bytes(offset, start - offset)?;
        self.write_zero_bytes(stop, end - stop)?;
        Ok(true)
    }

    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        if !self.punch_hole.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let done = self.fallocate_zero(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        if !done {
            self.punch_hole.store(false, Ordering::Relaxed);
        }
        Ok(done)
    }

    fn seek(&self, pos: RSeek) -> Result<Option<u64>> {
        let what = match pos {
            RSeek::Data(o) | RSeek::Hole(o) => o,
            _ => 0,
        };
        self.lseeks.fetch_add(1, Ordering::Relaxed);
        match rustix::fs::seek(&*self.file, pos) {
            Ok(o) => Ok(Some(o)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(self.err("lseek", what, 0, e.into())),
        }
    }
}

/// The file is on a file system known to punch holes (ext2/3/4, xfs, btrfs, tmpfs, f2fs). On
/// those the probe is skipped: a punch updates the file's mtime and ctime even when it punches
/// nothing, and merely opening a store must not look like a change to tools that compare file
/// times (memsync's own sync index, rsync, make, backups).
fn punches_holes(file: &File) -> bool {
    const KNOWN: [u64; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0xF2F5_2010];
    rustix::fs::fstatfs(file).is_ok_and(|s| KNOWN.contains(&(s.f_type as u64)))
}

/// The file is on tmpfs (its pages are shmem: a userfaultfd region can map them with MINOR
/// faults).
fn on_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    rustix::fs::fstatfs(file).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
}

fn unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOSYS
}

#[async_trait]
impl Store for FileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let mut caps = Caps::basic();
        caps.read_only = self.read_only;
        caps.block_size = 1;
        caps.preferred_io = 1 << 20;
        let punch = !self.read_only && self.punch_hole.load(Ordering::Relaxed);
        caps.trim = punch;
        caps.fast_zero = punch || (!self.read_only && self.zero_range.load(Ordering::Relaxed));
        caps.extents = !self.block_device;
        caps.flush = true;
        caps.multi_conn = true;
        caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.size, 1, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.err("pread", offset, buf.len() as u64, e))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        crate::util::write_all_at(&self.file, &data, offset)
            .map_err(|e| self.err("pwrite", offset, data.len() as u64, e))
    }

    /// `fdatasync`. Once it failed, every later flush fails too (see `StickyFsync`).
    async fn flush(&self) -> Result<()> {
        let what = format!("{}: flush", self.path.display());
        self.fsync_failed.check(&what)?;
        let file = Arc::clone(&self.file);
        let sticky = Arc::clone(&self.fsync_failed);
        blocking("fdatasync", move || {
            file.sync_data().map_err(|e| {
                let e = StoreError::io("fdatasync", e).context(what);
                sticky.record(&e);
                e
            })
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.punch(offset, len)? {
            // The probe said holes work, but this call disagrees: still honour the contract
            // (trimmed ranges read as zeros); caps().trim is false from now on.
            self.write_zero_bytes(offset, len)?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.zero_range.load(Ordering::Relaxed) {
            let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
            if self.fallocate_zero(mode, offset, len)? {
                return Ok(());
            }
            tracing::debug!(path = %self.path.display(), "FALLOC_FL_ZERO_RANGE unsupported");
            self.zero_range.store(false, Ordering::Relaxed);
        }
        if self.punch(offset, len)? {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, 1, offset, len)?;
        let mut out = Vec::new();
        let end = offset + len;
        if self.block_device {
            push_extent(&mut out, offset, end, ExtentKind::Data);
            return Ok(out);
        }
        let mut pos = offset;
        while pos < end {
            if let Some(run_end) = self.runs.data_until(pos) {
                let d = run_end.min(end);
                push_extent(&mut out, pos, d, ExtentKind::Data);
                pos = d;
                continue;
            }
            // Past the last data (or past the end of a file shrunk behind our back) is a hole.
            let data = self.seek(RSeek::Data(pos))?.unwrap_or(end).clamp(pos, end);
            push_extent(&mut out, pos, data, ExtentKind::Hole);
            if data == end {
                break;
            }
            if self.runs.data_until(data).is_some() {
                pos = data;
                continue;
            }
            let generation = self.runs.generation();
            let found = self.seek(RSeek::Hole(data))?;
            // The whole run, not just this query's part of it: the next query finds it here.
            if let Some(h) = found {
                self.runs.remember(generation, data, h.min(self.size));
            }
            // Clamp so that a hole punched concurrently cannot stall the walk.
            let hole = found.unwrap_or(end).clamp(data + 1, end);
            push_extent(&mut out, data, hole, ExtentKind::Data);
            pos = hole;
        }
        Ok(out)
    }

    /// A regular file on tmpfs, opened for writing, is its own shared memory: a region maps it
    /// instead of reading it, and a write through the mapping is a write to the file. (A
    /// read-only one has none: its holes could not be allocated for mapping.)
    fn shared_memory(&self) -> Option<SharedMemory> {
        (self.tmpfs && !self.read_only).then(|| SharedMemory {
            file: Arc::clone(&self.file),
            offset: 0,
            writable: true,
        })
    }

    /// Allocates the pages of the range that are holes (`fallocate` keeps the size and every
    /// page that exists, whole pages): they read as zeros, as the hole did.
    async fn make_resident(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, 1, offset, len)?;
        if self.shared_memory().is_none() {
            return Err(StoreError::Unsupported {
                op: "make_resident",
            });
        }
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(&*self.file, FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(|e| self.err("fallocate", offset, len, e.into()))
    }
}
