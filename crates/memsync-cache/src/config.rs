//! Cache settings and the pluggable pull order.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use memsync_core::{DynStore, Result, StoreError};

use crate::map::Reinit;
use crate::window::WindowLimits;

/// Smallest chunk size.
pub const MIN_CHUNK: u64 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u64 = 4 << 20;

/// The order in which the background puller fetches chunks.
///
/// `order` returns runs of chunk indices (`first..end`), most wanted first; the puller walks
/// them, skipping chunks that are already local or being fetched, and fetches consecutive
/// chunks with one remote request. Chunks left out are pulled last, in index order. Demand
/// misses always go first regardless of this order (see [`CacheConfig::follow_demand`]).
/// Runs keep the order's memory proportional to the number of hints, not to the remote's
/// size (a chunk-by-chunk list of a 1 TiB remote in 64 KiB chunks would take 128 MiB).
pub trait PullPriority: Send + Sync + fmt::Debug + 'static {
    /// The pull order for `chunks` chunks of `chunk_size` bytes, given the byte-range hints.
    fn order(&self, chunks: u64, chunk_size: u64, hints: &[Range<u64>]) -> Vec<Range<u64>>;
}

/// Index order from chunk 0, ignoring hints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl PullPriority for Sequential {
    fn order(&self, chunks: u64, _chunk_size: u64, _hints: &[Range<u64>]) -> Vec<Range<u64>> {
        std::iter::once(0..chunks).collect()
    }
}

/// "Headers first": the chunks of every hinted byte range, in the order the hints are given,
/// then everything else in index order. Without hints it is [`Sequential`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HintsFirst;

impl PullPriority for HintsFirst {
    fn order(&self, chunks: u64, chunk_size: u64, hints: &[Range<u64>]) -> Vec<Range<u64>> {
        // Chunk runs already in the order, sorted by start and disjoint.
        let mut taken: Vec<Range<u64>> = Vec::new();
        let mut out = Vec::new();
        for h in hints {
            if h.end <= h.start || chunks == 0 {
                continue;
            }
            let first = (h.start / chunk_size).min(chunks);
            let end = (h.end.div_ceil(chunk_size)).min(chunks);
            // The parts of first..end not taken by earlier hints, in index order.
            let mut c = first;
            for t in taken.iter().filter(|t| t.end > first && t.start < end) {
                if t.start > c {
                    out.push(c..t.start);
                }
                c = c.max(t.end);
            }
            if c < end {
                out.push(c..end);
            }
            if first < end {
                let i = taken.partition_point(|t| t.start < first);
                taken.insert(i, first..end);
                merge(&mut taken);
            }
        }
        let mut c = 0;
        for t in &taken {
            if t.start > c {
                out.push(c..t.start);
            }
            c = c.max(t.end);
        }
        if c < chunks {
            out.push(c..chunks);
        }
        out
    }
}

/// Merges overlapping or touching runs of a list sorted by start.
fn merge(runs: &mut Vec<Range<u64>>) {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    *runs = out;
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
    pub priority: Arc<dyn PullPriority>,
    /// Byte ranges to pull first (given to `priority`).
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
    /// A read that misses fails with EIO when the remote has not delivered within this time.
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
            priority: Arc::new(HintsFirst),
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

    fn flat(runs: &[Range<u64>]) -> Vec<u64> {
        runs.iter().flat_map(|r| r.clone()).collect()
    }

    #[test]
    fn hints_first_then_the_rest() {
        let o = HintsFirst.order(8, 4096, &[8192..8193, 0..4096, 30000..40000]);
        assert_eq!(flat(&o), vec![2, 0, 7, 1, 3, 4, 5, 6]);
        assert_eq!(flat(&HintsFirst.order(3, 4096, &[])), vec![0, 1, 2]);
        let hint = std::iter::once(0..4096).collect::<Vec<_>>();
        assert_eq!(flat(&Sequential.order(3, 4096, &hint)), vec![0, 1, 2]);
        // Overlapping hints: each chunk once, in the order first hinted.
        let o = HintsFirst.order(10, 4096, &[4096..5 * 4096, 0..3 * 4096, 8 * 4096..u64::MAX]);
        assert_eq!(flat(&o), vec![1, 2, 3, 4, 0, 8, 9, 5, 6, 7]);
    }

    proptest::proptest! {
        /// Whatever the hints, the order holds every chunk exactly once, and hinted chunks
        /// come before unhinted ones.
        #[test]
        fn hints_first_is_a_permutation(
            chunks in 0u64..200,
            hints in proptest::collection::vec((0u64..900_000, 0u64..300_000), 0..8),
        ) {
            let hints: Vec<Range<u64>> = hints.into_iter().map(|(a, l)| a..a + l).collect();
            let o = flat(&HintsFirst.order(chunks, 4096, &hints));
            let mut sorted = o.clone();
            sorted.sort_unstable();
            proptest::prop_assert_eq!(sorted, (0..chunks).collect::<Vec<_>>());
            let hinted = |c: u64| {
                hints
                    .iter()
                    .any(|h| h.start < h.end && h.start < (c + 1) * 4096 && h.end > c * 4096)
            };
            let first_unhinted = o.iter().position(|&c| !hinted(c)).unwrap_or(o.len());
            proptest::prop_assert!(o[first_unhinted..].iter().all(|&c| !hinted(c)));
        }
    }

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
