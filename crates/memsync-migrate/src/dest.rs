//! The destination side: accept a source's connections, write what arrives into a [`Target`],
//! take over at the switch-over, serve post-copy faults over the urgent connection, and wait
//! (faults paused, never failed) for the source to reconnect after a cut. The state machine is
//! drawn in `PROTOCOL.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use memsync_core::{Result, StoreError};
use memsync_sync::digest::Layout;
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::hooks::Hooks;
use crate::net::{BoxRead, BoxWrite, Conn, Listener, read_frame, read_hello, send, write_msg};
use crate::proto::{FEATURE_VERIFY, FEATURES, MAX_ZERO_RUN, Msg, Role, VERSION, decompress_chunk};
use crate::set::ChunkSet;
use crate::target::{Faults, Target};

/// How a destination behaves.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// How long a destination paused by a cut after the commit waits for the source to come
    /// back (its readers of missing chunks wait meanwhile).
    pub recovery_timeout: Duration,
    /// Limit on a new connection's TLS handshake and HELLO.
    pub hello_timeout: Duration,
    /// Before the commit: the migration fails if nothing arrives from the source for this long
    /// (after it, a silent source is waited for: readers of missing chunks must not fail).
    pub idle_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            recovery_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What a destination did.
#[derive(Clone, Debug, Default)]
pub struct DestReport {
    pub size: u64,
    pub chunk_size: u64,
    /// Bytes read from all connections.
    pub wire_received: u64,
    pub postcopy: bool,
    /// Chunks missing at the switch-over (post-copy).
    pub missing_at_switchover: u64,
    /// Readers that waited for a missing chunk, and how long (p50, p99).
    pub faults: u64,
    pub fault_p50: Duration,
    pub fault_p99: Duration,
    /// Control connections resumed after a cut.
    pub reconnects: u32,
    /// From the first connection to the end.
    pub total: Duration,
}

enum Ev {
    Conn(Msg, Conn),
    /// Events of connection tasks carry the generation of the connections they serve; a
    /// reconnection starts a new one, and events of older ones are stale.
    Control(u64, Result<Option<Msg>>),
    Marked(u64, u64),
    Lost(u64, String),
    Complete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Receiving,
    Switched,
    Committed,
}

struct Shared {
    target: Arc<dyn Target>,
    start: Instant,
    /// When a data connection last delivered a frame (ns after `start`).
    active: AtomicU64,
    received: AtomicU64,
    postcopy: AtomicBool,
    layout: Mutex<Option<Layout>>,
}

impl Shared {
    fn touch(&self) {
        self.active
            .store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }

    fn idle(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_nanos(self.active.load(Relaxed)))
    }
}

fn err(m: impl Into<String>) -> StoreError {
    StoreError::backend(m.into())
}

