//! Cache settings and the pluggable pull order.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use memsync_core::chunks::{HintsFirst, PullPriority};
use memsync_core::{DynStore, Result, StoreError};

use crate::map::Reinit;
use crate::window::WindowLimits;

/// Smallest chunk size.
pub const MIN_CHUNK: u64 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u64 = 4 << 20;

/// Makes the background puller's order: a [`PullPriority`] of
/// [`memsync_core::chunks`] (the region's pullers use the same trait), made afresh for each
/// cache opened with this configuration. The puller asks it for one chunk at a time, with the
/// missing chunks as wanted and [`CacheConfig::hints`] as runs of chunks
/// ([`PullView::hints`](memsync_core::chunks::PullView::hints)), and fetches consecutive
/// answers with one remote request. Demand misses always go first regardless of this order (see
/// [`CacheConfig::follow_demand`]).
#[derive(Clone)]
pub struct PullOrder(Arc<dyn Fn() -> Box<dyn PullPriority> + Send + Sync>);

impl PullOrder {
    /// An order made by `f`.
    pub fn new(f: impl Fn() -> Box<dyn PullPriority> + Send + Sync + 'static) -> Self {
        PullOrder(Arc::new(f))
    }

    /// A new order.
    pub fn build(&self) -> Box<dyn PullPriority> {
        (self.0)()
    }
}

/// [`HintsFirst`]: the hinted chunks, then the rest in index order.
impl Default for PullOrder {
    fn default() -> Self {
        PullOrder::new(|| Box::new(HintsFirst::default()))
    }
}

impl fmt::Debug for PullOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PullOrder({:?})", self.build())
    }
}

/// How a [`crate::Cache`] behaves.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Chunk size: a power of two from 4 KiB to 4 MiB (independent of the page size). The
    /// cache keeps 17 bytes of state per chunk in memory (and one byte in the map file): a
    /// 1 TiB remote takes 272 MiB in 64 KiB chunks and 17 MiB in 1 MiB chunks.
    pub chunk_size: u64,
    /// Run the background puller.
    pub pull: bool,
    /// The pull order.
    pub priority: PullOrder,
    /// Byte ranges to pull first (given to `priority` as runs of chunks).
    pub hints: Vec<Range<u64>>,
    /// After a demand miss, the puller continues right after the missed range before going back
    /// to its order (like post-copy restarting its scan after the faulted page).
    pub follow_demand: bool,
    /// Largest remote request of the background puller and pusher (rounded to whole chunks).
    pub request_size: u64,
    /// Largest remote request of a demand miss (rounded to whole chunks).
    pub demand_request_size: u64,
    /// In-flight window limits of the puller and pusher, in requests.
    pub window: WindowLimits,
    /// Background push period (dirty chunks older than this are written back).
    pub push_interval: Duration,
    /// Chunk-map checkpoint period (the map is also saved on flush, at the end of the pull and
    /// on close).
    pub checkpoint_interval: Duration,
    /// A read that misses fails with EIO when the remote has not delivered within this time
    /// (retrying transient errors meanwhile). Under a layer that retries with a deadline of its
    /// own (a region mapping the cache: `memsync map --cache`), that layer's deadline applies
    /// instead and this one does not: a stack has one clock (see [`memsync_core::retry`]).
    pub fetch_timeout: Duration,
    /// A `flush` that cannot reach the remote keeps retrying for this long, then fails.
    pub flush_timeout: Duration,
    /// A separate remote (e.g. another connection) for demand misses, so that they do not
    /// queue behind the background pull.
    pub demand_remote: Option<DynStore>,
    /// Bytes per write-intent region (a power of two; at least one chunk). Before the first
    /// write to a region since its chunks were last clean, one small durable write records
    /// that the region may differ from the remote (see [`crate::map`]); later writes to it cost
    /// nothing extra. Fixed when the cache directory is created.
    pub intent_region: u64,
    /// The remote's identity, recorded in a new cache directory and checked when it is
    /// reopened (e.g. the URL without credentials). `None`: not recorded or checked (the size,
    /// chunk size and a sample of clean chunks still are).
    pub remote_id: Option<String>,
    /// Start the cache directory over instead of refusing one made for another remote.
    pub reinit: Reinit,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            chunk_size: 64 * 1024,
            pull: true,
            priority: PullOrder::default(),
            hints: Vec::new(),
            follow_demand: true,
            request_size: 1 << 20,
            demand_request_size: 1 << 20,
            window: WindowLimits {
                initial: 16,
                min: 1,
                max: 256,
            },
            push_interval: Duration::from_secs(5),
            checkpoint_interval: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(300),
            demand_remote: None,
            intent_region: 16 << 20,
            remote_id: None,
            reinit: Reinit::No,
        }
    }
}

impl CacheConfig {
    /// Check the settings.
    pub fn validate(&self) -> Result<()> {
        let c = self.chunk_size;
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&c) || !c.is_power_of_two() {
            return Err(StoreError::Config(format!(
                "cache: chunk size {c} must be a power of two from 4 KiB to 4 MiB"
            )));
        }
        if !self.intent_region.is_power_of_two() {
            return Err(StoreError::Config(format!(
                "cache: intent region {} must be a power of two",
                self.intent_region
            )));
        }
        if self.fetch_timeout.is_zero() {
            return Err(StoreError::Config(
                "cache: fetch timeout must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Chunks per background request (at least one).
    pub(crate) fn chunks_per_request(&self) -> u64 {
        (self.request_size / self.chunk_size).max(1)
    }

    /// Chunks per demand request (at least one).
    pub(crate) fn chunks_per_demand(&self) -> u64 {
        (self.demand_request_size / self.chunk_size).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_checked() {
        let mut c = CacheConfig {
            chunk_size: 3000,
            ..CacheConfig::default()
        };
        assert!(c.validate().is_err());
        c.chunk_size = 8 << 20;
        assert!(c.validate().is_err());
        c.chunk_size = 4096;
        assert!(c.validate().is_ok());
    }
}
