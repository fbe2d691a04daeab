//! The source side: pre-copy passes over what a [`ChangeSource`] reports dirty, the switch-over
//! decision, stop-and-copy or post-copy, and recovery after a cut. The state machine is drawn
//! in `PROTOCOL.md`.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use memsync_core::{DynStore, Result, StoreError};
use memsync_sync::digest::{Digest, Layout, chunk_digest, is_zero};
use memsync_sync::{ChangeSource, Progress};
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::hooks::Hooks;
use crate::net::{BoxRead, BoxWrite, Dialer, expect_frame, read_frame, send, write_msg};
use crate::proto::{FEATURE_LZ4, FEATURE_VERIFY, MAX_ZERO_RUN, Msg, Role, VERSION, compress_chunk};
use crate::set::ChunkSet;

/// How the migration moves the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Passes while the application runs, then stop-and-copy of the rest (or the fallback when
    /// the passes do not converge).
    Precopy,
    /// Suspend at once, resume at the destination, and send everything after (urgent chunks
    /// first).
    Postcopy,
    /// `hybrid_passes` pre-copy passes (fewer if they converge), then post-copy of the rest.
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "precopy" | "pre-copy" => Some(Mode::Precopy),
            "postcopy" | "post-copy" => Some(Mode::Postcopy),
            "hybrid" => Some(Mode::Hybrid),
            _ => None,
        }
    }
}

/// What pre-copy does when its passes do not converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Suspend and send the rest, however long it takes.
    StopAndCopy,
    /// Suspend, resume at the destination, and send the rest as post-copy.
    Postcopy,
}

/// When a source that finds changes by hashing ([`SourceConfig::hash_sent`]) checks which
/// chunks the application changed since they were sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// While the application is suspended: hash the region, send what changed, then resume at
    /// the destination, which from then on needs nothing from the source (true pre-copy; the
    /// hashing is in the downtime).
    Suspended,
    /// After the resume: the switch-over is post-copy with every chunk missing, and each one is
    /// answered SAME (unchanged, kept) or sent again; short downtime, but the destination
    /// depends on the source until every chunk is verified. Needs a destination that can keep
    /// chunks (FEATURE_VERIFY); otherwise [`Verify::Suspended`] applies.
    AfterResume,
}

impl Verify {
    pub fn name(self) -> &'static str {
        match self {
            Verify::Suspended => "suspended",
            Verify::AfterResume => "after-resume",
        }
    }

    pub fn parse(s: &str) -> Option<Verify> {
        match s {
            "suspended" => Some(Verify::Suspended),
            "after-resume" => Some(Verify::AfterResume),
            _ => None,
        }
    }

    /// The default of a mode: pre-copy keeps its promise (a destination independent of the
    /// source at the resume); hybrid and post-copy are post-copy anyway.
    pub fn for_mode(mode: Mode) -> Verify {
        match mode {
            Mode::Precopy => Verify::Suspended,
            Mode::Postcopy | Mode::Hybrid => Verify::AfterResume,
        }
    }
}

/// Source settings.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub mode: Mode,
    /// The unit of tracking and transfer (a power of two, 4 KiB to 16 MiB). 4 KiB by default:
    /// a random writer's 4 KiB write dirties a whole chunk, so larger chunks resend more
    /// (`memsync bench migrate`, metric `bytes-sent`; `docs/perf.md`).
    pub chunk_size: u64,
    /// Switch over when the dirty bytes would take at most this long at the measured bandwidth.
    pub max_downtime: Duration,
    /// KVM's rule: stop iterating after this many passes...
    pub max_passes: u32,
    /// ...or after this many passes whose dirty set grew.
    pub max_growing_passes: u32,
    pub fallback: Fallback,
    /// Pre-copy passes before a hybrid migration turns to post-copy (the first is the full one).
    pub hybrid_passes: u32,
    /// How long to keep trying to reconnect after a cut past the commit.
    pub recovery_timeout: Duration,
    /// Longest wait for an answer on the control connection (a pass's RECEIVED includes the
    /// time the destination takes to write the pass). Before the commit it aborts the
    /// migration; after it, it counts as a cut.
    pub reply_timeout: Duration,
    /// Report the BLAKE3 digest of every chunk sent to the change source (for [`Rescan`]
    /// sources, which compare contents; trackers ignore it).
    ///
    /// [`Rescan`]: memsync_sync::Rescan
    pub hash_sent: bool,
    /// With `hash_sent`: when changes are verified at the switch-over; `None` takes
    /// [`Verify::for_mode`].
    pub verify: Option<Verify>,
    /// Chunks read from the store at once.
    pub read_ahead: usize,
    /// Slow down a writer whose passes do not converge (off by default).
    pub auto_converge: Option<Throttle>,
    /// Offer LZ4 on the bulk stream (used if the destination grants it in its WELCOME); a
    /// chunk goes compressed only if that saves 1/16 of it. Pays on links slower than the
    /// compressor (`memsync bench migrate`, PROTOCOL.md's figures); off by default.
    pub compress: bool,
}

