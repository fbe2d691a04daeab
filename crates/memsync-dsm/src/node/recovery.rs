//! Node loss (`PROTOCOL.md`, "Membership and lost pages", "Node loss, dynamic scheme"):
//! `node_down` (what waits for a dead node fails; a manager reloads or loses the pages it
//! owned), late grants adopted (`adopt`), and the dynamic scheme's heir, which recovers a
//! page on demand when a request's chain reaches a dead node (RECOVER, WHO, HAVE, TAKE).
//! Separate because it is the protocol's exception path: it uses the serving and requesting
//! sides (`serve.rs`, `fault.rs`), and they do not call into it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use memsync_region::ChunkState;

use super::config::Access;
use super::state::{Shared, bit};
use crate::proto::{ErrorCode, Msg, NodeId, Want};

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

impl Shared {
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
    pub(super) async fn on_who(self: Arc<Self>, from: NodeId, req: u64, page: u64, down: u64) {
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
    pub(super) fn on_take(
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
    pub(super) async fn recover_request(
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
            let (req, rx) = self.expect_answer(n, page);
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
                let (req, rx) = self.expect_answer(node, page);
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
    pub(super) async fn adopt(self: Arc<Self>, page: u64) {
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
    pub(super) fn node_down(self: &Arc<Self>, n: NodeId, clean: bool) {
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
}
