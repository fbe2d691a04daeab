//! [`Stats`]: count operations, bytes, errors and latencies of any store.

use std::fmt::{self, Write as _};
use std::ops::Index;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{OpKind, is_request_error};
use crate::error::{Result, StoreError};
use crate::store::{Caps, Extent, SharedMemory, Store};

// ---------------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------------

/// Values up to this many nanoseconds get one bucket each.
const LINEAR: u64 = 100;
/// Decades of two-significant-digit buckets after the linear part: 100 ns up to 100 s.
const DECADES: usize = 9;
/// Buckets per decade: the two significant digits 10..=99.
const PER_DECADE: usize = 90;
/// Linear buckets, decade buckets, and one overflow bucket for latencies above 100 s.
const BUCKETS: usize = LINEAR as usize + DECADES * PER_DECADE + 1;
/// Powers of ten, `POW10[k] = 10^k`.
const POW10: [u64; 12] = {
    let mut p = [1u64; 12];
    let mut i = 1;
    while i < 12 {
        p[i] = p[i - 1] * 10;
        i += 1;
    }
    p
};
/// Upper end of the last decade bucket: 100 s.
const TOP: u64 = POW10[11];

/// Bucket `i` holds the nanosecond values in `(lower(i), upper(i)]` (bucket 0 also holds 0).
/// Every bucket boundary is a "round" value with at most two significant digits, so the
/// Prometheus `le` bounds (1, 2 and 5 per decade) count exactly.
fn bucket_of(ns: u64) -> usize {
    let v = ns.saturating_sub(1);
    if v < LINEAR {
        return v as usize;
    }
    if v >= TOP {
        return BUCKETS - 1;
    }
    let mut k = 2;
    while v >= POW10[k + 1] {
        k += 1;
    }
    let digits = (v / POW10[k - 1]) as usize; // 10..=99
    LINEAR as usize + (k - 2) * PER_DECADE + (digits - 10)
}

/// `(lower, upper]` nanosecond bounds of bucket `i`; the overflow bucket's upper bound is
/// `u64::MAX`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < LINEAR as usize {
        return (i as u64, i as u64 + 1);
    }
    if i >= BUCKETS - 1 {
        return (TOP, u64::MAX);
    }
    let j = i - LINEAR as usize;
    let k = j / PER_DECADE + 2;
    let digits = (j % PER_DECADE + 10) as u64;
    let unit = POW10[k - 1];
    (digits * unit, (digits + 1) * unit)
}

/// The `le` bounds, in nanoseconds, of the Prometheus histogram: 1, 2 and 5 per decade from
/// 100 ns to 100 s.
fn prometheus_bounds() -> impl Iterator<Item = u64> {
    (2..=10)
        .flat_map(|k| [1, 2, 5].map(|m| m * POW10[k]))
        .chain([TOP])
}

