//! Where a destination puts what it receives, and how its readers ask for a chunk that is
//! missing after a post-copy switch-over.
//!
//! [`Target`] is the seam between the protocol and what is migrated: [`StoreTarget`] receives
//! into any store and is itself a [`Store`] that the destination's application uses (directly,
//! as an NBD export or FUSE file, or under a lazy region); a memsync region driven by `place`
//! and its own faults implements the same trait.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memsync_core::layers::LatencyHistogram;
use memsync_core::{Bytes, Caps, DynStore, Extent, Result, Store, StoreError, async_trait};
use memsync_sync::digest::Layout;
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::oneshot;

use crate::net::{BoxWrite, write_msg};
use crate::proto::Msg;
use crate::set::ChunkSet;

/// The destination's urgent path: a reader that needs a missing chunk asks here, and the
/// request is written to the urgent connection by the asking thread itself (a fault handler
/// thread polls the socket directly): a hand-off to a writer task would cost a cross-CPU
/// wake-up per fault (~20-50 µs here). Every request stays outstanding until the target holds
/// its chunk, and all are sent again on a new connection after a cut.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

struct FaultsInner {
    outstanding: Mutex<BTreeSet<u64>>,
    link: tokio::sync::Mutex<Option<UrgentLink>>,
    latency: LatencyHistogram,
}

/// The writing half of the current urgent connection, and what to call when it fails.
struct UrgentLink {
    w: BufWriter<BoxWrite>,
    lost: Box<dyn Fn(String) + Send + Sync>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faults({} recorded)", self.inner.latency.count())
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}

impl Faults {
    /// A fault path with no connection yet: requests wait in the outstanding set until
    /// [`attach`](Self::attach).
    pub fn new() -> Faults {
        Faults {
            inner: Arc::new(FaultsInner {
                outstanding: Mutex::new(BTreeSet::new()),
                link: tokio::sync::Mutex::new(None),
                latency: LatencyHistogram::new(),
            }),
        }
    }

    /// Ask for chunk `index` (the answer comes through [`Target::place`]). A failed write
    /// detaches the connection and reports it; the request is sent again at the next attach.
    pub async fn request(&self, index: u64) {
        self.inner.outstanding.lock().insert(index);
        let mut link = self.inner.link.lock().await;
        let Some(l) = link.as_mut() else { return };
        let no = AtomicU64::new(0);
        let r = async {
            write_msg(&mut l.w, &Msg::Request { index }, &no).await?;
            l.w.flush().await
        }
        .await;
        if let Err(e) = r
            && let Some(l) = link.take()
        {
            (l.lost)(e.to_string());
        }
    }

    /// Ask for `indices` from a task (for callers that cannot wait, e.g. under a lock).
    pub fn request_later(&self, indices: Vec<u64>) {
        if indices.is_empty() {
            return;
        }
        self.inner
            .outstanding
            .lock()
            .extend(indices.iter().copied());
        let f = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    for i in indices {
                        f.request(i).await;
                    }
                });
            }
            // Outside a runtime they go out with the next attach.
            Err(_) => tracing::debug!("migrate: {} requests wait for a connection", indices.len()),
        }
    }

    /// Make `w` the urgent connection: first send every outstanding request whose chunk is
    /// not in `held` (sent before a cut, never answered), then serve new ones. `lost` is
    /// called once if a write on `w` fails.
    pub async fn attach(
        &self,
        w: BoxWrite,
        held: &ChunkSet,
        lost: impl Fn(String) + Send + Sync + 'static,
    ) {
        let mut link = self.inner.link.lock().await;
        // Taken under the link's lock: a request added after this snapshot writes to the new
        // connection itself once the lock is released.
        let again: Vec<u64> = {
            let mut o = self.inner.outstanding.lock();
            o.retain(|i| !held.contains(*i));
            o.iter().copied().collect()
        };
        let mut w = BufWriter::with_capacity(4096, w);
        let no = AtomicU64::new(0);
        let r = async {
            for index in again {
                write_msg(&mut w, &Msg::Request { index }, &no).await?;
            }
            w.flush().await
        }
        .await;
        match r {
            Ok(()) => {
                *link = Some(UrgentLink {
                    w,
                    lost: Box::new(lost),
                })
            }
            Err(e) => {
                *link = None;
                lost(e.to_string());
            }
        }
    }

    /// How long a reader waited for a missing chunk.
    pub fn record(&self, waited: Duration) {
        self.inner.latency.record(waited);
    }

    pub fn latency(&self) -> &LatencyHistogram {
        &self.inner.latency
    }
}

