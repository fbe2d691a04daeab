//! A minimal HTTP/1.1 client for S3: keep-alive connection pool, TCP_NODELAY, the request head
//! and body handed to the kernel in one vectored write, bodies read straight into the caller's
//! buffer. Response parsing (httparse for the head, our own chunked decoder) never panics and is
//! bounded.

use std::fmt;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Largest body collected into memory (error bodies, small responses).
pub const MAX_COLLECT: usize = 16 << 20;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

struct Conn {
    io: Pin<Box<dyn Io>>,
    /// A duplicate of the TCP socket, to re-arm TCP_QUICKACK before reads.
    sock: Option<std::os::fd::OwnedFd>,
    /// Bytes read past the previous response.
    rbuf: BytesMut,
}

/// A transport or protocol failure (the request may be retried).
#[derive(Debug, Clone)]
pub struct HttpError(pub String);

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

fn herr(s: impl Into<String>) -> HttpError {
    HttpError(s.into())
}

/// Where a response body goes.
pub enum Sink<'a> {
    /// Collect it (at most [`MAX_COLLECT`] bytes).
    Collect,
    /// Write a 2xx body into this buffer (it must fit); other bodies are collected.
    Into(&'a mut [u8]),
}

impl fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Collect => f.write_str("Collect"),
            Sink::Into(b) => write!(f, "Into({} bytes)", b.len()),
        }
    }
}

/// A response: status, headers and (collected) body, or the body length written into the sink.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Bytes written into a [`Sink::Into`] buffer.
    pub written: usize,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An endpoint: `http://host:port` or `https://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parse `http[s]://host[:port][/]`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{s:?} must start with http:// or https://"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '?', '@', ' ']) {
            return Err(format!(
                "{s:?} must be http[s]://HOST[:PORT] without a path"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                if rest.starts_with('[') && !h.ends_with(']') {
                    (rest, if https { 443 } else { 80 })
                } else {
                    let port = p
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("{p:?} is not a TCP port"))?;
                    (h, port)
                }
            }
            _ => (rest, if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(Endpoint {
            https,
            host: host.to_owned(),
            port,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A pool of keep-alive connections to one endpoint.
pub struct Pool {
    ep: Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    timeout: Duration,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("endpoint", &self.ep)
            .field("idle", &self.idle.lock().len())
            .finish()
    }
}

/// One request.
#[derive(Debug)]
pub struct Req<'a> {
    pub method: &'a str,
    /// Path and query, encoded.
    pub target: &'a str,
    pub headers: &'a [(String, String)],
    pub body: Bytes,
}

impl Pool {
    /// A pool with at most `max_conns` connections; `timeout` bounds each request.
    pub fn new(
        ep: Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
        max_conns: usize,
        timeout: Duration,
    ) -> Pool {
        Pool {
            ep,
            tls: tls.map(tokio_rustls::TlsConnector::from),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_conns.max(1)),
            timeout,
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    async fn connect(&self) -> Result<Conn, HttpError> {
        let addr = self.ep.addr();
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| herr(format!("connect to {addr} failed: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| herr(format!("TCP_NODELAY: {e}")))?;
        let sock = rustix::io::dup(&tcp).ok();
        let io: Pin<Box<dyn Io>> = match &self.tls {
            None => Box::pin(tcp),
            Some(c) => {
                let host = self.ep.host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| herr(format!("TLS name {host:?}: {e}")))?;
                Box::pin(
                    c.connect(name, tcp)
                        .await
                        .map_err(|e| herr(format!("TLS handshake with {addr} failed: {e}")))?,
                )
            }
        };
        Ok(Conn {
            io,
            sock,
            rbuf: BytesMut::with_capacity(16 << 10),
        })
    }

    /// Send a request and read its response, reusing an idle connection if there is one (and
    /// retrying once on a fresh connection if a reused one turns out to be closed).
    pub async fn send(&self, req: &Req<'_>, mut sink: Sink<'_>) -> Result<Response, HttpError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| herr("connection pool closed"))?;
        let host = self.ep.host_header();
        let fut = async {
            let reused = self.idle.lock().pop();
            if let Some(mut c) = reused {
                match exchange(&mut c, req, &mut sink, &host).await {
                    Ok((resp, keep)) => {
                        if keep {
                            self.idle.lock().push(c);
                        }
                        return Ok(resp);
                    }
                    Err(Failure::Stale(_)) => {}
                    Err(Failure::Hard(e)) => return Err(e),
                }
            }
            let mut c = self.connect().await?;
            match exchange(&mut c, req, &mut sink, &host).await {
                Ok((resp, keep)) => {
                    if keep {
                        self.idle.lock().push(c);
                    }
                    Ok(resp)
                }
                Err(Failure::Stale(e) | Failure::Hard(e)) => Err(e),
            }
        };
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            herr(format!(
                "{} {} timed out after {:?}",
                req.method, req.target, self.timeout
            ))
        })?
    }

    /// Drop idle connections (after the server restarted, for example).
    pub fn clear(&self) {
        self.idle.lock().clear();
    }
}

