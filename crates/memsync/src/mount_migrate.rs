//! `memsync mount --migrate-to`: live migration of what a managed mount serves (the issue's
//! kind (b): the file of a mount that another program maps), tracked at the store layer.
//!
//! The mount's frontends write through a [`Tracked`] layer, so the passes send the chunks
//! written since the last one without hashing anything. A program that writes through a
//! shared mapping dirties the kernel's page cache of the FUSE file first; those pages reach
//! the store (and the tracker) only when the kernel writes them back. So every pass begins
//! with an `fsync` of the FUSE file ([`FlushedTracking`]), and suspending the application
//! ends with one ([`FlushingHooks`]): [`Hooks::suspend`] promises that the change source has
//! seen every write when it returns, and a post-copy switch-over reads the store right after
//! it without taking changes first.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_core::size::parse_duration;
use memsync_core::{DynStore, Result as StoreResult, StoreError, async_trait};
use memsync_migrate::{CommandHooks, Dialer, Hooks, Mode, NoHooks, SignalHooks, SourceConfig};
use memsync_sync::{ChangeSource, Tracked};

use crate::context::parse_size_arg;
use crate::sync::Bar;

/// `mount --migrate-to`: migrate the mounted data to another host on SIGUSR2.
#[derive(Debug, Args)]
pub struct MountMigrateArgs {
    /// On SIGUSR2, migrate the mounted data live to a destination that runs
    /// `memsync migrate --listen ADDR STORE`: migrate://HOST:PORT,
    /// migrates://HOST:PORT?tls-ca=FILE or migrate+unix:///PATH. Writes through the mount are
    /// tracked as they are made (nothing is hashed); each pass first fsyncs the FUSE file, so
    /// pages a program dirtied through a shared mapping are seen. After a migration the
    /// application stays suspended and the mount keeps serving until SIGTERM; after a failure
    /// the application is resumed and another SIGUSR2 tries again.
    #[arg(long, value_name = "URL")]
    pub migrate_to: Option<String>,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "precopy", value_parser = crate::migrate::parse_mode, requires = "migrate_to")]
    pub migrate_mode: Mode,
    /// The application to suspend (SIGSTOP) for the switch-over and to continue (SIGCONT) if
    /// the migration aborts.
    #[arg(
        long,
        value_name = "PID",
        requires = "migrate_to",
        conflicts_with = "migrate_suspend"
    )]
    pub migrate_pid: Option<i32>,
    /// A command (sh -c) that suspends the application for the switch-over.
    #[arg(long, value_name = "CMD", requires = "migrate_to")]
    pub migrate_suspend: Option<String>,
    /// A command (sh -c) that resumes the application if the migration aborts.
    #[arg(long, value_name = "CMD", requires = "migrate_to")]
    pub migrate_resume: Option<String>,
    /// Switch over when the dirty rest would take at most this long to send.
    #[arg(long, default_value = "300ms", value_parser = parse_duration, value_name = "DURATION", requires = "migrate_to")]
    pub migrate_max_downtime: Duration,
    /// The unit of write tracking and transfer (a power of two, 4K to 16M).
    #[arg(long, default_value = "4K", value_parser = parse_size_arg, value_name = "SIZE", requires = "migrate_to")]
    pub migrate_chunk: u64,
    /// Print the migration's report on stdout as one JSON line.
    #[arg(long, requires = "migrate_to")]
    pub migrate_json: bool,
}

/// What the migration task needs, checked before the mount starts.
pub struct MigratePlan {
    dialer: Dialer,
    hooks: FlushingHooks,
    cfg: SourceConfig,
    json: bool,
    pub chunk: u64,
}

