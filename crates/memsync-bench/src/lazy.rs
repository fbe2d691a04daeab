//! Suite `lazy`: lazy (userfaultfd post-copy) regions from a `mem:` store, beside the limits
//! measured in the same run. Every case measures its subjects in alternation
//! ([`Bench::compare`]).
//!
//! - `seq-first-touch`: touch one byte of every page of a fresh region in order (GB/s of
//!   region). Limits, on as many threads as this process may run on (the region's handlers,
//!   pullers and allocation helper share those CPUs): `memcpy-Nthr`, a memcpy of the same size
//!   into memory touched beforehand, and `memcpy-fresh-Nthr`, the same into never touched
//!   memory advised for huge pages (the region must allocate and zero its pages too).
//!   Subjects: 2 MiB chunks with and without the background puller (following the faults),
//!   the same copied into 4 KiB pages instead of moved in as huge pages (`lazy-2M-small-pages`),
//!   64 KiB and (not with `--quick`) 4 KiB chunks, and `lazy-2M-shared-tmpfs`: the same bytes
//!   in a `file:` store on tmpfs, whose pages the region maps (`Backing::Shared`: MINOR faults
//!   and `UFFDIO_CONTINUE`, no copy and no fresh page; the store is not `mem:`). The first run
//!   of each subject checks every byte of the region against the store (BLAKE3, outside the
//!   timed part).
//! - `rand-4k-first-touch`: fault latency of random first touches of distinct 4 KiB pages
//!   (4 KiB chunks, no prefetch), measured on the touching thread: p50 and p99. Limit: a plain
//!   anonymous first-touch fault measured the same way. Subjects are the places a fault can be
//!   served: the default (handlers pinned one per CPU), two polling handlers, one
//!   handler, unpinned handlers with a standby, spinning handlers, and the inline path (the
//!   touching thread fetches the chunk itself, no fault at all), and `lazy-shared-tmpfs` (the
//!   tmpfs store mapped, 4 KiB chunks). `sigbus-on-thread` is an
//!   experiment outside `LazyRegion`: a userfaultfd in `UFFD_FEATURE_SIGBUS` mode whose fault
//!   the touching thread resolves itself, in a `SIGBUS` handler, with `UFFDIO_COPY` from a
//!   mapping that already holds the store's data (`memsync_sys::SigbusResolver`; a store that
//!   answers at once), with its ratio to `anon-fault` and `lazy-default`.
//! - `dirty-tracked-writer`: what dirty tracking costs a writer. A thread writes one byte to
//!   every 4 KiB page of a populated anonymous mapping (no huge pages), ns per page, beside the
//!   same writer on a mapping tracked by a `DirtyTracker` (`UFFD_FEATURE_WP_ASYNC`), re-armed
//!   before every run with one `PAGEMAP_SCAN` (untimed), so every write takes the kernel's
//!   write-protect fault: the tracker's worst case. Each run checks that the tracker reported
//!   every chunk written by the previous run.
//! - `nbd-seq-first-touch` and `nbd-rand-4k-first-touch`: the same two from an NBD store on
//!   loopback TCP (memsync's own NBD server serving a mem: store in this process, read through
//!   memsync's NBD client). Limits: the client's own sequential read (2 MiB requests, two in
//!   flight, like a fault handler beside the puller, and eight) and one 4 KiB read round trip
//!   through the client; nbdcopy reading the same export is shown beside them (a whole
//!   command, so no ratio is taken against it here).
//! - `nbd-4k-qd1`: one 4 KiB request in flight over one connection, the memsync client against
//!   nbdcopy (`--request-size=4096 -C 1 -R 1`), both timed as whole commands reading the same
//!   small export (µs per request).
//!
//! The host re-backs freed guest memory lazily here (free page reporting), so the first touch
//! of fresh memory varies a lot from run to run: compare the medians of one run side by side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use memsync_core::{DynStore, Store};
use memsync_local::{FileOptions, FileStore, MemStore};
use memsync_region::{DirtyTracker, FollowFaults, LazyRegion, RegionConfig};
use memsync_sys::{Features, MapOptions, Mapping, SigbusResolver, Uffd};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};

