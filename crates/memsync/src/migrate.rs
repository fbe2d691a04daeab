//! `memsync migrate`: live migration of a store (e.g. the file another program maps) to a
//! destination, and the destination side (`--listen`).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use memsync_core::size::{format_size, parse_duration};
use memsync_core::{DynStore, Result as StoreResult, async_trait};
use memsync_migrate::{
    CommandHooks, DestConfig, DestReport, Dialer, Fallback, Hooks, Listener, Mode, NoHooks, Report,
    SignalHooks, SourceConfig, StoreTarget, Target, Verify,
};
use memsync_sync::Rescan;
use serde_json::json;

use crate::context::{Context, parse_size_arg};
use crate::sync::Bar;

#[derive(Debug, Args)]
#[command(after_help = "\
EXAMPLES:
  memsync migrate --listen 0.0.0.0:7071 file:/var/tmp/vm.img --resume 'systemctl start app'
  memsync migrate file:/var/tmp/vm.img migrate://dest:7071 --pid 4242
  memsync migrate file:/var/tmp/vm.img 'migrates://dest:7071?tls-ca=ca.pem' --mode postcopy --pid 4242
  memsync migrate --listen 0.0.0.0:7071 file:/var/tmp/vm.img --nbd 127.0.0.1:10809   (post-copy: the
      application at the destination uses the NBD export, whose missing chunks are fetched first)")]
pub struct MigrateArgs {
    /// SRC DEST: the store to migrate and the destination (migrate://HOST:PORT,
    /// migrates://HOST:PORT?tls-ca=FILE[&tls-hostname=N], migrate+unix:///PATH). With --listen:
    /// the one store to receive into (of the source's size).
    #[arg(num_args = 1..=2, required = true, value_name = "URL")]
    pub stores: Vec<String>,
    /// Be the destination: listen on HOST:PORT (port 0 picks one) or unix:PATH, receive one
    /// migration, then exit. The address is printed on stdout.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "precopy", value_parser = parse_mode)]
    pub mode: Mode,
    /// When the changes the application made are found (by hashing the file): `suspended`
    /// (the default of precopy: hash while the application is stopped, then copy the rest; the
    /// destination needs nothing from the source once it resumes) or `after-resume` (the
    /// default of hybrid: resume at once and verify every chunk afterwards, as post-copy).
    #[arg(long, value_parser = parse_verify)]
    pub verify: Option<Verify>,
    /// Switch over when the dirty rest would take at most this long to send.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub max_downtime: Duration,
    /// Pre-copy passes at most (KVM's rule; also stops after two passes that grew).
    #[arg(long, default_value_t = 30)]
    pub max_passes: u32,
    /// When pre-copy does not converge: stop (stop-and-copy) or postcopy.
    #[arg(long, default_value = "stop", value_parser = parse_fallback)]
    pub fallback: Fallback,
    /// Pre-copy passes of a hybrid migration before it turns to post-copy.
    #[arg(long, default_value_t = 1)]
    pub hybrid_passes: u32,
    /// The unit of tracking and transfer (a power of two, 4K to 16M).
    #[arg(long, default_value = "4K", value_parser = parse_size_arg)]
    pub chunk: u64,
    /// The application to suspend (SIGSTOP) before the last copy and to continue (SIGCONT) if
    /// the migration aborts. After a successful migration it stays stopped.
    #[arg(long, conflicts_with = "suspend")]
    pub pid: Option<i32>,
    /// A command that suspends the application (source side).
    #[arg(long, value_name = "CMD")]
    pub suspend: Option<String>,
    /// A command that resumes the application: at the destination after the commit, at the
    /// source after an abort.
    #[arg(long, value_name = "CMD")]
    pub resume: Option<String>,
    /// Destination: export the received store over NBD on HOST:PORT once it takes over
    /// (post-copy reads of missing chunks wait for them).
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd: Option<String>,
    /// How long either side waits for the other to come back after a cut past the commit.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub recovery_timeout: Duration,
    /// Before the commit, how long a side waits for the other's answer (source) or for any
    /// data (destination) before it aborts.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// TLS certificate chain (PEM) of the destination (--listen).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the destination (--listen).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

pub(crate) fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("{s:?}: expected precopy, postcopy or hybrid"))
}

fn parse_verify(s: &str) -> Result<Verify, String> {
    Verify::parse(s).ok_or_else(|| format!("{s:?}: expected suspended or after-resume"))
}

