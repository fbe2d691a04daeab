//! `memsync dsm`: one node of a distributed shared memory region (memsync-dsm): the region is
//! kept coherent with the other nodes (Ivy) until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use memsync_core::size::parse_size;
use memsync_dsm::{DsmConfig, DsmTls, Node, Scheme};

use crate::context::Context;

#[derive(Debug, Args)]
pub struct DsmArgs {
    /// This node's index in --peers.
    #[arg(long)]
    pub id: u16,
    /// Every node's HOST:PORT, in node order (this node's included), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub peers: Vec<String>,
    /// Manager scheme: centralized, fixed or dynamic (every node must use the same).
    #[arg(long, default_value = "dynamic")]
    pub manager: Scheme,
    /// Size of the shared region (a multiple of --page).
    #[arg(long)]
    pub size: String,
    /// The page: the granularity of coherence (4K to 2M).
    #[arg(long, default_value = "4K")]
    pub page: String,
    /// Backing store URL: the initial data of the region, and where pages lost with a node
    /// are reloaded from (the state flushed last; see --flush-every).
    #[arg(long, value_name = "URL")]
    pub backing: Option<String>,
    /// With --backing: write this node's pages to it every SECONDS.
    #[arg(long, value_name = "SECONDS", requires = "backing")]
    pub flush_every: Option<u64>,
    /// Seconds a fault waits for its page before the access gets SIGBUS.
    #[arg(long, default_value_t = 30)]
    pub deadline: u64,
    /// Seconds of silence (no TCP acknowledgement, no keepalive answer) after which a peer's
    /// host is taken for dead, and its pages recovered or reported lost.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub dead_after: u64,
    /// TLS between nodes: this node's certificate (PEM), with --tls-key, --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed every node's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name every node's certificate is valid for.
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// Demo workload: add 1 to the shared counter at offset 0 this many times (atomic
    /// instructions), wait until every node has (N times this many), print the counter, and
    /// keep serving.
    #[arg(long, value_name = "N")]
    pub counter: Option<u64>,
}

pub fn dsm(ctx: &Context, a: DsmArgs) -> Result<()> {
    let size = parse_size(&a.size).context("--size")?;
    let page = usize::try_from(parse_size(&a.page).context("--page")?)?;
    let mut cfg = DsmConfig::new(a.id, a.peers.clone(), a.manager, size);
    cfg.page_size = page;
    cfg.fault_deadline = std::time::Duration::from_secs(a.deadline);
    cfg.dead_after = std::time::Duration::from_secs(a.dead_after);
    if let Some(url) = &a.backing {
        let store = ctx.open(url)?;
        if store.size() < size {
            bail!(
                "the backing store holds {} bytes, less than --size",
                store.size()
            );
        }
        cfg.backing = Some(store);
    }
    if let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        cfg.tls = Some(DsmTls::from_files(cert, key, ca, &a.tls_name)?);
    }
    // Before anything is printed: a SIGINT/SIGTERM sent as soon as the node reports (the
    // counter line) must stop it cleanly, not kill it with the default action.
    let (mut int, mut term) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _rt = ctx.rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    let node = Node::bind_and_start(cfg).context("starting the node")?;
    eprintln!(
        "memsync dsm: node {} of {} up ({} manager, {} bytes, {} B pages)",
        node.id(),
        node.nodes(),
        node.scheme(),
        size,
        node.page_size()
    );
    if let Some(n) = a.counter {
        let c = node.atomic_u64(0);
        for _ in 0..n {
            c.fetch_add(1, SeqCst);
        }
        // Every node adds as many: wait for the others, then show the sum.
        let total = n * node.nodes() as u64;
        while c.load(SeqCst) < total {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        println!("counter {}", c.load(SeqCst));
    }
    let flush_every = a.flush_every.map(std::time::Duration::from_secs);
    ctx.rt.block_on(async {
        loop {
            let tick = async {
                match flush_every {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                () = tick => {
                    let n = &node;
                    tokio::task::block_in_place(|| n.flush())?;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let s = node.stats();
    eprintln!(
        "memsync dsm: read faults {}, write faults {} ({} local), messages sent {}, pages sent {}, invalidations {}, forwards {}",
        s.read_faults.load(Relaxed),
        s.write_faults.load(Relaxed),
        s.local_upgrades.load(Relaxed),
        s.messages_sent.load(Relaxed),
        s.pages_sent.load(Relaxed),
        s.invalidations_sent.load(Relaxed),
        s.forwards.load(Relaxed)
    );
    Ok(())
}
