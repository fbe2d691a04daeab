//! Counters and latency histograms of a region.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memsync_core::layers::LatencyHistogram;

/// Live counters of a region (lock-free; read with [`snapshot`](Self::snapshot)).
#[derive(Debug, Default)]
pub struct RegionStats {
    pub(crate) faults: AtomicU64,
    pub(crate) faults_waited: AtomicU64,
    pub(crate) faults_spurious: AtomicU64,
    pub(crate) chunks_fault: AtomicU64,
    pub(crate) chunks_background: AtomicU64,
    pub(crate) chunks_inline: AtomicU64,
    pub(crate) chunks_repaired: AtomicU64,
    pub(crate) chunks_zero: AtomicU64,
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) bytes_background: AtomicU64,
    pub(crate) installs_move: AtomicU64,
    pub(crate) installs_copy: AtomicU64,
    pub(crate) installs_continue: AtomicU64,
    pub(crate) install_retries: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) chunks_poisoned: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) standby_takeovers: AtomicU64,
    pub(crate) staging_ready: AtomicU64,
    pub(crate) staging_cold: AtomicU64,
    pub(crate) chunks_placed: AtomicU64,
    pub(crate) chunks_dropped: AtomicU64,
    pub(crate) wp_faults: AtomicU64,
    pub(crate) chunks_evicted: AtomicU64,
    pub(crate) chunks_written_back: AtomicU64,
    /// From reading a fault event to its chunk being installed (the
    /// handler's share of a fault; the faulting thread also pays the kernel's
    /// wake-up).
    pub(crate) fault_latency: LatencyHistogram,
    /// Store reads, per chunk.
    pub(crate) fetch_latency: LatencyHistogram,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

impl RegionStats {
    /// The fault-service latency histogram (event read → chunk installed).
    #[must_use]
    pub fn fault_latency(&self) -> &LatencyHistogram {
        &self.fault_latency
    }

    /// The store-read latency histogram (one entry per fetched chunk).
    #[must_use]
    pub fn fetch_latency(&self) -> &LatencyHistogram {
        &self.fetch_latency
    }

    /// A copy of every counter.
    #[must_use]
    pub fn snapshot(&self) -> RegionStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RegionStatsSnapshot {
            faults: l(&self.faults),
            faults_waited: l(&self.faults_waited),
            faults_spurious: l(&self.faults_spurious),
            chunks_fault: l(&self.chunks_fault),
            chunks_background: l(&self.chunks_background),
            chunks_inline: l(&self.chunks_inline),
            chunks_repaired: l(&self.chunks_repaired),
            chunks_zero: l(&self.chunks_zero),
            bytes_fetched: l(&self.bytes_fetched),
            bytes_background: l(&self.bytes_background),
            installs_move: l(&self.installs_move),
            installs_copy: l(&self.installs_copy),
            installs_continue: l(&self.installs_continue),
            install_retries: l(&self.install_retries),
            store_errors: l(&self.store_errors),
            chunks_poisoned: l(&self.chunks_poisoned),
            removes: l(&self.removes),
            standby_takeovers: l(&self.standby_takeovers),
            staging_ready: l(&self.staging_ready),
            staging_cold: l(&self.staging_cold),
            chunks_placed: l(&self.chunks_placed),
            chunks_dropped: l(&self.chunks_dropped),
            wp_faults: l(&self.wp_faults),
            chunks_evicted: l(&self.chunks_evicted),
            chunks_written_back: l(&self.chunks_written_back),
            fault_p50: self.fault_latency.quantile(0.5),
            fault_p99: self.fault_latency.quantile(0.99),
            fault_max: self.fault_latency.max(),
            fetch_p50: self.fetch_latency.quantile(0.5),
        }
    }
}