fn parse_fallback(s: &str) -> Result<Fallback, String> {
    match s {
        "stop" | "stop-and-copy" => Ok(Fallback::StopAndCopy),
        "postcopy" | "post-copy" => Ok(Fallback::Postcopy),
        _ => Err(format!("{s:?}: expected stop or postcopy")),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "role": "source", "mode": r.mode.name(), "size": r.size, "chunk_size": r.chunk_size,
        "passes": r.passes.len(),
        "pass_chunks": r.passes.iter().map(|p| p.chunks).collect::<Vec<_>>(),
        "pass_dirty_after": r.passes.iter().map(|p| p.dirty_after).collect::<Vec<_>>(),
        "switch_reason": format!("{:?}", r.reason), "postcopy": r.postcopy,
        "remaining_chunks": r.remaining_chunks,
        "downtime_ms": ms(r.downtime), "total_seconds": r.total.as_secs_f64(),
        "wire_sent": r.wire_sent, "sent_ratio": r.wire_sent as f64 / r.size.max(1) as f64,
        "data_chunks": r.data_chunks, "zero_chunks": r.zero_chunks,
        "verify": r.verify.map(Verify::name), "unchanged_chunks": r.unchanged_chunks,
        "urgent_served": r.urgent_served, "faults": r.faults,
        "fault_p50_us": r.fault_p50.as_secs_f64() * 1e6,
        "fault_p99_us": r.fault_p99.as_secs_f64() * 1e6,
        "reconnects": r.reconnects,
    })
}

pub(crate) fn print_report(r: &Report, json: bool) {
    if json {
        outln!("{}", report_json(r));
        return;
    }
    outln!(
        "migrated {} ({}) in {:.3} s: downtime {:.1} ms, {} sent ({:.2}x the size)",
        format_size(r.size),
        r.mode.name(),
        r.total.as_secs_f64(),
        ms(r.downtime),
        format_size(r.wire_sent),
        r.wire_sent as f64 / r.size.max(1) as f64
    );
    outln!(
        "  {} pre-copy passes (dirty after each: {:?}), switch-over: {:?}, {} chunks {}",
        r.passes.len(),
        r.passes.iter().map(|p| p.dirty_after).collect::<Vec<_>>(),
        r.reason,
        r.remaining_chunks,
        if r.postcopy {
            "sent as post-copy"
        } else {
            "sent while stopped"
        }
    );
    if let Some(v) = r.verify {
        outln!(
            "  changes verified {} ({} chunks found unchanged after the resume)",
            match v {
                Verify::Suspended => "while suspended",
                Verify::AfterResume => "after the resume",
            },
            r.unchanged_chunks
        );
    }
    outln!(
        "  {} data chunks, {} zero chunks (not sent as bytes); post-copy faults {} (p50 {:.0} us, p99 {:.0} us), {} urgent answers, {} reconnects",
        r.data_chunks,
        r.zero_chunks,
        r.faults,
        r.fault_p50.as_secs_f64() * 1e6,
        r.fault_p99.as_secs_f64() * 1e6,
        r.urgent_served,
        r.reconnects
    );
}

fn print_dest_report(r: &DestReport, json: bool) {
    if json {
        outln!(
            "{}",
            json!({
                "role": "destination", "size": r.size, "chunk_size": r.chunk_size,
                "wire_received": r.wire_received, "postcopy": r.postcopy,
                "missing_at_switchover": r.missing_at_switchover, "faults": r.faults,
                "fault_p50_us": r.fault_p50.as_secs_f64() * 1e6,
                "fault_p99_us": r.fault_p99.as_secs_f64() * 1e6,
                "reconnects": r.reconnects, "total_seconds": r.total.as_secs_f64(),
            })
        );
        return;
    }
    outln!(
        "received {} in {:.3} s ({} on the wire){}",
        format_size(r.size),
        r.total.as_secs_f64(),
        format_size(r.wire_received),
        if r.postcopy {
            format!(
                "; post-copy: {} chunks missing at the switch-over, {} faults (p50 {:.0} us, p99 {:.0} us), {} reconnects",
                r.missing_at_switchover,
                r.faults,
                r.fault_p50.as_secs_f64() * 1e6,
                r.fault_p99.as_secs_f64() * 1e6,
                r.reconnects
            )
        } else {
            String::new()
        }
    );
}

