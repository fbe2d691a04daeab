//! The NBD client: a [`Store`] backed by an NBD export.
//!
//! It negotiates fixed newstyle with GO (falling back to EXPORT_NAME), extended headers or
//! structured replies, `base:allocation` and optionally TLS, each only as far as the server
//! offers. Any number of requests are in flight on a connection; there is no reader task: the
//! waiting requests take turns reading replies, and a read's data goes straight from the
//! socket into the caller's buffer (see [`Conn`]). When the server advertises CAN_MULTI_CONN,
//! requests are spread round-robin over several connections, and large reads are split into
//! several requests in flight.

mod conn;
mod handshake;
mod store;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use memsync_core::{DynStore, Registry, Result, StoreError, StoreUrl};

use crate::proto::*;
use crate::transport::client_tls_config;
pub use handshake::{ExportInfo, handshake};
pub use store::NbdStore;

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub addr: NbdAddr,
    pub export: String,
    /// Use TLS (required: the connection fails if the server refuses it).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Name to verify the server certificate against (default: the host, or `localhost`).
    pub tls_hostname: Option<String>,
    /// Connections to open when the server allows multi-conn (default 4).
    pub connections: usize,
    /// Ask for extended headers (default true).
    pub extended_headers: bool,
    /// Ask for structured replies and `base:allocation` (default true).
    pub structured: bool,
    /// Limit for connecting and negotiating.
    pub timeout: Duration,
}

impl ClientConfig {
    pub fn new(addr: NbdAddr, export: impl Into<String>) -> Self {
        ClientConfig {
            addr,
            export: export.into(),
            tls: None,
            tls_hostname: None,
            connections: 4,
            extended_headers: true,
            structured: true,
            timeout: Duration::from_secs(30),
        }
    }
}

fn nbd_err(msg: impl Into<String>) -> StoreError {
    StoreError::backend(msg)
}

fn io_err(what: &str, e: io::Error) -> StoreError {
    StoreError::backend_with(format!("nbd: {what}"), e)
}

fn proto_err(e: ProtoError) -> StoreError {
    StoreError::backend_with("nbd: protocol error from server", e)
}

/// The host and port of an `nbd://` or `nbds://` URL; the port defaults to [`DEFAULT_PORT`].
pub(crate) fn host_port(url: &StoreUrl) -> Result<(String, u16)> {
    let a = url.authority.as_deref().unwrap_or("");
    if a.is_empty() {
        return Err(url.error("host", "missing (e.g. nbd://127.0.0.1:10809/export)"));
    }
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (
            h.to_owned(),
            p.parse::<u16>()
                .map_err(|_| url.error("port", format!("{p:?} is not a port number")))?,
        ),
        _ => (a.to_owned(), DEFAULT_PORT),
    };
    Ok((host, port))
}

/// Build a client configuration from an `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://`
/// URL.
pub fn config_from_url(url: &StoreUrl) -> Result<ClientConfig> {
    let (tls, unix) = match url.scheme.as_str() {
        "nbd" => (false, false),
        "nbd+unix" => (false, true),
        "nbds" => (true, false),
        "nbds+unix" => (true, true),
        s => return Err(url.error("scheme", format!("{s:?} is not an NBD scheme"))),
    };
    let mut known = vec!["connections"];
    if unix {
        known.push("socket");
    }
    if tls {
        known.extend(["tls-certificates", "tls-ca", "tls-hostname"]);
    }
    url.ensure_params(&known)?;
    let export = url.path.strip_prefix('/').unwrap_or(&url.path).to_owned();
    let addr = if unix {
        if url.authority.as_deref().is_some_and(|a| !a.is_empty()) {
            return Err(url.error(
                "host",
                "nbd+unix URLs take no host (nbd+unix:///export?socket=PATH)",
            ));
        }
        match url.param("socket") {
            Some(p) if !p.is_empty() => NbdAddr::Unix(PathBuf::from(p)),
            _ => {
                return Err(url.error(
                    "query parameter \"socket\"",
                    "missing (nbd+unix:///export?socket=PATH)",
                ));
            }
        }
    } else {
        let (host, port) = host_port(url)?;
        NbdAddr::Tcp { host, port }
    };
    let mut cfg = ClientConfig::new(addr, export);
    cfg.connections = url.count_param("connections", cfg.connections, 64)?;
    if tls {
        let ca = match (url.param("tls-ca"), url.param("tls-certificates")) {
            (Some(f), _) => PathBuf::from(f),
            (None, Some(d)) => PathBuf::from(d).join("ca-cert.pem"),
            (None, None) => {
                return Err(url.error(
                    "query",
                    "nbds needs tls-certificates=DIR (with ca-cert.pem) or tls-ca=FILE",
                ));
            }
        };
        cfg.tls = Some(client_tls_config(&ca).map_err(|e| url.error("TLS", e))?);
        cfg.tls_hostname = url.param("tls-hostname").map(str::to_owned);
    }
    Ok(cfg)
}

/// Register `nbd`, `nbd+unix`, `nbds` and `nbds+unix` store URLs.
pub fn register(reg: &mut Registry) {
    async fn open(url: StoreUrl) -> Result<DynStore> {
        let cfg = config_from_url(&url)?;
        let s = NbdStore::connect(cfg)
            .await
            .map_err(|e| e.context(format!("opening {url}")))?;
        Ok(Arc::new(s))
    }
    reg.register(
        "nbd",
        "nbd://HOST[:PORT]/EXPORT[?connections=4]  an NBD export over TCP",
        open,
    );
    reg.register(
        "nbd+unix",
        "nbd+unix:///EXPORT?socket=PATH  an NBD export over a unix socket",
        open,
    );
    reg.register(
        "nbds",
        "nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR|tls-ca=FILE  NBD over TLS",
        open,
    );
    reg.register(
        "nbds+unix",
        "nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR  NBD over TLS on a unix socket",
        open,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c =
            config_from_url(&StoreUrl::parse("nbd://127.0.0.1:1234/exp?connections=2").unwrap())
                .unwrap();
        assert_eq!(
            c.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!((c.export.as_str(), c.connections), ("exp", 2));
        let c = config_from_url(&StoreUrl::parse("nbd://localhost").unwrap()).unwrap();
        assert_eq!(
            c.addr,
            NbdAddr::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        assert_eq!(c.export, "");
        let c =
            config_from_url(&StoreUrl::parse("nbd+unix:///e?socket=/tmp/s.sock").unwrap()).unwrap();
        assert_eq!(c.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert!(config_from_url(&StoreUrl::parse("nbd+unix:///e").unwrap()).is_err());
        assert!(config_from_url(&StoreUrl::parse("nbds://h/e").unwrap()).is_err());
        assert!(config_from_url(&StoreUrl::parse("nbd://h/e?tls-ca=x").unwrap()).is_err());
        assert!(config_from_url(&StoreUrl::parse("nbd://h:99999/e").unwrap()).is_err());
    }
}
