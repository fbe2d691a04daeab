//! Migrating a memsync region inside a process that embeds the library (the kind (a)).
//!
//! - Source: [`RegionSource`] reads the region's memory as a (read-only) store and reports the
//!   chunks written since the last pass from the engine's [`DirtyTracker`] (`WP_ASYNC` +
//!   `PAGEMAP_SCAN`; the region needs [`WriteTracking::Dirty`]). [`migrate_region`] runs
//!   [`migrate`](crate::migrate) over it.
//! - Destination: [`RegionTarget`] owns a [`LazyRegion`] whose [`ChunkSource`] is the migration
//!   itself. Pre-copy passes install chunks with [`LazyRegion::place`] (or overwrite present
//!   ones); at a post-copy switch-over the missing chunks are dropped, and a fault on one of
//!   them reaches [`ChunkSource::read`], which asks for the chunk on the urgent connection and
//!   waits for it. A chunk that arrives while a fault is fetching it is handed to that fetch
//!   (the engine's claim makes `place` refuse it), so exactly one copy is installed.
//!
//! [`DirtyTracker`]: memsync_region::DirtyTracker
//! [`WriteTracking::Dirty`]: memsync_region::WriteTracking::Dirty

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use memsync_core::{Bytes, Caps, DynStore, Result, Store, StoreError, async_trait};
use memsync_region::{ChunkSource, ChunkState, LazyRegion, RegionConfig, SourceFuture};
use memsync_sync::digest::Layout;
use memsync_sync::{ChangeSource, Progress};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::hooks::Hooks;
use crate::net::{Dialer, Listener};
use crate::set::ChunkSet;
use crate::source::{MigrateError, Report, SourceConfig, migrate};
use crate::target::{Faults, Target};
use crate::{DestConfig, DestReport, receive};

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    StoreError::io("region", e).context(what.to_owned())
}

/// The source side of a region: its memory as a read-only [`Store`] and its dirty tracker as a
/// [`ChangeSource`].
pub struct RegionSource {
    region: Arc<LazyRegion>,
}

impl fmt::Debug for RegionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionSource({} bytes)", self.region.len())
    }
}

impl RegionSource {
    /// The region must track writes ([`WriteTracking::Dirty`](memsync_region::WriteTracking::Dirty)):
    /// its chunk size is the grain of the dirty sets, so small chunks (4–64 KiB) resend less.
    pub fn new(region: Arc<LazyRegion>) -> Result<Arc<Self>> {
        region
            .dirty_tracker()
            .map_err(|e| io_err("migrating a region", e))?;
        Ok(Arc::new(RegionSource { region }))
    }

    pub fn region(&self) -> &Arc<LazyRegion> {
        &self.region
    }
}

