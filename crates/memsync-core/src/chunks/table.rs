//! [`StateTable`]: one typed state per chunk in an atomic array, changed
//! only by named [`Transition`]s.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::ChunkBitmap;

/// A chunk state kept in a [`StateTable`]: a small enum encoded in a byte.
pub trait State: Copy + Eq + fmt::Debug + Send + Sync + 'static {
    /// The state every chunk starts in.
    const INITIAL: Self;

    /// The state's byte.
    fn to_u8(self) -> u8;

    /// The state of a byte written by [`to_u8`](Self::to_u8).
    fn from_u8(v: u8) -> Self;

    /// The state's name, for logs and assertion messages.
    fn name(self) -> &'static str;

    /// Whether chunks in this state are counted by
    /// [`StateTable::count`] (e.g. present chunks).
    fn counted(self) -> bool {
        false
    }
}

/// A named transition: from any of `from` to `to`, in one compare-and-swap.
/// The states and their transitions are declared as constants next to the
/// state type, so the rules of a state machine live in one place.
#[derive(Debug)]
pub struct Transition<S: 'static> {
    /// The transition's name.
    pub name: &'static str,
    /// The states it leaves.
    pub from: &'static [S],
    /// The state it enters.
    pub to: S,
}

/// One [`State`] per chunk, plus a count of chunks in counted states.
///
/// Every change is a [`Transition`] applied with a compare-and-swap, so of
/// several parties applying transitions to one chunk at once each sees a
/// consistent predecessor, and exactly one wins a transition out of a
/// given state.
pub struct StateTable<S: State> {
    states: Box<[AtomicU8]>,
    counted: AtomicUsize,
    _s: PhantomData<S>,
}

impl<S: State> fmt::Debug for StateTable<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateTable")
            .field("len", &self.len())
            .field("counted", &self.count())
            .finish()
    }
}

impl<S: State> StateTable<S> {
    /// `n` chunks in [`State::INITIAL`].
    #[must_use]
    pub fn new(n: usize) -> Self {
        let init = S::INITIAL.to_u8();
        Self {
            states: (0..n).map(|_| AtomicU8::new(init)).collect(),
            counted: AtomicUsize::new(if S::INITIAL.counted() { n } else { 0 }),
            _s: PhantomData,
        }
    }

    /// A table restored from saved states (a persisted chunk map read back
    /// at start-up), not reached by transitions.
    #[must_use]
    pub fn from_states(states: impl IntoIterator<Item = S>) -> Self {
        let mut counted = 0;
        let states: Box<[AtomicU8]> = states
            .into_iter()
            .map(|s| {
                counted += usize::from(s.counted());
                AtomicU8::new(s.to_u8())
            })
            .collect();
        Self {
            states,
            counted: AtomicUsize::new(counted),
            _s: PhantomData,
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
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    #[must_use]
    pub fn get(&self, i: usize) -> S {
        S::from_u8(self.states[i].load(Ordering::Acquire))
    }

    /// Applies `t` to chunk `i`: `Ok(previous state)` if the chunk was in
    /// one of `t.from` (it is in `t.to` now), otherwise `Err(current
    /// state)` and nothing changed.
    ///
    /// # Errors
    ///
    /// The chunk's state if `t` does not leave it.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn apply(&self, i: usize, t: &Transition<S>) -> Result<S, S> {
        let cell = &self.states[i];
        let mut cur = S::from_u8(cell.load(Ordering::Acquire));
        loop {
            if !t.from.contains(&cur) {
                return Err(cur);
            }
            match cell.compare_exchange(
                cur.to_u8(),
                t.to.to_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    match (cur.counted(), t.to.counted()) {
                        (false, true) => {
                            self.counted.fetch_add(1, Ordering::AcqRel);
                        }
                        (true, false) => {
                            self.counted.fetch_sub(1, Ordering::AcqRel);
                        }
                        _ => {}
                    }
                    return Ok(cur);
                }
                Err(v) => cur = S::from_u8(v),
            }
        }
    }

    /// Number of chunks in counted states.
    #[must_use]
    pub fn count(&self) -> usize {
        self.counted.load(Ordering::Acquire)
    }

    /// Every chunk's state, in index order (each read on its own: a
    /// snapshot only where no transition runs concurrently).
    pub fn iter(&self) -> impl Iterator<Item = S> + '_ {
        self.states
            .iter()
            .map(|c| S::from_u8(c.load(Ordering::Acquire)))
    }

    /// Number of chunks whose state satisfies `f` (a scan).
    #[must_use]
    pub fn count_where(&self, f: impl Fn(S) -> bool) -> usize {
        self.iter().filter(|&s| f(s)).count()
    }

    /// Whether any chunk is in state `s`.
    #[must_use]
    pub fn any(&self, s: S) -> bool {
        let b = s.to_u8();
        self.states.iter().any(|c| c.load(Ordering::Acquire) == b)
    }

    /// A snapshot of which chunks are in state `s`.
    #[must_use]
    pub fn bitmap_of(&self, s: S) -> ChunkBitmap {
        let b = s.to_u8();
        let mut words = vec![0u64; self.len().div_ceil(64)];
        for (i, c) in self.states.iter().enumerate() {
            if c.load(Ordering::Acquire) == b {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        ChunkBitmap::from_words(words, self.len())
    }
}
