//! [`Inject`]: delay, stall and fail calls to a store on command, for tests.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{OpKind, OpSet};
use crate::error::{Result, StoreError};
use crate::store::{Caps, Extent, Store};

/// The error a failing [`InjectRule`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InjectError {
    /// [`StoreError::Injected`] naming the operation.
    #[default]
    Injected,
    /// [`StoreError::Io`] with this OS error number (see [`InjectError::EIO`] and friends).
    Errno(i32),
}

impl InjectError {
    /// Input/output error.
    pub const EIO: InjectError = InjectError::Errno(5);
    /// No space left on device.
    pub const ENOSPC: InjectError = InjectError::Errno(28);
    /// Connection reset by peer.
    pub const ECONNRESET: InjectError = InjectError::Errno(104);
    /// Connection timed out.
    pub const ETIMEDOUT: InjectError = InjectError::Errno(110);

    fn to_error(self, op: OpKind) -> StoreError {
        match self {
            InjectError::Injected => StoreError::Injected { op: op.name() },
            InjectError::Errno(errno) => {
                StoreError::io(op.name(), io::Error::from_raw_os_error(errno))
            }
        }
    }
}

/// What a [`InjectRule`] does to a call it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectAction {
    /// Fail the call (after any delay or stall) with this error, or with the control's default
    /// error if `None`.
    Fail(Option<InjectError>),
    /// Hold the call before it reaches the inner store until
    /// [`InjectControl::release_stalls`] is called or, if given, the timeout passes; then it
    /// proceeds (and may still fail through another rule).
    Stall(Option<Duration>),
}

/// One fault-injection rule: which calls it applies to and what it does to them.
///
/// A rule applies to a call whose kind is in its [`OpSet`] and, if the rule has a byte range,
/// whose range overlaps it (calls without a range, flushes and empty requests, never overlap).
/// Of the calls it applies to, it skips the first [`skip`](Self::skip) ones, then acts with
/// [`probability`](Self::probability), at most [`times`](Self::times) times (then it is removed).
/// Rules are checked in the order added; the first failing rule and the first stalling rule
/// that act on a call decide it, and later rules of the same action don't see the call.
///
/// ```
/// use memsync_core::layers::{InjectError, InjectRule, OpSet};
/// let rule = InjectRule::fail(OpSet::WRITE).in_range(0..4096).skip(2).times(1).error(InjectError::EIO);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct InjectRule {
    ops: OpSet,
    range: Option<Range<u64>>,
    skip: u64,
    times: Option<u64>,
    probability: f64,
    action: InjectAction,
}

impl InjectRule {
    /// A rule failing every call of the given kinds, with the control's default error.
    pub fn fail(ops: impl Into<OpSet>) -> Self {
        InjectRule::new(ops.into(), InjectAction::Fail(None))
    }

    /// A rule stalling every call of the given kinds until released.
    pub fn stall(ops: impl Into<OpSet>) -> Self {
        InjectRule::new(ops.into(), InjectAction::Stall(None))
    }

    fn new(ops: OpSet, action: InjectAction) -> Self {
        InjectRule {
            ops,
            range: None,
            skip: 0,
            times: None,
            probability: 1.0,
            action,
        }
    }

    /// Only calls whose byte range overlaps `range`.
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Let the first `n` calls the rule applies to through untouched.
    pub fn skip(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Act on at most `n` calls, then remove the rule.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Act on each call with probability `p` (0.0..=1.0), drawn from the control's seeded RNG.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        self
    }

    /// Fail with this error (for a failing rule).
    pub fn error(mut self, error: InjectError) -> Self {
        if let InjectAction::Fail(e) = &mut self.action {
            *e = Some(error);
        }
        self
    }

    /// Give up stalling after `timeout` and let the call proceed (for a stalling rule).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        if let InjectAction::Stall(t) = &mut self.action {
            *t = Some(timeout);
        }
        self
    }

    fn applies(&self, op: OpKind, range: Option<(u64, u64)>) -> bool {
        if !self.ops.contains(op) {
            return false;
        }
        match (&self.range, range) {
            (None, _) => true,
            (Some(r), Some((offset, len))) => {
                len > 0 && offset < r.end && offset.saturating_add(len) > r.start
            }
            (Some(_), None) => false,
        }
    }
}