#[async_trait]
impl Store for RegionSource {
    fn size(&self) -> u64 {
        self.region.len() as u64
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.read_only = true;
        c.preferred_io = self.region.geometry().chunk_size() as u64;
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (off, len) = (offset as usize, buf.len());
        if off.checked_add(len).is_none_or(|e| e > self.region.len()) {
            return Err(StoreError::backend(format!(
                "read {off}+{len} past the region's {} bytes",
                self.region.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let g = self.region.geometry();
        let present = g
            .chunks_in(off, len)
            .all(|i| self.region.chunk_state(i) == ChunkState::Present);
        if present {
            // A memcpy: no fault, no fetch.
            return self
                .region
                .read_at(off, buf)
                .map_err(|e| StoreError::backend(e.to_string()));
        }
        // A chunk the region has not fetched yet: the read faults and waits for the region's
        // own store, off the async workers.
        let region = self.region.clone();
        let v = tokio::task::spawn_blocking(move || {
            let mut v = vec![0u8; len];
            region.read_at(off, &mut v).map(|()| v)
        })
        .await
        .map_err(|e| StoreError::backend(format!("reading the region: {e}")))?
        .map_err(|e| StoreError::backend(e.to_string()))?;
        buf.copy_from_slice(&v);
        Ok(())
    }

    async fn write(&self, _offset: u64, _data: Bytes) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl ChangeSource for RegionSource {
    async fn take_changes(&self) -> Result<Vec<Range<u64>>> {
        let r = self
            .region
            .dirty_chunks()
            .map_err(|e| io_err("reading the dirty chunks", e))?;
        Ok(r.into_iter()
            .map(|r| r.start as u64..r.end as u64)
            .collect())
    }
}

/// Migrate `region` (built with [`WriteTracking::Dirty`](memsync_region::WriteTracking::Dirty))
/// to the destination `dialer` reaches; `hooks` stop and restart the threads that write it (see
/// [`Gate`](crate::Gate)). The region is only read: whatever fails, it keeps every chunk.
pub async fn migrate_region(
    region: Arc<LazyRegion>,
    dialer: &Dialer,
    hooks: &dyn Hooks,
    cfg: &SourceConfig,
    progress: &dyn Progress,
) -> std::result::Result<Report, MigrateError> {
    let src = RegionSource::new(region).map_err(MigrateError::Aborted)?;
    let store: DynStore = src.clone();
    migrate(store, src, dialer, hooks, cfg, progress).await
}

/// Receive a region migration into `target`; on a failure the target's pending faults fail too
/// ([`RegionTarget::fail`]) instead of waiting for a source that will not come back.
pub async fn receive_region(
    listener: Arc<Listener>,
    target: Arc<RegionTarget>,
    hooks: &dyn Hooks,
    cfg: &DestConfig,
) -> Result<DestReport> {
    let t: Arc<dyn Target> = target.clone();
    receive(listener, t, hooks, cfg)
        .await
        .inspect_err(|e| target.fail(&e.chain()))
}

/// What a fault waiting for a chunk gets: its bytes, or `None` for zeros.
type Arrival = Option<Bytes>;

#[derive(Default)]
struct St {
    layout: Option<Layout>,
    postcopy: bool,
    faults: Option<Faults>,
    /// After a post-copy switch-over: chunks the source has not delivered yet.
    missing: ChunkSet,
    /// Absent chunks known to be zeros: a fault on one is served here, without a request.
    zero: ChunkSet,
    /// Faults fetching a chunk, waiting for it.
    waiters: HashMap<u64, oneshot::Sender<Arrival>>,
    /// Chunks that arrived while a fault was claiming them, for that fault.
    stash: HashMap<u64, Arrival>,
    dead: Option<String>,
}

struct Shared {
    size: u64,
    st: Mutex<St>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "migration source of {} bytes", self.size)
    }
}

/// The region's [`ChunkSource`]: the migration. A fault asks the source on the urgent
/// connection (after a post-copy switch-over) and waits until the chunk arrives, across cuts.
#[derive(Debug)]
struct Incoming(Arc<Shared>);

impl ChunkSource for Incoming {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            let (rx, faults, i) = {
                let mut st = self.0.st.lock();
                if let Some(why) = &st.dead {
                    return Err(StoreError::backend(format!(
                        "the migration failed, this chunk never arrived: {why}"
                    )));
                }
                let l = st
                    .layout
                    .ok_or_else(|| StoreError::backend("a fault before the migration began"))?;
                let i = offset / l.chunk_size;
                let got = match st.stash.remove(&i) {
                    Some(a) => Some(a),
                    None if st.zero.remove(i) => Some(None),
                    None => None,
                };
                if let Some(a) = got {
                    drop(st);
                    fill(buf, a.as_deref());
                    return Ok(());
                }
                let (tx, rx) = oneshot::channel();
                st.waiters.insert(i, tx);
                // Before the switch-over (an application touching the region too early) the
                // passes bring every chunk anyway.
                (rx, st.postcopy.then(|| st.faults.clone()).flatten(), i)
            };
            let t = Instant::now();
            if let Some(f) = &faults {
                f.request(i).await;
            }
            let a = rx.await.map_err(|_| {
                StoreError::backend(format!("the migration ended before chunk {i} arrived"))
            })?;
            if let Some(f) = &faults {
                f.record(t.elapsed());
            }
            fill(buf, a.as_deref());
            Ok(())
        })
    }
}

fn fill(buf: &mut [u8], data: Option<&[u8]>) {
    match data {
        Some(d) => buf.copy_from_slice(&d[..buf.len()]),
        None => buf.fill(0),
    }
}

/// A [`Target`] that is a live region: the destination's application uses
/// [`region`](Self::region) once the resume hook ran. Its chunk size must be the migration's
/// ([`SourceConfig::chunk_size`]).
pub struct RegionTarget {
    sh: Arc<Shared>,
    region: Arc<LazyRegion>,
    /// Serialises the placements of one chunk (the bulk and urgent connections may both bring
    /// it), so a chunk is delivered once.
    stripes: Vec<Mutex<()>>,
}

impl fmt::Debug for RegionTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionTarget({} bytes)", self.sh.size)
    }
}

