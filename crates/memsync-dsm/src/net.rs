//! Connections between nodes: one per pair, TCP or TLS on TCP (rustls with ring, through
//! memsync-nbd's configuration helpers and [`Transport`] halves), and frame I/O on them.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use memsync_nbd::transport::Transport;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::proto::{MAX_FRAME, Msg};

pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// TLS between nodes: every node is a server (for higher ids, which dial it) and a client (of
/// lower ids), so it holds both configurations.
#[derive(Clone)]
pub struct DsmTls {
    /// From [`memsync_nbd::server_tls_config`].
    pub server: Arc<rustls::ServerConfig>,
    /// From [`memsync_nbd::client_tls_config`].
    pub client: Arc<rustls::ClientConfig>,
    /// The name every node's certificate carries.
    pub name: rustls_pki_types::ServerName<'static>,
}

impl fmt::Debug for DsmTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DsmTls({:?})", self.name)
    }
}

impl DsmTls {
    /// TLS from a PEM certificate chain and key (this node's) and the CA that signed every
    /// node's certificate, which must be valid for `name`.
    ///
    /// # Errors
    ///
    /// The file or certificate error.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
        name: &str,
    ) -> io::Result<Self> {
        Ok(DsmTls {
            server: memsync_nbd::server_tls_config(cert, key)?,
            client: memsync_nbd::client_tls_config(ca)?,
            name: rustls_pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        })
    }
}

fn halves<T: Transport>(t: T) -> (BoxRead, BoxWrite) {
    let (r, w) = t.halves();
    (Box::new(r), Box::new(w))
}

/// Make a connection fail once the peer's host, or the path to it, has been silent for about
/// `after`: TCP keepalive probes while it is idle, and `TCP_USER_TIMEOUT` for data left
/// unacknowledged. The peer's kernel answers both, so a node that is only slow (a loaded
/// machine, a long pause) is never declared down this way; a host that died, froze or lost
/// its network is, without waiting for a fault deadline.
fn detect_silence(tcp: &tokio::net::TcpStream, after: Duration) {
    let sock = socket2::SockRef::from(tcp);
    // Idle time, then three probes, one interval apart (the kernel counts whole seconds).
    let probe = (after / 4).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe)
        .with_retries(3);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(after)))
    {
        tracing::warn!(error = %e, "memsync-dsm: cannot arm the silent-peer detection");
    }
}

/// Dial `addr` (and run the TLS client handshake).
pub(crate) async fn dial(
    addr: &str,
    tls: Option<&DsmTls>,
    dead_after: Duration,
) -> io::Result<(BoxRead, BoxWrite)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    detect_silence(&tcp, dead_after);
    match tls {
        Some(t) => {
            let s = tokio_rustls::TlsConnector::from(t.client.clone())
                .connect(t.name.clone(), tcp)
                .await?;
            Ok(halves(s))
        }
        None => Ok(halves(tcp)),
    }
}

/// Wrap an accepted connection (and run the TLS server handshake).
pub(crate) async fn accepted(
    tcp: tokio::net::TcpStream,
    tls: Option<&DsmTls>,
    dead_after: Duration,
) -> io::Result<(BoxRead, BoxWrite)> {
    let _ = tcp.set_nodelay(true);
    detect_silence(&tcp, dead_after);
    match tls {
        Some(t) => {
            let s = tokio_rustls::TlsAcceptor::from(t.server.clone())
                .accept(tcp)
                .await?;
            Ok(halves(s))
        }
        None => Ok(halves(tcp)),
    }
}

/// Read one frame and decode it; `Ok(None)` at a clean end of the stream.
pub(crate) async fn read_msg(
    r: &mut BoxRead,
    count: &std::sync::atomic::AtomicU64,
) -> io::Result<Option<Msg>> {
    memsync_core::wire::read_frame::<Msg, _>(r, count, MAX_FRAME).await
}

/// Write frames from `rx` until it closes, flushing whenever the queue is empty.
pub(crate) async fn writer(
    mut w: BoxWrite,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
) -> io::Result<()> {
    while let Some(f) = rx.recv().await {
        w.write_all(&f).await?;
        while let Ok(f) = rx.try_recv() {
            w.write_all(&f).await?;
        }
        w.flush().await?;
    }
    let _ = w.shutdown().await;
    Ok(())
}
