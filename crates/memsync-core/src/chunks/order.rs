//! Background pull order: the pluggable [`PullPriority`] and the two
//! built-in orders, [`Sequential`] and [`FollowFaults`].

use super::{ChunkMap, ChunkState};

/// What a [`PullPriority`] sees when it picks the next chunk.
#[derive(Debug)]
pub struct PullView<'a> {
    chunks: &'a ChunkMap,
    skip: &'a [bool],
    last_fault: Option<usize>,
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
            chunks,
            skip,
            last_fault,
        }
    }

    /// Number of chunks of the region.
    #[must_use]
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Whether chunk `i` still needs pulling: absent, and not given up by
    /// the puller in this round (a chunk the store failed to deliver in the
    /// background is left to the fault path).
    #[must_use]
    pub fn wanted(&self, i: usize) -> bool {
        i < self.chunks.len() && !self.skip[i] && self.chunks.get(i) == ChunkState::Absent
    }

    /// The chunk of the most recent fault, if any.
    #[must_use]
    pub fn last_fault(&self) -> Option<usize> {
        self.last_fault
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