/// A lock-free latency histogram: atomic counters in log-linear buckets with two significant
/// digits (1 ns resolution below 100 ns, then 10 % wide buckets or narrower up to 100 s, and one
/// overflow bucket), plus the exact count, sum, minimum and maximum.
///
/// [`quantile`](Self::quantile) is within half a bucket (at most 5 % above 100 ns) of the exact
/// quantile of the recorded values. Recording is a handful of relaxed atomic operations, so one
/// histogram can be shared by many threads. Reusable outside [`Stats`], e.g. for page-fault
/// latency:
///
/// ```
/// use std::time::Duration;
/// use memsync_core::layers::LatencyHistogram;
/// let h = LatencyHistogram::new();
/// for us in 1..=100 {
///     h.record(Duration::from_micros(us));
/// }
/// assert_eq!(h.count(), 100);
/// let p50 = h.quantile(0.5);
/// assert!(p50 >= Duration::from_micros(48) && p50 <= Duration::from_micros(52), "{p50:?}");
/// assert_eq!(h.max(), Duration::from_micros(100));
/// let mut text = String::new();
/// h.write_prometheus(&mut text, "fault_latency_seconds", r#"region="a""#);
/// assert!(text.contains(r#"fault_latency_seconds_bucket{region="a",le="0.0001"} 100"#));
/// ```
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .field("mean", &self.mean())
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }

    /// Record one latency.
    pub fn record(&self, latency: Duration) {
        self.record_ns(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Record one latency given in nanoseconds.
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Number of recorded latencies.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the recorded latencies.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Mean latency (zero if empty).
    pub fn mean(&self) -> Duration {
        Duration::from_nanos(
            self.sum_ns
                .load(Ordering::Relaxed)
                .checked_div(self.count())
                .unwrap_or(0),
        )
    }

    /// Smallest recorded latency (zero if empty).
    pub fn min(&self) -> Duration {
        match self.min_ns.load(Ordering::Relaxed) {
            u64::MAX if self.count() == 0 => Duration::ZERO,
            ns => Duration::from_nanos(ns),
        }
    }

    /// Largest recorded latency (zero if empty).
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns.load(Ordering::Relaxed))
    }

    fn load_buckets(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// The latency below which a fraction `q` (0.0..=1.0) of the recorded ones lie: the value of
    /// rank `ceil(q * count)`, estimated as the middle of its bucket, clamped to the recorded
    /// minimum and maximum (so `quantile(1.0)` is the exact maximum). Zero if empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let buckets = self.load_buckets();
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let (min, max) = (
            self.min_ns.load(Ordering::Relaxed),
            self.max_ns.load(Ordering::Relaxed),
        );
        if rank == total {
            return Duration::from_nanos(max);
        }
        let mut seen = 0;
        for (i, n) in buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = bucket_bounds(i);
                let mid = if i >= BUCKETS - 1 {
                    max
                } else {
                    lo + (hi - lo).div_ceil(2)
                };
                return Duration::from_nanos(mid.clamp(min.min(max), max));
            }
        }
        Duration::from_nanos(max)
    }

    /// Add every latency recorded in `other` to this histogram.
    pub fn merge(&self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            let n = theirs.load(Ordering::Relaxed);
            if n != 0 {
                mine.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count
            .fetch_add(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.sum_ns
            .fetch_add(other.sum_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        self.min_ns
            .fetch_min(other.min_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        self.max_ns
            .fetch_max(other.max_ns.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Append this histogram in the Prometheus text format: `NAME_bucket{LABELS,le="..."}` lines
    /// (1, 2 and 5 per decade from 100 ns to 100 s, then `+Inf`), `NAME_sum` in seconds and
    /// `NAME_count`. `labels` is a comma-separated label list without braces (may be empty).
    /// The caller writes the `# HELP`/`# TYPE NAME histogram` lines once per metric family.
    pub fn write_prometheus(&self, out: &mut String, name: &str, labels: &str) {
        let buckets = self.load_buckets();
        let total: u64 = buckets.iter().sum();
        let labels = labels.trim().trim_matches(',');
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        let mut next = 0;
        for bound in prometheus_bounds() {
            // Buckets up to and including the one whose upper bound is `bound`.
            let last = bucket_of(bound);
            cumulative += buckets[next..=last].iter().sum::<u64>();
            next = last + 1;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                seconds(bound)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            seconds(self.sum_ns.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Nanoseconds as exact decimal seconds (`1500` → `0.0000015`).
fn seconds(ns: u64) -> String {
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let frac = format!("{frac:09}");
    format!("{s}.{}", frac.trim_end_matches('0'))
}

// ---------------------------------------------------------------------------------------------
// Stats layer
// ---------------------------------------------------------------------------------------------

/// Counters for one kind of operation.
#[derive(Debug, Default)]
struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    in_flight: AtomicU64,
    latency: LatencyHistogram,
}

#[derive(Debug, Default)]
struct Counters {
    ops: [OpCounters; OpKind::COUNT],
}

/// A shared handle on a [`Stats`] layer's counters; cheap to clone, still usable after the
/// layer has been type-erased into a [`DynStore`](crate::DynStore).
#[derive(Clone, Debug, Default)]
pub struct StatsHandle(Arc<Counters>);

/// Statistics of one kind of operation in a [`StatsSnapshot`]. `Display` gives one line:
/// `read: 12 ops, 48 KiB, 0 errors; latency mean 1.2ms p50 1.0ms p90 2.0ms p99 3.1ms max 3.1ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpStats {
    /// The kind of operation.
    pub op: OpKind,
    /// Calls completed (successfully or not).
    pub ops: u64,
    /// Bytes read, written, trimmed, zeroed or described by extents, in successful calls.
    pub bytes: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Calls abandoned by their caller before completing (their future was dropped).
    pub cancelled: u64,
    /// Calls in progress when the snapshot was taken.
    pub in_flight: u64,
    /// Mean latency of completed calls.
    pub mean: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 90th percentile latency.
    pub p90: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Largest latency.
    pub max: Duration,
}

impl OpStats {
    fn empty(op: OpKind) -> Self {
        OpStats {
            op,
            ops: 0,
            bytes: 0,
            errors: 0,
            cancelled: 0,
            in_flight: 0,
            mean: Duration::ZERO,
            p50: Duration::ZERO,
            p90: Duration::ZERO,
            p99: Duration::ZERO,
            max: Duration::ZERO,
        }
    }

    /// Any call of this kind was seen (completed, cancelled or in flight).
    pub fn is_used(&self) -> bool {
        self.ops + self.cancelled + self.in_flight > 0
    }
}

impl fmt::Display for OpStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ops, {}, {} errors",
            self.op,
            self.ops,
            crate::size::format_size(self.bytes),
            self.errors
        )?;
        if self.cancelled > 0 {
            write!(f, ", {} cancelled", self.cancelled)?;
        }
        if self.in_flight > 0 {
            write!(f, ", {} in flight", self.in_flight)?;
        }
        write!(
            f,
            "; latency mean {:.1?} p50 {:.1?} p90 {:.1?} p99 {:.1?} max {:.1?}",
            self.mean, self.p50, self.p90, self.p99, self.max
        )
    }
}

/// A point-in-time copy of a [`Stats`] layer's counters, indexed by [`OpKind`]:
/// `snapshot[OpKind::Read].ops`. `Display` prints one line per kind of operation used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    per_op: [OpStats; OpKind::COUNT],
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            per_op: OpKind::ALL.map(OpStats::empty),
        }
    }
}

impl StatsSnapshot {
    /// Statistics of one kind of operation.
    pub fn get(&self, op: OpKind) -> &OpStats {
        &self.per_op[op.index()]
    }

    /// The statistics of every kind, in [`OpKind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = &OpStats> {
        self.per_op.iter()
    }

    /// The statistics of the kinds that were used ([`OpStats::is_used`]).
    pub fn ops(&self) -> impl Iterator<Item = &OpStats> {
        self.per_op.iter().filter(|s| s.is_used())
    }

    /// Calls completed, of every kind.
    pub fn total_ops(&self) -> u64 {
        self.per_op.iter().map(|s| s.ops).sum()
    }

    /// Errors, of every kind.
    pub fn total_errors(&self) -> u64 {
        self.per_op.iter().map(|s| s.errors).sum()
    }
}

