//! Routing: a connection pool per node, the cluster slot map (CLUSTER SLOTS), MOVED/ASK
//! redirects, and retries with backoff until a deadline.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use parking_lot::RwLock;

use crate::conn::{Conn, ConnError, ConnOpts};
use crate::resp::{self, Value};
use crate::slot::SLOTS;

/// Connections to one server.
struct Node {
    addr: String,
    conns: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
}

impl Node {
    fn new(addr: String, n: usize) -> Arc<Node> {
        Arc::new(Node {
            addr,
            conns: (0..n.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    async fn conn(&self, opts: &ConnOpts) -> Result<Arc<Conn>, ConnError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut slot = self.conns[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(Conn::connect(&self.addr, opts).await?);
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub conn: ConnOpts,
    /// Connections per node.
    pub conns: usize,
    /// Commands per pipelined batch on one connection.
    pub pipeline: usize,
    /// Give up retrying an operation after this long.
    pub deadline: Duration,
    pub cluster: bool,
}

/// One command, encoded, with the hash slot of its key.
#[derive(Clone, Debug)]
pub struct Cmd {
    pub bytes: Bytes,
    pub slot: u16,
}

impl Cmd {
    /// A command whose (first) key is `key`.
    pub fn keyed(args: &[&[u8]], key: &[u8]) -> Cmd {
        let mut b = BytesMut::new();
        resp::encode_command(&mut b, args);
        Cmd {
            bytes: b.freeze(),
            slot: crate::slot::key_slot(key),
        }
    }
}

/// Failure of a routed command batch.
#[derive(Debug)]
pub enum ClientError {
    /// Connection-level failures went on until the deadline.
    Unavailable { after: Duration, last: ConnError },
    /// The server answered with an error.
    Server { addr: String, msg: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unavailable { after, last } => write!(
                f,
                "redis unavailable: gave up after {:.1} s of retries (deadline); last error: {last}",
                after.as_secs_f64()
            ),
            ClientError::Server { addr, msg } => write!(f, "redis {addr} replied: {msg}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Unavailable { last, .. } => Some(last),
            ClientError::Server { .. } => None,
        }
    }
}

/// Routes commands to single node or cluster nodes.
pub struct Client {
    opts: ClientOpts,
    seeds: Vec<String>,
    nodes: RwLock<HashMap<String, Arc<Node>>>,
    /// Slot → node address (cluster); empty for a single node.
    slots: RwLock<Arc<Vec<Arc<Node>>>>,
    single: Option<Arc<Node>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("seeds", &self.seeds)
            .field("cluster", &self.opts.cluster)
            .field("nodes", &self.nodes.read().keys().collect::<Vec<_>>())
            .finish()
    }
}

enum Outcome {
    Done(Value),
    Redirect { addr: String, ask: bool },
    Retry(String),
}

fn classify(v: Value) -> Outcome {
    let Some(e) = v.as_error() else {
        return Outcome::Done(v);
    };
    let mut it = e.split_whitespace();
    match it.next() {
        Some(kind @ ("MOVED" | "ASK")) => {
            let _slot = it.next();
            match it.next() {
                Some(addr) => Outcome::Redirect {
                    addr: addr.to_owned(),
                    ask: kind == "ASK",
                },
                None => Outcome::Done(Value::Error(Bytes::from(e))),
            }
        }
        Some("TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN") => Outcome::Retry(e),
        _ => Outcome::Done(v),
    }
}

impl Client {
    /// A client for `seeds` (one address for a single node; any cluster nodes for a cluster).
    /// Connects and, for a cluster, loads the slot map; fails after the deadline.
    pub async fn connect(seeds: Vec<String>, opts: ClientOpts) -> Result<Client, ClientError> {
        let single = (!opts.cluster).then(|| Node::new(seeds[0].clone(), opts.conns));
        let c = Client {
            opts,
            seeds,
            nodes: RwLock::new(HashMap::new()),
            slots: RwLock::new(Arc::new(Vec::new())),
            single,
        };
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            let r = if c.opts.cluster {
                c.refresh_slots().await
            } else {
                c.ping().await
            };
            match r {
                Ok(()) => return Ok(c),
                Err(e) => {
                    if start.elapsed() + backoff > c.opts.deadline {
                        return Err(ClientError::Unavailable {
                            after: start.elapsed(),
                            last: e,
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    async fn ping(&self) -> Result<(), ConnError> {
        let node = self.single.as_ref().expect("single node");
        let conn = node.conn(&self.opts.conn).await?;
        let mut b = BytesMut::new();
        resp::encode_command(&mut b, &[b"PING"]);
        let r = self.timed(&conn, vec![b.freeze()]).await?;
        match r.first().and_then(|v| v.as_error()) {
            Some(e) => Err(ConnError {
                addr: node.addr.clone(),
                why: format!("PING refused: {e}"),
            }),
            None => Ok(()),
        }
    }

    fn node(&self, addr: &str) -> Arc<Node> {
        if let Some(n) = self.nodes.read().get(addr) {
            return n.clone();
        }
        self.nodes
            .write()
            .entry(addr.to_owned())
            .or_insert_with(|| Node::new(addr.to_owned(), self.opts.conns))
            .clone()
    }

    /// Whether this client talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        self.opts.cluster
    }

    /// Reload the slot map from the first node that answers CLUSTER SLOTS.
    pub async fn refresh_slots(&self) -> Result<(), ConnError> {
        let mut candidates: Vec<String> = self.nodes.read().keys().cloned().collect();
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut last = None;
        for addr in candidates {
            match self.slots_from(&addr).await {
                Ok(map) => {
                    *self.slots.write() = Arc::new(map);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ConnError {
            addr: "?".into(),
            why: "no cluster nodes known".into(),
        }))
    }

    async fn slots_from(&self, addr: &str) -> Result<Vec<Arc<Node>>, ConnError> {
        let node = self.node(addr);
        let conn = node.conn(&self.opts.conn).await?;
        let mut b = BytesMut::new();
        resp::encode_command(&mut b, &[b"CLUSTER", b"SLOTS"]);
        let r = self.timed(&conn, vec![b.freeze()]).await?;
        let bad = |why: String| ConnError {
            addr: addr.to_owned(),
            why,
        };
        let Some(Value::Array(ranges)) = r.into_iter().next() else {
            return Err(bad(
                "CLUSTER SLOTS: unexpected reply (is this a cluster node?)".into(),
            ));
        };
        let mut map: Vec<Option<Arc<Node>>> = vec![None; SLOTS];
        for range in ranges {
            let Value::Array(f) = range else {
                return Err(bad("CLUSTER SLOTS: bad range".into()));
            };
            let (Some(Value::Int(a)), Some(Value::Int(z)), Some(Value::Array(master))) =
                (f.first(), f.get(1), f.get(2))
            else {
                return Err(bad("CLUSTER SLOTS: bad range fields".into()));
            };
            let host = match master.first() {
                Some(Value::Bulk(h)) if !h.is_empty() && h.as_ref() != b"?" => {
                    String::from_utf8_lossy(h).into_owned()
                }
                _ => crate::conn_host(addr).to_owned(),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(bad("CLUSTER SLOTS: bad port".into()));
            };
            let target = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let n = self.node(&target);
            let (a, z) = (*a, *z);
            if !(0..SLOTS as i64).contains(&a) || !(a..SLOTS as i64).contains(&z) {
                return Err(bad(format!("CLUSTER SLOTS: bad slot range {a}-{z}")));
            }
            for s in a..=z {
                map[s as usize] = Some(n.clone());
            }
        }
        if map.iter().any(|m| m.is_none()) {
            return Err(bad("cluster does not cover all 16384 slots".into()));
        }
        Ok(map.into_iter().flatten().collect())
    }

    async fn timed(&self, conn: &Conn, cmds: Vec<Bytes>) -> Result<Vec<Value>, ConnError> {
        self.timed_for(conn, cmds, self.opts.deadline).await
    }

    async fn timed_for(
        &self,
        conn: &Conn,
        cmds: Vec<Bytes>,
        t: Duration,
    ) -> Result<Vec<Value>, ConnError> {
        match tokio::time::timeout(t, conn.send(cmds)).await {
            Ok(r) => r,
            Err(_) => {
                conn.kill("request timed out");
                Err(ConnError {
                    addr: "?".into(),
                    why: format!("no reply within {t:?}"),
                })
            }
        }
    }

    fn route(&self, slot: u16) -> Arc<Node> {
        match &self.single {
            Some(n) => n.clone(),
            None => {
                let map = self.slots.read().clone();
                map.get(slot as usize)
                    .cloned()
                    .unwrap_or_else(|| self.node(&self.seeds[0]))
            }
        }
    }

    /// Send encoded commands to `node`, pipelined in batches over its connections.
    async fn send_to(
        &self,
        node: Arc<Node>,
        cmds: Vec<Bytes>,
        asking: bool,
        limit: Duration,
    ) -> Result<Vec<Value>, ConnError> {
        let per = self.opts.pipeline.max(1);
        let batches: Vec<Vec<Bytes>> = cmds.chunks(per).map(|c| c.to_vec()).collect();
        let futs = batches.into_iter().map(|batch| {
            let node = node.clone();
            async move {
                let conn = tokio::time::timeout(limit, node.conn(&self.opts.conn))
                    .await
                    .map_err(|_| ConnError {
                        addr: node.addr.clone(),
                        why: format!("connect timed out after {limit:?}"),
                    })??;
                let wire = if asking {
                    let mut ask = BytesMut::new();
                    resp::encode_command(&mut ask, &[b"ASKING"]);
                    let ask = ask.freeze();
                    batch.into_iter().flat_map(|c| [ask.clone(), c]).collect()
                } else {
                    batch
                };
                let mut r = self.timed_for(&conn, wire, limit).await.map_err(|mut e| {
                    e.addr = node.addr.clone();
                    e
                })?;
                if asking {
                    r = r.into_iter().skip(1).step_by(2).collect();
                }
                Ok::<_, ConnError>(r)
            }
        });
        let mut out = Vec::with_capacity(cmds.len());
        for r in join_all(futs).await {
            out.extend(r?);
        }
        Ok(out)
    }

    /// Run commands (grouped by node, pipelined), following redirects and retrying connection
    /// failures with backoff until the deadline. Replies come back in command order; server
    /// errors other than redirects are returned as replies.
    pub async fn run(&self, cmds: &[Cmd]) -> Result<Vec<Value>, ClientError> {
        let start = Instant::now();
        let mut results: Vec<Option<Value>> = vec![None; cmds.len()];
        let mut todo: Vec<usize> = (0..cmds.len()).collect();
        let mut redirect: HashMap<usize, (String, bool)> = HashMap::new();
        let mut backoff = Duration::from_millis(10);
        let mut last_err: Option<ConnError> = None;
        let mut redirects = 0usize;
        while !todo.is_empty() {
            // Group by target node.
            let mut groups: HashMap<(String, bool), (Arc<Node>, Vec<usize>)> = HashMap::new();
            for &i in &todo {
                let (node, ask) = match redirect.get(&i) {
                    Some((addr, ask)) => (self.node(addr), *ask),
                    None => (self.route(cmds[i].slot), false),
                };
                groups
                    .entry((node.addr.clone(), ask))
                    .or_insert_with(|| (node, Vec::new()))
                    .1
                    .push(i);
            }
            let limit = self
                .opts
                .deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(50));
            let futs = groups.into_iter().map(|((_, ask), (node, idx))| {
                let wire: Vec<Bytes> = idx.iter().map(|&i| cmds[i].bytes.clone()).collect();
                async move { (idx, self.send_to(node, wire, ask, limit).await) }
            });
            let mut next = Vec::new();
            let mut sleep = false;
            let mut refresh = false;
            for (idx, r) in join_all(futs).await {
                match r {
                    Err(e) => {
                        tracing::debug!("redis: {e}; retrying");
                        last_err = Some(e);
                        sleep = true;
                        refresh = self.opts.cluster;
                        for i in idx {
                            redirect.remove(&i);
                            next.push(i);
                        }
                    }
                    Ok(vals) => {
                        for (i, v) in idx.into_iter().zip(vals) {
                            redirect.remove(&i);
                            match classify(v) {
                                Outcome::Done(v) => results[i] = Some(v),
                                Outcome::Redirect { addr, ask } => {
                                    redirects += 1;
                                    refresh |= !ask;
                                    redirect.insert(i, (addr, ask));
                                    next.push(i);
                                }
                                Outcome::Retry(e) => {
                                    last_err = Some(ConnError {
                                        addr: "cluster".into(),
                                        why: e,
                                    });
                                    sleep = true;
                                    next.push(i);
                                }
                            }
                        }
                    }
                }
            }
            todo = next;
            if todo.is_empty() {
                break;
            }
            if redirects > 16 * cmds.len().max(1) {
                return Err(ClientError::Server {
                    addr: "cluster".into(),
                    msg: "too many MOVED/ASK redirects".into(),
                });
            }
            if start.elapsed() > self.opts.deadline {
                return Err(ClientError::Unavailable {
                    after: start.elapsed(),
                    last: last_err.unwrap_or_else(|| ConnError {
                        addr: "?".into(),
                        why: "redirect loop".into(),
                    }),
                });
            }
            if sleep {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            if refresh && let Err(e) = self.refresh_slots().await {
                tracing::debug!("redis: slot map refresh failed: {e}");
            }
        }
        Ok(results
            .into_iter()
            .map(|v| v.unwrap_or(Value::Nil))
            .collect())
    }

    /// Test hook: point every slot at one node, so that commands hit MOVED redirects.
    #[doc(hidden)]
    pub fn scramble_slots(&self) {
        let nodes: Vec<Arc<Node>> = self.nodes.read().values().cloned().collect();
        if let Some(n) = nodes.first() {
            *self.slots.write() = Arc::new(vec![n.clone(); SLOTS]);
        }
    }
}
