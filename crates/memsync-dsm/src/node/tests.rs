//! Invariants of a node's inside that the whole-node tests (`tests/dsm.rs`) cannot reach at
//! the exact moment they matter.

use std::time::Duration;

use tokio::sync::oneshot::error::TryRecvError;

use super::{DsmConfig, Node};
use crate::Scheme;

fn two_nodes(scheme: Scheme) -> Vec<Node> {
    let listeners: Vec<_> = (0..2)
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
            let mut cfg = DsmConfig::new(i as u16, peers.clone(), scheme, 4 * 4096);
            cfg.connect_timeout = Duration::from_secs(20);
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

/// A sender checks that a node is up, then registers the request it sends there; if the
/// node's connection ends in between, `node_down` has already failed the requests it found.
/// The request registered after it must fail at once: an INVALIDATE's acknowledgement is
/// awaited with no deadline (the writer would be held forever), and a request that waits
/// until the fault deadline fails its fault (a write fault marks the page lost: SIGBUS).
#[test]
fn request_registered_after_node_down_fails_at_once() {
    for scheme in Scheme::ALL {
        let nodes = two_nodes(scheme);
        let s = nodes[0].shared();
        s.node_down(1, false);
        let (req, mut rx) = s.expect_answer(1, 0);
        assert!(
            matches!(rx.try_recv(), Err(TryRecvError::Closed)),
            "{scheme}: request {req} to a node that is down still waits"
        );
        assert!(s.pending.lock().is_empty(), "{scheme}");
    }
}