enum Failure {
    /// Nothing of a response arrived on a reused connection: retry on a fresh one.
    Stale(HttpError),
    Hard(HttpError),
}

fn write_head(req: &Req<'_>, host: &str) -> Vec<u8> {
    let mut h = String::with_capacity(256);
    h.push_str(req.method);
    h.push(' ');
    h.push_str(req.target);
    h.push_str(" HTTP/1.1\r\nhost: ");
    h.push_str(host);
    h.push_str("\r\n");
    for (k, v) in req.headers {
        h.push_str(k);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    if !req.body.is_empty() || matches!(req.method, "PUT" | "POST") {
        h.push_str("content-length: ");
        h.push_str(&req.body.len().to_string());
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

async fn write_all2(io: &mut Pin<Box<dyn Io>>, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let n = io
            .write_vectored(&[IoSlice::new(&a[i..]), IoSlice::new(&b[j..])])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len() - i);
        i += from_a;
        j += n - from_a;
    }
    io.flush().await
}

async fn exchange(
    c: &mut Conn,
    req: &Req<'_>,
    sink: &mut Sink<'_>,
    host: &str,
) -> Result<(Response, bool), Failure> {
    let head = write_head(req, host);
    if let Err(e) = write_all2(&mut c.io, &head, &req.body).await {
        return Err(Failure::Stale(herr(format!("write failed: {e}"))));
    }
    read_response(c, req.method == "HEAD", sink).await
}

/// Ask the kernel to ACK right away: servers that send a response head and body in separate
/// small segments (with Nagle on their side) otherwise stall ~40 ms on our delayed ACK. Linux
/// drops quick-ACK mode on its own, so this is re-armed before every read.
fn quickack(c: &Conn) {
    if let Some(s) = &c.sock {
        let _ = rustix::net::sockopt::set_tcp_quickack(s, true);
    }
}

async fn fill(c: &mut Conn) -> Result<usize, HttpError> {
    quickack(c);
    c.rbuf.reserve(32 << 10);
    c.io.read_buf(&mut c.rbuf)
        .await
        .map_err(|e| herr(format!("read failed: {e}")))
}

/// The parsed head of a response: status, headers, head length.
pub type Head = (u16, Vec<(String, String)>, usize);

/// Parse a response head from `buf`: `Ok(None)` if incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut hs);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let status = r.code.ok_or_else(|| herr("response without status"))?;
            let headers = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).trim().to_owned(),
                    )
                })
                .collect();
            Ok(Some((status, headers, n)))
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                Err(herr("response head too large"))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(herr(format!("bad HTTP response: {e}"))),
    }
}

async fn read_response(
    c: &mut Conn,
    head_only: bool,
    sink: &mut Sink<'_>,
) -> Result<(Response, bool), Failure> {
    let mut first = true;
    let (status, headers, n) = loop {
        match parse_head(&c.rbuf) {
            Err(e) => return Err(Failure::Hard(e)),
            Ok(Some(h)) => break h,
            Ok(None) => {}
        }
        let got = fill(c).await.map_err(|e| {
            if first && c.rbuf.is_empty() {
                Failure::Stale(e)
            } else {
                Failure::Hard(e)
            }
        })?;
        if got == 0 {
            let e = herr("connection closed before a response");
            return Err(if first && c.rbuf.is_empty() {
                Failure::Stale(e)
            } else {
                Failure::Hard(e)
            });
        }
        first = false;
    };
    c.rbuf.advance(n);
    if (100..200).contains(&status) {
        // 100 Continue and friends: read the real response.
        return Box::pin(read_response(c, head_only, sink)).await;
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let mut keep = !find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let chunked =
        find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = match find("content-length") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| Failure::Hard(herr(format!("bad content-length {v:?}"))))?,
        ),
        None => None,
    };
    let mut target: Option<&mut [u8]> = match sink {
        Sink::Into(b) if (200..300).contains(&status) => Some(&mut **b),
        _ => None,
    };
    let mut body = BytesMut::new();
    let mut written = 0usize;
    let no_body = head_only || status == 204 || status == 304;
    let h = |e: HttpError| Failure::Hard(e);
    if no_body {
    } else if chunked {
        read_chunked(c, &mut target, &mut body, &mut written)
            .await
            .map_err(h)?;
    } else if let Some(len) = length {
        read_exact_body(c, len, &mut target, &mut body, &mut written)
            .await
            .map_err(h)?;
    } else {
        keep = false;
        read_to_eof(c, &mut target, &mut body, &mut written)
            .await
            .map_err(h)?;
    }
    Ok((
        Response {
            status,
            headers,
            body: body.freeze(),
            written,
        },
        keep,
    ))
}