/// A point-in-time copy of [`RegionStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionStatsSnapshot {
    /// Page-fault events read from the userfaultfd.
    pub faults: u64,
    /// Faults on a chunk another party was already fetching (deduplicated:
    /// they waited for that fetch).
    pub faults_waited: u64,
    /// Faults on an already installed chunk (raced with its install; woken).
    pub faults_spurious: u64,
    /// Chunks fetched because of a fault.
    pub chunks_fault: u64,
    /// Chunks fetched by the background puller.
    pub chunks_background: u64,
    /// Chunks fetched on the accessing thread by `read_at`/`write_at`.
    pub chunks_inline: u64,
    /// memfd chunks refetched after a `MISSING` fault on an installed chunk
    /// (a hole punched by `MADV_REMOVE`, or a fault queued before a `place`
    /// installed the chunk, where the refetch installs nothing): only the
    /// missing pages are filled, so placed or written bytes stay.
    pub chunks_repaired: u64,
    /// Chunks installed as zeros without reading the store.
    pub chunks_zero: u64,
    /// Bytes read from the store.
    pub bytes_fetched: u64,
    /// Of those, bytes read by the background puller.
    pub bytes_background: u64,
    /// `UFFDIO_MOVE` installs.
    pub installs_move: u64,
    /// `UFFDIO_COPY` installs.
    pub installs_copy: u64,
    /// `UFFDIO_CONTINUE` installs (memfd mode).
    pub installs_continue: u64,
    /// Installs retried after `EAGAIN`.
    pub install_retries: u64,
    /// Failed store reads (each retry counts).
    pub store_errors: u64,
    /// Chunks poisoned after the store failed until the deadline.
    pub chunks_poisoned: u64,
    /// `REMOVE` events (`MADV_DONTNEED`/`MADV_REMOVE` on the region).
    pub removes: u64,
    /// Times a standby handler started serving faults because the primary
    /// handler was busy for longer than [`RegionConfig::standby_after`](crate::RegionConfig::standby_after).
    pub standby_takeovers: u64,
    /// Used-up staging buffers replaced by one whose pages were allocated
    /// ahead of time by the staging thread.
    pub staging_ready: u64,
    /// Used-up staging buffers reused without such a replacement (none was
    /// ready: the next fill allocates its pages itself).
    pub staging_cold: u64,
    /// Chunks installed by [`LazyRegion::place`](crate::LazyRegion::place).
    pub chunks_placed: u64,
    /// Chunks whose pages were dropped by
    /// [`LazyRegion::invalidate`](crate::LazyRegion::invalidate) or the evictor.
    pub chunks_dropped: u64,
    /// Write-protect faults delivered to the hooks.
    pub wp_faults: u64,
    /// Chunks dropped by the evictor to stay within the budget.
    pub chunks_evicted: u64,
    /// Dirty chunks written back to the source before eviction.
    pub chunks_written_back: u64,
    /// Fault-service latency, median.
    pub fault_p50: Duration,
    /// Fault-service latency, 99th percentile.
    pub fault_p99: Duration,
    /// Fault-service latency, maximum.
    pub fault_max: Duration,
    /// Store read latency per chunk, median.
    pub fetch_p50: Duration,
}

impl fmt::Display for RegionStatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "faults {} (waited {}, spurious {}), chunks: fault {} background {} inline {} zero {} repaired {}, \
             fetched {} B (background {} B), installs: move {} copy {} continue {} (retries {}), \
             store errors {}, poisoned {}, fault service p50 {:?} p99 {:?} max {:?}",
            self.faults,
            self.faults_waited,
            self.faults_spurious,
            self.chunks_fault,
            self.chunks_background,
            self.chunks_inline,
            self.chunks_zero,
            self.chunks_repaired,
            self.bytes_fetched,
            self.bytes_background,
            self.installs_move,
            self.installs_copy,
            self.installs_continue,
            self.install_retries,
            self.store_errors,
            self.chunks_poisoned,
            self.fault_p50,
            self.fault_p99,
            self.fault_max
        )
    }
}
