//! Tour step: a distributed shared memory of three nodes on loopback, adding to one counter.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use memsync_dsm::{DsmConfig, Node, Scheme};

use super::{Tour, check_interrupted};

const NODES: usize = 3;

pub(super) fn run(t: &mut Tour<'_>) -> Result<()> {
    let adds: u64 = if t.quick { 1_000 } else { 5_000 };
    t.step(
        "a distributed shared memory of three nodes on one counter",
        &format!(
            "Three DSM nodes, each with its own TCP listener on loopback (threads of this\n\
             process here; `memsync dsm` runs one per host), share a 1 MiB region kept\n\
             coherent page by page (Ivy, dynamic manager). Each node adds 1 to a u64 at offset\n\
             0 {adds} times with plain atomic instructions on the region's memory; the page\n\
             moves to whichever node writes. Every node must then read {}.",
            adds * NODES as u64
        ),
    )?;
    let listeners = (0..NODES)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    // Each node waits for the others to connect: start them side by side.
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = DsmConfig::new(i as u16, peers.clone(), Scheme::Dynamic, 1 << 20);
            cfg.fault_deadline = Duration::from_secs(30);
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a DSM node thread panicked"))?
                .context("starting a DSM node")
        })
        .collect::<Result<Vec<_>>>()?;
    let total = adds * NODES as u64;
    let start = Instant::now();
    let seen = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|node| {
                s.spawn(move || {
                    let c = node.atomic_u64(0);
                    for _ in 0..adds {
                        c.fetch_add(1, SeqCst);
                    }
                    let waited = Instant::now();
                    while c.load(SeqCst) < total && waited.elapsed() < Duration::from_secs(30) {
                        if check_interrupted().is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    c.load(SeqCst)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    let el = start.elapsed();
    check_interrupted()?;
    let sum =
        |f: fn(&memsync_dsm::DsmStats) -> u64| nodes.iter().map(|n| f(n.stats())).sum::<u64>();
    let (rf, wf, pages) = (
        sum(|s| s.read_faults.load(Relaxed)),
        sum(|s| s.write_faults.load(Relaxed)),
        sum(|s| s.pages_sent.load(Relaxed)),
    );
    outln!(
        "   {total} additions in {:.3} s: {rf} read faults, {wf} write faults, the page moved {pages} times",
        el.as_secs_f64()
    );
    for (i, v) in seen.iter().enumerate() {
        if *v != total {
            bail!("node {i} reads {v}, not {total}");
        }
    }
    outln!("   counter = {total} on every node");
    t.figure(
        "DSM counter, 3 nodes",
        format!(
            "{total} adds in {:.2} s, {} write faults",
            el.as_secs_f64(),
            wf
        ),
    );
    Ok(())
}
