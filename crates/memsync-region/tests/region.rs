//! Integration tests of lazy regions: integrity under concurrent access,
//! writes, zero ranges, chunk sizes, background pull, memfd sharing with a
//! second process, failing and slow stores, dropping, unprivileged use.
//!
//! Multi-process tests re-execute this test binary with `--exact NAME` and
//! an environment variable naming the child part. Every wait is bounded.

use memsync_testkit::child::{self, TempDir, describe};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memsync_core::layers::{Inject, InjectControl, InjectRule, OpSet};
use memsync_core::{Bytes, Store};
use memsync_local::MemStore;
use memsync_region::{
    Advice, Backing, ChunkMap, ChunkState, FollowFaults, Geometry, LazyRegion, PullPriority,
    PullView, RegionConfig, Sequential,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "region/contract.rs"]
mod contract;
#[path = "region/engine.rs"]
mod engine;
#[path = "region/shared.rs"]
mod shared;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(30);
const CHILD_ENV: &str = "MEMSYNC_REGION_CHILD";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A mem: store of `size` bytes: random content, except the chunks of
/// `zero_every` (every n-th 64 KiB piece is left unwritten = a hole).
fn random_store(size: usize, seed: u64, zero_every: Option<usize>) -> (Arc<MemStore>, Vec<u8>) {
    let mut data = memsync_testkit::random_bytes(seed, size).to_vec();
    let store = Arc::new(MemStore::new(size as u64));
    let piece = 64 * KIB;
    rt().block_on(async {
        for (k, start) in (0..size).step_by(piece).enumerate() {
            let end = (start + piece).min(size);
            if zero_every.is_some_and(|n| k % n == 0) {
                data[start..end].fill(0);
                continue;
            }
            store
                .write(start as u64, Bytes::copy_from_slice(&data[start..end]))
                .await
                .unwrap();
        }
    });
    (store, data)
}

fn cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        chunk_size: chunk,
        prefetch: false,
        fetch_deadline: Duration::from_secs(10),
        ..RegionConfig::default()
    }
}

/// Runs `f` on a new thread; its result arrives on the returned channel.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

fn join<T>(rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(WAIT)
        .expect("thread did not finish in time (or panicked)")
}

fn assert_same(region: &LazyRegion, data: &[u8]) {
    let mut got = vec![0u8; data.len()];
    region.read_at(0, &mut got).unwrap();
    if got != data {
        let first = got.iter().zip(data).position(|(a, b)| a != b).unwrap();
        panic!("region differs from the expected data first at byte {first}");
    }
}

fn is_child(name: &str) -> bool {
    child::is_child(CHILD_ENV, name)
}

/// Re-executes `exe` running only `test` as the child part `test`, with a
/// bounded wait.
fn run_child(exe: &Path, test: &str, setup: impl FnOnce(&mut Command)) -> Output {
    child::run_test_binary(exe, test, WAIT, |cmd| {
        cmd.env(CHILD_ENV, test);
        setup(cmd);
    })
}

// ---------------------------------------------------------------------------
// Integrity
// ---------------------------------------------------------------------------

/// Many threads read random ranges, half through the fault path and half
/// through the inline path; every byte is compared, then the whole region.
fn integrity(chunk: usize, size: usize, threads: usize, reads: usize) {
    let (store, data) = random_store(size, chunk as u64, None);
    let region = Arc::new(LazyRegion::new(store, cfg(chunk)).unwrap());
    let data = Arc::new(data);
    let rxs: Vec<_> = (0..threads)
        .map(|t| {
            let (region, data) = (Arc::clone(&region), Arc::clone(&data));
            spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t as u64);
                for k in 0..reads {
                    let len = rng.random_range(1..=3 * chunk.min(64 * KIB));
                    let off = rng.random_range(0..size - len);
                    let mut buf = vec![0u8; len];
                    if k % 2 == 0 {
                        region.read_faulting(off, &mut buf);
                    } else {
                        region.read_at(off, &mut buf).unwrap();
                    }
                    assert!(
                        buf == data[off..off + len],
                        "thread {t} read {k}: {off}+{len} differs"
                    );
                }
            })
        })
        .collect();
    for rx in &rxs {
        join(rx);
    }
    assert_same(&region, &data);
    assert!(region.is_complete());
    let s = region.stats().snapshot();
    assert!(s.faults > 0, "{s}");
    assert_eq!(s.chunks_poisoned, 0);
    assert_eq!(
        s.chunks_fault + s.chunks_inline + s.chunks_background,
        region.geometry().chunks() as u64,
        "{s}"
    );
    eprintln!("chunk {chunk}: {s}");
}

#[test]
fn integrity_4k_chunks() {
    // An odd size: a short last chunk and a partial last page.
    integrity(4 * KIB, 8 * MIB + 12345, 6, 300);
}

#[test]
fn integrity_64k_chunks() {
    integrity(64 * KIB, 24 * MIB + 4096 + 7, 6, 300);
}

#[test]
fn integrity_2m_chunks() {
    integrity(2 * MIB, 64 * MIB + 100_000, 6, 200);
}

#[test]
fn copy_install_without_move_is_identical() {
    let (store, data) = random_store(8 * MIB + 5000, 77, Some(5));
    let region = LazyRegion::new(
        store,
        RegionConfig {
            use_move: false,
            ..cfg(64 * KIB)
        },
    )
    .unwrap();
    let mut buf = vec![0u8; data.len()];
    region.read_faulting(0, &mut buf);
    assert!(buf == data);
    let s = region.stats().snapshot();
    assert_eq!(s.installs_move, 0, "{s}");
    assert!(s.installs_copy > 0, "{s}");
}

/// One-page chunks are copied even where the kernel could move them: a move flushes the staging
/// page's TLB entry on the other CPUs, which costs more than copying 4 KiB. Larger chunks are
/// still moved (`kernel_features_are_detected_and_fall_back`).
#[test]
fn one_page_chunks_are_copied_not_moved() {
    let (store, data) = random_store(MIB + 5000, 79, Some(5));
    let region = LazyRegion::new(store, cfg(4 * KIB)).unwrap();
    let mut buf = vec![0u8; data.len()];
    region.read_faulting(0, &mut buf);
    assert!(buf == data);
    let s = region.stats().snapshot();
    assert_eq!(s.installs_move, 0, "{s}");
    assert!(s.installs_copy > 0, "{s}");
}

