//! Delta synchronisation of memsync stores: `memsync sync SRC DST`.
//!
//! Both sides compute a strong digest (BLAKE3) per chunk, where their data is; only chunks whose
//! digests differ are looked at, and inside those only the 4 KiB pages whose digests differ are
//! sent, checked against the chunk's strong digest before they are written ([`dest`]).
//! A local file keeps its digests in a persisted index, so an unchanged file is not hashed
//! again ([`index`]). Holes and zero pages are never sent as data. A destination can be any
//! store in this process ([`dest::LocalDest`]) or a memsync peer over TCP or TLS
//! ([`peer`], protocol in `PROTOCOL.md`); a peer can also be the source ([`pull`]). After a
//! first sync, [`track::Pusher`] sends only what
//! a [`track::ChangeSource`] reports changed, round by round.
//!
//! # What a reader of the destination sees, and what an interruption leaves
//! - A sync is not atomic for a concurrent reader of the destination: chunks change one after
//!   another, and the runs of one chunk are separate writes. Each chunk goes from its old bytes
//!   to the new ones; a reader can see a chunk in between only while its runs are written.
//! - Interrupted (network cut, error, SIGINT): every chunk the report lists as updated is new,
//!   every chunk in `pending` and not in `uncertain` is old. A chunk in `uncertain` had its
//!   patch sent or being written: a live peer applies a patch that arrived whole entirely or
//!   not at all, so it is old or new; after a local write error or a killed peer it may be
//!   partly written. Running the sync again completes it either way (digests decide).
//! - The destination's index is saved only after a flush with no failed write, and the
//!   source's only if the file did not change while it was hashed.

pub mod delta;
pub mod dest;
pub mod digest;
pub mod engine;
pub mod index;
pub mod peer;
pub mod proto;
pub mod pull;
pub mod track;

pub use dest::{Dest, DynDest, LocalDest};
pub use engine::{
    DEFAULT_CHUNK, NoProgress, Progress, Report, Source, SyncError, SyncOptions, sync,
};
pub use peer::{Connect, Peer, PeerAddr, PeerConfig, RemoteDest, is_peer_url};
pub use pull::pull;
pub use track::{ChangeSource, Pusher, Rescan, Round, Tracked};
