//! One pipelined Redis connection: a writer task that coalesces queued commands into one socket
//! write, and a reader task that matches replies to callers in order.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::resp::{self, Scan, Value};

/// Why a connection-level operation failed (the command may be retried on a new connection).
#[derive(Debug, Clone)]
pub struct ConnError {
    pub addr: String,
    pub why: String,
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis {}: {}", self.addr, self.why)
    }
}

impl std::error::Error for ConnError {}

/// TLS settings for `rediss://`.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    /// Name to verify instead of the host of the address.
    pub server_name: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// How to open and set up a connection.
#[derive(Clone, Debug, Default)]
pub struct ConnOpts {
    pub tls: Option<Tls>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    pub connect_timeout: Duration,
}

struct Pending {
    remaining: usize,
    replies: Vec<Value>,
    tx: oneshot::Sender<Result<Vec<Value>, ConnError>>,
}

struct Shared {
    addr: String,
    pending: Mutex<VecDeque<Pending>>,
    dead: AtomicBool,
    failed: Notify,
}

impl Shared {
    fn fail(&self, why: &str) {
        let drained: Vec<Pending> = {
            let mut q = self.pending.lock();
            self.dead.store(true, Ordering::SeqCst);
            q.drain(..).collect()
        };
        for p in drained {
            let _ = p.tx.send(Err(self.err(why)));
        }
        self.failed.notify_one();
    }

    fn err(&self, why: &str) -> ConnError {
        ConnError {
            addr: self.addr.clone(),
            why: why.to_owned(),
        }
    }
}

struct Batch {
    cmds: Vec<Bytes>,
    tx: oneshot::Sender<Result<Vec<Value>, ConnError>>,
}

/// A live connection. Cheap to share; commands from many tasks are pipelined on it.
pub struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Batch>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conn({}, dead={})", self.shared.addr, self.is_dead())
    }
}

impl Conn {
    /// Connect to `addr` (`host:port`), set TCP_NODELAY, do TLS and AUTH/SELECT.
    pub async fn connect(addr: &str, opts: &ConnOpts) -> Result<Conn, ConnError> {
        let e = |why: String| ConnError {
            addr: addr.to_owned(),
            why,
        };
        let tcp = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                e(format!(
                    "connect timed out after {:?}",
                    opts.connect_timeout
                ))
            })?
            .map_err(|err| e(format!("connect failed: {err}")))?;
        tcp.set_nodelay(true)
            .map_err(|err| e(format!("TCP_NODELAY: {err}")))?;
        let conn = match &opts.tls {
            None => Conn::spawn(addr, tcp),
            Some(tls) => {
                let host = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => crate::conn_host(addr).to_owned(),
                };
                let name = ServerName::try_from(host.clone())
                    .map_err(|err| e(format!("TLS server name {host:?}: {err}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let stream =
                    tokio::time::timeout(opts.connect_timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| e("TLS handshake timed out".into()))?
                        .map_err(|err| e(format!("TLS handshake failed: {err}")))?;
                Conn::spawn(addr, stream)
            }
        };
        let mut setup = Vec::new();
        if let Some(pw) = &opts.password {
            let mut c = BytesMut::new();
            match &opts.user {
                Some(u) => resp::encode_command(&mut c, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => resp::encode_command(&mut c, &[b"AUTH", pw.as_bytes()]),
            }
            setup.push(c.freeze());
        }
        if opts.db != 0 {
            let mut c = BytesMut::new();
            resp::encode_command(&mut c, &[b"SELECT", opts.db.to_string().as_bytes()]);
            setup.push(c.freeze());
        }
        if !setup.is_empty() {
            let replies = tokio::time::timeout(opts.connect_timeout, conn.send(setup))
                .await
                .map_err(|_| e("AUTH/SELECT timed out".into()))??;
            for r in replies {
                if let Some(err) = r.as_error() {
                    return Err(e(format!("connection setup refused: {err}")));
                }
            }
        }
        Ok(conn)
    }

    fn spawn<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(addr: &str, stream: S) -> Conn {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            pending: Mutex::new(VecDeque::new()),
            dead: AtomicBool::new(false),
            failed: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(shared.clone(), wr, rx));
        tokio::spawn(reader(shared.clone(), rd));
        Conn { shared, tx }
    }

    /// The connection failed; a new one is needed.
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Mark the connection broken (for example after a request timed out on it).
    pub fn kill(&self, why: &str) {
        self.shared.fail(why);
    }

    /// Send encoded commands in one pipeline; one reply per command, in order.
    pub async fn send(&self, cmds: Vec<Bytes>) -> Result<Vec<Value>, ConnError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        if self.is_dead() || self.tx.send(Batch { cmds, tx }).is_err() {
            return Err(self.shared.err("connection is closed"));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self
                .shared
                .err("connection closed while waiting for a reply")),
        }
    }
}

