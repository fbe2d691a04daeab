//! Byte streams the server and client run over (TCP, unix sockets, TLS on either), and how
//! each splits into a read half and a write half.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

/// A connected byte stream that can be split into independent halves.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::R, Self::W);
}

impl Transport for TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl Transport for UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl Transport for tokio::io::DuplexStream {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

impl<S: Transport> Transport for tokio_rustls::server::TlsStream<S> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

impl<S: Transport> Transport for tokio_rustls::client::TlsStream<S> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_tls_config(cert: &Path, key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("reading certificates from {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(format!(
            "reading the private key from {}: {e}",
            key.display()
        ))
    })?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("TLS certificate/key: {e}")))?;
    Ok(Arc::new(cfg))
}

/// A rustls client configuration trusting the CA certificates in a PEM file.
/// The TLS client side of a peer URL (`memsyncs://`, `migrates://`): the CA from `tls-ca=FILE`
/// (required; `scheme` names the URL scheme in the error) and the server name from
/// `tls-hostname=` or else the host part of `addr` (`HOST:PORT`, brackets of an IPv6 literal
/// removed).
pub fn client_tls_from_url(
    url: &memsync_core::StoreUrl,
    addr: &str,
    scheme: &str,
) -> Result<
    (
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    ),
    memsync_core::StoreError,
> {
    let ca = url
        .param("tls-ca")
        .ok_or_else(|| url.error("tls-ca", format!("{scheme} needs tls-ca=FILE")))?;
    let cfg = client_tls_config(Path::new(ca)).map_err(|e| url.error("tls-ca", e))?;
    let host = url.param("tls-hostname").map_or_else(
        || addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned(),
        str::to_owned,
    );
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name =
        rustls_pki_types::ServerName::try_from(host).map_err(|e| url.error("tls-hostname", e))?;
    Ok((cfg, name))
}

pub fn client_tls_config(ca: &Path) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            bad(format!(
                "reading CA certificates from {}: {e}",
                ca.display()
            ))
        })?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| bad(format!("CA certificate in {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(bad(format!("no CA certificate in {}", ca.display())));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