/// Auto-converge: when a pre-copy pass (from the second) does not converge and its dirty set
/// did not halve, the application is suspended for a growing share of each `period` during
/// the following passes, through the same [`Hooks`] that suspend it for the switch-over
/// (SIGSTOP/SIGCONT of a pid, a [`Gate`](crate::Gate) for threads writing an embedded
/// region). The share starts at `initial` and grows by `increment` per such pass up to `max`
/// (QEMU's cpu-throttle defaults: 20 %, 10 %, 99 %). While it has not reached `max`, growing
/// passes do not count towards [`SourceConfig::max_growing_passes`].
///
/// Why the hooks and not the engine: the region's tracker (`WP_ASYNC`) lets the kernel resolve
/// a first write without any event, so the engine has no write fault to delay; delaying would
/// need synchronous write protection (a handler round trip on every first write after each
/// pass, for every writer, throttled or not). Duty-cycling works the same for both kinds of
/// region and costs nothing until it engages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttle {
    pub initial: f64,
    pub increment: f64,
    pub max: f64,
    /// One suspend/resume cycle (the suspended part is `share × period`).
    pub period: Duration,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            initial: 0.2,
            increment: 0.1,
            max: 0.99,
            period: Duration::from_millis(50),
        }
    }
}

/// Suspend the application for `share` of every `period` of one clock that started at
/// `origin`, until dropped (or a hook fails); `down` tells whether it is suspended now and
/// outlives the call, so that a pass that ends while the application is held leaves it held
/// into the next pass: restarting the cycle at each pass (resume, then suspend again) lets the
/// writer run between passes, and on a loaded machine those windows alone keep a pass from
/// converging.
async fn duty_cycle(
    hooks: &dyn Hooks,
    t: Throttle,
    share: f64,
    down: &AtomicBool,
    origin: Instant,
) -> StoreError {
    let period = t.period.max(Duration::from_millis(1));
    let off = period.mul_f64(share.clamp(0.0, 1.0));
    loop {
        // Suspended part first in each period.
        let phase = Duration::from_nanos((origin.elapsed().as_nanos() % period.as_nanos()) as u64);
        if phase < off {
            if !down.load(Relaxed) {
                down.store(true, Relaxed);
                if let Err(e) = hooks.suspend().await {
                    return e.context("throttling the application (auto-converge)");
                }
            }
            tokio::time::sleep(off - phase).await;
        } else {
            if down.load(Relaxed) {
                if let Err(e) = hooks.resume().await {
                    return e.context("throttling the application (auto-converge)");
                }
                down.store(false, Relaxed);
            }
            tokio::time::sleep(period - phase).await;
        }
    }
}

/// Resume an application that auto-converge holds, if it does.
async fn resume_throttled(hooks: &dyn Hooks, down: &AtomicBool) -> Result<(), StoreError> {
    // `down` is set before the suspend begins: a suspend cut short is undone too.
    if down.swap(false, Relaxed) {
        hooks
            .resume()
            .await
            .map_err(|e| e.context("resuming after auto-converge"))?;
    }
    Ok(())
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            mode: Mode::Precopy,
            chunk_size: 4096,
            max_downtime: Duration::from_millis(300),
            max_passes: 30,
            max_growing_passes: 2,
            fallback: Fallback::StopAndCopy,
            hybrid_passes: 1,
            recovery_timeout: Duration::from_secs(60),
            reply_timeout: Duration::from_secs(60),
            hash_sent: false,
            verify: None,
            read_ahead: 16,
            auto_converge: None,
            compress: false,
        }
    }
}

/// One pre-copy pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chunks sent (zero chunks included, as ZERO runs).
    pub chunks: u64,
    pub wire_bytes: u64,
    pub elapsed: Duration,
    /// Chunks found dirty after the pass.
    pub dirty_after: u64,
    /// Share of the pass the application was held suspended by auto-converge (percent).
    pub throttle_percent: u32,
}

/// Why the pre-copy passes ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchReason {
    /// The dirty rest fits the downtime limit at the measured bandwidth.
    Converged,
    /// Too many passes, or too many that grew (then the fallback applied).
    NotConverged,
    /// A hybrid migration's pre-copy passes were done.
    HybridPasses,
    /// Post-copy mode: no pre-copy passes.
    Postcopy,
}

/// What a migration did, as the source saw it.
#[derive(Clone, Debug)]
pub struct Report {
    pub mode: Mode,
    pub size: u64,
    pub chunk_size: u64,
    pub passes: Vec<Pass>,
    pub reason: SwitchReason,
    /// Whether the rest went as post-copy.
    pub postcopy: bool,
    /// Chunks dirty (or never sent) at the switch-over.
    pub remaining_chunks: u64,
    /// From the suspend hook until the destination said it resumed the application.
    pub downtime: Duration,
    pub total: Duration,
    /// Bytes written to all connections.
    pub wire_sent: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    /// Post-copy requests answered on the urgent connection.
    pub urgent_served: u64,
    /// Chunks a verifying switch-over found unchanged after the resume (sent as SAME).
    pub unchanged_chunks: u64,
    /// A hashing source's verification as it ran (`None` without `hash_sent`, and in
    /// post-copy mode, which sends every chunk after the resume and verifies none).
    pub verify: Option<Verify>,
    /// The destination's fault statistics.
    pub faults: u64,
    pub fault_p50: Duration,
    pub fault_p99: Duration,
    pub reconnects: u32,
}

/// How a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Before the commit: the destination never took over; the source store is unchanged and
    /// the application was resumed (if it had been suspended).
    #[error("migration aborted, the source continues unchanged: {}", .0.chain())]
    Aborted(StoreError),
    /// Before the commit, and resuming the application failed too.
    #[error("migration aborted ({}), and resuming the application failed: {}", .0.chain(), .1.chain())]
    ResumeFailed(StoreError, StoreError),
    /// After the commit: the destination may run; the source keeps every chunk (its store is
    /// untouched) and leaves the application suspended.
    #[error(
        "migration failed after the commit (the destination may be running; the source keeps \
         every chunk and stays suspended): {}",
        .0.chain()
    )]
    AfterCommit(StoreError),
}

