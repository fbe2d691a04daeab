//! The engine's driver operations on real memory: `place`, `invalidate`,
//! the fault hooks, over a source of this file (`VecSource`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memsync_core::{Bytes, StoreError};
use memsync_region::{
    Backing, ChunkSource, ChunkState, FaultHooks, LazyRegion, RegionConfig, SourceFuture, WpAction,
};
use parking_lot::Mutex;

use super::{KIB, cfg, join, spawn};

/// A source holding its bytes in memory: counts reads, takes write-backs.
#[derive(Debug)]
pub struct VecSource {
    pub data: Mutex<Vec<u8>>,
    pub reads: AtomicUsize,
    pub writes: AtomicUsize,
    /// Makes each write-back take a while, widening the window in which
    /// writers race with an eviction.
    pub slow_writes: std::sync::atomic::AtomicBool,
}

impl VecSource {
    pub fn random(size: usize, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(memsync_testkit::random_bytes(seed, size).to_vec()),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            slow_writes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock()[off..off + len].to_vec()
    }
}

impl ChunkSource for VecSource {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let off = offset as usize;
            buf.copy_from_slice(&self.data.lock()[off..off + buf.len()]);
            Ok(())
        })
    }

    fn write_back(&self, offset: u64, data: Bytes) -> SourceFuture<'_, ()> {
        Box::pin(async move {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.slow_writes.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            let off = offset as usize;
            self.data.lock()[off..off + data.len()].copy_from_slice(&data);
            Ok::<(), StoreError>(())
        })
    }
}

/// Hooks that count what they are told.
#[derive(Debug, Default)]
pub struct Counting {
    pub missing: AtomicUsize,
    pub minor: AtomicUsize,
    pub wp: AtomicUsize,
    pub removed: AtomicUsize,
}

impl FaultHooks for Counting {
    fn missing(&self, _chunk: usize) {
        self.missing.fetch_add(1, Ordering::Relaxed);
    }
    fn minor(&self, _chunk: usize) {
        self.minor.fetch_add(1, Ordering::Relaxed);
    }
    fn write_protect(&self, _chunk: usize, _addr: usize) -> WpAction {
        self.wp.fetch_add(1, Ordering::Relaxed);
        WpAction::Unprotect
    }
    fn remove(&self, chunks: std::ops::Range<usize>) {
        self.removed.fetch_add(chunks.len(), Ordering::Relaxed);
    }
}

fn region(src: &Arc<VecSource>, hooks: Arc<dyn FaultHooks>, c: RegionConfig) -> LazyRegion {
    LazyRegion::with_source(Arc::clone(src) as Arc<dyn ChunkSource>, hooks, c).unwrap()
}

