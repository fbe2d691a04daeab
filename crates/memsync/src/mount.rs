//! `memsync mount`: a managed mount. A local cache of a remote store (background pull, push,
//! persisted chunk map), exposed as a FUSE file and/or re-exported over NBD, until
//! SIGINT/SIGTERM; then a final flush and a clean unmount. With `--sync-to`, continuous push of
//! what is written through the mount to a second copy (a `Tracked` layer over the cache is the
//! change source of a `Pusher`).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsync_cache::{Cache, CacheConfig, Reinit, open_cache};
use memsync_core::size::{parse_duration, parse_size};
use memsync_core::{DynStore, Store as _};
use memsync_fuse::{FuseMount, FuseOptions};
use memsync_nbd::device::Interface;
use memsync_sync::{Pusher, Source, SyncOptions, Tracked};

use crate::context::{Context, parse_size_arg};
use crate::mount_migrate::{FlushedTracking, MigratePlan, MountMigrateArgs, migrate_on_signal};
use crate::sync::{Bar, DestUrl, print_report, print_round};

#[derive(Debug, Args)]
#[command(after_help = "\
EXAMPLES:
  memsync mount nbd://nas:10809/ --cache /var/tmp/cache --fuse /mnt/m --name disk
  memsync mount nbd://nas:10809/ --cache /var/tmp/cache --nbd nbd://127.0.0.1:10810
  memsync mount nbd://nas:10809/ --cache /var/tmp/cache --fuse /mnt/m \\
      --sync-to memsync://backup:7070 --sync-every 30s      (kill -USR1 PID: a round now)
    keeps a second copy up to date with what is written through the mount: one delta sync
    at the start, then rounds that send only the chunks written since the last round
    (tracked as they are written: nothing is hashed to find them), and a last round after
    the unmount's flush. The backup host runs `memsync sync --listen 0.0.0.0:7070 FILE`.")]
