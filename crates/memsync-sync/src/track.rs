//! Continuous push: after one full sync, rounds that send only what changed since the last
//! round, on an interval or on demand.
//!
//! What changed comes from a [`ChangeSource`]:
//! - [`Tracked`], a layer over any store that records the chunks written through it (the write
//!   tracking of a mount's store stack);
//! - [`Rescan`], which hashes the store each round and compares with what was pushed (for data
//!   written behind memsync's back, e.g. a file another program maps);
//! - a live region's dirty tracker (WP_ASYNC + PAGEMAP_SCAN) implements the same trait.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memsync_core::{Bytes, Caps, DynStore, Extent, Result, Store, StoreError, async_trait};
use parking_lot::Mutex;

use crate::dest::DynDest;
use crate::digest::{self, Digest, FpKey, Known, Layout};
use crate::engine::{self, Progress, Report, Source, SyncError, SyncOptions};

/// Where continuous push learns what changed.
#[async_trait]
pub trait ChangeSource: Send + Sync + fmt::Debug {
    /// Byte ranges that may have changed since the previous call (the first call: since the
    /// source was set up). A write that completed before the call must be in it or in an
    /// earlier answer; ranges may be larger than the writes.
    async fn take_changes(&self) -> Result<Vec<Range<u64>>>;

    /// The destination now holds `digests` for chunks `first..` of `layout`. Sources that
    /// compare contents keep this as their baseline; trackers ignore it.
    fn pushed(&self, layout: Layout, first: u64, digests: &[Digest]) {
        let _ = (layout, first, digests);
    }

    /// A round that took `ranges` failed before the destination committed them: report them
    /// again next time. The destination may hold the old bytes, the new ones or a mix there,
    /// so a source that compares contents must forget its baseline for them (the source may
    /// even change back to what the baseline says).
    fn put_back(&self, ranges: &[Range<u64>]) {
        let _ = ranges;
    }
}

/// A layer that records which `grain`-sized pieces were written (write, write_zeroes, trim).
/// A piece is marked after its write completes, so a round that takes the marks and then reads
/// sees the write, and a write completing after the take is marked for the next round.
pub struct Tracked {
    inner: DynStore,
    grain: u64,
    bits: Vec<AtomicU64>,
}

impl fmt::Debug for Tracked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tracked({:?}, grain {})", self.inner, self.grain)
    }
}

impl Tracked {
    /// Track writes to `inner` per `grain` bytes (a power of two, e.g. 4096 or the chunk size).
    pub fn new(inner: DynStore, grain: u64) -> Arc<Self> {
        let grain = grain.next_power_of_two().max(512);
        let n = inner.size().div_ceil(grain).div_ceil(64) as usize;
        Arc::new(Tracked {
            inner,
            grain,
            bits: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.grain;
        let last = (offset + len - 1) / self.grain;
        for g in first..=last {
            if let Some(w) = self.bits.get((g / 64) as usize) {
                w.fetch_or(1 << (g % 64), Ordering::Release);
            }
        }
    }
}

#[async_trait]
impl Store for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let r = self.inner.write(offset, data).await;
        // Also after a failure: part of the range may have been written.
        self.mark(offset, len);
        r
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    fn session(&self) -> u64 {
        self.inner.session()
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.inner.trim(offset, len).await;
        self.mark(offset, len);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.inner.write_zeroes(offset, len).await;
        self.mark(offset, len);
        r
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[async_trait]
impl ChangeSource for Tracked {
    async fn take_changes(&self) -> Result<Vec<Range<u64>>> {
        let size = self.inner.size();
        let mut out: Vec<Range<u64>> = Vec::new();
        for (w, word) in self.bits.iter().enumerate() {
            let mut v = word.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                v &= v - 1;
                let g = w as u64 * 64 + b;
                let s = g * self.grain;
                let e = (s + self.grain).min(size);
                match out.last_mut() {
                    Some(r) if r.end == s => r.end = e,
                    _ => out.push(s..e),
                }
            }
        }
        Ok(out)
    }

    fn put_back(&self, ranges: &[Range<u64>]) {
        for r in ranges {
            self.mark(r.start, r.end.saturating_sub(r.start));
        }
    }
}

/// Finds changes by hashing the whole store each round and comparing with what was pushed.
pub struct Rescan {
    store: DynStore,
    layout: Layout,
    baseline: Mutex<Vec<Option<Digest>>>,
    /// The last round's fingerprints and digests: a round hashes with BLAKE3 only the chunks
    /// whose fingerprints changed since.
    key: FpKey,
    last: Mutex<Option<Arc<Known>>>,
}

impl fmt::Debug for Rescan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rescan({:?})", self.store)
    }
}

impl Rescan {
    pub fn new(store: DynStore, chunk_size: u64) -> Result<Arc<Self>> {
        let layout = Layout::new(store.size(), chunk_size)?;
        Ok(Arc::new(Rescan {
            store,
            layout,
            baseline: Mutex::new(vec![None; layout.chunks() as usize]),
            key: FpKey::random()
                .map_err(|e| StoreError::io("reading /dev/urandom for a fingerprint key", e))?,
            last: Mutex::new(None),
        }))
    }
}