/// The features an LTS kernel lacks are detected at run time and each has its fallback, with
/// the default configuration: no `UFFDIO_MOVE` (6.8) → chunks are installed with
/// `UFFDIO_COPY`; no `UFFDIO_POISON` (6.6) → a failed chunk becomes a SIGBUS mapping
/// (`failing_store_raises_sigbus` and `poisoned_chunk_raises_sigbus_after_dontneed` then take
/// that path); no `WP_ASYNC` (6.7) → `WriteTracking::Dirty` is refused with the reason, so that
/// a caller can track by hashing instead. On a kernel that has them, they are used. The kernel
/// matrix runs this on 6.1 and 6.12 (`kernel_matrix`).
#[test]
fn kernel_features_are_detected_and_fall_back() {
    use memsync_sys::Features;
    let kernel = memsync_sys::Uffd::probe_features().unwrap();
    eprintln!(
        "kernel {:?}: {kernel:?}",
        memsync_testkit::skip::kernel_version()
    );

    let (store, data) = random_store(4 * MIB, 81, Some(5));
    let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
    let mut buf = vec![0u8; data.len()];
    region.read_faulting(0, &mut buf);
    assert!(buf == data);
    let s = region.stats().snapshot();
    if kernel.contains(Features::MOVE) {
        assert!(
            s.installs_move > 0,
            "MOVE is used where the kernel has it: {s}"
        );
    } else {
        assert_eq!(s.installs_move, 0, "{s}");
        assert!(s.installs_copy > 0, "COPY instead of MOVE: {s}");
    }

    let (region, _) = region_failing(MIB, 82, Some(2), cfg(64 * KIB));
    assert_eq!(region.uses_poison(), kernel.contains(Features::POISON));
    let mut b = [0u8; 1];
    let err = region.read_at(2 * 64 * KIB, &mut b).unwrap_err();
    assert!(err.poisoned, "{err}");
    region.read_at(0, &mut b).unwrap();

    let (store, _) = random_store(MIB, 83, None);
    let dirty = LazyRegion::new(
        store,
        RegionConfig {
            write_tracking: memsync_region::WriteTracking::Dirty,
            ..cfg(64 * KIB)
        },
    );
    match dirty {
        Ok(r) => {
            assert!(kernel.contains(Features::WP_ASYNC));
            r.write_at(5, b"x").unwrap();
            assert_eq!(r.dirty_chunks().unwrap(), vec![0..64 * KIB]);
        }
        Err(e) => {
            assert!(!kernel.contains(Features::WP_ASYNC), "{e}");
            assert!(e.to_string().contains("WP_ASYNC"), "{e}");
        }
    }
}

/// The tests of the kernel features and their fallbacks, inside guests of Debian 12's kernels
/// (6.1 LTS: no MOVE, POISON, WP_ASYNC, CONTINUE_MODE_WP; 6.12: all of them). One boot per
/// kernel (a test each, so that the two guests can run side by side) runs this test binary
/// with a selection: faults and integrity, background pull, failed chunks (POISON or the
/// SIGBUS mapping), memfd, write protection, the engine.
fn kernel_matrix(name: &str) {
    use memsync_testkit::vm;
    if vm::in_guest() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let test = format!("kernel_matrix_{}", name.replace('.', "_"));
    let Some(kernel) = vm::Kernel::debian(name, &test) else {
        return;
    };
    let out = vm::run_test_binary(
        &kernel,
        &exe,
        &[
            "kernel_features_are_detected_and_fall_back",
            "integrity_64k_chunks",
            "copy_install_without_move_is_identical",
            "background_pull_fills_everything",
            "failing_store",
            "sigbus",
            "poison",
            "memfd",
            "engine::",
            "contract_protect_over_sources",
            "contract_dirty_over_sources",
            "zero_ranges_are_installed_without_reading",
        ],
        Duration::from_secs(400),
    );
    if kernel.version() < (6, 4) {
        for refused in ["refused as expected", "predates UFFD_FEATURE_WP_ASYNC"] {
            assert!(
                out.output.contains(refused),
                "{name}: lacks {refused:?}:\n{}",
                out.output
            );
        }
    }
}

#[test]
fn kernel_matrix_6_1() {
    kernel_matrix("6.1");
}

#[test]
fn kernel_matrix_6_12() {
    kernel_matrix("6.12");
}

/// Each thread writes its own stripe (through faults and the inline path)
/// and reads random ranges everywhere; a shadow copy is compared at the end.
#[test]
fn mixed_reads_and_writes() {
    let size = 16 * MIB;
    let chunk = 64 * KIB;
    let (store, data) = random_store(size, 9, Some(7));
    let region = Arc::new(LazyRegion::new(store, cfg(chunk)).unwrap());
    let threads = 4;
    let stripe = size / threads;
    let rxs: Vec<_> = (0..threads)
        .map(|t| {
            let region = Arc::clone(&region);
            let mut shadow = data[t * stripe..(t + 1) * stripe].to_vec();
            spawn(move || {
                let mut rng = SmallRng::seed_from_u64(100 + t as u64);
                for k in 0..300 {
                    let len = rng.random_range(1..=100 * KIB);
                    let off = rng.random_range(0..stripe - len);
                    let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    if k % 2 == 0 {
                        region.write_faulting(t * stripe + off, &bytes);
                    } else {
                        region.write_at(t * stripe + off, &bytes).unwrap();
                    }
                    shadow[off..off + len].copy_from_slice(&bytes);
                    let roff = rng.random_range(0..stripe - 4096);
                    let mut back = vec![0u8; 4096];
                    region.read_faulting(t * stripe + roff, &mut back);
                    assert!(back == shadow[roff..roff + 4096], "thread {t} op {k}");
                }
                shadow
            })
        })
        .collect();
    let mut expected = Vec::with_capacity(size);
    for rx in &rxs {
        expected.extend_from_slice(&join(rx));
    }
    assert_same(&region, &expected);
}

#[test]
fn zero_ranges_are_installed_without_reading() {
    let size = 32 * MIB;
    // Every other 64 KiB piece is a hole; whole 128 KiB... chunks of 64 KiB
    // alternate between data and holes.
    let (store, data) = random_store(size, 5, Some(2));
    let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
    let mut buf = vec![0u8; size];
    region.read_faulting(0, &mut buf);
    assert!(buf == data);
    let s = region.stats().snapshot();
    let chunks = (size / (64 * KIB)) as u64;
    assert_eq!(s.chunks_zero, chunks / 2, "{s}");
    assert_eq!(s.bytes_fetched, (size / 2) as u64, "{s}");
    // A zero chunk is writable afterwards.
    region.write_at(10, b"written").unwrap();
    let mut back = [0u8; 7];
    region.read_at(10, &mut back).unwrap();
    assert_eq!(&back, b"written");
}

#[test]
fn concurrent_faults_on_one_chunk_fetch_once() {
    let (store, data) = random_store(4 * MIB, 3, None);
    let fault = Inject::new(store);
    let control = fault.control();
    control.set_delay(OpSet::READ, Duration::from_millis(50));
    let region = Arc::new(LazyRegion::new(Arc::new(fault), cfg(2 * MIB)).unwrap());
    let rxs: Vec<_> = (0..8)
        .map(|t| {
            let region = Arc::clone(&region);
            spawn(move || {
                let mut b = vec![0u8; 64];
                region.read_faulting(t * 4096 * 3, &mut b);
                b
            })
        })
        .collect();
    for (t, rx) in rxs.iter().enumerate() {
        assert_eq!(join(rx), data[t * 4096 * 3..t * 4096 * 3 + 64]);
    }
    // The waiters are woken by the install, just before the fetcher counts it.
    let t = Instant::now();
    while region.stats().snapshot().chunks_fault == 0 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = region.stats().snapshot();
    assert_eq!(s.chunks_fault, 1, "one fetch for one chunk: {s}");
    assert_eq!(s.bytes_fetched, 2 * MIB as u64, "{s}");
}

#[test]
fn present_chunks_bitmap_tracks_touches() {
    let (store, data) = random_store(8 * MIB, 4, None);
    let region = LazyRegion::new(store, cfg(MIB)).unwrap();
    assert_eq!(region.present_count(), 0);
    let mut b = [0u8; 1];
    region.read_faulting(3 * MIB + 5, &mut b);
    assert_eq!(b[0], data[3 * MIB + 5]);
    region.write_faulting(6 * MIB, &[1]);
    let bm = region.present_chunks();
    assert_eq!(bm.iter().collect::<Vec<_>>(), [3, 6]);
    assert_eq!(region.chunk_state(3), ChunkState::Present);
    assert_eq!(region.chunk_state(0), ChunkState::Absent);
    // The rest of a written chunk keeps the store's data.
    let mut rest = vec![0u8; MIB - 1];
    region.read_at(6 * MIB + 1, &mut rest).unwrap();
    assert!(rest == data[6 * MIB + 1..7 * MIB]);
}

