//! `memsync sync`: delta synchronisation of two stores, continuous push, and the sync peer.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::ProgressBar;
use memsync_core::size::{format_size, parse_duration};
use memsync_core::{DynStore, StoreUrl};
use memsync_sync::index::IndexFile;
use memsync_sync::{
    Connect, Dest, LocalDest, Peer, PeerAddr, PeerConfig, Progress, Pusher, RemoteDest, Report,
    Rescan, Round, Source, SyncOptions, is_peer_url,
};
use serde_json::json;

use crate::context::{Context, parse_size_arg};

#[derive(Debug, Args)]
#[command(after_help = "\
EXAMPLES:
  memsync sync file:/var/tmp/disk.img file:/backup/disk.img
  memsync sync --listen 0.0.0.0:7070 file:/backup/disk.img          on the remote machine
  memsync sync file:/var/tmp/disk.img memsync://backup:7070
  memsync sync file:/var/tmp/disk.img 'memsyncs://backup:7070?tls-ca=ca.pem'
  memsync sync file:/var/tmp/disk.img memsync://backup:7070 --every 10s   (SIGUSR1: a round now)
  memsync sync memsync://backup:7070 file:/var/tmp/disk.img         pull: the peer is the source")]
pub struct SyncArgs {
    /// SRC DST: the source store URL and the destination (a store URL of the same size, or a
    /// sync peer memsync://HOST:PORT, memsyncs://HOST:PORT?tls-ca=FILE). SRC may be the peer
    /// instead (a pull into the local DST). With --listen: the one store to serve (as a
    /// destination, or as a source to pull from; it may be read-only then).
    #[arg(num_args = 1..=2, required = true, value_name = "URL")]
    pub stores: Vec<String>,
    /// Serve STORE as a sync peer on HOST:PORT until SIGINT/SIGTERM (port 0 picks one; the
    /// address is printed on stdout).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Chunk size: the unit of strong digests (a power of two, 4K to 16M).
    #[arg(long, default_value = "64K", value_parser = parse_size_arg)]
    pub chunk: u64,
    /// Do not read or write the digest index next to local files.
    #[arg(long)]
    pub no_index: bool,
    /// Do not flush a `file:` destination at the end (like rsync without --fsync): faster, but
    /// a crash of the machine can lose what was synced; its digest index is then trusted until
    /// the next boot only. With --listen: the peer does not flush its store on a commit.
    #[arg(long)]
    pub no_fsync: bool,
    /// Compress changed data on the wire to a peer with lz4 (where it shrinks: pays on a slow
    /// link with compressible data; costs CPU, and nothing is gained on random data).
    #[arg(long)]
    pub compress: bool,
    /// Chunks in flight (each costs two round trips to a peer; many overlap them).
    #[arg(long, default_value_t = 4096)]
    pub window: usize,
    /// Keep pushing: after the first sync, a round every DURATION (and on SIGUSR1) that finds
    /// changed chunks by hashing the source, until SIGINT/SIGTERM, then a final round.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub every: Option<Duration>,
    /// Print the report as one JSON object (and one per round).
    #[arg(long)]
    pub json: bool,
    /// TLS certificate chain (PEM) of a peer (--listen).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of a peer (--listen).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The file under a `file:` URL (for its digest index).
pub fn file_of(url: &str) -> Option<PathBuf> {
    let u = StoreUrl::parse(url).ok()?;
    (u.scheme == "file" && !u.path.is_empty()).then(|| PathBuf::from(&u.path))
}

/// A destination of a push, opened as far as it can be outside the runtime: a local store
/// (with the file of its digest index), or the URL of a sync peer to connect to.
pub(crate) enum DestUrl {
    Local(DynStore, Option<PathBuf>),
    Peer(String),
}

impl DestUrl {
    /// Open `url` (a store URL, or a peer's memsync:// or memsyncs:// URL, connected later).
    pub(crate) fn open(ctx: &Context, url: &str, no_index: bool) -> Result<Self> {
        if is_peer_url(url) {
            return Ok(DestUrl::Peer(url.to_owned()));
        }
        let index = (!no_index).then(|| file_of(url)).flatten();
        Ok(DestUrl::Local(ctx.open(url)?, index))
    }