use crate::{Bench, Env, Subject, gbps};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;

/// A mem: store of `size` bytes of pseudo-random data (a random 1 MiB block, varied per MiB).
fn filled_store(size: usize) -> Result<DynStore> {
    let store = Arc::new(MemStore::new(size as u64));
    fill(&store, size)?;
    Ok(store)
}

fn fill(store: &MemStore, size: usize) -> Result<()> {
    let mut block = vec![0u8; MIB];
    SmallRng::seed_from_u64(1).fill_bytes(&mut block);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        for (k, off) in (0..size).step_by(MIB).enumerate() {
            block[..8].copy_from_slice(&(k as u64).to_le_bytes());
            let n = MIB.min(size - off);
            store
                .write(off as u64, Bytes::copy_from_slice(&block[..n]))
                .await?;
        }
        anyhow::Ok(())
    })
}

/// A `file:` store on tmpfs (`/dev/shm`) holding the same bytes as [`filled_store`]: its
/// pages are shmem, which a [`Backing::Shared`](memsync_region::Backing::Shared) region maps
/// without copying. The file is removed when the returned guard is dropped.
fn tmpfs_store(size: usize) -> Result<(DynStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir_in("/dev/shm").context("a directory on /dev/shm (tmpfs)")?;
    let store = FileStore::open(dir.path().join("data"), FileOptions::with_size(size as u64))?;
    anyhow::ensure!(
        store.shared_memory().is_some(),
        "/dev/shm is not tmpfs here: no shared memory to map"
    );
    let mem = filled_store(size)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut buf = vec![0u8; MIB];
    for off in (0..size).step_by(MIB) {
        let n = MIB.min(size - off);
        rt.block_on(mem.read(off as u64, &mut buf[..n]))?;
        rt.block_on(store.write(off as u64, Bytes::copy_from_slice(&buf[..n])))?;
    }
    Ok((Arc::new(store), dir))
}

fn shared_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        backing: memsync_region::Backing::Shared,
        ..base_cfg(chunk)
    }
}

fn base_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        chunk_size: chunk,
        prefetch: false,
        ..RegionConfig::default()
    }
}

/// BLAKE3 of a store's contents.
fn store_hash(store: &DynStore) -> Result<blake3::Hash> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB];
    let len = store.size() as usize;
    for off in (0..len).step_by(MIB) {
        let n = MIB.min(len - off);
        rt.block_on(store.read(off as u64, &mut buf[..n]))?;
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// BLAKE3 of a region's contents (every chunk present: nothing is fetched).
fn region_hash(region: &LazyRegion) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB];
    for off in (0..region.len()).step_by(MIB) {
        let n = MIB.min(region.len() - off);
        region.read_at(off, &mut buf[..n])?;
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// A sequential first touch subject: `seq_touch` per run, the first run also checking the
/// region's bytes against `want`, the store's hash.
fn seq_subject<'a>(
    name: &str,
    store: &'a DynStore,
    want: blake3::Hash,
    cfg: impl Fn() -> RegionConfig + 'a,
) -> Subject<'a> {
    let mut checked = false;
    Subject::new(name, move || {
        let v = seq_touch(store, &cfg, (!checked).then_some(want))?;
        checked = true;
        Ok(v)
    })
}

/// Sequential first touch of a new region: GB/s of region, timed from asking for the region
/// (its background pull starts at creation, so timing only the touches would credit it with
/// work done before the clock started). With `want`, the region's bytes are then checked
/// against it (untimed).
fn seq_touch(
    store: &DynStore,
    cfg: impl Fn() -> RegionConfig,
    want: Option<blake3::Hash>,
) -> Result<f64> {
    let t = Instant::now();
    let region = LazyRegion::new(Arc::clone(store), cfg()).context("creating the region")?;
    let len = region.len();
    let mut b = [0u8; 1];
    for off in (0..len).step_by(PAGE) {
        region.read_faulting(off, &mut b);
    }
    let el = t.elapsed();
    // A chunk is marked present just after its install wakes the toucher.
    let t = Instant::now();
    while !region.is_complete() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    anyhow::ensure!(region.is_complete(), "region incomplete after a full touch");
    if let Some(want) = want {
        let got = region_hash(&region)?;
        anyhow::ensure!(
            got == want,
            "the region's bytes differ from the store's (BLAKE3 {got}, store {want})"
        );
    }
    Ok(gbps(len as u64, el))
}