#[test]
fn dontneed_refetches_from_the_store() {
    let (store, data) = random_store(4 * MIB, 6, None);
    let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
    region.write_at(0, &[0xEE; 8192]).unwrap();
    let mut b = [0u8; 4];
    region.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0xEE; 4]);
    // Drop the first page only: the chunk is refetched; the dropped page
    // gets the store's data back, the second page keeps the local write.
    region.advise(0, 4096, Advice::DontNeed).unwrap();
    let mut page = vec![0u8; 8192];
    region.read_faulting(0, &mut page);
    assert!(page[..4096] == data[..4096], "dropped page refetched");
    assert_eq!(
        &page[4096..],
        &[0xEE; 4096],
        "other pages keep local writes"
    );
    let s = region.stats().snapshot();
    assert_eq!(s.removes, 1, "{s}");
}

// ---------------------------------------------------------------------------
// Background pull
// ---------------------------------------------------------------------------

#[test]
fn background_pull_fills_everything() {
    let (store, data) = random_store(32 * MIB + 999, 11, Some(9));
    let region = LazyRegion::new(
        store,
        RegionConfig {
            prefetch: true,
            ..cfg(2 * MIB)
        },
    )
    .unwrap();
    assert!(region.wait_pull(WAIT), "{:?}", region.progress());
    let p = region.progress();
    assert!(p.done && p.present_chunks == p.chunks, "{p:?}");
    let faults_before = region.stats().snapshot().faults;
    let mut buf = vec![0u8; data.len()];
    region.read_faulting(0, &mut buf);
    assert!(buf == data);
    assert_eq!(
        region.stats().snapshot().faults,
        faults_before,
        "no fault after a complete pull"
    );
    assert!(region.stats().snapshot().bytes_background > 0);
}

