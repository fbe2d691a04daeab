//! Connections of a migration: TCP, unix sockets, TLS on TCP (rustls with ring, through
//! memsync-nbd's configuration helpers and [`Transport`] halves, as the sync peer does), and
//! frame I/O on them.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use memsync_core::wire;
use memsync_core::{Result, StoreError, StoreUrl};
use memsync_nbd::transport::Transport;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::proto::Msg;

pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// One connected byte stream, split.
pub struct Conn {
    pub r: BoxRead,
    pub w: BoxWrite,
    /// Who is at the other end (for messages).
    pub peer: String,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conn({})", self.peer)
    }
}

fn conn<T: Transport>(t: T, peer: String) -> Conn {
    let (r, w) = t.halves();
    Conn {
        r: Box::new(r),
        w: Box::new(w),
        peer,
    }
}

/// Where a destination listens: `migrate://HOST:PORT`, `migrates://HOST:PORT?tls-ca=FILE
/// [&tls-hostname=NAME]` (TLS) or `migrate+unix:///PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The source's way to reach a destination (it opens every connection).
#[derive(Clone)]
pub struct Dialer {
    pub endpoint: Endpoint,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// Limit on connecting plus the TLS handshake.
    pub connect_timeout: Duration,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dialer({}, tls: {})", self.endpoint, self.tls.is_some())
    }
}