const STRIPES: usize = 256;

impl RegionTarget {
    /// A region of `size` bytes to receive into. `cfg.prefetch` is turned off (the region's
    /// own puller would request every chunk); `cfg.fetch_deadline` is how long a fault waits
    /// for its chunk before it raises `SIGBUS`, so it must exceed
    /// [`DestConfig::recovery_timeout`] for faults to survive a cut.
    pub fn new(size: u64, mut cfg: RegionConfig) -> Result<Arc<Self>> {
        cfg.prefetch = false;
        cfg.zero_detect = false;
        let sh = Arc::new(Shared {
            size,
            st: Mutex::new(St::default()),
        });
        let region = LazyRegion::with_source(Arc::new(Incoming(sh.clone())), Arc::new(()), cfg)
            .map_err(|e| StoreError::backend(format!("creating the destination region: {e}")))?;
        Ok(Arc::new(RegionTarget {
            sh,
            region: Arc::new(region),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }))
    }

    /// The region (use it only after the resume hook: before, it holds a mix of passes).
    pub fn region(&self) -> &Arc<LazyRegion> {
        &self.region
    }

    /// The migration failed for good: faults waiting for a chunk, and later ones on missing
    /// chunks, fail (the region raises `SIGBUS` for them once its fetch deadline passes).
    pub fn fail(&self, why: &str) {
        let mut st = self.sh.st.lock();
        st.dead = Some(why.to_owned());
        st.waiters.clear();
    }

    fn layout(&self) -> Result<Layout> {
        self.sh
            .st
            .lock()
            .layout
            .ok_or_else(|| StoreError::backend("migration target used before its geometry"))
    }

    /// Overwrite present chunk `i` (a later pass); the application does not run yet.
    fn overwrite(&self, l: Layout, i: u64, data: Option<&[u8]>) -> Result<()> {
        let (off, len) = l.chunk(i);
        let r = match data {
            Some(d) => self.region.write_at(off as usize, d),
            None => self.region.write_at(off as usize, &vec![0u8; len as usize]),
        };
        r.map_err(|e| StoreError::backend(e.to_string()))
    }

    /// Drop the pages of the present chunks among `chunks` (ascending): one `invalidate` (one
    /// `madvise` and its REMOVE event) per run of neighbouring present chunks. Each such call
    /// waits for a handler thread to read its event (~15 µs in a debug build, 50-80 µs on a
    /// busy 2-vCPU VM), and a hybrid switch-over drops thousands of scattered chunks in the
    /// downtime; so many runs are dropped from several threads at once, whose events a handler
    /// reads in one batch.
    fn drop_present(&self, chunks: impl Iterator<Item = u64>) {
        /// Below this many runs the threads cost more than they save.
        const PARALLEL_RUNS: usize = 32;
        const THREADS: usize = 8;
        let mut runs: Vec<Range<u64>> = Vec::new();
        for i in chunks {
            if self.region.chunk_state(i as usize) != ChunkState::Present {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        let cs = self.region.geometry().chunk_size();
        let drop_run = |r: &Range<u64>| {
            let off = r.start as usize * cs;
            let len = (r.end as usize * cs).min(self.region.len()) - off;
            if let Err(e) = self.region.invalidate(off, len) {
                tracing::error!("migrate: dropping the stale copy of chunks {r:?}: {e}");
            }
        };
        if runs.len() < PARALLEL_RUNS {
            runs.iter().for_each(drop_run);
            return;
        }
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    while let Some(r) = runs.get(next.fetch_add(1, Relaxed)) {
                        drop_run(r);
                    }
                });
            }
        });
    }

    fn place_before(&self, l: Layout, i: u64, data: Option<Bytes>) -> Result<()> {
        loop {
            {
                let mut st = self.sh.st.lock();
                if let Some(w) = st.waiters.remove(&i) {
                    st.zero.remove(i);
                    let _ = w.send(data);
                    return Ok(());
                }
            }
            match self.region.chunk_state(i as usize) {
                ChunkState::Present => return self.overwrite(l, i, data.as_deref()),
                ChunkState::Absent => match &data {
                    // Stays absent: a fault on it later is served zeros without a request.
                    None => {
                        self.sh.st.lock().zero.insert(i);
                        return Ok(());
                    }
                    Some(d) => {
                        self.sh.st.lock().zero.remove(i);
                        if self
                            .region
                            .place(i as usize, d)
                            .map_err(|e| io_err(&format!("installing chunk {i}"), e))?
                        {
                            return Ok(());
                        }
                    }
                },
                ChunkState::Poisoned => {
                    return Err(StoreError::backend(format!("chunk {i} is poisoned")));
                }
                // Claimed by a fault (whose waiter is about to appear) or being dropped.
                _ => std::thread::yield_now(),
            }
        }
    }

    fn place_after(&self, i: u64, data: Option<Bytes>) -> Result<bool> {
        let _g = self.stripes[i as usize % STRIPES].lock();
        {
            let mut st = self.sh.st.lock();
            // A waiting fault takes it even if it was delivered before (its install failed and
            // it asked again).
            if let Some(w) = st.waiters.remove(&i) {
                st.missing.remove(i);
                let _ = w.send(data);
                return Ok(true);
            }
            if !st.missing.remove(i) {
                return Ok(false);
            }
            match &data {
                None => {
                    st.zero.insert(i);
                    return Ok(true);
                }
                // For a fault that claims the chunk before `place` below can.
                Some(_) => {
                    st.stash.insert(i, data.clone());
                }
            }
        }
        let d = data.unwrap_or_default();
        let placed = self
            .region
            .place(i as usize, &d)
            .map_err(|e| io_err(&format!("installing chunk {i}"), e))?;
        if placed {
            self.sh.st.lock().stash.remove(&i);
        }
        Ok(true)
    }
}