fn err(m: impl Into<String>) -> StoreError {
    StoreError::backend(m.into())
}

fn new_session() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

struct Link {
    ctl_r: BoxRead,
    ctl_w: BufWriter<BoxWrite>,
}

/// Read chunk `i`: `None` if it is all zeros.
async fn read_chunk(src: &DynStore, layout: Layout, i: u64) -> Result<Option<Bytes>> {
    let (off, len) = layout.chunk(i);
    let mut buf = vec![0u8; len as usize];
    src.read(off, &mut buf)
        .await
        .map_err(|e| e.context(format!("reading chunk {i}")))?;
    Ok((!is_zero(&buf)).then(|| Bytes::from(buf)))
}

/// Write one bulk frame; a write that makes no progress for `limit` is a stalled destination.
async fn put(
    w: &mut BufWriter<BoxWrite>,
    m: &Msg,
    sent: &AtomicU64,
    limit: Duration,
) -> Result<()> {
    match tokio::time::timeout(limit, write_msg(w, m, sent)).await {
        Ok(r) => r.map_err(|e| StoreError::backend_with("sending on the bulk connection", e)),
        Err(_) => Err(err(format!(
            "the bulk connection took no data for {limit:?} (destination stalled)"
        ))),
    }
}

/// Largest single read of consecutive chunks in a pass.
const READ_RUN: u64 = 1 << 20;

/// Read chunks `first..first + n` in one call; each is `None` if all zeros.
async fn read_run(
    src: &DynStore,
    layout: Layout,
    first: u64,
    n: u64,
) -> Result<Vec<(u64, Option<Bytes>)>> {
    let (off, _) = layout.chunk(first);
    let (last_off, last_len) = layout.chunk(first + n - 1);
    let mut buf = vec![0u8; (last_off + last_len - off) as usize];
    src.read(off, &mut buf)
        .await
        .map_err(|e| e.context(format!("reading chunks {first}..{}", first + n)))?;
    let buf = Bytes::from(buf);
    Ok((0..n)
        .map(|k| {
            let (o, l) = layout.chunk(first + k);
            let piece = buf.slice((o - off) as usize..(o - off + l) as usize);
            (first + k, (!is_zero(&piece)).then_some(piece))
        })
        .collect())
}

struct Source<'a> {
    src: DynStore,
    changes: Arc<dyn ChangeSource>,
    dialer: &'a Dialer,
    hooks: &'a dyn Hooks,
    cfg: &'a SourceConfig,
    progress: &'a dyn Progress,
    layout: Layout,
    session: u64,
    sent: Arc<AtomicU64>,
    received: AtomicU64,
    data_chunks: u64,
    zero_chunks: u64,
    /// The bulk connection carries CHUNK_LZ4 (granted in its WELCOME).
    lz4: Arc<AtomicBool>,
    /// The destination can keep chunks (SAME): the switch-over verifies after the resume
    /// instead of scanning for changes while the application is suspended.
    verify: AtomicBool,
    /// The digest of what was last sent of each chunk (when verifying).
    digests: Arc<Mutex<Vec<Digest>>>,
}

/// What to send for chunk `index` (read as `data`, `None` for zeros): SAME if `check` holds
/// its digest (what the destination has), else the chunk.
fn answer(
    index: u64,
    data: Option<Bytes>,
    layout: Layout,
    check: Option<&Mutex<Vec<Digest>>>,
    lz4: bool,
) -> Msg {
    // Hashed only when verifying (the digests are kept): a plain post-copy answer must not pay
    // a BLAKE3 of every chunk on the urgent path.
    if let Some(want) = check.and_then(|c| c.lock().get(index as usize).copied()) {
        let now = match &data {
            Some(b) => chunk_digest(b),
            None => layout.zero_digest(index),
        };
        if now == want {
            return Msg::Same {
                first: index,
                count: 1,
            };
        }
    }
    match data {
        Some(d) => data_msg(index, d, lz4),
        None => Msg::Zero {
            first: index,
            count: 1,
        },
    }
}

/// A data chunk's frame: LZ4 if granted and worth it.
fn data_msg(index: u64, data: Bytes, lz4: bool) -> Msg {
    match lz4.then(|| compress_chunk(&data)).flatten() {
        Some(data) => Msg::ChunkLz4 { index, data },
        None => Msg::Chunk { index, data },
    }
}

/// Migrate `src` to the destination `dialer` reaches. `changes` must report every write to
/// `src` made after this call starts (a [`Tracked`](memsync_sync::Tracked) layer the
/// application writes through, or a [`Rescan`](memsync_sync::Rescan) with `hash_sent`); the
/// hooks suspend the application before the last copy and resume it if the migration aborts.
pub async fn migrate(
    src: DynStore,
    changes: Arc<dyn ChangeSource>,
    dialer: &Dialer,
    hooks: &dyn Hooks,
    cfg: &SourceConfig,
    progress: &dyn Progress,
) -> std::result::Result<Report, MigrateError> {
    let layout = Layout::new(src.size(), cfg.chunk_size).map_err(MigrateError::Aborted)?;
    let mut s = Source {
        src,
        changes,
        dialer,
        hooks,
        cfg,
        progress,
        layout,
        session: new_session(),
        sent: Arc::new(AtomicU64::new(0)),
        received: AtomicU64::new(0),
        data_chunks: 0,
        zero_chunks: 0,
        lz4: Arc::new(AtomicBool::new(false)),
        verify: AtomicBool::new(false),
        digests: Arc::new(Mutex::new(Vec::new())),
    };
    s.run().await
}