#[test]
fn place_installs_an_absent_chunk_once_and_faults_see_it() {
    let chunk = 64 * KIB;
    let src = VecSource::random(8 * chunk + 100, 1);
    let r = region(&src, Arc::new(()), cfg(chunk));
    let placed = vec![0x5a; chunk];
    assert!(r.place(3, &placed).unwrap(), "an absent chunk is installed");
    assert_eq!(r.chunk_state(3), ChunkState::Present);
    assert!(
        !r.place(3, &[0x11; 64 * KIB]).unwrap(),
        "a present chunk is left alone"
    );
    let mut got = vec![0u8; chunk];
    r.read_faulting(3 * chunk, &mut got);
    assert!(got == placed, "the placed bytes, not the source's");
    assert_eq!(src.reads.load(Ordering::Relaxed), 0, "nothing was fetched");
    // The short last chunk takes exactly its data length.
    assert_eq!(
        r.place(8, &[1; 64 * KIB]).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(r.place(8, &[7; 100]).unwrap());
    let mut tail = [0u8; 100];
    r.read_faulting(8 * chunk, &mut tail);
    assert_eq!(tail, [7; 100]);
    assert_eq!(
        r.place(9, &[0; 1]).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert_eq!(r.stats().snapshot().chunks_placed, 2);
}

/// Faulting readers and placers race on every chunk: exactly one of the
/// fetch and the place installs each chunk, and every reader sees the
/// winner's bytes.
#[test]
fn place_races_faults_and_exactly_one_wins() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let chunk = 16 * KIB;
        let n = 64;
        let src = VecSource::random(n * chunk, 2);
        let r = Arc::new(region(
            &src,
            Arc::new(()),
            RegionConfig {
                backing,
                ..cfg(chunk)
            },
        ));
        let placed: Arc<Vec<u8>> = Arc::new(memsync_testkit::random_bytes(3, n * chunk).to_vec());
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let r = Arc::clone(&r);
                spawn(move || {
                    let mut seen = vec![0u8; n * chunk];
                    for k in 0..n {
                        let i = if t == 0 { k } else { n - 1 - k };
                        r.read_faulting(i * chunk, &mut seen[i * chunk..(i + 1) * chunk]);
                    }
                    seen
                })
            })
            .collect();
        let placer = {
            let (r, placed) = (Arc::clone(&r), Arc::clone(&placed));
            spawn(move || {
                (0..n)
                    .map(|i| r.place(i, &placed[i * chunk..(i + 1) * chunk]).unwrap())
                    .collect::<Vec<bool>>()
            })
        };
        let seen: Vec<Vec<u8>> = readers.iter().map(join).collect();
        let won = join(&placer);
        let st = r.stats().snapshot();
        let won_n = won.iter().filter(|&&w| w).count();
        assert_eq!(st.chunks_placed as usize, won_n);
        assert_eq!(
            st.chunks_fault as usize + won_n,
            n,
            "{backing:?}: each chunk installed exactly once ({st})"
        );
        let truth = src.bytes(0, n * chunk);
        for (i, &w) in won.iter().enumerate() {
            let range = i * chunk..(i + 1) * chunk;
            let want = if w {
                &placed[range.clone()]
            } else {
                &truth[range.clone()]
            };
            for s in &seen {
                assert!(
                    &s[range.clone()] == want,
                    "{backing:?}: chunk {i} (placed: {w})"
                );
            }
        }
    }
}

#[test]
fn invalidate_drops_local_writes_and_refetches_from_the_source() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let chunk = 64 * KIB;
        let src = VecSource::random(4 * chunk, 4);
        let hooks = Arc::new(Counting::default());
        let r = region(
            &src,
            Arc::clone(&hooks) as Arc<dyn FaultHooks>,
            RegionConfig {
                backing,
                ..cfg(chunk)
            },
        );
        r.write_faulting(chunk + 10, b"local");
        assert_eq!(hooks.missing.load(Ordering::Relaxed), 1);
        assert_eq!(r.chunk_state(1), ChunkState::Present);
        // Bytes 10..chunk+20 touch chunks 0 and 1: both dropped, whole.
        assert_eq!(r.invalidate(10, chunk + 10).unwrap(), 2);
        assert_eq!(r.chunk_state(1), ChunkState::Absent);
        assert_eq!(r.present_count(), 0);
        assert_eq!(hooks.removed.load(Ordering::Relaxed), 2, "{backing:?}");
        let mut got = vec![0u8; chunk];
        r.read_faulting(chunk, &mut got);
        assert!(
            got == src.bytes(chunk, chunk),
            "{backing:?}: refetched, the local write is gone"
        );
        assert_eq!(hooks.missing.load(Ordering::Relaxed), 2);
        // Invalidate, then place new data: a driver's update of a chunk.
        src.data.lock()[chunk..2 * chunk].fill(9);
        r.invalidate(chunk, 1).unwrap();
        assert!(r.place(1, &[3; 64 * KIB]).unwrap());
        r.read_faulting(chunk, &mut got);
        assert!(got.iter().all(|&b| b == 3), "{backing:?}");
        assert_eq!(r.stats().snapshot().chunks_dropped, 3);
    }
}

