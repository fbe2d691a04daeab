//! Chunk arithmetic ([`Geometry`]) and the lock-free per-chunk state table
//! ([`ChunkMap`]) that deduplicates concurrent fetches of one chunk: the
//! shared vocabulary of [`memsync_core::chunks`], re-exported here.

pub use memsync_core::chunks::{ChunkBitmap, ChunkMap, ChunkState, Geometry};
