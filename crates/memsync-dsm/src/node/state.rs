//! The node's shared state: `Shared` (what every task, handler thread and connection of a
//! node holds), the per-page `PageState` and the manager's per-page `MSlot`, the requests
//! waiting for answers, and the primitives every part uses: sending a message (to this node
//! itself through `dispatch`), refusing a request, the heir, the owner's copy of a page.
//! Separate so that the protocol's parts (fault, serve, recovery, connect) depend on it and
//! not on each other for these.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use memsync_core::{DynStore, StoreError};
use memsync_region::{ChunkState, LazyRegion};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::config::{Access, DsmStats};
use crate::manager::Manager;
use crate::proto::{ErrorCode, Msg, NodeId};

#[derive(Debug)]
pub(super) struct PageState {
    pub(super) owner: bool,
    pub(super) access: Access,
    /// Nodes holding read copies (only meaningful at the owner).
    pub(super) copyset: u64,
    /// Probable owner and the version at which it owned the page.
    pub(super) prob: NodeId,
    pub(super) prob_v: u64,
    /// The page's version (write epoch): the owner's current one, else the last one this
    /// node installed (a node never installs an older one).
    pub(super) version: u64,
    /// The page's data when this node owns it but has not installed it (a copy).
    pub(super) stash: Option<Bytes>,
    /// The only copy was on a node that died.
    pub(super) lost: bool,
    /// A fault's data was handed to the engine and may not be installed yet.
    pub(super) installing: bool,
    /// A read copy older than this was invalidated before it arrived: discard it.
    pub(super) stale_below: u64,
    /// A grant (PAGE with ownership) arrived and is being taken: this node is the owner as
    /// far as the heir's recovery is concerned (dynamic scheme).
    pub(super) granted: bool,
    /// At the heir (dynamic scheme): the dead nodes (a set) this page was recovered from.
    pub(super) recovered: u64,
    /// A grant for no request, waiting to be taken: by the next request for the page as its
    /// answer, or by the task that adopts it.
    pub(super) parked: Option<Msg>,
}

impl PageState {
    /// A grant (PAGE with ownership at `version`) taken by node `me`, whose copies are
    /// invalidated: `data` is kept as the owner's copy until it is installed.
    pub(super) fn take_grant(&mut self, me: NodeId, version: u64, data: Bytes) {
        self.owner = true;
        self.version = version;
        self.prob = me;
        self.prob_v = version;
        self.copyset = 0;
        self.stash = Some(data);
        self.granted = false;
        self.lost = false;
    }
}

#[derive(Debug)]
pub(super) struct Slot {
    /// One local operation on the page at a time (a fault's request, a write upgrade, serving
    /// a forwarded request); never held by the INVALIDATE handler.
    pub(super) op: tokio::sync::Mutex<()>,
    pub(super) st: Mutex<PageState>,
}

/// The manager's part for one page (centralized and fixed schemes).
#[derive(Debug)]
pub(super) struct MSlot {
    /// Held from a request's arrival until the requester's CONFIRM.
    pub(super) lock: tokio::sync::Mutex<()>,
    pub(super) owner: AtomicU16,
}

pub(crate) struct Shared {
    pub(super) me: NodeId,
    pub(super) nodes: usize,
    pub(super) mgr: Box<dyn Manager>,
    pub(super) page: usize,
    pub(super) pages: u64,
    pub(super) slots: Box<[Slot]>,
    pub(super) mslots: Box<[MSlot]>,
    pub(super) region: OnceLock<Weak<LazyRegion>>,
    pub(super) peers: Box<[OnceLock<mpsc::UnboundedSender<Bytes>>]>,
    pub(super) alive: Box<[AtomicBool]>,
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    /// At the heir (dynamic scheme): one page recovery at a time.
    pub(super) recovery: tokio::sync::Mutex<()>,
    /// At a manager: the request each busy page waits for (req, requester).
    pub(super) confirms: Mutex<HashMap<u64, Confirmation>>,
    /// The nodes known to be down (a bit each).
    pub(super) down: tokio::sync::watch::Sender<u64>,
    pub(super) next_req: AtomicU64,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) backing: Option<DynStore>,
    pub(super) deadline: Duration,
    pub(super) check_versions: bool,
    pub(super) stopping: AtomicBool,
    pub(super) stats: DsmStats,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("me", &self.me)
            .field("nodes", &self.nodes)
            .field("scheme", &self.mgr.scheme())
            .finish_non_exhaustive()
    }
}

/// A request waiting for its answer.
pub(super) struct Pending {
    /// Where it was sent.
    pub(super) to: NodeId,
    /// A request along probable owners (dynamic scheme): any node may hold it.
    pub(super) chain: bool,
    pub(super) page: u64,
    pub(super) tx: oneshot::Sender<Msg>,
}

/// What a manager's busy page waits for: the request and its requester.
type Confirmation = (u64, NodeId, oneshot::Sender<()>);

/// A reference to the region held by a task. The region's drop joins threads and drops
/// runtimes, which must not happen on an async worker: if a task holds the last reference
/// (the node was dropped meanwhile), the region is dropped on a thread of its own.
pub(super) struct RegionRef(Option<Arc<LazyRegion>>);

