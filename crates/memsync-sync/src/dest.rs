//! The receiving side of a sync: a [`Dest`] answers digest queries and applies patches. A
//! [`LocalDest`] does it on a store in this process; the peer server wraps one, and
//! [`crate::peer::RemoteDest`] speaks to it over the network.
//!
//! **What a patch guarantees.** A patch carries the changed byte runs of one chunk and the strong
//! digest of the whole new chunk. The receiver builds the new chunk in memory (its current bytes
//! with the runs applied), checks the BLAKE3 digest, and only then writes the runs. So a chunk
//! whose page digests collided, or whose patch was built against other bytes, is never written
//! wrong: the answer is [`PatchOutcome::Mismatch`] and the sender sends the whole chunk. While the
//! runs of one chunk are being written, a reader of the store can see some of them and not others;
//! once `patch` returns, the chunk is entirely new.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use memsync_core::{DynStore, Result, StoreError, async_trait};
use parking_lot::Mutex;

pub use crate::delta::Run;
use crate::digest::{self, Digest, Layout, ScanStats};
use crate::index::{FileState, IndexFile, IndexStatus};

/// What became of a patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOutcome {
    /// Written; the chunk now has the patch's digest.
    Applied,
    /// The patched chunk would not have had the patch's digest; nothing was written.
    Mismatch,
}

/// Counters of a destination (also sent back by a peer at the end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestStats {
    pub scan: ScanStats,
    /// Bytes read to answer page-digest queries and to check patches.
    pub read: u64,
    /// Bytes of data written, and bytes made zero.
    pub written: u64,
    pub zeroed: u64,
    /// The digests came from the persisted index.
    pub index_used: bool,
}

