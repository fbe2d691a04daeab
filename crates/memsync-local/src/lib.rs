//! Local memsync stores: sparse memory, files and block devices, and directories of chunk files.
//!
//! | URL | Store |
//! | --- | --- |
//! | `mem:1G`, `mem:?size=1G&chunk=64K` | [`MemStore`]: sparse memory, lost when the process exits |
//! | `file:/path`, `file:///path?size=1G`, `file:/dev/vdb` | [`FileStore`]: a regular file or block device |
//! | `dir:/path?size=1G&chunk=64K` | [`DirStore`]: one file per chunk in a directory |
//!
//! [`register`] adds the three schemes to a [`memsync_core::Registry`]:
//!
//! ```
//! use memsync_core::{Registry, StoreExt};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> memsync_core::Result<()> {
//! let mut registry = Registry::new();
//! memsync_local::register(&mut registry);
//! let store = registry.open("mem:16M").await?;
//! store.write(100, memsync_core::Bytes::from_static(b"hello")).await?;
//! assert_eq!(&store.read_bytes(100, 5).await?[..], b"hello");
//! # Ok(()) }
//! ```

mod dir;
mod file;
mod mem;
mod register;
mod util;

pub use dir::{DirOptions, DirStore};
pub use file::{FileOptions, FileStore};
pub use mem::MemStore;
pub use register::register;
