//! Live migration of a memsync store or region: pre-copy, post-copy and hybrid.
//!
//! A source ([`migrate`]) sends a region to a destination ([`receive`]) over three connections
//! (TCP, a unix socket, or TLS): *control* (geometry, pass marks, switch-over, recovery), *bulk*
//! (the background stream of chunks) and *urgent* (post-copy requests for missing chunks and
//! their answers, never queued behind the bulk stream). The protocol and both state machines
//! are in `PROTOCOL.md`.
//!
//! - **Pre-copy**: one full pass, then passes over the chunks a [`ChangeSource`] reports
//!   dirty while the application runs; switch over when the dirty bytes at the bandwidth the
//!   last pass measured fit [`SourceConfig::max_downtime`]; stop after
//!   [`SourceConfig::max_growing_passes`] passes that grew or [`SourceConfig::max_passes`]
//!   passes (KVM's rule), then stop-and-copy or post-copy ([`Fallback`]).
//! - **Post-copy**: suspend at once; the destination's [`Target`] marks every chunk missing and
//!   its readers request a missing chunk on the urgent connection; the background stream
//!   continues after the faulted chunk.
//! - **Hybrid**: pre-copy passes, then post-copy of the dirty rest.
//! - Zero chunks are sent as runs (ZERO), never as bytes.
//! - **Failures**: before the commit anything aborts and the source resumes unchanged
//!   ([`MigrateError::Aborted`]). After it, a cut pauses the destination's faults (they wait)
//!   until the source reconnects and learns which chunks the destination holds.
//!
//! What is migrated at the destination is a [`Target`]: [`StoreTarget`] receives into any store
//! and is the store the destination's application uses. The application is suspended and
//! resumed by [`Hooks`] ([`SignalHooks`]: SIGSTOP/SIGCONT of a pid; [`CommandHooks`]).
//!
//! [`ChangeSource`]: memsync_sync::ChangeSource

mod background;
pub mod dest;
pub mod hooks;
pub mod net;
pub mod proto;
pub mod region;
pub mod set;
pub mod source;
pub mod target;

pub use dest::{DestConfig, DestReport, receive};
pub use hooks::{CommandHooks, Gate, GatePass, Hooks, NoHooks, SignalHooks};
pub use net::{Dialer, Endpoint, Listener, is_migrate_url};
pub use region::{RegionSource, RegionTarget, migrate_region, receive_region};
pub use set::ChunkSet;
pub use source::{
    Fallback, MigrateError, Mode, Pass, Report, SourceConfig, SwitchReason, Throttle, Verify,
    migrate,
};
pub use target::{Faults, StoreTarget, Target};