impl fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({:?} -> {:?})", self.src, self.dialer)
    }
}

impl Source<'_> {
    /// Read one control frame, which must come within `reply_timeout`.
    async fn reply(&self, r: &mut BoxRead, what: &str) -> Result<Msg> {
        tokio::time::timeout(
            self.cfg.reply_timeout,
            expect_frame(r, &self.received, what),
        )
        .await
        .map_err(|_| {
            err(format!(
                "no {what} from the destination within {:?}",
                self.cfg.reply_timeout
            ))
        })?
    }

    async fn dial(&self, role: Role, resume: bool) -> Result<(BoxRead, BufWriter<BoxWrite>)> {
        let c = self
            .dialer
            .dial()
            .await
            .map_err(|e| StoreError::backend_with(format!("connecting ({role:?})"), e))?;
        let mut w = BufWriter::with_capacity(256 << 10, c.w);
        let mut r = c.r;
        let want = match role {
            Role::Bulk if self.cfg.compress => FEATURE_LZ4,
            Role::Control
                if self.cfg.hash_sent
                    && self.cfg.verify.unwrap_or(Verify::for_mode(self.cfg.mode))
                        == Verify::AfterResume =>
            {
                FEATURE_VERIFY
            }
            _ => 0,
        };
        let hello = Msg::Hello {
            version: VERSION,
            role,
            session: self.session,
            resume,
            features: want,
        };
        send(&mut w, &hello, &self.sent).await?;
        match self.reply(&mut r, "WELCOME").await? {
            Msg::Welcome { version, features } if version == VERSION => {
                match role {
                    Role::Bulk => self.lz4.store(features & want & FEATURE_LZ4 != 0, Relaxed),
                    Role::Control => self
                        .verify
                        .store(features & want & FEATURE_VERIFY != 0, Relaxed),
                    Role::Urgent => {}
                }
                Ok((r, w))
            }
            m => Err(err(format!("expected WELCOME, got {}", m.name()))),
        }
    }

    async fn run(&mut self) -> std::result::Result<Report, MigrateError> {
        let start = Instant::now();
        let mut suspended = false;
        let mut link = None;
        let r = self.before_commit(&mut suspended, &mut link).await;
        let (mut rep, link, bulk, urgent, needed) = match r {
            Ok(v) => v,
            Err(e) => {
                if let Some(l) = link.as_mut() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        send(&mut l.ctl_w, &Msg::Abort(e.chain()), &self.sent),
                    )
                    .await;
                }
                if suspended && let Err(r) = self.hooks.resume().await {
                    return Err(MigrateError::ResumeFailed(e, r));
                }
                return Err(MigrateError::Aborted(e));
            }
        };
        let t_suspend = rep.1;
        let r = self
            .after_commit(link, bulk, urgent, needed, t_suspend, &mut rep.0)
            .await;
        let mut rep = rep.0;
        r.map_err(MigrateError::AfterCommit)?;
        rep.total = start.elapsed();
        rep.wire_sent = self.sent.load(Relaxed);
        rep.data_chunks = self.data_chunks;
        rep.zero_chunks = self.zero_chunks;
        Ok(rep)
    }

    /// Everything up to and including the COMMIT. Returns the report so far with the time of
    /// the suspend, the connections, and the chunks the destination still needs.
    #[allow(clippy::type_complexity)]
    async fn before_commit(
        &mut self,
        suspended: &mut bool,
        link: &mut Option<Link>,
    ) -> Result<(
        (Report, Instant),
        Link,
        BufWriter<BoxWrite>,
        Option<(BoxRead, BufWriter<BoxWrite>)>,
        ChunkSet,
    )> {
        let cfg = self.cfg;
        let chunks = self.layout.chunks();
        // Writes from here on are in the first dirty set. (A source that compares contents
        // learns its baseline from what the passes send instead.)
        if !cfg.hash_sent {
            self.changes.take_changes().await?;
        }
        let (ctl_r, ctl_w) = self.dial(Role::Control, false).await?;
        let l = link.insert(Link { ctl_r, ctl_w });
        let geo = Msg::Geometry {
            size: self.layout.size,
            chunk_size: self.layout.chunk_size,
        };
        send(&mut l.ctl_w, &geo, &self.sent).await?;
        match self.reply(&mut l.ctl_r, "READY").await? {
            Msg::Ready => {}
            m => return Err(err(format!("expected READY, got {}", m.name()))),
        }
        let (_bulk_r, mut bulk) = self.dial(Role::Bulk, false).await?;
        let verify = self.verify.load(Relaxed) && cfg.mode != Mode::Postcopy;
        if verify {
            *self.digests.lock() = vec![[0u8; 32]; chunks as usize];
        }
        let may_postcopy =
            verify || cfg.mode != Mode::Precopy || cfg.fallback == Fallback::Postcopy;
        let urgent = if may_postcopy {
            Some(self.dial(Role::Urgent, false).await?)
        } else {
            None
        };

        let mut passes: Vec<Pass> = Vec::new();
        let mut dirty = ChunkSet::full(chunks);
        let mut mark = 0u64;
        let mut growing = 0u32;
        let mut throttle = 0.0f64;
        // Auto-converge's one clock, and whether it holds the application now.
        let mut throttled_since: Option<Instant> = None;
        let throttled = AtomicBool::new(false);
        let hooks = self.hooks;
        let reason = loop {
            if cfg.mode == Mode::Postcopy {
                break SwitchReason::Postcopy;
            }
            let t = Instant::now();
            let sent0 = self.sent.load(Relaxed);
            // The bar shows the pass, and how fast the last one saw pages dirtied.
            let name = match passes.last() {
                Some(p) => format!(
                    "pass {} (dirtied {:.0} MB/s)",
                    passes.len() + 1,
                    (p.dirty_after * self.layout.chunk_size) as f64
                        / p.elapsed.as_secs_f64().max(1e-6)
                        / 1e6
                ),
                None => "pass 1".to_owned(),
            };
            self.progress
                .phase(&name, dirty.count() * self.layout.chunk_size);
            let n = dirty.count();
            mark += 1;
            let pass = async {
                self.send_set(&mut bulk, &dirty).await?;
                send(&mut bulk, &Msg::Mark { seq: mark }, &self.sent).await?;
                let l = link.as_mut().ok_or_else(|| err("no control connection"))?;
                match self.reply(&mut l.ctl_r, "RECEIVED").await? {
                    Msg::Received { seq } if seq == mark => {}
                    m => return Err(err(format!("expected RECEIVED {mark}, got {m:?}"))),
                }
                let elapsed = t.elapsed();
                // Taken while a throttled application is still held.
                Ok((elapsed, self.take_dirty().await?))
            };
            let r = match (cfg.auto_converge, throttle) {
                (Some(t), share) if share > 0.0 => {
                    let origin = *throttled_since.get_or_insert_with(Instant::now);
                    tokio::select! {
                        r = pass => r,
                        e = duty_cycle(hooks, t, share, &throttled, origin) => Err(e),
                    }
                }
                _ => pass.await,
            };
            let (elapsed, next) = match r {
                Ok(v) => v,
                Err(e) => {
                    resume_throttled(hooks, &throttled).await?;
                    return Err(e);
                }
            };
            let wire = self.sent.load(Relaxed) - sent0;
            dirty = next;
            let prev = passes.last().map(|p| p.dirty_after);
            passes.push(Pass {
                chunks: n,
                wire_bytes: wire,
                elapsed,
                dirty_after: dirty.count(),
                throttle_percent: (throttle * 100.0).round() as u32,
            });
            // Bytes per second this pass achieved (the full round trip of its mark included).
            let bw = wire as f64 / elapsed.as_secs_f64().max(1e-6);
            let rest = (dirty.count() * self.layout.chunk_size) as f64;
            let estimate = Duration::from_secs_f64(rest / bw.max(1.0));
            tracing::info!(
                "migrate: pass {} sent {n} chunks in {elapsed:?} ({:.1} MB/s); {} dirty, \
                 estimated stop time {estimate:?}",
                passes.len(),
                bw / 1e6,
                dirty.count()
            );
            if estimate <= cfg.max_downtime {
                break SwitchReason::Converged;
            }
            if cfg.mode == Mode::Hybrid && passes.len() as u32 >= cfg.hybrid_passes.max(1) {
                break SwitchReason::HybridPasses;
            }
            let at_max = match cfg.auto_converge {
                Some(t) if prev.is_some() && dirty.count() * 2 > prev.unwrap_or(0) => {
                    let before = throttle;
                    throttle = if throttle == 0.0 {
                        t.initial
                    } else {
                        (throttle + t.increment).min(t.max)
                    };
                    tracing::info!(
                        "migrate: auto-converge: the application is held {:.0} % of the time",
                        throttle * 100.0
                    );
                    before >= t.max
                }
                Some(_) => throttle >= cfg.auto_converge.map_or(1.0, |t| t.max),
                None => true,
            };
            if at_max && prev.is_some_and(|p| dirty.count() > p) {
                growing += 1;
            }
            if growing >= cfg.max_growing_passes || passes.len() as u32 >= cfg.max_passes {
                break SwitchReason::NotConverged;
            }
        };
        // The switch-over suspends it again and takes what it dirtied meanwhile.
        resume_throttled(hooks, &throttled).await?;
        // Verifying: the rest goes as post-copy, each chunk SAME or sent again.
        let postcopy = verify
            || match reason {
                SwitchReason::Postcopy | SwitchReason::HybridPasses => true,
                SwitchReason::Converged => cfg.mode == Mode::Hybrid && !dirty.is_empty(),
                SwitchReason::NotConverged => cfg.fallback == Fallback::Postcopy,
            };

        // A post-copy after passes: the destination drops its stale copies of what is dirty
        // now while the application still runs here; the downtime then drops only the chunks
        // dirtied since.
        let early = if postcopy && cfg.mode != Mode::Postcopy && !dirty.is_empty() {
            let l = link.as_mut().ok_or_else(|| err("no control connection"))?;
            for seg in dirty.segments() {
                write_msg(&mut l.ctl_w, &Msg::Dirty(seg), &self.sent)
                    .await
                    .map_err(|e| StoreError::backend_with("sending DIRTY", e))?;
            }
            send(&mut l.ctl_w, &Msg::Evict, &self.sent).await?;
            match self.reply(&mut l.ctl_r, "EVICTED").await? {
                Msg::Evicted => {}
                m => return Err(err(format!("expected EVICTED, got {}", m.name()))),
            }
            Some(dirty.clone())
        } else {
            None
        };

        // Switch-over.
        let t_suspend = Instant::now();
        // Marked first: a suspend that fails half way (SIGSTOP sent, the wait timed out) is
        // resumed by the abort.
        *suspended = true;
        self.hooks
            .suspend()
            .await
            .map_err(|e| e.context("suspending the application"))?;
        if verify {
            // Hashing the region to find what changed would keep the application suspended
            // (1.3 s/GiB in a debug build): every chunk is checked after the resume instead.
            dirty = ChunkSet::full(chunks);
        } else if cfg.mode != Mode::Postcopy {
            dirty.union_with(&self.take_dirty().await?);
        }
        let remaining = dirty.count();
        let l = link.as_mut().ok_or_else(|| err("no control connection"))?;
        if postcopy {
            // The destination keeps what the early DIRTY segments named.
            let fresh = match &early {
                Some(e) => {
                    let mut f = dirty.clone();
                    f.subtract(e);
                    f
                }
                None => dirty.clone(),
            };
            for seg in fresh.segments() {
                write_msg(&mut l.ctl_w, &Msg::Dirty(seg), &self.sent)
                    .await
                    .map_err(|e| StoreError::backend_with("sending DIRTY", e))?;
            }
        } else {
            self.progress
                .phase("stop-and-copy", remaining * self.layout.chunk_size);
            self.send_set(&mut bulk, &dirty).await?;
        }
        mark += 1;
        send(&mut bulk, &Msg::Mark { seq: mark }, &self.sent).await?;
        let l = link.as_mut().ok_or_else(|| err("no control connection"))?;
        send(
            &mut l.ctl_w,
            &Msg::Switchover { mark, postcopy },
            &self.sent,
        )
        .await?;
        loop {
            match self.reply(&mut l.ctl_r, "SWITCHED").await? {
                Msg::Received { seq } if seq <= mark => {}
                Msg::Switched => break,
                m => return Err(err(format!("expected SWITCHED, got {}", m.name()))),
            }
        }
        tracing::debug!(
            "migrate: switched {:?} after the suspend",
            t_suspend.elapsed()
        );
        // The urgent connection stays open in a stop-and-copy too: the destination takes its
        // close before the commit for a failure and would abort.
        let needed = if postcopy {
            dirty
        } else {
            ChunkSet::new(chunks)
        };
        let rep = Report {
            mode: cfg.mode,
            size: self.layout.size,
            chunk_size: self.layout.chunk_size,
            passes,
            reason,
            postcopy,
            remaining_chunks: remaining,
            downtime: Duration::ZERO,
            total: Duration::ZERO,
            wire_sent: 0,
            data_chunks: 0,
            zero_chunks: 0,
            urgent_served: 0,
            unchanged_chunks: 0,
            verify: (cfg.hash_sent && cfg.mode != Mode::Postcopy).then_some(if verify {
                Verify::AfterResume
            } else {
                Verify::Suspended
            }),
            faults: 0,
            fault_p50: Duration::ZERO,
            fault_p99: Duration::ZERO,
            reconnects: 0,
        };
        let link = link.take().ok_or_else(|| err("no control connection"))?;
        Ok(((rep, t_suspend), link, bulk, urgent, needed))
    }

    async fn take_dirty(&self) -> Result<ChunkSet> {
        let mut s = ChunkSet::new(self.layout.chunks());
        for r in self.changes.take_changes().await? {
            if r.end <= r.start {
                continue;
            }
            let first = r.start / self.layout.chunk_size;
            let last = (r.end - 1) / self.layout.chunk_size;
            for i in first..=last {
                s.insert(i);
            }
        }
        Ok(s)
    }

    /// Send every chunk of `set` on `w` (zero runs as ZERO), reading `read_ahead` at once.
    async fn send_set(&mut self, w: &mut BufWriter<BoxWrite>, set: &ChunkSet) -> Result<()> {
        let (src, layout, hash) = (self.src.clone(), self.layout, self.cfg.hash_sent);
        let changes = self.changes.clone();
        // Consecutive chunks are read together (up to READ_RUN bytes), so that small chunks
        // (the 4 KiB default matches the tracking grain) cost few store calls.
        let per_read = (READ_RUN / layout.chunk_size).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in set.iter() {
            match runs.last_mut() {
                Some((f, n)) if *f + *n == i && *n < per_read => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        let mut reads = futures_util::stream::iter(runs)
            .map(|(first, n)| {
                let src = src.clone();
                async move { read_run(&src, layout, first, n).await }
            })
            .buffered(self.cfg.read_ahead.max(1))
            .map(|r| match r {
                Ok(v) => futures_util::stream::iter(v.into_iter().map(Ok).collect::<Vec<_>>()),
                Err(e) => futures_util::stream::iter(vec![Err(e)]),
            })
            .flatten();
        let mut zeros: Option<(u64, u32)> = None;
        let limit = self.cfg.reply_timeout;
        while let Some(r) = reads.next().await {
            let (i, d) = r?;
            if hash {
                let dig = match &d {
                    Some(b) => chunk_digest(b),
                    None => layout.zero_digest(i),
                };
                changes.pushed(layout, i, &[dig]);
                if let Some(d) = self.digests.lock().get_mut(i as usize) {
                    *d = dig;
                }
            }
            self.progress.inc(layout.chunk(i).1);
            match d {
                None => {
                    self.zero_chunks += 1;
                    zeros = match zeros {
                        Some((f, n)) if f + n as u64 == i && n < MAX_ZERO_RUN => Some((f, n + 1)),
                        Some((first, count)) => {
                            put(w, &Msg::Zero { first, count }, &self.sent, limit).await?;
                            Some((i, 1))
                        }
                        None => Some((i, 1)),
                    };
                }
                Some(data) => {
                    self.data_chunks += 1;
                    if let Some((first, count)) = zeros.take() {
                        put(w, &Msg::Zero { first, count }, &self.sent, limit).await?;
                    }
                    let m = data_msg(i, data, self.lz4.load(Relaxed));
                    put(w, &m, &self.sent, limit).await?;
                }
            }
        }
        if let Some((first, count)) = zeros {
            put(w, &Msg::Zero { first, count }, &self.sent, limit).await?;
        }
        Ok(())
    }

    /// After the commit: wait for the destination to hold every chunk (post-copy: serve urgent
    /// requests first and stream the rest), reconnecting after a cut.
    async fn after_commit(
        &mut self,
        mut link: Link,
        bulk: BufWriter<BoxWrite>,
        urgent: Option<(BoxRead, BufWriter<BoxWrite>)>,
        needed: ChunkSet,
        t_suspend: Instant,
        rep: &mut Report,
    ) -> Result<()> {
        let post = Arc::new(Post {
            needed: Mutex::new(needed),
            cursor: AtomicU64::new(0),
            wake: Notify::new(),
            served: AtomicU64::new(0),
            data: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            same: AtomicU64::new(0),
        });
        // The urgent server runs before the COMMIT: the destination resumes its application
        // when COMMIT arrives, and a fault it takes at once must not wait until this side has
        // read RESUMED (a round trip, and the first fault's whole latency when this side is
        // slow to be scheduled).
        let (lost_tx, lost_rx) = mpsc::unbounded_channel::<String>();
        let early = Tasks(
            urgent
                .map(|(r, w)| self.spawn_urgent(r, w, post.clone(), lost_tx.clone()))
                .into_iter()
                .collect(),
        );
        let mut first = Some((bulk, early, lost_tx, lost_rx));
        // The commit point: from here on the source never resumes the application, even if
        // sending COMMIT fails (its bytes may have arrived); recovery finds out.
        if let Err(e) = send(&mut link.ctl_w, &Msg::Commit, &self.sent).await {
            tracing::warn!("migrate: sending COMMIT: {}", e.chain());
        }
        // RESUMED: the downtime ends.
        match self.reply(&mut link.ctl_r, "RESUMED").await {
            Ok(Msg::Resumed) => {}
            Ok(m) => return Err(err(format!("expected RESUMED, got {}", m.name()))),
            // The destination may have resumed; recovery tells.
            Err(e) => tracing::warn!("migrate: waiting for RESUMED: {}", e.chain()),
        }
        rep.downtime = t_suspend.elapsed();
        tracing::debug!(
            "migrate: downtime {:?} ({} chunks left for post-copy)",
            rep.downtime,
            post.needed.lock().count()
        );
        self.progress.phase(
            "post-copy",
            post.needed.lock().count() * self.layout.chunk_size,
        );
        loop {
            let (bulk, mut tasks, lost_tx, mut lost_rx) = match first.take() {
                Some(c) => c,
                None => {
                    let (l, b, u) = self.reconnect(&post).await?;
                    rep.reconnects += 1;
                    link = l;
                    let (lost_tx, lost_rx) = mpsc::unbounded_channel::<String>();
                    let u = Tasks(
                        u.map(|(r, w)| self.spawn_urgent(r, w, post.clone(), lost_tx.clone()))
                            .into_iter()
                            .collect(),
                    );
                    (b, u, lost_tx, lost_rx)
                }
            };
            tasks
                .0
                .push(self.spawn_background(bulk, post.clone(), lost_tx.clone()));
            let outcome = tokio::select! {
                m = read_frame(&mut link.ctl_r, &self.received) => match m {
                    Ok(Some(Msg::AllReceived { faults, p50_ns, p99_ns })) => {
                        rep.faults = faults;
                        rep.fault_p50 = Duration::from_nanos(p50_ns);
                        rep.fault_p99 = Duration::from_nanos(p99_ns);
                        Ok(())
                    }
                    Ok(Some(Msg::Abort(m))) => return Err(err(format!("the destination aborted: {m}"))),
                    Ok(Some(m)) => return Err(err(format!("expected ALL_RECEIVED, got {}", m.name()))),
                    Ok(None) => Err("the control connection closed".to_owned()),
                    Err(e) => Err(format!("control: {e}")),
                },
                why = lost_rx.recv() => Err(why.unwrap_or_default()),
            };
            match outcome {
                Ok(()) => {
                    rep.urgent_served = post.served.load(Relaxed);
                    rep.unchanged_chunks = post.same.load(Relaxed);
                    self.data_chunks += post.data.load(Relaxed);
                    self.zero_chunks += post.zero.load(Relaxed);
                    // DONE is a courtesy: the destination already holds everything.
                    let _ = send(&mut link.ctl_w, &Msg::Done, &self.sent).await;
                    let _ = link.ctl_w.shutdown().await;
                    return Ok(());
                }
                Err(why) => {
                    tracing::warn!("migrate: {why}; reconnecting");
                }
            }
        }
    }

    /// After a cut: a new control connection, the destination's HELD bitmap, new data
    /// connections; until `recovery_timeout`.
    async fn reconnect(
        &mut self,
        post: &Post,
    ) -> Result<(
        Link,
        BufWriter<BoxWrite>,
        Option<(BoxRead, BufWriter<BoxWrite>)>,
    )> {
        let deadline = Instant::now() + self.cfg.recovery_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.try_reconnect(post).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    last = e.chain();
                    tracing::debug!("migrate: reconnecting: {last}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(err(format!(
            "could not reconnect within {:?}: {last}",
            self.cfg.recovery_timeout
        )))
    }

    async fn try_reconnect(
        &mut self,
        post: &Post,
    ) -> Result<(
        Link,
        BufWriter<BoxWrite>,
        Option<(BoxRead, BufWriter<BoxWrite>)>,
    )> {
        let (mut ctl_r, ctl_w) = self.dial(Role::Control, true).await?;
        let mut held = ChunkSet::new(self.layout.chunks());
        loop {
            match self.reply(&mut ctl_r, "HELD").await? {
                Msg::Held(s) => held.apply(&s).map_err(err)?,
                Msg::HeldEnd { held: n } if n == held.count() => break,
                Msg::HeldEnd { held: n } => {
                    return Err(err(format!(
                        "HELD_END says {n} chunks, the segments {}",
                        held.count()
                    )));
                }
                m => return Err(err(format!("expected HELD, got {}", m.name()))),
            }
        }
        // Everything not held goes again, whatever was sent before the cut.
        *post.needed.lock() = held.complement();
        let (_r, bulk) = self.dial(Role::Bulk, true).await?;
        let urgent = self.dial(Role::Urgent, true).await?;
        Ok((Link { ctl_r, ctl_w }, bulk, Some(urgent)))
    }

    fn spawn_background(
        &self,
        mut w: BufWriter<BoxWrite>,
        post: Arc<Post>,
        lost: mpsc::UnboundedSender<String>,
    ) -> JoinHandle<()> {
        let (src, layout, sent) = (self.src.clone(), self.layout, self.sent.clone());
        let lz4 = self.lz4.clone();
        let digests = self.digests.clone();
        crate::background::spawn(async move {
            loop {
                let next = {
                    let mut n = post.needed.lock();
                    let i = n.next_from(post.cursor.load(Relaxed));
                    if let Some(i) = i {
                        n.remove(i);
                    }
                    i
                };
                let Some(i) = next else {
                    if let Err(e) = w.flush().await {
                        let _ = lost.send(format!("bulk: {e}"));
                        return;
                    }
                    post.wake.notified().await;
                    continue;
                };
                post.cursor.store(i + 1, Relaxed);
                let m = match read_chunk(&src, layout, i).await {
                    Ok(d) => answer(i, d, layout, Some(&digests), lz4.load(Relaxed)),
                    Err(e) => {
                        let _ = lost.send(format!("reading the source: {}", e.chain()));
                        return;
                    }
                };
                post.count(&m);
                if let Err(e) = write_msg(&mut w, &m, &sent).await {
                    let _ = lost.send(format!("bulk: {e}"));
                    return;
                }
            }
        })
    }

    /// Answers each request as soon as it is read, from this task, on the urgent connection;
    /// the background stream then continues after the faulted chunk.
    fn spawn_urgent(
        &self,
        mut r: BoxRead,
        mut w: BufWriter<BoxWrite>,
        post: Arc<Post>,
        lost: mpsc::UnboundedSender<String>,
    ) -> JoinHandle<()> {
        let (src, layout, sent) = (self.src.clone(), self.layout, self.sent.clone());
        let digests = self.digests.clone();
        tokio::spawn(async move {
            let count = AtomicU64::new(0);
            let why = loop {
                let index = match read_frame(&mut r, &count).await {
                    Ok(Some(Msg::Request { index })) if index < layout.chunks() => index,
                    Ok(Some(m)) => {
                        break format!("unexpected {} on the urgent connection", m.name());
                    }
                    Ok(None) => break "the urgent connection closed".to_owned(),
                    Err(e) => break format!("urgent: {e}"),
                };
                let m = match read_chunk(&src, layout, index).await {
                    // Never compressed: a reader waits for it.
                    Ok(d) => answer(index, d, layout, Some(&digests), false),
                    Err(e) => break format!("reading the source: {}", e.chain()),
                };
                post.count(&m);
                if let Err(e) = async {
                    write_msg(&mut w, &m, &sent).await?;
                    w.flush().await
                }
                .await
                {
                    break format!("urgent: {e}");
                }
                post.needed.lock().remove(index);
                post.cursor.store(index + 1, Relaxed);
                post.served.fetch_add(1, Relaxed);
            };
            let _ = lost.send(why);
        })
    }
}

/// The post-copy stream's state, shared by the background and urgent tasks.
struct Post {
    /// Chunks the destination may lack and the background stream has not sent yet.
    needed: Mutex<ChunkSet>,
    /// Where the background stream continues (after the last faulted chunk).
    cursor: AtomicU64,
    wake: Notify,
    served: AtomicU64,
    /// Chunks sent as bytes and as ZERO (both tasks, duplicates included).
    data: AtomicU64,
    zero: AtomicU64,
    /// Chunks a verifying switch-over found unchanged (SAME).
    same: AtomicU64,
}

impl Post {
    fn count(&self, m: &Msg) {
        match m {
            Msg::Chunk { .. } | Msg::ChunkLz4 { .. } => self.data.fetch_add(1, Relaxed),
            Msg::Same { .. } => self.same.fetch_add(1, Relaxed),
            _ => self.zero.fetch_add(1, Relaxed),
        };
    }
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
