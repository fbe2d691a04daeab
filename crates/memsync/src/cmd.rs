//! The subcommands. Each opens stores through the one registry and reports errors with causes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_bench::{BenchConfig, gbps};
use memsync_core::ops::{self, CopyOptions};
use memsync_core::size::format_size;
use memsync_core::{ExtentKind, Store, redact};

use crate::context::{Context, parse_size_arg, progress};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The store URL, e.g. file:/tmp/disk.img, or a kernel NBD device, e.g. /dev/nbd0.
    pub store: String,
}

pub fn info(ctx: &Context, a: InfoArgs) -> Result<()> {
    if crate::device::is_device(&a.store) {
        return crate::device::info(ctx, &a.store);
    }
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

pub fn copy(ctx: &Context, a: CopyArgs) -> Result<()> {
    let src = ctx.open(&a.src)?;
    let dst = ctx.open(&a.dst)?;
    let pb = progress(src.size(), "copy");
    let t = Instant::now();
    let opts = CopyOptions {
        io_size: a.io_size,
        concurrency: a.concurrency,
        sparse: !a.no_sparse,
    };
    let copied = ctx
        .rt
        .block_on(ops::copy(&*src, &*dst, opts, &|n| pb.inc(n)))?;
    pb.finish_and_clear();
    let el = t.elapsed();
    outln!(
        "copied {} of data ({} total) in {:.3} s, {:.2} GB/s",
        format_size(copied),
        format_size(src.size()),
        el.as_secs_f64(),
        gbps(src.size(), el)
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ChecksumArgs {
    /// The store URL.
    pub store: String,
}

pub fn checksum(ctx: &Context, a: ChecksumArgs) -> Result<()> {
    let store = ctx.open(&a.store)?;
    let pb = progress(store.size(), "checksum");
    let h = ctx.rt.block_on(ops::checksum(&*store, &|n| pb.inc(n)))?;
    pb.finish_and_clear();
    outln!("{h}  {}", redact(&a.store));
    Ok(())
}

/// `memsync bench SUITE`, or `bench all` / `bench report`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub action: Option<BenchAction>,
    /// The suite to run; `memsync bench all` runs every one.
    #[arg(required = true, value_parser = clap::builder::PossibleValuesParser::new(memsync_bench::SUITES.iter().map(|s| s.name)))]
    pub suite: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchAction {
    /// Run every suite; one that fails does not stop the others (the exit status says so).
    All(AllArgs),
    /// Turn the results of `bench all --out DIR` into a Markdown report with SVG plots.
    Report(ReportArgs),
    /// A/B of two builds: compare the `--json` lines of a base and a new build (one or more
    /// rounds each, as `scripts/ab.sh` writes them) and say which measurements got slower
    /// beyond noise.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The base build's `--json` lines.
    pub base: PathBuf,
    /// The new build's `--json` lines.
    pub new: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
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

#[derive(Debug, Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Also write every measurement to DIR/results.jsonl and the machine (CPU, cores, kernel,
    /// memory, commit, date) with each suite's outcome to DIR/machine.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The directory `bench all --out` wrote.
    #[arg(long = "in", value_name = "DIR", default_value = "/var/tmp/bench-all")]
    pub input: PathBuf,
    /// Where README.md and the SVG plots go.
    #[arg(long, value_name = "DIR", default_value = "docs/bench")]
    pub out: PathBuf,
}

impl RunArgs {
    fn config(self) -> BenchConfig {
        BenchConfig {
            quick: self.quick,
            json: self.json,
            runs: self.runs,
            scratch: self.scratch.unwrap_or_else(std::env::temp_dir),
            results: None,
        }
    }
}

pub fn bench(ctx: &Context, a: BenchArgs) -> Result<()> {
    match a.action {
        Some(BenchAction::All(all)) => {
            memsync_bench::all::run_all(all.run.config(), all.out.as_deref(), &bench_env(ctx)?)
        }
        Some(BenchAction::Report(r)) => {
            let written = memsync_report::generate(&r.input, &r.out)?;
            for p in written {
                outln!("wrote {}", p.display());
            }
            Ok(())
        }
        Some(BenchAction::Compare(c)) => {
            let table = memsync_report::compare_files(&c.base, &c.new)?;
            outln!("{}", table.trim_end());
            Ok(())
        }
        None => {
            let suite = a.suite.context("a suite, `all` or `report`")?;
            memsync_bench::run(&suite, a.run.config(), &bench_env(ctx)?)
        }
    }
}

/// What the benchmark suites run with: this binary's registry, runtime and path. Also makes
/// SIGINT and SIGTERM stop the suites cleanly ([`memsync_bench::interrupt`]: the FUSE mounts
/// this process reads are aborted first, so no read of one can hang its exit); a second signal,
/// or 30 s without the suite unwinding, ends the process at once.
fn bench_env(ctx: &Context) -> Result<memsync_bench::Env<'_>> {
    use tokio::signal::unix::{SignalKind, signal};
    let _rt = ctx.rt.enter();
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    ctx.rt.spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        eprintln!("memsync: bench: stopping (a second signal ends it at once)");
        memsync_bench::interrupt();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
        std::process::exit(code);
    });
    Ok(memsync_bench::Env {
        registry: &ctx.registry,
        rt: &ctx.rt,
        exe: std::env::current_exe()?,
    })
}

/// `memsync bench-nbd-read URL`: a client read timed as a whole command, like nbdcopy's.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The store to read from start to end (the bytes go nowhere).
    pub url: String,
    /// Bytes per read.
    #[arg(long, default_value = "2M", value_parser = parse_size_arg)]
    pub request_size: u64,
    /// Reads in flight, each with a buffer of its own.
    #[arg(long, default_value_t = 32)]
    pub in_flight: u64,
}

pub fn bench_nbd_read(ctx: &Context, a: ReadArgs) -> Result<()> {
    memsync_bench::nbd::read_to_nowhere(&bench_env(ctx)?, &a.url, a.request_size, a.in_flight)
}

pub fn stores(ctx: &Context) -> Result<()> {
    for (scheme, help) in ctx.registry.schemes() {
        outln!("{scheme:<15} {help}");
    }
    Ok(())
}