/// A range of many present chunks is dropped with one `madvise`, so one
/// `REMOVE` event (a migration's switch-over drops thousands of chunks while
/// the application waits); each chunk is still refetched on its own, and a
/// chunk that was never fetched stays absent.
#[test]
fn invalidate_of_many_chunks_is_one_remove_and_refetches_each() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let chunk = 16 * KIB;
        let n = 64;
        let src = VecSource::random(n * chunk, 6);
        let r = region(
            &src,
            Arc::new(()),
            RegionConfig {
                backing,
                ..cfg(chunk)
            },
        );
        for i in 0..n - 1 {
            r.write_faulting(i * chunk + 1, b"local");
        }
        assert_eq!(r.present_count(), n - 1);
        let before = r.stats().snapshot();
        assert_eq!(r.invalidate(0, n * chunk).unwrap(), n, "{backing:?}");
        let after = r.stats().snapshot();
        assert_eq!(after.removes - before.removes, 1, "{backing:?}");
        assert_eq!(after.chunks_dropped - before.chunks_dropped, n as u64);
        assert_eq!(r.present_count(), 0);
        let mut got = vec![0u8; chunk];
        for i in 0..n {
            r.read_faulting(i * chunk, &mut got);
            assert!(got == src.bytes(i * chunk, chunk), "{backing:?}: chunk {i}");
        }
        assert_eq!(r.present_count(), n);
    }
}

/// Invalidations race with faulting readers: every read sees the source's
/// bytes (the source does not change), never zeros or a torn chunk.
#[test]
fn invalidate_races_faults_without_wrong_bytes() {
    let chunk = 16 * KIB;
    let n = 32;
    let src = VecSource::random(n * chunk, 5);
    let r = Arc::new(region(&src, Arc::new(()), cfg(chunk)));
    let truth = Arc::new(src.bytes(0, n * chunk));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (r, truth) = (Arc::clone(&r), Arc::clone(&truth));
            spawn(move || {
                let mut buf = vec![0u8; chunk];
                for k in 0..400 {
                    let i = (k * 7 + t * 3) % n;
                    r.read_faulting(i * chunk, &mut buf);
                    assert!(buf == truth[i * chunk..(i + 1) * chunk], "chunk {i}");
                }
            })
        })
        .collect();
    let dropper = {
        let r = Arc::clone(&r);
        spawn(move || {
            let mut dropped = 0;
            for k in 0..200 {
                // Single chunks and runs of four (one madvise for the run).
                let run = if k % 2 == 0 { 1 } else { 4 };
                let first = (k * 5 % (n - 3)) * chunk;
                dropped += r.invalidate(first, run * chunk).unwrap();
            }
            dropped
        })
    };
    for rx in &readers {
        join(rx);
    }
    assert!(join(&dropper) > 0);
}

/// Hooks that hold the first write-protect fault until the test releases
/// it, and report each one on a channel.
#[derive(Debug)]
struct Holding {
    hold_first: bool,
    seen: Mutex<Vec<usize>>,
    tx: Mutex<std::sync::mpsc::Sender<usize>>,
}

impl FaultHooks for Holding {
    fn write_protect(&self, chunk: usize, _addr: usize) -> WpAction {
        let mut seen = self.seen.lock();
        seen.push(chunk);
        let _ = self.tx.lock().send(chunk);
        if self.hold_first && seen.len() == 1 {
            WpAction::Hold
        } else {
            WpAction::Unprotect
        }
    }
}

fn protect_cfg(chunk: usize, backing: Backing) -> RegionConfig {
    RegionConfig {
        backing,
        write_tracking: memsync_region::WriteTracking::Protect,
        ..cfg(chunk)
    }
}

