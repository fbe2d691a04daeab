//! `dir:` — a directory with one file per chunk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use memsync_core::meta::{MAX_META_LEN, resolve};
use memsync_core::{
    Bytes, Caps, Extent, ExtentKind, MetaInit, Result, Store, StoreError, StoreId, StoreMeta,
    async_trait, check_range, range::chunk_pieces,
};
use parking_lot::{Mutex, RwLock};

use crate::mem::push_extent;
use crate::util::{StickyFsync, blocking, is_zero, usize_of};

/// Name of the metadata file ([`StoreMeta`]) written when a directory store is created.
pub(crate) const META_FILE: &str = "memsync-dir.meta";
/// Striped per-chunk locks: chunk `i` uses stripe `i % LOCK_STRIPES`.
const LOCK_STRIPES: usize = 256;
const MAX_CHUNK: u64 = 1 << 30;
/// Above this many chunks, `extents` lists the directory once instead of probing each chunk.
const PROBE_LIMIT: u64 = 1024;

/// How to open a [`DirStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirOptions {
    /// Store size. Required when creating; when the directory already holds a store it must
    /// match (or be `None`).
    pub size: Option<u64>,
    /// Chunk size. `None`: the existing store's, or [`DirStore::DEFAULT_CHUNK_SIZE`] when
    /// creating. Must match an existing store's.
    pub chunk_size: Option<u64>,
    /// Most chunk files kept open at once (least recently used are closed first).
    pub max_open: usize,
    /// What to do about the metadata file (create/verify, adopt chunk files without one, or
    /// rewrite it).
    pub init: MetaInit,
}

impl Default for DirOptions {
    fn default() -> Self {
        DirOptions {
            size: None,
            chunk_size: None,
            max_open: DirStore::DEFAULT_MAX_OPEN,
            init: MetaInit::Auto,
        }
    }
}

impl DirOptions {
    /// Options to create (or reopen) a store of `size` bytes with the default chunk size.
    pub fn with_size(size: u64) -> Self {
        DirOptions {
            size: Some(size),
            ..Default::default()
        }
    }

    /// Set the chunk size.
    pub fn chunk_size(mut self, chunk_size: u64) -> Self {
        self.chunk_size = Some(chunk_size);
        self
    }

    /// Set the most chunk files kept open.
    pub fn max_open(mut self, max_open: usize) -> Self {
        self.max_open = max_open;
        self
    }

    /// Set what to do about the metadata file.
    pub fn init(mut self, init: MetaInit) -> Self {
        self.init = init;
        self
    }
}

/// A store kept as one file per chunk in a directory (`dir:PATH?size=1G&chunk=64K`).
///
/// Chunk `i` lives in a file named by `i` in 16 hex digits (`0000000000001a2f`). A missing file
/// reads as zeros: files are created on the first non-zero write, and removed again by `trim`,
/// `write_zeroes` and writes of an all-zero chunk. A metadata file (`memsync-dir.meta`, a
/// [`StoreMeta`]) records the size, chunk size and an identity; reopening with different values
/// fails unless [`DirOptions::init`] says to rewrite it.
///
/// Any byte range works: a request is split at chunk boundaries and each piece is one
/// `pread`/`pwrite` at its offset in the chunk file, so small requests cost one system call and
/// no read-modify-write. At most `max_open` chunk
/// files are kept open (LRU), plus those in use by in-flight requests. `flush` fsyncs every chunk
/// file written since the last flush, then the directory.
///
/// I/O happens directly in the async fns (reads and writes of one chunk on the page cache take
/// microseconds, less than a hand-off to a thread pool); only `flush` runs on tokio's blocking
/// pool. Requests for different chunks run in parallel: the fd cache's lock is held only for a
/// lookup, and chunks are locked individually (striped locks). Each piece of a write is atomic
/// with respect to reads of the same chunk.
///
/// # Example
/// ```
/// use memsync_core::{Bytes, Store, StoreExt};
/// use memsync_local::{DirOptions, DirStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> memsync_core::Result<()> {
/// # let tmp = tempfile::tempdir().unwrap();
/// let store = DirStore::open(tmp.path().join("chunks"), DirOptions::with_size(1 << 20).chunk_size(4096))?;
/// store.write(8192, Bytes::from(vec![1u8; 4096])).await?;
/// store.write(8190, Bytes::from_static(b"ab")).await?; // any range, across chunk boundaries
/// store.flush().await?;
/// assert_eq!(store.read_bytes(8192, 4096).await?[0], 1);
/// assert!(tmp.path().join("chunks/0000000000000002").exists());
/// # Ok(()) }
/// ```
pub struct DirStore {
    inner: Arc<Inner>,
}

