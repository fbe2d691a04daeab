//! The lazy-fill states of a memory region's chunks ([`ChunkState`]) and
//! their table ([`ChunkMap`]): every transition is declared here, once.

use super::ChunkBitmap;
use super::table::{State, StateTable, Transition};

/// Where a chunk's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkState {
    /// Not installed: the next touch fetches it.
    Absent,
    /// One party (a fault handler, the background puller, an inline
    /// accessor, a driver placing data or the evictor) owns the chunk and
    /// is changing its memory; every other party waits for it instead of
    /// fetching again.
    Fetching,
    /// Installed: the memory holds the source's data or local writes.
    Present,
    /// The source failed until the deadline: the chunk's pages raise
    /// `SIGBUS` (poisoned with `UFFDIO_POISON`, or replaced by a mapping
    /// that raises it).
    Poisoned,
    /// A driver operation (invalidate, evict) owns the chunk and is
    /// dropping its pages: faults wait for it as for a fetch, and a
    /// `REMOVE` event (which that very drop raises) leaves it alone.
    Dropping,
}

impl State for ChunkState {
    const INITIAL: Self = Self::Absent;

    fn to_u8(self) -> u8 {
        match self {
            Self::Absent => 0,
            Self::Fetching => 1,
            Self::Present => 2,
            Self::Poisoned => 3,
            Self::Dropping => 4,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Absent,
            1 => Self::Fetching,
            2 => Self::Present,
            3 => Self::Poisoned,
            _ => Self::Dropping,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Fetching => "fetching",
            Self::Present => "present",
            Self::Poisoned => "poisoned",
            Self::Dropping => "dropping",
        }
    }

    fn counted(self) -> bool {
        self == Self::Present
    }
}

use ChunkState::{Absent, Dropping, Fetching, Poisoned, Present};

impl ChunkState {
    /// Absent → Fetching: take an absent chunk to fill it.
    pub const CLAIM: Transition<Self> = Transition {
        name: "claim",
        from: &[Absent],
        to: Fetching,
    };
    /// Present → Fetching: take a present chunk to repair or drop it.
    pub const RECLAIM: Transition<Self> = Transition {
        name: "reclaim",
        from: &[Present],
        to: Fetching,
    };
    /// Fetching → Present: the owner installed the chunk.
    pub const FINISH: Transition<Self> = Transition {
        name: "finish",
        from: &[Fetching],
        to: Present,
    };
    /// Fetching → Absent: the owner gave up without installing, or dropped
    /// the chunk's pages.
    pub const ABANDON: Transition<Self> = Transition {
        name: "abandon",
        from: &[Fetching],
        to: Absent,
    };
    /// Fetching or Absent → Poisoned: the pages raise `SIGBUS` now (a
    /// chunk invalidated during its fetch is Absent by then, but its pages
    /// raise `SIGBUS` all the same).
    pub const POISON: Transition<Self> = Transition {
        name: "poison",
        from: &[Fetching, Absent],
        to: Poisoned,
    };
    /// Poisoned → Absent: the pages could not be made to raise `SIGBUS`
    /// again, so the next touch fetches the chunk.
    pub const UNPOISON: Transition<Self> = Transition {
        name: "unpoison",
        from: &[Poisoned],
        to: Absent,
    };
    /// Present or Fetching → Absent: the pages were dropped behind the
    /// chunk's back (a `REMOVE` event); a fetch in progress will not mark
    /// it present.
    pub const INVALIDATE: Transition<Self> = Transition {
        name: "invalidate",
        from: &[Present, Fetching],
        to: Absent,
    };
    /// Present or Absent → Dropping: a driver takes the chunk to drop its
    /// pages (an absent chunk may still hold pages: those kept by a
    /// partial drop).
    pub const DROP: Transition<Self> = Transition {
        name: "drop",
        from: &[Present, Absent],
        to: Dropping,
    };
    /// Present → Dropping: the evictor takes a resident chunk to drop it
    /// (after writing it back if dirty).
    pub const EVICT: Transition<Self> = Transition {
        name: "evict",
        from: &[Present],
        to: Dropping,
    };
    /// Dropping → Present: a drop given up before the pages went.
    pub const KEEP: Transition<Self> = Transition {
        name: "keep",
        from: &[Dropping],
        to: Present,
    };
    /// Dropping → Absent: the pages are gone; the next touch fetches the
    /// chunk.
    pub const DROPPED: Transition<Self> = Transition {
        name: "dropped",
        from: &[Dropping],
        to: Absent,
    };
}

