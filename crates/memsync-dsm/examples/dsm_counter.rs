//! A shared counter on a DSM region: start one node per process, e.g. on two hosts
//!
//! ```text
//! dsm_counter 0 10.0.0.1:7000,10.0.0.2:7000 dynamic 10000
//! dsm_counter 1 10.0.0.1:7000,10.0.0.2:7000 dynamic 10000
//! ```
//!
//! or, with no arguments, three nodes in this process over loopback. Every node adds to the
//! counter with atomic instructions on the region's memory; every node then reads the sum.

use std::sync::atomic::Ordering::SeqCst;

use memsync_dsm::{DsmConfig, Node, Scheme};

fn work(node: &Node, adds: u64, total: u64) {
    // The program's view of the shared memory: plain atomics on the region.
    let counter = node.atomic_u64(0);
    for _ in 0..adds {
        counter.fetch_add(1, SeqCst);
    }
    while counter.load(SeqCst) < total {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!("node {}: counter = {}", node.id(), counter.load(SeqCst));
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [id, peers, scheme, adds] = &args[..] {
        let peers: Vec<String> = peers.split(',').map(str::to_owned).collect();
        let n = peers.len() as u64;
        let adds: u64 = adds.parse()?;
        let cfg = DsmConfig::new(id.parse()?, peers, scheme.parse()?, 1 << 20);
        let node = Node::bind_and_start(cfg)?;
        work(&node, adds, n * adds);
        // Keep serving this node's pages a moment for the others' last reads.
        std::thread::sleep(std::time::Duration::from_secs(1));
        return Ok(());
    }
    let listeners = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let cfg = DsmConfig::new(i as u16, peers.clone(), Scheme::Dynamic, 1 << 20);
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("node thread"))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::scope(|s| {
        for node in &nodes {
            s.spawn(|| work(node, 10_000, 30_000));
        }
    });
    Ok(())
}
