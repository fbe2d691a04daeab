//! The states of a cache's chunks ([`CacheState`]): a local copy of a
//! remote store, filled on demand and in the background, written back
//! later. Every transition is declared here, once; the cache applies only
//! these.

use super::table::{State, StateTable, Transition};

/// Where a cached chunk's data is, relative to the remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheState {
    /// Only in the remote: a read fetches it.
    Missing,
    /// One party owns the chunk: a fetch (demand miss, background pull,
    /// adoption of a zero extent) or a write that replaces it whole. Other
    /// readers and writers wait for the owner.
    Fetching,
    /// In the local copy and identical to the remote.
    Clean,
    /// In the local copy, with writes the remote does not have yet.
    Dirty,
    /// Dirty, and being written back: the pusher captured its data.
    /// A write meanwhile makes it [`Dirty`](Self::Dirty) again, so the
    /// write-back's end does not mark newer data clean.
    WritingBack,
}

impl CacheState {
    /// Whether the local copy holds the chunk's data (clean or not).
    #[must_use]
    pub fn is_local(self) -> bool {
        matches!(self, Self::Clean | Self::Dirty | Self::WritingBack)
    }

    /// Whether the chunk holds writes the remote may not have.
    #[must_use]
    pub fn is_dirty(self) -> bool {
        matches!(self, Self::Dirty | Self::WritingBack)
    }
}

impl State for CacheState {
    const INITIAL: Self = Self::Missing;

    fn to_u8(self) -> u8 {
        match self {
            Self::Missing => 0,
            Self::Fetching => 1,
            Self::Clean => 2,
            Self::Dirty => 3,
            Self::WritingBack => 4,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Missing,
            1 => Self::Fetching,
            2 => Self::Clean,
            3 => Self::Dirty,
            _ => Self::WritingBack,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Fetching => "fetching",
            Self::Clean => "clean",
            Self::Dirty => "dirty",
            Self::WritingBack => "writing back",
        }
    }

    /// Local chunks are counted: the count is the pull's progress.
    fn counted(self) -> bool {
        self.is_local()
    }
}

use CacheState::{Clean, Dirty, Fetching, Missing, WritingBack};

impl CacheState {
    /// Missing → Fetching: take a missing chunk to fetch it, or to write
    /// it whole (no fetch needed).
    pub const CLAIM: Transition<Self> = Transition {
        name: "claim",
        from: &[Missing],
        to: Fetching,
    };
    /// Fetching → Missing: the owner gave up (the fetch failed or was
    /// cancelled); waiters look again.
    pub const ABANDON: Transition<Self> = Transition {
        name: "abandon",
        from: &[Fetching],
        to: Missing,
    };
    /// Fetching → Clean: the remote's data is in the local copy.
    pub const FILL: Transition<Self> = Transition {
        name: "fill",
        from: &[Fetching],
        to: Clean,
    };
    /// Fetching → Dirty: a write replaced the claimed chunk whole.
    pub const OVERWRITE: Transition<Self> = Transition {
        name: "overwrite",
        from: &[Fetching],
        to: Dirty,
    };
    /// Clean, Dirty or WritingBack → Dirty: a write reached the local copy
    /// (its write generation was bumped first, see the cache's pusher).
    pub const WRITE: Transition<Self> = Transition {
        name: "write",
        from: &[Clean, Dirty, WritingBack],
        to: Dirty,
    };
    /// Dirty → WritingBack: the pusher takes the chunk to write it back.
    pub const PUSH: Transition<Self> = Transition {
        name: "push",
        from: &[Dirty],
        to: WritingBack,
    };
    /// WritingBack → Clean: the remote flushed what was pushed, and no
    /// write came meanwhile.
    pub const PUSHED: Transition<Self> = Transition {
        name: "pushed",
        from: &[WritingBack],
        to: Clean,
    };
    /// WritingBack → Dirty: the write-back failed, or its flush does not
    /// cover it (a connection lost before the flush): push it again.
    pub const UNPUSH: Transition<Self> = Transition {
        name: "unpush",
        from: &[WritingBack],
        to: Dirty,
    };

    /// Every transition, for tests and diagrams.
    pub const ALL: [&'static Transition<Self>; 8] = [
        &Self::CLAIM,
        &Self::ABANDON,
        &Self::FILL,
        &Self::OVERWRITE,
        &Self::WRITE,
        &Self::PUSH,
        &Self::PUSHED,
        &Self::UNPUSH,
    ];
}

/// The chunk table of a cache.
pub type CacheTable = StateTable<CacheState>;

impl CacheTable {
    /// Claims up to `max` consecutive missing chunks from `first`
    /// ([`CacheState::CLAIM`]); returns how many (0 if `first` was not
    /// missing). The run stops at the first chunk it cannot claim.
    pub fn claim_run(&self, first: usize, max: usize) -> usize {
        let mut n = 0;
        while n < max && first + n < self.len() && self.apply(first + n, &CacheState::CLAIM).is_ok()
        {
            n += 1;
        }
        n
    }

    /// Applies `t` to chunks `first..first + n`, which the caller owns (so
    /// `t` must leave their state).
    ///
    /// # Panics
    ///
    /// In debug builds, if a chunk was not in a state `t` leaves: an owner
    /// lost its chunk, a bug.
    pub fn apply_run(&self, first: usize, n: usize, t: &Transition<CacheState>) {
        for c in first..first + n {
            let r = self.apply(c, t);
            debug_assert!(r.is_ok(), "chunk {c}: {} from {:?}", t.name, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_move_only_from_their_states_and_count_local_chunks() {
        let t = CacheTable::new(4);
        assert_eq!(t.claim_run(0, 3), 3);
        assert_eq!(t.claim_run(1, 3), 0, "claimed already");
        assert_eq!(t.count(), 0);
        t.apply_run(0, 1, &CacheState::FILL);
        t.apply_run(1, 1, &CacheState::OVERWRITE);
        t.apply_run(2, 1, &CacheState::ABANDON);
        assert_eq!(t.count(), 2);
        assert_eq!(t.apply(0, &CacheState::PUSH), Err(Clean));
        assert_eq!(t.apply(1, &CacheState::PUSH), Ok(Dirty));
        // A write during the write-back: the write-back's end leaves it dirty.
        assert_eq!(t.apply(1, &CacheState::WRITE), Ok(WritingBack));
        assert_eq!(t.apply(1, &CacheState::PUSHED), Err(Dirty));
        assert_eq!(t.apply(2, &CacheState::WRITE), Err(Missing));
        assert_eq!(t.count(), 2);
        assert_eq!(t.count_where(CacheState::is_dirty), 1);
        let r = CacheTable::from_states([Clean, Dirty, Missing]);
        assert_eq!(r.count(), 2);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![Clean, Dirty, Missing]);
    }

    #[test]
    fn every_state_round_trips_its_byte_and_has_a_name() {
        for s in [Missing, Fetching, Clean, Dirty, WritingBack] {
            assert_eq!(CacheState::from_u8(s.to_u8()), s);
            assert!(!s.name().is_empty());
        }
        for t in CacheState::ALL {
            assert!(!t.from.contains(&t.to) || t.to == Dirty, "{}", t.name);
        }
    }
}