/// Identifies a rule added to a [`InjectControl`], to remove it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// xorshift64*: small, fast, seedable; plenty for deciding which calls fail.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds give unrelated sequences (and never 0).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0.0..1.0`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct State {
    rules: Vec<(RuleId, InjectRule)>,
    next_id: u64,
    delay: [Duration; OpKind::COUNT],
    jitter: [Duration; OpKind::COUNT],
    default_error: InjectError,
    rng: Rng,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped by `release_stalls`; stalled calls wait for it to change.
    release: watch::Sender<u64>,
    calls: [AtomicU64; OpKind::COUNT],
    injected: [AtomicU64; OpKind::COUNT],
    stalled: AtomicU64,
}

/// What one call should go through, decided when it starts.
struct Plan {
    delay: Duration,
    stall: Option<(watch::Receiver<u64>, Option<Duration>)>,
    fail: Option<InjectError>,
}

/// The handle that drives a [`Inject`] layer at run time; cheap to clone and shareable between
/// tasks and between several `Inject` layers.
///
/// All settings apply to calls that start after they are made. The RNG behind
/// [`InjectRule::probability`] and jitter is seeded (default seed 0, see [`seed`](Self::seed)),
/// so a single-threaded test sees the same faults on every run.
#[derive(Clone, Debug)]
pub struct InjectControl(Arc<Shared>);

impl Default for InjectControl {
    fn default() -> Self {
        InjectControl::new()
    }
}

impl InjectControl {
    /// A control with no delays and no rules.
    pub fn new() -> Self {
        InjectControl(Arc::new(Shared {
            state: Mutex::new(State {
                rules: Vec::new(),
                next_id: 0,
                delay: [Duration::ZERO; OpKind::COUNT],
                jitter: [Duration::ZERO; OpKind::COUNT],
                default_error: InjectError::Injected,
                rng: Rng::new(0),
            }),
            release: watch::Sender::new(0),
            calls: Default::default(),
            injected: Default::default(),
            stalled: AtomicU64::new(0),
        }))
    }

    /// Add a rule; it applies to calls that start from now on.
    pub fn add_rule(&self, rule: InjectRule) -> RuleId {
        let mut st = self.0.state.lock();
        let id = RuleId(st.next_id);
        st.next_id += 1;
        st.rules.push((id, rule));
        id
    }

    /// Remove a rule (no-op if it was already removed or used up). Calls it stalled stay
    /// stalled until [`release_stalls`](Self::release_stalls) or their timeout.
    pub fn remove_rule(&self, id: RuleId) {
        self.0.state.lock().rules.retain(|(i, _)| *i != id);
    }

    /// Number of rules in force.
    pub fn rule_count(&self) -> usize {
        self.0.state.lock().rules.len()
    }

    /// Fail the next `n` calls of the given kinds (`n` in total, not per kind).
    pub fn fail_next(&self, ops: impl Into<OpSet>, n: u64) -> RuleId {
        self.add_rule(InjectRule::fail(ops).times(n))
    }

    /// Fail every call of the given kinds until the rule is removed or [`clear`](Self::clear)ed.
    pub fn fail_always(&self, ops: impl Into<OpSet>) -> RuleId {
        self.add_rule(InjectRule::fail(ops))
    }

    /// Fail each call of the given kinds with probability `p`.
    pub fn fail_with_probability(&self, ops: impl Into<OpSet>, p: f64) -> RuleId {
        self.add_rule(InjectRule::fail(ops).probability(p))
    }

    /// Fail every call of the given kinds whose byte range overlaps `range`.
    pub fn fail_range(&self, ops: impl Into<OpSet>, range: Range<u64>) -> RuleId {
        self.add_rule(InjectRule::fail(ops).in_range(range))
    }