#[test]
fn background_pull_pause_resume_and_restart() {
    let (store, data) = random_store(16 * MIB, 12, None);
    let fault = Inject::new(store);
    let control = fault.control();
    let region = LazyRegion::new(Arc::new(fault), cfg(256 * KIB)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(region.progress().pulled_chunks, 0, "not started");
    // Both pullers stall in their first read; pausing lets those finish and
    // starts nothing after them.
    control.stall(OpSet::READ, None);
    region.start_pull();
    rt().block_on(control.wait_stalled(2));
    region.pause_pull();
    control.release_stalls();
    let t = Instant::now();
    while region.progress().pulled_chunks < 2 {
        assert!(t.elapsed() < WAIT, "{:?}", region.progress());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!region.wait_pull(Duration::from_millis(100)));
    assert_eq!(region.progress().pulled_chunks, 2, "paused");
    assert!(!region.progress().running);
    region.resume_pull();
    assert!(region.wait_pull(WAIT));
    assert!(region.is_complete());
    assert_same(&region, &data);
    // A restart after completion finds nothing left to pull.
    region.start_pull();
    assert!(region.wait_pull(WAIT));
    assert_eq!(
        region.progress().pulled_chunks,
        region.geometry().chunks() as u64
    );
}

/// Faults are served while the puller is stuck in a store read, and a fault
/// on the chunk the puller is fetching waits for that fetch.
#[test]
fn faults_do_not_wait_behind_background_pull() {
    let (store, data) = random_store(16 * MIB, 13, None);
    let fault = Inject::new(store);
    let control = fault.control();
    // The puller's first chunk stalls until released.
    control.add_rule(InjectRule::stall(OpSet::READ).in_range(0..1));
    let region = Arc::new(
        LazyRegion::new(
            Arc::new(fault),
            RegionConfig {
                prefetch: true,
                pull_threads: 1,
                ..cfg(MIB)
            },
        )
        .unwrap(),
    );
    rt().block_on(control.wait_stalled(1));
    assert_eq!(
        region.chunk_state(0),
        ChunkState::Fetching,
        "the puller is stuck on chunk 0"
    );
    let other = {
        let region = Arc::clone(&region);
        spawn(move || {
            let mut b = vec![0u8; 100];
            region.read_faulting(9 * MIB, &mut b);
            b
        })
    };
    assert!(join(&other) == data[9 * MIB..9 * MIB + 100]);
    assert_eq!(control.stalled(), 1, "served while the puller is stuck");
    // A fault on chunk 0 waits for the puller's fetch (no second read).
    let same = {
        let region = Arc::clone(&region);
        spawn(move || {
            let mut b = vec![0u8; 100];
            region.read_faulting(5, &mut b);
            b
        })
    };
    let t = Instant::now();
    while region.stats().snapshot().faults_waited == 0 {
        assert!(t.elapsed() < WAIT, "{}", region.stats().snapshot());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(same.try_recv().is_err(), "waits for the stalled fetch");
    control.release_stalls();
    assert!(join(&same) == data[5..105]);
    assert!(region.wait_pull(WAIT));
    assert_same(&region, &data);
    let s = region.stats().snapshot();
    assert_eq!(s.chunks_fault, 1, "only chunk 9 came through a fault: {s}");
}

#[derive(Debug, Default)]
struct Reverse;

impl PullPriority for Reverse {
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
        (0..view.chunk_count()).rev().find(|&i| view.wanted(i))
    }
}

#[test]
fn custom_priority_is_used() {
    let (store, data) = random_store(8 * MIB, 14, None);
    let fault = Inject::new(store);
    let control = fault.control();
    // The puller's first read stalls: it shows which chunk it chose first.
    control.add_rule(InjectRule::stall(OpSet::READ).times(1));
    let region = LazyRegion::new(
        Arc::new(fault),
        RegionConfig {
            prefetch: true,
            priority: Box::new(Reverse),
            pull_threads: 1,
            ..cfg(MIB)
        },
    )
    .unwrap();
    rt().block_on(control.wait_stalled(1));
    let states: Vec<ChunkState> = (0..8).map(|i| region.chunk_state(i)).collect();
    assert_eq!(
        states,
        [[ChunkState::Absent; 7].as_slice(), &[ChunkState::Fetching]].concat()
    );
    control.release_stalls();
    assert!(region.wait_pull(WAIT));
    assert_same(&region, &data);
}

#[test]
fn follow_faults_and_sequential_orders() {
    let map = ChunkMap::new(10);
    let skip = vec![false; 10];
    let mut seq = Sequential::default();
    let mut ff = FollowFaults::default();
    let v = PullView::new(&map, &skip, None);
    assert_eq!(seq.next_chunk(&v), Some(0));
    assert_eq!(ff.next_chunk(&v), Some(0));
    map.try_claim(0).unwrap();
    assert!(map.finish(0));
    // A fault on chunk 6: FollowFaults continues at 7, Sequential at 1.
    map.try_claim(6).unwrap();
    let v = PullView::new(&map, &skip, Some(6));
    assert_eq!(ff.next_chunk(&v), Some(7));
    assert_eq!(seq.next_chunk(&v), Some(1));
    // ...then wraps around to what it skipped.
    for i in [8, 9] {
        assert_eq!(ff.next_chunk(&v), Some(i));
        map.try_claim(i).unwrap();
    }
    assert_eq!(ff.next_chunk(&v), Some(1));
    let all_skipped = vec![true; 10];
    assert_eq!(
        seq.next_chunk(&PullView::new(&map, &all_skipped, None)),
        None
    );
}

// ---------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------

/// A region of `size` random bytes (`seed`) built with `cfg` whose store
/// fails every read of chunk `bad` (every chunk: `None`); a fetch gives up
/// after 200 ms.
fn region_failing(
    size: usize,
    seed: u64,
    bad: Option<usize>,
    cfg: RegionConfig,
) -> (LazyRegion, Vec<u8>) {
    let (store, data) = random_store(size, seed, Some(7));
    let fault = Inject::new(store);
    match bad {
        Some(c) => fault
            .control()
            .fail_range(OpSet::READ, chunk_range(c, cfg.chunk_size)),
        None => fault.control().fail_always(OpSet::READ),
    };
    let region = LazyRegion::new(
        Arc::new(fault),
        RegionConfig {
            fetch_deadline: Duration::from_millis(200),
            retry_backoff: Duration::from_millis(5),
            ..cfg
        },
    )
    .unwrap();
    (region, data)
}

fn without_poison(chunk: usize) -> RegionConfig {
    RegionConfig {
        use_poison: false,
        ..cfg(chunk)
    }
}

/// Runs the child part `name` of this test binary and asserts that it died
/// of SIGBUS after printing `marker`.
fn assert_child_dies_of_sigbus(name: &str, marker: &str) {
    let out = run_child(&std::env::current_exe().unwrap(), name, |_| {});
    assert_eq!(
        out.status.signal(),
        Some(7 /* SIGBUS */),
        "{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(marker),
        "{}",
        describe(&out)
    );
}

#[test]
fn failing_store_reports_errors_through_the_api() {
    let (region, data) = region_failing(4 * MIB, 16, Some(1), cfg(MIB));
    let t = Instant::now();
    let mut b = [0u8; 8];
    let err = region.read_at(MIB + 10, &mut b).unwrap_err();
    // The 200 ms deadline, with a margin scheduling noise cannot use up.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(err.chunk, 1);
    assert!(err.poisoned && err.attempts > 1, "{err}");
    assert!(err.message.contains("injected"), "{err}");
    assert_eq!(region.last_error().unwrap().chunk, 1);
    assert_eq!(region.chunk_state(1), ChunkState::Poisoned);
    // Again: reported at once, without touching the poisoned pages.
    assert!(region.read_at(MIB, &mut b).is_err());
    // Other chunks are fine.
    region.read_at(3 * MIB, &mut b).unwrap();
    assert_eq!(b, data[3 * MIB..3 * MIB + 8]);
    let s = region.stats().snapshot();
    assert_eq!(s.chunks_poisoned, 1, "{s}");
    assert!(s.store_errors >= 2, "{s}");
}

/// The faulting access of a failing store gets SIGBUS in bounded time.
#[test]
fn failing_store_raises_sigbus() {
    const NAME: &str = "failing_store_raises_sigbus";
    if is_child(NAME) {
        let (region, _) = region_failing(4 * MIB, 17, None, cfg(64 * KIB));
        let mut b = [0u8; 1];
        eprintln!("child: touching");
        region.read_faulting(100 * KIB, &mut b);
        eprintln!("child: the access returned {b:?} instead of raising SIGBUS");
        std::process::exit(3);
    }
    let t = Instant::now();
    assert_child_dies_of_sigbus(NAME, "child: touching");
    // The 200 ms deadline plus a child process's start, with a wide margin.
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

/// A poisoned chunk still raises SIGBUS after `MADV_DONTNEED` dropped its
/// pages (which removes poison markers), instead of faulting forever.
#[test]
fn poisoned_chunk_raises_sigbus_after_dontneed() {
    const NAME: &str = "poisoned_chunk_raises_sigbus_after_dontneed";
    let chunk = 64 * KIB;
    if is_child(NAME) {
        let (region, _) = region_failing(MIB, 30, Some(1), cfg(chunk));
        let mut b = [0u8; 1];
        assert!(region.read_at(chunk, &mut b).unwrap_err().poisoned);
        region.advise(chunk, chunk, Advice::DontNeed).unwrap();
        eprintln!("child: dropped; touching");
        region.read_faulting(chunk + 4096, &mut b);
        eprintln!("child: the access returned {b:?} instead of raising SIGBUS");
        std::process::exit(3);
    }
    assert_child_dies_of_sigbus(NAME, "dropped; touching");
}

/// Without `UFFDIO_POISON` (forced here; kernels before 6.6 have none), a
/// chunk the store cannot deliver raises SIGBUS in the threads faulting on
/// it once the deadline has passed, instead of faulting again forever, and
/// the chunks around it still serve their data.
#[test]
fn failing_store_raises_sigbus_without_poison() {
    const NAME: &str = "failing_store_raises_sigbus_without_poison";
    let chunk = 64 * KIB;
    if is_child(NAME) {
        let (region, data) = region_failing(4 * MIB, 23, Some(5), without_poison(chunk));
        let region = Arc::new(region);
        assert!(!region.uses_poison());
        let mut buf = vec![0u8; chunk];
        for c in [4, 6] {
            region.read_faulting(c * chunk, &mut buf);
            assert!(buf == data[c * chunk..(c + 1) * chunk], "chunk {c}");
        }
        eprintln!("child: neighbours ok; touching the failing chunk");
        let rxs: Vec<_> = (0..3)
            .map(|t| {
                let region = Arc::clone(&region);
                spawn(move || region.read_faulting(5 * chunk + t * 4096 + 7, &mut [0u8; 1]))
            })
            .collect();
        for rx in &rxs {
            join(rx);
        }
        eprintln!("child: the accesses returned instead of raising SIGBUS");
        std::process::exit(3);
    }
    assert_child_dies_of_sigbus(NAME, "neighbours ok");
}

/// Without `UFFDIO_POISON`, a failed chunk is reported as poisoned only once
/// its range really raises SIGBUS (it was replaced), later calls report it
/// at once, and every other chunk still comes in through faults (the
/// replacement split the registered range) and through `read_at`; on
/// anonymous and on memfd memory.
#[test]
fn failed_chunk_without_poison_is_reported_and_the_rest_serves() {
    let chunk = 64 * KIB;
    let size = 4 * MIB;
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let (region, data) = region_failing(
            size,
            24,
            Some(5),
            RegionConfig {
                backing,
                ..without_poison(chunk)
            },
        );
        let mut b = [0u8; 8];
        let err = region.read_at(5 * chunk + 10, &mut b).unwrap_err();
        assert_eq!(err.chunk, 5);
        assert!(err.poisoned && err.attempts > 1, "{backing:?}: {err}");
        assert_eq!(region.chunk_state(5), ChunkState::Poisoned);
        assert!(region.read_at(5 * chunk, &mut b).unwrap_err().poisoned);
        let mut buf = vec![0u8; chunk];
        for c in (0..size / chunk).filter(|&c| c != 5) {
            if c % 2 == 0 {
                region.read_faulting(c * chunk, &mut buf);
            } else {
                region.read_at(c * chunk, &mut buf).unwrap();
            }
            assert!(
                buf == data[c * chunk..(c + 1) * chunk],
                "{backing:?}: chunk {c}"
            );
        }
        let s = region.stats().snapshot();
        assert_eq!(s.chunks_poisoned, 1, "{backing:?}: {s}");
        assert_eq!(region.present_count(), size / chunk - 1);
    }
    // hugetlb memory, in chunks of one huge page.
    let hpage = memsync_sys_pmd();
    let _pages = match memsync_testkit::hugepages::HugePages::reserve(4) {
        Ok(g) => g,
        Err(why) => {
            memsync_testkit::skip::skip(
                "failed_chunk_without_poison_is_reported_and_the_rest_serves (hugetlb part)",
                &why,
            );
            return;
        }
    };
    let (region, data) = region_failing(
        4 * hpage,
        25,
        Some(1),
        RegionConfig {
            backing: Backing::Hugetlb,
            ..without_poison(hpage)
        },
    );
    assert!(
        region
            .read_at(hpage + 3, &mut [0u8; 1])
            .unwrap_err()
            .poisoned
    );
    let mut buf = vec![0u8; hpage];
    for c in [0, 2, 3] {
        region.read_faulting(c * hpage, &mut buf);
        assert!(
            buf == data[c * hpage..(c + 1) * hpage],
            "hugetlb: chunk {c}"
        );
    }
}

/// A child created by `fork()` never takes the region's missing chunks for
/// zeros (it would: the child does not inherit the userfaultfd
/// registration): the region is not inherited at all, so the child's access
/// fails, whether the chunk was fetched or not. The parent is unaffected.
#[test]
fn forked_child_does_not_read_missing_chunks_as_zeros() {
    const EFAULT: i32 = 14;
    let (store, data) = random_store(4 * MIB, 25, None);
    let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
    let mut buf = vec![0u8; 4096];
    region.read_at(0, &mut buf).unwrap();
    for off in [MIB, 0] {
        match memsync_sys::read_after_fork(region.addr() + off, 4096, WAIT) {
            Ok(got) => panic!(
                "the child read the region at {off} ({}: {})",
                if got.iter().all(|&x| x == 0) {
                    "zeros"
                } else {
                    "data"
                },
                region.chunk_state(off / (64 * KIB)) == ChunkState::Present
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(EFAULT), "{e}"),
        }
    }
    region.read_faulting(MIB, &mut buf);
    assert!(buf == data[MIB..MIB + 4096]);
}

/// Installs that meet a pending `MADV_DONTNEED` (EAGAIN) read the pending
/// events, faults of other threads included. Faults read that way by an
/// inline fetch or by the background puller are served, not dropped: the
/// faulting thread here touches only chunks that nothing else fetches.
#[test]
fn faults_read_by_inline_and_background_fetches_are_served() {
    #[derive(Debug)]
    struct EvenOnly;
    impl PullPriority for EvenOnly {
        fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
            (0..view.chunk_count()).step_by(2).find(|&i| view.wanted(i))
        }
    }
    let chunk = 4 * KIB;
    let size = 32 * MIB;
    let (store, data) = random_store(size, 26, None);
    let region = Arc::new(
        LazyRegion::new(
            store,
            RegionConfig {
                prefetch: true,
                priority: Box::new(EvenOnly),
                ..cfg(chunk)
            },
        )
        .unwrap(),
    );
    let data = Arc::new(data);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chunks = size / chunk;
    let dropper = {
        let (region, stop) = (Arc::clone(&region), Arc::clone(&stop));
        spawn(move || {
            let mut rng = SmallRng::seed_from_u64(1);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = 2 * rng.random_range(0..chunks / 2);
                region.advise(c * chunk, chunk, Advice::DontNeed).unwrap();
            }
        })
    };
    let inline = {
        let (region, stop, data) = (Arc::clone(&region), Arc::clone(&stop), Arc::clone(&data));
        spawn(move || {
            let mut rng = SmallRng::seed_from_u64(2);
            let mut b = [0u8; 16];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = 2 * rng.random_range(0..chunks / 2) * chunk + 100;
                region.read_at(off, &mut b).unwrap();
                assert!(b == data[off..off + 16]);
            }
        })
    };
    let faulter = {
        let (region, data) = (Arc::clone(&region), Arc::clone(&data));
        spawn(move || {
            let mut b = [0u8; 16];
            // 64 odd chunks (each touch waits behind the others' events).
            for c in (1..chunks).step_by(128) {
                let off = c * chunk + 200;
                region.read_faulting(off, &mut b);
                assert!(b == data[off..off + 16], "chunk {c}");
            }
        })
    };
    let served = faulter.recv_timeout(WAIT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    join(&dropper);
    join(&inline);
    assert!(
        served.is_ok(),
        "a fault was never served: {}",
        region.stats().snapshot()
    );
}

