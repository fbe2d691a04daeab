//! Suite `lazy`: lazy (userfaultfd post-copy) regions from a `mem:` store, beside the limits
//! measured in the same run.
//!
//! - `seq-first-touch`: touch one byte of every page of a fresh region in order (GB/s of
//!   region). Limits: a plain `memcpy` of the same size into memory touched beforehand, and
//!   `memcpy-fresh`, the same into never touched memory advised for huge pages (the region must
//!   allocate and zero its pages too). Subjects: 2 MiB chunks with and without the background
//!   puller (following the faults), 64 KiB and (not with `--quick`) 4 KiB chunks.
//! - `rand-4k-first-touch`: fault latency of random first touches of distinct 4 KiB pages
//!   (4 KiB chunks, no prefetch), measured on the touching thread: p50 and p99. Limit: a plain
//!   anonymous first-touch fault measured the same way. Subjects are the places a fault can be
//!   served: the default (one polling handler plus a standby), two polling handlers, one
//!   handler, handlers pinned one per CPU, spinning handlers, and the inline path (the
//!   touching thread fetches the chunk itself, no fault at all). `sigbus-on-thread` is an
//!   experiment outside `LazyRegion`: a userfaultfd in `UFFD_FEATURE_SIGBUS` mode whose fault
//!   the touching thread resolves itself, in a `SIGBUS` handler, with `UFFDIO_COPY` from a
//!   mapping that already holds the store's data (`memsync_sys::SigbusResolver`; a store that
//!   answers at once), with its ratio to `anon-fault` and `lazy-default`.
//! - `nbd-seq-first-touch` and `nbd-rand-4k-first-touch`: the same two from an NBD store on
//!   loopback TCP (memsync's own NBD server serving a mem: store in this process, read through
//!   memsync's NBD client). Limits: the client's own sequential read (2 MiB requests, two in
//!   flight, like a fault handler beside the puller, and eight), nbdcopy reading the same
//!   export, one 4 KiB read round trip through the client, and nbdcopy's one-request round trip
//!   (`--request-size=4096 -C 1 -R 1`) against the same server (the nbdcopy figures only when
//!   nbdcopy is installed).
//!
//! The host re-backs freed guest memory lazily here (free page reporting), so the first touch
//! of fresh memory varies a lot from run to run: compare the medians of one run side by side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use memsync_core::{DynStore, Store};
use memsync_local::MemStore;
use memsync_region::{FollowFaults, LazyRegion, RegionConfig};
use memsync_sys::{Features, MapOptions, Mapping, SigbusResolver, Uffd};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};

use super::{Bench, gbps};

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

fn base_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        chunk_size: chunk,
        prefetch: false,
        ..RegionConfig::default()
    }
}

/// Sequential first touch of a new region: GB/s of region, timed from asking for the region
/// (its background pull starts at creation, so timing only the touches would credit it with
/// work done before the clock started).
fn seq_touch(store: &DynStore, cfg: impl Fn() -> RegionConfig) -> Result<f64> {
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
    Ok(gbps(len as u64, el))
}

fn memcpy_limit(len: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.iter_mut().step_by(PAGE).for_each(|b| *b = 2);
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let el = t.elapsed();
    std::hint::black_box(&dst);
    gbps(len as u64, el)
}

/// A memcpy of `len` bytes into fresh, never touched memory advised for transparent huge
/// pages: what a lazy region must do at least (allocate and zero its pages, then copy).
fn memcpy_fresh_limit(len: usize) -> Result<f64> {
    let src = vec![1u8; len];
    let mut dst = memsync_sys::Staging::new(len).context("mapping a buffer")?;
    let t = Instant::now();
    dst.as_mut_slice()[..len].copy_from_slice(&src);
    let el = t.elapsed();
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

fn report(
    bench: &mut Bench,
    case: &str,
    subject: &str,
    f: &mut dyn FnMut(u64) -> Result<Vec<f64>>,
) -> Result<(f64, f64)> {
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for r in 0..bench.config.runs() {
        let mut lat = f(r as u64)?;
        p50s.push(quantile(&mut lat, 0.5));
        p99s.push(quantile(&mut lat, 0.99));
    }
    let p50 = bench.record(case, subject, "p50", "us", &p50s);
    let p99 = bench.record(case, subject, "p99", "us", &p99s);
    Ok((p50, p99))
}

/// Builds a region configuration (a subject of a case).
type MakeCfg = fn() -> RegionConfig;

fn pull_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        prefetch: true,
        priority: Box::new(FollowFaults::default()),
        ..base_cfg(chunk)
    }
}

