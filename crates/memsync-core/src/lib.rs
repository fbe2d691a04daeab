//! The core of memsync: the [`Store`] trait, layers that stack on any store, and store URLs.
//!
//! A *store* is a fixed-size, byte-addressable resource (memory, a file, a directory of chunk
//! files, an NBD export, Redis, S3, ...). *Layers* wrap a store and are stores themselves, like
//! nbdkit filters. *Frontends* (in other crates) expose a store as memory, a file or an NBD
//! export.
//!
//! ```
//! use memsync_core::{Registry, StoreExt};
//! # async fn demo(registry: Registry) -> memsync_core::Result<()> {
//! // A registry with the local stores registered (see `memsync_local::register`).
//! let store = registry.open("mem:16M").await?;
//! store.write(0, bytes::Bytes::from_static(b"memsync")).await?;
//! assert_eq!(&store.read_bytes(0, 7).await?[..], b"memsync");
//! # Ok(()) }
//! ```

pub mod chunks;
pub mod error;
pub mod exec;
pub mod id;
pub mod layers;
pub mod meta;
pub mod ops;
pub mod range;
pub mod retry;
pub mod size;
pub mod store;
pub mod url;
pub mod wire;

pub use error::{Result, StoreError};
pub use id::StoreId;
pub use meta::{MetaInit, StoreMeta};
pub use retry::{Retry, RetryPolicy};
pub use store::{
    Caps, DynStore, Extent, ExtentKind, SharedMemory, Store, StoreExt, check_range, check_write,
};
pub use url::{Registry, StoreUrl, redact};

/// Re-exported so that store implementations use the same `async_trait` and `Bytes`.
pub use async_trait::async_trait;
pub use bytes::{Bytes, BytesMut};