struct Inner {
    id: Option<StoreId>,
    dir: PathBuf,
    size: u64,
    chunk_size: u64,
    fds: Mutex<FdCache>,
    locks: Box<[RwLock<()>]>,
    /// Chunks written since the last flush.
    dirty: Mutex<BTreeSet<u64>>,
    /// Files were created or removed since the last flush.
    dir_dirty: AtomicBool,
    /// Serialises flushes, so that a flush never returns while an earlier one still syncs
    /// chunks that it took from the dirty set.
    flushing: tokio::sync::Mutex<()>,
    fsync_failed: StickyFsync,
}

impl fmt::Debug for DirStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let fds = i.fds.lock();
        f.debug_struct("DirStore")
            .field("dir", &i.dir)
            .field("size", &i.size)
            .field("chunk_size", &i.chunk_size)
            .field("open_files", &fds.map.len())
            .field("max_open", &fds.cap)
            .finish()
    }
}

/// An LRU cache of open chunk files.
struct FdCache {
    cap: usize,
    tick: u64,
    map: HashMap<u64, (Arc<File>, u64)>,
    /// Last use tick -> chunk index.
    order: BTreeMap<u64, u64>,
}

impl FdCache {
    fn get(&mut self, index: u64) -> Option<Arc<File>> {
        let (file, used) = self.map.get_mut(&index)?;
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, index);
        Some(Arc::clone(file))
    }

    fn insert(&mut self, index: u64, file: Arc<File>) {
        self.remove(index);
        while self.map.len() >= self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&old);
        }
        self.tick += 1;
        self.map.insert(index, (file, self.tick));
        self.order.insert(self.tick, index);
    }

    fn remove(&mut self, index: u64) {
        if let Some((_, used)) = self.map.remove(&index) {
            self.order.remove(&used);
        }
    }
}

fn chunk_name(index: u64) -> String {
    format!("{index:016x}")
}