impl MigratePlan {
    pub fn new(a: &MountMigrateArgs) -> Result<Option<MigratePlan>> {
        let Some(url) = &a.migrate_to else {
            return Ok(None);
        };
        let dialer = Dialer::parse(url).context("--migrate-to")?;
        let hooks: Box<dyn Hooks> = match a.migrate_pid {
            Some(pid) => Box::new(SignalHooks::new(pid)),
            None if a.migrate_suspend.is_some() || a.migrate_resume.is_some() => {
                Box::new(CommandHooks {
                    suspend: a.migrate_suspend.clone(),
                    resume: a.migrate_resume.clone(),
                })
            }
            None => Box::new(NoHooks),
        };
        let cfg = SourceConfig {
            mode: a.migrate_mode,
            chunk_size: a.migrate_chunk,
            max_downtime: a.migrate_max_downtime,
            ..SourceConfig::default()
        };
        Ok(Some(MigratePlan {
            dialer,
            hooks: FlushingHooks {
                inner: hooks,
                file: None,
            },
            cfg,
            json: a.migrate_json,
            chunk: a.migrate_chunk,
        }))
    }
}

/// The mount's write tracking as a migration's change source: the FUSE file (if any) is
/// fsynced before the changes are taken, so that pages dirtied through mappings are written
/// back through the tracker first.
#[derive(Debug)]
pub struct FlushedTracking {
    pub file: Option<PathBuf>,
    pub tracked: Arc<Tracked>,
}

/// Write back the pages of the FUSE file that mappings dirtied (through the mount's own
/// write path, so the tracker sees them). Never call it on a FUSE request thread.
async fn fsync(file: &Option<PathBuf>) -> StoreResult<()> {
    let Some(f) = file.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .and_then(|f| f.sync_all())
    })
    .await
    .map_err(|e| StoreError::backend(format!("fsync of the mount's file: {e}")))?
    .map_err(|e| StoreError::io("fsync of the mount's file", e))
}

/// The application's hooks, with the FUSE file fsynced once it is suspended.
#[derive(Debug)]
struct FlushingHooks {
    inner: Box<dyn Hooks>,
    file: Option<PathBuf>,
}

#[async_trait]
impl Hooks for FlushingHooks {
    async fn suspend(&self) -> StoreResult<()> {
        self.inner.suspend().await?;
        fsync(&self.file).await
    }

    async fn resume(&self) -> StoreResult<()> {
        self.inner.resume().await
    }
}

#[async_trait]
impl ChangeSource for FlushedTracking {
    async fn take_changes(&self) -> memsync_core::Result<Vec<Range<u64>>> {
        fsync(&self.file).await?;
        self.tracked.take_changes().await
    }

    fn put_back(&self, ranges: &[Range<u64>]) {
        self.tracked.put_back(ranges);
    }
}

/// Wait for SIGUSR2, migrate `src`; a failure is reported and the next SIGUSR2 tries again.
/// Returns after a migration that completed, or when `stop` changes while no migration runs
/// (a running one is never cut short: it ends first).
pub async fn migrate_on_signal(
    src: DynStore,
    changes: Arc<FlushedTracking>,
    mut plan: MigratePlan,
    mut usr2: tokio::signal::unix::Signal,
    mut stop: tokio::sync::watch::Receiver<bool>,
    bars: indicatif::MultiProgress,
) -> Result<()> {
    plan.hooks.file = changes.file.clone();
    loop {
        tokio::select! {
            s = usr2.recv() => if s.is_none() { return Ok(()) },
            _ = stop.changed() => return Ok(()),
        }
        eprintln!("memsync: migrating ({})", plan.cfg.mode.name());
        let bar = Bar(bars.add(crate::context::progress(src.size(), "migrate: pass 1")));
        let r = memsync_migrate::migrate(
            src.clone(),
            changes.clone(),
            &plan.dialer,
            &plan.hooks,
            &plan.cfg,
            &bar,
        )
        .await;
        bar.0.finish_and_clear();
        bars.remove(&bar.0);
        match r {
            Ok(r) => {
                crate::migrate::print_report(&r, plan.json);
                crate::mount::flush_stdout();
                eprintln!(
                    "memsync: migrated; the application stays suspended and this mount serves on until SIGTERM"
                );
                return Ok(());
            }
            Err(e) => {
                eprintln!(
                    "memsync: --migrate-to failed (SIGUSR2 tries again): {:#}",
                    anyhow::Error::new(e)
                );
            }
        }
    }
}