/// Before Linux 6.4 (no `UFFDIO_CONTINUE_MODE_WP`) a memfd region that tracks writes is
/// refused when it is created, with the reason; it used to be created and fail its first
/// install with EINVAL (6.1: a write into it hung). Newer kernels create it. The 6.1 guest of
/// the kernel matrix runs the refusal.
#[test]
fn memfd_write_tracking_is_refused_without_continue_wp() {
    let supported = memsync_sys::Uffd::probe_features()
        .unwrap()
        .contains(memsync_sys::Features::WP_UNPOPULATED);
    let chunk = 16 * KIB;
    let src = VecSource::random(4 * chunk, 12);
    for c in [
        protect_cfg(chunk, Backing::Memfd),
        budget_cfg(chunk, 2, Backing::Memfd),
    ] {
        let r = LazyRegion::with_source(Arc::clone(&src) as Arc<dyn ChunkSource>, Arc::new(()), c);
        match (supported, r) {
            (true, r) => {
                let r = r.unwrap();
                r.write_at(chunk + 3, b"tracked").unwrap();
                let mut got = [0u8; 7];
                r.read_at(chunk + 3, &mut got).unwrap();
                assert_eq!(&got, b"tracked");
            }
            (false, Ok(_)) => panic!(
                "a memfd region with write tracking was created on a kernel without UFFDIO_CONTINUE_MODE_WP"
            ),
            (false, Err(e)) => {
                assert!(e.to_string().contains("UFFDIO_CONTINUE_MODE_WP"), "{e}");
                eprintln!("refused as expected: {e}");
            }
        }
    }
}

#[test]
fn protect_delivers_write_faults_to_the_hook() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        if !super::memfd_wp_supported("protect_delivers_write_faults_to_the_hook", backing) {
            continue;
        }
        let chunk = 64 * KIB;
        let src = VecSource::random(4 * chunk, 6);
        let hooks = Arc::new(Counting::default());
        let r = region(
            &src,
            Arc::clone(&hooks) as Arc<dyn FaultHooks>,
            protect_cfg(chunk, backing),
        );
        r.write_faulting(chunk, b"first");
        // A present chunk and an absent one.
        r.protect(chunk, chunk).unwrap();
        r.protect(2 * chunk, 1).unwrap();
        let mut got = vec![0u8; chunk];
        r.read_faulting(chunk, &mut got);
        assert_eq!(
            hooks.wp.load(Ordering::Relaxed),
            0,
            "{backing:?}: reads do not fault"
        );
        r.write_faulting(chunk + 5, b"second");
        assert_eq!(hooks.wp.load(Ordering::Relaxed), 1, "{backing:?}");
        r.write_faulting(chunk + 20, b"third");
        assert_eq!(
            hooks.wp.load(Ordering::Relaxed),
            1,
            "{backing:?}: lifted for the chunk"
        );
        // The absent chunk was installed protected.
        r.write_faulting(2 * chunk + 7, b"x");
        assert_eq!(hooks.wp.load(Ordering::Relaxed), 2, "{backing:?}");
        assert_eq!(hooks.missing.load(Ordering::Relaxed), 2);
        let mut want = src.bytes(chunk, chunk);
        want[..5].copy_from_slice(b"first");
        want[5..11].copy_from_slice(b"second");
        want[20..25].copy_from_slice(b"third");
        r.read_faulting(chunk, &mut got);
        assert!(got == want, "{backing:?}");
        let mut b = [0u8; 1];
        r.read_faulting(2 * chunk + 7, &mut b);
        assert_eq!(&b, b"x");
        assert_eq!(r.stats().snapshot().wp_faults, 2);
    }
}