/// What a destination writes received chunks into.
#[async_trait]
pub trait Target: Send + Sync + fmt::Debug {
    /// Bytes of the region; the source's must be equal.
    fn size(&self) -> u64;

    /// The chunk geometry, once, before anything is placed.
    fn prepare(&self, layout: Layout) -> Result<()>;

    /// Put the bytes of chunk `index` (`None`: zeros). Before a post-copy switch-over every
    /// call writes (a later pass overwrites an earlier one). After it, only a missing chunk is
    /// written: returns `false` and writes nothing if the chunk is already present (it arrived
    /// on the other connection, or the application wrote it), so a late copy never overwrites
    /// newer bytes.
    async fn place(&self, index: u64, data: Option<Bytes>) -> Result<bool>;

    /// Chunks `first..first + count` are zeros (before switch-over; one call for the run).
    async fn place_zeroes(&self, first: u64, count: u64) -> Result<()> {
        for i in first..first + count {
            self.place(i, None).await?;
        }
        Ok(())
    }

    /// Post-copy switch-over: `missing` chunks are absent from now on and readers of one ask
    /// `faults` and wait.
    fn begin_postcopy(&self, missing: &ChunkSet, faults: Faults);

    /// Before a post-copy switch-over, while the source still runs: chunks `stale` will be
    /// missing; a target that must do work to make them absent (drop a region's pages) may do
    /// it now rather than in [`begin_postcopy`](Self::begin_postcopy), inside the downtime.
    fn evict(&self, stale: &ChunkSet) {
        let _ = stale;
    }

    /// Whether [`keep`](Self::keep) works (a verifying switch-over needs it).
    fn can_keep(&self) -> bool {
        false
    }

    /// After a post-copy switch-over: the copy of missing chunk `index` the target holds is
    /// current; it becomes present without a write (`false` if it was present already).
    async fn keep(&self, index: u64) -> Result<bool> {
        let _ = index;
        Err(StoreError::Unsupported { op: "keep" })
    }

    /// Chunks present (after switch-over; every chunk before a post-copy switch-over).
    fn held(&self) -> ChunkSet;

    /// Chunks still missing.
    fn missing(&self) -> u64;

    /// Make what was placed durable.
    async fn flush(&self) -> Result<()>;
}

/// Locks that order a placement against the writes of the application on one chunk.
const STRIPES: usize = 256;

struct Post {
    present: ChunkSet,
    waiters: HashMap<u64, Vec<oneshot::Sender<()>>>,
    faults: Option<Faults>,
}

/// A [`Target`] over any store, and the [`Store`] the destination's application uses: reads
/// and writes of a missing chunk wait until it arrives (asking the source for it first).
/// Expose it only once the destination resumes (the `resume` hook): before the switch-over its
/// contents are a mix of passes.
pub struct StoreTarget {
    inner: DynStore,
    layout: parking_lot::RwLock<Option<Layout>>,
    postcopy: AtomicBool,
    missing: AtomicU64,
    post: Mutex<Post>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Bytes and chunks written by placement.
    pub placed_bytes: AtomicU64,
    pub placed_chunks: AtomicU64,
}

impl fmt::Debug for StoreTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreTarget({:?})", self.inner)
    }
}

