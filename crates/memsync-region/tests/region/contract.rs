//! The engine contract suite, generic over [`ChunkSource`]: threads fault,
//! write, `place`, `invalidate`, `protect`/`unprotect` and collect dirty
//! chunks on one region of random data at once, beside the background
//! puller, and every byte read is checked against a shadow model.
//!
//! The shadow holds what each chunk must read as. Operations on one chunk
//! are serialised by a per-chunk lock of the test (so the shadow can follow
//! them), never by the engine: its handler threads and puller race with all
//! of them, which is what is under test (a fetch against a place, a
//! refetch after an invalidate, a write to a protected chunk, a write
//! during a dirty scan).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memsync_region::{
    Backing, ChunkSource, FaultHooks, LazyRegion, RegionConfig, WpAction, WriteTracking,
};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{KIB, join, spawn};

/// Makes a source holding `data`.
pub type MakeSource<S> = dyn Fn(&[u8]) -> Arc<S>;

#[derive(Debug, Default)]
struct WpCount(AtomicUsize);

impl FaultHooks for WpCount {
    fn write_protect(&self, _chunk: usize, _addr: usize) -> WpAction {
        self.0.fetch_add(1, Ordering::Relaxed);
        WpAction::Unprotect
    }
}

struct Shared {
    region: LazyRegion,
    source_bytes: Vec<u8>,
    shadow: Vec<Mutex<Vec<u8>>>,
    chunk: usize,
    /// Dirty scans started so far.
    scans: AtomicUsize,
    /// Writes still to be reported: (chunk, scans started before the write).
    writes: Mutex<Vec<(usize, usize)>>,
}

impl Shared {
    fn n(&self) -> usize {
        self.shadow.len()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        i * self.chunk..((i + 1) * self.chunk).min(self.region.len())
    }

    fn check(&self, i: usize, what: &str) {
        let s = self.shadow[i].lock();
        let r = self.range(i);
        let mut got = vec![0u8; r.len()];
        self.region.read_faulting(r.start, &mut got);
        if got != *s {
            let p = got.iter().zip(s.iter()).position(|(a, b)| a != b).unwrap();
            panic!("{what}: chunk {i} differs from the shadow at byte {p}");
        }
    }
}

/// One run of the suite: `make` builds a source holding random data;
/// `tracking` selects the protect or the dirty half.
pub fn run<S: ChunkSource>(
    name: &str,
    make: &MakeSource<S>,
    backing: Backing,
    tracking: WriteTracking,
    seed: u64,
) {
    let chunk = 16 * KIB;
    let n = 48;
    let len = n * chunk - 1000;
    let data = memsync_testkit::random_bytes(seed, len).to_vec();
    let hooks = Arc::new(WpCount::default());
    let region = LazyRegion::with_source(
        make(&data) as Arc<dyn ChunkSource>,
        Arc::clone(&hooks) as Arc<dyn FaultHooks>,
        RegionConfig {
            chunk_size: chunk,
            backing,
            write_tracking: tracking,
            // The puller races with everything.
            prefetch: true,
            pull_threads: 1,
            fetch_deadline: std::time::Duration::from_secs(10),
            ..RegionConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let shadow = (0..n)
        .map(|i| Mutex::new(data[i * chunk..((i + 1) * chunk).min(len)].to_vec()))
        .collect();
    let sh = Arc::new(Shared {
        region,
        source_bytes: data,
        shadow,
        chunk,
        scans: AtomicUsize::new(0),
        writes: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Workers: mixed operations on random chunks.
    let workers: Vec<_> = (0..3u64)
        .map(|t| {
            let sh = Arc::clone(&sh);
            let name = name.to_owned();
            spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed * 31 + t);
                let mut placed = 0;
                for _ in 0..600 {
                    let i = rng.random_range(0..sh.n());
                    let r = sh.range(i);
                    match rng.random_range(0..10) {
                        0..=3 => sh.check(i, &name),
                        4..=5 => {
                            let mut s = sh.shadow[i].lock();
                            let off = rng.random_range(0..r.len());
                            let b: u8 = rng.random();
                            let scans = sh.scans.load(Ordering::SeqCst);
                            sh.region.write_faulting(r.start + off, &[b]);
                            s[off] = b;
                            sh.writes.lock().push((i, scans));
                        }
                        6 => {
                            let mut s = sh.shadow[i].lock();
                            let bytes: Vec<u8> = (0..r.len()).map(|_| rng.random()).collect();
                            if sh.region.place(i, &bytes).unwrap() {
                                *s = bytes;
                                placed += 1;
                            }
                        }
                        7 => {
                            let mut s = sh.shadow[i].lock();
                            sh.region.invalidate(r.start, 1).unwrap();
                            s.copy_from_slice(&sh.source_bytes[r]);
                            // The chunk's writes are gone with its pages.
                            sh.writes.lock().retain(|&(c, _)| c != i);
                        }
                        _ if tracking == WriteTracking::Protect => {
                            let _s = sh.shadow[i].lock();
                            if rng.random() {
                                sh.region.protect(r.start, 1).unwrap();
                            } else {
                                sh.region.unprotect(r.start, 1).unwrap();
                            }
                        }
                        _ => sh.check(i, &name),
                    }
                }
                placed
            })
        })
        .collect();
    // The dirty half: a collector beside the workers. Every write must be
    // reported by the scan in progress when it started or a later one (the
    // last scan starts after every write ended).
    let collector = (tracking == WriteTracking::Dirty).then(|| {
        let (sh, stop) = (Arc::clone(&sh), Arc::clone(&stop));
        spawn(move || {
            let mut last_report = vec![0usize; sh.n()];
            loop {
                let last = stop.load(Ordering::SeqCst);
                let k = sh.scans.fetch_add(1, Ordering::SeqCst) + 1;
                let dirty = sh.region.dirty_tracker().unwrap().collect_bitmap().unwrap();
                for i in dirty.iter().filter(|&i| i < sh.n()) {
                    last_report[i] = k;
                }
                if last {
                    return last_report;
                }
            }
        })
    });
    let placed: usize = workers.iter().map(join).sum();
    stop.store(true, Ordering::SeqCst);
    if let Some(c) = collector {
        let last_report = join(&c);
        let writes = sh.writes.lock();
        let missed: BTreeSet<usize> = writes
            .iter()
            .filter(|&&(i, s)| last_report[i] < s)
            .map(|&(i, _)| i)
            .collect();
        assert!(
            missed.is_empty(),
            "{name}: writes to chunks {missed:?} were never reported dirty ({} writes)",
            writes.len()
        );
    }
    for i in 0..sh.n() {
        sh.check(i, name);
    }
    let st = sh.region.stats().snapshot();
    eprintln!(
        "{name}: placed {placed}, dropped {}, wp faults {}, hooks {} ({st})",
        st.chunks_dropped,
        st.wp_faults,
        hooks.0.load(Ordering::Relaxed)
    );
}
