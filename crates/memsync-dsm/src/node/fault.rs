//! The requesting side of the page protocol: the region's `ChunkSource` (`Source`: a
//! missing page is a read fault) and `FaultHooks` (`Hooks`: a write-protect fault is held
//! and upgraded on the runtime), the requests they send (`ask`, `confirm`), and the new
//! owner's invalidation of the copyset (`invalidate_copies`, `invalidate_for`, also used by
//! the manager's reload and the heir). Separate from the serving side (`serve.rs`): this is
//! what a node does for its own accesses, that what it does for others'.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use memsync_core::StoreError;
use memsync_region::{ChunkSource, ChunkState, FaultHooks, SourceFuture, WpAction};
use tokio::sync::oneshot;

use super::config::Access;
use super::state::{Pending, RegionRef, Shared, bit, err, settle_pause};
use crate::proto::{ErrorCode, Msg, NodeId, Want};

impl Shared {
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
        if !self.register(
            req,
            Pending {
                to,
                chain,
                page,
                tx,
            },
        ) {
            // The fault asks again (a read fault through the engine's retry, a write fault
            // itself), along the views of who is up that include this death.
            return Err(err(page, format!("node {to} went down")));
        }
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
                st.take_grant(self.me, version, data.clone());
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
    pub(super) async fn invalidate_copies(self: &Arc<Self>, page: u64, set: u64, version: u64) {
        self.invalidate_for(page, set, self.me, version).await;
    }

    /// Invalidates the copies of `page` on the nodes of `set` for the new owner `owner` at
    /// `version`, and waits for every acknowledgement.
    pub(super) async fn invalidate_for(
        self: &Arc<Self>,
        page: u64,
        set: u64,
        owner: NodeId,
        version: u64,
    ) {
        let mut waits = Vec::new();
        for n in 0..self.nodes as NodeId {
            if set & bit(n) == 0 || n == self.me || !self.alive[usize::from(n)].load(Relaxed) {
                continue;
            }
            let (req, rx) = self.expect_answer(n, page);
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
                    self.slot(page)
                        .st
                        .lock()
                        .take_grant(self.me, version, data.clone());
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
}

pub(super) struct Source(pub(super) Weak<Shared>, pub(super) u64);

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

pub(super) struct Hooks(pub(super) Weak<Shared>);

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
