//! Distributed shared memory on the memsync region engine: one region mapped by several
//! nodes, kept coherent page by page with Ivy's protocol (multiple readers, one writer,
//! write-invalidate), with the three manager schemes of Li and Hudak (centralized, fixed
//! distributed, dynamic distributed with probable owners). The protocol, its messages and the
//! state machines are in this crate's `PROTOCOL.md`.
//!
//! ```no_run
//! use memsync_dsm::{DsmConfig, Node, Scheme};
//! # fn demo() -> Result<(), memsync_dsm::DsmError> {
//! let peers = vec!["10.0.0.1:7000".to_owned(), "10.0.0.2:7000".to_owned()];
//! let node = Node::bind_and_start(DsmConfig::new(0, peers, Scheme::Dynamic, 1 << 20))?;
//! node.atomic_u64(0).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//! # Ok(()) }
//! ```
//!
//! How the protocol maps onto the engine:
//!
//! * every page is installed write-protected (`WriteTracking::Protect`, the whole region
//!   protected at start), so a node's first write to a page it reads faults;
//! * a missing page is a read fault: the region's [`ChunkSource`](memsync_region::ChunkSource)
//!   asks the manager or probable owner for a read copy, on the engine's handler thread;
//! * a write-protect fault holds the writer and obtains ownership on the node's runtime,
//!   invalidating the copyset, then lifts the protection (`unprotect`), which wakes it;
//! * an invalidation drops the page (`invalidate`), a downgrade write-protects it (`protect`).
//!
//! Node loss: a node whose connection ends is down. The pages whose only copy was on it are
//! reported lost (the API's [`DsmError::Page`], `SIGBUS` for an access once the fault deadline
//! passes), or, with a backing store, reloaded from what was last flushed to it
//! ([`Node::flush`]); never served with wrong data. With a manager (centralized, fixed) the
//! manager does this for the pages whose owner died. With the dynamic scheme the *heir*, the
//! lowest-numbered live node, does it on demand: a request whose probable-owner chain reaches
//! a dead node goes to the heir, which asks every live node what it knows of the page and
//! repoints to a live owner, makes the holder of the newest read copy the owner, reloads the
//! page, or finds it lost (`PROTOCOL.md`, "Node loss, dynamic scheme").

pub mod manager;
mod net;
mod node;
pub mod proto;

pub use manager::{Centralized, DynamicDistributed, FixedDistributed, Manager, Scheme};
pub use net::DsmTls;
pub use node::{Access, DsmConfig, DsmError, DsmStats, Node};
pub use proto::NodeId;