    /// Stall every call of the given kinds until [`release_stalls`](Self::release_stalls), or
    /// until `timeout` if given (then the call proceeds).
    pub fn stall(&self, ops: impl Into<OpSet>, timeout: Option<Duration>) -> RuleId {
        let mut rule = InjectRule::stall(ops);
        if let Some(t) = timeout {
            rule = rule.stall_timeout(t);
        }
        self.add_rule(rule)
    }

    /// Remove every stalling rule and let every stalled call proceed.
    pub fn release_stalls(&self) {
        let mut st = self.0.state.lock();
        st.rules
            .retain(|(_, r)| !matches!(r.action, InjectAction::Stall(_)));
        self.0.release.send_modify(|g| *g += 1);
    }

    /// Delay every call of the given kinds by `delay` before it reaches the inner store.
    pub fn set_delay(&self, ops: impl Into<OpSet>, delay: Duration) {
        let mut st = self.0.state.lock();
        for op in ops.into().iter() {
            st.delay[op.index()] = delay;
        }
    }

    /// Add a uniformly random extra delay of up to `jitter` to calls of the given kinds.
    pub fn set_jitter(&self, ops: impl Into<OpSet>, jitter: Duration) {
        let mut st = self.0.state.lock();
        for op in ops.into().iter() {
            st.jitter[op.index()] = jitter;
        }
    }

    /// The error of failing rules that don't choose their own (initially
    /// [`InjectError::Injected`]).
    pub fn set_default_error(&self, error: InjectError) {
        self.0.state.lock().default_error = error;
    }

    /// Restart the RNG behind probabilities and jitter from `seed`.
    pub fn seed(&self, seed: u64) {
        self.0.state.lock().rng = Rng::new(seed);
    }

    /// Remove every rule, delay and jitter, and release stalled calls. Counters are kept.
    pub fn clear(&self) {
        let mut st = self.0.state.lock();
        st.rules.clear();
        st.delay = [Duration::ZERO; OpKind::COUNT];
        st.jitter = [Duration::ZERO; OpKind::COUNT];
        self.0.release.send_modify(|g| *g += 1);
    }

    /// Failures injected so far, of every kind.
    pub fn injected(&self) -> u64 {
        self.0
            .injected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Failures injected so far into calls of one kind.
    pub fn injected_for(&self, op: OpKind) -> u64 {
        self.0.injected[op.index()].load(Ordering::Relaxed)
    }

    /// Calls of one kind that reached the layer so far (failed or not).
    pub fn calls(&self, op: OpKind) -> u64 {
        self.0.calls[op.index()].load(Ordering::Relaxed)
    }

    /// Calls stalled right now.
    pub fn stalled(&self) -> u64 {
        self.0.stalled.load(Ordering::Relaxed)
    }

    /// Wait until at least `n` calls are stalled (polling every millisecond), to line up a test.
    pub async fn wait_stalled(&self, n: u64) {
        while self.stalled() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn plan(&self, op: OpKind, range: Option<(u64, u64)>) -> Plan {
        let mut guard = self.0.state.lock();
        let st = &mut *guard;
        let mut delay = st.delay[op.index()];
        let jitter = st.jitter[op.index()];
        if !jitter.is_zero() {
            delay += jitter.mul_f64(st.rng.next_f64());
        }
        let mut plan = Plan {
            delay,
            stall: None,
            fail: None,
        };
        let mut stall_decided = false;
        for (_, rule) in st.rules.iter_mut() {
            let is_stall = matches!(rule.action, InjectAction::Stall(_));
            if (is_stall && stall_decided)
                || (!is_stall && plan.fail.is_some())
                || !rule.applies(op, range)
            {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if rule.times == Some(0)
                || (rule.probability < 1.0 && st.rng.next_f64() >= rule.probability)
            {
                continue;
            }
            if let Some(t) = &mut rule.times {
                *t -= 1;
            }
            match rule.action {
                InjectAction::Fail(e) => plan.fail = Some(e.unwrap_or(st.default_error)),
                InjectAction::Stall(timeout) => {
                    stall_decided = true;
                    // Subscribed under the lock: a release from now on wakes this call.
                    plan.stall = Some((self.0.release.subscribe(), timeout));
                }
            }
        }
        st.rules.retain(|(_, r)| r.times != Some(0));
        plan
    }

    /// Apply the rules to one call; `Err` if it must fail.
    async fn before(&self, op: OpKind, range: Option<(u64, u64)>) -> Result<()> {
        self.0.calls[op.index()].fetch_add(1, Ordering::Relaxed);
        let plan = self.plan(op, range);
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        if let Some((mut release, timeout)) = plan.stall {
            let _stalled = StallGuard::new(&self.0.stalled);
            match timeout {
                Some(t) => {
                    let _ = tokio::time::timeout(t, release.changed()).await;
                }
                None => {
                    let _ = release.changed().await;
                }
            }
        }
        match plan.fail {
            None => Ok(()),
            Some(error) => {
                self.0.injected[op.index()].fetch_add(1, Ordering::Relaxed);
                let at = match range {
                    Some((offset, len)) => format!("{op} {offset}+{len}"),
                    None => op.name().to_string(),
                };
                Err(error.to_error(op).context(format!("fault layer: {at}")))
            }
        }
    }
}

/// Counts a call as stalled while it exists (also when the call is cancelled while stalled).
struct StallGuard<'a>(&'a AtomicU64);

impl<'a> StallGuard<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        StallGuard(counter)
    }
}