#[test]
fn a_held_write_waits_until_unprotect() {
    let chunk = 16 * KIB;
    let src = VecSource::random(4 * chunk, 7);
    let (tx, rx) = std::sync::mpsc::channel();
    let hooks = Arc::new(Holding {
        hold_first: true,
        seen: Mutex::new(Vec::new()),
        tx: Mutex::new(tx),
    });
    let r = Arc::new(region(
        &src,
        Arc::clone(&hooks) as Arc<dyn FaultHooks>,
        protect_cfg(chunk, Backing::Anonymous),
    ));
    r.protect(0, 4 * chunk).unwrap();
    let writer = {
        let r = Arc::clone(&r);
        spawn(move || r.write_faulting(chunk + 3, b"held"))
    };
    assert_eq!(
        rx.recv_timeout(super::WAIT).unwrap(),
        1,
        "the hook saw chunk 1"
    );
    // The writer is held: the chunk still reads as the source's bytes.
    let mut got = [0u8; 4];
    r.read_at(chunk + 3, &mut got).unwrap();
    assert_eq!(got.as_slice(), &src.bytes(chunk + 3, 4)[..]);
    assert!(writer.try_recv().is_err(), "the write is still held");
    r.unprotect(chunk, 1).unwrap();
    join(&writer);
    r.read_at(chunk + 3, &mut got).unwrap();
    assert_eq!(&got, b"held");
    // Other chunks stay protected.
    r.write_faulting(3 * chunk, b"y");
    assert_eq!(rx.recv_timeout(super::WAIT).unwrap(), 3);
}

#[test]
fn protect_needs_the_protect_mode() {
    let src = VecSource::random(64 * KIB, 8);
    let r = region(&src, Arc::new(()), cfg(16 * KIB));
    assert_eq!(
        r.protect(0, 1).unwrap_err().kind(),
        std::io::ErrorKind::Unsupported
    );
}

fn dirty_cfg(chunk: usize, backing: Backing) -> RegionConfig {
    RegionConfig {
        backing,
        write_tracking: memsync_region::WriteTracking::Dirty,
        ..cfg(chunk)
    }
}

/// Dirty tracking needs Linux 6.7 (`WP_ASYNC`, `PAGEMAP_SCAN`).
fn wp_async() -> bool {
    let ok = memsync_sys::Uffd::probe_features()
        .is_ok_and(|f| f.contains(memsync_sys::Features::WP_ASYNC));
    if !ok {
        memsync_testkit::skip::kernel_feature("dirty tracking", "UFFD_FEATURE_WP_ASYNC", (6, 7));
    }
    ok
}

#[test]
fn dirty_chunks_reports_written_chunks_and_rearms() {
    if !wp_async() {
        return;
    }
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let chunk = 16 * KIB;
        let n = 16;
        let src = VecSource::random(n * chunk - 100, 9);
        let r = region(&src, Arc::new(()), dirty_cfg(chunk, backing));
        assert_eq!(
            r.dirty_chunks().unwrap(),
            vec![],
            "{backing:?}: clean at first"
        );
        // Fetching (reading) and placing leave chunks clean.
        let mut buf = vec![0u8; 3 * chunk];
        r.read_faulting(0, &mut buf);
        assert!(r.place(5, &vec![1; chunk]).unwrap());
        assert_eq!(
            r.dirty_chunks().unwrap(),
            vec![],
            "{backing:?}: fetched and placed are clean"
        );
        // Writes: through a fault of a missing chunk, and to present ones.
        r.write_faulting(chunk + 7, b"a");
        r.write_faulting(2 * chunk, b"b");
        r.write_at(5 * chunk + chunk - 1, b"c").unwrap();
        r.write_faulting(9 * chunk + 1, b"d");
        r.write_at(n * chunk - 101, b"e").unwrap();
        let len = r.len();
        assert_eq!(
            r.dirty_chunks().unwrap(),
            vec![
                chunk..3 * chunk,
                5 * chunk..6 * chunk,
                9 * chunk..10 * chunk,
                15 * chunk..len
            ],
            "{backing:?}"
        );
        assert_eq!(r.dirty_chunks().unwrap(), vec![], "{backing:?}: re-armed");
        r.write_faulting(2 * chunk + 100, b"f");
        assert_eq!(
            r.dirty_chunks().unwrap(),
            vec![2 * chunk..3 * chunk],
            "{backing:?}"
        );
    }
}