pub fn run(bench: &mut Bench) -> Result<()> {
    let quick = bench.config.quick;
    let len = if quick { 256 * MIB } else { 1 << 30 };
    let rand_n = if quick { 5_000 } else { 20_000 };
    let store = filled_store(len)?;

    // Sequential first touch.
    let case = if quick {
        "seq-first-touch-256M"
    } else {
        "seq-first-touch-1G"
    };
    let limit = bench.measure(case, "memcpy", "throughput", "GB/s", || {
        Ok(memcpy_limit(len))
    })?;
    let fresh = bench.measure(case, "memcpy-fresh", "throughput", "GB/s", || {
        memcpy_fresh_limit(len)
    })?;
    let m = bench.measure(case, "lazy-2M", "throughput", "GB/s", || {
        seq_touch(&store, || base_cfg(2 * MIB))
    })?;
    bench.ratio(case, "memcpy (pull off)", "GB/s", m, limit);
    bench.ratio(case, "memcpy-fresh (pull off)", "GB/s", m, fresh);
    let m = bench.measure(case, "lazy-2M-pull", "throughput", "GB/s", || {
        seq_touch(&store, || pull_cfg(2 * MIB))
    })?;
    bench.ratio(case, "memcpy (pull on)", "GB/s", m, limit);
    bench.ratio(case, "memcpy-fresh (pull on)", "GB/s", m, fresh);
    // hugetlb backing, if enough huge pages are reserved (the suite does not change sysctls).
    let free_huge = hugetlb_free_bytes();
    if free_huge >= len + 2 * MIB {
        bench.measure(case, "lazy-2M-hugetlb", "throughput", "GB/s", || {
            seq_touch(&store, || RegionConfig {
                backing: memsync_region::Backing::Hugetlb,
                ..base_cfg(2 * MIB)
            })
        })?;
    } else {
        eprintln!(
            "lazy: skipping lazy-2M-hugetlb: {} MiB of free huge pages, {} MiB needed (as root: \
             echo {} > /proc/sys/vm/nr_hugepages)",
            free_huge / MIB,
            len / MIB + 2,
            len / (2 * MIB) + 1
        );
    }
    bench.measure(case, "lazy-64K", "throughput", "GB/s", || {
        seq_touch(&store, || base_cfg(64 * KIB))
    })?;
    if !quick {
        bench.measure(case, "lazy-4K", "throughput", "GB/s", || {
            seq_touch(&store, || base_cfg(4 * KIB))
        })?;
    }

    // Random 4 KiB first touches: where the fault is served.
    let case = "rand-4k-first-touch";
    let (anon50, anon99) = report(bench, case, "anon-fault", &mut |s| {
        anon_touch(len, rand_n, s)
    })?;
    // The default configuration is the memsync figure compared with the limit.
    let (m50, m99) = report(bench, case, "lazy-default", &mut |s| {
        rand_touch(&store, rand_n, s, false, base_cfg(4 * KIB))
    })?;
    bench.ratio(case, "anon-fault-p50", "us", m50, anon50);
    bench.ratio(case, "anon-fault-p99", "us", m99, anon99);
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
    for (name, cfg) in variants {
        report(bench, case, name, &mut |s| {
            rand_touch(&store, rand_n, s, false, cfg())
        })?;
    }
    let (i50, _) = report(bench, case, "lazy-inline", &mut |s| {
        rand_touch(&store, rand_n, s, true, base_cfg(4 * KIB))
    })?;
    bench.ratio(case, "anon-fault-p50 (inline)", "us", i50, anon50);
    // The experiment: the touching thread resolves its own fault in a SIGBUS handler.
    if let Some(source) = sigbus_source(&store)? {
        let (s50, _) = report(bench, case, "sigbus-on-thread", &mut |s| {
            sigbus_touch(&source, rand_n, s)
        })?;
        bench.ratio(case, "anon-fault-p50 (sigbus)", "us", s50, anon50);
        bench.ratio(case, "lazy-default-p50 (sigbus)", "us", s50, m50);
    }
    if !quick {
        report(bench, case, "lazy-default-64K", &mut |s| {
            rand_touch(&store, rand_n, s, false, base_cfg(64 * KIB))
        })?;
    }
    drop(store);

    nbd_cases(bench, len, rand_n)
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

fn nbdcopy_available() -> bool {
    std::process::Command::new("nbdcopy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// nbdcopy reading a whole export with one 4 KiB request in flight: µs per request, or
/// `None` if nbdcopy is not installed.
fn nbdcopy_4k(url: &str, size: usize) -> Result<Option<f64>> {
    let t = Instant::now();
    let o = match std::process::Command::new("nbdcopy")
        .args([
            "--request-size=4096",
            "-C",
            "1",
            "-R",
            "1",
            "--no-extents",
            url,
            "null:",
        ])
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running nbdcopy"),
    };
    let el = t.elapsed();
    anyhow::ensure!(
        o.status.success(),
        "nbdcopy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(Some(el.as_secs_f64() * 1e6 / (size / PAGE) as f64))
}

/// The same two cases from an NBD store on loopback TCP: memsync's NBD server serving a mem:
/// store in this process, read through memsync's NBD client.
fn nbd_cases(bench: &mut Bench, len: usize, rand_n: usize) -> Result<()> {
    let quick = bench.config.quick;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data = Arc::new(MemStore::new(len as u64));
    fill(&data, len)?;
    // A small export for nbdcopy, which always copies a whole export.
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
    let limit = bench.measure(case, "client-read-2M-qd2", "throughput", "GB/s", || {
        client_seq_read(&rt, &store, 2)
    })?;
    bench.measure(case, "client-read-2M-qd8", "throughput", "GB/s", || {
        client_seq_read(&rt, &store, 8)
    })?;
    if nbdcopy_available() {
        // The same server read by a C client with many requests in flight.
        bench.measure(case, "nbdcopy-read", "throughput", "GB/s", || {
            let t = Instant::now();
            let o = std::process::Command::new("nbdcopy")
                .args([url.as_str(), "null:"])
                .output()
                .context("running nbdcopy")?;
            anyhow::ensure!(
                o.status.success(),
                "nbdcopy failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(gbps(len as u64, t.elapsed()))
        })?;
    }
    let m = bench.measure(case, "lazy-2M", "throughput", "GB/s", || {
        seq_touch(&store, || nbd_cfg(base_cfg(2 * MIB)))
    })?;
    bench.ratio(case, "client-read (pull off)", "GB/s", m, limit);
    let m = bench.measure(case, "lazy-2M-pull", "throughput", "GB/s", || {
        seq_touch(&store, || nbd_cfg(pull_cfg(2 * MIB)))
    })?;
    bench.ratio(case, "client-read (pull on)", "GB/s", m, limit);

    let case = "nbd-rand-4k-first-touch";
    let n = rand_n / 2;
    let (c50, c99) = report(bench, case, "client-4k-read", &mut |s| {
        client_4k_reads(&rt, &store, n, s)
    })?;
    let (m50, m99) = report(bench, case, "lazy-default", &mut |s| {
        rand_touch(&store, n, s, false, nbd_cfg(base_cfg(4 * KIB)))
    })?;
    bench.ratio(case, "client-4k-read-p50", "us", m50, c50);
    bench.ratio(case, "client-4k-read-p99", "us", m99, c99);
    let (i50, _) = report(bench, case, "lazy-inline", &mut |s| {
        rand_touch(&store, n, s, true, nbd_cfg(base_cfg(4 * KIB)))
    })?;
    bench.ratio(case, "client-4k-read-p50 (inline)", "us", i50, c50);
    let small_url = format!("nbd://127.0.0.1:{port}/small");
    if nbdcopy_available() {
        let k = bench.measure(case, "nbdcopy-4k-qd1", "latency", "us", || {
            nbdcopy_4k(&small_url, small_len)?.context("nbdcopy vanished")
        })?;
        bench.ratio(case, "nbdcopy-4k-qd1 (p50 vs mean)", "us", m50, k);
    } else {
        eprintln!(
            "lazy: nbdcopy not installed, skipping the nbdcopy reference (scripts/setup.sh installs it)"
        );
    }
    drop(store);
    rt.block_on(server.shutdown())?;
    Ok(())
}