#[async_trait]
impl Target for RegionTarget {
    fn size(&self) -> u64 {
        self.sh.size
    }

    fn prepare(&self, layout: Layout) -> Result<()> {
        if layout.size != self.sh.size {
            return Err(StoreError::Config(format!(
                "the destination region has {} bytes, the source {}: migration needs equal sizes",
                self.sh.size, layout.size
            )));
        }
        let cs = self.region.geometry().chunk_size() as u64;
        if layout.chunk_size != cs {
            return Err(StoreError::Config(format!(
                "the destination region has {cs}-byte chunks, the migration {}: they must be equal",
                layout.chunk_size
            )));
        }
        let mut st = self.sh.st.lock();
        st.layout = Some(layout);
        st.zero = ChunkSet::new(layout.chunks());
        st.missing = ChunkSet::new(layout.chunks());
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
        let len = l.chunk(index).1;
        if let Some(d) = &data
            && d.len() as u64 != len
        {
            return Err(StoreError::backend(format!(
                "chunk {index} has {} bytes, expected {len}",
                d.len()
            )));
        }
        if self.sh.st.lock().postcopy {
            self.place_after(index, data)
        } else {
            self.place_before(l, index, data).map(|()| true)
        }
    }

    fn evict(&self, stale: &ChunkSet) {
        self.drop_present(stale.iter());
    }

    fn begin_postcopy(&self, missing: &ChunkSet, faults: Faults) {
        // Runs while the application is suspended: set operations a word at a time, never a
        // step per chunk (a 1 GiB region of 4 KiB chunks has 262144).
        let present = {
            let mut st = self.sh.st.lock();
            st.missing = missing.clone();
            st.zero.subtract(missing);
            if !st.stash.is_empty() {
                st.stash.retain(|&i, _| !missing.contains(i));
            }
            // Faults that came too early ask now.
            faults.request_later(
                st.waiters
                    .keys()
                    .copied()
                    .filter(|&i| missing.contains(i))
                    .collect(),
            );
            st.faults = Some(faults);
            st.postcopy = true;
            let mut p = missing.clone();
            p.intersect_words(self.region.present_chunks().words());
            p
        };
        // An older pass's copy must not be read: drop it, so that a touch faults and asks.
        self.drop_present(present.iter());
    }

    fn held(&self) -> ChunkSet {
        let st = self.sh.st.lock();
        if st.postcopy {
            st.missing.complement()
        } else {
            ChunkSet::full(st.layout.map_or(0, |l| l.chunks()))
        }
    }

    fn missing(&self) -> u64 {
        let st = self.sh.st.lock();
        if st.postcopy { st.missing.count() } else { 0 }
    }

    /// Waits until every chunk handed to a fault is installed (or known zero).
    async fn flush(&self) -> Result<()> {
        let chunks = self.layout()?.chunks() as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let zero = self.sh.st.lock().zero.count() as usize;
            if self.region.present_count() + zero >= chunks {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StoreError::backend(format!(
                    "{} chunks arrived but were not installed within 30 s",
                    chunks - self.region.present_count() - zero
                )));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}