pub fn migrate(ctx: &Context, a: MigrateArgs) -> Result<()> {
    if a.listen.is_some() {
        return listen(ctx, a);
    }
    let [src_url, dst_url] = &a.stores[..] else {
        bail!("migrate needs SRC and DEST (or --listen ADDR STORE)");
    };
    if a.tls_cert.is_some() || a.nbd.is_some() {
        bail!("--tls-cert, --tls-key and --nbd are for the destination (--listen)");
    }
    let dialer = Dialer::parse(dst_url)?;
    let src = ctx.open(src_url)?;
    let hooks: Box<dyn Hooks> = match a.pid {
        Some(pid) => Box::new(SignalHooks::new(pid)),
        None if a.suspend.is_some() || a.resume.is_some() => Box::new(CommandHooks {
            suspend: a.suspend.clone(),
            resume: a.resume.clone(),
        }),
        None => Box::new(NoHooks),
    };
    let cfg = SourceConfig {
        mode: a.mode,
        chunk_size: a.chunk,
        max_downtime: a.max_downtime,
        max_passes: a.max_passes,
        fallback: a.fallback,
        hybrid_passes: a.hybrid_passes,
        recovery_timeout: a.recovery_timeout,
        reply_timeout: a.timeout,
        // The application writes behind memsync's back (a file it maps): changes are found by
        // comparing digests with what was sent.
        hash_sent: true,
        verify: a.verify,
        ..SourceConfig::default()
    };
    ctx.rt.block_on(async {
        let changes = Rescan::new(src.clone(), a.chunk)?;
        let bar = Bar(crate::context::progress(src.size(), "pass 1"));
        let r = memsync_migrate::migrate(src, changes, &dialer, &*hooks, &cfg, &bar).await;
        bar.0.finish_and_clear();
        let r = r.context("migration failed")?;
        print_report(&r, a.json);
        Ok(())
    })
}

/// The destination's resume: export the target over NBD (if asked), then the command.
#[derive(Debug)]
struct DestHooks {
    nbd: Option<(String, DynStore)>,
    server: parking_lot::Mutex<Option<memsync_nbd::Server>>,
    cmd: CommandHooks,
}

#[async_trait]
impl Hooks for DestHooks {
    async fn suspend(&self) -> StoreResult<()> {
        Ok(())
    }
    async fn resume(&self) -> StoreResult<()> {
        if let Some((addr, store)) = &self.nbd {
            let io = |e| memsync_core::StoreError::io("nbd listen", e);
            let server = memsync_nbd::Server::new(memsync_nbd::ServerConfig::new(vec![
                memsync_nbd::Export::new("", store.clone()),
            ]))
            .map_err(io)?;
            let l = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
            outln!("memsync: NBD export on {}", l.local_addr().map_err(io)?);
            server.listen_tcp(l);
            *self.server.lock() = Some(server);
        }
        self.cmd.resume().await
    }
}

fn listen(ctx: &Context, a: MigrateArgs) -> Result<()> {
    let [store_url] = &a.stores[..] else {
        bail!("--listen takes one STORE");
    };
    if a.pid.is_some() || a.suspend.is_some() {
        bail!("--pid and --suspend are for the source; the destination only resumes (--resume)");
    }
    let at = a.listen.clone().unwrap_or_default();
    let store = ctx.open(store_url)?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(memsync_nbd::server_tls_config(c, k)?),
        _ => None,
    };
    let target = StoreTarget::new(store);
    let hooks = DestHooks {
        nbd: a.nbd.clone().map(|n| (n, target.clone() as DynStore)),
        server: parking_lot::Mutex::new(None),
        cmd: CommandHooks {
            suspend: None,
            resume: a.resume.clone(),
        },
    };
    let cfg = DestConfig {
        recovery_timeout: a.recovery_timeout,
        idle_timeout: a.timeout,
        ..DestConfig::default()
    };
    ctx.rt.block_on(async {
        let l = Arc::new(
            Listener::bind(&at, tls)
                .await
                .with_context(|| format!("listening on {at}"))?,
        );
        outln!(
            "memsync: migration destination for {store_url} on {}",
            l.local()
        );
        let _ = std::io::stdout().flush();
        let t: Arc<dyn Target> = target.clone();
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let r = tokio::select! {
            r = memsync_migrate::receive(l, t, &hooks, &cfg) => r,
            _ = int.recv() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        };
        let r = r.context("receiving the migration failed")?;
        print_dest_report(&r, a.json);
        // An NBD export keeps serving the migrated store until SIGINT/SIGTERM.
        let server = hooks.server.lock().take();
        if let Some(s) = server {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            s.shutdown().await?;
        }
        anyhow::Ok(())
    })
}
