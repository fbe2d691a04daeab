//! The chunk vocabulary shared by the layers that move data chunk by chunk:
//! [`Geometry`] (how bytes split into chunks and pages), a typed atomic
//! state table with its transitions named in one place ([`StateTable`],
//! [`Transition`]), the lazy-fill states of a memory region
//! ([`ChunkState`], [`ChunkMap`]), a [`ChunkBitmap`], and background pull
//! orders ([`PullPriority`], [`Sequential`], [`FollowFaults`]).
//!
//! Plain data structures without system calls: their invariants are
//! tested on their own.

mod bitmap;
mod geometry;
mod order;
mod state;
mod table;

pub use bitmap::{AtomicChunkBitmap, ChunkBitmap};
pub use geometry::Geometry;
pub use order::{FollowFaults, PullPriority, PullView, Sequential};
pub use state::{ChunkMap, ChunkState};
pub use table::{State, StateTable, Transition};