pub struct MountArgs {
    /// The remote store URL, e.g. nbd://host:10809/export.
    pub remote: String,
    /// The cache directory (created if missing; reusing it resumes without refetching).
    /// Required except with --device, which can also serve the store directly.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Mount a FUSE file system here; the data is the file MOUNTPOINT/NAME.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fuse: Option<PathBuf>,
    /// The file name inside the FUSE mount.
    #[arg(long, default_value = "data")]
    pub name: String,
    /// Re-export the cache over NBD: nbd://HOST[:PORT] (port 10809 by default) or
    /// nbd+unix:///?socket=PATH (a file at PATH is replaced only if it is a stale socket).
    #[arg(long, value_name = "URL")]
    pub nbd: Option<String>,
    /// Chunk size, a power of two from 4K to 4M.
    #[arg(long, default_value = "1M")]
    pub chunk: String,
    /// Background pull: on or off.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub pull: String,
    /// Background push interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub push_interval: Duration,
    /// A read miss fails with EIO when the remote has not answered within this time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub fetch_timeout: Duration,
    /// Byte ranges to pull first ("headers first"): START-END or START+LEN, e.g. 0+1M (repeatable).
    #[arg(long = "hint", value_name = "RANGE")]
    pub hints: Vec<String>,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Let users other than the one mounting reach the FUSE mount (by default the kernel refuses
    /// them all); what they may do is set by --mode.
    #[arg(long)]
    pub allow_other: bool,
    /// Permission bits of the FUSE file, in octal (owner: the mounting user), e.g. 0640; with
    /// --allow-other, 0666 lets every user read and write the remote.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub mode: u32,
    /// How long SIGINT/SIGTERM waits for the final flush (pages dirtied through mappings into
    /// the cache, the cache's dirty chunks to REMOTE, the last --sync-to round) before giving it
    /// up; a second SIGINT/SIGTERM gives it up at once. Giving up aborts the FUSE connection and
    /// exits with status 1, naming the byte ranges not pushed; they stay dirty in the cache
    /// directory, and the next mount with the same --cache pushes them. The default stays below
    /// systemd's 90 s stop timeout, after which it would SIGKILL the mount with no message.
    /// --fuse and --nbd mounts only. A --device mount ignores it, and a second SIGINT/SIGTERM
    /// does not cut its stop short: the stop waits for the kernel's fsync of the device, whose
    /// flush reaches the store through this process (with --cache, the cache, whose flush pushes
    /// every dirty chunk to REMOTE), then for the disconnect and the cache's close.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub unmount_timeout: Duration,
    #[command(flatten)]
    pub reinit: ReinitArgs,
    #[command(flatten)]
    pub sync: MountSyncArgs,
    #[command(flatten)]
    pub migrate: MountMigrateArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `mount --sync-to`: continuous push of the mount's data to a second copy.
#[derive(Debug, Args)]
pub struct MountSyncArgs {
    /// Keep a second copy of the mounted data up to date: a store URL of the same size (e.g.
    /// file:/backup/disk.img) or a sync peer (memsync://HOST:PORT, memsyncs://HOST:PORT?tls-ca=FILE,
    /// served by `memsync sync --listen`). A delta sync at the start, then a round every
    /// --sync-every and on SIGUSR1 that sends only the chunks written through the mount since
    /// the last round, and a last round after the unmount's flush. Unlike `memsync sync --every`
    /// nothing is hashed to find the changes: the mount sees every write. Independent of
    /// --push-interval (write-back of the cache to REMOTE).
    #[arg(long, value_name = "URL")]
    pub sync_to: Option<String>,
    /// The interval between --sync-to rounds.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION", requires = "sync_to")]
    pub sync_every: Duration,
    /// The --sync-to chunk size: the unit of digests and of write tracking (a power of two, 4K to
    /// 16M); a written chunk is compared by its 4 KiB pages, so only changed pages move.
    #[arg(long, default_value = "64K", value_parser = parse_size_arg, value_name = "SIZE", requires = "sync_to")]
    pub sync_chunk: u64,
    /// Compress the --sync-to data to a peer with lz4.
    #[arg(long, requires = "sync_to")]
    pub sync_compress: bool,
    /// Print the --sync-to reports on stdout as JSON lines (the first sync's, then one per
    /// round, with "round": N) instead of text.
    #[arg(long, requires = "sync_to")]
    pub sync_json: bool,
}

/// What the push task of `--sync-to` needs.
struct PushPlan {
    dest: DestUrl,
    every: Duration,
    chunk: u64,
    compress: bool,
    json: bool,
}

/// `--sync-to`: the first sync, then a round per interval or SIGUSR1, and a last round once
/// `stop` changes (sent after the mount's final flush). A failed round is reported and its
/// chunks are pushed by the next; the last round's failure is this task's error.
async fn push_loop(
    tracked: Arc<Tracked>,
    plan: PushPlan,
    mut usr1: tokio::signal::unix::Signal,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let size = tracked.size();
    let dest = plan
        .dest
        .connect(size, plan.chunk, plan.compress, false)
        .await
        .context("--sync-to")?;
    let source = Source {
        store: tracked.clone(),
        index: None,
    };
    let bar = Bar(indicatif::ProgressBar::hidden());
    let (pusher, first) = Pusher::start(source, dest, tracked, SyncOptions::default(), &bar)
        .await
        .map_err(|e| anyhow::Error::new(e.error).context("--sync-to: first sync failed"))?;
    print_report(&first, plan.json);
    flush_stdout();
    let mut n = 0;
    loop {
        // A stop sent while a round (or the first sync) ran is seen here at once.
        let last = tokio::select! {
            _ = tokio::time::sleep(plan.every) => false,
            _ = usr1.recv() => false,
            _ = stop.changed() => true,
        };
        n += 1;
        match pusher.round().await {
            Ok(r) => print_round(n, &r, plan.json),
            Err(e) if !last => eprintln!(
                "memsync: --sync-to round {n} failed (the next round sends its chunks): {e:#}"
            ),
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("--sync-to: last round {n} failed"))
                );
            }
        }
        flush_stdout();
        if last {
            return Ok(());
        }
    }
}

