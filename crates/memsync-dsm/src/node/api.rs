//! The public `Node`: `start` (checks the configuration, builds the shared state, maps the
//! region over the node's source and hooks, connects to every peer), the accessors and the
//! API (read, write, atomics, flush to the backing store, liveness), and its drop. Separate
//! as the top of the module: it uses every other part and none uses it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use memsync_core::StoreError;
use memsync_region::{LazyRegion, RegionConfig, WriteTracking};
use parking_lot::Mutex;

use super::config::{Access, DsmConfig, DsmError, DsmStats};
use super::connect::connect;
use super::fault::{Hooks, Source};
use super::state::{MSlot, PageState, Shared, Slot};
use crate::manager::Scheme;
use crate::proto::{MAX_NODES, NodeId, valid_page_size};

impl Shared {
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

    #[cfg(test)]
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
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