/// The receiving side of a sync.
#[async_trait]
pub trait Dest: Send + Sync + fmt::Debug {
    fn layout(&self) -> Layout;
    /// The strong digest of every chunk (from an index where one is valid).
    async fn digests(&self) -> Result<Vec<Digest>>;
    /// The page digests of chunk `i`.
    async fn page_digests(&self, i: u64) -> Result<Vec<u32>>;
    /// Apply runs to chunk `i` if the result has digest `digest` (see the module docs).
    async fn patch(&self, i: u64, digest: Digest, runs: Vec<Run>) -> Result<PatchOutcome>;
    /// Make everything applied durable (and persist the index). A commit point: more patches
    /// may follow.
    async fn commit(&self) -> Result<DestStats>;
    /// This destination as a store in this process, if it is one: the sender then compares
    /// bytes exactly instead of exchanging page digests (see [`LocalDest::apply_exact`]).
    fn as_local(&self) -> Option<&LocalDest> {
        None
    }
    /// Bytes of each digest of [`Dest::digests`] that are real: the rest are zero. Digests are
    /// compared on this prefix.
    fn digest_len(&self) -> usize {
        32
    }
    /// Bytes sent to and received from a remote destination so far.
    fn wire(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Check runs against a chunk of `len` bytes: in bounds, data lengths right, ordered.
pub fn check_runs(runs: &[Run], len: u64) -> Result<()> {
    let mut pos = 0u64;
    for r in runs {
        let end = r.off as u64 + r.len as u64;
        if (r.off as u64) < pos || end > len || r.len == 0 {
            return Err(StoreError::backend(format!(
                "patch run {}+{} is out of order or outside the chunk of {len} bytes",
                r.off, r.len
            )));
        }
        if r.data.as_ref().is_some_and(|d| d.len() != r.len as usize) {
            return Err(StoreError::backend("patch run data length differs"));
        }
        pos = end;
    }
    Ok(())
}

/// A destination store in this process, optionally with a persisted index (a `file:` store).
pub struct LocalDest {
    store: DynStore,
    layout: Layout,
    index: Option<IndexFile>,
    /// Digests of what the store holds, once known; `None` entries are unknown.
    digests: Mutex<Option<Vec<Digest>>>,
    index_status: Mutex<IndexStatus>,
    /// The file's state when its scan began (to save the index only if nothing changed it).
    scanned_from: Mutex<Option<(FileState, i64)>>,
    /// A write failed: some chunk may be half-written, so no index may be saved.
    broken: AtomicBool,
    wrote: AtomicBool,
    /// Flush the store on commit (see [`LocalDest::set_durable`]).
    durable: AtomicBool,
    scan: Mutex<ScanStats>,
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    /// Chunks read for their page digests, kept for the patch that usually follows so that
    /// the chunk is not read twice (at most [`RECENT_BYTES`]; dropped by any write of the
    /// chunk and by a commit).
    recent: Mutex<std::collections::VecDeque<(u64, bytes::BytesMut)>>,
}

/// Bytes of chunks kept between their page digests and their patch.
const RECENT_BYTES: u64 = 32 << 20;

impl fmt::Debug for LocalDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDest")
            .field("store", &self.store)
            .field("layout", &self.layout)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Chunks checked by reading when an index is otherwise valid: a cheap guard against changes
/// the file times do not show.
const SAMPLES: u64 = 8;

/// Load `index` for `store` and check a sample of chunks against it. Returns the digests if
/// the index is trusted.
pub async fn load_checked(
    index: &IndexFile,
    store: &DynStore,
    layout: Layout,
) -> Result<Vec<Digest>, IndexStatus> {
    let digests = index.load(layout)?;
    let n = layout.chunks();
    if n > 0 {
        // A different sample each time: a change the times missed is found sooner or later.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        let budget = (SAMPLES * 64 * 1024 / layout.chunk_size).clamp(1, SAMPLES);
        for k in 0..budget.min(n) {
            let i = (seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(k * 7919))
                % n;
            let data = digest::read_chunk(&**store, layout, i)
                .await
                .map_err(|e| IndexStatus::Stale(format!("sample read: {}", e.chain())))?;
            if digest::chunk_digest(&data) != digests[i as usize] {
                return Err(IndexStatus::Stale(format!(
                    "chunk {i} differs from the index although the file times match"
                )));
            }
        }
    }
    Ok(digests)
}

impl LocalDest {
    /// A destination on `store`, cut into chunks of `chunk_size`, with the index of `file`
    /// if given (the path of a `file:` store).
    pub fn new(store: DynStore, chunk_size: u64, file: Option<&std::path::Path>) -> Result<Self> {
        if store.caps().read_only {
            return Err(StoreError::ReadOnly);
        }
        Self::for_reading(store, chunk_size, file)
    }

    /// A `LocalDest` that is only read: the source of a pull ([`LocalDest::pull`]). The store
    /// may be read-only.
    pub fn for_reading(
        store: DynStore,
        chunk_size: u64,
        file: Option<&std::path::Path>,
    ) -> Result<Self> {
        let layout = Layout::new(store.size(), chunk_size)?;
        Ok(LocalDest {
            store,
            layout,
            index: file.map(IndexFile::for_file),
            digests: Mutex::new(None),
            index_status: Mutex::new(IndexStatus::None),
            scanned_from: Mutex::new(None),
            broken: AtomicBool::new(false),
            wrote: AtomicBool::new(false),
            durable: AtomicBool::new(true),
            scan: Mutex::new(ScanStats::default()),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            recent: Mutex::new(Default::default()),
        })
    }

    /// Keep chunk `i`'s bytes for its coming patch.
    fn keep_recent(&self, i: u64, data: bytes::BytesMut) {
        let max = (RECENT_BYTES / self.layout.chunk_size).max(1) as usize;
        let mut r = self.recent.lock();
        r.retain(|(j, _)| *j != i);
        if r.len() >= max {
            r.pop_front();
        }
        r.push_back((i, data));
    }

    /// The bytes of chunk `i` kept by [`LocalDest::keep_recent`], if any (taken).
    fn take_recent(&self, i: u64) -> Option<bytes::BytesMut> {
        let mut r = self.recent.lock();
        let k = r.iter().position(|(j, _)| *j == i)?;
        r.remove(k).map(|(_, d)| d)
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// Whether [`Dest::commit`] flushes the store (on by default). Off, a commit of a `file:`
    /// store returns with the data in the page cache, as `rsync` does without `--fsync`: a
    /// crash can lose it, and the index then saved is trusted in this boot only (see
    /// [`crate::index`]).
    pub fn set_durable(&self, on: bool) {
        self.durable.store(on, Relaxed);
    }

    /// Why the index was or was not used.
    pub fn index_status(&self) -> IndexStatus {
        self.index_status.lock().clone()
    }

    fn stats(&self) -> DestStats {
        DestStats {
            scan: *self.scan.lock(),
            read: self.read.load(Relaxed),
            written: self.written.load(Relaxed),
            zeroed: self.zeroed.load(Relaxed),
            index_used: *self.index_status.lock() == IndexStatus::Used,
        }
    }

    /// Chunk `i` of this store, for a sender comparing bytes exactly.
    pub async fn read_chunk(&self, i: u64) -> Result<bytes::BytesMut> {
        let data = digest::read_chunk(&*self.store, self.layout, i).await?;
        self.read.fetch_add(data.len() as u64, Relaxed);
        Ok(data)
    }

    /// Write runs that a sender in this process computed by comparing the new chunk with this
    /// store's bytes exactly (read by [`LocalDest::read_chunk`]), so the chunk then holds the
    /// bytes with digest `digest` without checking it again. Like every sync, this assumes
    /// nobody else writes the destination meanwhile.
    pub async fn apply_exact(&self, i: u64, digest: Digest, runs: &[Run]) -> Result<()> {
        if i >= self.layout.chunks() {
            return Err(StoreError::backend(format!("no chunk {i}")));
        }
        let (base, len) = self.layout.chunk(i);
        check_runs(runs, len)?;
        self.write_chunk(i, base, digest, runs).await
    }

    /// Pull: chunk `i` as its digest and the runs that differ from `pages` (the page digests
    /// of the puller's copy; empty: the whole chunk, zero pages as zero runs).
    pub async fn pull(&self, i: u64, pages: &[u32]) -> Result<(Digest, Vec<Run>)> {
        if i >= self.layout.chunks() {
            return Err(StoreError::backend(format!("no chunk {i}")));
        }
        let data = self.read_chunk(i).await?.freeze();
        if !pages.is_empty() && pages.len() != data.len().div_ceil(digest::PAGE as usize) {
            return Err(StoreError::backend(format!(
                "{} page digests for chunk {i} of {} bytes",
                pages.len(),
                data.len()
            )));
        }
        let runs = crate::delta::diff_runs(&data, crate::delta::Theirs::Pages(pages));
        Ok((digest::chunk_digest(&data), runs))
    }

    async fn write_chunk(&self, i: u64, base: u64, want: Digest, runs: &[Run]) -> Result<()> {
        self.wrote.store(true, Relaxed);
        // Kept bytes of this chunk are old from now on.
        self.take_recent(i);
        if let Err(e) = self.write_runs(base, runs).await {
            self.broken.store(true, Relaxed);
            if let Some(d) = self.digests.lock().as_mut() {
                // Unknown now; never saved (broken), and never matches a real digest by chance
                // in this run since no BLAKE3 output is known to be all 0xff.
                d[i as usize] = [0xff; 32];
            }
            return Err(e.context(format!("writing chunk {i}")));
        }
        if let Some(d) = self.digests.lock().as_mut() {
            d[i as usize] = want;
        }
        Ok(())
    }

    async fn write_runs(&self, base: u64, runs: &[Run]) -> Result<()> {
        for r in runs {
            let off = base + r.off as u64;
            match &r.data {
                Some(d) => {
                    self.store.write(off, d.clone()).await?;
                    self.written.fetch_add(r.len as u64, Relaxed);
                }
                None => {
                    self.store.write_zeroes(off, r.len as u64).await?;
                    self.zeroed.fetch_add(r.len as u64, Relaxed);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Dest for LocalDest {
    fn layout(&self) -> Layout {
        self.layout
    }

    async fn digests(&self) -> Result<Vec<Digest>> {
        if let Some(d) = self.digests.lock().clone() {
            return Ok(d);
        }
        if let Some(index) = &self.index {
            match load_checked(index, &self.store, self.layout).await {
                Ok(d) => {
                    *self.index_status.lock() = IndexStatus::Used;
                    *self.digests.lock() = Some(d.clone());
                    return Ok(d);
                }
                Err(status) => *self.index_status.lock() = status,
            }
            *self.scanned_from.lock() = index.state_now().ok();
        }
        let (d, stats) = digest::scan(&self.store, self.layout, &|_| {}, None).await?;
        *self.scan.lock() = stats;
        *self.digests.lock() = Some(d.clone());
        Ok(d)
    }

    async fn page_digests(&self, i: u64) -> Result<Vec<u32>> {
        if i >= self.layout.chunks() {
            return Err(StoreError::backend(format!("no chunk {i}")));
        }
        let data = digest::read_chunk(&*self.store, self.layout, i).await?;
        self.read.fetch_add(data.len() as u64, Relaxed);
        let pages = digest::page_digests(&data);
        self.keep_recent(i, data);
        Ok(pages)
    }

    async fn patch(&self, i: u64, want: Digest, runs: Vec<Run>) -> Result<PatchOutcome> {
        if i >= self.layout.chunks() {
            return Err(StoreError::backend(format!("no chunk {i}")));
        }
        let (base, len) = self.layout.chunk(i);
        check_runs(&runs, len)?;
        // Build the new chunk in memory and check it before writing anything. A patch that
        // replaces the whole chunk needs no read.
        let whole = runs.len() == 1 && runs[0].off == 0 && runs[0].len as u64 == len;
        let got = if whole {
            match &runs[0].data {
                Some(d) => digest::chunk_digest(d),
                None => self.layout.zero_digest(i),
            }
        } else {
            let mut chunk = match self.take_recent(i) {
                Some(c) => c,
                None => {
                    let c = digest::read_chunk(&*self.store, self.layout, i).await?;
                    self.read.fetch_add(len, Relaxed);
                    c
                }
            };
            for r in &runs {
                let dst = &mut chunk[r.off as usize..(r.off + r.len) as usize];
                match &r.data {
                    Some(d) => dst.copy_from_slice(d),
                    None => dst.fill(0),
                }
            }
            digest::chunk_digest(&chunk)
        };
        if got != want {
            return Ok(PatchOutcome::Mismatch);
        }
        self.write_chunk(i, base, want, &runs).await?;
        Ok(PatchOutcome::Applied)
    }

    fn as_local(&self) -> Option<&LocalDest> {
        Some(self)
    }

    async fn commit(&self) -> Result<DestStats> {
        self.recent.lock().clear();
        let durable = self.durable.load(Relaxed);
        if durable {
            self.store.flush().await?;
        }
        let Some(index) = &self.index else {
            return Ok(self.stats());
        };
        let digests = self.digests.lock().clone();
        match digests {
            Some(d) if !self.broken.load(Relaxed) => {
                let wrote = self.wrote.load(Relaxed);
                let unchanged = !wrote && *self.index_status.lock() == IndexStatus::Used;
                // Not written by this sync: the digests are those of the scan, valid only if
                // the file did not change since it began (a pull's source, or a destination
                // that was already equal).
                let from = (!wrote).then(|| *self.scanned_from.lock()).flatten();
                if !unchanged && (wrote || from.is_some()) {
                    let index = index.clone();
                    let layout = self.layout;
                    tokio::task::spawn_blocking(move || {
                        index.save(layout, &d, None, from, durable)
                    })
                    .await
                    .map_err(|e| StoreError::backend(format!("index task: {e}")))?
                    .map_err(|e| StoreError::io("saving the digest index", e))?;
                }
            }
            _ => index.remove(),
        }
        Ok(self.stats())
    }
}

/// The sending side's digests (see [`source_digests`]).
#[derive(Debug)]
pub struct SourceDigests {
    pub digests: Vec<Digest>,
    /// The scan counters (all zero when the index was used).
    pub stats: ScanStats,
    /// What happened with the index.
    pub status: IndexStatus,
    /// The file's state before the scan (to save the index afterwards only if the file did
    /// not change), and the chunks' fingerprints taken by the scan.
    pub save: Option<((FileState, i64), digest::FpKey, Vec<u128>)>,
}

/// The sending side's digests: from the index of a local file when it is trusted, else by a
/// scan; a scan of an indexed file fingerprints every chunk and hashes with BLAKE3 only those
/// whose fingerprints differ from the stored index's ([`IndexFile::known`]).
pub async fn source_digests(
    store: &DynStore,
    layout: Layout,
    index: Option<&IndexFile>,
    progress: &(dyn Fn(u64) + Sync),
    hook: Option<digest::PieceHook>,
) -> Result<SourceDigests> {
    let Some(index) = index else {
        let (digests, stats) = digest::scan(store, layout, progress, hook).await?;
        return Ok(SourceDigests {
            digests,
            stats,
            status: IndexStatus::None,
            save: None,
        });
    };
    let status = match load_checked(index, store, layout).await {
        Ok(digests) => {
            progress(layout.size);
            return Ok(SourceDigests {
                digests,
                stats: ScanStats::default(),
                status: IndexStatus::Used,
                save: None,
            });
        }
        Err(s) => s,
    };
    let before = index.state_now().ok();
    let (ix, l) = (index.clone(), layout);
    let known = tokio::task::spawn_blocking(move || ix.known(l))
        .await
        .ok()
        .flatten();
    let key = match &known {
        Some(k) => k.key.clone(),
        None => digest::FpKey::random()
            .map_err(|e| StoreError::io("reading /dev/urandom for a fingerprint key", e))?,
    };
    let s = digest::scan_with(
        store,
        layout,
        progress,
        hook,
        Some((key.clone(), known.map(Arc::new))),
    )
    .await?;
    Ok(SourceDigests {
        digests: s.digests,
        stats: s.stats,
        status,
        save: before.zip(s.fps).map(|(b, f)| (b, key, f)),
    })
}

/// Shared handle used by the engine and the pusher.
pub type DynDest = Arc<dyn Dest>;
