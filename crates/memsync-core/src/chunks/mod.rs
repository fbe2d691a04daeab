//! The chunk vocabulary shared by the layers that move data chunk by chunk:
//! [`Geometry`] (how bytes split into chunks and pages), a typed atomic
//! state table with its transitions named in one place ([`StateTable`],
//! [`Transition`]), the lazy-fill states of a memory region
//! ([`ChunkState`], [`ChunkMap`]), the states of a cache's chunks
//! ([`CacheState`], [`CacheTable`]), a [`ChunkBitmap`], and background pull
//! orders ([`PullPriority`], [`Sequential`], [`FollowFaults`],
//! [`HintsFirst`]) with their [`PullProgress`].
//!
//! Plain data structures without system calls: their invariants are
//! tested on their own.

mod bitmap;
mod cache_state;
mod geometry;
mod order;
mod state;
mod table;

pub use bitmap::{AtomicChunkBitmap, ChunkBitmap};
pub use cache_state::{CacheState, CacheTable};
pub use geometry::Geometry;
pub use order::{
    FollowFaults, HintsFirst, PullLease, PullPriority, PullProgress, PullView, Sequential,
    background_pull, current_pull,
};
pub use state::{ChunkMap, ChunkState};
pub use table::{State, StateTable, Transition};
