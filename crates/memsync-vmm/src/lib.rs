//! VM snapshot memory from any memsync store.
//!
//! * [`firecracker`]: a page-fault handler for Firecracker's snapshot
//!   restore with a UFFD memory backend (`"backend_type": "Uffd"`). The VMM
//!   connects to the handler's socket and sends one message: its guest
//!   memory's userfaultfd (`SCM_RIGHTS`) and a JSON array of regions. Faults
//!   are served from a store by the same fault engine as memsync's lazy
//!   regions ([`memsync_region::ForeignRegion`]), with a background pull of
//!   the whole memory from the first fault on.
//! * [`ch`]: the sending side of Cloud Hypervisor's local migration protocol
//!   for an on-demand restore (`receive-migration ...,memory_mode=postcopy`):
//!   the VM's configuration and state from files, its memory from a store,
//!   page by page as the VM touches it.
//!
//! Both read guest memory from a [`SnapshotSource`]: a window of a store
//! that reads as zeros where the guest dropped pages (balloon).

pub mod ch;
pub mod firecracker;
mod hint;
mod source;

pub use hint::HintOrder;
pub use source::SnapshotSource;

/// An error of this crate: what went wrong, in one line with its cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer sent something this side cannot accept.
    #[error("{0}")]
    Protocol(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The region engine refused or failed.
    #[error(transparent)]
    Region(#[from] memsync_region::Error),
    /// The store failed.
    #[error("{context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: memsync_core::StoreError,
    },
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