/// Runs `f` on a new thread and returns once that thread waits in
/// userfaultfd (`f` faults, or drops pages and waits for the event to be read).
fn spawn_blocked<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tid_tx, tid_rx) = mpsc::channel();
    let rx = spawn(move || {
        tid_tx.send(memsync_sys::gettid()).unwrap();
        f()
    });
    memsync_testkit::uffd::wait_in_userfault(tid_rx.recv_timeout(WAIT).unwrap(), WAIT);
    rx
}

fn touch(region: &Arc<LazyRegion>, off: usize) -> impl FnOnce() -> u8 + Send + 'static {
    let region = Arc::clone(region);
    move || {
        let mut b = [0u8; 1];
        region.read_faulting(off, &mut b);
        b[0]
    }
}

/// Drops the first `len` bytes of `region` (`MADV_DONTNEED`) on a new
/// thread and returns once that thread waits for its event to be read.
fn drop_pages_pending(region: &Arc<LazyRegion>, len: usize) -> mpsc::Receiver<()> {
    let region = Arc::clone(region);
    spawn_blocked(move || region.advise(0, len, Advice::DontNeed).unwrap())
}

fn chunk_range(c: usize, chunk: usize) -> std::ops::Range<u64> {
    (c * chunk) as u64..((c + 1) * chunk) as u64
}

/// For the tests that line up faults, fetches and events: a 1 MiB region in
/// 64 KiB chunks with `handlers` handler threads (all polling), whose store
/// the returned control steers. A failed read is retried after 1 s, and a
/// fetch gives up only after every wait of these tests (so a fault that is
/// never served fails a join, instead of turning into a SIGBUS).
fn lined_up_region(seed: u64, handlers: usize) -> (Arc<LazyRegion>, InjectControl, Vec<u8>) {
    let (store, data) = random_store(MIB, seed, None);
    let fault = Inject::new(store);
    let control = fault.control();
    let region = LazyRegion::new(
        Arc::new(fault),
        RegionConfig {
            handler_threads: handlers,
            standby_after: None,
            retry_backoff: Duration::from_secs(1),
            fetch_deadline: 2 * WAIT,
            ..cfg(64 * KIB)
        },
    )
    .unwrap();
    (Arc::new(region), control, data)
}