impl StoreTarget {
    pub fn new(inner: DynStore) -> Arc<Self> {
        Arc::new(StoreTarget {
            inner,
            layout: parking_lot::RwLock::new(None),
            postcopy: AtomicBool::new(false),
            missing: AtomicU64::new(0),
            post: Mutex::new(Post {
                present: ChunkSet::default(),
                waiters: HashMap::new(),
                faults: None,
            }),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            placed_bytes: AtomicU64::new(0),
            placed_chunks: AtomicU64::new(0),
        })
    }

    fn layout(&self) -> Result<Layout> {
        self.layout
            .read()
            .ok_or_else(|| StoreError::backend("migration target used before its geometry"))
    }

    /// Wait until every chunk overlapping `offset..offset + len` is present.
    async fn ensure(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !self.postcopy.load(Ordering::Acquire) || self.missing() == 0 {
            return Ok(());
        }
        let l = self.layout()?;
        let first = offset / l.chunk_size;
        let last = (offset + len - 1) / l.chunk_size;
        for i in first..=last.min(l.chunks().saturating_sub(1)) {
            let (rx, faults) = {
                let mut p = self.post.lock();
                if p.present.contains(i) {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let w = p.waiters.entry(i).or_default();
                w.push(tx);
                let first_waiter = w.len() == 1;
                (rx, first_waiter.then(|| p.faults.clone()).flatten())
            };
            let t = Instant::now();
            if let Some(f) = &faults {
                f.request(i).await;
            }
            rx.await.map_err(|_| {
                StoreError::backend(format!("migration ended before chunk {i} arrived"))
            })?;
            if let Some(f) = faults {
                f.record(t.elapsed());
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Target for StoreTarget {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn prepare(&self, layout: Layout) -> Result<()> {
        if layout.size != self.inner.size() {
            return Err(StoreError::Config(format!(
                "the destination store has {} bytes, the source {}: migration needs equal sizes",
                self.inner.size(),
                layout.size
            )));
        }
        *self.layout.write() = Some(layout);
        Ok(())
    }

    async fn place(&self, index: u64, data: Option<Bytes>) -> Result<bool> {
        let l = self.layout()?;
        if index >= l.chunks() {
            return Err(StoreError::backend(format!(
                "chunk {index} is past the region's {} chunks",
                l.chunks()
            )));
        }
        let (off, len) = l.chunk(index);
        if let Some(d) = &data
            && d.len() as u64 != len
        {
            return Err(StoreError::backend(format!(
                "chunk {index} has {} bytes, expected {len}",
                d.len()
            )));
        }
        let post = self.postcopy.load(Ordering::Acquire);
        let _g = if post {
            let g = self.stripes[index as usize % STRIPES].lock().await;
            if self.post.lock().present.contains(index) {
                return Ok(false);
            }
            Some(g)
        } else {
            None
        };
        match data {
            Some(d) => self.inner.write(off, d).await?,
            None => self.inner.write_zeroes(off, len).await?,
        }
        self.placed_bytes.fetch_add(len, Ordering::Relaxed);
        self.placed_chunks.fetch_add(1, Ordering::Relaxed);
        if post {
            let mut p = self.post.lock();
            if p.present.insert(index) {
                self.missing.fetch_sub(1, Ordering::AcqRel);
            }
            for w in p.waiters.remove(&index).into_iter().flatten() {
                let _ = w.send(());
            }
        }
        Ok(true)
    }

    async fn place_zeroes(&self, first: u64, count: u64) -> Result<()> {
        let l = self.layout()?;
        if self.postcopy.load(Ordering::Acquire) {
            for i in first..first + count {
                self.place(i, None).await?;
            }
            return Ok(());
        }
        let end = first
            .checked_add(count)
            .filter(|&e| e <= l.chunks())
            .ok_or_else(|| StoreError::backend("zero run past the region"))?;
        let off = first * l.chunk_size;
        let stop = (end * l.chunk_size).min(l.size);
        self.inner.write_zeroes(off, stop - off).await?;
        self.placed_bytes.fetch_add(stop - off, Ordering::Relaxed);
        self.placed_chunks.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    fn can_keep(&self) -> bool {
        true
    }

    async fn keep(&self, index: u64) -> Result<bool> {
        if !self.postcopy.load(Ordering::Acquire) {
            return Ok(true);
        }
        let _g = self.stripes[index as usize % STRIPES].lock().await;
        let mut p = self.post.lock();
        if !p.present.insert(index) {
            return Ok(false);
        }
        self.missing.fetch_sub(1, Ordering::AcqRel);
        for w in p.waiters.remove(&index).into_iter().flatten() {
            let _ = w.send(());
        }
        Ok(true)
    }

    fn begin_postcopy(&self, missing: &ChunkSet, faults: Faults) {
        let mut p = self.post.lock();
        p.present = missing.complement();
        p.faults = Some(faults);
        self.missing.store(missing.count(), Ordering::Release);
        self.postcopy.store(true, Ordering::Release);
    }

    fn held(&self) -> ChunkSet {
        if self.postcopy.load(Ordering::Acquire) {
            self.post.lock().present.clone()
        } else {
            ChunkSet::full(self.layout.read().map_or(0, |l| l.chunks()))
        }
    }

    fn missing(&self) -> u64 {
        if self.postcopy.load(Ordering::Acquire) {
            self.missing.load(Ordering::Acquire)
        } else {
            0
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

#[async_trait]
impl Store for StoreTarget {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.ensure(offset, buf.len() as u64).await?;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        // A partial write of a missing chunk must land on its real bytes; a whole-chunk write
        // could skip the fetch, but one rule keeps the ordering against placement simple.
        self.ensure(offset, data.len() as u64).await?;
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.ensure(offset, len).await?;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.ensure(offset, len).await?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.ensure(offset, len).await?;
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_local::MemStore;

    /// After the switch-over a reader of a missing chunk asks for it and waits; a copy that
    /// arrives after the application wrote the chunk is dropped, never written over it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_copy_never_overwrites_what_the_application_wrote() {
        let inner: DynStore = Arc::new(MemStore::new(4 * 4096));
        let t = StoreTarget::new(inner.clone());
        t.prepare(Layout::new(4 * 4096, 4096).unwrap()).unwrap();
        let faults = Faults::new();
        let (w, mut requests) = tokio::io::duplex(4096);
        faults
            .attach(Box::new(w), &ChunkSet::new(4), |e| panic!("lost: {e}"))
            .await;
        let mut missing = ChunkSet::new(4);
        missing.insert(1);
        missing.insert(3);
        t.begin_postcopy(&missing, faults);
        assert_eq!(Target::missing(&*t), 2);
        // Present chunks are read at once; a write to a missing one waits for its chunk.
        let mut b = [0u8; 8];
        t.read(0, &mut b).await.unwrap();
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.write(4096 + 100, Bytes::from_static(b"app")).await });
        let no = AtomicU64::new(0);
        let m = crate::net::read_frame(&mut requests, &no).await.unwrap();
        assert!(matches!(m, Some(Msg::Request { index: 1 })), "{m:?}");
        assert!(!w.is_finished());
        assert!(
            t.place(1, Some(Bytes::from(vec![1u8; 4096])))
                .await
                .unwrap()
        );
        w.await.unwrap().unwrap();
        // The bulk stream's copy of chunk 1 arrives late: dropped.
        assert!(
            !t.place(1, Some(Bytes::from(vec![9u8; 4096])))
                .await
                .unwrap()
        );
        let mut c = vec![0u8; 4096];
        inner.read(4096, &mut c).await.unwrap();
        assert_eq!(&c[100..103], b"app");
        assert!(c[..100].iter().all(|&x| x == 1));
        // Zeros count as a copy too; then nothing is missing.
        assert!(t.place(3, None).await.unwrap());
        assert_eq!(Target::missing(&*t), 0);
        assert_eq!(t.held().count(), 4);
        // Out of range and wrong lengths are errors, not writes.
        assert!(t.place(4, None).await.is_err());
        t.begin_postcopy(&ChunkSet::full(4), Faults::new());
        assert!(
            t.place(0, Some(Bytes::from_static(b"short")))
                .await
                .is_err()
        );
    }
}
