//! `memsync uffd-handler`: Firecracker's UFFD page-fault handler serving guest memory from a
//! store; `memsync ch-restore`: the sending side of a Cloud Hypervisor on-demand restore whose
//! memory comes from a store. The protocols live in memsync-vmm.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_cache::{CacheConfig, open_cache};
use memsync_core::DynStore;
use memsync_core::size::parse_size;
use memsync_vmm::{ch, firecracker};

use crate::context::Context;
use crate::mount::{ReinitArgs, cache_chunk, cache_state, close_cache};

#[derive(Debug, Args)]
pub struct UffdHandlerArgs {
    /// The guest memory: the snapshot's memory file as a store URL (file:PATH, nbd://, redis://...).
    pub store: String,
    /// The Unix socket Firecracker connects to (its `mem_backend.backend_path`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Bytes fetched per fault (a power of two, at least the page size; lowered to divide every
    /// region).
    #[arg(long, default_value = "64K")]
    pub chunk: String,
    /// Do not pull the whole memory in the background after the first fault.
    #[arg(long)]
    pub no_pull: bool,
    /// Page-access hint: a text file of memory-file offsets (one a line) pulled first, in order.
    #[arg(long, value_name = "FILE")]
    pub hint: Option<PathBuf>,
    /// Seconds a fault waits for the store before its chunk is poisoned (the vCPU gets SIGBUS).
    #[arg(long, default_value_t = 30)]
    pub deadline: u64,
    /// Serve a managed cache of STORE kept in DIR (see `memsync map --cache`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The cache's chunk size (with --cache).
    #[arg(long, value_name = "SIZE", default_value = "1M", requires = "cache")]
    pub cache_chunk: String,
    /// Serve this many VMMs, each on its own connection to --socket and with its own
    /// userfaultfd, at the same time and from the one store (and cache): a fleet of microVMs
    /// restored from one snapshot. 0: accept VMMs until SIGINT/SIGTERM. The command ends when
    /// every VMM it accepted has exited.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vmms: usize,
    #[command(flatten)]
    pub reinit: ReinitArgs,
}

#[derive(Debug, Args)]
pub struct ChRestoreArgs {
    /// The guest RAM: its slots back to back by ascending guest address, as a store URL.
    pub store: String,
    /// The socket Cloud Hypervisor listens on (`receive-migration receiver_url=unix:PATH,memory_mode=postcopy`).
    #[arg(long)]
    pub socket: PathBuf,
    /// The snapshot's VmMigrationConfig JSON (the offload daemon's migration_config.json).
    #[arg(long)]
    pub config: PathBuf,
    /// The snapshot's device state JSON (state.json).
    #[arg(long)]
    pub state: PathBuf,
    /// Give Cloud Hypervisor shared memory (memfds) and write faulted pages into it, instead of
    /// sending each page inline.
    #[arg(long)]
    pub shared: bool,
    /// Resume the VM (Complete) instead of leaving it paused (CompletePaused).
    #[arg(long)]
    pub resume: bool,
}

fn stop_on_signals(ctx: &Context) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    ctx.rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        s.store(true, Ordering::Release);
    });
    stop
}

pub fn uffd_handler(ctx: &Context, a: UffdHandlerArgs) -> Result<()> {
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
    let chunk =
        usize::try_from(parse_size(&a.chunk).map_err(|e| anyhow::anyhow!("--chunk: {e}"))?)?;
    if !chunk.is_power_of_two() || chunk < 4096 {
        anyhow::bail!("--chunk {chunk}: a power of two of at least 4K");
    }
    let hint = match &a.hint {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the hint {}", p.display()))?,
        ),
        None => None,
    };
    let cfg = firecracker::HandlerConfig {
        chunk_size: chunk,
        pull: !a.no_pull,
        hint,
        fetch_deadline: std::time::Duration::from_secs(a.deadline),
        runtime: Some(ctx.rt.handle().clone()),
        ..firecracker::HandlerConfig::default()
    };
    let stop = stop_on_signals(ctx);
    let socket = a.socket.clone();
    let listening = || eprintln!("memsync: listening on {}", socket.display());
    if a.vmms == 1 {
        let (h, exit) = firecracker::serve_one(&a.socket, store, cfg, &stop, listening)
            .with_context(|| format!("serving Firecracker on {}", a.socket.display()))?;
        report_vmm(&h, exit);
    } else {
        let failed = std::sync::atomic::AtomicUsize::new(0);
        let n = firecracker::serve_many(
            &a.socket,
            store,
            &cfg,
            &stop,
            (a.vmms > 0).then_some(a.vmms),
            listening,
            |served| match served {
                Ok((h, exit)) => report_vmm(&h, exit),
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("memsync: a VMM could not be served: {e}");
                }
            },
        )
        .with_context(|| format!("serving Firecracker on {}", a.socket.display()))?;
        let failed = failed.into_inner();
        outln!("memsync: served {n} VMMs, {failed} failed");
        if failed > 0 {
            anyhow::bail!("{failed} of {n} VMMs could not be served");
        }
    }
    if let Some(cache) = cache {
        ctx.rt.block_on(close_cache(&cache))?;
    }
    Ok(())
}

/// One line for a VMM served to its end, and its first chunk errors.
fn report_vmm(h: &firecracker::Handler, exit: firecracker::Exit) {
    let s = h.stats().snapshot();
    let p = h.region().progress();
    let errors = h.errors();
    let why = match exit {
        firecracker::Exit::VmmExited => "the VMM exited",
        firecracker::Exit::Stopped => "stopped by a signal",
    };
    outln!(
        "memsync: {why} (pid {}); {} bytes of guest memory in chunks of {}: {} faults, {}/{} chunks present ({} by faults, {} pulled; {} zero-filled without a read), {} REMOVE events, {} chunk errors, {} refused messages",
        h.peer().pid,
        h.memory_size(),
        h.chunk_size(),
        s.faults,
        p.present_chunks,
        p.chunks,
        s.chunks_fault,
        s.chunks_background,
        s.chunks_zero,
        s.removes,
        errors.len(),
        h.second_messages()
    );
    for e in errors.iter().take(5) {
        eprintln!("memsync: chunk error: {e}");
    }
}

pub fn ch_restore(ctx: &Context, a: ChRestoreArgs) -> Result<()> {
    let store = ctx.open(&a.store)?;
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let r = ch::Restore {
        config: read(&a.config)?,
        state: read(&a.state)?,
        store,
        shared: a.shared,
        resume: a.resume,
        runtime: ctx.rt.handle().clone(),
    };
    let report = r
        .run(&a.socket)
        .with_context(|| format!("restoring through {}", a.socket.display()))?;
    outln!(
        "memsync: restore done: {} page faults served ({} bytes), {} failed",
        report.faults,
        report.bytes,
        report.failed
    );
    Ok(())
}