pub(crate) fn flush_stdout() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// Parse permission bits in octal (`0600`, `644`).
fn parse_mode(s: &str) -> Result<u32> {
    u32::from_str_radix(s.strip_prefix("0o").unwrap_or(s), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("--mode {s:?}: permission bits in octal, 0 to 0777"))
}

/// Starting a cache directory over.
#[derive(Debug, Args)]
pub struct ReinitArgs {
    /// Start the cache directory over (its local data is discarded) instead of refusing one
    /// made for another remote, size or chunk size; refused while it may hold writes not yet
    /// pushed to its remote.
    #[arg(long)]
    pub cache_reinit: bool,
    /// With --cache-reinit: discard even writes not yet pushed to the directory's remote.
    #[arg(long, requires = "cache_reinit")]
    pub cache_reinit_force: bool,
}

impl ReinitArgs {
    pub fn reinit(&self) -> Reinit {
        match (self.cache_reinit, self.cache_reinit_force) {
            (_, true) => Reinit::Force,
            (true, false) => Reinit::IfClean,
            (false, false) => Reinit::No,
        }
    }
}

/// Parse `START-END` or `START+LEN` (sizes with K/M/G suffixes).
pub fn parse_range(s: &str) -> Result<Range<u64>> {
    if let Some((a, l)) = s.split_once('+') {
        let a = parse_size(a)?;
        return Ok(a..a.saturating_add(parse_size(l)?));
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b) = (parse_size(a)?, parse_size(b)?);
        if b < a {
            bail!("range {s:?} ends before it starts");
        }
        return Ok(a..b);
    }
    bail!("range {s:?}: expected START-END or START+LEN")
}

/// One line on what an opened cache already holds (a reused directory resumes).
pub fn cache_state(cache: &Cache) -> String {
    let p = cache.progress();
    format!(
        "cache {}: {}/{} chunks local, {} dirty",
        cache.dir().display(),
        p.present_chunks,
        p.chunks,
        p.dirty_chunks
    )
}

/// A cache chunk size given as `flag` (`mount --chunk`, `map --cache-chunk`), checked by the
/// cache's own rule (a power of two from 4K to 4M) before anything is opened.
pub fn cache_chunk(flag: &str, s: &str) -> Result<u64> {
    let chunk_size = parse_size(s).with_context(|| flag.to_owned())?;
    CacheConfig {
        chunk_size,
        ..CacheConfig::default()
    }
    .validate()
    .with_context(|| flag.to_owned())?;
    Ok(chunk_size)
}

/// Close a cache cleanly (final flush to the remote, background tasks stopped, chunk map
/// saved) and return its one-line statistics summary.
pub async fn close_cache(cache: &Cache) -> Result<String> {
    cache.close().await.context("final flush to the remote")?;
    Ok(cache.stats().to_string())
}

/// The cache settings a mount's flags ask for (`--chunk`, `--pull`, `--hint`, `--push-interval`,
/// `--fetch-timeout`, `--reinit`), checked before anything is opened; shared by the FUSE/NBD
/// mount and the direct (`--device`) mount.
pub fn cache_config(a: &MountArgs) -> Result<CacheConfig> {
    let hints = a
        .hints
        .iter()
        .map(|h| parse_range(h))
        .collect::<Result<Vec<_>>>()?;
    Ok(CacheConfig {
        chunk_size: cache_chunk("--chunk", &a.chunk)?,
        pull: a.pull == "on",
        hints,
        push_interval: a.push_interval,
        fetch_timeout: a.fetch_timeout,
        reinit: a.reinit.reinit(),
        ..CacheConfig::default()
    })
}