/// Waits until the control has failed a read.
fn wait_injected(control: &InjectControl) {
    let t = Instant::now();
    while control.injected() == 0 {
        assert!(t.elapsed() < WAIT, "no read failed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A handler whose install meets a pending `MADV_DONTNEED` reads the
/// pending events, faults queued behind its own included; they are served.
///
/// The one timing assumption: the test issues the `MADV_DONTNEED` within
/// the handler's 1 s retry backoff (checked: the install must have met it).
#[test]
fn faults_read_while_a_handler_drains_events_are_served() {
    let chunk = 64 * KIB;
    let (region, control, data) = lined_up_region(27, 1);
    region.read_at(0, &mut [0u8; 1]).unwrap();
    // A stalled read of chunk 1 holds the handler while two faults queue up.
    control.add_rule(InjectRule::stall(OpSet::READ).in_range(chunk_range(1, chunk)));
    let p = spawn(touch(&region, chunk + 5));
    rt().block_on(control.wait_stalled(1));
    for c in [2, 3] {
        control.add_rule(
            InjectRule::fail(OpSet::READ)
                .in_range(chunk_range(c, chunk))
                .times(1),
        );
    }
    let a = spawn_blocked(touch(&region, 2 * chunk + 9));
    let b = spawn_blocked(touch(&region, 3 * chunk + 9));
    control.release_stalls();
    assert_eq!(join(&p), data[chunk + 5]);
    // The first fault the handler serves failed once and waits out its
    // backoff. Drop a page now: the event stays pending until that install
    // meets it and reads the pending events, the other fault too.
    wait_injected(&control);
    let d = drop_pages_pending(&region, chunk);
    assert_eq!(join(&a), data[2 * chunk + 9]);
    assert_eq!(join(&b), data[3 * chunk + 9]);
    join(&d);
    let s = region.stats().snapshot();
    assert!(
        s.install_retries > 0,
        "no install met the pending event: {s}"
    );
    assert_eq!(s.removes, 1, "{s}");
}

/// Faults read by an inline fetch while it drains events (its install met a
/// pending `MADV_DONTNEED`) are served, not dropped with the drained events.
///
/// As above, the `MADV_DONTNEED` must come within the 1 s retry backoff.
#[test]
fn faults_read_by_an_inline_fetch_are_served() {
    let chunk = 64 * KIB;
    let (region, control, data) = lined_up_region(28, 2);
    region.read_at(0, &mut [0u8; 1]).unwrap();
    let held = hold_handlers(&region, &control, chunk);
    control.add_rule(
        InjectRule::fail(OpSet::READ)
            .in_range(chunk_range(3, chunk))
            .times(1),
    );
    let inline = {
        let region = Arc::clone(&region);
        spawn(move || {
            let mut b = [0u8; 1];
            region.read_at(3 * chunk + 1, &mut b).unwrap();
            b[0]
        })
    };
    wait_injected(&control);
    // While the inline fetch waits out its backoff: a fault nobody reads yet,
    // and a dropped page whose event the inline install will meet.
    let f = spawn_blocked(touch(&region, 4 * chunk + 2));
    let d = drop_pages_pending(&region, chunk);
    assert_eq!(join(&inline), data[3 * chunk + 1]);
    assert_eq!(join(&f), data[4 * chunk + 2]);
    join(&d);
    control.release_stalls();
    for (rx, c) in held.iter().zip([1, 2]) {
        assert_eq!(join(rx), data[c * chunk]);
    }
    let s = region.stats().snapshot();
    assert!(
        s.install_retries > 0,
        "no install met the pending event: {s}"
    );
}

/// Holds both handler threads of `region` in stalled reads of chunks 1 and
/// 2 (one fault at a time, so that each handler reads one); release them
/// with `control.release_stalls()`.
fn hold_handlers(
    region: &Arc<LazyRegion>,
    control: &InjectControl,
    chunk: usize,
) -> Vec<mpsc::Receiver<u8>> {
    [1, 2]
        .into_iter()
        .map(|c| {
            control.add_rule(InjectRule::stall(OpSet::READ).in_range(chunk_range(c, chunk)));
            let rx = spawn(touch(region, c * chunk));
            rt().block_on(control.wait_stalled(c as u64));
            rx
        })
        .collect()
}

/// Faults queued while every handler is busy are taken one at a time: a
/// fault whose store read is slow does not hold up the fault queued behind
/// it, which the other handler serves meanwhile.
///
/// The one timing assumption: the second fault is served within the first
/// one's 1 s retry backoff.
#[test]
fn a_slow_fault_does_not_hold_up_the_next_one() {
    let chunk = 64 * KIB;
    let (region, control, data) = lined_up_region(29, 2);
    let held = hold_handlers(&region, &control, chunk);
    control.add_rule(
        InjectRule::fail(OpSet::READ)
            .in_range(chunk_range(3, chunk))
            .times(1),
    );
    let slow = spawn_blocked(touch(&region, 3 * chunk + 1));
    let next = spawn_blocked(touch(&region, 4 * chunk + 1));
    control.release_stalls();
    assert_eq!(join(&next), data[4 * chunk + 1]);
    assert!(
        slow.try_recv().is_err() && region.chunk_state(3) == ChunkState::Fetching,
        "the fault behind the slow one was served only after it"
    );
    assert_eq!(join(&slow), data[3 * chunk + 1]);
    for (rx, c) in held.iter().zip([1, 2]) {
        assert_eq!(join(rx), data[c * chunk]);
    }
}

/// A stalled chunk does not block faults on other chunks.
#[test]
fn slow_store_does_not_block_other_chunks() {
    let (store, data) = random_store(8 * MIB, 18, None);
    let fault = Inject::new(store);
    let control = fault.control();
    let chunk = 256 * KIB;
    control.add_rule(InjectRule::stall(OpSet::READ).in_range(0..chunk as u64));
    let region = Arc::new(LazyRegion::new(Arc::new(fault), cfg(chunk)).unwrap());
    let slow = {
        let region = Arc::clone(&region);
        spawn(move || {
            let mut b = [0u8; 16];
            region.read_faulting(100, &mut b);
            b
        })
    };
    rt().block_on(control.wait_stalled(1));
    let others = {
        let (region, data) = (Arc::clone(&region), data.clone());
        spawn(move || {
            for k in 1..20 {
                let mut b = [0u8; 16];
                region.read_faulting(k * 300 * KIB, &mut b);
                assert_eq!(b, data[k * 300 * KIB..k * 300 * KIB + 16]);
            }
        })
    };
    join(&others);
    assert!(slow.try_recv().is_err(), "still stalled");
    control.release_stalls();
    assert_eq!(join(&slow), data[100..116]);
}

/// Dropping a region whose threads are stuck in store reads (the pullers)
/// cancels those reads and returns.
#[test]
fn drop_while_fetching_returns() {
    let (store, _) = random_store(16 * MIB, 19, None);
    let fault = Inject::new(store);
    let control = fault.control();
    control.stall(OpSet::READ, None);
    let region = LazyRegion::new(
        Arc::new(fault),
        RegionConfig {
            prefetch: true,
            ..cfg(MIB)
        },
    )
    .unwrap();
    rt().block_on(control.wait_stalled(2));
    assert_eq!(region.chunk_state(0), ChunkState::Fetching);
    join(&spawn(move || drop(region)));
    assert_eq!(control.stalled(), 0, "the stalled reads were cancelled");
    // Many regions created and dropped in a row leak nothing that blocks.
    for k in 0..5 {
        let (store, data) = random_store(2 * MIB, 20 + k, None);
        let region = LazyRegion::new(
            store,
            RegionConfig {
                prefetch: true,
                ..cfg(64 * KIB)
            },
        )
        .unwrap();
        let mut b = [0u8; 3];
        region.read_faulting(MIB, &mut b);
        assert_eq!(b, data[MIB..MIB + 3]);
    }
}

// ---------------------------------------------------------------------------
// memfd mode
// ---------------------------------------------------------------------------

#[test]
fn memfd_region_is_seen_by_a_second_process() {
    const NAME: &str = "memfd_region_is_seen_by_a_second_process";
    let size = 8 * MIB + 4096;
    let chunk = 256 * KIB;
    if is_child(NAME) {
        let path = std::env::var("MEMSYNC_REGION_MEMFD").unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let map = memsync_sys_mapping(&file, size);
        let (_, data) = random_store(size, 21, Some(3));
        // The parent filled the first half lazily (faults) before starting us.
        let mut buf = vec![0u8; size / 2];
        map.read_at(0, &mut buf);
        assert!(buf == data[..size / 2], "child sees the lazily filled data");
        // Write into the filled part: the parent sees it (shared memory).
        map.write_at(100, b"from the child");
        eprintln!("child: ok");
        return;
    }
    let (store, data) = random_store(size, 21, Some(3));
    let region = LazyRegion::new(
        store,
        RegionConfig {
            backing: Backing::Memfd,
            ..cfg(chunk)
        },
    )
    .unwrap();
    let fd = region.as_fd().expect("memfd backing has a memfd");
    let mut half = vec![0u8; size / 2];
    region.read_faulting(0, &mut half);
    assert!(half == data[..size / 2]);
    let path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    );
    let out = run_child(&std::env::current_exe().unwrap(), NAME, |c| {
        c.env("MEMSYNC_REGION_MEMFD", &path);
    });
    assert!(out.status.success(), "{}", describe(&out));
    let mut msg = [0u8; 14];
    region.read_at(100, &mut msg).unwrap();
    assert_eq!(&msg, b"from the child");
    // The second half is filled lazily too, through the inline path.
    let mut rest = vec![0u8; size - size / 2];
    region.read_at(size / 2, &mut rest).unwrap();
    assert!(rest == data[size / 2..]);
    let s = region.stats().snapshot();
    assert!(s.installs_continue > 0, "{s}");
    // MADV_DONTNEED keeps memfd data: the next touch maps it again.
    region.advise(0, MIB, Advice::DontNeed).unwrap();
    region.read_faulting(100, &mut msg);
    assert_eq!(&msg, b"from the child");
}

fn memsync_sys_mapping(file: &std::fs::File, len: usize) -> memsync_sys::Mapping {
    use std::os::fd::AsFd;
    memsync_sys::Mapping::shared_fd(file.as_fd(), len, 0).unwrap()
}

// ---------------------------------------------------------------------------
// Unprivileged use
// ---------------------------------------------------------------------------

#[test]
fn runs_as_a_non_root_user() {
    const NAME: &str = "runs_as_a_non_root_user";
    if is_child(NAME) {
        assert_ne!(memsync_sys::euid(), 0, "the child runs unprivileged");
        let (store, data) = random_store(4 * MIB + 17, 22, Some(4));
        let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
        assert!(
            region.user_mode_only(),
            "unprivileged: user-mode-only userfaultfd"
        );
        let mut buf = vec![0u8; data.len()];
        region.read_faulting(0, &mut buf);
        assert!(buf == data);
        eprintln!("child: unprivileged region ok");
        return;
    }
    if memsync_sys::euid() != 0 {
        // Already unprivileged: run the child part in-process.
        let (store, data) = random_store(MIB, 22, None);
        let region = LazyRegion::new(store, cfg(64 * KIB)).unwrap();
        assert!(region.user_mode_only());
        assert_same(&region, &data);
        return;
    }
    // The cargo target directory may not be traversable by nobody: run a copy.
    let dir = TempDir::new("nonroot");
    let exe = dir.0.join("region-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_child(&exe, NAME, |c| {
        c.uid(65534)
            .gid(65534)
            .current_dir(&dir.0)
            .env("TMPDIR", &dir.0);
    });
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unprivileged region ok"),
        "{}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------
// Chunk state and geometry (property tests)
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn geometry_chunks_tile_the_region(size in 1u64..(64 << 20), chunk_log in 12u32..22) {
        let chunk = 1usize << chunk_log;
        let g = Geometry::new(size, chunk, 4096).unwrap();
        let mut pos = 0usize;
        for i in 0..g.chunks() {
            let (off, data, inst) = g.chunk(i);
            prop_assert_eq!(off, pos);
            prop_assert!(data > 0 && data <= chunk);
            prop_assert!(inst >= data && inst % 4096 == 0 && inst - data < 4096);
            prop_assert_eq!(g.chunk_of(off), i);
            prop_assert_eq!(g.chunk_of(off + data - 1), i);
            pos += data;
        }
        prop_assert_eq!(pos as u64, size);
        prop_assert_eq!(g.map_len() % 4096, 0);
        prop_assert!(g.map_len() as u64 >= size && (g.map_len() as u64) < size + 4096);
    }

    #[test]
    fn chunk_map_follows_its_model(ops in proptest::collection::vec((0usize..7, 0usize..40), 1..400)) {
        let map = ChunkMap::new(40);
        let mut model = [ChunkState::Absent; 40];
        for (op, i) in ops {
            let cur = model[i];
            match op {
                0 => {
                    let r = map.try_claim(i);
                    if cur == ChunkState::Absent {
                        prop_assert!(r.is_ok());
                        model[i] = ChunkState::Fetching;
                    } else {
                        prop_assert_eq!(r, Err(cur));
                    }
                }
                1 => {
                    let ok = map.finish(i);
                    prop_assert_eq!(ok, cur == ChunkState::Fetching);
                    if ok { model[i] = ChunkState::Present; }
                }
                2 => {
                    map.abandon(i);
                    if cur == ChunkState::Fetching { model[i] = ChunkState::Absent; }
                }
                3 => {
                    let prev = map.invalidate(i);
                    prop_assert_eq!(prev, cur);
                    if matches!(cur, ChunkState::Present | ChunkState::Fetching) { model[i] = ChunkState::Absent; }
                }
                4 => {
                    let ok = map.poison(i);
                    prop_assert_eq!(ok, matches!(cur, ChunkState::Fetching | ChunkState::Absent));
                    if ok { model[i] = ChunkState::Poisoned; }
                }
                5 => {
                    let ok = map.unpoison(i);
                    prop_assert_eq!(ok, cur == ChunkState::Poisoned);
                    if ok { model[i] = ChunkState::Absent; }
                }
                _ => {
                    let r = map.try_reclaim(i);
                    prop_assert_eq!(r.is_ok(), cur == ChunkState::Present);
                    if r.is_ok() { model[i] = ChunkState::Fetching; }
                }
            }
            for (k, s) in model.iter().enumerate() {
                prop_assert_eq!(map.get(k), *s);
            }
            let present: Vec<usize> = (0..40).filter(|&k| model[k] == ChunkState::Present).collect();
            prop_assert_eq!(map.present_count(), present.len());
            let bm = map.present_bitmap();
            prop_assert_eq!(bm.iter().collect::<Vec<_>>(), present.clone());
            prop_assert_eq!(bm.count(), present.len());
            prop_assert_eq!(map.any_fetching(), model.contains(&ChunkState::Fetching));
        }
    }
}

#[test]
fn claims_are_exclusive_across_threads() {
    let map = Arc::new(ChunkMap::new(1000));
    let wins: Vec<_> = (0..4)
        .map(|_| {
            let map = Arc::clone(&map);
            spawn(move || (0..1000).filter(|&i| map.try_claim(i).is_ok()).count())
        })
        .collect();
    let total: usize = wins.iter().map(join).sum();
    assert_eq!(total, 1000);
}

// ---------------------------------------------------------------------------
// hugetlb backing
// ---------------------------------------------------------------------------

/// A hugetlb-backed region serves faults (whole huge pages by UFFDIO_COPY),
/// zero chunks and a short last chunk, byte for byte.
#[test]
fn hugetlb_region_integrity() {
    let hpage = memsync_sys_pmd();
    // 5 huge pages, the last one short; every 3rd 64 KiB piece a hole, and
    // one whole zero chunk.
    let size = 4 * hpage + 12_345;
    let (store, mut data) = random_store(size, 31, Some(3));
    rt().block_on(store.write_zeroes(hpage as u64, hpage as u64))
        .unwrap();
    data[hpage..2 * hpage].fill(0);
    let _pages = match memsync_testkit::hugepages::HugePages::reserve(5) {
        Ok(g) => g,
        Err(why) => {
            memsync_testkit::skip::skip("hugetlb_region_integrity", &why);
            return;
        }
    };
    let region = Arc::new(
        LazyRegion::new(
            store,
            RegionConfig {
                backing: Backing::Hugetlb,
                ..cfg(hpage)
            },
        )
        .unwrap(),
    );
    assert_eq!(region.len(), size);
    assert_eq!(region.as_ptr() as usize % hpage, 0);
    // Faults from two threads in opposite orders, then every byte.
    let threads: Vec<_> = [false, true]
        .into_iter()
        .map(|rev| {
            let region = Arc::clone(&region);
            let data = data.clone();
            spawn(move || {
                let mut offs: Vec<usize> = (0..size).step_by(100_003).collect();
                if rev {
                    offs.reverse();
                }
                for off in offs {
                    let mut b = [0u8; 1];
                    region.read_faulting(off, &mut b);
                    assert_eq!(b[0], data[off], "byte {off}");
                }
            })
        })
        .collect();
    for t in &threads {
        join(t);
    }
    let mut got = vec![0u8; size];
    region.read_faulting(0, &mut got);
    assert!(got == data, "hugetlb region differs from the store");
    region.write_at(size - 3, b"end").unwrap();
    let mut b = [0u8; 3];
    region.read_at(size - 3, &mut b).unwrap();
    assert_eq!(&b, b"end");
    let s = region.stats().snapshot();
    assert!(region.is_complete(), "{s}");
    assert_eq!(s.installs_move, 0, "{s}");
    assert!(s.installs_copy >= 4, "{s}");
}

/// A hugetlb region needs chunks of whole huge pages.
#[test]
fn hugetlb_region_rejects_small_chunks() {
    let (store, _) = random_store(MIB, 1, None);
    let err = LazyRegion::new(
        store,
        RegionConfig {
            backing: Backing::Hugetlb,
            ..cfg(64 * KIB)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("huge page"), "{err}");
}

fn memsync_sys_pmd() -> usize {
    // The default hugetlb page size is the PMD size on x86-64 and arm64
    // (4 KiB base pages).
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(2 * MIB, |kb| kb * KIB)
}

/// A region created and touched by threads confined to one CPU (as under a one-CPU cpuset):
/// every pinned handler lands on that CPU, and faults are still served, unpinned or pinned.
#[test]
fn faults_are_served_when_confined_to_one_cpu() {
    let rx = spawn(|| {
        let cpu = memsync_sys::current_cpu().unwrap();
        memsync_sys::set_thread_affinity(&[cpu]).unwrap();
        assert_eq!(memsync_sys::allowed_cpus().unwrap(), vec![cpu]);
        for pin in [true, false] {
            let (store, data) = random_store(4 * MIB, 21, None);
            let region = LazyRegion::new(
                store,
                RegionConfig {
                    pin_handlers: pin,
                    handler_threads: 2,
                    ..cfg(64 * KIB)
                },
            )
            .unwrap();
            let mut buf = vec![0u8; 4096];
            for off in (0..4 * MIB).step_by(64 * KIB).rev() {
                region.read_faulting(off + 100, &mut buf);
                assert!(buf == data[off + 100..off + 100 + 4096], "pin {pin}: {off}");
            }
            assert!(region.stats().snapshot().faults > 0);
        }
    });
    join(&rx);
}

/// Store futures run on a shared runtime, answered within the handlers' spin (no delay) and
/// after it (a delay layer: the handler parks and is woken): every byte is right.
#[test]
fn shared_runtime_with_spin_and_park() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for delay in [Duration::ZERO, Duration::from_millis(2)] {
        let (store, data) = random_store(4 * MIB, 33, None);
        let fault = Inject::new(store);
        fault.control().set_delay(OpSet::READ, delay);
        let region = Arc::new(
            LazyRegion::new(
                Arc::new(fault),
                RegionConfig {
                    runtime: Some(runtime.handle().clone()),
                    store_spin: Duration::from_micros(50),
                    ..cfg(64 * KIB)
                },
            )
            .unwrap(),
        );
        let data = Arc::new(data);
        let rxs: Vec<_> = (0..3u64)
            .map(|t| {
                let (region, data) = (Arc::clone(&region), Arc::clone(&data));
                spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t);
                    for _ in 0..40 {
                        let off = rng.random_range(0..4 * MIB - 4096);
                        let mut buf = vec![0u8; 4096];
                        region.read_faulting(off, &mut buf);
                        assert!(buf == data[off..off + 4096], "delay {delay:?}: {off}");
                    }
                })
            })
            .collect();
        for rx in &rxs {
            join(rx);
        }
        assert!(region.stats().snapshot().faults > 0);
    }
}