/// Coalesce all queued batches (up to ~4 MiB) into one write.
const MAX_COALESCE: usize = 4 << 20;

async fn writer<W: AsyncWrite + Send + Unpin>(
    shared: Arc<Shared>,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Batch>,
) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    loop {
        let first = tokio::select! {
            b = rx.recv() => b,
            _ = shared.failed.notified() => None,
        };
        let Some(first) = first else { break };
        let mut next = Some(first);
        while let Some(b) = next.take() {
            {
                let mut q = shared.pending.lock();
                if shared.dead.load(Ordering::SeqCst) {
                    drop(q);
                    let _ = b.tx.send(Err(shared.err("connection failed")));
                    continue;
                }
                q.push_back(Pending {
                    remaining: b.cmds.len(),
                    replies: Vec::with_capacity(b.cmds.len()),
                    tx: b.tx,
                });
            }
            for c in &b.cmds {
                buf.extend_from_slice(c);
            }
            if buf.len() < MAX_COALESCE {
                next = rx.try_recv().ok();
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = wr.write_all(&buf).await {
            shared.fail(&format!("write failed: {e}"));
            break;
        }
        buf.clear();
        if buf.capacity() > 8 << 20 {
            buf = BytesMut::with_capacity(64 << 10);
        }
    }
    let _ = wr.shutdown().await;
    // Fail anything still queued.
    rx.close();
    while let Ok(b) = rx.try_recv() {
        let _ = b.tx.send(Err(shared.err("connection closed")));
    }
}

async fn reader<R: AsyncRead + Send + Unpin>(shared: Arc<Shared>, rd: R) {
    let why = read_loop(&shared, rd).await;
    shared.fail(&why);
}

async fn read_loop<R: AsyncRead + Send + Unpin>(shared: &Shared, mut rd: R) -> String {
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut need = 1usize;
    loop {
        while buf.len() < need {
            let want = (need - buf.len()).max(64 << 10);
            buf.reserve(want);
            match rd.read_buf(&mut buf).await {
                Ok(0) => return "connection closed by the server".into(),
                Ok(_) => {}
                Err(e) => return format!("read failed: {e}"),
            }
        }
        match resp::scan(&buf) {
            Err(e) => return e.to_string(),
            Ok(Scan::Incomplete(n)) => need = n.max(buf.len() + 1),
            Ok(Scan::Complete(n)) => {
                need = 1;
                let frame = buf.split_to(n).freeze();
                let v = match resp::decode(&frame) {
                    Ok(v) => v,
                    Err(e) => return e.to_string(),
                };
                if matches!(v, Value::Push(_)) {
                    continue;
                }
                let done = {
                    let mut q = shared.pending.lock();
                    let Some(front) = q.front_mut() else {
                        return "reply without a request".into();
                    };
                    front.replies.push(v);
                    front.remaining -= 1;
                    if front.remaining == 0 {
                        q.pop_front()
                    } else {
                        None
                    }
                };
                if let Some(p) = done {
                    let _ = p.tx.send(Ok(p.replies));
                }
            }
        }
    }
}