/// `mount --device` and its settings.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// A direct mount: attach the store (through --cache DIR if given) to this kernel NBD
    /// device, e.g. /dev/nbd0, until SIGINT/SIGTERM (then flush and disconnect).
    #[arg(long, value_name = "/dev/nbdN")]
    pub device: Option<PathBuf>,
    /// Kernel connections (socket pairs) for the device: several let the kernel send requests
    /// from several queues at once.
    #[arg(long, default_value_t = 1, requires = "device")]
    pub connections: usize,
    /// Re-attach to a device whose memsync died (netlink NBD_CMD_RECONFIGURE): service
    /// resumes where the kernel was waiting.
    #[arg(long, requires = "device")]
    pub reconnect: bool,
    /// How long I/O on the device waits for a --reconnect once this process is gone, before it
    /// fails with EIO (netlink; whole seconds).
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "device")]
    pub dead_timeout: Duration,
    /// The kernel's per-request timeout: a request unanswered this long makes the kernel drop
    /// the connection (whole seconds; keep it above --fetch-timeout).
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "device")]
    pub io_timeout: Duration,
    /// How to hand the sockets to the kernel: netlink, ioctl, or auto (netlink if the kernel
    /// has it).
    #[arg(long, default_value = "auto", requires = "device")]
    pub interface: Interface,
    /// Expose the device read-only.
    #[arg(long, requires = "device")]
    pub read_only: bool,
}

