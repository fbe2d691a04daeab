//! Background pull order: the pluggable [`PullPriority`], the built-in
//! orders [`Sequential`], [`FollowFaults`] and [`HintsFirst`], and a pull's
//! [`PullProgress`]. A region's puller and a cache's puller both ask the
//! same trait for their next chunk.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ChunkMap, ChunkState};

/// What a [`PullPriority`] sees when it picks the next chunk.
pub struct PullView<'a> {
    wanted: Wanted<'a>,
    n: usize,
    last_fault: Option<usize>,
    hints: &'a [Range<usize>],
}

enum Wanted<'a> {
    /// A region's chunk map: absent and not skipped.
    Map {
        chunks: &'a ChunkMap,
        skip: &'a [bool],
    },
    /// Any puller's own rule.
    Fn(&'a (dyn Fn(usize) -> bool + 'a)),
}

impl fmt::Debug for PullView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullView")
            .field("chunks", &self.n)
            .field("last_fault", &self.last_fault)
            .field("hints", &self.hints)
            .finish_non_exhaustive()
    }
}

impl<'a> PullView<'a> {
    /// A view of `chunks` where the chunks marked in `skip` (one flag per
    /// chunk) are not wanted, after a fault on `last_fault`.
    ///
    /// # Panics
    ///
    /// If `skip` does not have one flag per chunk.
    #[must_use]
    pub fn new(chunks: &'a ChunkMap, skip: &'a [bool], last_fault: Option<usize>) -> Self {
        assert_eq!(chunks.len(), skip.len(), "one skip flag per chunk");
        Self {
            n: chunks.len(),
            wanted: Wanted::Map { chunks, skip },
            last_fault,
            hints: &[],
        }
    }

    /// A view of `n` chunks of which those where `wanted` holds still need
    /// pulling (a cache: the missing ones), after a demand on `last_fault`.
    #[must_use]
    pub fn from_fn(
        n: usize,
        wanted: &'a (dyn Fn(usize) -> bool + 'a),
        last_fault: Option<usize>,
    ) -> Self {
        Self {
            wanted: Wanted::Fn(wanted),
            n,
            last_fault,
            hints: &[],
        }
    }

    /// The same view with runs of chunks to pull first (see [`HintsFirst`]).
    #[must_use]
    pub fn with_hints(self, hints: &'a [Range<usize>]) -> Self {
        Self { hints, ..self }
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunk_count(&self) -> usize {
        self.n
    }

    /// Whether chunk `i` still needs pulling: for a region, absent and not
    /// given up by the puller in this round (a chunk the store failed to
    /// deliver in the background is left to the fault path).
    #[must_use]
    pub fn wanted(&self, i: usize) -> bool {
        i < self.n
            && match &self.wanted {
                Wanted::Map { chunks, skip } => !skip[i] && chunks.get(i) == ChunkState::Absent,
                Wanted::Fn(f) => f(i),
            }
    }

    /// The chunk of the most recent fault (or demand miss), if any.
    #[must_use]
    pub fn last_fault(&self) -> Option<usize> {
        self.last_fault
    }

    /// Runs of chunks the user asked to have first, in the order given
    /// (possibly overlapping; empty without hints).
    #[must_use]
    pub fn hints(&self) -> &[Range<usize>] {
        self.hints
    }

    /// The first wanted chunk at or after `from`, wrapping around once.
    #[must_use]
    pub fn next_wanted_from(&self, from: usize) -> Option<usize> {
        let n = self.chunk_count();
        let from = if from >= n { 0 } else { from };
        (from..n).chain(0..from).find(|&i| self.wanted(i))
    }
}

/// Chooses the order in which the background puller fills a region.
///
/// Called on the puller thread before every chunk; return a chunk for which
/// [`PullView::wanted`] is true (others are skipped), or `None` when nothing
/// is left. It should be cheap: faults never wait for it, but the puller
/// does.
pub trait PullPriority: Send + std::fmt::Debug + 'static {
    /// The next chunk to pull.
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize>;
}

/// From the first chunk to the last, then any chunk missed on the way
/// (the default).
#[derive(Debug, Default, Clone)]
pub struct Sequential {
    cursor: usize,
}

impl PullPriority for Sequential {
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
        let i = view.next_wanted_from(self.cursor)?;
        self.cursor = i + 1;
        Some(i)
    }
}

/// Like [`Sequential`], but every new fault moves the scan to the chunk
/// right after the faulted one (QEMU's post-copy policy): an application
/// streaming through memory finds its next chunks already pulled.
#[derive(Debug, Default, Clone)]
pub struct FollowFaults {
    cursor: usize,
    seen: Option<usize>,
}

impl PullPriority for FollowFaults {
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
        if let Some(f) = view.last_fault()
            && self.seen != Some(f)
        {
            self.seen = Some(f);
            self.cursor = f + 1;
        }
        let i = view.next_wanted_from(self.cursor)?;
        self.cursor = i + 1;
        Some(i)
    }
}

/// "Headers first": the chunks of every hinted run ([`PullView::hints`]),
/// in the order the hints are given, each chunk once, then the rest as
/// [`Sequential`]. Without hints it is [`Sequential`].
#[derive(Debug, Default, Clone)]
pub struct HintsFirst {
    /// The hinted runs made disjoint, in pull order (built on first use).
    runs: Option<Vec<Range<usize>>>,
    run: usize,
    pos: usize,
    rest: Sequential,
}