/// The CPUs this process may run on: the threads of the memcpy limits.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Copy `src` into `dst` on `threads` threads, each a contiguous part: the time from their
/// common start to the last one's end.
fn par_copy(dst: &mut [u8], src: &[u8], threads: usize) -> Duration {
    let part = dst.len().div_ceil(threads.max(1)).max(1);
    let n = dst.len().div_ceil(part);
    let start = std::sync::Barrier::new(n + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = dst
            .chunks_mut(part)
            .zip(src.chunks(part))
            .map(|(d, sr)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    d.copy_from_slice(sr);
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for w in workers {
            let _ = w.join();
        }
        t.elapsed()
    })
}

/// A memcpy of `len` bytes on `threads` threads into memory touched beforehand.
fn memcpy_limit(len: usize, threads: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.iter_mut().step_by(PAGE).for_each(|b| *b = 2);
    let el = par_copy(&mut dst, &src, threads);
    std::hint::black_box(&dst);
    gbps(len as u64, el)
}

/// A memcpy of `len` bytes on `threads` threads into fresh, never touched memory advised for
/// transparent huge pages: what a lazy region must do at least (allocate and zero its pages,
/// then copy).
fn memcpy_fresh_limit(len: usize, threads: usize) -> Result<f64> {
    let src = vec![1u8; len];
    let mut dst = memsync_sys::Staging::new(len).context("mapping a buffer")?;
    let el = par_copy(&mut dst.as_mut_slice()[..len], &src, threads);
    std::hint::black_box(dst.as_slice());
    Ok(gbps(len as u64, el))
}

/// Bytes of free reserved huge pages (`HugePages_Free` × `Hugepagesize`).
fn hugetlb_free_bytes() -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> usize {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") * KIB
}

/// Random distinct page offsets.
fn random_pages(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut pages: Vec<usize> = (0..len / PAGE).collect();
    pages.shuffle(&mut SmallRng::seed_from_u64(seed));
    pages.truncate(n);
    pages.into_iter().map(|p| p * PAGE).collect()
}

