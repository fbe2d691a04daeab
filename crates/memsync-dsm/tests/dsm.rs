//! N nodes as N regions in one process, over loopback TCP, for every manager scheme.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use memsync_dsm::{DsmConfig, Node, Scheme};

/// Aborts the process if a test hangs (a protocol deadlock must fail, not stall CI).
fn watchdog(what: &'static str, secs: u64) -> Arc<std::sync::atomic::AtomicBool> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&done);
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if d.load(SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what}: no progress after {secs} s (deadlock?)");
        std::process::abort();
    });
    done
}

fn cluster(n: usize, scheme: Scheme, size: u64) -> Vec<Node> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = DsmConfig::new(i as u16, peers.clone(), scheme, size);
            cfg.connect_timeout = Duration::from_secs(20);
            cfg.fault_deadline = Duration::from_secs(20);
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn counter(n: usize, scheme: Scheme) {
    const THREADS: usize = 2;
    const ADDS: u64 = 2000;
    let done = watchdog("counter", 120);
    let nodes = cluster(n, scheme, 16 * 4096);
    let barrier = Barrier::new(n * THREADS);
    std::thread::scope(|s| {
        for node in &nodes {
            for t in 0..THREADS {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..ADDS {
                        node.atomic_u64(0).fetch_add(1, SeqCst);
                        // A second counter on another page, touched from another word.
                        node.atomic_u64(4096 * 3 + 8 * t).fetch_add(2, SeqCst);
                        // Interleave the nodes, so the pages move back and forth.
                        std::thread::yield_now();
                    }
                });
            }
        }
    });
    let want = (n * THREADS) as u64 * ADDS;
    for node in &nodes {
        assert_eq!(
            node.atomic_u64(0).load(SeqCst),
            want,
            "node {} {scheme}",
            node.id()
        );
        let two: u64 = (0..THREADS)
            .map(|t| node.atomic_u64(4096 * 3 + 8 * t).load(SeqCst))
            .sum();
        assert_eq!(two, 2 * want, "node {} {scheme}", node.id());
    }
    let writes: u64 = nodes
        .iter()
        .map(|n| n.stats().write_faults.load(SeqCst))
        .sum();
    eprintln!("{scheme} N={n}: {writes} write faults");
    drop(nodes);
    done.store(true, SeqCst);
}

#[test]
fn counter_centralized() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Centralized);
    }
}

#[test]
fn counter_fixed() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Fixed);
    }
}

#[test]
fn counter_dynamic() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Dynamic);
    }
}
