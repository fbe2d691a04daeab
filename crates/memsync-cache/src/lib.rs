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
//! - [`proxy`]: a user-space TCP delay proxy (RTT, bandwidth cap, cuts) for tests and benchmarks.
//! - [`fuse`]: the cache (or any store) as a file `MOUNTPOINT/NAME` that the mounting user's
//!   processes (others only when allowed) can open, read, write and `mmap(MAP_SHARED)`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memsync_cache::{Cache, CacheConfig};
//! # async fn demo(remote: memsync_core::DynStore) -> memsync_core::Result<()> {
//! let cache = Arc::new(Cache::open(remote, "/var/cache/memsync/disk", CacheConfig::default()).await?);
//! // ... use it as a Store, or mount it with memsync_cache::fuse::mount ...
//! cache.close().await?; // flush to the remote, save the chunk map
//! # Ok(()) }
//! ```

mod cache;
pub mod config;
pub mod fuse;
pub mod map;
pub mod proxy;
mod reconnect;
mod stats;
pub mod window;

pub use cache::Cache;
pub use config::{CacheConfig, PullOrder};
pub use map::Reinit;
pub use proxy::{Proxy, ProxyConfig, ProxyStats};
pub use reconnect::{Opener, Reconnect};
pub use stats::{CacheStats, CacheStatsSnapshot};
pub use window::{Window, WindowLimits};
