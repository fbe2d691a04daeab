//! The subcommands. Each opens stores through the one registry and reports errors with causes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use bytes::{Bytes, BytesMut};
use clap::Args;
use futures_util::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use memsync_core::layers::Stats;
use memsync_core::size::{format_size, parse_size};
use memsync_core::{DynStore, ExtentKind, Registry, Store, redact};
use parking_lot::Mutex;
use rand::{RngCore, SeedableRng};

use crate::bench::{self, Bench, BenchConfig};

/// Everything a command needs: the store registry, a runtime, and the stores to report metrics of.
pub struct Context {
    pub registry: Registry,
    pub rt: tokio::runtime::Runtime,
    metrics: Option<PathBuf>,
    opened: Mutex<Vec<(String, Arc<Stats<DynStore>>)>>,
}

/// The registry with every store compiled into this binary.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    memsync_local::register(&mut r);
    memsync_nbd::register(&mut r);
    memsync_redis::register(&mut r);
    memsync_s3::register(&mut r);
    memsync_cql::register(&mut r);
    r
}

impl Context {
    pub fn new(metrics: Option<PathBuf>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        Context {
            registry: registry(),
            rt,
            metrics,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// Open a store URL. Every store is wrapped in a stats layer, reported with `--metrics`.
    pub fn open(&self, url: &str) -> Result<DynStore> {
        let store = self
            .rt
            .block_on(self.registry.open(url))
            .with_context(|| format!("cannot open {}", redact(url)))?;
        Ok(self.track(url, store))
    }

    /// Wrap a store opened some other way (e.g. a cache) in a stats layer reported with
    /// `--metrics` under the label `url`.
    pub fn track(&self, url: &str, store: DynStore) -> DynStore {
        let stats = Arc::new(Stats::new(store));
        self.opened.lock().push((url.to_owned(), stats.clone()));
        stats
    }

    fn stats_of(&self, url: &str) -> Option<Arc<Stats<DynStore>>> {
        self.opened
            .lock()
            .iter()
            .rev()
            .find(|(u, _)| u == url)
            .map(|(_, s)| s.clone())
    }

    /// Write Prometheus text for every opened store to the `--metrics` file.
    pub fn write_metrics(&self) -> Result<()> {
        let Some(path) = &self.metrics else {
            return Ok(());
        };
        let mut text = String::new();
        for (url, stats) in self.opened.lock().iter() {
            // A URL's password or keys must not end up in a metrics file.
            let label = format!(
                "store=\"{}\"",
                redact(url).replace('\\', "\\\\").replace('"', "\\\"")
            );
            text.push_str(&stats.render_prometheus("memsync_store", &label));
        }
        std::fs::write(path, text).with_context(|| format!("writing metrics to {}", path.display()))
    }
}

pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    // Hidden when stderr is not a terminal (indicatif does that), so logs and CI stay clean.
    pb
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The store URL, e.g. file:/tmp/disk.img
    pub store: String,
}

pub fn info(ctx: &Context, a: InfoArgs) -> Result<()> {
    let store = ctx.open(&a.store)?;
    let caps = store.caps();
    outln!("store:        {}", redact(&a.store));
    outln!(
        "size:         {} ({} bytes)",
        format_size(store.size()),
        store.size()
    );
    outln!("read-only:    {}", caps.read_only);
    outln!("block size:   {}", caps.block_size);
    outln!("preferred io: {}", format_size(caps.preferred_io));
    outln!("max io:       {}", format_size(caps.max_io));
    outln!(
        "trim: {}  fast zero: {}  extents: {}  flush: {}  multi-conn: {}",
        caps.trim,
        caps.fast_zero,
        caps.extents,
        caps.flush,
        caps.multi_conn
    );
    let (data, zero, hole) = ctx.rt.block_on(allocation(&*store))?;
    outln!(
        "allocation:   data {}  zero {}  hole {}",
        format_size(data),
        format_size(zero),
        format_size(hole)
    );
    Ok(())
}

/// Bytes of data, zero and hole extents across the whole store.
async fn allocation(store: &dyn Store) -> Result<(u64, u64, u64)> {
    let (mut data, mut zero, mut hole) = (0, 0, 0);
    let mut off = 0;
    let size = store.size();
    while off < size {
        let len = (size - off).min(1 << 30);
        for e in store.extents(off, len).await? {
            match e.kind {
                ExtentKind::Data => data += e.len,
                ExtentKind::Zero => zero += e.len,
                ExtentKind::Hole => hole += e.len,
            }
        }
        off += len;
    }
    Ok((data, zero, hole))
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source store URL.
    pub src: String,
    /// Destination store URL (at least as large as the source).
    pub dst: String,
    /// Bytes per request.
    #[arg(long, default_value = "1M", value_parser = parse_size_arg)]
    pub io_size: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Write zeros for holes instead of zeroing them with write_zeroes/trim.
    #[arg(long)]
    pub no_sparse: bool,
}

pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) if n > 256 << 20 => Err("must be at most 256M".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Copy `src` to `dst` with `concurrency` requests in flight; returns bytes of data copied.
pub async fn copy_store(
    src: &DynStore,
    dst: &DynStore,
    io_size: u64,
    concurrency: usize,
    sparse: bool,
    pb: &ProgressBar,
) -> Result<u64> {
    let size = src.size();
    if dst.size() < size {
        bail!(
            "destination is smaller ({} bytes) than the source ({} bytes)",
            dst.size(),
            size
        );
    }
    let mut copied = 0;
    let mut off = 0;
    while off < size {
        let window = (size - off).min(1 << 30);
        let extents = src
            .extents(off, window)
            .await
            .context("reading source extents")?;
        let mut pieces = Vec::new();
        for e in extents {
            if e.kind.reads_zero() && sparse {
                dst.write_zeroes(e.offset, e.len)
                    .await
                    .with_context(|| format!("zeroing {}+{} in destination", e.offset, e.len))?;
                pb.inc(e.len);
                continue;
            }
            let mut p = e.offset;
            while p < e.end() {
                let n = (e.end() - p).min(io_size);
                pieces.push((p, n));
                p += n;
            }
        }
        let mut s = stream::iter(pieces)
            .map(|(p, n)| async move {
                let mut buf = BytesMut::zeroed(n as usize);
                src.read(p, &mut buf)
                    .await
                    .with_context(|| format!("reading {p}+{n} from source"))?;
                dst.write(p, buf.freeze())
                    .await
                    .with_context(|| format!("writing {p}+{n} to destination"))?;
                Ok::<u64, anyhow::Error>(n)
            })
            .buffer_unordered(concurrency.max(1));
        while let Some(r) = s.next().await {
            let n = r?;
            copied += n;
            pb.inc(n);
        }
        off += window;
    }
    dst.flush().await.context("flushing destination")?;
    Ok(copied)
}

pub fn copy(ctx: &Context, a: CopyArgs) -> Result<()> {
    let src = ctx.open(&a.src)?;
    let dst = ctx.open(&a.dst)?;
    let pb = progress(src.size(), "copy");
    let t = Instant::now();
    let copied = ctx.rt.block_on(copy_store(
        &src,
        &dst,
        a.io_size,
        a.concurrency,
        !a.no_sparse,
        &pb,
    ))?;
    pb.finish_and_clear();
    let el = t.elapsed();
    outln!(
        "copied {} of data ({} total) in {:.3} s, {:.2} GB/s",
        format_size(copied),
        format_size(src.size()),
        el.as_secs_f64(),
        bench::gbps(src.size(), el)
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ChecksumArgs {
    /// The store URL.
    pub store: String,
}

/// BLAKE3 of the store's whole contents, read in 4 MiB pieces with reads kept in flight.
pub async fn checksum_store(store: &DynStore, pb: &ProgressBar) -> Result<blake3::Hash> {
    const PIECE: u64 = 4 << 20;
    let size = store.size();
    let pieces = (0..size.div_ceil(PIECE)).map(|i| (i * PIECE, (size - i * PIECE).min(PIECE)));
    let mut s = stream::iter(pieces)
        .map(|(off, n)| async move {
            let mut buf = BytesMut::zeroed(n as usize);
            store
                .read(off, &mut buf)
                .await
                .with_context(|| format!("reading {off}+{n}"))?;
            Ok::<Bytes, anyhow::Error>(buf.freeze())
        })
        .buffered(4);
    let mut h = blake3::Hasher::new();
    while let Some(b) = s.next().await {
        let b = b?;
        h.update(&b);
        pb.inc(b.len() as u64);
    }
    Ok(h.finalize())
}

pub fn checksum(ctx: &Context, a: ChecksumArgs) -> Result<()> {
    let store = ctx.open(&a.store)?;
    let pb = progress(store.size(), "checksum");
    let h = ctx.rt.block_on(checksum_store(&store, &pb))?;
    pb.finish_and_clear();
    outln!("{h}  {}", redact(&a.store));
    Ok(())
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The suite to run (see the list below).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(bench::SUITES.iter().map(|s| s.0)))]
    pub suite: String,
    /// Fewer runs and smaller sizes, for smoke runs (each suite under 30 s).
    #[arg(long)]
    pub quick: bool,
    /// One JSON object per line: suite, case, subject, metric, value, unit, runs, min, max.
    #[arg(long)]
    pub json: bool,
    /// Repetitions per case (default 7, or 3 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Directory for scratch files (default: the system temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

pub fn bench(ctx: &Context, a: BenchArgs) -> Result<()> {
    let config = BenchConfig {
        quick: a.quick,
        json: a.json,
        runs: a.runs,
        scratch: a.scratch.unwrap_or_else(std::env::temp_dir),
    };
    let mut b = Bench::new(&a.suite, config);
    match a.suite.as_str() {
        "store" => bench::store::run(&mut b, &ctx.registry),
        "stores" => bench::stores::run(&mut b, &ctx.registry),
        "nbd" => bench::nbd::run(&mut b, ctx),
        "lazy" => bench::lazy::run(&mut b),
        "mount" => bench::mount::run(&mut b, ctx),
        "sync" => bench::sync::run(&mut b, ctx),
        "migrate" => bench::migrate::run(&mut b, ctx),
        "dsm" => bench::dsm::run(&mut b),
        other => bail!("unknown suite {other:?}"),
    }
}

pub fn stores(ctx: &Context) -> Result<()> {
    for (scheme, help) in ctx.registry.schemes() {
        outln!("{scheme:<15} {help}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo store.
    #[arg(long, default_value = "256M", value_parser = parse_size_arg)]
    pub size: u64,
    /// Skip the benchmark at the end.
    #[arg(long)]
    pub no_bench: bool,
}

pub fn demo(ctx: &Context, a: DemoArgs) -> Result<()> {
    let size = a.size;
    let mem_url = format!("mem:{size}");
    outln!(
        "1. opening the embedded default store {mem_url} and writing random data (every 8th MiB left as a hole)"
    );
    let mem = ctx.open(&mem_url)?;
    let t = Instant::now();
    ctx.rt.block_on(async {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut off = 0;
        let mut i = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20);
            if i % 8 != 7 {
                let mut b = vec![0u8; n as usize];
                rng.fill_bytes(&mut b);
                mem.write(off, Bytes::from(b)).await?;
            }
            off += n;
            i += 1;
        }
        Ok::<(), memsync_core::StoreError>(())
    })?;
    outln!(
        "   wrote {} in {:.3} s",
        format_size(size),
        t.elapsed().as_secs_f64()
    );
    let hidden = ProgressBar::hidden();
    let h1 = ctx.rt.block_on(checksum_store(&mem, &hidden))?;
    let (data, _, hole) = ctx.rt.block_on(allocation(&*mem))?;
    outln!(
        "   blake3 {h1}; allocated {} of data, {} of holes",
        format_size(data),
        format_size(hole)
    );

    let dir = std::env::temp_dir().join(format!("memsync-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let dir_url = format!("dir:{}?size={size}&chunk=1M", dir.display());
    outln!("2. copying it to {dir_url} (holes are skipped)");
    let dst = ctx.open(&dir_url)?;
    let pb = progress(size, "copy");
    let t = Instant::now();
    let copied = ctx
        .rt
        .block_on(copy_store(&mem, &dst, 1 << 20, 8, true, &pb))?;
    pb.finish_and_clear();
    let el = t.elapsed();
    outln!(
        "   copied {} of data in {:.3} s ({:.2} GB/s of store)",
        format_size(copied),
        el.as_secs_f64(),
        bench::gbps(size, el)
    );
    let h2 = ctx.rt.block_on(checksum_store(&dst, &hidden))?;
    if h1 != h2 {
        bail!("verification failed: {mem_url} has {h1} but the copy has {h2}");
    }
    outln!("3. verified: the copy has the same blake3 {h2}");
    if let Some(s) = ctx.stats_of(&dir_url) {
        let snap = s.snapshot();
        for op in snap.ops() {
            outln!("   {}", op);
        }
    }
    if !a.no_bench {
        outln!("4. store benchmark (quick): each store beside memcpy/pread on this machine");
        let config = BenchConfig {
            quick: true,
            json: false,
            runs: None,
            scratch: std::env::temp_dir(),
        };
        let mut b = Bench::new("store", config);
        bench::store::run(&mut b, &ctx.registry)?;
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