fn parse_chunk_name(name: &str) -> Option<u64> {
    if name.len() == 16
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

impl DirStore {
    /// The default chunk size, 64 KiB.
    pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;
    /// The default number of chunk files kept open.
    pub const DEFAULT_MAX_OPEN: usize = 256;

    /// Open the store in `dir`, creating the directory and the store if needed.
    pub fn open(dir: impl AsRef<Path>, opts: DirOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = |why: String| StoreError::Config(format!("dir store {}: {why}", dir.display()));
        let ioe = |what: &str, e: io::Error| {
            StoreError::io("open", e).context(format!("dir store {}: {what}", dir.display()))
        };
        if opts.max_open == 0 {
            return Err(cfg("max_open must be at least 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| ioe("create directory", e))?;
        let meta_path = dir.join(META_FILE);
        let found =
            match std::fs::File::open(&meta_path) {
                Ok(f) => {
                    use std::io::Read as _;
                    let mut b = Vec::new();
                    // One byte over the limit is enough to tell that it is too long.
                    f.take(MAX_META_LEN as u64 + 1)
                        .read_to_end(&mut b)
                        .map_err(|e| ioe("read metadata", e))?;
                    Some(StoreMeta::parse(&b).map_err(|e| {
                        e.context(format!("dir store {}: {META_FILE}", dir.display()))
                    })?)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(ioe("read metadata", e)),
            };
        let has_chunks = found.is_none() && {
            let entries = std::fs::read_dir(dir).map_err(|e| ioe("list directory", e))?;
            let mut any = false;
            for entry in entries {
                let entry = entry.map_err(|e| ioe("list directory", e))?;
                if entry
                    .file_name()
                    .to_str()
                    .and_then(parse_chunk_name)
                    .is_some()
                {
                    any = true;
                    break;
                }
            }
            any
        };
        let r = resolve(
            found,
            has_chunks,
            opts.size,
            opts.chunk_size,
            Self::DEFAULT_CHUNK_SIZE,
            opts.init,
        )
        .map_err(|e| match e {
            StoreError::Config(why) => cfg(format!("{why} ({META_FILE})")),
            e => e,
        })?;
        let (size, chunk_size) = (r.meta.size, r.meta.chunk_size);
        if r.write {
            Self::validate(dir, chunk_size)?;
            let tmp = dir.join(format!("{META_FILE}.tmp"));
            let mut f = File::create(&tmp).map_err(|e| ioe("write metadata", e))?;
            f.write_all(r.meta.encode().as_bytes())
                .and_then(|()| f.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &meta_path))
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(|e| ioe("write metadata", e))?;
            tracing::debug!(dir = %dir.display(), size, chunk_size, "wrote dir store metadata");
        }
        Self::validate(dir, chunk_size)?;
        Ok(DirStore {
            inner: Arc::new(Inner {
                id: r.meta.id,
                dir: dir.to_owned(),
                size,
                chunk_size,
                fds: Mutex::new(FdCache {
                    cap: opts.max_open,
                    tick: 0,
                    map: HashMap::new(),
                    order: BTreeMap::new(),
                }),
                locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
                dirty: Mutex::new(BTreeSet::new()),
                dir_dirty: AtomicBool::new(false),
                flushing: tokio::sync::Mutex::new(()),
                fsync_failed: StickyFsync::default(),
            }),
        })
    }

    fn validate(dir: &Path, chunk_size: u64) -> Result<()> {
        let cfg = |why: String| StoreError::Config(format!("dir store {}: {why}", dir.display()));
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(cfg(format!(
                "chunk={chunk_size} is out of range (1 byte to 1 GiB)"
            )));
        }
        Ok(())
    }

    /// The directory holding the chunk files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The chunk size (also `caps().block_size`).
    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    /// The identity recorded when the store was created (none for a store created before
    /// memsync recorded one).
    pub fn id(&self) -> Option<StoreId> {
        self.inner.id
    }

    /// Number of chunk files currently held open by the cache.
    pub fn open_files(&self) -> usize {
        self.inner.fds.lock().map.len()
    }
}

impl Inner {
    fn lock(&self, index: u64) -> &RwLock<()> {
        &self.locks[(index % LOCK_STRIPES as u64) as usize]
    }

    fn chunk_path(&self, index: u64) -> PathBuf {
        self.dir.join(chunk_name(index))
    }

    fn err(&self, op: &'static str, index: u64, e: io::Error) -> StoreError {
        StoreError::io(op, e).context(format!(
            "dir store {}: chunk {}",
            self.dir.display(),
            chunk_name(index)
        ))
    }

    /// The open file of chunk `index`; `None` if it does not exist and `create` is false.
    /// The caller holds the chunk's lock, so a file cannot be cached after its removal.
    fn file(&self, index: u64, create: bool) -> Result<Option<Arc<File>>> {
        if let Some(f) = self.fds.lock().get(index) {
            return Ok(Some(f));
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).create(create);
        match oo.open(self.chunk_path(index)) {
            Ok(f) => {
                let f = Arc::new(f);
                self.fds.lock().insert(index, Arc::clone(&f));
                if create {
                    self.dir_dirty.store(true, Ordering::Relaxed);
                }
                Ok(Some(f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
            Err(e) => Err(self.err(if create { "create" } else { "open" }, index, e)),
        }
    }

    /// The length of chunk `index` (the last chunk may be short).
    fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk_size).min(self.chunk_size)
    }

    /// Read `buf.len()` bytes at `within` of chunk `index`; a missing or short file reads as zeros.
    fn read_piece(&self, index: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let _guard = self.lock(index).read();
        let Some(file) = self.file(index, false)? else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], within + done as u64) {
                Ok(0) => break, // A short file (an interrupted first write) reads as zeros.
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("pread", index, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Write `data` at `within` of chunk `index`. A whole chunk of zeros removes the file; zeros
    /// written into a chunk that has no file change nothing and create nothing.
    fn write_piece(&self, index: u64, within: u64, data: &[u8]) -> Result<()> {
        let _guard = self.lock(index).write();
        let whole = within == 0 && data.len() as u64 == self.chunk_len(index);
        if is_zero(data) {
            if whole {
                return self.remove_chunk(index);
            }
            let Some(file) = self.file(index, false)? else {
                return Ok(());
            };
            return self.pwrite(&file, index, within, data);
        }
        let file = self.file(index, true)?.expect("created");
        self.pwrite(&file, index, within, data)
    }

    fn pwrite(&self, file: &File, index: u64, within: u64, data: &[u8]) -> Result<()> {
        crate::util::write_all_at(file, data, within).map_err(|e| self.err("pwrite", index, e))?;
        self.dirty.lock().insert(index);
        Ok(())
    }

    /// Remove a chunk file. The caller holds the chunk's write lock.
    fn remove_chunk(&self, index: u64) -> Result<()> {
        self.fds.lock().remove(index);
        match std::fs::remove_file(self.chunk_path(index)) {
            Ok(()) => {
                self.dir_dirty.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("unlink", index, e)),
        }
    }

    /// Zero a range: whole chunks lose their file, partial chunks get zeros written.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; usize_of(self.chunk_size.min(len))];
        for p in chunk_pieces(offset, len, self.chunk_size) {
            self.write_piece(p.index, p.within, &zeros[..usize_of(p.len)])?;
        }
        Ok(())
    }

    /// Chunk indices in `first..=last` that have a file, sorted.
    fn present(&self, first: u64, last: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        if last - first < PROBE_LIMIT {
            for index in first..=last {
                let cached = self.fds.lock().map.contains_key(&index);
                if cached || self.chunk_path(index).exists() {
                    out.push(index);
                }
            }
            return Ok(out);
        }
        let entries = std::fs::read_dir(&self.dir).map_err(|e| self.err("readdir", first, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.err("readdir", first, e))?;
            if let Some(i) = entry.file_name().to_str().and_then(parse_chunk_name)
                && (first..=last).contains(&i)
            {
                out.push(i);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// fsync the chunks written before the call, then the directory.
    fn sync(&self, dirty: &mut BTreeSet<u64>, dir_dirty: bool) -> Result<()> {
        while let Some(&index) = dirty.first() {
            let file = {
                let _guard = self.lock(index).read();
                let cached = self.fds.lock().get(index);
                match cached {
                    Some(f) => Some(f),
                    // Evicted from the cache: fsync through a new descriptor (fsync applies to
                    // the file, not the descriptor). Not cached, to keep hot files cached.
                    None => match File::open(self.chunk_path(index)) {
                        Ok(f) => Some(Arc::new(f)),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => None, // Removed since.
                        Err(e) => return Err(self.err("open", index, e)),
                    },
                }
            };
            if let Some(file) = file {
                file.sync_data()
                    .map_err(|e| self.err("fdatasync", index, e))?;
            }
            dirty.remove(&index);
        }
        if dir_dirty {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    StoreError::io("fsync", e)
                        .context(format!("dir store {}: directory", self.dir.display()))
                })?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for DirStore {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn identity(&self) -> Option<StoreId> {
        self.inner.id
    }

    fn caps(&self) -> Caps {
        let cs = self.inner.chunk_size;
        let mut caps = Caps::basic();
        caps.preferred_io = cs;
        caps.max_io = (caps.max_io / cs * cs).max(cs);
        caps.trim = true;
        caps.fast_zero = true;
        caps.extents = true;
        caps.flush = true;
        caps.multi_conn = true;
        caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let i = &self.inner;
        check_range(i.size, 1, offset, buf.len() as u64)?;
        for p in chunk_pieces(offset, buf.len() as u64, i.chunk_size) {
            let at = usize_of(p.pos);
            i.read_piece(p.index, p.within, &mut buf[at..at + usize_of(p.len)])?;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let i = &self.inner;
        check_range(i.size, 1, offset, data.len() as u64)?;
        for p in chunk_pieces(offset, data.len() as u64, i.chunk_size) {
            let at = usize_of(p.pos);
            i.write_piece(p.index, p.within, &data[at..at + usize_of(p.len)])?;
        }
        Ok(())
    }

    /// fsync the chunks written since the last flush, then the directory. Once an fsync
    /// failed, every later flush fails too (see `StickyFsync`).
    async fn flush(&self) -> Result<()> {
        let _serial = self.inner.flushing.lock().await;
        let what = format!("dir store {}: flush", self.inner.dir.display());
        self.inner.fsync_failed.check(&what)?;
        let mut dirty = std::mem::take(&mut *self.inner.dirty.lock());
        let dir_dirty = self.inner.dir_dirty.swap(false, Ordering::Relaxed);
        if dirty.is_empty() && !dir_dirty {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        blocking("flush", move || {
            let r = inner.sync(&mut dirty, dir_dirty);
            if let Err(e) = &r {
                if matches!(
                    e.root(),
                    StoreError::Io {
                        op: "fdatasync" | "fsync",
                        ..
                    }
                ) {
                    // Not "try again next time": the failed file's dirty pages may be gone.
                    inner.fsync_failed.record(e);
                } else {
                    // Nothing was lost (e.g. a chunk file could not be opened): try again.
                    inner.dirty.lock().append(&mut dirty);
                    if dir_dirty {
                        inner.dir_dirty.store(true, Ordering::Relaxed);
                    }
                }
            }
            r
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.inner.size, 1, offset, len)?;
        self.inner.zero_range(offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.inner.size, 1, offset, len)?;
        self.inner.zero_range(offset, len)
    }

    /// Extents at chunk granularity (any range is accepted here, not only aligned ones).
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let i = &self.inner;
        check_range(i.size, 1, offset, len)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let (cs, end) = (i.chunk_size, offset + len);
        let mut pos = offset;
        for index in i.present(offset / cs, (end - 1) / cs)? {
            let start = (index * cs).max(offset);
            let stop = (index * cs + cs).min(end);
            push_extent(&mut out, pos, start, ExtentKind::Hole);
            push_extent(&mut out, start, stop, ExtentKind::Data);
            pos = stop;
        }
        push_extent(&mut out, pos, end, ExtentKind::Hole);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(chunk_name(0x1a2f), "0000000000001a2f");
        assert_eq!(parse_chunk_name("0000000000001a2f"), Some(0x1a2f));
        assert_eq!(parse_chunk_name("0000000000001A2F"), None);
        assert_eq!(parse_chunk_name("1a2f"), None);
        assert_eq!(parse_chunk_name(META_FILE), None);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let f = || Arc::new(File::open("/dev/null").unwrap());
        let mut c = FdCache {
            cap: 2,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        };
        c.insert(1, f());
        c.insert(2, f());
        assert!(c.get(1).is_some());
        c.insert(3, f());
        assert!(c.get(2).is_none(), "2 was least recently used");
        assert!(c.get(1).is_some() && c.get(3).is_some());
        c.remove(1);
        assert_eq!((c.map.len(), c.order.len()), (1, 1));
    }
}
