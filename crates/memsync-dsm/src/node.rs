//! A DSM node: a region (the engine) whose missing faults fetch read copies, whose
//! write-protect faults obtain ownership, and a message handler that serves copies,
//! invalidations and downgrades (`PROTOCOL.md`, "Node").

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memsync_core::layers::LatencyHistogram;
use memsync_core::{DynStore, StoreError};
use memsync_region::{
    ChunkSource, ChunkState, FaultHooks, LazyRegion, RegionConfig, SourceFuture, WpAction,
    WriteTracking,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::manager::{Manager, Scheme};
use crate::net::{self, DsmTls};
use crate::proto::{ErrorCode, MAX_NODES, Msg, NodeId, Want, valid_page_size};

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

#[derive(Debug)]
struct PageState {
    owner: bool,
    access: Access,
    /// Nodes holding read copies (only meaningful at the owner).
    copyset: u64,
    /// Probable owner and the version at which it owned the page.
    prob: NodeId,
    prob_v: u64,
    /// The page's version (write epoch): the owner's current one, else the last one this
    /// node installed (a node never installs an older one).
    version: u64,
    /// The page's data when this node owns it but has not installed it (a copy).
    stash: Option<Bytes>,
    /// The only copy was on a node that died.
    lost: bool,
    /// A fault's data was handed to the engine and may not be installed yet.
    installing: bool,
    /// A read copy older than this was invalidated before it arrived: discard it.
    stale_below: u64,
    /// A grant (PAGE with ownership) arrived and is being taken: this node is the owner as
    /// far as the heir's recovery is concerned (dynamic scheme).
    granted: bool,
    /// At the heir (dynamic scheme): the dead nodes (a set) this page was recovered from.
    recovered: u64,
    /// A grant for no request, waiting to be taken: by the next request for the page as its
    /// answer, or by the task that adopts it.
    parked: Option<Msg>,
}

#[derive(Debug)]
struct Slot {
    /// One local operation on the page at a time (a fault's request, a write upgrade, serving
    /// a forwarded request); never held by the INVALIDATE handler.
    op: tokio::sync::Mutex<()>,
    st: Mutex<PageState>,
}

/// The manager's part for one page (centralized and fixed schemes).
#[derive(Debug)]
struct MSlot {
    /// Held from a request's arrival until the requester's CONFIRM.
    lock: tokio::sync::Mutex<()>,
    owner: AtomicU16,
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

pub(crate) struct Shared {
    me: NodeId,
    nodes: usize,
    mgr: Box<dyn Manager>,
    page: usize,
    pages: u64,
    slots: Box<[Slot]>,
    mslots: Box<[MSlot]>,
    region: OnceLock<Weak<LazyRegion>>,
    peers: Box<[OnceLock<mpsc::UnboundedSender<Bytes>>]>,
    alive: Box<[AtomicBool]>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// At the heir (dynamic scheme): one page recovery at a time.
    recovery: tokio::sync::Mutex<()>,
    /// At a manager: the request each busy page waits for (req, requester).
    confirms: Mutex<HashMap<u64, Confirmation>>,
    /// The nodes known to be down (a bit each).
    down: tokio::sync::watch::Sender<u64>,
    next_req: AtomicU64,
    rt: tokio::runtime::Handle,
    backing: Option<DynStore>,
    deadline: Duration,
    check_versions: bool,
    stopping: AtomicBool,
    stats: DsmStats,
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
struct Pending {
    /// Where it was sent.
    to: NodeId,
    /// A request along probable owners (dynamic scheme): any node may hold it.
    chain: bool,
    page: u64,
    tx: oneshot::Sender<Msg>,
}

/// What a node knows of a page (HAVE).
#[derive(Clone, Copy, Debug)]
struct Report {
    node: NodeId,
    owner: bool,
    copy: bool,
    version: u64,
    prob: NodeId,
    prob_v: u64,
}

/// What the heir's recovery of a page found.
enum Recovered {
    /// This node owns it (a live owner, a transfer to it in flight, a promoted copy holder, or
    /// the heir with the page reloaded from the backing store).
    Owner(NodeId),
    /// Its only copy died.
    Lost,
    /// Undecided (a node did not answer): the requester retries.
    Unknown(String),
}

/// What a manager's busy page waits for: the request and its requester.
type Confirmation = (u64, NodeId, oneshot::Sender<()>);

/// A reference to the region held by a task. The region's drop joins threads and drops
/// runtimes, which must not happen on an async worker: if a task holds the last reference
/// (the node was dropped meanwhile), the region is dropped on a thread of its own.
struct RegionRef(Option<Arc<LazyRegion>>);

impl RegionRef {
    fn arc(&self) -> RegionRef {
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
async fn settle_pause(tries: &mut u32) {
    *tries += 1;
    if *tries < 100 {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn err(page: u64, reason: impl Into<String>) -> StoreError {
    StoreError::backend(format!("DSM page {page}: {}", reason.into()))
}

fn bit(n: NodeId) -> u64 {
    1 << n
}

impl Shared {
    fn region(&self) -> Option<RegionRef> {
        self.region
            .get()
            .and_then(Weak::upgrade)
            .map(|r| RegionRef(Some(r)))
    }

    fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Relaxed)
    }

    fn send(self: &Arc<Self>, to: NodeId, m: Msg) {
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

    /// A message from node `from`.
    fn dispatch(self: &Arc<Self>, from: NodeId, m: Msg) {
        match m {
            Msg::Page { req, .. }
            | Msg::InvAck { req, .. }
            | Msg::Error { req, .. }
            | Msg::Have { req, .. } => {
                if let Msg::Page {
                    page, grant: true, ..
                } = &m
                    && *page < self.pages
                {
                    // Owner from now on for the heir's recovery, before anything else from
                    // this connection (e.g. its end) is handled.
                    self.slot(*page).st.lock().granted = true;
                }
                let p = self.pending.lock().remove(&req);
                let orphan = match p {
                    Some(p) => p.tx.send(m).err(),
                    None => Some(m),
                };
                // A grant whose request stopped waiting (it gave up after a node went down, or
                // past the deadline): the page's ownership is here now. It answers this
                // node's request for the page in progress if there is one (that request holds
                // the page's lock while it waits, and may wait for a node that waits for this
                // one, the owner now); else the node adopts it.
                let orphan = match orphan {
                    Some(m @ Msg::Page { grant: true, .. }) => {
                        self.stats.late_grants.fetch_add(1, Relaxed);
                        let Msg::Page { page, .. } = &m else {
                            unreachable!()
                        };
                        let mut pend = self.pending.lock();
                        let k = pend
                            .iter()
                            .find(|(_, p)| p.chain && p.page == *page)
                            .map(|(k, _)| *k);
                        let page = *page;
                        let left = match k.and_then(|k| pend.remove(&k)) {
                            Some(p) => {
                                tracing::debug!(
                                    page,
                                    req,
                                    "memsync-dsm: a late grant answers the request in progress"
                                );
                                p.tx.send(m).err()
                            }
                            None => Some(m),
                        };
                        match left {
                            Some(m) if page < self.pages => {
                                // Parked under the pending lock: a request for the page
                                // registered after this takes it as its answer (`ask`: it
                                // holds the page's lock, which the adopting task would
                                // wait for), else the task adopts it.
                                let old = self.slot(page).st.lock().parked.replace(m);
                                if old.is_some() {
                                    tracing::error!(page, "memsync-dsm: two late grants");
                                }
                                drop(pend);
                                let s = Arc::clone(self);
                                self.rt.spawn(async move { s.adopt(page).await });
                                None
                            }
                            left => left,
                        }
                    }
                    o => o,
                };
                if orphan.is_some() {
                    tracing::debug!(req, from, "memsync-dsm: reply to no pending request");
                }
            }
            Msg::Confirm { req, page, .. } => {
                let mut c = self.confirms.lock();
                if c.get(&page).is_some_and(|(r, _, _)| *r == req) {
                    let (_, _, tx) = c.remove(&page).expect("checked");
                    let _ = tx.send(());
                }
            }
            Msg::Request {
                want,
                req,
                page,
                from,
            } => {
                let s = Arc::clone(self);
                self.rt
                    .spawn(async move { s.manage(want, req, page, from).await });
            }
            Msg::Forward {
                want,
                req,
                page,
                from,
                hops,
            } => {
                let s = Arc::clone(self);
                self.rt
                    .spawn(async move { s.serve(want, req, page, from, hops).await });
            }
            Msg::Invalidate {
                req,
                page,
                owner,
                version,
            } => {
                let s = Arc::clone(self);
                self.rt.spawn(async move {
                    s.on_invalidate(from, req, page, owner, version).await;
                });
            }
            Msg::Recover {
                want,
                req,
                page,
                from: requester,
                hops,
                dead,
            } => {
                let s = Arc::clone(self);
                self.rt.spawn(async move {
                    s.recover_request(want, req, page, requester, hops, dead)
                        .await;
                });
            }
            Msg::Who { req, page, down } => {
                let s = Arc::clone(self);
                self.rt
                    .spawn(async move { s.on_who(from, req, page, down).await });
            }
            Msg::Take {
                req,
                page,
                version,
                copy_v,
                copyset,
            } => self.on_take(from, req, page, version, copy_v, copyset),
            Msg::Ping { nonce } => self.send(from, Msg::Pong { nonce }),
            Msg::Pong { .. } | Msg::Hello { .. } => {}
        }
    }

    fn slot(&self, page: u64) -> &Slot {
        &self.slots[page as usize]
    }

    /// Sends a request for `page` (to its manager, or its probable owner) and waits for the
    /// answer (PAGE or ERROR).
    async fn ask(self: &Arc<Self>, page: u64, want: Want) -> Result<(u64, Msg), StoreError> {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        let mut to = match self.mgr.manager_of(page) {
            Some(m) => m,
            None => self.slot(page).st.lock().prob,
        };
        let chain = self.mgr.manager_of(page).is_none();
        let mut m = match self.mgr.manager_of(page) {
            Some(_) => Msg::Request {
                want,
                req,
                page,
                from: self.me,
            },
            None => Msg::Forward {
                want,
                req,
                page,
                from: self.me,
                hops: 0,
            },
        };
        if !self.alive[usize::from(to)].load(Relaxed) {
            if !chain {
                return Err(err(page, format!("node {to} is down")));
            }
            // Dynamic scheme: the heir finds the page's owner again.
            m = Msg::Recover {
                want,
                req,
                page,
                from: self.me,
                hops: 0,
                dead: to,
            };
            to = self.heir();
        }
        self.pending.lock().insert(
            req,
            Pending {
                to,
                chain,
                page,
                tx,
            },
        );
        if chain {
            // A late grant parked before this request was registered answers it.
            let parked = self.slot(page).st.lock().parked.take();
            if let Some(g) = parked {
                self.pending.lock().remove(&req);
                tracing::debug!(page, "memsync-dsm: a parked late grant answers a request");
                return Ok((req, g));
            }
        }
        self.send(to, m);
        match tokio::time::timeout(self.deadline, rx).await {
            Ok(Ok(m)) => Ok((req, m)),
            Ok(Err(_)) => Err(err(page, "the request was dropped (a node went down)")),
            Err(_) => {
                self.pending.lock().remove(&req);
                Err(err(page, "no answer before the deadline"))
            }
        }
    }

    fn confirm(self: &Arc<Self>, page: u64, req: u64) {
        if let Some(m) = self.mgr.manager_of(page) {
            self.send(
                m,
                Msg::Confirm {
                    req,
                    page,
                    from: self.me,
                },
            );
        }
    }

    /// The page's data at its owner before anyone wrote it.
    async fn initial(&self, page: u64, buf: &mut [u8]) -> Result<(), StoreError> {
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
    async fn snapshot(&self, region: &LazyRegion, page: u64) -> Result<Bytes, StoreError> {
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

    /// The region's source: a missing page at this node.
    async fn read_fault(self: Arc<Self>, page: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let t0 = Instant::now();
        self.stats.read_faults.fetch_add(1, Relaxed);
        // An inline fetch (the API's reads and writes) does not pass `missing`.
        self.slot(page).st.lock().installing = false;
        let _g = self.slot(page).op.lock().await;
        let stash = {
            let mut st = self.slot(page).st.lock();
            if st.lost {
                return Err(err(
                    page,
                    "lost: its only copy was on a node that went down",
                ));
            }
            if st.owner {
                // Installed write-protected (every page is): read access until a write.
                st.access = Access::Read;
                st.installing = true;
                Some(st.stash.clone())
            } else {
                None
            }
        };
        if let Some(stash) = stash {
            match stash {
                Some(d) => buf.copy_from_slice(&d),
                None => self.initial(page, buf).await?,
            }
            return Ok(());
        }
        let (req, m) = loop {
            let (req, m) = self.ask(page, Want::Read).await?;
            if let Msg::Page {
                version,
                grant: false,
                ..
            } = &m
            {
                let st = self.slot(page).st.lock();
                if *version < st.stale_below {
                    // Invalidated on its way: ask again (the new owner serves it).
                    drop(st);
                    self.confirm(page, req);
                    continue;
                }
            }
            break (req, m);
        };
        let r = match m {
            Msg::Page {
                version,
                grant: true,
                copyset,
                data,
                ..
            } if data.len() == buf.len() => {
                // A late grant handed to this request (see `dispatch`): the owner now.
                self.invalidate_copies(page, copyset, version).await;
                let mut st = self.slot(page).st.lock();
                st.owner = true;
                st.version = version;
                st.prob = self.me;
                st.prob_v = version;
                st.copyset = 0;
                st.stash = Some(data.clone());
                st.granted = false;
                st.lost = false;
                st.access = Access::Read;
                st.installing = true;
                buf.copy_from_slice(&data);
                Ok(())
            }
            Msg::Page {
                owner,
                version,
                data,
                grant: false,
                ..
            } => {
                let mut st = self.slot(page).st.lock();
                if version < st.stale_below {
                    Err(err(page, "invalidated on its way"))
                } else if self.check_versions && version < st.version {
                    Err(err(
                        page,
                        format!("version {version} is older than {} seen", st.version),
                    ))
                } else if data.len() != buf.len() {
                    Err(err(page, "page of the wrong size"))
                } else {
                    st.version = version;
                    if version >= st.prob_v {
                        st.prob = owner;
                        st.prob_v = version;
                    }
                    st.access = Access::Read;
                    st.installing = true;
                    buf.copy_from_slice(&data);
                    Ok(())
                }
            }
            Msg::Error { code, reason, .. } => {
                if code == ErrorCode::Lost {
                    self.slot(page).st.lock().lost = true;
                }
                Err(err(page, reason))
            }
            m => Err(err(page, format!("unexpected {}", m.name()))),
        };
        self.confirm(page, req);
        self.stats.read_latency.record(t0.elapsed());
        r
    }

    /// Invalidates the copies of `page` on the nodes of `set` and waits for every
    /// acknowledgement (a node that is down has no copy left).
    async fn invalidate_copies(self: &Arc<Self>, page: u64, set: u64, version: u64) {
        self.invalidate_for(page, set, self.me, version).await;
    }

    /// Invalidates the copies of `page` on the nodes of `set` for the new owner `owner` at
    /// `version`, and waits for every acknowledgement.
    async fn invalidate_for(self: &Arc<Self>, page: u64, set: u64, owner: NodeId, version: u64) {
        let mut waits = Vec::new();
        for n in 0..self.nodes as NodeId {
            if set & bit(n) == 0 || n == self.me || !self.alive[usize::from(n)].load(Relaxed) {
                continue;
            }
            let req = self.next_req();
            let (tx, rx) = oneshot::channel();
            self.pending.lock().insert(
                req,
                Pending {
                    to: n,
                    chain: false,
                    page,
                    tx,
                },
            );
            self.stats.invalidations_sent.fetch_add(1, Relaxed);
            self.send(
                n,
                Msg::Invalidate {
                    req,
                    page,
                    owner,
                    version,
                },
            );
            waits.push(rx);
        }
        for w in waits {
            // Dropped: the node went down, and its copy with it.
            let _ = w.await;
        }
    }

    /// A write to write-protected `page` at this node (the writer is held until this ends).
    async fn write_fault(self: Arc<Self>, page: u64, t0: Instant) {
        self.stats.write_faults.fetch_add(1, Relaxed);
        let Some(region) = self.region() else { return };
        let off = page as usize * self.page;
        let mut tries = 0u32;
        loop {
            let g = self.slot(page).op.lock().await;
            let (owner, access, copyset) = {
                let st = self.slot(page).st.lock();
                (st.owner, st.access, st.copyset)
            };
            if owner {
                let cs = region.chunk_state(page as usize);
                if matches!(cs, ChunkState::Fetching | ChunkState::Dropping) {
                    drop(g);
                    settle_pause(&mut tries).await;
                    continue;
                }
                if cs != ChunkState::Present {
                    // The page went away under the writer, which faults again as missing.
                    return;
                }
                if access != Access::Write {
                    let version = {
                        let mut st = self.slot(page).st.lock();
                        st.version += 1;
                        st.copyset = 0;
                        st.version
                    };
                    if copyset & !bit(self.me) == 0 {
                        self.stats.local_upgrades.fetch_add(1, Relaxed);
                    }
                    self.invalidate_copies(page, copyset, version).await;
                }
                self.slot(page).st.lock().access = Access::Write;
                if let Err(e) = region.unprotect(off, self.page) {
                    tracing::error!(page, error = %e, "memsync-dsm: unprotect failed");
                }
                self.stats.write_latency.record(t0.elapsed());
                return;
            }
            let (req, m) = match self.ask(page, Want::Write).await {
                Ok(x) => x,
                Err(e) => {
                    drop(g);
                    if self.retry_write(&region, page, t0, &e.chain()).await {
                        continue;
                    }
                    return;
                }
            };
            match m {
                Msg::Page {
                    version,
                    grant: true,
                    copyset,
                    data,
                    ..
                } if data.len() == self.page => {
                    self.invalidate_copies(page, copyset, version).await;
                    {
                        let mut st = self.slot(page).st.lock();
                        st.owner = true;
                        st.version = version;
                        st.prob = self.me;
                        st.prob_v = version;
                        st.copyset = 0;
                        st.stash = Some(data.clone());
                        st.granted = false;
                        st.lost = false;
                    }
                    let installed = match region.chunk_state(page as usize) {
                        // Our read copy is the current data: nobody wrote since it was served.
                        ChunkState::Present => true,
                        ChunkState::Absent => {
                            let r2 = region.arc();
                            tokio::task::spawn_blocking(move || r2.place(page as usize, &data))
                                .await
                                .ok()
                                .and_then(Result::ok)
                                .unwrap_or(false)
                        }
                        // A fault is fetching it: it takes the stash, installed protected,
                        // and its write faults again (a local upgrade).
                        _ => false,
                    };
                    if installed && region.chunk_state(page as usize) == ChunkState::Present {
                        self.slot(page).st.lock().access = Access::Write;
                        if let Err(e) = region.unprotect(off, self.page) {
                            tracing::error!(page, error = %e, "memsync-dsm: unprotect failed");
                        }
                    } else {
                        self.slot(page).st.lock().access = Access::Read;
                    }
                    self.confirm(page, req);
                    self.stats.write_latency.record(t0.elapsed());
                    return;
                }
                m => {
                    self.confirm(page, req);
                    self.slot(page).st.lock().granted = false;
                    drop(g);
                    let why = match &m {
                        Msg::Error { reason, .. } => reason.clone(),
                        m => format!("unexpected {}", m.name()),
                    };
                    if self.retry_write(&region, page, t0, &why).await {
                        continue;
                    }
                    return;
                }
            }
        }
    }

    /// A write that did not get ownership: `true` to try again (after a pause), `false`
    /// past the deadline, when the page is marked lost and dropped, so the writer faults
    /// again as missing and that fault fails (`SIGBUS`).
    async fn retry_write(&self, region: &RegionRef, page: u64, t0: Instant, why: &str) -> bool {
        if t0.elapsed() < self.deadline && !self.stopping.load(Relaxed) {
            tracing::debug!(page, why, "memsync-dsm: write fault retried");
            tokio::time::sleep(Duration::from_millis(1)).await;
            return true;
        }
        tracing::error!(
            page,
            why,
            "memsync-dsm: write fault failed until the deadline"
        );
        self.slot(page).st.lock().lost = true;
        let r2 = region.arc();
        let off = page as usize * self.page;
        let len = self.page;
        let _ = tokio::task::spawn_blocking(move || r2.invalidate(off, len)).await;
        false
    }

    /// The manager's side of a request (centralized, fixed): one at a time per page, until
    /// the requester confirms.
    async fn manage(self: Arc<Self>, want: Want, req: u64, page: u64, from: NodeId) {
        if page >= self.pages {
            return self.refuse(from, req, page, ErrorCode::Protocol, "page out of range");
        }
        if self.mgr.manager_of(page) != Some(self.me) {
            return self.refuse(from, req, page, ErrorCode::Protocol, "not its manager");
        }
        let ms = &self.mslots[page as usize];
        let _g = ms.lock.lock().await;
        let owner = ms.owner.load(Relaxed);
        if owner == from {
            return self.refuse(
                from,
                req,
                page,
                ErrorCode::Protocol,
                "requester is the owner",
            );
        }
        if !self.alive[usize::from(owner)].load(Relaxed) {
            return self.refuse(from, req, page, ErrorCode::Lost, "its owner is down");
        }
        let (tx, rx) = oneshot::channel();
        self.confirms.lock().insert(page, (req, from, tx));
        if want == Want::Write {
            ms.owner.store(from, Relaxed);
        }
        let mut down = self.down.subscribe();
        self.send(
            owner,
            Msg::Forward {
                want,
                req,
                page,
                from,
                hops: 1,
            },
        );
        let owner_died = async {
            loop {
                if *down.borrow_and_update() & bit(owner) != 0 {
                    return;
                }
                if down.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let confirmed = tokio::time::timeout(self.deadline * 2, rx);
        tokio::select! {
            r = confirmed => if r.is_err() {
                self.confirms.lock().remove(&page);
                tracing::warn!(page, from, "memsync-dsm: no CONFIRM before the deadline");
            },
            () = owner_died => {
                // The page went down with its owner before it was served.
                self.confirms.lock().remove(&page);
                ms.owner.store(owner, Relaxed);
                self.owner_died(page).await;
                let reloaded = ms.owner.load(Relaxed) == self.me;
                if !reloaded {
                    self.refuse(from, req, page, ErrorCode::Lost, "its owner went down");
                } else {
                    // Served again from the reloaded page.
                    drop(_g);
                    Box::pin(self.clone().manage(want, req, page, from)).await;
                }
            }
        }
    }

    /// At the manager of `page`, whose owner went down: the page is lost, or, with a backing
    /// store, owned by the manager again and reloaded from the store's last flushed state,
    /// after every copy elsewhere is dropped (the copyset went down with the owner).
    async fn owner_died(self: &Arc<Self>, page: u64) {
        let ms = &self.mslots[page as usize];
        let owner = ms.owner.load(Relaxed);
        if owner == self.me || self.alive[usize::from(owner)].load(Relaxed) {
            return;
        }
        if self.backing.is_none() {
            self.slot(page).st.lock().lost = true;
            return;
        }
        let _g = self.slot(page).op.lock().await;
        let version = {
            let mut st = self.slot(page).st.lock();
            st.version += 1;
            st.owner = true;
            st.access = Access::Invalid;
            st.copyset = 0;
            st.stash = None;
            st.prob = self.me;
            st.prob_v = st.version;
            st.version
        };
        let everyone = (0..self.nodes as NodeId)
            .filter(|&n| n != self.me)
            .fold(0, |a, n| a | bit(n));
        self.invalidate_copies(page, everyone, version).await;
        if let Some(region) = self.region() {
            let off = page as usize * self.page;
            let len = self.page;
            let r2 = region.arc();
            let _ = tokio::task::spawn_blocking(move || r2.invalidate(off, len)).await;
        }
        ms.owner.store(self.me, Relaxed);
        tracing::warn!(
            page,
            owner,
            "memsync-dsm: page reloaded from the backing store"
        );
    }

    fn refuse(self: &Arc<Self>, to: NodeId, req: u64, page: u64, code: ErrorCode, why: &str) {
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

    /// A forwarded request at this node: serve it as the owner, or pass it on to the probable
    /// owner.
    async fn serve(self: Arc<Self>, want: Want, req: u64, page: u64, from: NodeId, hops: u8) {
        if page >= self.pages {
            return self.refuse(from, req, page, ErrorCode::Protocol, "page out of range");
        }
        let Some(region) = self.region() else {
            return self.refuse(from, req, page, ErrorCode::Shutdown, "node shutting down");
        };
        if from == self.me {
            // Only after a node went down (the heir repointed, or this node gave up waiting
            // and asked again): its local operation holds the page's lock, so answer at once;
            // the requester retries.
            return self.refuse(
                from,
                req,
                page,
                ErrorCode::Protocol,
                "request came back to its requester",
            );
        }
        let off = page as usize * self.page;
        let mut tries = 0u32;
        let g = loop {
            let g = self.slot(page).op.lock().await;
            let (owner, prob, lost) = {
                let st = self.slot(page).st.lock();
                (st.owner, st.prob, st.lost)
            };
            if !owner && lost && self.mgr.manager_of(page).is_none() {
                drop(g);
                return self.refuse(
                    from,
                    req,
                    page,
                    ErrorCode::Lost,
                    "lost: its only copy was on a node that went down",
                );
            }
            if !owner {
                drop(g);
                if hops >= self.mgr.max_hops() || prob == self.me {
                    return self.refuse(
                        from,
                        req,
                        page,
                        ErrorCode::Protocol,
                        "forwarded past the chain bound",
                    );
                }
                if self.mgr.manager_of(page).is_none()
                    && !self.alive[usize::from(prob)].load(Relaxed)
                {
                    // The chain passes through a node that is down: to the heir.
                    return self.send(
                        self.heir(),
                        Msg::Recover {
                            want,
                            req,
                            page,
                            from,
                            hops: hops + 1,
                            dead: prob,
                        },
                    );
                }
                self.stats.forwards.fetch_add(1, Relaxed);
                return self.send(
                    prob,
                    Msg::Forward {
                        want,
                        req,
                        page,
                        from,
                        hops: hops + 1,
                    },
                );
            }
            // A fill in progress settles first (it never waits for this lock once the data
            // is on its way).
            if matches!(
                region.chunk_state(page as usize),
                ChunkState::Fetching | ChunkState::Dropping
            ) {
                drop(g);
                settle_pause(&mut tries).await;
                continue;
            }
            break g;
        };
        if !self.alive[usize::from(from)].load(Relaxed) {
            // Never hand the page (or its ownership) to a node that is down.
            return;
        }
        self.stats.served.fetch_add(1, Relaxed);
        self.stats.hops_sum.fetch_add(u64::from(hops), Relaxed);
        self.stats.hops_max.fetch_max(u64::from(hops), Relaxed);
        if self.slot(page).st.lock().access == Access::Write {
            // Downgrade: no local write after the copy is taken.
            if let Err(e) = region.protect(off, self.page) {
                tracing::error!(page, error = %e, "memsync-dsm: protect failed");
            }
            self.slot(page).st.lock().access = Access::Read;
        }
        let data = match self.snapshot(&region, page).await {
            Ok(d) => d,
            Err(e) => {
                return self.refuse(from, req, page, ErrorCode::Lost, &e.chain());
            }
        };
        match want {
            Want::Read => {
                let version = {
                    let mut st = self.slot(page).st.lock();
                    st.copyset |= bit(from);
                    st.version
                };
                self.stats.pages_sent.fetch_add(1, Relaxed);
                self.send(
                    from,
                    Msg::Page {
                        req,
                        page,
                        owner: self.me,
                        version,
                        grant: false,
                        copyset: 0,
                        data,
                    },
                );
            }
            Want::Write => {
                if region.chunk_state(page as usize) == ChunkState::Present {
                    let r2 = region.arc();
                    let len = self.page;
                    let _ = tokio::task::spawn_blocking(move || r2.invalidate(off, len)).await;
                }
                let (version, copyset) = {
                    let mut st = self.slot(page).st.lock();
                    st.version += 1;
                    let cs = st.copyset & !bit(from);
                    st.owner = false;
                    st.access = Access::Invalid;
                    st.copyset = 0;
                    st.prob = from;
                    st.prob_v = st.version;
                    st.stash = None;
                    (st.version, cs)
                };
                self.stats.pages_sent.fetch_add(1, Relaxed);
                self.send(
                    from,
                    Msg::Page {
                        req,
                        page,
                        owner: self.me,
                        version,
                        grant: true,
                        copyset,
                        data,
                    },
                );
            }
        }
        drop(g);
    }

    /// The new owner `owner` drops this node's copy.
    async fn on_invalidate(
        self: Arc<Self>,
        from: NodeId,
        req: u64,
        page: u64,
        owner: NodeId,
        version: u64,
    ) {
        if page >= self.pages {
            return;
        }
        let region = self.region();
        let drop_it = {
            let mut st = self.slot(page).st.lock();
            if st.owner {
                tracing::error!(
                    page,
                    owner,
                    "memsync-dsm: INVALIDATE at the owner (ignored)"
                );
                false
            } else {
                if version >= st.prob_v {
                    st.prob = owner;
                    st.prob_v = version;
                }
                st.access = Access::Invalid;
                // What is installed, or handed to the engine, is dropped (the drop waits
                // for an install in progress). A fault that has not got its data yet must
                // not be waited for (it may wait for this node's own request, which waits
                // for this acknowledgement): its copy, if older than this version, is
                // discarded when it arrives.
                st.stale_below = st.stale_below.max(version);
                match region.as_ref().map(|r| r.chunk_state(page as usize)) {
                    Some(ChunkState::Present | ChunkState::Dropping) => true,
                    Some(ChunkState::Fetching) => st.installing,
                    _ => false,
                }
            }
        };
        if let (true, Some(region)) = (drop_it, region) {
            let off = page as usize * self.page;
            let len = self.page;
            let _ = tokio::task::spawn_blocking(move || region.invalidate(off, len)).await;
        }
        self.send(from, Msg::InvAck { req, page });
    }

    /// The heir (dynamic scheme): the lowest-numbered node that is up as far as this node
    /// knows. It recovers the pages whose probable-owner chain reaches a node that is down.
    fn heir(&self) -> NodeId {
        (0..self.nodes as NodeId)
            .find(|&n| self.alive[usize::from(n)].load(Relaxed))
            .unwrap_or(self.me)
    }

    /// Waits until every node of `set` is down here too (everything they sent this node is
    /// handled by then); `false` past the deadline.
    async fn await_down(&self, set: u64) -> bool {
        let mut rx = self.down.subscribe();
        matches!(
            tokio::time::timeout(self.deadline, rx.wait_for(|d| d & set == set)).await,
            Ok(Ok(_))
        )
    }

    /// What this node knows of `page` (HAVE).
    fn report(&self, page: u64) -> Report {
        let present = self
            .region()
            .is_some_and(|r| r.chunk_state(page as usize) == ChunkState::Present);
        let st = self.slot(page).st.lock();
        let owner = st.owner || st.granted;
        Report {
            node: self.me,
            owner,
            copy: !owner && st.access == Access::Read && present,
            version: st.version,
            prob: st.prob,
            prob_v: st.prob_v,
        }
    }

    fn have(self: &Arc<Self>, to: NodeId, req: u64, page: u64, r: Report) {
        self.send(
            to,
            Msg::Have {
                req,
                page,
                owner: r.owner,
                copy: r.copy,
                version: r.version,
                prob: r.prob,
                prob_v: r.prob_v,
            },
        );
    }

    /// The heir asks what this node knows of `page`: answered once the nodes the heir knows
    /// to be down are down here too (a grant one of them sent is marked by then).
    async fn on_who(self: Arc<Self>, from: NodeId, req: u64, page: u64, down: u64) {
        if page >= self.pages {
            return;
        }
        let down = down & !bit(self.me);
        if !self.await_down(down).await {
            tracing::warn!(
                page,
                down,
                "memsync-dsm: WHO about nodes still up here (not answered)"
            );
            return;
        }
        let r = self.report(page);
        self.have(from, req, page, r);
    }

    /// The heir makes this node, a read-copy holder, the owner of `page` (its owner died): if
    /// the copy is still here at `copy_v`, it becomes the owner at `version` (its copy is the
    /// page's data) with `copyset` to invalidate on its next write. Answered by HAVE.
    fn on_take(
        self: &Arc<Self>,
        from: NodeId,
        req: u64,
        page: u64,
        version: u64,
        copy_v: u64,
        copyset: u64,
    ) {
        if page >= self.pages {
            return;
        }
        let took = self.take(page, version, copy_v, copyset);
        let mut r = self.report(page);
        r.owner = took;
        self.have(from, req, page, r);
    }

    fn take(&self, page: u64, version: u64, copy_v: u64, copyset: u64) -> bool {
        let present = self
            .region()
            .is_some_and(|r| r.chunk_state(page as usize) == ChunkState::Present);
        let mut st = self.slot(page).st.lock();
        // An invalidation sets `access` under this lock before it drops the copy: a copy
        // still `read` here is intact.
        if st.owner || st.granted || st.access != Access::Read || !present || st.version != copy_v {
            return false;
        }
        st.owner = true;
        st.version = version;
        st.copyset = copyset & !bit(self.me);
        st.prob = self.me;
        st.prob_v = version;
        st.stash = None;
        st.lost = false;
        tracing::warn!(
            page,
            version,
            "memsync-dsm: owner of the page again (its owner went down, this node held a copy)"
        );
        true
    }

    /// A request whose chain reached node `dead`, which is down: at the heir, find the page's
    /// owner (recovering it if it died) and pass the request on; elsewhere, pass it to the heir.
    async fn recover_request(
        self: Arc<Self>,
        want: Want,
        req: u64,
        page: u64,
        from: NodeId,
        hops: u8,
        dead: NodeId,
    ) {
        if page >= self.pages {
            return self.refuse(from, req, page, ErrorCode::Protocol, "page out of range");
        }
        if hops >= self.mgr.max_hops() {
            return self.refuse(
                from,
                req,
                page,
                ErrorCode::Protocol,
                "forwarded past the chain bound",
            );
        }
        let heir = self.heir();
        if heir != self.me {
            self.stats.forwards.fetch_add(1, Relaxed);
            return self.send(
                heir,
                Msg::Recover {
                    want,
                    req,
                    page,
                    from,
                    hops: hops + 1,
                    dead,
                },
            );
        }
        if !self.await_down(bit(dead)).await {
            return self.refuse(
                from,
                req,
                page,
                ErrorCode::Protocol,
                "its probable owner is not down at the heir",
            );
        }
        let found = self.recover_page(page, dead).await;
        match found {
            Recovered::Owner(o) if o == self.me => {
                Box::pin(self.serve(want, req, page, from, hops)).await;
            }
            Recovered::Owner(o) if o == from => self.refuse(
                from,
                req,
                page,
                ErrorCode::Protocol,
                "the requester owns the page (recovered)",
            ),
            Recovered::Owner(o) => {
                self.stats.forwards.fetch_add(1, Relaxed);
                self.send(
                    o,
                    Msg::Forward {
                        want,
                        req,
                        page,
                        from,
                        hops: hops + 1,
                    },
                );
            }
            Recovered::Lost => self.refuse(
                from,
                req,
                page,
                ErrorCode::Lost,
                "lost: its only copy was on a node that went down",
            ),
            Recovered::Unknown(why) => self.refuse(from, req, page, ErrorCode::Protocol, &why),
        }
    }

    /// At the heir: who owns `page`, whose chain reached `dead` (down)? Asks every live node
    /// (WHO) and decides (`PROTOCOL.md`, "Node loss, dynamic scheme"): a live owner (or a
    /// node a live node granted it to) keeps it; else the holder of the newest read copy takes
    /// it over; else the heir reloads it from the backing store; else it is lost.
    async fn recover_page(self: &Arc<Self>, page: u64, dead: NodeId) -> Recovered {
        let _one = self.recovery.lock().await;
        {
            // Recovered from this death already: the heir's own view leads to the owner (its
            // probable owner is newer than any that died), unless a node died since.
            let st = self.slot(page).st.lock();
            if st.recovered & bit(dead) != 0 {
                if st.lost {
                    return Recovered::Lost;
                }
                if st.owner {
                    return Recovered::Owner(self.me);
                }
                if self.alive[usize::from(st.prob)].load(Relaxed) && st.prob != self.me {
                    return Recovered::Owner(st.prob);
                }
            }
        }
        let down = *self.down.borrow();
        self.stats.recoveries.fetch_add(1, Relaxed);
        let mut waits = Vec::new();
        for n in 0..self.nodes as NodeId {
            if n == self.me || !self.alive[usize::from(n)].load(Relaxed) {
                continue;
            }
            let req = self.next_req();
            let (tx, rx) = oneshot::channel();
            self.pending.lock().insert(
                req,
                Pending {
                    to: n,
                    chain: false,
                    page,
                    tx,
                },
            );
            self.send(n, Msg::Who { req, page, down });
            waits.push((n, req, rx));
        }
        let mut reports = Vec::with_capacity(self.nodes);
        for (n, req, rx) in waits {
            match tokio::time::timeout(self.deadline, rx).await {
                Ok(Ok(Msg::Have {
                    owner,
                    copy,
                    version,
                    prob,
                    prob_v,
                    ..
                })) => reports.push(Report {
                    node: n,
                    owner,
                    copy,
                    version,
                    prob,
                    prob_v,
                }),
                // Went down meanwhile: it holds nothing any more.
                _ if !self.alive[usize::from(n)].load(Relaxed) => {}
                _ => {
                    self.pending.lock().remove(&req);
                    return Recovered::Unknown(format!("recovery: node {n} did not answer"));
                }
            }
        }
        // The heir's own, last: the newest.
        reports.push(self.report(page));
        let up = |n: NodeId| self.alive[usize::from(n)].load(Relaxed);
        let mark = |o: NodeId, v: u64, lost: bool| {
            let mut st = self.slot(page).st.lock();
            st.recovered |= down | bit(dead);
            if lost {
                st.lost = true;
            } else if o != self.me && v >= st.prob_v {
                st.prob = o;
                st.prob_v = v;
            }
        };
        // A live owner.
        if let Some(r) = reports.iter().find(|r| r.owner && up(r.node)) {
            mark(r.node, r.version, false);
            return Recovered::Owner(r.node);
        }
        // The newest owner anyone knows of: a live one is being granted the page.
        let newest = reports
            .iter()
            .max_by_key(|r| r.prob_v)
            .map(|r| (r.prob, r.prob_v))
            .expect("the heir's own report");
        if up(newest.0) && newest.0 != self.me {
            mark(newest.0, newest.1, false);
            return Recovered::Owner(newest.0);
        }
        if up(newest.0) {
            return Recovered::Unknown(
                "recovery: the heir is the newest owner but not the owner".into(),
            );
        }
        // Its last owner is down. A new version, newer than any seen.
        let version = 1 + reports
            .iter()
            .map(|r| r.version.max(r.prob_v))
            .max()
            .unwrap_or(0);
        let others = |keep: NodeId| {
            (0..self.nodes as NodeId)
                .filter(|&n| n != keep && up(n))
                .fold(0, |a, n| a | bit(n))
        };
        let holders: Vec<&Report> = reports.iter().filter(|r| r.copy && up(r.node)).collect();
        if let Some(best) = holders.iter().max_by_key(|r| r.version) {
            let (node, copy_v) = (best.node, best.version);
            // Older copies (there should be none: the dead owner wrote only after every copy
            // was invalidated) go first.
            let stale = holders
                .iter()
                .filter(|r| r.version < copy_v)
                .fold(0, |a, r| a | bit(r.node));
            if stale != 0 {
                self.invalidate_for(page, stale, node, version).await;
            }
            // Every other live node may hold a copy on its way from the dead owner: all are
            // invalidated at the new owner's next write.
            let copyset = others(node);
            let took = if node == self.me {
                self.take(page, version, copy_v, copyset)
            } else {
                let req = self.next_req();
                let (tx, rx) = oneshot::channel();
                self.pending.lock().insert(
                    req,
                    Pending {
                        to: node,
                        chain: false,
                        page,
                        tx,
                    },
                );
                self.send(
                    node,
                    Msg::Take {
                        req,
                        page,
                        version,
                        copy_v,
                        copyset,
                    },
                );
                match tokio::time::timeout(self.deadline, rx).await {
                    Ok(Ok(Msg::Have { owner, .. })) => owner,
                    _ => {
                        self.pending.lock().remove(&req);
                        false
                    }
                }
            };
            if !took {
                return Recovered::Unknown(format!(
                    "recovery: node {node} did not take the page over"
                ));
            }
            mark(node, version, false);
            return Recovered::Owner(node);
        }
        // No copy left: every live node drops whatever may still be on its way and points at
        // the heir, which reloads the page or knows it lost.
        let reload = self.backing.is_some();
        {
            let mut st = self.slot(page).st.lock();
            st.version = version;
            st.prob = self.me;
            st.prob_v = version;
            st.copyset = 0;
            st.stash = None;
            st.access = Access::Invalid;
            if reload {
                st.owner = true;
                st.lost = false;
            }
        }
        self.invalidate_for(page, others(self.me), self.me, version)
            .await;
        if let Some(region) = self.region()
            && region.chunk_state(page as usize) == ChunkState::Present
        {
            let off = page as usize * self.page;
            let len = self.page;
            let r2 = region.arc();
            let _ = tokio::task::spawn_blocking(move || r2.invalidate(off, len)).await;
        }
        mark(self.me, version, !reload);
        if reload {
            tracing::warn!(
                page,
                dead,
                "memsync-dsm: page reloaded from the backing store (its owner went down)"
            );
            Recovered::Owner(self.me)
        } else {
            tracing::warn!(
                page,
                dead,
                "memsync-dsm: page lost (its only copy was on a node that went down)"
            );
            Recovered::Lost
        }
    }

    /// A grant whose requester no longer waits for it (it gave up when a node went down, or
    /// at the deadline): this node owns the page now, as if its request had been answered.
    async fn adopt(self: Arc<Self>, page: u64) {
        let Some(region) = self.region() else { return };
        let _g = self.slot(page).op.lock().await;
        let parked = self.slot(page).st.lock().parked.take();
        let Some(Msg::Page {
            version,
            copyset,
            data,
            ..
        }) = parked
        else {
            // A request for the page took it.
            return;
        };
        {
            let mut st = self.slot(page).st.lock();
            if st.owner || data.len() != self.page {
                tracing::error!(
                    page,
                    version,
                    "memsync-dsm: a grant for no request (ignored)"
                );
                st.granted = false;
                return;
            }
        }
        tracing::debug!(
            page,
            version,
            "memsync-dsm: ownership adopted from a late grant"
        );
        self.invalidate_copies(page, copyset, version).await;
        let present = region.chunk_state(page as usize) == ChunkState::Present;
        let mut st = self.slot(page).st.lock();
        st.owner = true;
        st.version = version;
        st.prob = self.me;
        st.prob_v = version;
        st.copyset = 0;
        // A copy still present is the current data (nobody wrote since it was served);
        // otherwise the next fault takes the granted data.
        st.stash = Some(data);
        st.access = if present {
            Access::Read
        } else {
            Access::Invalid
        };
        st.granted = false;
        st.lost = false;
    }

    /// Node `n` went down: fail what waits for it, and mark the pages whose only copy was
    /// there lost (or reload them from the backing store).
    fn node_down(self: &Arc<Self>, n: NodeId, clean: bool) {
        if !self.alive[usize::from(n)].swap(false, Relaxed) {
            return;
        }
        if self.stopping.load(Relaxed) {
            return;
        }
        if clean {
            tracing::info!(node = n, "memsync-dsm: node left (its connection ended)");
        } else {
            tracing::warn!(
                node = n,
                "memsync-dsm: node is down (its connection failed)"
            );
        }
        self.down.send_modify(|d| *d |= bit(n));
        // Requests sent to it fail; with no manager, so does every request along probable
        // owners (any may wait at the dead node): the requesters ask again, and a grant that
        // still arrives for one is adopted.
        let chain_fails = self.mgr.manager_of(0).is_none();
        self.pending
            .lock()
            .retain(|_, p| p.to != n && !(chain_fails && p.chain));
        // A request of the dead node holds its page until confirmed: release it.
        self.confirms.lock().retain(|_, (_, from, _)| *from != n);
        let s = Arc::clone(self);
        self.rt.spawn(async move {
            for p in 0..s.mslots.len() as u64 {
                if s.mgr.manager_of(p) == Some(s.me)
                    && s.mslots[p as usize].owner.load(Relaxed) == n
                {
                    s.owner_died(p).await;
                }
            }
        });
    }

    /// Writes every page this node owns and has data for to the backing store, then flushes
    /// it: the state a page owned by a node that goes down is reloaded from.
    async fn flush(self: &Arc<Self>) -> Result<(), StoreError> {
        let Some(b) = &self.backing else {
            return Err(StoreError::Config("the region has no backing store".into()));
        };
        let Some(region) = self.region() else {
            return Ok(());
        };
        for p in 0..self.pages {
            let _g = self.slot(p).op.lock().await;
            let has = {
                let st = self.slot(p).st.lock();
                st.owner && (st.access != Access::Invalid || st.stash.is_some())
            };
            if has {
                let data = self.snapshot(&region, p).await?;
                b.write(p * self.page as u64, data).await?;
            }
        }
        b.flush().await
    }
}

struct Source(Weak<Shared>, u64);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DsmSource")
    }
}

impl ChunkSource for Source {
    fn size(&self) -> u64 {
        self.1
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SourceFuture<'a, ()> {
        let s = self.0.upgrade();
        Box::pin(async move {
            let s = s.ok_or_else(|| err(0, "node is gone"))?;
            let page = offset / s.page as u64;
            s.read_fault(page, buf).await
        })
    }
}

struct Hooks(Weak<Shared>);

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DsmHooks")
    }
}

impl FaultHooks for Hooks {
    fn missing(&self, chunk: usize) {
        // A new fetch of the page: whatever an earlier one handed over is installed.
        if let Some(s) = self.0.upgrade() {
            s.slot(chunk as u64).st.lock().installing = false;
        }
    }

    fn write_protect(&self, chunk: usize, _addr: usize) -> WpAction {
        let Some(s) = self.0.upgrade() else {
            return WpAction::Hold;
        };
        // Held: the node's runtime obtains ownership and lifts the protection, so the
        // handler thread is free for other faults (and REMOVE events) meanwhile.
        let t0 = Instant::now();
        let s2 = Arc::clone(&s);
        s.rt.spawn(async move { s2.write_fault(chunk as u64, t0).await });
        WpAction::Hold
    }
}

/// One node of a shared region.
pub struct Node {
    region: Option<Arc<LazyRegion>>,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.shared.me)
            .field("nodes", &self.shared.nodes)
            .field("scheme", &self.shared.mgr.scheme())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts node `cfg.id` on `listener` (bound to its address in `cfg.peers`): maps the
    /// region, connects to every other node (it dials the lower ids and accepts the higher
    /// ones) and returns once all are connected.
    ///
    /// # Errors
    ///
    /// A bad configuration, a peer that does not connect within `connect_timeout` or whose
    /// HELLO does not match, or the region's error.
    pub fn start(cfg: DsmConfig, listener: std::net::TcpListener) -> Result<Node, DsmError> {
        let nodes = cfg.peers.len();
        if nodes == 0 || nodes > MAX_NODES || usize::from(cfg.id) >= nodes {
            return Err(DsmError::Config(format!(
                "node {} of {nodes} nodes (1 to {MAX_NODES})",
                cfg.id
            )));
        }
        if !u32::try_from(cfg.page_size).is_ok_and(valid_page_size) {
            return Err(DsmError::Config(format!(
                "page size {} is not a power of two from 4 KiB to 2 MiB",
                cfg.page_size
            )));
        }
        if cfg.size == 0 || !cfg.size.is_multiple_of(cfg.page_size as u64) {
            return Err(DsmError::Config(format!(
                "region size {} is not a positive multiple of the page size {}",
                cfg.size, cfg.page_size
            )));
        }
        let pages = cfg.size / cfg.page_size as u64;
        if pages > crate::proto::MAX_PAGES {
            return Err(DsmError::Config("too many pages".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.max(1))
            .thread_name(format!("memsync-dsm-{}", cfg.id))
            .enable_all()
            .build()?;
        let mgr = cfg.scheme.manager(nodes);
        let me = cfg.id;
        let slots = (0..pages)
            .map(|p| {
                let init = mgr.initial_owner(p);
                Slot {
                    op: tokio::sync::Mutex::new(()),
                    st: Mutex::new(PageState {
                        owner: init == me,
                        access: Access::Invalid,
                        copyset: 0,
                        prob: init,
                        prob_v: 0,
                        version: 0,
                        stash: None,
                        lost: false,
                        installing: false,
                        stale_below: 0,
                        granted: false,
                        recovered: 0,
                        parked: None,
                    }),
                }
            })
            .collect();
        let mslots = if mgr.manager_of(0).is_some() {
            (0..pages)
                .map(|p| MSlot {
                    lock: tokio::sync::Mutex::new(()),
                    owner: AtomicU16::new(mgr.initial_owner(p)),
                })
                .collect()
        } else {
            Vec::new().into_boxed_slice()
        };
        let shared = Arc::new(Shared {
            me,
            nodes,
            mgr,
            page: cfg.page_size,
            pages,
            slots,
            mslots,
            region: OnceLock::new(),
            peers: (0..nodes).map(|_| OnceLock::new()).collect(),
            alive: (0..nodes).map(|_| AtomicBool::new(true)).collect(),
            pending: Mutex::new(HashMap::new()),
            recovery: tokio::sync::Mutex::new(()),
            confirms: Mutex::new(HashMap::new()),
            down: tokio::sync::watch::channel(0).0,
            next_req: AtomicU64::new(1),
            rt: rt.handle().clone(),
            backing: cfg.backing.clone(),
            deadline: cfg.fault_deadline,
            check_versions: cfg.check_versions,
            stopping: AtomicBool::new(false),
            stats: DsmStats::default(),
        });
        let mut rc = RegionConfig {
            chunk_size: cfg.page_size,
            handler_threads: cfg.handler_threads.max(1),
            prefetch: false,
            zero_detect: false,
            write_tracking: WriteTracking::Protect,
            fetch_deadline: cfg.fault_deadline,
            huge_pages: false,
            ..RegionConfig::default()
        };
        rc.retry_backoff = Duration::from_millis(1);
        // Only the node drops pages (invalidations, transfers): without REMOVE events an
        // invalidation does not wait until a handler thread is free to read its event, so it
        // never waits behind read faults that wait on the network.
        rc.remove_events = false;
        let region = Arc::new(LazyRegion::with_source(
            Arc::new(Source(Arc::downgrade(&shared), cfg.size)),
            Arc::new(Hooks(Arc::downgrade(&shared))),
            rc,
        )?);
        // Every page starts (and is always installed) read-only: a write asks for ownership.
        region.protect(0, region.len())?;
        let _ = shared.region.set(Arc::downgrade(&region));
        let mut node = Node {
            region: Some(region),
            shared: Arc::clone(&shared),
            rt: None,
        };
        rt.block_on(connect(&shared, &cfg, listener))?;
        node.rt = Some(rt);
        Ok(node)
    }

    /// Binds this node's address from `cfg.peers` and starts it (see [`start`](Self::start)).
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start), and the bind error.
    pub fn bind_and_start(cfg: DsmConfig) -> Result<Node, DsmError> {
        let addr = cfg
            .peers
            .get(usize::from(cfg.id))
            .ok_or_else(|| DsmError::Config("node id outside the peer list".into()))?;
        let l = std::net::TcpListener::bind(addr)?;
        Self::start(cfg, l)
    }

    /// The shared region (its pointer is the program's view of the shared memory).
    ///
    /// # Panics
    ///
    /// Never while the node lives.
    #[must_use]
    pub fn region(&self) -> &LazyRegion {
        self.region
            .as_ref()
            .expect("region lives as long as the node")
    }

    /// This node's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.shared.me
    }

    /// Number of nodes.
    #[must_use]
    pub fn nodes(&self) -> usize {
        self.shared.nodes
    }

    /// The page size.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.shared.page
    }

    /// The manager scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.shared.mgr.scheme()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &DsmStats {
        &self.shared.stats
    }

    /// This node's view of page `page`: whether it owns it and its access.
    ///
    /// # Panics
    ///
    /// If `page` is out of range.
    #[must_use]
    pub fn page_state(&self, page: u64) -> (bool, Access) {
        let st = self.shared.slot(page).st.lock();
        (st.owner, st.access)
    }

    /// Reads `buf.len()` bytes at `off` through the fault path.
    ///
    /// # Errors
    ///
    /// A page that is lost (its only copy was on a node that went down).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), DsmError> {
        self.check_lost(off, buf.len())?;
        self.region().read_at(off, buf).map_err(|e| DsmError::Page {
            page: e.chunk as u64,
            reason: e.message,
        })
    }

    /// Writes `data` at `off` through the fault path.
    ///
    /// # Errors
    ///
    /// As for [`read`](Self::read).
    ///
    /// # Panics
    ///
    /// If the range is out of bounds.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), DsmError> {
        self.check_lost(off, data.len())?;
        self.region()
            .write_at(off, data)
            .map_err(|e| DsmError::Page {
                page: e.chunk as u64,
                reason: e.message,
            })
    }

    fn check_lost(&self, off: usize, len: usize) -> Result<(), DsmError> {
        let p = self.shared.page;
        if len == 0 {
            return Ok(());
        }
        for page in (off / p)..(off + len).div_ceil(p) {
            let st = self.shared.slot(page as u64).st.lock();
            if st.lost && !st.owner {
                return Err(DsmError::Page {
                    page: page as u64,
                    reason: "lost: its only copy was on a node that went down".into(),
                });
            }
        }
        Ok(())
    }

    /// The 8-byte word at `off` as an atomic (read-modify-write instructions on the shared
    /// memory are sequentially consistent per page).
    ///
    /// # Panics
    ///
    /// If `off` is not 8-byte aligned or out of bounds.
    #[must_use]
    pub fn atomic_u64(&self, off: usize) -> &std::sync::atomic::AtomicU64 {
        self.region().atomic_u64(off)
    }

    /// Writes the pages this node owns to the backing store and flushes it: after this node
    /// goes down, its pages are reloaded from what it flushed last.
    ///
    /// # Errors
    ///
    /// No backing store, or the store's error.
    pub fn flush(&self) -> Result<(), DsmError> {
        let rt = self.rt.as_ref().expect("runtime lives as long as the node");
        rt.block_on(self.shared.flush())
            .map_err(|e| DsmError::Io(io::Error::other(e.chain())))
    }

    /// Whether node `n` is up (as far as this node knows).
    #[must_use]
    pub fn is_up(&self, n: NodeId) -> bool {
        self.shared
            .alive
            .get(usize::from(n))
            .is_some_and(|a| a.load(Relaxed))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Relaxed);
        // The region first: its handlers stop (cancelling fetches waiting on the network).
        if let Some(r) = self.region.take() {
            drop(r);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn connect(
    shared: &Arc<Shared>,
    cfg: &DsmConfig,
    listener: std::net::TcpListener,
) -> Result<(), DsmError> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let me = shared.me;
    let hello = Msg::Hello {
        node: me,
        nodes: shared.nodes as u16,
        scheme: shared.mgr.scheme().to_u8(),
        page_size: shared.page as u32,
        pages: shared.pages,
    };
    let check = move |m: Option<Msg>| -> Result<NodeId, DsmError> {
        match m {
            Some(Msg::Hello {
                node,
                nodes,
                scheme,
                page_size,
                pages,
            }) => {
                if usize::from(nodes) != shared.nodes
                    || scheme != shared.mgr.scheme().to_u8()
                    || page_size as usize != shared.page
                    || pages != shared.pages
                {
                    return Err(DsmError::Config(format!(
                        "node {node} runs another region (nodes {nodes}, scheme {scheme}, page {page_size}, pages {pages})"
                    )));
                }
                Ok(node)
            }
            Some(m) => Err(DsmError::Config(format!(
                "expected HELLO, got {}",
                m.name()
            ))),
            None => Err(DsmError::Config("peer closed during HELLO".into())),
        }
    };
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let higher = shared.nodes - usize::from(me) - 1;
    let tls = cfg.tls.clone();
    let tls2 = cfg.tls.clone();
    let accept = async {
        let mut got = 0;
        while got < higher {
            let (tcp, _) = listener.accept().await?;
            let (mut r, w) = match net::accepted(tcp, tls.as_ref()).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "memsync-dsm: handshake of an incoming connection failed");
                    continue;
                }
            };
            let n = check(net::read_msg(&mut r, &shared.stats.bytes_received).await?)?;
            if n <= me || shared.peers[usize::from(n)].get().is_some() {
                return Err(DsmError::Config(format!(
                    "unexpected connection from node {n}"
                )));
            }
            attach(shared, n, r, w, &hello);
            got += 1;
        }
        Ok::<_, DsmError>(())
    };
    let dial = async {
        for n in 0..me {
            let addr = &cfg.peers[usize::from(n)];
            let (r, w) = loop {
                match net::dial(addr, tls2.as_ref()).await {
                    Ok(x) => break x,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, addr, "memsync-dsm: dial failed, retrying");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(DsmError::Io(e)),
                }
            };
            let (mut r, mut w) = (r, w);
            {
                use tokio::io::AsyncWriteExt;
                w.write_all(&hello.encode()).await?;
                w.flush().await?;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let peer = check(net::read_msg(&mut r, &shared.stats.bytes_received).await?)?;
            if peer != n {
                return Err(DsmError::Config(format!(
                    "{addr} is node {peer}, expected {n}"
                )));
            }
            start_peer(shared, n, r, w, tx, rx);
        }
        Ok::<_, DsmError>(())
    };
    tokio::time::timeout_at(deadline, async { tokio::try_join!(accept, dial) })
        .await
        .map_err(|_| DsmError::Config("not every node connected in time".into()))??;
    Ok(())
}

fn attach(shared: &Arc<Shared>, n: NodeId, r: net::BoxRead, w: net::BoxWrite, hello: &Msg) {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(hello.encode());
    start_peer(shared, n, r, w, tx, rx);
}

fn start_peer(
    shared: &Arc<Shared>,
    n: NodeId,
    mut r: net::BoxRead,
    w: net::BoxWrite,
    tx: mpsc::UnboundedSender<Bytes>,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let _ = shared.peers[usize::from(n)].set(tx);
    let s = Arc::clone(shared);
    shared.rt.spawn(async move {
        if let Err(e) = net::writer(w, rx).await {
            tracing::debug!(node = n, error = %e, "memsync-dsm: connection write failed");
            s.node_down(n, false);
        }
    });
    let s = Arc::clone(shared);
    shared.rt.spawn(async move {
        let clean = loop {
            match net::read_msg(&mut r, &s.stats.bytes_received).await {
                Ok(Some(m)) => s.dispatch(n, m),
                Ok(None) => break true,
                Err(e) => {
                    if !s.stopping.load(Relaxed) {
                        tracing::warn!(node = n, error = %e, "memsync-dsm: connection failed");
                    }
                    break false;
                }
            }
        };
        s.node_down(n, clean);
    });
}
