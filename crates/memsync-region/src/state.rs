//! Chunk arithmetic ([`Geometry`]) and the lock-free per-chunk state array
//! ([`ChunkMap`]) that deduplicates concurrent fetches of one chunk.
//!
//! Both are plain data structures without system calls, public so that
//! their invariants can be tested (and reused) on their own.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Where a chunk's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkState {
    /// Not installed: the next touch fetches it.
    Absent,
    /// One fetcher (a fault handler, the background puller or an inline
    /// accessor) owns the chunk and is installing it; every other party
    /// waits for that fetch instead of fetching again.
    Fetching,
    /// Installed: the memory holds the store's data or local writes.
    Present,
    /// The store failed until the deadline: the chunk's pages raise `SIGBUS`
    /// (poisoned with `UFFDIO_POISON`, or replaced by a mapping that raises
    /// it).
    Poisoned,
}

impl ChunkState {
    const fn to_u8(self) -> u8 {
        match self {
            Self::Absent => 0,
            Self::Fetching => 1,
            Self::Present => 2,
            Self::Poisoned => 3,
        }
    }

    const fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Absent,
            1 => Self::Fetching,
            2 => Self::Present,
            _ => Self::Poisoned,
        }
    }
}

/// How a region of `size` bytes splits into chunks.
///
/// Chunk `i` covers store bytes `i * chunk .. min((i + 1) * chunk, size)`;
/// the last chunk may be short. Memory is installed in whole pages, so the
/// last chunk's *install length* is its data length rounded up to the page
/// size; the bytes past `size` read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk: usize,
    page: usize,
    chunks: usize,
}

impl Geometry {
    /// The geometry of `size` bytes in chunks of `chunk` bytes on pages of
    /// `page` bytes. `None` unless `page` is a power of two, `chunk` a
    /// power-of-two multiple of `page`, and `size` non-zero.
    #[must_use]
    pub fn new(size: u64, chunk: usize, page: usize) -> Option<Self> {
        if size == 0 || !page.is_power_of_two() || !chunk.is_power_of_two() || chunk < page {
            return None;
        }
        let chunks = usize::try_from(size.div_ceil(chunk as u64)).ok()?;
        // The mapping length must fit in usize.
        usize::try_from(size.checked_add(page as u64 - 1)?).ok()?;
        Some(Self {
            size,
            chunk,
            page,
            chunks,
        })
    }

    /// Bytes of data (the store's size).
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Page size.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.page
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Length of the memory mapping: `size` rounded up to whole pages.
    #[must_use]
    pub fn map_len(&self) -> usize {
        let size = self.size as usize;
        size.div_ceil(self.page) * self.page
    }

    /// The chunk holding byte `offset` (clamped to the last chunk).
    #[must_use]
    pub fn chunk_of(&self, offset: usize) -> usize {
        (offset / self.chunk).min(self.chunks - 1)
    }

    /// Chunks overlapping `offset..offset + len` (empty for `len == 0`).
    #[must_use]
    pub fn chunks_in(&self, offset: usize, len: usize) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = self.chunk_of(offset);
        let last = self.chunk_of(offset.saturating_add(len - 1));
        first..last + 1
    }

    /// Chunk `i` as `(offset, data_len, install_len)`.
    ///
    /// # Panics
    ///
    /// If `i >= chunks()`.
    #[must_use]
    pub fn chunk(&self, i: usize) -> (usize, usize, usize) {
        assert!(
            i < self.chunks,
            "chunk {i} out of range ({} chunks)",
            self.chunks
        );
        let off = i * self.chunk;
        let end = ((i + 1) as u64 * self.chunk as u64).min(self.size) as usize;
        let data = end - off;
        let install = data.div_ceil(self.page) * self.page;
        (off, data, install)
    }
}

/// One [`ChunkState`] per chunk in an atomic array, plus a count of present
/// chunks.
///
/// Every transition is a single compare-and-swap, so exactly one party wins
/// [`try_claim`](Self::try_claim) for an absent chunk; the others see
/// [`ChunkState::Fetching`] and wait for the winner's install to wake them.
#[derive(Debug)]
pub struct ChunkMap {
    states: Box<[AtomicU8]>,
    present: AtomicUsize,
}