/// One [`ChunkState`] per chunk in an atomic array, plus a count of present
/// chunks.
///
/// Every transition is a single compare-and-swap, so exactly one party wins
/// [`try_claim`](Self::try_claim) for an absent chunk; the others see
/// [`ChunkState::Fetching`] and wait for the winner's install to wake them.
#[derive(Debug)]
pub struct ChunkMap {
    table: StateTable<ChunkState>,
}

impl ChunkMap {
    /// `n` absent chunks.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self {
            table: StateTable::new(n),
        }
    }

    /// Number of chunks.
    #[must_use]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are no chunks.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The state of chunk `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> ChunkState {
        self.table.get(i)
    }

    /// Applies transition `t` to chunk `i` (see [`StateTable::apply`]).
    ///
    /// # Errors
    ///
    /// The chunk's state if `t` does not leave it.
    pub fn apply(&self, i: usize, t: &Transition<ChunkState>) -> Result<ChunkState, ChunkState> {
        self.table.apply(i, t)
    }

    /// [`ChunkState::CLAIM`].
    ///
    /// # Errors
    ///
    /// The chunk's state if it was not absent.
    pub fn try_claim(&self, i: usize) -> Result<(), ChunkState> {
        self.apply(i, &ChunkState::CLAIM).map(drop)
    }

    /// [`ChunkState::RECLAIM`].
    ///
    /// # Errors
    ///
    /// The chunk's state if it was not present.
    pub fn try_reclaim(&self, i: usize) -> Result<(), ChunkState> {
        self.apply(i, &ChunkState::RECLAIM).map(drop)
    }

    /// [`ChunkState::FINISH`]. `false` if the chunk was invalidated
    /// meanwhile (it then stays absent and is fetched again on its next
    /// touch).
    pub fn finish(&self, i: usize) -> bool {
        self.apply(i, &ChunkState::FINISH).is_ok()
    }

    /// [`ChunkState::ABANDON`].
    pub fn abandon(&self, i: usize) {
        let _ = self.apply(i, &ChunkState::ABANDON);
    }

    /// [`ChunkState::POISON`]. `false` if the chunk was in neither state.
    pub fn poison(&self, i: usize) -> bool {
        self.apply(i, &ChunkState::POISON).is_ok()
    }

    /// [`ChunkState::UNPOISON`]. `false` if it was not poisoned.
    pub fn unpoison(&self, i: usize) -> bool {
        self.apply(i, &ChunkState::UNPOISON).is_ok()
    }

    /// [`ChunkState::INVALIDATE`]. Returns the previous state.
    pub fn invalidate(&self, i: usize) -> ChunkState {
        match self.apply(i, &ChunkState::INVALIDATE) {
            Ok(s) | Err(s) => s,
        }
    }

    /// Number of present chunks.
    #[must_use]
    pub fn present_count(&self) -> usize {
        self.table.count()
    }

    /// Whether any chunk is being fetched.
    #[must_use]
    pub fn any_fetching(&self) -> bool {
        self.table.any(ChunkState::Fetching)
    }

    /// A snapshot of which chunks are present.
    #[must_use]
    pub fn present_bitmap(&self) -> ChunkBitmap {
        self.table.bitmap_of(ChunkState::Present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_move_only_from_their_states_and_count_present() {
        let m = ChunkMap::new(3);
        assert_eq!(m.try_claim(0), Ok(()));
        assert_eq!(m.try_claim(0), Err(Fetching));
        assert!(m.finish(0));
        assert_eq!(m.present_count(), 1);
        assert_eq!(m.try_reclaim(0), Ok(()));
        assert_eq!(m.present_count(), 0);
        assert_eq!(m.invalidate(0), Fetching);
        assert!(!m.finish(0), "an invalidated fetch does not finish");
        assert!(m.poison(1));
        assert_eq!(m.try_claim(1), Err(Poisoned));
        assert!(m.unpoison(1));
        assert_eq!(m.apply(2, &ChunkState::FINISH), Err(Absent));
        assert_eq!(m.present_bitmap().count(), 0);
        assert_eq!(m.apply(2, &ChunkState::DROP), Ok(Absent));
        assert_eq!(m.invalidate(2), Dropping, "a REMOVE leaves a drop alone");
        assert_eq!(m.try_claim(2), Err(Dropping));
        assert_eq!(m.apply(2, &ChunkState::DROPPED), Ok(Dropping));
        assert_eq!(m.try_claim(2), Ok(()));
    }

    #[test]
    fn every_state_round_trips_its_byte_and_has_a_name() {
        for s in [Absent, Fetching, Present, Poisoned, Dropping] {
            assert_eq!(ChunkState::from_u8(s.to_u8()), s);
            assert!(!s.name().is_empty());
        }
    }
}
