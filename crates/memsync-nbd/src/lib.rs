//! NBD (Network Block Device) for memsync: a server that exports any store, and a client
//! that is a store.
//!
//! - [`proto`]: the wire format, as pure panic-free parsers and encoders.
//! - [`server`]: fixed-newstyle server with INFO/GO, structured replies, `base:allocation`,
//!   extended headers, STARTTLS, multi-conn and many requests in flight.
//! - [`device`]: a store as `/dev/nbdN` through the kernel's NBD client (netlink or ioctl),
//!   served on socket pairs inside the process.
//! - [`client`]: the same features negotiated down to what a server offers; implements
//!   [`memsync_core::Store`]. [`register`] adds `nbd://`, `nbd+unix://`, `nbds://` and
//!   `nbds+unix://` store URLs.

pub mod client;
#[cfg(target_os = "linux")]
pub mod device;
pub mod proto;
pub mod server;
pub mod transport;

pub use client::{ClientConfig, NbdAddr, NbdStore, register};
pub use server::{Export, ListenAddr, Server, ServerConfig, ServerStats, TlsMode, bind_unix};
pub use transport::{client_tls_config, client_tls_from_url, server_tls_config};