#[async_trait]
impl ChangeSource for Rescan {
    async fn take_changes(&self) -> Result<Vec<Range<u64>>> {
        let known = self.last.lock().clone();
        let s = digest::scan_with(
            &self.store,
            self.layout,
            &|_| {},
            None,
            Some((self.key.clone(), known)),
        )
        .await?;
        let now = s.digests;
        *self.last.lock() = s.fps.map(|fps| {
            Arc::new(Known {
                key: self.key.clone(),
                fps,
                digests: now.clone(),
            })
        });
        let base = self.baseline.lock();
        let changed = (0..self.layout.chunks())
            .filter(|&i| base[i as usize] != Some(now[i as usize]))
            .collect();
        Ok(engine::ranges(changed)
            .into_iter()
            .map(|r| {
                let (s, _) = self.layout.chunk(r.start);
                let (e, el) = self.layout.chunk(r.end - 1);
                s..e + el
            })
            .collect())
    }

    fn pushed(&self, layout: Layout, first: u64, digests: &[Digest]) {
        if layout != self.layout {
            return;
        }
        let mut base = self.baseline.lock();
        for (k, d) in digests.iter().enumerate() {
            if let Some(b) = base.get_mut(first as usize + k) {
                *b = Some(*d);
            }
        }
    }

    fn put_back(&self, ranges: &[Range<u64>]) {
        let mut base = self.baseline.lock();
        for r in ranges {
            if r.end <= r.start {
                continue;
            }
            let first = r.start / self.layout.chunk_size;
            let last = (r.end - 1) / self.layout.chunk_size;
            for i in first..=last {
                if let Some(b) = base.get_mut(i as usize) {
                    *b = None;
                }
            }
        }
    }
}

/// What one push round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Bytes the change source reported.
    pub changed_bytes: u64,
    /// Chunks looked at and chunks updated.
    pub chunks: u64,
    pub updated: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Wire bytes sent during the round (remote destinations).
    pub wire_sent: u64,
    pub elapsed: Duration,
}

/// Continuous push of a source to a destination.
pub struct Pusher {
    src: DynStore,
    dest: DynDest,
    layout: Layout,
    changes: Arc<dyn ChangeSource>,
    /// What the destination holds, per chunk; `None`: unknown (a failed round may or may not
    /// have left its writes there), so the next push compares with the destination.
    held: tokio::sync::Mutex<Vec<Option<Digest>>>,
    window: usize,
}

impl fmt::Debug for Pusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pusher({:?} -> {:?})", self.src, self.dest)
    }
}

impl Pusher {
    /// Run the first, full sync and return a pusher for the rounds after it. The change source
    /// must have been set up before this call, so that writes during the sync are in round 1.
    pub async fn start(
        src: Source,
        dest: DynDest,
        changes: Arc<dyn ChangeSource>,
        opts: SyncOptions,
        progress: &dyn Progress,
    ) -> Result<(Self, Report), SyncError> {
        let (report, held) = engine::sync_held(&src, dest.clone(), opts, progress).await?;
        let layout = dest.layout();
        changes.pushed(layout, 0, &held);
        Ok((
            Pusher {
                src: src.store,
                dest,
                layout,
                changes,
                held: tokio::sync::Mutex::new(held.into_iter().map(Some).collect()),
                window: opts.window,
            },
            report,
        ))
    }

    /// One round: push every chunk the change source reports, then commit. Rounds never
    /// overlap (a second caller waits). A round that fails gives what it took back to the
    /// change source, so the next round pushes it again.
    pub async fn round(&self) -> Result<Round> {
        let t = Instant::now();
        let mut held = self.held.lock().await;
        let ranges = self.changes.take_changes().await?;
        let r = self.push(&mut held, &ranges, t).await;
        if r.is_err() {
            self.changes.put_back(&ranges);
        }
        r
    }

    async fn push(
        &self,
        held: &mut [Option<Digest>],
        ranges: &[Range<u64>],
        t: Instant,
    ) -> Result<Round> {
        let (sent0, _) = self.dest.wire();
        let mut round = Round::default();
        let mut chunks = Vec::new();
        for r in ranges {
            round.changed_bytes += r.end - r.start;
            if r.end <= r.start {
                continue;
            }
            let first = r.start / self.layout.chunk_size;
            let last = (r.end - 1) / self.layout.chunk_size;
            for i in first..=last.min(self.layout.chunks().saturating_sub(1)) {
                if chunks.last() != Some(&i) {
                    chunks.push(i);
                }
            }
        }
        chunks.dedup();
        round.chunks = chunks.len() as u64;
        let work = chunks.iter().map(|&i| (i, held[i as usize])).collect();
        let (done, err) =
            engine::push_chunks(&self.src, self.layout, &self.dest, work, self.window, None).await;
        let committed = match err {
            Some((e, _)) => Err(e),
            None => self.dest.commit().await.map(|_| ()),
        };
        if let Err(e) = committed {
            // Nothing of this round is committed: a destination may have kept its writes, lost
            // them (a peer that died before its commit) or kept part of a chunk. Every chunk
            // of the round is unknown until a later round compares it with the destination.
            for &i in &chunks {
                held[i as usize] = None;
            }
            return Err(e);
        }
        for (i, p) in &done {
            held[*i as usize] = Some(p.digest);
            self.changes.pushed(self.layout, *i, &[p.digest]);
            round.updated += (!p.unchanged) as u64;
            round.data_bytes += p.data_bytes;
            round.zero_bytes += p.zero_bytes;
        }
        round.wire_sent = self.dest.wire().0 - sent0;
        round.elapsed = t.elapsed();
        Ok(round)
    }
}