// ---------------------------------------------------------------------------
// Engine contract suite (tests/region/contract.rs) over several sources
// ---------------------------------------------------------------------------

fn vec_source(data: &[u8]) -> Arc<engine::VecSource> {
    let s = engine::VecSource::random(data.len(), 0);
    s.data.lock().copy_from_slice(data);
    s
}

fn store_source(data: &[u8]) -> Arc<memsync_region::StoreSource> {
    let store = Arc::new(MemStore::new(data.len() as u64));
    rt().block_on(store.write(0, Bytes::copy_from_slice(data)))
        .unwrap();
    Arc::new(memsync_region::StoreSource(store))
}

/// Whether a memfd region can track writes: it installs with `UFFDIO_CONTINUE_MODE_WP`
/// (Linux 6.4, the release of `WP_UNPOPULATED`). Where not, a test of such a region skips its
/// memfd part (`memfd_write_tracking_is_refused_without_continue_wp` checks the refusal).
fn memfd_wp_supported(test: &str, backing: Backing) -> bool {
    let ok = backing != Backing::Memfd
        || memsync_sys::Uffd::probe_features()
            .is_ok_and(|f| f.contains(memsync_sys::Features::WP_UNPOPULATED));
    if !ok {
        memsync_testkit::skip::kernel_feature(
            &format!("{test} (memfd part)"),
            "UFFDIO_CONTINUE_MODE_WP",
            (6, 4),
        );
    }
    ok
}

