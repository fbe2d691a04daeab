//! Cache counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use memsync_core::layers::LatencyHistogram;

/// Live counters of a [`crate::Cache`] (all monotonic except the gauges).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Bytes read from the local copy.
    pub hit_bytes: AtomicU64,
    /// Read or write pieces that found their chunk local.
    pub hits: AtomicU64,
    /// Demand misses: remote requests made because a read or a partial write needed a chunk.
    pub misses: AtomicU64,
    /// Reads that waited for a fetch someone else had started (shared misses).
    pub shared_waits: AtomicU64,
    /// Bytes fetched by demand misses.
    pub demand_bytes: AtomicU64,
    /// Bytes fetched by the background puller.
    pub pulled_bytes: AtomicU64,
    /// Bytes written back to the remote.
    pub pushed_bytes: AtomicU64,
    /// Remote read requests (demand and background).
    pub remote_reads: AtomicU64,
    /// Remote write requests.
    pub remote_writes: AtomicU64,
    /// Remote flushes.
    pub remote_flushes: AtomicU64,
    /// Failed or timed-out remote reads.
    pub fetch_errors: AtomicU64,
    /// Failed pushes (retried later).
    pub push_errors: AtomicU64,
    /// Chunks pushed again because the connection that acknowledged them was lost before a
    /// flush (see `memsync_core::Store::session`).
    pub repushes: AtomicU64,
    /// Chunk-map checkpoints written.
    pub checkpoints: AtomicU64,
    /// Durable writes of the write-intent file (each serves every writer waiting for it).
    pub intent_syncs: AtomicU64,
    /// Chunks the remote reported as zeros, made local without reading them.
    pub zero_chunks: AtomicU64,
    /// Gauge: the puller's in-flight window (requests).
    pub pull_window: AtomicU64,
    /// Gauge: the pusher's in-flight window (requests).
    pub push_window: AtomicU64,
    /// Gauge: the puller's measured base round-trip time, in microseconds.
    pub min_rtt_us: AtomicU64,
    /// Latency of demand misses.
    pub miss_latency: LatencyHistogram,
}

/// A copy of [`CacheStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CacheStatsSnapshot {
    pub hit_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub shared_waits: u64,
    pub demand_bytes: u64,
    pub pulled_bytes: u64,
    pub pushed_bytes: u64,
    pub remote_reads: u64,
    pub remote_writes: u64,
    pub remote_flushes: u64,
    pub fetch_errors: u64,
    pub push_errors: u64,
    pub repushes: u64,
    pub checkpoints: u64,
    pub intent_syncs: u64,
    pub zero_chunks: u64,
    pub pull_window: u64,
    pub push_window: u64,
    pub min_rtt: Duration,
    pub miss_p50: Duration,
    pub miss_p99: Duration,
    pub local_chunks: u64,
    pub dirty_chunks: u64,
    pub chunks: u64,
}

impl CacheStats {
    pub(crate) fn snapshot(&self) -> CacheStatsSnapshot {
        CacheStatsSnapshot {
            hit_bytes: self.hit_bytes.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            shared_waits: self.shared_waits.load(Relaxed),
            demand_bytes: self.demand_bytes.load(Relaxed),
            pulled_bytes: self.pulled_bytes.load(Relaxed),
            pushed_bytes: self.pushed_bytes.load(Relaxed),
            remote_reads: self.remote_reads.load(Relaxed),
            remote_writes: self.remote_writes.load(Relaxed),
            remote_flushes: self.remote_flushes.load(Relaxed),
            fetch_errors: self.fetch_errors.load(Relaxed),
            push_errors: self.push_errors.load(Relaxed),
            repushes: self.repushes.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
            intent_syncs: self.intent_syncs.load(Relaxed),
            zero_chunks: self.zero_chunks.load(Relaxed),
            pull_window: self.pull_window.load(Relaxed),
            push_window: self.push_window.load(Relaxed),
            min_rtt: Duration::from_micros(self.min_rtt_us.load(Relaxed)),
            miss_p50: self.miss_latency.quantile(0.5),
            miss_p99: self.miss_latency.quantile(0.99),
            local_chunks: 0,
            dirty_chunks: 0,
            chunks: 0,
        }
    }
}

impl fmt::Display for CacheStatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "local {}/{} chunks ({} dirty); hits {} ({} B), misses {} (p50 {:?}, p99 {:?}), shared waits {}; \
             pulled {} B (demand {} B) in {} reads, {} zero chunks not read, pushed {} B in {} writes, {} remote flushes; \
             errors: fetch {}, push {}, pushed again after a lost connection {}; window pull {} push {}, min RTT {:?}; {} checkpoints, {} intent syncs",
            self.local_chunks,
            self.chunks,
            self.dirty_chunks,
            self.hits,
            self.hit_bytes,
            self.misses,
            self.miss_p50,
            self.miss_p99,
            self.shared_waits,
            self.pulled_bytes + self.demand_bytes,
            self.demand_bytes,
            self.remote_reads,
            self.zero_chunks,
            self.pushed_bytes,
            self.remote_writes,
            self.remote_flushes,
            self.fetch_errors,
            self.push_errors,
            self.repushes,
            self.pull_window,
            self.push_window,
            self.min_rtt,
            self.checkpoints,
            self.intent_syncs
        )
    }
}
