//! Managed mounts for memsync: a local cache over a remote store, and ways to reach it.
//!
//! - [`Cache`]: a [`memsync_core::Store`] made of a remote store and a local copy in a cache
//!   directory. Per-chunk states ([`memsync_core::chunks::CacheState`]: missing, fetching,
//!   clean, dirty, writing back) in an atomic table changed only by their named transitions;
//!   reads through the cache with shared misses; write-back with per-chunk coalescing; a
//!   background puller in a pluggable [`PullOrder`] (the core's `PullPriority`) with hints that yields to demand
//!   misses; a background pusher; `flush` that returns only when the remote holds every earlier
//!   write; a persisted chunk map so that a restart resumes without refetching; remote requests
//!   pipelined with an adaptive [`window`].
//! - [`Reconnect`]: reopens a remote store after its connection fails, so that the cache's
//!   retries can succeed once the remote is back.
//! - [`open_cache`]: a cache of a remote given by its URL, as `memsync mount` opens one.
//!
//! Frontends are not here: `memsync-fuse` exposes a cache (or any store) as a file, `memsync-nbd`
//! as an export, `memsync-region` as memory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memsync_cache::{Cache, CacheConfig};
//! # async fn demo(remote: memsync_core::DynStore) -> memsync_core::Result<()> {
//! let cache = Arc::new(Cache::open(remote, "/var/cache/memsync/disk", CacheConfig::default()).await?);
//! // ... use it as a Store, or mount it with memsync_fuse::mount ...
//! cache.close().await?; // flush to the remote, save the chunk map
//! # Ok(()) }
//! ```

mod cache;
pub mod config;
pub mod map;
pub mod open;
mod reconnect;
mod stats;
pub mod window;

pub use cache::Cache;
pub use config::{CacheConfig, PullOrder};
pub use map::Reinit;
pub use open::{open_cache, reconnecting, remote_identity, remote_pair};
pub use reconnect::{Opener, Reconnect};
pub use stats::{CacheStats, CacheStatsSnapshot};
pub use window::{Window, WindowLimits};