/// The URL schemes of a migration destination.
pub fn is_migrate_url(s: &str) -> bool {
    ["migrate://", "migrates://", "migrate+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
}

impl Dialer {
    pub fn new(endpoint: Endpoint) -> Self {
        Dialer {
            endpoint,
            tls: None,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// `migrate://HOST:PORT`, `migrates://HOST:PORT?tls-ca=FILE[&tls-hostname=NAME]`,
    /// `migrate+unix:///PATH`.
    pub fn parse(s: &str) -> Result<Self> {
        let url = StoreUrl::parse(s)?;
        match url.scheme.as_str() {
            "migrate+unix" => {
                url.ensure_params(&[])?;
                if url.path.is_empty() {
                    return Err(url.error("path", "expected migrate+unix:///PATH"));
                }
                Ok(Dialer::new(Endpoint::Unix(PathBuf::from(&url.path))))
            }
            "migrate" | "migrates" => {
                let tls = url.scheme == "migrates";
                url.ensure_params(if tls {
                    &["tls-ca", "tls-hostname"]
                } else {
                    &[]
                })?;
                let addr = url
                    .authority
                    .clone()
                    .filter(|a| !a.is_empty() && a.contains(':'))
                    .ok_or_else(|| url.error("host", "expected HOST:PORT"))?;
                let mut d = Dialer::new(Endpoint::Tcp(addr.clone()));
                if tls {
                    d.tls = Some(memsync_nbd::client_tls_from_url(&url, &addr, "migrates")?);
                }
                Ok(d)
            }
            _ => Err(url.error(
                "scheme",
                "a migration destination is migrate://, migrates:// or migrate+unix://",
            )),
        }
    }

    /// Open one connection.
    pub async fn dial(&self) -> io::Result<Conn> {
        let peer = self.endpoint.to_string();
        let fut = async {
            match &self.endpoint {
                Endpoint::Unix(p) => Ok(conn(UnixStream::connect(p).await?, peer.clone())),
                Endpoint::Tcp(a) => {
                    let tcp = TcpStream::connect(a).await?;
                    let _ = tcp.set_nodelay(true);
                    match &self.tls {
                        Some((cfg, name)) => {
                            let t = tokio_rustls::TlsConnector::from(cfg.clone())
                                .connect(name.clone(), tcp)
                                .await?;
                            Ok(conn(t, peer.clone()))
                        }
                        None => Ok(conn(tcp, peer.clone())),
                    }
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {peer}")))?
    }
}

enum Inner {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A destination's listening socket.
pub struct Listener {
    inner: Inner,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Listener({}, tls: {})", self.local(), self.tls.is_some())
    }
}

impl Listener {
    /// Listen on `HOST:PORT` (port 0 picks one) or, with a `unix:` prefix or a path with a
    /// `/`, on a unix socket.
    pub async fn bind(at: &str, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Self> {
        let inner = match at.strip_prefix("unix:") {
            Some(p) => Inner::Unix(UnixListener::bind(p)?, PathBuf::from(p)),
            None if at.starts_with('/') => Inner::Unix(UnixListener::bind(at)?, PathBuf::from(at)),
            None => Inner::Tcp(TcpListener::bind(at).await?),
        };
        if tls.is_some() && matches!(inner, Inner::Unix(..)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is for TCP listeners (a unix socket is already local)",
            ));
        }
        Ok(Listener { inner, tls })
    }

    /// What a source dials: `HOST:PORT` or `unix:PATH`.
    pub fn local(&self) -> String {
        match &self.inner {
            Inner::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Inner::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// The URL a source passes to [`Dialer::parse`] (without TLS parameters).
    pub fn url(&self) -> String {
        match &self.inner {
            Inner::Tcp(_) if self.tls.is_some() => format!("migrates://{}", self.local()),
            Inner::Tcp(_) => format!("migrate://{}", self.local()),
            Inner::Unix(_, p) => format!("migrate+unix://{}", p.display()),
        }
    }

    /// Accept one connection (with the TLS handshake, bounded by `timeout`).
    pub async fn accept(&self, timeout: Duration) -> io::Result<Conn> {
        match &self.inner {
            Inner::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                Ok(conn(s, format!("unix:{}", p.display())))
            }
            Inner::Tcp(l) => {
                let (s, from) = l.accept().await?;
                let _ = s.set_nodelay(true);
                match &self.tls {
                    Some(cfg) => {
                        let t = tokio::time::timeout(
                            timeout,
                            tokio_rustls::TlsAcceptor::from(cfg.clone()).accept(s),
                        )
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                        })??;
                        Ok(conn(t, from.to_string()))
                    }
                    None => Ok(conn(s, from.to_string())),
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix(_, p) = &self.inner {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Read one frame; `None` at a clean end of stream between frames. Adds the frame's bytes to
/// `count`.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    count: &AtomicU64,
) -> io::Result<Option<Msg>> {
    wire::read_frame(r, count, usize::MAX).await
}

/// The first frame of a connection: a HELLO is small, and nothing larger is buffered for a
/// peer that has not said who it is.
pub async fn read_hello<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    count: &AtomicU64,
) -> io::Result<Option<Msg>> {
    wire::read_frame(r, count, 64).await
}

/// Read one frame, which must be there.
pub async fn expect_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    count: &AtomicU64,
    what: &str,
) -> Result<Msg> {
    match read_frame(r, count).await {
        Ok(Some(Msg::Abort(m))) => Err(StoreError::backend(format!("the peer aborted: {m}"))),
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(StoreError::backend(format!(
            "connection closed while waiting for {what}"
        ))),
        Err(e) => Err(StoreError::backend_with(format!("reading {what}"), e)),
    }
}

/// Write one message (not flushed); adds its bytes to `count`.
pub async fn write_msg<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    m: &Msg,
    count: &AtomicU64,
) -> io::Result<()> {
    let f = m.encode();
    count.fetch_add(f.len() as u64, Relaxed);
    w.write_all(&f).await
}

/// Write one message and flush.
pub async fn send<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    m: &Msg,
    count: &AtomicU64,
) -> Result<()> {
    async {
        write_msg(w, m, count).await?;
        w.flush().await
    }
    .await
    .map_err(|e| StoreError::backend_with(format!("sending {}", m.name()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_errors_name_the_part() {
        let d = Dialer::parse("migrate://10.0.0.1:7071").unwrap();
        assert_eq!(d.endpoint, Endpoint::Tcp("10.0.0.1:7071".into()));
        let d = Dialer::parse("migrate+unix:///run/m.sock").unwrap();
        assert_eq!(d.endpoint, Endpoint::Unix("/run/m.sock".into()));
        for (u, part) in [
            ("migrate://host", "host"),
            ("migrates://h:1", "tls-ca"),
            ("migrate://h:1?x=1", "x"),
            ("nbd://h:1", "scheme"),
        ] {
            let e = Dialer::parse(u).unwrap_err().to_string();
            assert!(e.contains(part), "{u}: {e}");
        }
        assert!(is_migrate_url("migrates://a:1") && !is_migrate_url("memsync://a:1"));
    }
}