impl HintsFirst {
    /// The hinted runs of `hints` over `n` chunks, in order, each chunk once.
    fn order(n: usize, hints: &[Range<usize>]) -> Vec<Range<usize>> {
        // Runs already in the order, sorted by start and disjoint.
        let mut taken: Vec<Range<usize>> = Vec::new();
        let mut out = Vec::new();
        for h in hints {
            let (first, end) = (h.start.min(n), h.end.min(n));
            if first >= end {
                continue;
            }
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
            let i = taken.partition_point(|t| t.start < first);
            taken.insert(i, first..end);
            let mut merged: Vec<Range<usize>> = Vec::with_capacity(taken.len());
            for r in taken.drain(..) {
                match merged.last_mut() {
                    Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            taken = merged;
        }
        out
    }
}

impl PullPriority for HintsFirst {
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
        let runs = self
            .runs
            .get_or_insert_with(|| Self::order(view.chunk_count(), view.hints()));
        while let Some(r) = runs.get(self.run) {
            let mut c = self.pos.max(r.start);
            while c < r.end && !view.wanted(c) {
                c += 1;
            }
            if c < r.end {
                self.pos = c + 1;
                return Some(c);
            }
            self.run += 1;
            self.pos = 0;
        }
        self.rest.next_chunk(view)
    }
}

/// A background puller's presence, as the layers its reads reach see it:
/// active while the puller pulls, inactive while it is paused, done or
/// stopped (and gone once its owner drops it). A cache below leaves the
/// pull order to such a puller only while it is active, so that pausing or
/// stopping the puller above never leaves the stack with no puller at all.
#[derive(Debug, Default)]
pub struct PullLease {
    active: AtomicBool,
}

impl PullLease {
    /// A lease, inactive until [`set_active`](Self::set_active).
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Tells whether the puller pulls now.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// Whether the puller pulls now.
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}

tokio::task_local! {
    static BACKGROUND: Arc<PullLease>;
}

/// Runs `f` as a read of the background pull that holds `lease`: the layers
/// it reaches see [`current_pull`]. A region's puller reads this way, so a
/// cache below it serves the read as part of a pull, not as a demand miss,
/// and leaves the pull order to the region's puller while its lease is
/// active (one background puller per stack, not two working against each
/// other, and never none).
pub fn background_pull<F: Future>(lease: &Arc<PullLease>, f: F) -> impl Future<Output = F::Output> {
    BACKGROUND.scope(Arc::clone(lease), f)
}

/// The lease of the background pull above whose read the current task runs
/// (see [`background_pull`]), if any.
#[must_use]
pub fn current_pull() -> Option<Arc<PullLease>> {
    BACKGROUND.try_with(Arc::clone).ok()
}

/// How far a background pull has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Chunks in all.
    pub chunks: u64,
    /// Chunks present (a region: installed; a cache: in the local copy), by
    /// any path.
    pub present_chunks: u64,
    /// Of those, chunks with writes not yet saved (a cache: not yet in the
    /// remote; a region does not track them here: 0).
    pub dirty_chunks: u64,
    /// Chunks the background puller fetched (a region's count; 0 for a cache,
    /// whose stats count pulled bytes).
    pub pulled_chunks: u64,
    /// Bytes the background puller read.
    pub pulled_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Bytes in all.
    pub size: u64,
    /// The puller is enabled (started and not paused).
    pub running: bool,
    /// The puller found nothing left to pull.
    pub done: bool,
}

impl PullProgress {
    /// Bytes present.
    #[must_use]
    pub fn present_bytes(&self) -> u64 {
        (self.present_chunks * self.chunk_size).min(self.size)
    }

    /// Every chunk is present.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.present_chunks == self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut dyn PullPriority, n: usize, hints: &[Range<usize>]) -> Vec<usize> {
        let taken = std::cell::RefCell::new(vec![false; n]);
        let wanted = |i: usize| !taken.borrow()[i];
        let mut out = Vec::new();
        loop {
            let view = PullView::from_fn(n, &wanted, None).with_hints(hints);
            let Some(i) = p.next_chunk(&view) else { break };
            taken.borrow_mut()[i] = true;
            out.push(i);
        }
        out
    }

    #[test]
    fn hints_first_then_the_rest() {
        // Chunk runs of the byte hints 8192..8193, 0..4096, 30000..40000 in 4 KiB chunks.
        let o = all(&mut HintsFirst::default(), 8, &[2..3, 0..1, 7..10]);
        assert_eq!(o, vec![2, 0, 7, 1, 3, 4, 5, 6]);
        assert_eq!(all(&mut HintsFirst::default(), 3, &[]), vec![0, 1, 2]);
        let hint = std::iter::once(0..1).collect::<Vec<_>>();
        assert_eq!(all(&mut Sequential::default(), 3, &hint), vec![0, 1, 2]);
        // Overlapping hints: each chunk once, in the order first hinted.
        let o = all(&mut HintsFirst::default(), 10, &[1..5, 0..3, 8..usize::MAX]);
        assert_eq!(o, vec![1, 2, 3, 4, 0, 8, 9, 5, 6, 7]);
    }

    proptest::proptest! {
        /// Whatever the hints, the order holds every chunk exactly once, and hinted chunks
        /// come before unhinted ones.
        #[test]
        fn hints_first_is_a_permutation(
            n in 0usize..200,
            hints in proptest::collection::vec((0usize..220, 0usize..80), 0..8),
        ) {
            let hints: Vec<Range<usize>> = hints.into_iter().map(|(a, l)| a..a + l).collect();
            let o = all(&mut HintsFirst::default(), n, &hints);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            proptest::prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            let hinted = |c: usize| hints.iter().any(|h| h.contains(&c));
            let first_unhinted = o.iter().position(|&c| !hinted(c)).unwrap_or(o.len());
            proptest::prop_assert!(o[first_unhinted..].iter().all(|&c| !hinted(c)));
        }
    }
}
