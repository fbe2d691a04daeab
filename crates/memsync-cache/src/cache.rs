//! The cache layer: a remote store, a local copy, and the chunk state machine between them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use memsync_core::chunks::{
    CacheState, CacheTable, PullLease, PullPriority, PullProgress, PullView, Transition,
    current_pull,
};
use memsync_core::{
    Caps, DynStore, Result, Retry, RetryPolicy, SharedMemory, Store, StoreError, async_trait,
    check_range, check_write,
};
use memsync_local::{FileOptions, FileStore};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::map::{DirIdentity, IntentFile, MAP_DIRTY, MAP_PRESENT, MapFile, open_dir};
use crate::stats::{CacheStats, CacheStatsSnapshot};
use crate::window::{Window, WindowLimits};

// Write-intent states of a region (see `Inner::ensure_intent`).
/// Not recorded in the intent file.
const I_NONE: u8 = 0;
/// A writer waits for it to be recorded.
const I_WANT: u8 = 1;
/// Durable in the intent file.
const I_SET: u8 = 2;
/// A checkpoint is deciding whether to clear it (writers take the slow path meanwhile).
const I_CLEARING: u8 = 3;

const SHARDS: usize = 64;
const NO_CHUNK: u64 = u64::MAX;

use CacheState::{Clean, Dirty, Fetching, Missing, WritingBack};

pub(crate) struct Inner {
    remote: DynStore,
    demand: DynStore,
    local: DynStore,
    cfg: CacheConfig,
    dir: PathBuf,
    size: u64,
    cs: u64,
    chunks: u64,
    /// Every change of a chunk's state is one of [`CacheState`]'s transitions.
    state: CacheTable,
    /// Demand misses retry under this policy, within the deadline of an enclosing layer
    /// that retries (a region mapping the cache) if there is one.
    retry: RetryPolicy,
    /// Write generation per chunk: incremented after each completed local write.
    wgen: Box<[AtomicU64]>,
    /// Highest write generation durable in the remote (pushed and remote-flushed).
    pushed: Box<[AtomicU64]>,
    shards: Box<[Notify]>,
    push_done: Notify,
    pull_wake: Notify,
    push_wake: Notify,
    map: Arc<MapFile>,
    /// Chunks per write-intent region.
    region_chunks: u64,
    /// Write-intent state per region (`I_*`).
    intent: Box<[AtomicU8]>,
    /// User writes in progress per region (between the intent check and marking DIRTY).
    writers: Box<[AtomicU32]>,
    /// User writes ever started per region: a checkpoint clears an intent only if none started
    /// since its snapshot (the local data of a later one may not be durable).
    wcount: Box<[AtomicU64]>,
    intent_file: Arc<IntentFile>,
    /// Serialises writes of the intent file; writers queue here for a group commit.
    intent_io: tokio::sync::Mutex<()>,
    /// The change count the last checkpoint saved.
    saved: tokio::sync::Mutex<u64>,
    changes: AtomicU64,
    demand_active: AtomicUsize,
    last_demand: AtomicU64,
    pull_paused: AtomicBool,
    /// The background pullers above (a region's) that read through this cache. While one of
    /// them is active it owns the pull order, and this cache's puller issues no requests; when
    /// they pause, finish or stop, this cache's puller takes over again.
    pulls_above: Mutex<Vec<Weak<PullLease>>>,
    push_window: Mutex<Window>,
    /// Transfer buffers handed back after use, so a fetch or push does not allocate and zero
    /// a fresh buffer each time (that was ~5% of the CPU of a sequential pull).
    bufs: Mutex<Vec<BytesMut>>,
    /// One write to the local copy at a time. The kernel serialises buffered writes to one
    /// file anyway (the inode lock), but a writer waiting for that lock spins while the holder
    /// runs: with several pulls landing at once, a profile showed 18% of all CPU time spinning
    /// there in a run where the copies into new page cache were slow. Waiting here sleeps.
    local_writes: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
    stats: CacheStats,
}

/// A claim on a run of chunks ([`CacheState::CLAIM`]). Dropping it unfinished abandons the
/// chunks ([`CacheState::ABANDON`]) and wakes their waiters, so a cancelled or failed fetch
/// never leaves a chunk stuck.
struct Claim {
    inner: Arc<Inner>,
    first: u64,
    n: u64,
    armed: bool,
}

impl Claim {
    /// Ends the claim with `t` ([`CacheState::FILL`] or [`CacheState::OVERWRITE`]).
    fn finish(mut self, t: &Transition<CacheState>) {
        self.armed = false;
        self.inner
            .state
            .apply_run(self.first as usize, self.n as usize, t);
        self.inner.changes.fetch_add(1, SeqCst);
        self.inner.notify_run(self.first, self.n);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.armed {
            self.inner
                .state
                .apply_run(self.first as usize, self.n as usize, &CacheState::ABANDON);
            self.inner.notify_run(self.first, self.n);
        }
    }
}

struct DemandGuard<'a>(&'a Inner);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.demand_active.fetch_sub(1, SeqCst);
        self.0.pull_wake.notify_one();
    }
}

/// A run written to the remote, not yet flushed there.
struct Pushed {
    first: u64,
    /// The write generation of each chunk captured for the push.
    gens: Vec<u64>,
    /// The remote's session before the write.
    session: u64,
}

/// Counts a user write as in progress in its regions until dropped.
struct WriterGuard<'a> {
    inner: &'a Inner,
    regions: std::ops::RangeInclusive<u64>,
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        for r in self.regions.clone() {
            self.inner.writers[r as usize].fetch_sub(1, SeqCst);
        }
    }
}

/// Spare transfer buffers kept (each at most one request long).
const SPARE_BUFS: usize = 32;

impl Inner {
    /// A buffer of `len` initialised bytes (whatever they hold: the caller overwrites them).
    /// Transfers mostly have one of a few lengths (a request, a demand run), so a spare of
    /// exactly that length is usually there; a longer one is cut down; otherwise a new
    /// zeroed buffer.
    fn take_buf(&self, len: usize) -> BytesMut {
        let mut v = self.bufs.lock();
        if let Some(i) = v.iter().position(|b| b.len() == len) {
            return v.swap_remove(i);
        }
        if let Some(i) = v.iter().position(|b| b.len() > len) {
            let mut b = v.swap_remove(i);
            b.truncate(len);
            return b;
        }
        drop(v);
        BytesMut::zeroed(len)
    }

    /// Hand a buffer back once nothing else holds it.
    fn give_buf(&self, data: Bytes) {
        let max = (self
            .cfg
            .chunks_per_request()
            .max(self.cfg.chunks_per_demand())
            * self.cs) as usize;
        if data.len() > max {
            return;
        }
        if let Ok(b) = data.try_into_mut() {
            let mut v = self.bufs.lock();
            if v.len() < SPARE_BUFS {
                v.push(b);
            }
        }
    }

