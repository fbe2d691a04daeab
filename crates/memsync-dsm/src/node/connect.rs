//! The connections between nodes: `connect` (dial the lower ids, accept the higher ones,
//! HELLO checked both ways), each peer's writer and reader tasks (a connection's end is
//! `node_down`), and `dispatch`, which hands every message that arrives to its handler.
//! Separate because it is the node's entry point for the network: it calls into every part of
//! the protocol, and none of them into it (but for a message a node sends to itself).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::config::{DsmConfig, DsmError};
use super::state::Shared;
use crate::net;
use crate::proto::{Msg, NodeId};

impl Shared {
    /// A message from node `from`.
    pub(super) fn dispatch(self: &Arc<Self>, from: NodeId, m: Msg) {
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
}

pub(super) async fn connect(
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
    let dead_after = cfg.dead_after;
    let accept = async {
        let mut got = 0;
        while got < higher {
            let (tcp, _) = listener.accept().await?;
            let (mut r, w) = match net::accepted(tcp, tls.as_ref(), dead_after).await {
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
                match net::dial(addr, tls2.as_ref(), cfg.dead_after).await {
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
