//! What can go wrong: creating a region ([`Error`]) and fetching a chunk
//! ([`ChunkError`]).

use std::io;
use std::time::SystemTime;

use memsync_core::StoreError;

/// Why a region could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store failed (e.g. while reporting its extents).
    #[error("{context}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The configuration or the kernel cannot work together.
    #[error("invalid region configuration: {0}")]
    Config(String),
}

pub(crate) fn sys(context: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Sys { context, source }
}

/// A chunk the region could not fetch: reported by
/// [`LazyRegion::last_error`](crate::LazyRegion::last_error), [`LazyRegion::errors`](crate::LazyRegion::errors) and returned by
/// [`LazyRegion::read_at`](crate::LazyRegion::read_at)/[`LazyRegion::write_at`](crate::LazyRegion::write_at).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chunk {chunk} (bytes {offset}+{len}) could not be fetched after {attempts} attempt(s){}: {message}", if *.poisoned { ", poisoned" } else { "" })]
pub struct ChunkError {
    /// Chunk index.
    pub chunk: usize,
    /// Byte offset of the chunk.
    pub offset: u64,
    /// Bytes of data in the chunk.
    pub len: u64,
    /// Store reads attempted.
    pub attempts: u32,
    /// Whether the chunk's pages were poisoned (accesses raise `SIGBUS`).
    pub poisoned: bool,
    /// The last error, with its cause chain.
    pub message: String,
    /// When the fetch was given up.
    pub at: SystemTime,
}