impl Drop for StallGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Delays, stalls and fails calls to the store it wraps, as told by its [`InjectControl`]; for
/// testing how the layers and frontends above cope with slow and failing stores.
///
/// With no rules and no delays it passes every call straight through, capabilities included.
/// Injected errors are [`StoreError::Injected`] (or [`StoreError::Io`] with a chosen errno,
/// see [`InjectError`]) wrapped with the context `"fault layer: OP OFFSET+LEN"`; errors of the
/// inner store pass through unchanged.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use memsync_core::layers::{Inject, InjectError, OpKind, OpSet};
/// use memsync_core::{DynStore, Store, StoreError};
/// # async fn demo(inner: DynStore) {
/// let store = Inject::new(inner);
/// let control = store.control();
/// control.set_delay(OpSet::ALL, Duration::from_millis(2));
/// control.fail_next(OpSet::WRITE, 1);
/// assert!(store.write(0, bytes::Bytes::from_static(b"x")).await.is_err());
/// control.set_default_error(InjectError::ETIMEDOUT);
/// control.fail_always(OpSet::FLUSH);
/// assert_eq!(store.flush().await.unwrap_err().errno(), 110);
/// assert_eq!(control.injected_for(OpKind::Write), 1);
/// control.clear();
/// # }
/// ```
#[derive(Debug)]
pub struct Inject<S> {
    inner: S,
    control: InjectControl,
}

impl<S: Store> Inject<S> {
    /// Wrap `inner` with a new control.
    pub fn new(inner: S) -> Self {
        Inject::with_control(inner, InjectControl::new())
    }

    /// Wrap `inner`, driven by an existing control (shared with other layers).
    pub fn with_control(inner: S, control: InjectControl) -> Self {
        Inject { inner, control }
    }