/// Deliver `data` to the target buffer or the collection.
fn deliver(
    data: &[u8],
    target: &mut Option<&mut [u8]>,
    body: &mut BytesMut,
    written: &mut usize,
) -> Result<(), HttpError> {
    match target {
        Some(t) => {
            let end = written
                .checked_add(data.len())
                .filter(|e| *e <= t.len())
                .ok_or_else(|| {
                    herr(format!(
                        "response body longer than the expected {} bytes",
                        t.len()
                    ))
                })?;
            t[*written..end].copy_from_slice(data);
            *written = end;
        }
        None => {
            if body.len() + data.len() > MAX_COLLECT {
                return Err(herr("response body too large"));
            }
            body.extend_from_slice(data);
        }
    }
    Ok(())
}

async fn read_exact_body(
    c: &mut Conn,
    len: u64,
    target: &mut Option<&mut [u8]>,
    body: &mut BytesMut,
    written: &mut usize,
) -> Result<(), HttpError> {
    let mut left = len;
    if let Some(t) = target.as_deref()
        && len > t.len() as u64
    {
        return Err(herr(format!(
            "response body of {len} bytes is longer than the expected {}",
            t.len()
        )));
    }
    while left > 0 {
        if c.rbuf.is_empty() {
            // Large bodies: read straight into the caller's buffer.
            if let Some(t) = target.as_deref_mut() {
                let end = *written + left as usize;
                quickack(c);
                let n =
                    c.io.read(&mut t[*written..end])
                        .await
                        .map_err(|e| herr(format!("read failed: {e}")))?;
                if n == 0 {
                    return Err(herr("connection closed in the middle of a body"));
                }
                *written += n;
                left -= n as u64;
                continue;
            }
            if fill(c).await? == 0 {
                return Err(herr("connection closed in the middle of a body"));
            }
        }
        let n = (c.rbuf.len() as u64).min(left) as usize;
        let data = c.rbuf.split_to(n);
        deliver(&data, target, body, written)?;
        left -= n as u64;
    }
    Ok(())
}

async fn read_to_eof(
    c: &mut Conn,
    target: &mut Option<&mut [u8]>,
    body: &mut BytesMut,
    written: &mut usize,
) -> Result<(), HttpError> {
    loop {
        if !c.rbuf.is_empty() {
            let data = c.rbuf.split();
            deliver(&data, target, body, written)?;
        }
        if fill(c).await? == 0 {
            return Ok(());
        }
    }
}

async fn line(c: &mut Conn) -> Result<BytesMut, HttpError> {
    loop {
        if let Some(i) = c.rbuf.iter().position(|&b| b == b'\n') {
            let mut l = c.rbuf.split_to(i + 1);
            l.truncate(i);
            if l.last() == Some(&b'\r') {
                l.truncate(l.len() - 1);
            }
            return Ok(l);
        }
        if c.rbuf.len() > 8 << 10 {
            return Err(herr("chunk header line too long"));
        }
        if fill(c).await? == 0 {
            return Err(herr("connection closed in a chunked body"));
        }
    }
}

/// Parse a chunk-size line (`1a2b[;ext]`).
pub fn chunk_size(l: &[u8]) -> Result<u64, HttpError> {
    let hex = l.split(|&b| b == b';').next().unwrap_or(&[]);
    let s = std::str::from_utf8(hex)
        .map_err(|_| herr("bad chunk size"))?
        .trim();
    if s.is_empty() || s.len() > 15 {
        return Err(herr(format!("bad chunk size {s:?}")));
    }
    u64::from_str_radix(s, 16).map_err(|_| herr(format!("bad chunk size {s:?}")))
}

async fn read_chunked(
    c: &mut Conn,
    target: &mut Option<&mut [u8]>,
    body: &mut BytesMut,
    written: &mut usize,
) -> Result<(), HttpError> {
    loop {
        let l = line(c).await?;
        let size = chunk_size(&l)?;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                if line(c).await?.is_empty() {
                    return Ok(());
                }
            }
        }
        let mut left = size;
        while left > 0 {
            if c.rbuf.is_empty() && fill(c).await? == 0 {
                return Err(herr("connection closed in a chunk"));
            }
            let n = (c.rbuf.len() as u64).min(left) as usize;
            let data = c.rbuf.split_to(n);
            deliver(&data, target, body, written)?;
            left -= n as u64;
        }
        if !line(c).await?.is_empty() {
            return Err(herr("chunk not followed by CRLF"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port),
            (false, "127.0.0.1", 9000)
        );
        assert_eq!(e.host_header(), "127.0.0.1:9000");
        let e = Endpoint::parse("https://s3.amazonaws.com/").unwrap();
        assert_eq!((e.https, e.port), (true, 443));
        assert_eq!(e.host_header(), "s3.amazonaws.com");
        let e = Endpoint::parse("http://[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("[::1]", 9000));
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://x:0").is_err());
        assert!(Endpoint::parse("http://x/path").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }

    #[test]
    fn heads() {
        let (s, h, n) = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((s, n), (404, 45));
        assert_eq!(h[0].1, "3");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert_eq!(chunk_size(b"1aF;x=y").unwrap(), 0x1af);
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"ffffffffffffffffff").is_err());
    }

    proptest! {
        #[test]
        fn head_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_head(&data);
            let _ = chunk_size(&data);
        }
    }
}
