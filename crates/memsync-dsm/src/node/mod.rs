//! A DSM node: a region (the engine) whose missing faults fetch read copies, whose
//! write-protect faults obtain ownership, and a message handler that serves copies,
//! invalidations and downgrades (`PROTOCOL.md`, "Node").
//!
//! One concern per file. Imports and calls run one way, from the top down; the one call back
//! up is `Shared::send` to this node itself, which loops back through `dispatch`:
//!
//! ```text
//!  api.rs       Node: start (checks, state, region, connections) and the API
//!  connect.rs   the connections to the other nodes, and `dispatch` of what arrives
//!  recovery.rs  node loss: node_down, late grants (adopt), the dynamic scheme's heir
//!               (RECOVER, WHO, HAVE, TAKE)
//!  serve.rs     the serving side: the manager (manage, owner_died), the owner (serve),
//!               a copy holder (INVALIDATE)
//!  fault.rs     the requesting side: the region's source and hooks, read and write faults,
//!               invalidation of the copyset
//!  state.rs     the node's shared state (Shared, the per-page state), sending, the heir
//!  config.rs    the public types: DsmConfig, DsmError, Access, DsmStats
//! ```

mod api;
mod config;
mod connect;
mod fault;
mod recovery;
mod serve;
mod state;
#[cfg(test)]
mod tests;

pub use api::Node;
pub use config::{Access, DsmConfig, DsmError, DsmStats};