impl RegionRef {
    pub(super) fn arc(&self) -> RegionRef {
        RegionRef(self.0.clone())
    }
}

impl std::ops::Deref for RegionRef {
    type Target = LazyRegion;
    fn deref(&self) -> &LazyRegion {
        self.0.as_ref().expect("set until dropped")
    }
}

impl Drop for RegionRef {
    fn drop(&mut self) {
        if let Some(r) = self.0.take().and_then(Arc::into_inner) {
            let _ = std::thread::Builder::new()
                .name("memsync-dsm-drop".into())
                .spawn(move || drop(r));
        }
    }
}

/// A pause while a fill of the page settles: a fill takes microseconds, and a timer sleeps a
/// millisecond at least, so yield first.
pub(super) async fn settle_pause(tries: &mut u32) {
    *tries += 1;
    if *tries < 100 {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(super) fn err(page: u64, reason: impl Into<String>) -> StoreError {
    StoreError::backend(format!("DSM page {page}: {}", reason.into()))
}

pub(super) fn bit(n: NodeId) -> u64 {
    1 << n
}

impl Shared {
    pub(super) fn region(&self) -> Option<RegionRef> {
        self.region
            .get()
            .and_then(Weak::upgrade)
            .map(|r| RegionRef(Some(r)))
    }

    pub(super) fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Relaxed)
    }

    /// A new request id for a message to `to` about `page`, registered so that its answer
    /// (PAGE, INV_ACK, ERROR or HAVE carrying that id) arrives on the returned receiver, and
    /// fails when `to` goes down.
    pub(super) fn expect_answer(&self, to: NodeId, page: u64) -> (u64, oneshot::Receiver<Msg>) {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        self.register(
            req,
            Pending {
                to,
                chain: false,
                page,
                tx,
            },
        );
        (req, rx)
    }

    /// Registers `p`, the request `req` waiting for an answer; `false` (and the request's
    /// receiver fails at once) if its node is down by now.
    pub(super) fn register(&self, req: u64, p: Pending) -> bool {
        let to = p.to;
        self.pending.lock().insert(req, p);
        // `node_down` marks the node down, then fails the requests it finds. One registered
        // in between (its sender checked that the node was up just before) would wait for an
        // answer that never comes: an INVALIDATE's acknowledgement is awaited with no
        // deadline, and a request past the fault deadline fails the fault. Checked after the
        // insert: either `node_down` found this one, or this sees the node down.
        if self.alive[usize::from(to)].load(Relaxed) {
            return true;
        }
        self.pending.lock().remove(&req);
        false
    }

    pub(super) fn send(self: &Arc<Self>, to: NodeId, m: Msg) {
        self.stats.messages_sent.fetch_add(1, Relaxed);
        if tracing::enabled!(tracing::Level::TRACE) {
            let brief = match &m {
                Msg::Page {
                    req,
                    page,
                    version,
                    grant,
                    copyset,
                    owner,
                    ..
                } => {
                    format!(
                        "PAGE req={req} page={page} v={version} grant={grant} cs={copyset:#x} owner={owner}"
                    )
                }
                m => format!("{m:?}"),
            };
            tracing::trace!(me = self.me, to, "send {brief}");
        }
        if to == self.me {
            let s = Arc::clone(self);
            self.rt.spawn(async move { s.dispatch(s.me, m) });
            return;
        }
        match self.peers.get(usize::from(to)).and_then(OnceLock::get) {
            Some(tx) => {
                let _ = tx.send(m.encode());
            }
            None => tracing::warn!(to, msg = m.name(), "memsync-dsm: no connection to node"),
        }
    }

    pub(super) fn slot(&self, page: u64) -> &Slot {
        &self.slots[page as usize]
    }

    pub(super) fn refuse(
        self: &Arc<Self>,
        to: NodeId,
        req: u64,
        page: u64,
        code: ErrorCode,
        why: &str,
    ) {
        self.send(
            to,
            Msg::Error {
                req,
                page,
                code,
                reason: why.to_owned(),
            },
        );
    }

    /// The heir (dynamic scheme): the lowest-numbered node that is up as far as this node
    /// knows. It recovers the pages whose probable-owner chain reaches a node that is down.
    pub(super) fn heir(&self) -> NodeId {
        (0..self.nodes as NodeId)
            .find(|&n| self.alive[usize::from(n)].load(Relaxed))
            .unwrap_or(self.me)
    }

    /// The page's data at its owner before anyone wrote it.
    pub(super) async fn initial(&self, page: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        match &self.backing {
            Some(b) => b.read(page * self.page as u64, buf).await,
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The owner's copy of the page: the installed page if it is present, else what it would
    /// install (the stash, or the initial data).
    pub(super) async fn snapshot(
        &self,
        region: &LazyRegion,
        page: u64,
    ) -> Result<Bytes, StoreError> {
        let off = page as usize * self.page;
        if region.chunk_state(page as usize) == ChunkState::Present {
            let mut v = vec![0; self.page];
            region.read_faulting(off, &mut v);
            return Ok(Bytes::from(v));
        }
        if let Some(d) = self.slot(page).st.lock().stash.clone() {
            return Ok(d);
        }
        let mut v = vec![0; self.page];
        self.initial(page, &mut v).await?;
        Ok(Bytes::from(v))
    }
}
