//! The node's public types: its configuration (`DsmConfig`), the API's errors
//! (`DsmError`), a page's `Access` and the counters (`DsmStats`). Plain data with no
//! behaviour of the node, so every other part may use them and they use none.

use std::io;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use memsync_core::DynStore;
use memsync_core::layers::LatencyHistogram;

use crate::manager::Scheme;
use crate::net::DsmTls;
use crate::proto::NodeId;

/// How a node is started.
#[derive(Debug)]
pub struct DsmConfig {
    /// This node's index in `peers`.
    pub id: NodeId,
    /// Every node's address (`HOST:PORT`), in node order, this node's included.
    pub peers: Vec<String>,
    /// The manager scheme (all nodes must agree).
    pub scheme: Scheme,
    /// Bytes of the shared region (a multiple of `page_size`).
    pub size: u64,
    /// The granularity of coherence: a power of two from 4 KiB to 2 MiB. Default 4 KiB.
    pub page_size: usize,
    /// TLS between nodes.
    pub tls: Option<DsmTls>,
    /// Where the initial data of the pages this node owns at first comes from (zeros
    /// without one), and where a lost page is reloaded from.
    pub backing: Option<DynStore>,
    /// How long to wait for every peer to connect.
    pub connect_timeout: Duration,
    /// A peer whose host or network stays silent this long is down (TCP keepalive and
    /// `TCP_USER_TIMEOUT` on every connection; a peer that is merely slow still answers at
    /// the TCP level and is never declared down). Default 10 s; whole seconds, at least 1.
    pub dead_after: Duration,
    /// How long a fault may wait for its page before the access gets `SIGBUS` (and the API
    /// an error).
    pub fault_deadline: Duration,
    /// Fault-handler threads of the region. Default 4: a handler waits on the network for
    /// a remote page, so more handlers serve more concurrent faults (invalidations do not
    /// need one).
    pub handler_threads: usize,
    /// Refuse (as a protocol error) a page older than one this node has seen.
    pub check_versions: bool,
    /// Runtime worker threads for the network and the message handlers. Default 2.
    pub worker_threads: usize,
}

impl DsmConfig {
    /// A configuration with the defaults.
    #[must_use]
    pub fn new(id: NodeId, peers: Vec<String>, scheme: Scheme, size: u64) -> Self {
        DsmConfig {
            id,
            peers,
            scheme,
            size,
            page_size: 4096,
            tls: None,
            backing: None,
            connect_timeout: Duration::from_secs(30),
            dead_after: Duration::from_secs(10),
            fault_deadline: Duration::from_secs(30),
            handler_threads: 4,
            check_versions: true,
            worker_threads: 2,
        }
    }
}

/// Errors of the node API.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    #[error("DSM configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Region(#[from] memsync_region::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("page {page}: {reason}")]
    Page { page: u64, reason: String },
}

/// A page's access at this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No copy here.
    Invalid,
    /// A read copy, write-protected.
    Read,
    /// The only copy, writable (only at the owner).
    Write,
}

/// Counters of one node.
#[derive(Debug, Default)]
pub struct DsmStats {
    pub read_faults: AtomicU64,
    pub write_faults: AtomicU64,
    /// Write faults served without asking anyone (owner with no copies elsewhere).
    pub local_upgrades: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Bytes of the frames received.
    pub bytes_received: AtomicU64,
    pub pages_sent: AtomicU64,
    pub invalidations_sent: AtomicU64,
    pub forwards: AtomicU64,
    /// Sum and maximum of the forwards a served request took (dynamic scheme).
    pub hops_sum: AtomicU64,
    pub hops_max: AtomicU64,
    pub served: AtomicU64,
    /// At the heir (dynamic scheme): pages whose owner it looked for after a node died (a WHO
    /// round each).
    pub recoveries: AtomicU64,
    /// Grants that arrived for no waiting request (after a node died) and were taken anyway.
    pub late_grants: AtomicU64,
    /// Read fault latency (request to data here), and write fault latency (hook to
    /// unprotect).
    pub read_latency: LatencyHistogram,
    pub write_latency: LatencyHistogram,
}