/// Receive one migration on `listener` into `target`; `hooks.resume` runs at the commit.
/// Returns when the source says DONE (every chunk is held and flushed) or with the error that
/// ended it. Before the commit an error means the application was never resumed here and the
/// target's contents are incomplete.
pub async fn receive(
    listener: Arc<Listener>,
    target: Arc<dyn Target>,
    hooks: &dyn Hooks,
    cfg: &DestConfig,
) -> Result<DestReport> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Ev>();
    let faults = Faults::new();
    let sh = Arc::new(Shared {
        target: target.clone(),
        start: Instant::now(),
        active: AtomicU64::new(0),
        received: AtomicU64::new(0),
        postcopy: AtomicBool::new(false),
        layout: Mutex::new(None),
    });
    // Accept and read HELLOs off the main loop, so a slow or silent client blocks nobody.
    let acceptor = {
        let tx = tx.clone();
        let sh = sh.clone();
        let timeout = cfg.hello_timeout;
        let listener = listener.clone();
        tokio::spawn(async move {
            loop {
                let c = match listener.accept(timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("migrate: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let tx = tx.clone();
                let sh = sh.clone();
                tokio::spawn(async move {
                    let mut c = c;
                    match tokio::time::timeout(timeout, read_hello(&mut c.r, &sh.received)).await {
                        Ok(Ok(Some(h @ Msg::Hello { .. }))) => {
                            let _ = tx.send(Ev::Conn(h, c));
                        }
                        Ok(Ok(Some(m))) => {
                            let _ = send(
                                &mut c.w,
                                &Msg::Abort(format!("expected HELLO, got {}", m.name())),
                                &AtomicU64::new(0),
                            )
                            .await;
                        }
                        r => tracing::warn!("migrate: {}: no HELLO ({:?})", c.peer, r.err()),
                    }
                });
            }
        })
    };
    let _stop = AbortOnDrop(vec![acceptor]);
    Dest {
        sh,
        tx,
        faults,
        hooks,
        cfg,
        phase: Phase::Receiving,
        session: None,
        ctl: None,
        tasks: Vec::new(),
        missing: ChunkSet::default(),
        generation: 0,
        marked: 0,
        switch: None,
        all_sent: false,
        report: DestReport::default(),
        start: Instant::now(),
    }
    .run(&mut rx)
    .await
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

struct Dest<'a> {
    sh: Arc<Shared>,
    tx: mpsc::UnboundedSender<Ev>,
    faults: Faults,
    hooks: &'a dyn Hooks,
    cfg: &'a DestConfig,
    phase: Phase,
    session: Option<u64>,
    ctl: Option<BufWriter<BoxWrite>>,
    /// Tasks of the current connections; aborted when one of them is lost.
    tasks: Vec<JoinHandle<()>>,
    missing: ChunkSet,
    generation: u64,
    marked: u64,
    switch: Option<(u64, bool)>,
    all_sent: bool,
    report: DestReport,
    start: Instant,
}

impl Dest<'_> {
    async fn run(mut self, rx: &mut mpsc::UnboundedReceiver<Ev>) -> Result<DestReport> {
        let r = self.main(rx).await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Err(e) = &r
            && self.phase < Phase::Committed
            && let Some(w) = self.ctl.as_mut()
        {
            // Tell the source why; it resumes its application.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                send(w, &Msg::Abort(e.chain()), &AtomicU64::new(0)),
            )
            .await;
        }
        r.map(|()| {
            let mut rep = self.report.clone();
            rep.wire_received = self.sh.received.load(Relaxed);
            let h = self.faults.latency();
            rep.faults = h.count();
            rep.fault_p50 = h.quantile(0.5);
            rep.fault_p99 = h.quantile(0.99);
            rep.total = self.start.elapsed();
            rep
        })
    }

    async fn main(&mut self, rx: &mut mpsc::UnboundedReceiver<Ev>) -> Result<()> {
        let mut paused_until: Option<tokio::time::Instant> = None;
        loop {
            let ev = match paused_until {
                Some(t) => match tokio::time::timeout_at(t, rx.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        return Err(err(format!(
                            "the source did not reconnect within {:?} after the connection was \
                             lost; {} chunks are still missing",
                            self.cfg.recovery_timeout,
                            self.sh.target.missing()
                        )));
                    }
                },
                None if self.phase < Phase::Committed => {
                    match tokio::time::timeout(self.cfg.idle_timeout, rx.recv()).await {
                        Ok(ev) => ev,
                        // Chunks keep arriving during a long pass without an event here.
                        Err(_) if self.sh.idle() < self.cfg.idle_timeout => continue,
                        Err(_) => {
                            return Err(err(format!(
                                "nothing from the source for {:?} before the commit",
                                self.cfg.idle_timeout
                            )));
                        }
                    }
                }
                None => rx.recv().await,
            };
            let Some(ev) = ev else {
                return Err(err("event channel closed"));
            };
            match ev {
                Ev::Conn(hello, c) => {
                    if self.on_conn(hello, c).await? {
                        paused_until = None;
                    }
                }
                Ev::Control(g, _) | Ev::Marked(g, _) | Ev::Lost(g, _) if g != self.generation => {}
                Ev::Control(_, Ok(Some(m))) => {
                    if self.on_control(m).await? {
                        return Ok(());
                    }
                }
                // Everything is held and the destination runs: a control connection that ends
                // now (DONE lost) ends the migration here.
                Ev::Control(..) if self.all_sent => {
                    self.sh.target.flush().await?;
                    return Ok(());
                }
                Ev::Control(_, Ok(None)) => {
                    if self.lost("the control connection closed")? {
                        paused_until =
                            Some(tokio::time::Instant::now() + self.cfg.recovery_timeout);
                    }
                }
                Ev::Control(_, Err(e)) => {
                    if self.lost(&format!("control: {}", e.chain()))? {
                        paused_until =
                            Some(tokio::time::Instant::now() + self.cfg.recovery_timeout);
                    }
                }
                // Once every chunk is held the data connections have nothing left to do; the
                // source closes them as it ends.
                Ev::Lost(..) if self.all_sent => {}
                Ev::Lost(_, why) => {
                    if self.lost(&why)? {
                        paused_until =
                            Some(tokio::time::Instant::now() + self.cfg.recovery_timeout);
                    }
                }
                Ev::Marked(_, seq) => {
                    self.marked = self.marked.max(seq);
                    let w = self
                        .ctl
                        .as_mut()
                        .ok_or_else(|| err("no control connection"))?;
                    send(w, &Msg::Received { seq }, &AtomicU64::new(0)).await?;
                    self.check_switch().await?;
                }
                Ev::Complete => self.check_complete().await?,
            }
        }
    }

    /// A connection was lost. Before the commit that ends the migration (error); after it,
    /// pause: drop every connection and wait for the source (returns true).
    fn lost(&mut self, why: &str) -> Result<bool> {
        if self.phase < Phase::Committed {
            self.ctl = None;
            return Err(err(format!("connection lost before the commit: {why}")));
        }
        tracing::warn!("migrate: {why}; paused until the source reconnects");
        self.generation += 1;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.ctl = None;
        Ok(true)
    }

    /// Returns true when a resumed control connection ends a pause.
    async fn on_conn(&mut self, hello: Msg, mut c: Conn) -> Result<bool> {
        let Msg::Hello {
            version,
            role,
            session,
            resume,
            features,
        } = hello
        else {
            return Ok(false);
        };
        let no = AtomicU64::new(0);
        if version != VERSION {
            let m = format!("protocol version {version} is not supported (this side: {VERSION})");
            let _ = send(&mut c.w, &Msg::Abort(m), &no).await;
            return Ok(false);
        }
        let fits = match (self.session, role, resume) {
            (None, Role::Control, false) => true,
            (Some(s), Role::Control, true) => s == session && self.phase == Phase::Committed,
            (Some(s), Role::Bulk | Role::Urgent, _) => s == session,
            _ => false,
        };
        if !fits {
            let m = "this destination is busy with another migration (or the connection does not \
                     belong to it)";
            let _ = send(&mut c.w, &Msg::Abort(m.into()), &no).await;
            return Ok(false);
        }
        let mut features = features & FEATURES;
        if !self.sh.target.can_keep() {
            features &= !FEATURE_VERIFY;
        }
        send(
            &mut c.w,
            &Msg::Welcome {
                version: VERSION,
                features,
            },
            &no,
        )
        .await?;
        match role {
            Role::Control => {
                let resumed = self.session.is_some();
                self.session = Some(session);
                if resumed {
                    // A new control connection replaces every old connection.
                    self.generation += 1;
                    for t in self.tasks.drain(..) {
                        t.abort();
                    }
                    self.report.reconnects += 1;
                }
                let mut w = BufWriter::with_capacity(64 << 10, c.w);
                if resumed {
                    let held = self.sh.target.held();
                    let ctr = &self.sh.received;
                    let r: std::io::Result<()> = async {
                        for s in held.segments() {
                            write_msg(&mut w, &Msg::Held(s), ctr).await?;
                        }
                        write_msg(&mut w, &Msg::HeldEnd { held: held.count() }, ctr).await?;
                        w.flush().await
                    }
                    .await;
                    if let Err(e) = r {
                        return Ok(!self.lost(&format!("sending HELD: {e}"))?);
                    }
                }
                self.ctl = Some(w);
                self.spawn_control(c.r);
                if resumed && self.sh.target.missing() == 0 {
                    self.all_sent = false;
                    self.check_complete().await?;
                }
                Ok(resumed)
            }
            Role::Bulk => {
                self.spawn_data(c.r, Role::Bulk);
                Ok(false)
            }
            Role::Urgent => {
                self.spawn_data(c.r, Role::Urgent);
                self.attach_requests(c.w);
                Ok(false)
            }
        }
    }

    fn spawn_control(&mut self, mut r: BoxRead) {
        let g = self.generation;
        let tx = self.tx.clone();
        let sh = self.sh.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let m = read_frame(&mut r, &sh.received)
                    .await
                    .map_err(|e| StoreError::backend_with("reading control", e));
                let end = !matches!(m, Ok(Some(_)));
                if tx.send(Ev::Control(g, m)).is_err() || end {
                    return;
                }
            }
        }));
    }

    /// A bulk or urgent reader: places every chunk that arrives. The bulk reader runs at the
    /// background stream's lower priority, the urgent one on the caller's runtime.
    fn spawn_data(&mut self, mut r: BoxRead, role: Role) {
        let g = self.generation;
        let tx = self.tx.clone();
        let sh = self.sh.clone();
        let task = async move {
            let why = loop {
                let m = match read_frame(&mut r, &sh.received).await {
                    Ok(Some(m)) => {
                        sh.touch();
                        m
                    }
                    Ok(None) => break format!("the {role:?} connection closed"),
                    Err(e) => break format!("{role:?}: {e}"),
                };
                let r = match m {
                    Msg::Chunk { index, data } => sh.target.place(index, Some(data)).await,
                    Msg::ChunkLz4 { index, data } => {
                        let layout = *sh.layout.lock();
                        match layout {
                            Some(l) if index < l.chunks() => {
                                match decompress_chunk(&data, l.chunk(index).1 as usize) {
                                    Ok(d) => sh.target.place(index, Some(d)).await,
                                    Err(e) => Err(err(format!("chunk {index}: {e}"))),
                                }
                            }
                            _ => Err(err(format!("lz4 chunk {index} past the region"))),
                        }
                    }
                    Msg::Zero { first, count } => {
                        let chunks = sh.layout.lock().map_or(0, |l| l.chunks());
                        if first.checked_add(count as u64).is_none_or(|e| e > chunks)
                            || count > MAX_ZERO_RUN
                        {
                            Err(err(format!("zero run {first}+{count} past the region")))
                        } else {
                            sh.target
                                .place_zeroes(first, count as u64)
                                .await
                                .map(|()| true)
                        }
                    }
                    Msg::Same { first, count } => {
                        let chunks = sh.layout.lock().map_or(0, |l| l.chunks());
                        if first.checked_add(count as u64).is_none_or(|e| e > chunks) {
                            Err(err(format!("same run {first}+{count} past the region")))
                        } else {
                            let mut any = Ok(false);
                            for i in first..first + count as u64 {
                                match sh.target.keep(i).await {
                                    Ok(k) => any = any.map(|a| a || k),
                                    Err(e) => {
                                        any = Err(e);
                                        break;
                                    }
                                }
                            }
                            any
                        }
                    }
                    Msg::Mark { seq } if role == Role::Bulk => {
                        let _ = tx.send(Ev::Marked(g, seq));
                        continue;
                    }
                    m => Err(err(format!(
                        "unexpected {} on the {role:?} connection",
                        m.name()
                    ))),
                };
                match r {
                    Ok(placed) => {
                        if placed && sh.postcopy.load(Relaxed) && sh.target.missing() == 0 {
                            let _ = tx.send(Ev::Complete);
                        }
                    }
                    Err(e) => break format!("placing a chunk: {}", e.chain()),
                }
            };
            let _ = tx.send(Ev::Lost(g, why));
        };
        self.tasks.push(if role == Role::Bulk {
            crate::background::spawn(task)
        } else {
            tokio::spawn(task)
        });
    }

    /// The urgent connection's writing half goes to the fault path, which writes requests from
    /// the asking threads; outstanding requests from before a reconnection go first.
    fn attach_requests(&mut self, w: BoxWrite) {
        let g = self.generation;
        let tx = self.tx.clone();
        let sh = self.sh.clone();
        let faults = self.faults.clone();
        self.tasks.push(tokio::spawn(async move {
            let held = sh.target.held();
            faults
                .attach(w, &held, move |e| {
                    let _ = tx.send(Ev::Lost(g, format!("urgent: {e}")));
                })
                .await;
        }));
    }

    /// Returns true at the end (DONE).
    async fn on_control(&mut self, m: Msg) -> Result<bool> {
        let no = AtomicU64::new(0);
        match (self.phase, m) {
            (Phase::Receiving, Msg::Geometry { size, chunk_size }) => {
                if self.sh.layout.lock().is_some() {
                    return Err(err("a second GEOMETRY"));
                }
                let layout = Layout::new(size, chunk_size)?;
                self.sh.target.prepare(layout)?;
                *self.sh.layout.lock() = Some(layout);
                self.missing = ChunkSet::new(layout.chunks());
                self.report.size = size;
                self.report.chunk_size = chunk_size;
                let w = self
                    .ctl
                    .as_mut()
                    .ok_or_else(|| err("no control connection"))?;
                send(w, &Msg::Ready, &no).await?;
            }
            (Phase::Receiving, Msg::Dirty(s)) => self.missing.apply(&s).map_err(err)?,
            (Phase::Receiving, Msg::Evict) => {
                let (t, m) = (self.sh.target.clone(), self.missing.clone());
                tokio::task::spawn_blocking(move || t.evict(&m))
                    .await
                    .map_err(|e| err(format!("evicting stale chunks: {e}")))?;
                let w = self
                    .ctl
                    .as_mut()
                    .ok_or_else(|| err("no control connection"))?;
                send(w, &Msg::Evicted, &no).await?;
            }
            (Phase::Receiving, Msg::Switchover { mark, postcopy }) => {
                if self.sh.layout.lock().is_none() {
                    return Err(err("SWITCHOVER before GEOMETRY"));
                }
                if !postcopy && !self.missing.is_empty() {
                    return Err(err("DIRTY chunks in a stop-and-copy switch-over"));
                }
                self.switch = Some((mark, postcopy));
                self.check_switch().await?;
            }
            (Phase::Switched, Msg::Commit) => {
                self.hooks
                    .resume()
                    .await
                    .map_err(|e| e.context("resuming"))?;
                self.phase = Phase::Committed;
                let w = self
                    .ctl
                    .as_mut()
                    .ok_or_else(|| err("no control connection"))?;
                send(w, &Msg::Resumed, &no).await?;
                self.check_complete().await?;
            }
            (Phase::Committed, Msg::Done) => {
                if self.sh.target.missing() != 0 {
                    return Err(err("DONE while chunks are missing"));
                }
                self.sh.target.flush().await?;
                return Ok(true);
            }
            (_, Msg::Abort(m)) => return Err(err(format!("the source aborted: {m}"))),
            (p, m) => {
                return Err(err(format!(
                    "unexpected {} on the control connection ({p:?})",
                    m.name()
                )));
            }
        }
        Ok(false)
    }

    async fn check_switch(&mut self) -> Result<()> {
        let Some((mark, postcopy)) = self.switch else {
            return Ok(());
        };
        if self.marked < mark || self.phase != Phase::Receiving {
            return Ok(());
        }
        if postcopy {
            self.report.postcopy = true;
            self.report.missing_at_switchover = self.missing.count();
            let t = std::time::Instant::now();
            self.sh
                .target
                .begin_postcopy(&self.missing, self.faults.clone());
            tracing::debug!("migrate: post-copy switch-over took {:?}", t.elapsed());
            self.sh.postcopy.store(true, Relaxed);
        } else {
            self.sh.target.flush().await?;
        }
        self.phase = Phase::Switched;
        let w = self
            .ctl
            .as_mut()
            .ok_or_else(|| err("no control connection"))?;
        send(w, &Msg::Switched, &AtomicU64::new(0)).await
    }

    async fn check_complete(&mut self) -> Result<()> {
        if self.phase != Phase::Committed || self.all_sent || self.sh.target.missing() != 0 {
            return Ok(());
        }
        let Some(w) = self.ctl.as_mut() else {
            return Ok(()); // paused: sent after the reconnection
        };
        self.sh.target.flush().await?;
        let h = self.faults.latency();
        let m = Msg::AllReceived {
            faults: h.count(),
            p50_ns: h.quantile(0.5).as_nanos() as u64,
            p99_ns: h.quantile(0.99).as_nanos() as u64,
        };
        if let Err(e) = send(w, &m, &AtomicU64::new(0)).await {
            tracing::warn!("migrate: sending ALL_RECEIVED: {}", e.chain());
            return Ok(()); // the reader notices the loss
        }
        self.all_sent = true;
        Ok(())
    }
}