pub fn mount(ctx: &Context, a: MountArgs) -> Result<()> {
    // main.rs sends a mount with --device to crate::device.
    debug_assert!(a.device.device.is_none());
    if a.fuse.is_none() && a.nbd.is_none() {
        bail!(
            "nothing to expose the mount with: give --fuse MOUNTPOINT, --nbd URL and/or --device /dev/nbdN"
        );
    }
    let Some(cache_dir) = a.cache.clone() else {
        bail!("--cache DIR is required (only --device can serve a store without a cache)");
    };
    let cfg = cache_config(&a)?;
    // Checked before anything is opened: a bad --nbd fails at once.
    let listen = a
        .nbd
        .as_deref()
        .map(|u| memsync_nbd::ListenAddr::parse(u).with_context(|| format!("--nbd {u}")))
        .transpose()?;
    // Opened outside the runtime's block below, as every store is.
    let push_plan = match &a.sync.sync_to {
        Some(url) => Some(PushPlan {
            dest: DestUrl::open(ctx, url, false).with_context(|| "--sync-to".to_owned())?,
            every: a.sync.sync_every,
            chunk: a.sync.sync_chunk,
            compress: a.sync.sync_compress,
            json: a.sync.sync_json,
        }),
        None => None,
    };
    let migrate_plan = MigratePlan::new(&a.migrate)?;
    let handle = ctx.rt.handle().clone();
    ctx.rt.block_on(async move {
        let cache = open_cache(&ctx.registry, &a.remote, &cache_dir, cfg).await?;
        let p = cache.progress();
        eprintln!("memsync: {}", cache_state(&cache));
        // What the frontends write to: the cache, through the write tracking of --sync-to.
        let tracked = push_plan
            .as_ref()
            .map(|plan| Tracked::new(cache.clone(), plan.chunk));
        // Registered before the mount is up: a SIGUSR1 asks for a round, never the default
        // action (exit).
        let usr1 = match &push_plan {
            Some(_) => Some(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::user_defined1(),
            )?),
            None => None,
        };
        let front: DynStore = match &tracked {
            Some(t) => t.clone(),
            None => cache.clone(),
        };
        // --migrate-to tracks on top, with its own marks (a migration and the push rounds each
        // take what was written since their own last look).
        let migrate_tracked = migrate_plan
            .as_ref()
            .map(|plan| Tracked::new(front.clone(), plan.chunk));
        let front: DynStore = match &migrate_tracked {
            Some(t) => t.clone(),
            None => front,
        };
        let usr2 = match &migrate_plan {
            Some(_) => Some(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::user_defined2(),
            )?),
            None => None,
        };
        let mut fuse: Option<FuseMount> = None;
        if let Some(mp) = &a.fuse {
            if a.allow_other && a.mode & 0o077 == 0 {
                eprintln!(
                    "memsync: note: --allow-other with mode {:04o} still keeps other users out; \
                     give --mode (e.g. 0660 or 0666) to let them in",
                    a.mode
                );
            }
            let opts = FuseOptions {
                name: a.name.clone(),
                threads: a.threads.max(1),
                allow_other: a.allow_other,
                mode: a.mode,
                ..FuseOptions::default()
            };
            let store = front.clone();
            let mp2 = mp.clone();
            let h = handle.clone();
            let m = tokio::task::spawn_blocking(move || memsync_fuse::mount(store, h, &mp2, opts))
                .await?
                .with_context(|| {
                    format!(
                        "mounting FUSE on {} (needs root and /dev/fuse)",
                        mp.display()
                    )
                })?;
            outln!("memsync: mounted {}", m.file_path().display());
            fuse = Some(m);
        }
        let mut server = None;
        if let Some(addr) = &listen {
            let cfg =
                memsync_nbd::ServerConfig::new(vec![memsync_nbd::Export::new("", front.clone())]);
            let s = memsync_nbd::Server::new(cfg)?;
            let url = s.listen(addr).await?;
            outln!("memsync: serving {url}");
            server = Some(s);
        }
        flush_stdout();
        // Started once the mount is up (its first line on stdout is the mount's); writes made
        // meanwhile are tracked all the same.
        let (stop_push, stop_rx) = tokio::sync::watch::channel(false);
        let mut pusher = match (tracked, push_plan, usr1) {
            (Some(t), Some(plan), Some(usr1)) => {
                Some(tokio::spawn(push_loop(t, plan, usr1, stop_rx)))
            }
            _ => None,
        };
        let (stop_migrate, stop_migrate_rx) = tokio::sync::watch::channel(false);
        // The pull's bar, and a migration's below it while one runs.
        let bars = indicatif::MultiProgress::new();
        let mut migrator = match (migrate_tracked, migrate_plan, usr2) {
            (Some(t), Some(plan), Some(usr2)) => {
                let changes = Arc::new(FlushedTracking {
                    file: fuse.as_ref().map(|m| m.file_path().to_path_buf()),
                    tracked: t,
                });
                Some(tokio::spawn(migrate_on_signal(
                    front.clone(),
                    changes,
                    plan,
                    usr2,
                    stop_migrate_rx,
                    bars.clone(),
                )))
            }
            _ => None,
        };
        let pb = bars.add(ProgressBar::new(p.size));
        pb.set_style(
            ProgressStyle::with_template(
                "pull [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        // The push task's early end (an error: no destination, a failed first sync).
        let mut push_failed: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                r = async { pusher.as_mut().expect("guarded").await }, if pusher.is_some() => {
                    pusher = None;
                    let e = match r {
                        Ok(Ok(())) => anyhow::anyhow!("--sync-to: the push task ended"),
                        Ok(Err(e)) => e,
                        Err(e) => anyhow::Error::new(e).context("--sync-to: the push task"),
                    };
                    eprintln!("memsync: {e:#}; the mount goes on without --sync-to");
                    push_failed = Some(e);
                }
                r = async { migrator.as_mut().expect("guarded").await }, if migrator.is_some() => {
                    migrator = None;
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("memsync: --migrate-to: {e:#}"),
                        Err(e) => eprintln!("memsync: --migrate-to: the migration task: {e}"),
                    }
                }
                _ = tick.tick() => {
                    let p = cache.progress();
                    pb.set_position(p.present_bytes());
                    pb.set_message(format!("{} dirty", p.dirty_chunks));
                }
            }
        }
        pb.finish_and_clear();
        if let Some(m) = migrator.take() {
            // A migration that runs ends first: after a post-copy commit the destination needs
            // this mount until it holds every chunk.
            let _ = stop_migrate.send(true);
            match m.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("memsync: --migrate-to: {e:#}"),
                Err(e) => eprintln!("memsync: --migrate-to: the migration task: {e}"),
            }
        }
        let limit = a.unmount_timeout;
        eprintln!(
            "memsync: unmounting: final flush (at most {}; SIGINT/SIGTERM again gives up)",
            humantime_secs(limit)
        );
        let abort = fuse.as_ref().map(|m| m.abort_handle());
        let stage = Arc::new(parking_lot::Mutex::new(Stage::WriteBack));
        let t0 = std::time::Instant::now();
        // Started here, not in `finish` below: a FuseMount dropped with a `finish` given up
        // before its first poll would unmount and join its threads on this runtime thread.
        let unmounted = fuse.take().map(|m| {
            let st = stage.clone();
            tokio::task::spawn_blocking(move || {
                // Pages dirtied through mappings go to the cache first: that needs this
                // process's request threads and the local disk, not the remote, and once there
                // they survive a flush given up below. The remote flush is the cache's own
                // (close_cache), not an fsync through the mount: an fsync stuck on the remote
                // could not be interrupted.
                if let Err(e) = m.write_back() {
                    eprintln!("memsync: writing back the mapped pages: {e}");
                }
                *st.lock() = Stage::Unmount;
                m.unmount()
            })
        });
        let finish = {
            let stage = stage.clone();
            let cache = &cache;
            async move {
                if let Some(task) = unmounted {
                    task.await?.context("unmounting FUSE")?;
                }
                *stage.lock() = Stage::Nbd;
                if let Some(s) = server.take() {
                    s.shutdown().await.context("stopping the NBD server")?;
                }
                // The last --sync-to round: after the unmount, so it sees every write; before
                // the cache closes, since it reads the cache.
                *stage.lock() = Stage::SyncTo;
                let pushed = match pusher.take() {
                    Some(task) => {
                        let _ = stop_push.send(true);
                        match task.await {
                            Ok(r) => r,
                            Err(e) => {
                                Err(anyhow::Error::new(e).context("--sync-to: the push task"))
                            }
                        }
                    }
                    None => push_failed.map_or(Ok(()), Err),
                };
                *stage.lock() = Stage::Remote;
                eprintln!(
                    "memsync: pushing {} dirty chunks to the remote",
                    cache.progress().dirty_chunks
                );
                let summary = close_cache(cache).await?;
                anyhow::Ok((summary, pushed))
            }
        };
        let why = tokio::select! {
            r = finish => {
                let (summary, pushed) = r?;
                eprintln!("memsync: stopped; {summary}");
                return pushed;
            }
            _ = tokio::time::sleep(limit) => format!("--unmount-timeout {} passed", humantime_secs(limit)),
            _ = int.recv() => "a second SIGINT".to_owned(),
            _ = term.recv() => "a second SIGTERM".to_owned(),
        };
        let stage = *stage.lock();
        give_up(&cache, &a.remote, abort, stage, &why, t0.elapsed()).await
    })
}

