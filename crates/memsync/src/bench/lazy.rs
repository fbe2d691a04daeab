//! Suite `lazy`: lazy (userfaultfd post-copy) regions from a `mem:` store, beside the limits
//! measured in the same run.
//!
//! - `seq-first-touch`: touch one byte of every page of a fresh region in order (GB/s of
//!   region). Limit: a plain `memcpy` of the same size. Subjects: 2 MiB chunks with and without
//!   the background puller, 64 KiB and 4 KiB chunks.
//! - `rand-4k-first-touch`: fault latency of random first touches of distinct 4 KiB pages
//!   (4 KiB chunks, no prefetch), measured on the touching thread: p50 and p99. Limit: a plain
//!   anonymous first-touch fault measured the same way. Subjects are the places a fault can be
//!   served: a blocking handler, an adaptively spinning handler, and the inline path (the
//!   touching thread fetches the chunk itself, no fault at all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use memsync_core::{DynStore, Store};
use memsync_local::MemStore;
use memsync_region::{FollowFaults, LazyRegion, RegionConfig};
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
    })?;
    Ok(store)
}

fn base_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        chunk_size: chunk,
        prefetch: false,
        ..RegionConfig::default()
    }
}

/// Sequential first touch of a new region: GB/s of region.
fn seq_touch(store: &DynStore, cfg: impl Fn() -> RegionConfig) -> Result<f64> {
    let region = LazyRegion::new(Arc::clone(store), cfg()).context("creating the region")?;
    let len = region.len();
    let mut b = [0u8; 1];
    let t = Instant::now();
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

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return f64::NAN;
    }
    let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
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
    let m = bench.measure(case, "lazy-2M", "throughput", "GB/s", || {
        seq_touch(&store, || base_cfg(2 * MIB))
    })?;
    bench.ratio(case, "memcpy", "GB/s", m, limit);
    let m = bench.measure(case, "lazy-2M-pull", "throughput", "GB/s", || {
        seq_touch(&store, || RegionConfig {
            prefetch: true,
            priority: Box::new(FollowFaults::default()),
            ..base_cfg(2 * MIB)
        })
    })?;
    bench.ratio(case, "memcpy", "GB/s", m, limit);
    bench.measure(case, "lazy-64K", "throughput", "GB/s", || {
        seq_touch(&store, || base_cfg(64 * KIB))
    })?;
    bench.measure(case, "lazy-4K", "throughput", "GB/s", || {
        seq_touch(&store, || base_cfg(4 * KIB))
    })?;

    // Random 4 KiB first touches: where the fault is served.
    let case = "rand-4k-first-touch";
    let runs = bench.config.runs();
    let report = |bench: &mut Bench,
                  subject: &str,
                  f: &mut dyn FnMut(u64) -> Result<Vec<f64>>|
     -> Result<(f64, f64)> {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for r in 0..runs {
            let mut lat = f(r as u64)?;
            p50s.push(quantile(&mut lat, 0.5));
            p99s.push(quantile(&mut lat, 0.99));
        }
        let p50 = bench.record(case, subject, "p50", "us", &p50s);
        let p99 = bench.record(case, subject, "p99", "us", &p99s);
        Ok((p50, p99))
    };
    let (anon50, anon99) = report(bench, "anon-fault", &mut |s| anon_touch(len, rand_n, s))?;
    // The default handler (blocking) is the memsync figure compared with the limit.
    let (m50, m99) = report(bench, "lazy-block", &mut |s| {
        rand_touch(&store, rand_n, s, false, base_cfg(4 * KIB))
    })?;
    bench.ratio(case, "anon-fault-p50", "us", m50, anon50);
    bench.ratio(case, "anon-fault-p99", "us", m99, anon99);
    report(bench, "lazy-spin-200us", &mut |s| {
        let cfg = RegionConfig {
            spin: Duration::from_micros(200),
            ..base_cfg(4 * KIB)
        };
        rand_touch(&store, rand_n, s, false, cfg)
    })?;
    report(bench, "lazy-block-1thr", &mut |s| {
        rand_touch(
            &store,
            rand_n,
            s,
            false,
            RegionConfig {
                spin: Duration::ZERO,
                handler_threads: 1,
                ..base_cfg(4 * KIB)
            },
        )
    })?;
    let (i50, _) = report(bench, "lazy-inline", &mut |s| {
        rand_touch(&store, rand_n, s, true, base_cfg(4 * KIB))
    })?;
    bench.ratio(case, "anon-fault-p50", "us", i50, anon50);
    report(bench, "lazy-block-64K", &mut |s| {
        rand_touch(&store, rand_n, s, false, base_cfg(64 * KIB))
    })?;
    Ok(())
}