    /// Write to the local copy (see `local_writes`).
    async fn write_local(&self, off: u64, data: Bytes) -> Result<()> {
        let _g = self.local_writes.lock().await;
        self.local.write(off, data).await
    }

    fn st(&self, c: u64) -> CacheState {
        self.state.get(c as usize)
    }

    fn notify_run(&self, first: u64, n: u64) {
        for c in first..first + n.min(SHARDS as u64) {
            self.shards[c as usize % SHARDS].notify_waiters();
        }
    }

    /// Claim up to `max` consecutive missing chunks from `c`.
    fn claim_run(&self, c: u64, max: u64) -> u64 {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.state.claim_run(c as usize, max) as u64
    }

    fn run_bytes(&self, first: u64, n: u64) -> (u64, u64) {
        let off = first * self.cs;
        let end = ((first + n) * self.cs).min(self.size);
        (off, end - off)
    }

    /// Wait until chunk `c` is no longer being fetched.
    async fn wait_chunk(&self, c: u64, retry: &Retry) -> Result<()> {
        let deadline = Instant::from_std(retry.deadline());
        let notified = self.shards[c as usize % SHARDS].notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.st(c) != Fetching {
            return Ok(());
        }
        self.stats.shared_waits.fetch_add(1, Relaxed);
        match tokio::time::timeout_at(deadline, notified).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.timeout_error(c, 1, None, retry)),
        }
    }

    /// The error of a miss whose deadline passed: which bytes, whose deadline, and the last
    /// failure.
    fn timeout_error(
        &self,
        first: u64,
        n: u64,
        cause: Option<StoreError>,
        retry: &Retry,
    ) -> StoreError {
        let (off, len) = self.run_bytes(first, n);
        let within = if retry.inherited() {
            "before the deadline of the layer above (the cache's own fetch timeout does not apply)"
                .to_string()
        } else {
            format!("within {} ms", self.cfg.fetch_timeout.as_millis())
        };
        let message = format!(
            "cache: bytes {off}..{} (chunks {first}..{}) could not be fetched from the remote {within} after {} attempts",
            off + len,
            first + n,
            retry.attempts()
        );
        StoreError::Backend {
            message,
            source: Some(Box::new(cause.unwrap_or(StoreError::Timeout {
                op: "remote read",
                after_ms: self.cfg.fetch_timeout.as_millis() as u64,
            }))),
        }
    }

    /// Remembers a background puller above that reads through this cache.
    fn register_pull_above(&self, lease: &Arc<PullLease>) {
        let mut above = self.pulls_above.lock();
        if !above
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(lease)))
        {
            above.retain(|w| w.strong_count() > 0);
            above.push(Arc::downgrade(lease));
        }
    }

    /// Whether a background puller above pulls now (then this cache's puller stands down).
    fn pull_above(&self) -> bool {
        self.pulls_above
            .lock()
            .iter()
            .any(|w| w.upgrade().is_some_and(|l| l.is_active()))
    }

    /// Fetch claimed chunks for a miss, retrying under `retry`. Fills the local copy.
    ///
    /// A miss of a background pull above ([`current_pull`]: a region's puller) is served
    /// as part of the pull: over the pull's remote, counted as pulled, not as a demand miss, and
    /// without holding back this cache's puller, which from then on leaves the order to the
    /// puller above while that one is active ([`Inner::pull_above`]): one background puller
    /// per stack, and never none.
    async fn demand_fetch(self: &Arc<Self>, claim: Claim, retry: &mut Retry) -> Result<Bytes> {
        let deadline = Instant::from_std(retry.deadline());
        let (first, n) = (claim.first, claim.n);
        let (off, len) = self.run_bytes(first, n);
        let pull = current_pull();
        let _g = if let Some(lease) = &pull {
            self.register_pull_above(lease);
            None
        } else {
            self.demand_active.fetch_add(1, SeqCst);
            self.stats.misses.fetch_add(1, Relaxed);
            Some(DemandGuard(self))
        };
        let pull = pull.is_some();
        let remote = if pull { &self.remote } else { &self.demand };
        let t0 = Instant::now();
        let mut last: Option<StoreError> = None;
        loop {
            if Instant::now() >= deadline {
                return Err(self.timeout_error(first, n, last, retry));
            }
            let mut buf = self.take_buf(len as usize);
            self.stats.remote_reads.fetch_add(1, Relaxed);
            match tokio::time::timeout_at(deadline, remote.read(off, &mut buf)).await {
                Ok(Ok(())) => {
                    let data = buf.freeze();
                    self.write_local(off, data.clone()).await.map_err(|e| {
                        e.context("cache: writing a fetched chunk to the local copy")
                    })?;
                    claim.finish(&CacheState::FILL);
                    if pull {
                        self.stats.pulled_bytes.fetch_add(len, Relaxed);
                    } else {
                        self.stats.demand_bytes.fetch_add(len, Relaxed);
                        self.stats.miss_latency.record(t0.elapsed());
                        self.last_demand.store(first + n, SeqCst);
                    }
                    return Ok(data);
                }
                Ok(Err(e)) => {
                    self.stats.fetch_errors.fetch_add(1, Relaxed);
                    let pause = retry.failed(&e);
                    if e.is_permanent() {
                        return Err(e.context("cache: remote read"));
                    }
                    tracing::debug!(
                        "cache: demand fetch of chunk {first} failed, retrying: {}",
                        e.chain()
                    );
                    last = Some(e);
                    match pause {
                        Some(p) => {
                            tokio::time::sleep_until((Instant::now() + p).min(deadline)).await
                        }
                        None => return Err(self.timeout_error(first, n, last, retry)),
                    }
                }
                Err(_) => {
                    self.stats.fetch_errors.fetch_add(1, Relaxed);
                    return Err(self.timeout_error(first, n, last, retry));
                }
            }
        }
    }

    async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_range(offset, buf.len() as u64, Some(buf)).await
    }

    /// Makes `offset..offset + len` local (fetching what is missing) and copies it into `buf`
    /// if given: without one, the bytes stay in the local copy only (for a region that maps
    /// it, [`Store::make_resident`]).
    async fn read_range(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        mut buf: Option<&mut [u8]>,
    ) -> Result<()> {
        check_range(self.size, 1, offset, len)?;
        let mut retry = self.retry.start();
        let end = offset + len;
        let cs = self.cs;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            match self.st(c) {
                Clean | Dirty | WritingBack => {
                    let mut c2 = c + 1;
                    while c2 * cs < end && self.st(c2).is_local() {
                        c2 += 1;
                    }
                    let run_end = (c2 * cs).min(end);
                    if let Some(buf) = buf.as_deref_mut() {
                        self.local
                            .read(
                                pos,
                                &mut buf[(pos - offset) as usize..(run_end - offset) as usize],
                            )
                            .await
                            .map_err(|e| e.context("cache: reading the local copy"))?;
                    }
                    self.stats.hits.fetch_add(1, Relaxed);
                    self.stats.hit_bytes.fetch_add(run_end - pos, Relaxed);
                    pos = run_end;
                }
                Missing => {
                    let last = (end - 1) / cs;
                    let max = self.cfg.chunks_per_demand().min(last - c + 1);
                    let n = self.claim_run(c, max);
                    if n == 0 {
                        continue;
                    }
                    let claim = Claim {
                        inner: self.clone(),
                        first: c,
                        n,
                        armed: true,
                    };
                    let data = self.demand_fetch(claim, &mut retry).await?;
                    let run_start = c * cs;
                    let run_end = (run_start + data.len() as u64).min(end);
                    if let Some(buf) = buf.as_deref_mut() {
                        buf[(pos - offset) as usize..(run_end - offset) as usize].copy_from_slice(
                            &data[(pos - run_start) as usize..(run_end - run_start) as usize],
                        );
                    }
                    self.give_buf(data);
                    pos = run_end;
                }
                Fetching => self.wait_chunk(c, &retry).await?,
            }
        }
        Ok(())
    }

    async fn write(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut retry = self.retry.start();
        let end = offset + data.len() as u64;
        let cs = self.cs;
        let first = offset / cs;
        let last = (end - 1) / cs;
        let mut claims = Vec::new();
        let mut c = first;
        // Make every chunk of the range present (fetching partially written ones) or claimed
        // (wholly overwritten ones need no fetch). Ascending order: no waiting cycles.
        while c <= last {
            match self.st(c) {
                Clean | Dirty | WritingBack => {
                    self.stats.hits.fetch_add(1, Relaxed);
                    c += 1;
                }
                Missing => {
                    let whole = |k: u64| k * cs >= offset && ((k + 1) * cs).min(self.size) <= end;
                    if whole(c) {
                        let mut max = 1;
                        while c + max <= last && whole(c + max) {
                            max += 1;
                        }
                        let n = self.claim_run(c, max);
                        if n == 0 {
                            continue;
                        }
                        claims.push(Claim {
                            inner: self.clone(),
                            first: c,
                            n,
                            armed: true,
                        });
                        c += n;
                    } else {
                        if self.claim_run(c, 1) == 0 {
                            continue;
                        }
                        let claim = Claim {
                            inner: self.clone(),
                            first: c,
                            n: 1,
                            armed: true,
                        };
                        let data = self.demand_fetch(claim, &mut retry).await?;
                        self.give_buf(data);
                        c += 1;
                    }
                }
                Fetching => self.wait_chunk(c, &retry).await?,
            }
        }
        // Before the local copy changes, its regions are recorded as possibly differing from
        // the remote (the map may still call these chunks clean; see `crate::map`).
        let regions = first / self.region_chunks..=last / self.region_chunks;
        // `writers` before `wcount`: a checkpoint reads them in the other order (see there).
        for r in regions.clone() {
            self.writers[r as usize].fetch_add(1, SeqCst);
            self.wcount[r as usize].fetch_add(1, SeqCst);
        }
        let _writing = WriterGuard {
            inner: self,
            regions: regions.clone(),
        };
        self.ensure_intent(regions).await?;
        self.write_local(offset, data)
            .await
            .map_err(|e| e.context("cache: writing the local copy"))?;
        // Order matters (see `push_one`): data written, then the generation, then Dirty.
        for k in first..=last {
            self.wgen[k as usize].fetch_add(1, SeqCst);
        }
        for claim in claims {
            claim.finish(&CacheState::OVERWRITE);
        }
        for k in first..=last {
            let _ = self.state.apply(k as usize, &CacheState::WRITE);
        }
        self.changes.fetch_add(1, SeqCst);
        Ok(())
    }

    /// Make sure the intent of every region in `regions` is durable. Fast when it is (one
    /// atomic load per region). Otherwise the regions are marked wanted and the writer queues
    /// for the intent file: whoever holds it writes every region wanted at that moment with one
    /// `fdatasync`, so writers arriving during a sync are served together by the next one.
    /// The caller has counted itself in `writers` for these regions before calling.
    async fn ensure_intent(&self, regions: std::ops::RangeInclusive<u64>) -> Result<()> {
        if regions
            .clone()
            .all(|r| self.intent[r as usize].load(SeqCst) == I_SET)
        {
            return Ok(());
        }
        for r in regions.clone() {
            let _ = self.intent[r as usize].compare_exchange(I_NONE, I_WANT, SeqCst, SeqCst);
        }
        let _io = self.intent_io.lock().await;
        let mut need = false;
        for r in regions {
            let i = &self.intent[r as usize];
            // CLEARING is only seen while a checkpoint holds `intent_io`, not here.
            if i.load(SeqCst) != I_SET {
                let _ = i.compare_exchange(I_NONE, I_WANT, SeqCst, SeqCst);
                need = true;
            }
        }
        if !need {
            return Ok(());
        }
        let mut wanted = Vec::new();
        let image: Vec<u8> = self
            .intent
            .iter()
            .enumerate()
            .map(|(r, i)| match i.load(SeqCst) {
                I_SET => 1,
                I_WANT => {
                    wanted.push(r);
                    1
                }
                _ => 0,
            })
            .collect();
        let file = self.intent_file.clone();
        tokio::task::spawn_blocking(move || file.store(&image, true))
            .await
            .map_err(|e| StoreError::backend(format!("cache: intent task: {e}")))?
            .map_err(|e| e.context("cache: recording a write intent"))?;
        for r in wanted {
            let _ = self.intent[r].compare_exchange(I_WANT, I_SET, SeqCst, SeqCst);
        }
        self.stats.intent_syncs.fetch_add(1, Relaxed);
        Ok(())
    }

    fn region_clean(&self, r: usize) -> bool {
        let first = r as u64 * self.region_chunks;
        let end = (first + self.region_chunks).min(self.chunks);
        (first..end).all(|c| !self.st(c).is_dirty())
    }

    /// After a checkpoint made the map and the local data durable: clear the intent of regions
    /// that were clean with no write in progress at its snapshot (`cands`: region and its write
    /// count then) and still are, with no write started since. A writer that counted itself in
    /// `writers` before the CLEARING store is seen here; one that counts itself after sees
    /// CLEARING (or NONE) and waits for the intent file (which this holds).
    async fn clear_intents(&self, cands: Vec<(usize, u64)>) -> Result<()> {
        if cands.is_empty() {
            return Ok(());
        }
        let _io = self.intent_io.lock().await;
        let mut cleared = false;
        for (r, wc) in cands {
            let i = &self.intent[r];
            if i.compare_exchange(I_SET, I_CLEARING, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            let quiet = self.writers[r].load(SeqCst) == 0
                && self.wcount[r].load(SeqCst) == wc
                && self.region_clean(r);
            i.store(if quiet { I_NONE } else { I_SET }, SeqCst);
            cleared |= quiet;
        }
        if cleared {
            let image: Vec<u8> = self
                .intent
                .iter()
                .map(|i| u8::from(matches!(i.load(SeqCst), I_SET | I_WANT)))
                .collect();
            let file = self.intent_file.clone();
            tokio::task::spawn_blocking(move || file.store(&image, false))
                .await
                .map_err(|e| StoreError::backend(format!("cache: intent task: {e}")))??;
        }
        Ok(())
    }

    fn caps(&self) -> Caps {
        let mut caps = Caps::basic();
        caps.read_only = self.remote.caps().read_only;
        caps.flush = true;
        caps.trim = !caps.read_only;
        caps.preferred_io = self.cs.max(64 * 1024);
        caps.max_io = 32 << 20;
        caps
    }

    /// Runs of consecutive dirty chunks in `set` (not being written back), at most `unit` chunks
    /// each.
    fn dirty_runs(&self, set: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
        let unit = self.cfg.chunks_per_request();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in set {
            if self.st(c) != Dirty {
                continue;
            }
            match runs.last_mut() {
                Some((f, n)) if *f + *n == c && *n < unit => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        runs
    }

    /// Write back one run: [`CacheState::PUSH`], capture the generations, read the local data,
    /// write it to the remote. The generations are captured after the push claim and before the
    /// data is read; a writer bumps the generation before [`CacheState::WRITE`], so every write
    /// with a generation at most the captured one is in the data sent.
    async fn push_one(self: Arc<Self>, first: u64, n: u64) -> (Result<Option<Pushed>>, Duration) {
        let t0 = Instant::now();
        let mut k = 0;
        while k < n
            && self
                .state
                .apply((first + k) as usize, &CacheState::PUSH)
                .is_ok()
        {
            k += 1;
        }
        if k == 0 {
            return (Ok(None), t0.elapsed());
        }
        let gens: Vec<u64> = (first..first + k)
            .map(|c| self.wgen[c as usize].load(SeqCst))
            .collect();
        let (off, len) = self.run_bytes(first, k);
        // Taken before the write: at most the session that acknowledges it (see `push_round`).
        let session = self.remote.session();
        let res = async {
            let mut buf = self.take_buf(len as usize);
            self.local
                .read(off, &mut buf)
                .await
                .map_err(|e| e.context("cache: reading the local copy to push it"))?;
            self.stats.remote_writes.fetch_add(1, Relaxed);
            let limit = self.cfg.fetch_timeout.max(Duration::from_secs(5)) * 3;
            let data = buf.freeze();
            let r = tokio::time::timeout(limit, self.remote.write(off, data.clone())).await;
            self.give_buf(data);
            match r {
                Ok(r) => {
                    r.map_err(|e| e.context(format!("cache: pushing bytes {off}..{}", off + len)))
                }
                Err(_) => Err(StoreError::Timeout {
                    op: "remote write",
                    after_ms: limit.as_millis() as u64,
                }),
            }
        }
        .await;
        match res {
            Ok(()) => {
                self.stats.pushed_bytes.fetch_add(len, Relaxed);
                (
                    Ok(Some(Pushed {
                        first,
                        gens,
                        session,
                    })),
                    t0.elapsed(),
                )
            }
            Err(e) => {
                self.stats.push_errors.fetch_add(1, Relaxed);
                self.unpush(first, k);
                (Err(e), t0.elapsed())
            }
        }
    }

    fn unpush(&self, first: u64, n: u64) {
        for c in first..first + n {
            let _ = self.state.apply(c as usize, &CacheState::UNPUSH);
        }
    }

    /// Push runs with a pipelined window, then flush the remote, then mark them durable.
    async fn push_round(self: &Arc<Self>, runs: Vec<(u64, u64)>) -> Result<u64> {
        let mut set = JoinSet::new();
        let mut done: Vec<Pushed> = Vec::new();
        let mut first_err: Option<StoreError> = None;
        let mut it = runs.into_iter().peekable();
        // The window counts requests; the bytes in flight are bounded as if every request were
        // a full one, so that small scattered runs (random 4 KiB writes) can have many more
        // requests in flight over a long link.
        let byte_cap = self.cfg.window.max as u64 * self.cfg.chunks_per_request() * self.cs;
        let mut in_flight = 0u64;
        let mut sizes: std::collections::HashMap<tokio::task::Id, u64> =
            std::collections::HashMap::new();
        loop {
            let w = self.push_window.lock().get();
            self.stats.push_window.store(w as u64, Relaxed);
            while set.len() < w {
                match it.peek() {
                    Some(&(f, n)) if set.is_empty() || in_flight + n * self.cs <= byte_cap => {
                        it.next();
                        let h = set.spawn(self.clone().push_one(f, n));
                        sizes.insert(h.id(), n * self.cs);
                        in_flight += n * self.cs;
                    }
                    _ => break,
                }
            }
            let next = set.join_next_with_id().await.map(|r| match r {
                Ok((id, v)) => {
                    in_flight -= sizes.remove(&id).unwrap_or(0);
                    Ok(v)
                }
                Err(e) => {
                    in_flight -= sizes.remove(&e.id()).unwrap_or(0);
                    Err(e)
                }
            });
            match next {
                None => break,
                Some(Ok((res, lat))) => match res {
                    Ok(Some(x)) => {
                        self.push_window.lock().on_success(lat);
                        done.push(x);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.push_window.lock().on_error();
                        first_err.get_or_insert(e);
                    }
                },
                Some(Err(e)) => {
                    first_err.get_or_insert(StoreError::backend(format!(
                        "cache: push task failed: {e}"
                    )));
                }
            }
        }
        let count = done.iter().map(|p| p.gens.len() as u64).sum();
        if !done.is_empty() {
            self.stats.remote_flushes.fetch_add(1, Relaxed);
            let limit = self.cfg.fetch_timeout.max(Duration::from_secs(5)) * 3;
            let r = match tokio::time::timeout(limit, self.remote.flush()).await {
                Ok(r) => r.map_err(|e| e.context("cache: flushing the remote")),
                Err(_) => Err(StoreError::Timeout {
                    op: "remote flush",
                    after_ms: limit.as_millis() as u64,
                }),
            };
            // Taken after the flush: at least the session that flushed. A write acknowledged
            // in an older session (a connection lost before the flush) is not covered by it
            // unless the remote is multi-conn: it stays dirty and is pushed again.
            let flushed_in = self.remote.session();
            let multi_conn = self.remote.caps().multi_conn;
            match r {
                Ok(()) => {
                    let mut stale = 0;
                    for p in &done {
                        if !multi_conn && p.session != flushed_in {
                            self.unpush(p.first, p.gens.len() as u64);
                            stale += p.gens.len();
                            continue;
                        }
                        for (i, g) in p.gens.iter().enumerate() {
                            let c = (p.first as usize) + i;
                            self.pushed[c].fetch_max(*g, SeqCst);
                            let _ = self.state.apply(c, &CacheState::PUSHED);
                        }
                    }
                    self.changes.fetch_add(1, SeqCst);
                    if stale > 0 {
                        self.stats.repushes.fetch_add(stale as u64, Relaxed);
                        first_err.get_or_insert(StoreError::backend(format!(
                            "cache: {stale} chunks were acknowledged on a remote connection that was lost before a flush; pushing them again"
                        )));
                    }
                }
                Err(e) => {
                    for p in &done {
                        self.unpush(p.first, p.gens.len() as u64);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        self.push_done.notify_waiters();
        match first_err {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Save the chunk map: snapshot, make the local data durable, then write the map.
    async fn checkpoint(self: &Arc<Self>) -> Result<()> {
        let mut saved = self.saved.lock().await;
        let ch = self.changes.load(SeqCst);
        if ch == *saved {
            return Ok(());
        }
        // Regions whose intent may be cleared once this checkpoint is durable: no write in
        // progress, and their write count taken before the snapshot (a writer counts itself in
        // `writers` and then in `wcount`: one missed by the `writers` load here changes the
        // count after it was taken, and `clear_intents` sees that).
        let cands: Vec<(usize, u64)> = (0..self.intent.len())
            .filter(|&r| self.intent[r].load(SeqCst) == I_SET)
            .map(|r| (r, self.wcount[r].load(SeqCst)))
            .filter(|&(r, _)| self.writers[r].load(SeqCst) == 0)
            .collect();
        let snap: Vec<u8> = self
            .state
            .iter()
            .map(|s| match s {
                Clean => MAP_PRESENT,
                Dirty | WritingBack => MAP_PRESENT | MAP_DIRTY,
                Missing | Fetching => 0,
            })
            .collect();
        let cands: Vec<(usize, u64)> = cands
            .into_iter()
            .filter(|&(r, _)| {
                let first = r as u64 * self.region_chunks;
                let end = ((first + self.region_chunks).min(self.chunks)) as usize;
                snap[first as usize..end]
                    .iter()
                    .all(|&b| b & MAP_DIRTY == 0)
            })
            .collect();
        self.local
            .flush()
            .await
            .map_err(|e| e.context("cache: making the local copy durable"))?;
        let map = self.map.clone();
        tokio::task::spawn_blocking(move || map.store(&snap))
            .await
            .map_err(|e| StoreError::backend(format!("cache: checkpoint task: {e}")))??;
        *saved = ch;
        self.stats.checkpoints.fetch_add(1, Relaxed);
        self.clear_intents(cands).await
    }

    async fn flush(self: &Arc<Self>) -> Result<()> {
        let deadline = Instant::now() + self.cfg.flush_timeout;
        let targets: Vec<(u64, u64)> = (0..self.chunks)
            .filter(|&c| self.st(c).is_dirty())
            .map(|c| (c, self.wgen[c as usize].load(SeqCst)))
            .collect();
        // Dirty chunks are remembered (and their data durable locally) before anything else.
        self.checkpoint().await?;
        let mut backoff = Duration::from_millis(20);
        let mut last: Option<StoreError> = None;
        loop {
            let pending: Vec<u64> = targets
                .iter()
                .filter(|(c, g)| self.pushed[*c as usize].load(SeqCst) < *g)
                .map(|(c, _)| *c)
                .collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "cache: flush: {} dirty chunks could not be written back within {} s",
                    pending.len(),
                    self.cfg.flush_timeout.as_secs()
                );
                return Err(match last {
                    Some(e) => e.context(msg),
                    None => StoreError::backend(msg),
                });
            }
            let notified = self.push_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let runs = self.dirty_runs(pending.iter().copied());
            if runs.is_empty() {
                // Someone else is pushing them.
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                continue;
            }
            if let Err(e) = self.push_round(runs).await {
                tracing::warn!("cache: flush: push failed, retrying: {}", e.chain());
                last = Some(e);
                tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        loop {
            self.stats.remote_flushes.fetch_add(1, Relaxed);
            match tokio::time::timeout_at(deadline, self.remote.flush()).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if Instant::now() < deadline && !e.is_permanent() => {
                    tracing::warn!("cache: flush: remote flush failed, retrying: {}", e.chain());
                    tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(Err(e)) => return Err(e.context("cache: flushing the remote")),
                Err(_) => {
                    return Err(StoreError::Timeout {
                        op: "cache flush",
                        after_ms: self.cfg.flush_timeout.as_millis() as u64,
                    });
                }
            }
        }
        Ok(())
    }

    /// Chunks the remote reports as reading zeros (holes, zero extents) need no fetch: zero
    /// them in the local copy (a punched hole) and mark them local, so neither the pull nor a
    /// miss reads them. A sparse 1 TiB image then pulls only its data. Best effort: a remote
    /// without extents, or an error, leaves everything to the pull.
    async fn adopt_zero_chunks(self: &Arc<Self>) {
        if !self.remote.caps().extents {
            return;
        }
        let cs = self.cs;
        // One query per slice bounds the reply of a remote with many extents (the NBD client
        // splits further as the protocol needs).
        const SLICE: u64 = 64 << 30;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut off = 0;
        while off < self.size {
            let len = SLICE.min(self.size - off);
            let ext =
                match tokio::time::timeout(self.cfg.fetch_timeout, self.remote.extents(off, len))
                    .await
                {
                    Ok(Ok(e)) => e,
                    Ok(Err(e)) => {
                        tracing::debug!("cache: remote extents unavailable: {}", e.chain());
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("cache: remote extents timed out");
                        return;
                    }
                };
            for e in ext.iter().filter(|e| e.kind.reads_zero()) {
                // Whole chunks inside the zero extent (the last chunk may be short).
                let first = e.offset.div_ceil(cs);
                let end = e.offset + e.len;
                let last = if end >= self.size {
                    self.chunks
                } else {
                    end / cs
                };
                if first < last {
                    match runs.last_mut() {
                        Some((f, n)) if *f + *n == first => *n += last - first,
                        _ => runs.push((first, last - first)),
                    }
                }
            }
            off += len;
        }
        let mut adopted = 0;
        for (first, n) in runs {
            let mut c = first;
            while c < first + n {
                let k = self.claim_run(c, first + n - c);
                if k == 0 {
                    c += 1;
                    continue;
                }
                let claim = Claim {
                    inner: self.clone(),
                    first: c,
                    n: k,
                    armed: true,
                };
                let (o, l) = self.run_bytes(c, k);
                match self.local.write_zeroes(o, l).await {
                    Ok(()) => {
                        claim.finish(&CacheState::FILL);
                        adopted += k;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cache: zeroing bytes {o}..{} locally: {}",
                            o + l,
                            e.chain()
                        );
                        return;
                    }
                }
                c += k;
            }
        }
        if adopted > 0 {
            self.stats.zero_chunks.fetch_add(adopted, Relaxed);
            tracing::info!("cache: {adopted} chunks read as zeros in the remote; not fetched");
        }
    }

    fn progress(&self) -> PullProgress {
        PullProgress {
            chunks: self.chunks,
            present_chunks: self.state.count() as u64,
            dirty_chunks: self.state.count_where(CacheState::is_dirty) as u64,
            pulled_bytes: self.stats.pulled_bytes.load(Relaxed),
            chunk_size: self.cs,
            size: self.size,
            running: self.cfg.pull && !self.pull_paused.load(SeqCst),
            done: self.state.count() as u64 >= self.chunks,
            ..PullProgress::default()
        }
    }
}

/// A reopened cache directory must be the remote's: compare a few chunks the map calls clean
/// (first, middle and last of them; 4 KiB each) with the remote. They differ when the directory
/// was made for another remote that has the same size, or when the remote was changed behind
/// the cache's back; either way the cache would serve wrong bytes. A remote that cannot be read
/// now is not held against it (the cache works offline).
async fn check_clean_sample(
    remote: &DynStore,
    local: &DynStore,
    state: &CacheTable,
    cs: u64,
    size: u64,
    dir: &Path,
    limit: Duration,
) -> Result<()> {
    let clean: Vec<u64> = (0..state.len() as u64)
        .filter(|&c| state.get(c as usize) == Clean)
        .collect();
    let Some(&first) = clean.first() else {
        return Ok(());
    };
    let mut picks = vec![first, clean[clean.len() / 2], clean[clean.len() - 1]];
    picks.dedup();
    let probes = picks.into_iter().map(|c| async move {
        let off = c * cs;
        let len = (size - off).min(4096) as usize;
        let mut theirs = vec![0u8; len];
        let mut ours = vec![0u8; len];
        local
            .read(off, &mut ours)
            .await
            .map_err(|e| e.context("cache: reading the local copy"))?;
        match tokio::time::timeout(limit, remote.read(off, &mut theirs)).await {
            Ok(Ok(())) if theirs != ours => Err(StoreError::Config(format!(
                "cache directory {}: the remote's bytes at {off}..{} differ from the cache's clean copy of them: it was made for another remote, or the remote was changed behind its back; use another directory or start it over with --cache-reinit (CacheConfig::reinit)",
                dir.display(),
                off + len as u64
            ))),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(
                    "cache: cannot compare a clean chunk with the remote now: {}",
                    e.chain()
                );
                Ok(())
            }
            Err(_) => {
                tracing::warn!("cache: cannot compare a clean chunk with the remote now: timeout");
                Ok(())
            }
        }
    });
    futures_util::future::try_join_all(probes).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Background tasks
// ---------------------------------------------------------------------------------------------

async fn pull_one(inner: Arc<Inner>, first: u64, n: u64) -> (Result<()>, Duration) {
    let claim = Claim {
        inner: inner.clone(),
        first,
        n,
        armed: true,
    };
    let t0 = Instant::now();
    let (off, len) = inner.run_bytes(first, n);
    inner.stats.remote_reads.fetch_add(1, Relaxed);
    let limit = inner.cfg.fetch_timeout.max(Duration::from_secs(2));
    let r = tokio::time::timeout(limit, async {
        let mut buf = inner.take_buf(len as usize);
        inner.remote.read(off, &mut buf).await?;
        let lat = t0.elapsed();
        let data = buf.freeze();
        inner.write_local(off, data.clone()).await?;
        inner.give_buf(data);
        Ok::<_, StoreError>(lat)
    })
    .await;
    match r {
        Ok(Ok(lat)) => {
            inner.stats.pulled_bytes.fetch_add(len, Relaxed);
            claim.finish(&CacheState::FILL);
            (Ok(()), lat)
        }
        Ok(Err(e)) => {
            inner.stats.fetch_errors.fetch_add(1, Relaxed);
            (Err(e), t0.elapsed())
        }
        Err(_) => {
            inner.stats.fetch_errors.fetch_add(1, Relaxed);
            (
                Err(StoreError::Timeout {
                    op: "background pull",
                    after_ms: limit.as_millis() as u64,
                }),
                t0.elapsed(),
            )
        }
    }
}

struct Puller {
    inner: Arc<Inner>,
    /// The pull order ([`CacheConfig::priority`]); it sees the missing chunks as wanted.
    prio: Box<dyn PullPriority>,
    /// [`CacheConfig::hints`] as runs of chunks.
    hints: Vec<std::ops::Range<usize>>,
    /// A chunk the order gave that did not continue the run before it: the next run's start.
    pending: Option<usize>,
    follow: Option<(u64, u64)>,
    unit: u64,
}

impl Puller {
    /// Look at chunks skipped meanwhile again (the built-in orders wrap around by themselves).
    fn rewind(&mut self) {
        self.pending = None;
    }

    /// The next chunk of the order that is still missing, claimed.
    fn next_claimed(&mut self, view: &PullView<'_>) -> Option<usize> {
        // An order that keeps offering chunks that are not wanted (a bug in a user's order)
        // falls back to the first wanted chunk instead of spinning.
        for _ in 0..64 {
            let i = match self.pending.take() {
                Some(i) => i,
                None => self.prio.next_chunk(view)?,
            };
            if view.wanted(i) && self.inner.claim_run(i as u64, 1) == 1 {
                return Some(i);
            }
        }
        let i = view.next_wanted_from(0)?;
        (self.inner.claim_run(i as u64, 1) == 1).then_some(i)
    }

    fn next_run(&mut self) -> Option<(u64, u64)> {
        let inner = self.inner.clone();
        if inner.cfg.follow_demand {
            let d = inner.last_demand.swap(NO_CHUNK, SeqCst);
            if d != NO_CHUNK {
                self.follow = Some((d, self.unit * 64));
            }
        }
        if let Some((mut f, mut left)) = self.follow.take() {
            while left > 0 && f < inner.chunks && inner.st(f) != Missing {
                f += 1;
                left -= 1;
            }
            if left > 0 && f < inner.chunks {
                let n = inner.claim_run(f, self.unit);
                if n > 0 {
                    self.follow = Some((f + n, left.saturating_sub(n)));
                    return Some((f, n));
                }
            }
        }
        let wanted = |i: usize| inner.state.get(i) == Missing;
        let hints = std::mem::take(&mut self.hints);
        let view = PullView::from_fn(inner.chunks as usize, &wanted, None).with_hints(&hints);
        let run = self.next_claimed(&view).map(|first| {
            // Consecutive chunks of the order go in one request.
            let mut n = 1;
            while n < self.unit {
                match self.prio.next_chunk(&view) {
                    Some(j) if j == first + n as usize && inner.claim_run(j as u64, 1) == 1 => {
                        n += 1;
                    }
                    other => {
                        self.pending = other;
                        break;
                    }
                }
            }
            (first as u64, n)
        });
        self.hints = hints;
        run
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let inner = self.inner.clone();
        let mut window = Window::new(inner.cfg.window);
        let mut set: JoinSet<(Result<()>, Duration)> = JoinSet::new();
        let mut errors = 0u32;
        loop {
            if *stop.borrow() {
                break;
            }
            let w = window.get();
            inner.stats.pull_window.store(w as u64, Relaxed);
            if let Some(m) = window.min_rtt() {
                inner.stats.min_rtt_us.store(m.as_micros() as u64, Relaxed);
            }
            // Demand misses go first: with a shared remote the puller issues nothing while one
            // waits; with a separate demand remote it keeps at most half its window in flight.
            let demand = inner.demand_active.load(SeqCst) > 0;
            let w = if demand && inner.cfg.demand_remote.is_some() {
                (w / 2).max(1)
            } else {
                w
            };
            let shared_busy = demand && inner.cfg.demand_remote.is_none();
            let may_issue = !inner.pull_paused.load(SeqCst) && !inner.pull_above() && !shared_busy;
            let mut exhausted = false;
            while may_issue && set.len() < w {
                match self.next_run() {
                    Some((f, n)) => {
                        set.spawn(pull_one(inner.clone(), f, n));
                    }
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            if set.is_empty() {
                if inner.state.count() as u64 >= inner.chunks {
                    if let Err(e) = inner.checkpoint().await {
                        tracing::warn!("cache: checkpoint after the pull: {}", e.chain());
                    }
                    tracing::info!("cache: pull complete");
                    let _ = stop.changed().await;
                    break;
                }
                if exhausted {
                    // Everything left is being fetched on demand, or failed: rescan shortly.
                    self.rewind();
                }
                tokio::select! {
                    _ = inner.pull_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            tokio::select! {
                r = set.join_next() => {
                    if let Some(Ok((res, lat))) = r {
                        match res {
                            Ok(()) => { window.on_success(lat); errors = 0; }
                            Err(e) => {
                                window.on_error();
                                errors = errors.saturating_add(1);
                                tracing::debug!("cache: background pull failed: {}", e.chain());
                                let pause = Duration::from_millis(20u64 << errors.min(7));
                                tokio::select! {
                                    _ = tokio::time::sleep(pause) => {}
                                    _ = stop.changed() => {}
                                }
                                self.rewind();
                            }
                        }
                    }
                }
                _ = inner.pull_wake.notified() => {}
                _ = stop.changed() => {}
            }
        }
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
}

async fn pusher(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let tick = inner
        .cfg
        .push_interval
        .min(inner.cfg.checkpoint_interval)
        .max(Duration::from_millis(10));
    let mut last_push = Instant::now();
    let mut last_ckpt = Instant::now();
    let mut backoff = Duration::ZERO;
    loop {
        let woken = tokio::select! {
            _ = tokio::time::sleep(tick) => false,
            _ = inner.push_wake.notified() => true,
            _ = stop.changed() => return,
        };
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        if woken
            || now.duration_since(last_push) + Duration::from_millis(1)
                >= inner.cfg.push_interval + backoff
        {
            last_push = now;
            let runs = inner.dirty_runs(0..inner.chunks);
            if !runs.is_empty() {
                match inner.push_round(runs).await {
                    Ok(n) => {
                        backoff = Duration::ZERO;
                        tracing::debug!("cache: pushed {n} chunks");
                    }
                    Err(e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                        tracing::warn!("cache: background push failed (retrying): {}", e.chain());
                    }
                }
            }
        }
        if now.duration_since(last_ckpt) >= inner.cfg.checkpoint_interval {
            last_ckpt = now;
            if let Err(e) = inner.checkpoint().await {
                tracing::warn!("cache: checkpoint: {}", e.chain());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The public type
// ---------------------------------------------------------------------------------------------

/// A local cache over a remote store; itself a [`Store`].
///
/// - Reads of local chunks are served from the local copy; a miss fetches the run of missing
///   chunks it needs with one remote request (concurrent misses on one chunk share that fetch)
///   and fails with EIO after [`CacheConfig::fetch_timeout`] if the remote does not deliver.
/// - Writes go to the local copy (a partially written missing chunk is fetched first) and mark
///   their chunks dirty; the background pusher writes dirty chunks back every
///   [`CacheConfig::push_interval`], coalescing consecutive chunks into one request.
/// - [`Store::flush`] returns when every chunk written before it is in the remote and the
///   remote has flushed; while the remote is unreachable it keeps retrying (up to
///   [`CacheConfig::flush_timeout`]), and the data stays local and dirty.
/// - The background puller fetches the rest in [`CacheConfig::priority`] order with an adaptive
///   in-flight window ([`crate::window`]), and stops issuing requests while demand misses wait.
/// - The chunk map is persisted in the cache directory ([`crate::map`]); reopening resumes
///   without refetching and pushes chunks left dirty.
///
/// Open it inside a tokio runtime (it spawns its background tasks there). [`Cache::close`]
/// flushes and saves the map; dropping a cache without closing it stops the tasks and is
/// equivalent to a crash for everything not yet flushed.
pub struct Cache {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    desc: String,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl Cache {
    /// Open (or resume) a cache of `remote` in directory `dir`.
    pub async fn open(remote: DynStore, dir: impl AsRef<Path>, cfg: CacheConfig) -> Result<Cache> {
        cfg.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let size = remote.size();
        let cs = cfg.chunk_size;
        let chunks = size.div_ceil(cs);
        let want = DirIdentity {
            size,
            chunk: cs,
            region: cfg.intent_region.max(cs),
            remote: cfg.remote_id.clone(),
        };
        let dir2 = dir.clone();
        let reinit = cfg.reinit;
        let opened = tokio::task::spawn_blocking(move || open_dir(&dir2, &want, reinit))
            .await
            .map_err(|e| StoreError::backend(format!("cache: open task: {e}")))??;
        let region_chunks = opened.identity.region / cs;
        let local: DynStore = Arc::new(FileStore::open(
            dir.join("data"),
            FileOptions::with_size(size),
        )?);
        let mut dirty = 0;
        let mut suspect = 0;
        let state = CacheTable::from_states(opened.bytes.iter().enumerate().map(|(c, &b)| {
            let intent = opened.intent_bytes[c / region_chunks as usize] != 0;
            if b & MAP_DIRTY != 0 {
                dirty += 1;
                Dirty
            } else if b & MAP_PRESENT != 0 && intent {
                // Written after the last checkpoint, perhaps: the remote gets it again.
                dirty += 1;
                suspect += 1;
                Dirty
            } else if b & MAP_PRESENT != 0 {
                Clean
            } else {
                Missing
            }
        }));
        let local_count = state.count();
        let intent: Box<[AtomicU8]> = opened
            .intent_bytes
            .iter()
            .map(|&b| AtomicU8::new(if b != 0 { I_SET } else { I_NONE }))
            .collect();
        let regions = intent.len();
        let any_intent = opened.intent_bytes.iter().any(|&b| b != 0);
        if opened.resumed {
            check_clean_sample(&remote, &local, &state, cs, size, &dir, cfg.fetch_timeout).await?;
        }
        // Dirty chunks found on reopen get a generation above what was pushed.
        let wgen: Box<[AtomicU64]> = state
            .iter()
            .map(|s| AtomicU64::new(u64::from(s == Dirty)))
            .collect();
        let pushed: Box<[AtomicU64]> = (0..chunks).map(|_| AtomicU64::new(0)).collect();
        let (stop, _) = watch::channel(false);
        let demand = cfg.demand_remote.clone().unwrap_or_else(|| remote.clone());
        let desc = format!("Cache({remote:?} in {})", dir.display());
        let inner = Arc::new(Inner {
            remote,
            demand,
            local,
            dir: dir.clone(),
            size,
            cs,
            chunks,
            state,
            retry: RetryPolicy::new(
                cfg.fetch_timeout,
                Duration::from_millis(5),
                Duration::from_millis(500),
            ),
            wgen,
            pushed,
            shards: (0..SHARDS).map(|_| Notify::new()).collect(),
            push_done: Notify::new(),
            pull_wake: Notify::new(),
            push_wake: Notify::new(),
            map: Arc::new(opened.map),
            region_chunks,
            intent,
            writers: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            wcount: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            intent_file: Arc::new(opened.intent),
            intent_io: tokio::sync::Mutex::new(()),
            saved: tokio::sync::Mutex::new(0),
            // Intents found set are cleared by the first checkpoint that finds them clean.
            changes: AtomicU64::new(u64::from(any_intent)),
            demand_active: AtomicUsize::new(0),
            last_demand: AtomicU64::new(NO_CHUNK),
            pull_paused: AtomicBool::new(false),
            pulls_above: Mutex::new(Vec::new()),
            // Push requests are often single small chunks: allow as many more of them as fit
            // in the bytes of `window.max` full requests (capped), see `push_round`.
            push_window: Mutex::new(Window::new(WindowLimits {
                max: (cfg.window.max as u64 * cfg.chunks_per_request()).min(16384) as usize,
                ..cfg.window
            })),
            bufs: Mutex::new(Vec::new()),
            local_writes: tokio::sync::Mutex::new(()),
            stop,
            stats: CacheStats::default(),
            cfg,
        });
        if opened.resumed {
            tracing::info!(
                "cache: resumed {} ({local_count}/{chunks} chunks local, {dirty} dirty, of which {suspect} written since the last checkpoint perhaps)",
                dir.display()
            );
        }
        let mut tasks = vec![tokio::spawn(pusher(inner.clone(), inner.stop.subscribe()))];
        let puller = inner.cfg.pull.then(|| Puller {
            inner: inner.clone(),
            prio: inner.cfg.priority.build(),
            hints: inner
                .cfg
                .hints
                .iter()
                .filter(|h| h.start < h.end)
                .map(|h| {
                    let first = usize::try_from(h.start / cs).unwrap_or(usize::MAX);
                    let end = usize::try_from(h.end.div_ceil(cs)).unwrap_or(usize::MAX);
                    first..end
                })
                .collect(),
            pending: None,
            follow: None,
            unit: inner.cfg.chunks_per_request(),
        });
        let adopt = (inner.state.count() as u64) < chunks;
        if adopt || puller.is_some() {
            // Zero chunks are adopted in the background (over a long link the extent queries
            // take round trips; reads are served meanwhile), then the pull starts, so it
            // does not fetch what reads as zeros.
            let inner = inner.clone();
            tasks.push(tokio::spawn(async move {
                if adopt {
                    let mut stop = inner.stop.subscribe();
                    tokio::select! {
                        _ = inner.adopt_zero_chunks() => {}
                        _ = stop.changed() => return,
                    }
                }
                if let Some(p) = puller {
                    p.run(inner.stop.subscribe()).await;
                }
            }));
        }
        if dirty > 0 {
            inner.push_wake.notify_one();
        }
        Ok(Cache {
            inner,
            tasks: Mutex::new(tasks),
            desc,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.inner.cs
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.inner.chunks
    }

    /// The state of chunk `i`.
    pub fn chunk_state(&self, i: u64) -> CacheState {
        self.inner.st(i)
    }

    /// How much is local and dirty.
    pub fn progress(&self) -> PullProgress {
        self.inner.progress()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> CacheStatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        let p = self.inner.progress();
        s.local_chunks = p.present_chunks;
        s.dirty_chunks = p.dirty_chunks;
        s.chunks = p.chunks;
        s
    }

    /// Stop issuing background pull requests (those in flight finish).
    pub fn pause_pull(&self) {
        self.inner.pull_paused.store(true, SeqCst);
    }

    /// Resume the background pull.
    pub fn resume_pull(&self) {
        self.inner.pull_paused.store(false, SeqCst);
        self.inner.pull_wake.notify_one();
    }

    /// Wait until every chunk is local, or `timeout` passes. Returns whether the pull completed.
    pub async fn wait_pulled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.inner.state.count() as u64 >= self.inner.chunks {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Start a background push now instead of at the next interval.
    pub fn push_now(&self) {
        self.inner.push_wake.notify_one();
    }

    /// Save the chunk map now (after making the local data durable).
    pub async fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint().await
    }

    /// Flush, stop the background tasks and save the chunk map.
    pub async fn close(&self) -> Result<()> {
        let r = self.inner.flush().await;
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        self.inner.checkpoint().await?;
        r
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

#[async_trait]
impl Store for Cache {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.inner.write(offset, data).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// The local copy's, read-only, when it is on tmpfs (the cache directory there): a region
    /// maps the cached bytes instead of copying them out. Read-only because a write through a
    /// mapping would not tell the cache which chunks are dirty.
    fn shared_memory(&self) -> Option<SharedMemory> {
        let mut m = self.inner.local.shared_memory()?;
        m.writable = false;
        Some(m)
    }

    /// Fetches what is missing of the range into the local copy (a demand miss, or the pull of
    /// a puller above), then makes the local copy's pages of the range exist (chunks adopted
    /// as zeros are holes there).
    async fn make_resident(&self, offset: u64, len: u64) -> Result<()> {
        if self.inner.local.shared_memory().is_none() {
            return Err(StoreError::Unsupported {
                op: "make_resident",
            });
        }
        self.inner.read_range(offset, len, None).await?;
        self.inner.local.make_resident(offset, len).await
    }

    /// Discarding is zeroing here: the zeros are written back like any write, so the remote
    /// ends up reading zeros too (a discard that left old data there would resurface after a
    /// restart from another cache).
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }
}