/// Where the final flush was when it was given up.
#[derive(Clone, Copy, Debug)]
enum Stage {
    WriteBack,
    Unmount,
    Nbd,
    SyncTo,
    Remote,
}

impl Stage {
    fn doing(self) -> &'static str {
        match self {
            Stage::WriteBack => "writing the pages dirtied through mappings back to the cache",
            Stage::Unmount => "unmounting FUSE",
            Stage::Nbd => "stopping the NBD server",
            Stage::SyncTo => "running the last --sync-to round",
            Stage::Remote => "pushing the cache's dirty chunks to the remote",
        }
    }
}

/// A duration as whole seconds or milliseconds, e.g. `60s`, `500ms`.
fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The final flush is given up: abort the FUSE connection (whatever waits on this process's
/// request threads fails at once), save the chunk map so that the dirty chunks are remembered,
/// and fail with what was not pushed. Nothing acknowledged is lost: an acknowledged write is in
/// the cache's local copy (made durable here with the map, or covered by its write intent), and
/// the next mount of the same cache directory pushes every dirty chunk.
async fn give_up(
    cache: &Cache,
    remote: &str,
    abort: Option<memsync_fuse::AbortHandle>,
    stage: Stage,
    why: &str,
    waited: Duration,
) -> Result<()> {
    eprintln!(
        "memsync: giving up the final flush after {:.1} s ({why}) while {}",
        waited.as_secs_f64(),
        stage.doing()
    );
    // Once FUSE is unmounted there is nothing to abort: its connection number may already be
    // another mount's.
    let abort = abort.filter(|_| matches!(stage, Stage::WriteBack | Stage::Unmount));
    if let Some(h) = abort {
        match h.abort() {
            Ok(true) => eprintln!("memsync: aborted the FUSE connection and detached the mount"),
            Ok(false) => eprintln!(
                "memsync: detached the FUSE mount (its connection ends with this process)"
            ),
            Err(e) => eprintln!("memsync: detaching the FUSE mount: {e}"),
        }
    }
    if matches!(stage, Stage::WriteBack) {
        eprintln!(
            "memsync: pages written through shared mappings and not yet written back (no msync, \
             fsync or munmap returned) are lost; every write(2), and every page an fsync or \
             msync returned for, is in the cache"
        );
    }
    // The chunk map, not the remote: the local disk answers even when the remote does not.
    let saved = match tokio::time::timeout(Duration::from_secs(30), cache.checkpoint()).await {
        Ok(Ok(())) => "the chunk map is saved".to_owned(),
        Ok(Err(e)) => {
            format!("saving the chunk map failed ({e}); the write intents still mark them")
        }
        Err(_) => "saving the chunk map timed out; the write intents still mark them".to_owned(),
    };
    let cs = cache.chunk_size();
    let dirty: Vec<u64> = (0..cache.chunk_count())
        .filter(|&c| cache.chunk_state(c).is_dirty())
        .collect();
    let dir = cache.dir().display();
    let remote = memsync_core::redact(remote);
    if dirty.is_empty() {
        bail!(
            "final flush given up ({why}); no chunk was waiting to be pushed to {remote}, but the \
             remote may not have made the last pushes durable: mount again with --cache {dir} \
             and stop it cleanly to be sure"
        );
    }
    let size = cache.size();
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &c in &dirty {
        let (s, e) = (c * cs, ((c + 1) * cs).min(size));
        match runs.last_mut() {
            Some(r) if r.end == s => r.end = e,
            _ => runs.push(s..e),
        }
    }
    const SHOWN: usize = 8;
    let mut list: Vec<String> = runs
        .iter()
        .take(SHOWN)
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect();
    if runs.len() > SHOWN {
        list.push(format!("and {} more ranges", runs.len() - SHOWN));
    }
    let bytes: u64 = runs.iter().map(|r| r.end - r.start).sum();
    bail!(
        "final flush given up ({why}): {} chunks ({bytes} bytes) were NOT pushed to {remote}: \
         bytes {}; they stay dirty in the cache {dir} ({saved}): mount again with --cache {dir} \
         to push them",
        dirty.len(),
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(parse_mode("0o666").unwrap(), 0o666);
        for bad in ["", "0800", "01777", "rw", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0+1M").unwrap(), 0..1 << 20);
        assert_eq!(parse_range("4K-8K").unwrap(), 4096..8192);
        assert!(parse_range("8K-4K").is_err());
        assert!(parse_range("x").is_err());
    }

    #[test]
    fn cache_chunks() {
        assert_eq!(cache_chunk("--chunk", "1M").unwrap(), 1 << 20);
        assert_eq!(cache_chunk("--chunk", "4K").unwrap(), 4096);
        for bad in ["3000", "8M", "2K", "12Q"] {
            let e = format!("{:#}", cache_chunk("--chunk", bad).unwrap_err());
            assert!(e.starts_with("--chunk: "), "{e}");
        }
    }
}