    /// The destination for a source of `size` bytes synced in chunks of `chunk`.
    pub(crate) async fn connect(
        self,
        size: u64,
        chunk: u64,
        compress: bool,
        no_fsync: bool,
    ) -> Result<Arc<dyn Dest>> {
        Ok(match self {
            DestUrl::Peer(url) => {
                let addr = PeerAddr::parse(&url)?;
                let opts = Connect {
                    want_digests: true,
                    compress,
                    pull: false,
                };
                RemoteDest::connect_with(&addr, size, chunk, opts)
                    .await
                    .with_context(|| format!("connecting to {}", memsync_core::redact(&url)))?
            }
            DestUrl::Local(store, index) => {
                let d = LocalDest::new(store, chunk, index.as_deref())?;
                d.set_durable(!no_fsync);
                Arc::new(d)
            }
        })
    }
}

pub(crate) struct Bar(pub(crate) ProgressBar);

impl Progress for Bar {
    fn phase(&self, name: &str, total: u64) {
        self.0.set_position(0);
        self.0.set_length(total);
        self.0.set_message(name.to_owned());
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
}

pub fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "size": r.size, "chunk_size": r.chunk_size, "chunks": r.chunks,
        "scanned": r.size, "src_read": r.src_scan.read, "src_hashed": r.src_scan.hashed,
        "src_reused": r.src_scan.reused,
        "src_holes": r.src_scan.holes, "src_index": r.src_index,
        "dst_hashed": r.dest.scan.hashed, "dst_read": r.dest.scan.read + r.dest.read,
        "dst_index_used": r.dest.index_used,
        "differing_chunks": r.differing, "updated_chunks": r.updated,
        "resent_whole": r.resent_whole,
        "data_bytes": r.data_bytes, "zero_bytes": r.zero_bytes,
        "dst_written": r.dest.written, "dst_zeroed": r.dest.zeroed,
        "wire_sent": r.wire_sent, "wire_received": r.wire_received,
        "pending_chunks": r.pending.iter().map(|x| [x.start, x.end]).collect::<Vec<_>>(),
        "uncertain_chunks": r.uncertain,
        "hash_seconds": r.hash_time.as_secs_f64(), "seconds": r.elapsed.as_secs_f64(),
    })
}

pub(crate) fn print_report(r: &Report, json: bool) {
    if json {
        outln!("{}", report_json(r));
        return;
    }
    outln!(
        "synced {} in {:.3} s: {} of {} chunks differed, {} updated{}",
        format_size(r.size),
        r.elapsed.as_secs_f64(),
        r.differing,
        r.chunks,
        r.updated,
        if r.resent_whole > 0 {
            format!(" ({} resent whole)", r.resent_whole)
        } else {
            String::new()
        }
    );
    outln!(
        "  source: hashed {} (unchanged by fingerprint {}, holes {}), index {}; destination: hashed {}{}",
        format_size(r.src_scan.hashed),
        format_size(r.src_scan.reused),
        format_size(r.src_scan.holes),
        r.src_index,
        format_size(r.dest.scan.hashed),
        if r.dest.index_used {
            ", index used"
        } else {
            ""
        }
    );
    outln!(
        "  sent {} of data, {} zeroed without data{}",
        format_size(r.data_bytes),
        format_size(r.zero_bytes),
        if r.wire_sent > 0 {
            format!(
                "; on the wire {} sent, {} received",
                format_size(r.wire_sent),
                format_size(r.wire_received)
            )
        } else {
            String::new()
        }
    );
}

pub(crate) fn print_round(n: u64, r: &Round, json: bool) {
    if json {
        outln!(
            "{}",
            json!({"round": n, "changed_bytes": r.changed_bytes, "chunks": r.chunks,
                   "updated_chunks": r.updated, "data_bytes": r.data_bytes,
                   "zero_bytes": r.zero_bytes, "wire_sent": r.wire_sent,
                   "seconds": r.elapsed.as_secs_f64()})
        );
    } else {
        outln!(
            "round {n}: {} chunks changed, {} updated, {} sent in {:.3} s",
            r.chunks,
            r.updated,
            format_size(r.data_bytes),
            r.elapsed.as_secs_f64()
        );
    }
}