/// Per-touch latencies in µs of `n` random first touches.
fn rand_touch(
    store: &DynStore,
    n: usize,
    seed: u64,
    inline: bool,
    cfg: RegionConfig,
) -> Result<Vec<f64>> {
    let region = LazyRegion::new(Arc::clone(store), cfg).context("creating the region")?;
    let offs = random_pages(region.len(), n, seed);
    let mut lat = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for off in offs {
        let t = Instant::now();
        if inline {
            region.read_at(off, &mut b)?;
        } else {
            region.read_faulting(off, &mut b);
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// The same for plain anonymous memory (the kernel's own first-touch fault: a write that
/// allocates a zeroed page).
fn anon_touch(len: usize, n: usize, seed: u64) -> Result<Vec<f64>> {
    // A large zeroed allocation is a fresh mmap whose pages are not touched yet.
    let mut mem = vec![0u8; len];
    let mut lat = Vec::with_capacity(n);
    for off in random_pages(len, n, seed) {
        let t = Instant::now();
        mem[off] = 1;
        std::hint::black_box(&mem[off]);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// A mapping holding the whole store (the source of `sigbus-on-thread`: data already in
/// memory), or `None` (with the reason printed) if the kernel lacks `UFFD_FEATURE_SIGBUS`.
fn sigbus_source(store: &DynStore) -> Result<Option<Arc<Mapping>>> {
    let supported = Uffd::probe_features().context("probing userfaultfd features")?;
    if !supported.contains(Features::SIGBUS) {
        eprintln!("lazy: skipping sigbus-on-thread: the kernel lacks UFFD_FEATURE_SIGBUS");
        return Ok(None);
    }
    let len = store.size() as usize;
    let source = Mapping::anonymous(len).context("mapping the sigbus source")?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut buf = vec![0u8; MIB];
    for off in (0..len).step_by(MIB) {
        let n = MIB.min(len - off);
        rt.block_on(store.read(off as u64, &mut buf[..n]))?;
        source.write_at(off, &buf[..n]);
    }
    Ok(Some(Arc::new(source)))
}

/// Per-touch latencies in µs of `n` random first touches of a fresh region whose faults the
/// touching thread resolves itself in a `SIGBUS` handler, copying each page from `source`.
fn sigbus_touch(source: &Arc<Mapping>, n: usize, seed: u64) -> Result<Vec<f64>> {
    let len = source.len();
    let region = Mapping::anonymous_with(
        len,
        MapOptions {
            align: memsync_sys::pmd_size(),
            ..MapOptions::default()
        },
    )
    .context("mapping the region")?;
    let resolver =
        SigbusResolver::new(region, Arc::clone(source), PAGE).context("SIGBUS resolver")?;
    let region = resolver.region();
    let mut lat = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for off in random_pages(len, n, seed) {
        let t = Instant::now();
        region.read_at(off, &mut b);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    anyhow::ensure!(
        resolver.handled() == n as u64 && resolver.installed_pages() == n as u64,
        "sigbus-on-thread: {} faults handled, {} pages installed, {n} touches",
        resolver.handled(),
        resolver.installed_pages()
    );
    Ok(lat)
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return f64::NAN;
    }
    let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

/// A latency subject: each run gives the latencies (µs) of one batch of touches, seeded by
/// the run's number (every subject touches the same pages in the same round); reported as
/// p50 and p99.
fn lat_subject<'a>(name: &str, mut f: impl FnMut(u64) -> Result<Vec<f64>> + 'a) -> Subject<'a> {
    let mut round = 0;
    Subject::multi(name, move || {
        let mut lat = f(round)?;
        round += 1;
        Ok(vec![quantile(&mut lat, 0.5), quantile(&mut lat, 0.99)])
    })
}

const LATENCY: &[(&str, &str)] = &[("p50", "us"), ("p99", "us")];

/// Builds a region configuration (a subject of a case).
type MakeCfg = fn() -> RegionConfig;

fn pull_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        prefetch: true,
        priority: Box::new(FollowFaults::default()),
        ..base_cfg(chunk)
    }
}

pub fn run(bench: &mut Bench, env: &Env<'_>) -> Result<()> {
    let quick = bench.config.quick;
    let len = if quick { 256 * MIB } else { 1 << 30 };
    let rand_n = if quick { 5_000 } else { 20_000 };
    let store = filled_store(len)?;
    let want = store_hash(&store)?;
    let (shm, _shm_dir) = tmpfs_store(len)?;
    anyhow::ensure!(
        store_hash(&shm)? == want,
        "the tmpfs store's bytes differ from the mem: store's"
    );
    let shm = &shm;
    let threads = cpus();

    // Sequential first touch.
    let case = if quick {
        "seq-first-touch-256M"
    } else {
        "seq-first-touch-1G"
    };
    let (memcpy, fresh) = (
        format!("memcpy-{threads}thr"),
        format!("memcpy-fresh-{threads}thr"),
    );
    let mut subjects = vec![
        Subject::new(&memcpy, || Ok(memcpy_limit(len, threads))),
        Subject::new(&fresh, || memcpy_fresh_limit(len, threads)),
        seq_subject("lazy-2M", &store, want, || base_cfg(2 * MIB)),
        seq_subject("lazy-2M-pull", &store, want, || pull_cfg(2 * MIB)),
        // Each chunk copied into 4 KiB pages instead of moved in as a fresh huge page
        // (`memsync map --small-pages`).
        seq_subject("lazy-2M-small-pages", &store, want, || RegionConfig {
            huge_pages: false,
            use_move: false,
            ..base_cfg(2 * MIB)
        }),
    ];
    // hugetlb backing, if enough huge pages are reserved (the suite does not change sysctls).
    let free_huge = hugetlb_free_bytes();
    if free_huge >= len + 2 * MIB {
        subjects.push(seq_subject("lazy-2M-hugetlb", &store, want, || {
            RegionConfig {
                backing: memsync_region::Backing::Hugetlb,
                ..base_cfg(2 * MIB)
            }
        }));
    } else {
        eprintln!(
            "lazy: skipping lazy-2M-hugetlb: {} MiB of free huge pages, {} MiB needed (as root: \
             echo {} > /proc/sys/vm/nr_hugepages)",
            free_huge / MIB,
            len / MIB + 2,
            len / (2 * MIB) + 1
        );
    }
    // The one-copy design from a store whose bytes are shmem: no copy, no fresh page.
    subjects.push(seq_subject("lazy-2M-shared-tmpfs", shm, want, || {
        shared_cfg(2 * MIB)
    }));
    subjects.push(seq_subject("lazy-64K", &store, want, || base_cfg(64 * KIB)));
    if !quick {
        subjects.push(seq_subject("lazy-4K", &store, want, || base_cfg(4 * KIB)));
    }
    let c = bench.compare(case, &[("throughput", "GB/s")], subjects)?;
    for m in ["lazy-2M", "lazy-2M-pull", "lazy-2M-shared-tmpfs"] {
        bench.ratio(&c, m, &memcpy, "throughput")?;
        bench.ratio(&c, m, &fresh, "throughput")?;
    }
    bench.ratio(&c, "lazy-2M-small-pages", "lazy-2M", "throughput")?;

    // Random 4 KiB first touches: where the fault is served.
    let case = "rand-4k-first-touch";
    let variants: [(&str, MakeCfg); 5] = [
        ("lazy-block-2thr-polling", || RegionConfig {
            handler_threads: 2,
            standby_after: None,
            spin: Duration::ZERO,
            pin_handlers: false,
            ..base_cfg(4 * KIB)
        }),
        ("lazy-block-1thr", || RegionConfig {
            handler_threads: 1,
            spin: Duration::ZERO,
            pin_handlers: false,
            ..base_cfg(4 * KIB)
        }),
        ("lazy-unpinned-standby", || RegionConfig {
            handler_threads: 2,
            standby_after: Some(Duration::from_millis(1)),
            spin: Duration::ZERO,
            pin_handlers: false,
            ..base_cfg(4 * KIB)
        }),
        ("lazy-spin-30us-1thr", || RegionConfig {
            handler_threads: 1,
            spin: Duration::from_micros(30),
            pin_handlers: false,
            ..base_cfg(4 * KIB)
        }),
        ("lazy-spin-200us-2thr-polling", || RegionConfig {
            handler_threads: 2,
            standby_after: None,
            spin: Duration::from_micros(200),
            pin_handlers: false,
            ..base_cfg(4 * KIB)
        }),
    ];
    let store = &store;
    let source = sigbus_source(store)?;
    let mut subjects = vec![
        lat_subject("anon-fault", |s| anon_touch(len, rand_n, s)),
        // The default configuration is the memsync figure compared with the limit.
        lat_subject("lazy-default", |s| {
            rand_touch(store, rand_n, s, false, base_cfg(4 * KIB))
        }),
    ];
    for (name, cfg) in variants {
        subjects.push(lat_subject(name, move |s| {
            rand_touch(store, rand_n, s, false, cfg())
        }));
    }
    subjects.push(lat_subject("lazy-inline", |s| {
        rand_touch(store, rand_n, s, true, base_cfg(4 * KIB))
    }));
    subjects.push(lat_subject("lazy-shared-tmpfs", |s| {
        rand_touch(shm, rand_n, s, false, shared_cfg(4 * KIB))
    }));
    // The experiment: the touching thread resolves its own fault in a SIGBUS handler.
    if let Some(source) = &source {
        subjects.push(lat_subject("sigbus-on-thread", |s| {
            sigbus_touch(source, rand_n, s)
        }));
    }
    if !quick {
        subjects.push(lat_subject("lazy-default-64K", |s| {
            rand_touch(store, rand_n, s, false, base_cfg(64 * KIB))
        }));
    }
    let c = bench.compare(case, LATENCY, subjects)?;
    bench.ratio(&c, "lazy-default", "anon-fault", "p50")?;
    bench.ratio(&c, "lazy-default", "anon-fault", "p99")?;
    bench.ratio(&c, "lazy-inline", "anon-fault", "p50")?;
    bench.ratio(&c, "lazy-shared-tmpfs", "anon-fault", "p50")?;
    if source.is_some() {
        bench.ratio(&c, "sigbus-on-thread", "anon-fault", "p50")?;
        bench.ratio(&c, "sigbus-on-thread", "lazy-default", "p50")?;
    }

    dirty_case(bench, if quick { 64 * MIB } else { 256 * MIB })?;

    nbd_cases(bench, env, len, rand_n)
}

/// A populated anonymous mapping of `len` bytes in 4 KiB pages.
fn populated(len: usize) -> Result<Mapping> {
    let map = Mapping::anonymous(len)?;
    map.advise(0, len, memsync_sys::Advice::NoHugePage)?;
    map.fill(0, len, 1);
    Ok(map)
}

/// One byte written to every page of `map`: ns per page.
fn write_pages(map: &Mapping, byte: u8) -> f64 {
    let t = Instant::now();
    for off in (0..map.len()).step_by(PAGE) {
        map.write_at(off, &[byte]);
    }
    t.elapsed().as_nanos() as f64 / (map.len() / PAGE) as f64
}

fn dirty_case(bench: &mut Bench, len: usize) -> Result<()> {
    let chunk = 64 * KIB;
    let plain = populated(len)?;
    let tracked = populated(len)?;
    let tracker = match DirtyTracker::new(&tracked, chunk) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            eprintln!("lazy: skipping dirty-tracked-writer: {e}");
            return Ok(());
        }
        Err(e) => return Err(e).context("tracking a mapping"),
    };
    let (mut a, mut b) = (0u8, 0u8);
    let mut first = true;
    let subjects = vec![
        Subject::new("untracked-writer", || {
            a = a.wrapping_add(1);
            Ok(write_pages(&plain, a))
        }),
        Subject::new("tracked-writer", || {
            let dirty = tracker.collect_bitmap()?;
            anyhow::ensure!(
                first || dirty.count() == dirty.len(),
                "the tracker reported {} of {} written chunks",
                dirty.count(),
                dirty.len()
            );
            first = false;
            b = b.wrapping_add(1);
            Ok(write_pages(&tracked, b))
        }),
    ];
    let c = bench.compare("dirty-tracked-writer", &[("per-page", "ns")], subjects)?;
    bench.ratio(&c, "tracked-writer", "untracked-writer", "per-page")?;
    Ok(())
}

