//! The serving side of the page protocol: the manager's side of a request (centralized and
//! fixed schemes: one at a time per page until CONFIRM, and `owner_died`, the manager's
//! reload or loss of a page whose owner went down), the owner's side of a forwarded request
//! (`serve`: a read copy with a downgrade, or a transfer of ownership; a non-owner passes it
//! on along probable owners, or to the heir), and a copy holder's INVALIDATE. Separate from
//! the requesting side (`fault.rs`), which it uses only to invalidate copies.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use memsync_region::ChunkState;
use tokio::sync::oneshot;

use super::config::Access;
use super::state::{Shared, bit, settle_pause};
use crate::proto::{ErrorCode, Msg, NodeId, Want};

impl Shared {
    /// The manager's side of a request (centralized, fixed): one at a time per page, until
    /// the requester confirms.
    pub(super) async fn manage(self: Arc<Self>, want: Want, req: u64, page: u64, from: NodeId) {
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
        // A request that waited for the page while its node went down: nobody will confirm
        // it, and holding the page until the deadline fails every live request queued
        // behind it (their deadline is shorter). Checked after the insert because
        // `node_down` marks the node down before it drops the confirmations it finds: either
        // it dropped this one (`rx` ends at once) or this sees the node down.
        if !self.alive[usize::from(from)].load(Relaxed) {
            self.confirms.lock().remove(&page);
            tracing::debug!(
                page,
                from,
                "memsync-dsm: request of a node that is down dropped"
            );
            return;
        }
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
    pub(super) async fn owner_died(self: &Arc<Self>, page: u64) {
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

    /// A forwarded request at this node: serve it as the owner, or pass it on to the probable
    /// owner.
    pub(super) async fn serve(
        self: Arc<Self>,
        want: Want,
        req: u64,
        page: u64,
        from: NodeId,
        hops: u8,
    ) {
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
    pub(super) async fn on_invalidate(
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
}