impl Index<OpKind> for StatsSnapshot {
    type Output = OpStats;
    fn index(&self, op: OpKind) -> &OpStats {
        self.get(op)
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in self.ops() {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

impl StatsHandle {
    /// Fresh, zeroed counters.
    pub fn new() -> Self {
        StatsHandle::default()
    }

    /// The latency histogram of one kind of operation.
    pub fn latency(&self, op: OpKind) -> &LatencyHistogram {
        &self.0.ops[op.index()].latency
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snap = StatsSnapshot::default();
        for (c, s) in self.0.ops.iter().zip(snap.per_op.iter_mut()) {
            *s = OpStats {
                op: s.op,
                ops: c.ops.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                cancelled: c.cancelled.load(Ordering::Relaxed),
                in_flight: c.in_flight.load(Ordering::Relaxed),
                mean: c.latency.mean(),
                p50: c.latency.quantile(0.5),
                p90: c.latency.quantile(0.9),
                p99: c.latency.quantile(0.99),
                max: c.latency.max(),
            };
        }
        snap
    }

    /// The counters in the Prometheus text exposition format: counters `PREFIX_ops_total`,
    /// `PREFIX_bytes_total`, `PREFIX_errors_total` and `PREFIX_cancelled_total`, the gauge
    /// `PREFIX_in_flight`, and the histogram `PREFIX_latency_seconds`, each with an `op` label
    /// after `labels` (a comma-separated list such as `store="cache"`, or empty).
    pub fn render_prometheus(&self, prefix: &str, labels: &str) -> String {
        let labels = labels.trim().trim_matches(',');
        let sep = if labels.is_empty() { "" } else { "," };
        let mut out = String::new();
        type Field = fn(&OpCounters) -> &AtomicU64;
        let families: [(&str, &str, &str, Field); 5] = [
            ("ops_total", "counter", "Store operations completed.", |c| {
                &c.ops
            }),
            (
                "bytes_total",
                "counter",
                "Bytes moved by successful store operations.",
                |c| &c.bytes,
            ),
            (
                "errors_total",
                "counter",
                "Store operations that failed.",
                |c| &c.errors,
            ),
            (
                "cancelled_total",
                "counter",
                "Store operations abandoned before completing.",
                |c| &c.cancelled,
            ),
            ("in_flight", "gauge", "Store operations in progress.", |c| {
                &c.in_flight
            }),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(out, "# HELP {prefix}_{name} {help}");
            let _ = writeln!(out, "# TYPE {prefix}_{name} {kind}");
            for op in OpKind::ALL {
                let v = field(&self.0.ops[op.index()]).load(Ordering::Relaxed);
                let _ = writeln!(out, "{prefix}_{name}{{{labels}{sep}op=\"{op}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP {prefix}_latency_seconds Store operation latency."
        );
        let _ = writeln!(out, "# TYPE {prefix}_latency_seconds histogram");
        for op in OpKind::ALL {
            let op_labels = format!("{labels}{sep}op=\"{op}\"");
            self.latency(op).write_prometheus(
                &mut out,
                &format!("{prefix}_latency_seconds"),
                &op_labels,
            );
        }
        out
    }

    /// Start timing one call; the returned guard records it when finished or dropped.
    fn start(&self, op: OpKind) -> Timing<'_> {
        let c = &self.0.ops[op.index()];
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        Timing {
            c,
            start: Instant::now(),
            done: false,
        }
    }
}

/// Records one call; counts it as cancelled if dropped before [`Timing::finish`].
struct Timing<'a> {
    c: &'a OpCounters,
    start: Instant,
    done: bool,
}

impl Timing<'_> {
    fn finish<T>(mut self, result: &Result<T>, bytes: u64) {
        self.c.latency.record(self.start.elapsed());
        self.c.ops.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => self.c.bytes.fetch_add(bytes, Ordering::Relaxed),
            Err(_) => self.c.errors.fetch_add(1, Ordering::Relaxed),
        };
        self.done = true;
    }

    /// The call did not happen after all: neither counted nor cancelled.
    fn discard(mut self) {
        self.done = true;
    }
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        self.c.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done {
            self.c.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts the operations, bytes and errors of the store it wraps, with a latency histogram per
/// kind of operation. Everything else passes through unchanged, including the capabilities.
///
/// Counters are lock-free; read them with [`snapshot`](Self::snapshot) or
/// [`render_prometheus`](Self::render_prometheus), or keep a [`StatsHandle`] (from
/// [`handle`](Self::handle)) to read them after the layer has been moved into a `DynStore`.
/// Latencies are measured with [`tokio::time::Instant`], so tests with paused time see exact
/// values.
///
/// Failures from below (but not errors about the request itself, such as
/// [`StoreError::OutOfRange`]) get context naming the call, e.g. `"read 4096+512"`.
///
/// # Example
/// ```no_run
/// use memsync_core::layers::{OpKind, Stats};
/// use memsync_core::{DynStore, StoreExt};
/// # async fn demo(inner: DynStore) -> memsync_core::Result<()> {
/// let store = Stats::new(inner);
/// store.read_bytes(0, 4096).await?;
/// let snap = store.snapshot();
/// assert_eq!((snap[OpKind::Read].ops, snap[OpKind::Read].bytes), (1, 4096));
/// println!("p99 read latency: {:?}", snap[OpKind::Read].p99);
/// print!("{}", store.render_prometheus("memsync_store", r#"store="disk""#));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Stats<S> {
    inner: S,
    handle: StatsHandle,
}

impl<S: Store> Stats<S> {
    /// Wrap `inner` with fresh counters.
    pub fn new(inner: S) -> Self {
        Stats::with_handle(inner, StatsHandle::new())
    }

    /// Wrap `inner`, counting into an existing handle (to aggregate several stores).
    pub fn with_handle(inner: S, handle: StatsHandle) -> Self {
        Stats { inner, handle }
    }

    /// A handle on the counters.
    pub fn handle(&self) -> StatsHandle {
        self.handle.clone()
    }

    /// See [`StatsHandle::snapshot`].
    pub fn snapshot(&self) -> StatsSnapshot {
        self.handle.snapshot()
    }

    /// See [`StatsHandle::render_prometheus`].
    pub fn render_prometheus(&self, prefix: &str, labels: &str) -> String {
        self.handle.render_prometheus(prefix, labels)
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

/// Add context naming the call, unless the error is about the request itself.
fn ctx(op: OpKind, range: Option<(u64, u64)>) -> impl FnOnce(StoreError) -> StoreError {
    move |e| {
        if is_request_error(&e) {
            return e;
        }
        match range {
            Some((offset, len)) => e.context(format!("{op} {offset}+{len}")),
            None => e.context(op.name()),
        }
    }
}

#[async_trait]
impl<S: Store> Store for Stats<S> {
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
        let len = buf.len() as u64;
        let t = self.handle.start(OpKind::Read);
        let r = self.inner.read(offset, buf).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Read, Some((offset, len))))
    }

    async fn read_shared(&self, offset: u64, len: u64) -> Option<Result<Vec<Bytes>>> {
        // Counted as a read only if the inner store takes it: otherwise the caller's `read`
        // that follows is the one counted.
        let t = self.handle.start(OpKind::Read);
        let Some(r) = self.inner.read_shared(offset, len).await else {
            t.discard();
            return None;
        };
        t.finish(&r, len);
        Some(r.map_err(ctx(OpKind::Read, Some((offset, len)))))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let t = self.handle.start(OpKind::Write);
        let r = self.inner.write(offset, data).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Write, Some((offset, len))))
    }

    fn session(&self) -> u64 {
        self.inner.session()
    }

    async fn flush(&self) -> Result<()> {
        let t = self.handle.start(OpKind::Flush);
        let r = self.inner.flush().await;
        t.finish(&r, 0);
        r.map_err(ctx(OpKind::Flush, None))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.handle.start(OpKind::Trim);
        let r = self.inner.trim(offset, len).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Trim, Some((offset, len))))
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.handle.start(OpKind::Zero);
        let r = self.inner.write_zeroes(offset, len).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Zero, Some((offset, len))))
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let t = self.handle.start(OpKind::Extents);
        let r = self.inner.extents(offset, len).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Extents, Some((offset, len))))
    }

    /// Passed on: counting changes no byte, and a region mapping the store's memory still
    /// shows up here, its `make_resident` calls counted as reads of their bytes.
    fn shared_memory(&self) -> Option<SharedMemory> {
        self.inner.shared_memory()
    }

    async fn make_resident(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.handle.start(OpKind::Read);
        let r = self.inner.make_resident(offset, len).await;
        t.finish(&r, len);
        r.map_err(ctx(OpKind::Read, Some((offset, len))))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::layers::test_store::VecStore;
    use crate::layers::{Inject, OpSet};
    use crate::store::StoreExt;

    /// A store with shared memory (a temporary file) whose `make_resident` is counted.
    #[derive(Debug)]
    struct Resident(Arc<std::fs::File>, std::sync::atomic::AtomicU64);

    #[async_trait]
    impl Store for Resident {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn caps(&self) -> Caps {
            Caps::basic()
        }
        async fn read(&self, _: u64, _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        async fn write(&self, _: u64, _: Bytes) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn shared_memory(&self) -> Option<SharedMemory> {
            Some(SharedMemory {
                file: Arc::clone(&self.0),
                offset: 0,
                writable: true,
            })
        }
        async fn make_resident(&self, _: u64, len: u64) -> Result<()> {
            self.1.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
    }

    #[tokio::test]
    async fn shared_memory_is_passed_on_and_make_resident_counted_as_a_read() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let s = Stats::new(Resident(Arc::clone(&file), Default::default()));
        let m = s.shared_memory().expect("passed on");
        assert!(Arc::ptr_eq(&m.file, &file) && m.writable);
        s.make_resident(4096, 8192).await.unwrap();
        assert_eq!(s.inner().1.load(Ordering::Relaxed), 8192);
        let r = s.snapshot();
        assert_eq!(
            (r.get(OpKind::Read).ops, r.get(OpKind::Read).bytes),
            (1, 8192)
        );
    }

    #[test]
    fn buckets_tile_the_range() {
        let mut prev_hi = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i}");
            assert!(hi > lo);
            if i > 0 {
                assert_eq!(bucket_of(lo + 1), i, "bucket {i} lower edge");
            }
            if hi != u64::MAX {
                assert_eq!(bucket_of(hi), i, "bucket {i} upper edge");
                // Two significant digits: at most 10 % wide above the linear part.
                assert!(i < LINEAR as usize || (hi - lo) * 10 <= lo, "bucket {i}");
            }
            prev_hi = hi;
        }
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_bounds(BUCKETS - 2).1, TOP);
        for b in prometheus_bounds() {
            assert_eq!(
                bucket_bounds(bucket_of(b)).1,
                b,
                "le bound {b} is a bucket boundary"
            );
        }
    }

    #[test]
    fn seconds_are_exact() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(100), "0.0000001");
        assert_eq!(seconds(2_500_000_000), "2.5");
        assert_eq!(seconds(100_000_000_000), "100");
    }

    #[test]
    fn empty_and_extreme_histograms() {
        let h = LatencyHistogram::new();
        assert_eq!(
            (h.count(), h.quantile(0.5), h.max(), h.min(), h.mean()),
            (
                0,
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO
            )
        );
        h.record(Duration::from_secs(1000));
        h.record(Duration::ZERO);
        assert_eq!(h.quantile(1.0), Duration::from_secs(1000));
        // 0 and 1 ns share the first bucket.
        assert!(h.quantile(0.0) <= Duration::from_nanos(1));
        assert!(h.quantile(f64::NAN) <= Duration::from_nanos(1));
        assert_eq!(h.min(), Duration::ZERO);
        h.record(Duration::MAX);
        assert_eq!(h.max(), Duration::from_nanos(u64::MAX));
    }

    fn sample() -> impl Strategy<Value = u64> {
        // Log-uniform from 0 to ~2 * 10^11 ns, so every decade and the overflow get hits.
        (0u32..38, any::<u64>()).prop_map(|(bits, r)| {
            if bits == 0 {
                0
            } else {
                (r >> (64 - bits)) | (1 << (bits - 1))
            }
        })
    }

    proptest! {
        #[test]
        fn quantiles_within_bucket_error(
            values in prop::collection::vec(sample(), 1..400),
            qs in prop::collection::vec(0.0f64..=1.0, 1..8),
        ) {
            let h = LatencyHistogram::new();
            for v in &values {
                h.record_ns(*v);
            }
            let mut sorted = values.clone();
            sorted.sort_unstable();
            prop_assert_eq!(h.count(), values.len() as u64);
            prop_assert_eq!(h.max(), Duration::from_nanos(*sorted.last().unwrap()));
            prop_assert_eq!(h.min(), Duration::from_nanos(sorted[0]));
            for q in qs.into_iter().chain([0.0, 0.5, 0.9, 0.99, 1.0]) {
                let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                let exact = sorted[rank - 1];
                let est = h.quantile(q).as_nanos() as u64;
                let (lo, hi) = bucket_bounds(bucket_of(exact));
                if hi == u64::MAX {
                    prop_assert!(est > lo, "q {}: {} vs {}", q, est, exact);
                } else {
                    prop_assert!(est.abs_diff(exact) <= (hi - lo).div_ceil(2), "q {}: estimate {} exact {}", q, est, exact);
                }
                if (LINEAR..TOP).contains(&exact) {
                    prop_assert!(est.abs_diff(exact) as f64 <= exact as f64 * 0.05 + 1.0, "q {}: {} vs {}", q, est, exact);
                }
            }
        }

        #[test]
        fn merge_equals_recording_both(a in prop::collection::vec(sample(), 0..100), b in prop::collection::vec(sample(), 0..100)) {
            let (ha, hb, hab) = (LatencyHistogram::new(), LatencyHistogram::new(), LatencyHistogram::new());
            for v in &a { ha.record_ns(*v); hab.record_ns(*v); }
            for v in &b { hb.record_ns(*v); hab.record_ns(*v); }
            ha.merge(&hb);
            prop_assert_eq!(ha.load_buckets(), hab.load_buckets());
            prop_assert_eq!((ha.count(), ha.sum(), ha.min(), ha.max()), (hab.count(), hab.sum(), hab.min(), hab.max()));
            for q in [0.1, 0.5, 0.99] {
                prop_assert_eq!(ha.quantile(q), hab.quantile(q));
            }
        }
    }

    #[test]
    fn le_buckets_include_the_bound() {
        let h = LatencyHistogram::new();
        h.record(Duration::from_millis(5));
        h.record(Duration::from_nanos(5_000_001));
        let mut out = String::new();
        h.write_prometheus(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.002\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_sum 0.010000001\n"), "{out}");
        assert!(out.contains("x_count 2\n"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn counts_ops_bytes_errors_and_latency() {
        let fault = Inject::new(VecStore::new(1 << 16, 1));
        let control = fault.control();
        control.set_delay(OpSet::READ, Duration::from_millis(3));
        let stats = Stats::new(fault);
        let handle = stats.handle();
        stats.write(0, Bytes::from_static(b"hello")).await.unwrap();
        for _ in 0..4 {
            stats.read_bytes(0, 5).await.unwrap();
        }
        control.fail_next(OpSet::READ, 1);
        control.fail_next(OpSet::FLUSH, 1);
        assert!(stats.read_bytes(0, 100).await.is_err());
        assert!(stats.flush().await.is_err());
        stats.flush().await.unwrap();
        stats.trim(0, 10).await.unwrap();
        stats.write_zeroes(0, 20).await.unwrap();
        assert_eq!(stats.extents(0, 30).await.unwrap().len(), 1);
        // Request errors are counted too, but passed up without context.
        assert!(matches!(
            stats.read_bytes(1 << 16, 1).await,
            Err(StoreError::OutOfRange { .. })
        ));

        let snap = handle.snapshot();
        let r = snap[OpKind::Read];
        assert_eq!(
            (r.ops, r.bytes, r.errors, r.in_flight, r.cancelled),
            (6, 20, 2, 0, 0)
        );
        assert_eq!(
            (r.p50, r.max),
            (Duration::from_millis(3), Duration::from_millis(3))
        );
        assert_eq!(snap[OpKind::Write].bytes, 5);
        assert_eq!(
            (snap[OpKind::Flush].ops, snap[OpKind::Flush].errors),
            (2, 1)
        );
        assert_eq!(snap[OpKind::Trim].bytes, 10);
        assert_eq!(snap[OpKind::Zero].bytes, 20);
        assert_eq!(snap[OpKind::Extents].bytes, 30);
        assert_eq!((snap.total_ops(), snap.total_errors()), (12, 3));
        assert_eq!(snap.ops().count(), OpKind::COUNT);
        assert!(
            snap.to_string()
                .starts_with("read: 6 ops, 20 B, 2 errors; latency mean 3.0ms p50 3.0ms"),
            "{snap}"
        );
        assert_eq!(snap.iter().map(|s| s.op).collect::<Vec<_>>(), OpKind::ALL);

        // A call dropped before finishing counts as cancelled, not as an op.
        control.set_delay(OpSet::READ, Duration::from_secs(10));
        let slow = tokio::time::timeout(Duration::from_secs(1), stats.read_bytes(0, 1)).await;
        assert!(slow.is_err());
        let r = handle.snapshot()[OpKind::Read];
        assert_eq!((r.ops, r.cancelled, r.in_flight), (6, 1, 0));
    }

    /// A store that lends its bytes, for `read_shared` through the layer.
    #[derive(Debug)]
    struct Lends(VecStore);

    #[async_trait]
    impl Store for Lends {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn caps(&self) -> Caps {
            self.0.caps()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(offset, buf).await
        }
        async fn read_shared(&self, offset: u64, len: u64) -> Option<Result<Vec<Bytes>>> {
            Some(
                self.0
                    .read_bytes(offset, len as usize)
                    .await
                    .map(|b| vec![b]),
            )
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
            self.0.write(offset, data).await
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    /// `read_shared` passes through and counts as a read; a store that does not lend counts
    /// nothing (the caller's `read` that follows is counted).
    #[tokio::test]
    async fn shared_reads_pass_through_and_count_as_reads() {
        let lends = Stats::new(Lends(VecStore::new(1 << 16, 1)));
        lends.write(10, Bytes::from_static(b"abc")).await.unwrap();
        let v = lends.read_shared(10, 3).await.unwrap().unwrap();
        assert_eq!(&v[0][..], b"abc");
        assert!(lends.read_shared(1 << 16, 1).await.unwrap().is_err());
        let r = lends.snapshot()[OpKind::Read];
        assert_eq!((r.ops, r.bytes, r.errors, r.cancelled), (2, 3, 1, 0));

        let plain = Stats::new(VecStore::new(1 << 16, 1));
        assert!(plain.read_shared(0, 3).await.is_none());
        let r = plain.snapshot()[OpKind::Read];
        assert_eq!((r.ops, r.cancelled, r.in_flight), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn prometheus_text() {
        let fault = Inject::new(VecStore::new(4096, 1));
        // Paused time advances in whole milliseconds.
        fault
            .control()
            .set_delay(OpSet::ALL, Duration::from_millis(2));
        let stats = Stats::new(fault);
        for _ in 0..3 {
            stats.read_bytes(0, 512).await.unwrap();
        }
        let text = stats.render_prometheus("memsync_store", r#"store="t""#);
        for line in [
            "# TYPE memsync_store_ops_total counter",
            r#"memsync_store_ops_total{store="t",op="read"} 3"#,
            r#"memsync_store_bytes_total{store="t",op="read"} 1536"#,
            r#"memsync_store_errors_total{store="t",op="write"} 0"#,
            "# TYPE memsync_store_latency_seconds histogram",
            r#"memsync_store_latency_seconds_bucket{store="t",op="read",le="0.001"} 0"#,
            r#"memsync_store_latency_seconds_bucket{store="t",op="read",le="0.002"} 3"#,
            r#"memsync_store_latency_seconds_bucket{store="t",op="read",le="+Inf"} 3"#,
            r#"memsync_store_latency_seconds_sum{store="t",op="read"} 0.006"#,
            r#"memsync_store_latency_seconds_count{store="t",op="read"} 3"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` with a numeric value; buckets never decrease.
        let mut last_bucket: Option<(String, u64)> = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let v: f64 = value.parse().unwrap();
            if let Some((name, _)) = series.split_once(",le=") {
                let v = v as u64;
                if let Some((prev_name, prev)) = &last_bucket
                    && prev_name == name
                {
                    assert!(v >= *prev, "{line}");
                }
                last_bucket = Some((name.to_string(), v));
            }
        }
        let bare = stats.render_prometheus("m", "");
        assert!(bare.contains("m_ops_total{op=\"flush\"} 0\n"), "{bare}");
        assert!(
            bare.contains("m_latency_seconds_count{op=\"read\"} 3\n"),
            "{bare}"
        );
    }
}