    /// The control handle.
    pub fn control(&self) -> InjectControl {
        self.control.clone()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwrap the inner store.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

#[async_trait]
impl<S: Store> Store for Inject<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn identity(&self) -> Option<crate::StoreId> {
        self.inner.identity()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.control
            .before(OpKind::Read, Some((offset, buf.len() as u64)))
            .await?;
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.control
            .before(OpKind::Write, Some((offset, data.len() as u64)))
            .await?;
        self.inner.write(offset, data).await
    }

    fn session(&self) -> u64 {
        self.inner.session()
    }

    async fn flush(&self) -> Result<()> {
        self.control.before(OpKind::Flush, None).await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.control
            .before(OpKind::Trim, Some((offset, len)))
            .await?;
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.control
            .before(OpKind::Zero, Some((offset, len)))
            .await?;
        self.inner.write_zeroes(offset, len).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.control
            .before(OpKind::Extents, Some((offset, len)))
            .await?;
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::layers::test_store::VecStore;
    use crate::layers::{Chunked, Stats};
    use crate::store::StoreExt;

    fn store() -> (Inject<VecStore>, InjectControl) {
        let f = Inject::new(VecStore::new(1 << 16, 1));
        let c = f.control();
        (f, c)
    }

    #[tokio::test]
    async fn passes_through_without_rules() {
        let (f, c) = store();
        assert_eq!(f.caps(), f.inner().caps());
        f.write(10, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(&f.read_bytes(10, 3).await.unwrap()[..], b"abc");
        f.flush().await.unwrap();
        f.trim(0, 1).await.unwrap();
        f.write_zeroes(0, 1).await.unwrap();
        f.extents(0, 100).await.unwrap();
        assert_eq!(
            (c.calls(OpKind::Read), c.calls(OpKind::Write), c.injected()),
            (1, 1, 0)
        );
        // Inner errors pass through unchanged.
        assert!(matches!(
            f.read_bytes(1 << 16, 1).await,
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[tokio::test]
    async fn fail_next_counts_down() {
        let (f, c) = store();
        c.fail_next(OpSet::READ | OpSet::WRITE, 2);
        assert!(f.flush().await.is_ok());
        let e = f.read_bytes(0, 1).await.unwrap_err();
        assert!(
            matches!(e.root(), StoreError::Injected { op: "read" }),
            "{e:?}"
        );
        assert_eq!(e.chain(), "fault layer: read 0+1: injected fault in read");
        assert!(f.write(0, Bytes::from_static(b"x")).await.is_err());
        assert!(f.read_bytes(0, 1).await.is_ok());
        assert_eq!(c.rule_count(), 0);
        assert_eq!(
            (
                c.injected(),
                c.injected_for(OpKind::Read),
                c.injected_for(OpKind::Write)
            ),
            (2, 1, 1)
        );
    }

    #[tokio::test]
    async fn fail_always_until_cleared_and_skip() {
        let (f, c) = store();
        let id = c.fail_always(OpSet::FLUSH);
        for _ in 0..5 {
            assert!(f.flush().await.is_err());
        }
        c.remove_rule(id);
        assert!(f.flush().await.is_ok());
        c.add_rule(InjectRule::fail(OpKind::Write).skip(2).times(1));
        let results: Vec<bool> =
            futures_util::future::join_all((0..4).map(|i| f.write(i, Bytes::from_static(b"x"))))
                .await
                .into_iter()
                .map(|r| r.is_ok())
                .collect();
        assert_eq!(results, [true, true, false, true]);
        c.fail_always(OpSet::ALL);
        c.clear();
        assert!(f.read_bytes(0, 1).await.is_ok());
    }

    #[tokio::test]
    async fn errno_errors() {
        let (f, c) = store();
        c.set_default_error(InjectError::EIO);
        c.fail_next(OpSet::READ, 1);
        c.add_rule(
            InjectRule::fail(OpSet::WRITE)
                .error(InjectError::ETIMEDOUT)
                .times(1),
        );
        let e = f.read_bytes(0, 1).await.unwrap_err();
        assert_eq!(e.errno(), 5);
        assert!(matches!(e.root(), StoreError::Io { op: "read", .. }));
        let e = f.write(0, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.errno(), 110);
    }

    #[tokio::test]
    async fn range_rules_only_hit_overlapping_calls() {
        let (f, c) = store();
        c.fail_range(OpSet::ALL, 4096..8192);
        assert!(f.read_bytes(0, 4096).await.is_ok());
        assert!(f.read_bytes(8192, 100).await.is_ok());
        assert!(f.read_bytes(4096, 0).await.is_ok());
        assert!(f.flush().await.is_ok());
        assert!(f.read_bytes(4000, 97).await.is_err());
        assert!(f.write_zeroes(8191, 1).await.is_err());
        assert!(f.trim(0, 1 << 16).await.is_err());
        assert_eq!(c.injected(), 3);
    }

    #[tokio::test]
    async fn probability_is_seeded() {
        async fn pattern(seed: u64) -> Vec<bool> {
            let (f, c) = store();
            c.seed(seed);
            c.fail_with_probability(OpSet::READ, 0.3);
            let mut out = Vec::new();
            for _ in 0..1000 {
                out.push(f.read_bytes(0, 1).await.is_err());
            }
            out
        }
        let a = pattern(7).await;
        assert_eq!(a, pattern(7).await);
        assert_ne!(a, pattern(8).await);
        let failed = a.iter().filter(|x| **x).count();
        assert!(
            (230..370).contains(&failed),
            "{failed} of 1000 failed with p = 0.3"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delays_and_jitter() {
        let (f, c) = store();
        c.set_delay(OpSet::READ, Duration::from_millis(20));
        let t = tokio::time::Instant::now();
        f.read_bytes(0, 1).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(20));
        let t = tokio::time::Instant::now();
        f.write(0, Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
        c.set_jitter(OpSet::READ, Duration::from_millis(100));
        let mut seen = Vec::new();
        for _ in 0..20 {
            let t = tokio::time::Instant::now();
            f.read_bytes(0, 1).await.unwrap();
            let d = t.elapsed();
            assert!(
                d >= Duration::from_millis(20) && d <= Duration::from_millis(121),
                "{d:?}"
            );
            seen.push(d);
        }
        seen.dedup();
        assert!(seen.len() > 5, "jitter varies: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn stall_until_released() {
        let (f, c) = store();
        let f = Arc::new(f);
        c.stall(OpSet::READ, None);
        let task = tokio::spawn({
            let f = f.clone();
            async move { f.read_bytes(0, 1).await }
        });
        c.wait_stalled(1).await;
        // A deadline above the layer fires while the call hangs.
        let e = tokio::time::timeout(Duration::from_secs(5), f.read_bytes(0, 1)).await;
        assert!(e.is_err());
        assert_eq!(c.stalled(), 1, "the timed-out call is no longer counted");
        assert!(
            f.write(0, Bytes::from_static(b"w")).await.is_ok(),
            "other kinds are not stalled"
        );
        assert!(!task.is_finished());
        c.release_stalls();
        assert_eq!(&task.await.unwrap().unwrap()[..], b"w");
        assert_eq!(c.stalled(), 0);
        assert!(
            f.read_bytes(0, 1).await.is_ok(),
            "releasing removes the stall rule"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stall_with_timeout_then_fail() {
        let (f, c) = store();
        c.stall(OpSet::FLUSH, Some(Duration::from_secs(3)));
        c.fail_next(OpSet::FLUSH, 1);
        let t = tokio::time::Instant::now();
        assert!(f.flush().await.is_err());
        assert_eq!(t.elapsed(), Duration::from_secs(3));
        let t = tokio::time::Instant::now();
        assert!(f.flush().await.is_ok());
        assert_eq!(t.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn errors_keep_context_through_a_stack() {
        // Stats over Chunked over Inject over a store that only takes whole 64 KiB chunks.
        let fault = Inject::new(VecStore::new(1 << 20, 65536));
        let control = fault.control();
        let stack = Stats::new(Chunked::new(fault, 65536).unwrap());
        control.set_default_error(InjectError::EIO);
        control.fail_range(OpSet::READ, 786_432..786_433);
        let e = stack.read_bytes(786_000, 1000).await.unwrap_err();
        let chain = e.chain();
        assert!(chain.starts_with("read 786000+1000: "), "{chain}");
        assert!(
            chain.contains("read of chunk 12 (offset 786432)"),
            "{chain}"
        );
        assert!(chain.contains("fault layer: read 786432+65536"), "{chain}");
        assert!(
            matches!(e.root(), StoreError::Io { op: "read", .. }),
            "{e:?}"
        );
        assert_eq!(e.errno(), 5);
        assert_eq!(stack.snapshot()[OpKind::Read].errors, 1);
        assert_eq!(control.injected(), 1);
    }
}
