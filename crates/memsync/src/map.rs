//! `memsync map`: map a store lazily (userfaultfd), touch and checksum every byte through page
//! faults, and print the fault statistics. With `--cache DIR` the region is the frontend of a
//! managed mount: it maps a local cache (memsync-cache) whose remote is the store.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsync_cache::{CacheConfig, open_cache};
use memsync_core::DynStore;
use memsync_core::size::{format_size, parse_size};
use memsync_region::{Backing, FollowFaults, LazyRegion, RegionConfig};

use crate::context::Context;
use crate::mount::{ReinitArgs, cache_chunk, cache_state, close_cache};
use memsync_bench::gbps;

#[derive(Debug, Args)]
pub struct MapArgs {
    /// The store URL, e.g. mem:1G or nbd+unix:///?socket=/tmp/nbd.sock
    pub store: String,
    /// Bytes fetched per fault: a power of two from 4K to 1G.
    #[arg(long, default_value = "2M", value_parser = parse_chunk)]
    pub chunk: u64,
    /// Fault-handler threads (default 2).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not pull the rest of the region in the background (every chunk is fetched by a fault).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Back the region with a shared memfd (MINOR faults + UFFDIO_CONTINUE) instead of
    /// private anonymous memory.
    #[arg(long, conflicts_with_all = ["hugetlb", "shared"])]
    pub memfd: bool,
    /// Map the store's own pages instead of copying them into the region (MINOR faults +
    /// UFFDIO_CONTINUE: no copy, no fresh page): for a file: store on tmpfs (writes through
    /// the region go to the file), or with --cache DIR on tmpfs, e.g. under /dev/shm (the
    /// cache fetches into its local copy, which the region maps read-only).
    #[arg(long, conflicts_with = "hugetlb")]
    pub shared: bool,
    /// Copy each chunk into 4 KiB pages (UFFDIO_COPY) instead of moving it in as whole 2 MiB
    /// transparent huge pages: faster where fresh huge pages are dear, as on VMs that hand
    /// the memory they free back to their host (virtio-balloon free page reporting), slower
    /// where they are not (docs/perf.md, "Small pages").
    #[arg(long, conflicts_with_all = ["memfd", "shared", "hugetlb"])]
    pub small_pages: bool,
    /// Back the region with reserved huge pages (MAP_HUGETLB; reserve them first, as root:
    /// `echo N > /proc/sys/vm/nr_hugepages`). Needs a chunk of at least 2M.
    #[arg(long)]
    pub hugetlb: bool,
    /// Fetch missing chunks on the reading thread instead of through page faults.
    #[arg(long)]
    pub inline: bool,
    /// Map a managed cache of STORE kept in DIR instead of STORE itself: STORE becomes the
    /// remote of a local cache in DIR (created if missing) that keeps every chunk it fetches and
    /// pulls the rest in the background. Reusing DIR (same STORE and --cache-chunk) resumes:
    /// what is already local is not fetched again. At the end the cache is flushed and closed,
    /// and its statistics printed.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The cache's chunk size (with --cache): a power of two from 4K to 4M.
    #[arg(long, value_name = "SIZE", default_value = "1M", requires = "cache")]
    pub cache_chunk: String,
    #[command(flatten)]
    pub reinit: ReinitArgs,
}

fn parse_chunk(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(n) if n.is_power_of_two() && (4096..=1 << 30).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is not a power of two from 4K to 1G")),
        Err(e) => Err(e.to_string()),
    }
}

pub fn map(ctx: &Context, a: MapArgs) -> Result<()> {
    let (store, cache) = match &a.cache {
        None => (ctx.open(&a.store)?, None),
        Some(dir) => {
            let cfg = CacheConfig {
                chunk_size: cache_chunk("--cache-chunk", &a.cache_chunk)?,
                pull: true,
                reinit: a.reinit.reinit(),
                ..CacheConfig::default()
            };
            let cache = ctx
                .rt
                .block_on(open_cache(&ctx.registry, &a.store, dir, cfg))?;
            eprintln!("memsync: {}", cache_state(&cache));
            (ctx.track(&a.store, cache.clone() as DynStore), Some(cache))
        }
    };
    let cfg = RegionConfig {
        chunk_size: usize::try_from(a.chunk)?,
        handler_threads: a.threads.unwrap_or(2),
        prefetch: !a.no_prefetch,
        priority: Box::new(FollowFaults::default()),
        backing: if a.memfd {
            Backing::Memfd
        } else if a.shared {
            Backing::Shared
        } else if a.hugetlb {
            Backing::Hugetlb
        } else {
            Backing::Anonymous
        },
        huge_pages: !a.small_pages,
        use_move: !a.small_pages,
        runtime: Some(ctx.rt.handle().clone()),
        ..RegionConfig::default()
    };
    let t0 = Instant::now();
    let region = LazyRegion::new(store, cfg)
        .with_context(|| format!("mapping {} lazily", memsync_core::redact(&a.store)))?;
    let created = t0.elapsed();
    let len = region.len();
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message("map");
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        if a.inline {
            region
                .read_at(off, &mut buf[..n])
                .with_context(|| format!("reading {off}+{n}"))?;
        } else {
            // A chunk the store cannot deliver raises SIGBUS here (after the fetch deadline).
            region.read_faulting(off, &mut buf[..n]);
        }
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
        off += n;
    }
    let el = t.elapsed();
    pb.finish_and_clear();
    // Let the puller settle so its figures are final.
    region.pause_pull();
    let _ = region.wait_pull(Duration::from_millis(10));
    let s = region.stats().snapshot();
    let p = region.progress();
    outln!("{}  {}", hasher.finalize(), memsync_core::redact(&a.store));
    outln!(
        "mapped {} in chunks of {} ({}), created in {:.1} ms; touched and hashed in {:.3} s: {:.2} GB/s",
        format_size(len as u64),
        format_size(a.chunk),
        if region.user_mode_only() {
            "user-mode-only userfaultfd"
        } else {
            "userfaultfd"
        },
        created.as_secs_f64() * 1e3,
        el.as_secs_f64(),
        gbps(len as u64, el)
    );
    outln!(
        "faults: {} ({} waited for a fetch in progress, {} spurious); chunks fetched: {} by faults, {} in the background, {} inline, {} zero",
        s.faults,
        s.faults_waited,
        s.faults_spurious,
        s.chunks_fault,
        s.chunks_background,
        s.chunks_inline,
        s.chunks_zero
    );
    outln!(
        "bytes fetched: {} ({} in the background); installs: {} move, {} copy, {} continue, {} retried",
        format_size(s.bytes_fetched),
        format_size(s.bytes_background),
        s.installs_move,
        s.installs_copy,
        s.installs_continue,
        s.install_retries
    );
    outln!(
        "fault service latency: p50 {:.1} us, p99 {:.1} us, max {:.1} us; store read p50 {:.1} us; present {}/{} chunks",
        s.fault_p50.as_secs_f64() * 1e6,
        s.fault_p99.as_secs_f64() * 1e6,
        s.fault_max.as_secs_f64() * 1e6,
        s.fetch_p50.as_secs_f64() * 1e6,
        p.present_chunks,
        p.chunks
    );
    if let Some(e) = region.last_error() {
        outln!("errors: {} (last: {e})", region.errors().len());
    }
    drop(region);
    if let Some(cache) = cache {
        let summary = ctx
            .rt
            .block_on(close_cache(&cache))
            .with_context(|| format!("closing the cache in {}", cache.dir().display()))?;
        outln!("cache {}: {summary}", cache.dir().display());
    }
    Ok(())
}