pub fn sync(ctx: &Context, a: SyncArgs) -> Result<()> {
    if a.listen.is_some() {
        return listen(ctx, a);
    }
    let [src_url, dst_url] = &a.stores[..] else {
        bail!("sync needs SRC and DST (or --listen ADDR STORE)");
    };
    if a.tls_cert.is_some() {
        bail!(
            "--tls-cert/--tls-key are for a peer (--listen); a client uses memsyncs://...?tls-ca=FILE"
        );
    }
    if a.no_fsync && file_of(dst_url).is_none() {
        // Other stores' flush is where their data reaches its backend.
        bail!("--no-fsync is for a file: destination");
    }
    if is_peer_url(src_url) {
        return pull(ctx, &a, src_url, dst_url);
    }
    let src = ctx.open(src_url)?;
    let index = |u: &str| (!a.no_index).then(|| file_of(u)).flatten();
    let source = Source {
        store: src.clone(),
        index: index(src_url).map(|p| IndexFile::for_file(&p)),
    };
    // Stores open on their own runtime call, outside the block below.
    let dst = DestUrl::open(ctx, dst_url, a.no_index)?;
    ctx.rt.block_on(async {
        let dest = dst
            .connect(src.size(), a.chunk, a.compress, a.no_fsync)
            .await?;
        let opts = SyncOptions { window: a.window };
        let bar = Bar(crate::context::progress(src.size(), "hash"));
        let Some(every) = a.every else {
            let r = memsync_sync::sync(&source, dest, opts, &bar).await;
            bar.0.finish_and_clear();
            return match r {
                Ok(r) => {
                    print_report(&r, a.json);
                    Ok(())
                }
                Err(e) => {
                    print_report(&e.report, a.json);
                    eprintln!(
                        "memsync: sync interrupted: {} chunks updated; pending chunks {:?} still hold their old bytes{}; run it again to complete",
                        e.report.updated,
                        e.report.pending,
                        if e.report.uncertain.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " (chunks {:?} were in flight: each is old or new, or partly written if a write failed)",
                                e.report.uncertain
                            )
                        }
                    );
                    Err(anyhow::Error::new(e.error).context("sync failed"))
                }
            };
        };
        let changes = Rescan::new(src.clone(), a.chunk)?;
        let (pusher, first) = Pusher::start(source, dest, changes, opts, &bar)
            .await
            .map_err(|e| anyhow::Error::new(e.error).context("first sync failed"))?;
        bar.0.finish_and_clear();
        print_report(&first, a.json);
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut n = 0;
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = usr1.recv() => false,
                _ = int.recv() => true,
                _ = term.recv() => true,
            };
            n += 1;
            let r = pusher.round().await.context("push round failed")?;
            print_round(n, &r, a.json);
            if last {
                return Ok(());
            }
        }
    })
}

/// `memsync sync memsync://PEER file:DST`: the peer's store is the source.
fn pull(ctx: &Context, a: &SyncArgs, src_url: &str, dst_url: &str) -> Result<()> {
    if is_peer_url(dst_url) {
        bail!("one side of a sync must be a local store");
    }
    if a.every.is_some() {
        bail!("--every pushes a local source; it cannot pull from a peer");
    }
    let dst = ctx.open(dst_url)?;
    let file = (!a.no_index).then(|| file_of(dst_url)).flatten();
    let local = LocalDest::new(dst.clone(), a.chunk, file.as_deref())?;
    local.set_durable(!a.no_fsync);
    ctx.rt.block_on(async {
        let addr = PeerAddr::parse(src_url)?;
        let opts = Connect {
            want_digests: true,
            compress: a.compress,
            pull: true,
        };
        let remote = RemoteDest::connect_with(&addr, dst.size(), a.chunk, opts)
            .await
            .with_context(|| format!("connecting to {}", memsync_core::redact(src_url)))?;
        let bar = Bar(crate::context::progress(dst.size(), "hash"));
        let opts = SyncOptions { window: a.window };
        let r = memsync_sync::pull(remote, Arc::new(local), opts, &bar).await;
        bar.0.finish_and_clear();
        match r {
            Ok(r) => {
                print_report(&r, a.json);
                Ok(())
            }
            Err(e) => {
                print_report(&e.report, a.json);
                eprintln!(
                    "memsync: pull interrupted: {} chunks updated; pending chunks {:?} still hold their old bytes (in flight: {:?}); run it again to complete",
                    e.report.updated, e.report.pending, e.report.uncertain
                );
                Err(anyhow::Error::new(e.error).context("pull failed"))
            }
        }
    })
}

fn listen(ctx: &Context, a: SyncArgs) -> Result<()> {
    let [store_url] = &a.stores[..] else {
        bail!("--listen takes one STORE");
    };
    if a.no_fsync && file_of(store_url).is_none() {
        bail!("--no-fsync is for a file: store");
    }
    let addr = a.listen.clone().unwrap_or_default();
    let store = ctx.open(store_url)?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(memsync_nbd::server_tls_config(c, k)?),
        _ => None,
    };
    let peer = Peer::new(
        store,
        PeerConfig {
            tls,
            index_file: (!a.no_index).then(|| file_of(store_url)).flatten(),
            no_fsync: a.no_fsync,
        },
    );
    ctx.rt.block_on(async {
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        outln!(
            "memsync: sync peer for {} on {}",
            memsync_core::redact(store_url),
            l.local_addr()?
        );
        let _ = std::io::stdout().flush();
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let p = peer.clone();
        tokio::select! {
            r = p.serve(l) => r.context("accepting")?,
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "memsync: sync peer stopped: {} B received, {} B sent",
            peer.received.load(std::sync::atomic::Ordering::Relaxed),
            peer.sent.load(std::sync::atomic::Ordering::Relaxed)
        );
        anyhow::Ok(())
    })
}