/// A tracker over a plain mapping: writer threads write random pages while
/// the test collects; every page written is reported by the collect that
/// follows its write (a shadow set of written pages must be covered).
#[test]
fn dirty_tracker_over_a_mapping_loses_no_write() {
    if !wp_async() {
        return;
    }
    use rand::{Rng, SeedableRng};
    let page = memsync_sys::page_size();
    let chunk = 4 * page;
    let len = 256 * page;
    let map = Arc::new(memsync_sys::Mapping::anonymous(len).unwrap());
    let t = memsync_region::DirtyTracker::new(&map, chunk).unwrap();
    assert_eq!(t.collect().unwrap(), vec![]);
    for round in 0..20u64 {
        let writers: Vec<_> = (0..2)
            .map(|k| {
                let map = Arc::clone(&map);
                spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(round * 2 + k);
                    let mut written = Vec::new();
                    for _ in 0..40 {
                        let p = rng.random_range(0..len / page);
                        map.write_at(p * page + rng.random_range(0..page), &[round as u8]);
                        written.push(p * page / chunk);
                    }
                    written
                })
            })
            .collect();
        let mut shadow = std::collections::BTreeSet::new();
        for w in &writers {
            shadow.extend(join(w));
        }
        let got = t.collect_bitmap().unwrap();
        for c in &shadow {
            assert!(
                got.get(*c),
                "round {round}: chunk {c} was written but not reported"
            );
        }
        assert_eq!(
            got.count(),
            shadow.len(),
            "round {round}: only written chunks"
        );
    }
    // Collects racing with writers: the union of the collects covers every
    // write (a write during a scan is reported by that scan or the next).
    let running = Arc::new(AtomicUsize::new(2));
    let writers: Vec<_> = (0..2)
        .map(|k| {
            let (map, running) = (Arc::clone(&map), Arc::clone(&running));
            spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(100 + k);
                let written: Vec<usize> = (0..5000)
                    .map(|_| {
                        let p = rng.random_range(0..len / page);
                        map.write_at(p * page, &[1]);
                        p * page / chunk
                    })
                    .collect();
                running.fetch_sub(1, Ordering::SeqCst);
                written
            })
        })
        .collect();
    let mut union = memsync_core::chunks::ChunkBitmap::new(len / chunk);
    loop {
        let last = running.load(Ordering::SeqCst) == 0;
        for c in t.collect_bitmap().unwrap().iter() {
            union.set(c);
        }
        if last {
            break;
        }
    }
    for w in &writers {
        for c in join(w) {
            assert!(union.get(c), "chunk {c} was written but never reported");
        }
    }
}

fn budget_cfg(chunk: usize, chunks: usize, backing: Backing) -> RegionConfig {
    RegionConfig {
        backing,
        budget: Some(chunks * chunk),
        ..cfg(chunk)
    }
}