impl ChunkMap {
    /// `n` absent chunks.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self {
            states: (0..n).map(|_| AtomicU8::new(0)).collect(),
            present: AtomicUsize::new(0),
        }
    }

    /// Number of chunks.
    #[must_use]
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether there are no chunks.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The state of chunk `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> ChunkState {
        ChunkState::from_u8(self.states[i].load(Ordering::Acquire))
    }

    fn cas(&self, i: usize, from: ChunkState, to: ChunkState) -> Result<(), ChunkState> {
        self.states[i]
            .compare_exchange(
                from.to_u8(),
                to.to_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(drop)
            .map_err(ChunkState::from_u8)
    }

    /// Absent → Fetching. On failure returns the current state.
    ///
    /// # Errors
    ///
    /// The chunk's state if it was not absent.
    pub fn try_claim(&self, i: usize) -> Result<(), ChunkState> {
        self.cas(i, ChunkState::Absent, ChunkState::Fetching)
    }

    /// Present → Fetching, to repair a present chunk whose pages were
    /// dropped behind its back.
    ///
    /// # Errors
    ///
    /// The chunk's state if it was not present.
    pub fn try_reclaim(&self, i: usize) -> Result<(), ChunkState> {
        self.cas(i, ChunkState::Present, ChunkState::Fetching)?;
        self.present.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// Fetching → Present. `false` if the chunk was invalidated meanwhile
    /// (it then stays absent and is fetched again on its next touch).
    pub fn finish(&self, i: usize) -> bool {
        let ok = self
            .cas(i, ChunkState::Fetching, ChunkState::Present)
            .is_ok();
        if ok {
            self.present.fetch_add(1, Ordering::AcqRel);
        }
        ok
    }

    /// Fetching → Absent (a fetch given up without installing).
    pub fn abandon(&self, i: usize) {
        let _ = self.cas(i, ChunkState::Fetching, ChunkState::Absent);
    }

    /// Fetching or Absent → Poisoned: the fetcher gave up and made the
    /// chunk's pages raise `SIGBUS` (a chunk invalidated during its fetch is
    /// Absent by then, but its pages raise `SIGBUS` all the same). `false`
    /// if the chunk was in neither state.
    pub fn poison(&self, i: usize) -> bool {
        self.cas(i, ChunkState::Fetching, ChunkState::Poisoned)
            .or_else(|_| self.cas(i, ChunkState::Absent, ChunkState::Poisoned))
            .is_ok()
    }

    /// Poisoned → Absent: the chunk's pages could not be made to raise
    /// `SIGBUS` again, so the next touch fetches it from the store. `false`
    /// if it was not poisoned.
    pub fn unpoison(&self, i: usize) -> bool {
        self.cas(i, ChunkState::Poisoned, ChunkState::Absent)
            .is_ok()
    }

    /// Present or Fetching → Absent: the chunk's pages were dropped. Returns
    /// the previous state.
    pub fn invalidate(&self, i: usize) -> ChunkState {
        loop {
            let cur = self.get(i);
            match cur {
                ChunkState::Present | ChunkState::Fetching => {
                    if self.cas(i, cur, ChunkState::Absent).is_ok() {
                        if cur == ChunkState::Present {
                            self.present.fetch_sub(1, Ordering::AcqRel);
                        }
                        return cur;
                    }
                }
                other => return other,
            }
        }
    }

    /// Number of present chunks.
    #[must_use]
    pub fn present_count(&self) -> usize {
        self.present.load(Ordering::Acquire)
    }

    /// Whether any chunk is being fetched.
    #[must_use]
    pub fn any_fetching(&self) -> bool {
        self.states
            .iter()
            .any(|s| s.load(Ordering::Acquire) == ChunkState::Fetching.to_u8())
    }

    /// A snapshot of which chunks are present.
    #[must_use]
    pub fn present_bitmap(&self) -> ChunkBitmap {
        let mut words = vec![0u64; self.len().div_ceil(64)];
        for (i, s) in self.states.iter().enumerate() {
            if s.load(Ordering::Acquire) == ChunkState::Present.to_u8() {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        ChunkBitmap {
            words,
            len: self.len(),
        }
    }
}

/// A bitmap with one bit per chunk (a snapshot; see
/// [`LazyRegion::present_chunks`](crate::LazyRegion::present_chunks)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkBitmap {
    words: Vec<u64>,
    len: usize,
}

impl ChunkBitmap {
    /// Number of chunks (bits).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap has no bits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set.
    #[must_use]
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of set bits.
    #[must_use]
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The set bits in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }

    /// The words, least significant bit first (bit `i` is in word `i / 64`).
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}
