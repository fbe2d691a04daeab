//! `memsync demo`: a guided tour on the embedded default store (`mem:`), with no external
//! service. Each step says what it does, does it, verifies the result, and adds its figures to
//! the summary printed at the end.
//!
//! Ctrl-C: a handler sets a flag the long loops check (so temporary directories are removed by
//! their guards as the tour unwinds) and kills the child processes at once (so nothing waits
//! on a peer that will never answer). If the tour has not unwound a few seconds later, the
//! handler removes the scratch directory itself and exits.

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use clap::Args;
use memsync_bench::gbps;
use memsync_core::ops;
use memsync_core::size::format_size;
use memsync_nbd::{Export, ListenAddr, Server, ServerConfig};
use memsync_region::{LazyRegion, RegionConfig};
use parking_lot::Mutex;
use rand::{RngCore, SeedableRng};

mod dsm;
mod migrate;
mod mount;
mod sync;
use crate::context::{Context, parse_size_arg, progress};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Child processes the tour started; the SIGINT handler kills them.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
/// The scratch directory, for the handler's last-resort cleanup.
static SCRATCH: Mutex<Option<PathBuf>> = Mutex::new(None);

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn install_sigint(ctx: &Context) -> Result<()> {
    let mut int = {
        let _g = ctx.rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
    };
    ctx.rt.spawn(async move {
        if int.recv().await.is_none() {
            return;
        }
        INTERRUPTED.store(true, Ordering::Relaxed);
        eprintln!("\nmemsync demo: interrupted, cleaning up");
        for c in CHILDREN.lock().iter_mut() {
            let _ = c.kill();
        }
        // A step blocked somewhere that never looks at the flag must not leave files behind.
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Some(d) = SCRATCH.lock().take() {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(130);
    });
    Ok(())
}

/// A child process registered with the SIGINT handler; killed and reaped when dropped.
struct ChildGuard(u32);

impl ChildGuard {
    fn register(c: Child) -> Self {
        let id = c.id();
        CHILDREN.lock().push(c);
        ChildGuard(id)
    }

    /// Wait for the child to exit by itself; returns whether it succeeded.
    fn wait(self) -> Result<bool> {
        let c = {
            let mut l = CHILDREN.lock();
            let i = l.iter().position(|c| c.id() == self.0);
            i.map(|i| l.remove(i))
        };
        std::mem::forget(self);
        match c {
            Some(mut c) => Ok(c.wait()?.success()),
            None => Ok(false),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let mut l = CHILDREN.lock();
        if let Some(i) = l.iter().position(|c| c.id() == self.0) {
            let mut c = l.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Tour<'a> {
    ctx: &'a Context,
    quick: bool,
    dir: tempfile::TempDir,
    step: usize,
    /// (step, figure, value) for the final table.
    summary: Vec<(String, String, String)>,
    started: Instant,
}

impl Tour<'_> {
    fn step(&mut self, title: &str, why: &str) -> Result<()> {
        check_interrupted()?;
        self.step += 1;
        outln!();
        outln!("== {}. {title}", self.step);
        for l in why.lines() {
            outln!("   {l}");
        }
        Ok(())
    }

    fn figure(&mut self, what: &str, value: String) {
        self.summary
            .push((format!("{}", self.step), what.to_owned(), value));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn print_summary(&self) {
        outln!();
        outln!(
            "== summary ({:.1} s in all)",
            self.started.elapsed().as_secs_f64()
        );
        let w = self.summary.iter().map(|s| s.1.len()).max().unwrap_or(0);
        for (step, what, value) in &self.summary {
            outln!("   {step:>2}  {what:<w$}  {value}");
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the store served, mapped and mounted.
    #[arg(long, default_value = "256M", value_parser = parse_size_arg)]
    pub size: u64,
    /// Smaller sizes (16 MiB at most) for a smoke run of every step.
    #[arg(long)]
    pub quick: bool,
    /// The tour's migration destination: receive a region of --size, print its BLAKE3.
    #[arg(long, hide = true)]
    pub receive: bool,
}

pub fn run(ctx: &Context, a: DemoArgs) -> Result<()> {
    if a.receive {
        return migrate::receive(ctx, a.size);
    }
    install_sigint(ctx)?;
    let dir = tempfile::Builder::new()
        .prefix("memsync-demo-")
        .tempdir()
        .context("creating a scratch directory")?;
    *SCRATCH.lock() = Some(dir.path().to_path_buf());
    let mut t = Tour {
        ctx,
        quick: a.quick,
        dir,
        step: 0,
        summary: Vec::new(),
        started: Instant::now(),
    };
    outln!(
        "memsync tour: everything runs on this machine, on the embedded mem: store, in {}",
        t.dir.path().display()
    );
    let size = if a.quick {
        a.size.min(16 << 20)
    } else {
        a.size
    };
    let r = serve_and_map(&mut t, size)
        .and_then(|()| migrate::run(&mut t))
        .and_then(|()| sync::run(&mut t))
        .and_then(|()| dsm::run(&mut t))
        .map(|()| t.print_summary());
    SCRATCH.lock().take();
    r
}

/// Random data with every 8th MiB left as a hole, as a VM image or heap would have.
async fn fill_random(store: &dyn memsync_core::Store, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut off = 0;
    let mut i = 0u64;
    while off < size {
        check_interrupted()?;
        let n = (size - off).min(1 << 20);
        if i % 8 != 7 {
            let mut b = vec![0u8; n as usize];
            rng.fill_bytes(&mut b);
            store.write(off, Bytes::from(b)).await?;
        }
        off += n;
        i += 1;
    }
    Ok(())
}

fn serve_and_map(t: &mut Tour<'_>, size: u64) -> Result<()> {
    let ctx = t.ctx;
    t.step(
        "serve a store over NBD, map it lazily, checksum it",
        &format!(
            "A {} mem: store is filled with random data (every 8th MiB left as a hole) and\n\
             exported by an NBD server running in this process on a unix socket, as\n\
             `memsync serve` does. A second store opens that export as an NBD client, and a\n\
             region maps it lazily: memory that fills itself chunk by chunk on page faults\n\
             (userfaultfd): each 2 MiB chunk is fetched by the page fault that first touches\n\
             it. Reading the whole region must give the source's BLAKE3.",
            format_size(size)
        ),
    )?;
    let mem_url = format!("mem:{size}");
    let mem = ctx.open(&mem_url)?;
    ctx.rt.block_on(fill_random(&*mem, size, 1))?;
    let want = ctx.rt.block_on(ops::checksum(&*mem, &|_| ()))?;
    outln!("   source {mem_url}: blake3 {want}");

    let sock = t.path("nbd.sock");
    let server = ctx.rt.block_on(async {
        let server = Server::new(ServerConfig::new(vec![Export::new("", mem.clone())]))?;
        let url = server
            .listen(&ListenAddr::parse(&format!(
                "nbd+unix:///?socket={}",
                sock.display()
            ))?)
            .await?;
        outln!("   serving {url}");
        anyhow::Ok(server)
    })?;
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let r = map_and_check(t, &url, want).and_then(|()| mount::run(t, &url, want));
    let stop = ctx.rt.block_on(server.shutdown());
    r?;
    stop.context("stopping the NBD server")?;
    Ok(())
}

fn map_and_check(t: &mut Tour<'_>, url: &str, want: blake3::Hash) -> Result<()> {
    let ctx = t.ctx;
    let store = ctx.open(url)?;
    let chunk = 2 << 20;
    let cfg = RegionConfig {
        chunk_size: chunk,
        handler_threads: 2,
        // Without the background puller every chunk arrives through the fault that first
        // touches it, which is what this step shows.
        prefetch: false,
        runtime: Some(ctx.rt.handle().clone()),
        ..RegionConfig::default()
    };
    let region =
        LazyRegion::new(store, cfg).context("mapping the export lazily (needs userfaultfd)")?;
    let len = region.len();
    let pb = progress(len as u64, "map");
    let mut buf = vec![0u8; 1 << 20];
    let mut h = blake3::Hasher::new();
    let start = Instant::now();
    let mut off = 0;
    while off < len {
        check_interrupted()?;
        let n = buf.len().min(len - off);
        region.read_faulting(off, &mut buf[..n]);
        h.update(&buf[..n]);
        pb.inc(n as u64);
        off += n;
    }
    let el = start.elapsed();
    pb.finish_and_clear();
    region.pause_pull();
    let _ = region.wait_pull(Duration::from_millis(10));
    let s = region.stats().snapshot();
    let got = h.finalize();
    outln!(
        "   mapped {} in {} chunks; read through page faults in {:.3} s ({:.2} GB/s)",
        format_size(len as u64),
        format_size(chunk as u64),
        el.as_secs_f64(),
        gbps(len as u64, el)
    );
    outln!(
        "   {} faults (p50 {:.0} us, p99 {:.0} us); chunks fetched: {} by faults, {} in the background, {} zero",
        s.faults,
        s.fault_p50.as_secs_f64() * 1e6,
        s.fault_p99.as_secs_f64() * 1e6,
        s.chunks_fault,
        s.chunks_background,
        s.chunks_zero
    );
    if got != want {
        bail!("the mapped region has blake3 {got}, the source {want}");
    }
    outln!("   checksum matches: {got}");
    t.figure(
        "lazy map over NBD",
        format!("{:.2} GB/s, {} faults", gbps(len as u64, el), s.faults),
    );
    t.figure(
        "fault service p50 (2 MiB chunk)",
        format!("{:.0} us", s.fault_p50.as_secs_f64() * 1e6),
    );
    Ok(())
}