/// Waits (bounded) until the evictor has brought the region within its
/// budget and finished the chunk it took: a chunk it is writing back is
/// `Dropping`, no longer resident, and its bytes reach the source only when
/// the write-back returns (checking the source before that raced the evictor
/// and failed about one run in three in the 6.12 guest of `kernel_matrix`).
fn settle(r: &LazyRegion, max: usize) {
    let until = std::time::Instant::now() + super::WAIT;
    let chunks = r.geometry().chunks();
    while r.resident_bytes() > max || (0..chunks).any(|i| r.chunk_state(i) == ChunkState::Dropping)
    {
        assert!(
            std::time::Instant::now() < until,
            "the evictor did not catch up"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn budget_evicts_clean_chunks_and_writes_dirty_ones_back() {
    for backing in [Backing::Anonymous, Backing::Memfd] {
        if !super::memfd_wp_supported(
            "budget_evicts_clean_chunks_and_writes_dirty_ones_back",
            backing,
        ) {
            continue;
        }
        let chunk = 16 * KIB;
        let n = 32;
        let src = VecSource::random(n * chunk, 10);
        let mut shadow = src.bytes(0, n * chunk);
        let r = region(&src, Arc::new(()), budget_cfg(chunk, 4, backing));
        // Every third chunk is written, the others only read.
        let mut buf = vec![0u8; chunk];
        for i in 0..n {
            if i % 3 == 0 {
                let data = vec![i as u8 ^ 0xa5; 100];
                r.write_at(i * chunk + 50, &data).unwrap();
                shadow[i * chunk + 50..i * chunk + 150].copy_from_slice(&data);
            } else {
                r.read_at(i * chunk, &mut buf).unwrap();
            }
        }
        settle(&r, 4 * chunk);
        let st = r.stats().snapshot();
        assert!(st.chunks_evicted >= (n - 4) as u64, "{backing:?}: {st}");
        assert!(st.chunks_written_back > 0, "{backing:?}: {st}");
        // Evicted dirty chunks reached the source; every chunk reads back
        // as written, resident or refetched.
        let mut all = vec![0u8; n * chunk];
        r.read_faulting(0, &mut all);
        assert!(all == shadow, "{backing:?}");
        r.set_budget(Some(chunk)).unwrap();
        settle(&r, chunk);
        r.evict(n).unwrap();
        assert_eq!(r.present_count(), 0, "{backing:?}");
        assert!(
            src.bytes(0, n * chunk) == shadow,
            "{backing:?}: the source has every write"
        );
    }
}

/// A hole punched into a written memfd chunk (`MADV_REMOVE` of one page) is repaired on its
/// next touch from the source, and the chunk's other written pages stay dirty: the repair
/// used to clear the chunk's dirty bit as a fetch does, so the evictor dropped it as clean
/// and the writes to its other pages were lost.
#[test]
fn budget_repair_of_a_hole_keeps_the_chunk_dirty() {
    if !super::memfd_wp_supported(
        "budget_repair_of_a_hole_keeps_the_chunk_dirty",
        Backing::Memfd,
    ) {
        return;
    }
    let chunk = 16 * KIB;
    let n = 4;
    let src = VecSource::random(n * chunk, 12);
    let mut shadow = src.bytes(0, n * chunk);
    let r = region(&src, Arc::new(()), budget_cfg(chunk, n, Backing::Memfd));
    r.write_faulting(8 * KIB, &[0x5a; 100]);
    shadow[8 * KIB..8 * KIB + 100].fill(0x5a);
    // The application discards the first page; its next touch refills it from the source.
    r.advise(0, 4 * KIB, memsync_region::Advice::Remove)
        .unwrap();
    let mut page = vec![0u8; 4 * KIB];
    r.read_faulting(0, &mut page);
    assert!(
        page == shadow[..4 * KIB],
        "the hole reads the source's bytes"
    );
    assert_eq!(r.evict(n).unwrap(), 1);
    assert!(
        src.bytes(0, n * chunk) == shadow,
        "the write to the chunk reached the source"
    );
    let mut all = vec![0u8; n * chunk];
    r.read_faulting(0, &mut all);
    assert!(all == shadow);
}

/// Writers and the evictor race on a budget of two chunks: no write is
/// lost (a shadow model of each writer's bytes, disjoint per writer).
#[test]
fn budget_eviction_loses_no_concurrent_write() {
    use rand::{Rng, SeedableRng};
    let chunk = 16 * KIB;
    let n = 16;
    let src = VecSource::random(n * chunk, 11);
    src.slow_writes.store(true, Ordering::Relaxed);
    let base = src.bytes(0, n * chunk);
    let r = Arc::new(region(
        &src,
        Arc::new(()),
        budget_cfg(chunk, 2, Backing::Anonymous),
    ));
    let mut shadow = base;
    for round in 0..8u64 {
        let writers: Vec<_> = (0..2usize)
            .map(|t| {
                let r = Arc::clone(&r);
                spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(round * 2 + t as u64);
                    let mut mine = Vec::new();
                    for k in 0..5_000u32 {
                        // Writer t owns the even or odd bytes of every chunk.
                        let off = rng.random_range(0..n * chunk / 2) * 2 + t;
                        let b = (k as u8).wrapping_mul(7) | 1;
                        r.write_faulting(off, &[b]);
                        mine.push((off, b));
                    }
                    mine
                })
            })
            .collect();
        for w in &writers {
            for (off, b) in join(w) {
                shadow[off] = b;
            }
        }
    }
    settle(&r, 2 * chunk);
    let mut all = vec![0u8; n * chunk];
    r.read_faulting(0, &mut all);
    let st = r.stats().snapshot();
    if let Some(p) = all.iter().zip(&shadow).position(|(a, b)| a != b) {
        panic!("byte {p} lost a write ({st})");
    }
    assert!(st.chunks_evicted > 0 && st.chunks_written_back > 0);
    r.evict(n).unwrap();
    assert!(
        src.bytes(0, n * chunk) == shadow,
        "the source has every write"
    );
}

/// Hooks that hold every write-protect fault and pass the chunk to a responder, which lifts
/// the protection as a driver would (the DSM after it obtained ownership).
#[derive(Debug)]
struct Relay(Mutex<std::sync::mpsc::Sender<usize>>);

impl FaultHooks for Relay {
    fn write_protect(&self, chunk: usize, _addr: usize) -> WpAction {
        let _ = self.0.lock().send(chunk);
        WpAction::Hold
    }
}

/// After `protect` returns, no write lands in the chunk until the driver lifts the
/// protection, even when a write fault raised before an earlier `unprotect` is handled late.
/// The handler used to lift the protection of a fault whose chunk it found unprotected
/// without excluding a `protect` in between: the driver copied the chunk after `protect`, and
/// writes landed after the copy (the DSM's shared counter lost increments).
#[test]
fn protect_is_never_lifted_by_a_stale_write_fault() {
    let page = 4 * KIB;
    let src = VecSource::random(2 * page, 21);
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = RegionConfig {
        handler_threads: 2,
        ..protect_cfg(page, Backing::Anonymous)
    };
    let r = Arc::new(region(
        &src,
        Arc::new(Relay(Mutex::new(tx))) as Arc<dyn FaultHooks>,
        cfg,
    ));
    r.write_faulting(0, &[0u8; 8]);
    r.protect(0, page).unwrap();
    // The driver's per-page lock: protect..copy and each lift are exclusive.
    let owner = Arc::new(Mutex::new(()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let responder = {
        let (r, owner, stop) = (Arc::clone(&r), Arc::clone(&owner), Arc::clone(&stop));
        spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if rx
                    .recv_timeout(std::time::Duration::from_millis(10))
                    .is_ok()
                {
                    let _g = owner.lock();
                    r.unprotect(0, page).unwrap();
                }
            }
            // Release held writers for good.
            r.unprotect(0, page).unwrap();
        })
    };
    // Several writers, so that faults queue behind the one being served and are handled
    // after its lift (stale).
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let (r, stop) = (Arc::clone(&r), Arc::clone(&stop));
            spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    r.atomic_u64(0).fetch_add(1, Ordering::SeqCst);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut rounds = 0;
    while t0.elapsed() < std::time::Duration::from_secs(2) {
        let _g = owner.lock();
        r.protect(0, page).unwrap();
        let before = r.atomic_u64(0).load(Ordering::SeqCst);
        for _ in 0..20 {
            std::thread::yield_now();
        }
        let after = r.atomic_u64(0).load(Ordering::SeqCst);
        assert_eq!(
            before, after,
            "a write landed in a protected chunk (round {rounds})"
        );
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.iter().map(join).sum();
    join(&responder);
    assert_eq!(r.atomic_u64(0).load(Ordering::SeqCst), writes);
    assert!(rounds > 0 && writes > 0, "{rounds} rounds, {writes} writes");
}