fn dirty_supported() -> bool {
    memsync_sys::Uffd::probe_features().is_ok_and(|f| f.contains(memsync_sys::Features::WP_ASYNC))
}

#[test]
fn contract_protect_over_sources() {
    use memsync_region::WriteTracking::Protect;
    for backing in [Backing::Anonymous, Backing::Memfd] {
        if !memfd_wp_supported("contract_protect_over_sources", backing) {
            continue;
        }
        contract::run("vec/protect", &vec_source, backing, Protect, 1);
        contract::run("store/protect", &store_source, backing, Protect, 2);
    }
}

#[test]
fn contract_dirty_over_sources() {
    if !dirty_supported() {
        memsync_testkit::skip::kernel_feature(
            "contract_dirty_over_sources",
            "UFFD_FEATURE_WP_ASYNC",
            (6, 7),
        );
        return;
    }
    use memsync_region::WriteTracking::Dirty;
    for backing in [Backing::Anonymous, Backing::Memfd] {
        contract::run("vec/dirty", &vec_source, backing, Dirty, 3);
        contract::run("store/dirty", &store_source, backing, Dirty, 4);
    }
}

/// The contract as `nobody` (user-mode-only userfaultfd).
#[test]
fn contract_runs_as_a_non_root_user() {
    const NAME: &str = "contract_runs_as_a_non_root_user";
    let run = || {
        use memsync_region::WriteTracking::{Dirty, Protect};
        contract::run(
            "nonroot/protect",
            &vec_source,
            Backing::Anonymous,
            Protect,
            5,
        );
        if dirty_supported() {
            contract::run("nonroot/dirty", &vec_source, Backing::Anonymous, Dirty, 6);
        }
    };
    if is_child(NAME) {
        assert_ne!(memsync_sys::euid(), 0, "the child runs unprivileged");
        run();
        eprintln!("child: unprivileged contract ok");
        return;
    }
    if memsync_sys::euid() != 0 {
        run();
        return;
    }
    let dir = TempDir::new("contract-nonroot");
    let exe = dir.0.join("region-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_child(&exe, NAME, |c| {
        c.uid(65534)
            .gid(65534)
            .current_dir(&dir.0)
            .env("TMPDIR", &dir.0);
    });
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unprivileged contract ok"),
        "{}",
        describe(&out)
    );
}