/// Sequential read of the whole store through the client: 2 MiB requests, two in flight.
fn client_seq_read(rt: &tokio::runtime::Runtime, store: &DynStore, qd: usize) -> Result<f64> {
    let len = store.size() as usize;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..qd {
            let (store, next) = (Arc::clone(store), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2 * MIB];
                loop {
                    let off = next.fetch_add(2 * MIB, std::sync::atomic::Ordering::Relaxed);
                    if off >= len {
                        return anyhow::Ok(());
                    }
                    let n = (2 * MIB).min(len - off);
                    store.read(off as u64, &mut buf[..n]).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    Ok(gbps(len as u64, t.elapsed()))
}

/// 4 KiB read round trips through the client from a plain thread (as a fault handler does):
/// latencies in µs.
fn client_4k_reads(
    rt: &tokio::runtime::Runtime,
    store: &DynStore,
    n: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let mut buf = [0u8; PAGE];
    let mut lat = Vec::with_capacity(n);
    for off in random_pages(store.size() as usize, n, seed) {
        let t = Instant::now();
        rt.handle().block_on(store.read(off as u64, &mut buf))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// The same two cases from an NBD store on loopback TCP: memsync's NBD server serving a mem:
/// store in this process, read through memsync's NBD client.
fn nbd_cases(bench: &mut Bench, env: &Env<'_>, len: usize, rand_n: usize) -> Result<()> {
    let quick = bench.config.quick;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data = Arc::new(MemStore::new(len as u64));
    fill(&data, len)?;
    let want = store_hash(&(data.clone() as DynStore))?;
    // A small export for the whole-export 4 KiB round trips.
    let small_len = 16 * MIB;
    let small = Arc::new(MemStore::with_chunk_size(small_len as u64, PAGE as u64)?);
    fill(&small, small_len)?;
    let (server, port) = rt.block_on(async {
        let server = memsync_nbd::Server::new(memsync_nbd::ServerConfig::new(vec![
            memsync_nbd::Export::new("", data as DynStore),
            memsync_nbd::Export::new("small", small as DynStore),
        ]))?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        server.listen_tcp(l);
        anyhow::Ok((server, port))
    })?;
    let url = format!("nbd://127.0.0.1:{port}/");
    let mut reg = memsync_core::Registry::new();
    memsync_nbd::register(&mut reg);
    let store: DynStore = rt
        .block_on(reg.open(&url))
        .with_context(|| format!("opening {url}"))?;
    let nbd_cfg = |cfg: RegionConfig| RegionConfig {
        runtime: Some(rt.handle().clone()),
        ..cfg
    };

    let case = if quick {
        "nbd-seq-first-touch-256M"
    } else {
        "nbd-seq-first-touch-1G"
    };
    let (rt, store) = (&rt, &store);
    let c = bench.compare(
        case,
        &[("throughput", "GB/s")],
        vec![
            Subject::new("client-read-2M-qd2", || client_seq_read(rt, store, 2)),
            Subject::new("client-read-2M-qd8", || client_seq_read(rt, store, 8)),
            // The same server read by a C client with many requests in flight (a whole
            // command: start-up and handshakes included, so it is shown, not divided by).
            Subject::new("nbdcopy-read", || {
                let el = super::nbd::timed_command(
                    std::process::Command::new("nbdcopy").args([url.as_str(), "null:"]),
                )
                .context("running nbdcopy (scripts/setup.sh installs it)")?;
                Ok(gbps(len as u64, el))
            }),
            seq_subject("lazy-2M", store, want, || nbd_cfg(base_cfg(2 * MIB))),
            seq_subject("lazy-2M-pull", store, want, || nbd_cfg(pull_cfg(2 * MIB))),
        ],
    )?;
    bench.ratio(&c, "lazy-2M", "client-read-2M-qd2", "throughput")?;
    bench.ratio(&c, "lazy-2M-pull", "client-read-2M-qd2", "throughput")?;

    let case = "nbd-rand-4k-first-touch";
    let n = rand_n / 2;
    let c = bench.compare(
        case,
        LATENCY,
        vec![
            lat_subject("client-4k-read", |s| client_4k_reads(rt, store, n, s)),
            lat_subject("lazy-default", |s| {
                rand_touch(store, n, s, false, nbd_cfg(base_cfg(4 * KIB)))
            }),
            lat_subject("lazy-inline", |s| {
                rand_touch(store, n, s, true, nbd_cfg(base_cfg(4 * KIB)))
            }),
        ],
    )?;
    bench.ratio(&c, "lazy-default", "client-4k-read", "p50")?;
    bench.ratio(&c, "lazy-default", "client-4k-read", "p99")?;
    bench.ratio(&c, "lazy-inline", "client-4k-read", "p50")?;

    // One 4 KiB request in flight on one connection through the whole small export: the
    // memsync client and nbdcopy, both timed as whole commands.
    let case = "nbd-4k-qd1";
    let small_url = format!("nbd://127.0.0.1:{port}/small");
    let per_request = |el: Duration| el.as_secs_f64() * 1e6 / (small_len / PAGE) as f64;
    bench.pair(
        case,
        ("latency", "us"),
        Subject::new("memsync-client", || {
            let el = crate::nbd::memsync_read_command(
                &env.exe,
                &format!("{small_url}?connections=1"),
                &["--request-size", "4K", "--in-flight", "1"],
            )?;
            Ok(per_request(el))
        }),
        Subject::new("nbdcopy", || {
            Ok(per_request(crate::nbd::nbdcopy_4k_qd1(&small_url)?))
        }),
    )?;
    rt.block_on(server.shutdown())?;
    Ok(())
}
