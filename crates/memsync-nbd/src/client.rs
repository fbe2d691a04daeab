//! The NBD client: a [`Store`] backed by an NBD export.
//!
//! It negotiates fixed newstyle with GO (falling back to EXPORT_NAME), extended headers or
//! structured replies, `base:allocation` and optionally TLS, each only as far as the server
//! offers. Every connection has a reader task that matches replies to requests by cookie, so
//! any number of requests are in flight; when the server advertises CAN_MULTI_CONN, requests
//! are spread round-robin over several connections.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use memsync_core::{
    Caps, DynStore, Extent, ExtentKind, Registry, Result, Store, StoreError, StoreUrl, async_trait,
    check_range, check_write,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

use crate::proto::*;
use crate::transport::{Transport, client_tls_config};

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

/// What the handshake established.
#[derive(Clone, Copy, Debug, Default)]
struct ExportInfo {
    size: u64,
    flags: u16,
    min: u32,
    preferred: u32,
    max: u32,
    structured: bool,
    extended: bool,
    meta: Option<u32>,
}

async fn read_opt_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<(OptReplyHeader, Vec<u8>)> {
    let mut h = [0u8; OPT_REPLY_HEADER_LEN];
    s.read_exact(&mut h)
        .await
        .map_err(|e| io_err("reading an option reply", e))?;
    let h = parse_opt_reply_header(&h).map_err(proto_err)?;
    if h.len > MAX_OPTION_LEN {
        return Err(nbd_err(format!("nbd: option reply of {} bytes", h.len)));
    }
    let mut d = vec![0u8; h.len as usize];
    s.read_exact(&mut d)
        .await
        .map_err(|e| io_err("reading an option reply", e))?;
    Ok((h, d))
}

async fn send_opt<S: AsyncWrite + Unpin>(s: &mut S, opt: &Opt) -> Result<()> {
    let mut b = BytesMut::new();
    encode_opt(&mut b, opt);
    s.write_all(&b)
        .await
        .map_err(|e| io_err("sending an option", e))?;
    s.flush().await.map_err(|e| io_err("sending an option", e))
}

fn rep_error(what: &str, h: &OptReplyHeader, d: &[u8]) -> StoreError {
    let name = match h.reply {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(d);
    nbd_err(format!(
        "nbd: {what}: {name} ({:#x}){}{msg}",
        h.reply,
        if msg.is_empty() { "" } else { ": " }
    ))
}

/// Send a no-data option and report whether the server acknowledged it.
async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opt: Opt,
) -> Result<Option<(OptReplyHeader, Vec<u8>)>> {
    send_opt(s, &opt).await?;
    let (h, d) = read_opt_reply(s).await?;
    if h.reply == REP_ACK {
        Ok(None)
    } else if is_rep_err(h.reply) {
        Ok(Some((h, d)))
    } else {
        Err(nbd_err(format!(
            "nbd: unexpected reply {:#x} to option",
            h.reply
        )))
    }
}

/// The greeting: returns whether the server allows NO_ZEROES.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)
        .await
        .map_err(|e| io_err("reading the server greeting", e))?;
    let mut c = Cursor::new(&g, "greeting");
    let (m1, m2, hf) = (
        c.u64().map_err(proto_err)?,
        c.u64().map_err(proto_err)?,
        c.u16().map_err(proto_err)?,
    );
    if m1 != NBDMAGIC || m2 != IHAVEOPT {
        return Err(nbd_err("nbd: not a newstyle NBD server (bad magic)"));
    }
    if hf & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(nbd_err("nbd: the server does not speak fixed newstyle"));
    }
    let no_zeroes = hf & FLAG_NO_ZEROES != 0;
    let cf = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cf.to_be_bytes())
        .await
        .map_err(|e| io_err("sending client flags", e))?;
    Ok(no_zeroes)
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    let mut info = ExportInfo::default();
    if cfg.extended_headers && simple_option(s, Opt::ExtendedHeaders).await?.is_none() {
        info.extended = true;
        info.structured = true;
    }
    if cfg.structured && !info.structured && simple_option(s, Opt::StructuredReply).await?.is_none()
    {
        info.structured = true;
    }
    if info.structured {
        send_opt(
            s,
            &Opt::MetaContext {
                set: true,
                name: cfg.export.clone(),
                queries: vec![META_BASE_ALLOCATION.to_owned()],
            },
        )
        .await?;
        loop {
            let (h, d) = read_opt_reply(s).await?;
            match h.reply {
                REP_META_CONTEXT => {
                    let (id, name) = parse_rep_meta_context(&d).map_err(proto_err)?;
                    if name == META_BASE_ALLOCATION {
                        info.meta = Some(id);
                    }
                }
                REP_ACK => break,
                r if is_rep_err(r) => break, // no block status then
                r => {
                    return Err(nbd_err(format!(
                        "nbd: unexpected reply {r:#x} to SET_META_CONTEXT"
                    )));
                }
            }
        }
    }
    send_opt(
        s,
        &Opt::Info {
            go: true,
            name: cfg.export.clone(),
            requests: vec![INFO_BLOCK_SIZE],
        },
    )
    .await?;
    let mut got_export = false;
    loop {
        let (h, d) = read_opt_reply(s).await?;
        match h.reply {
            REP_INFO => match parse_info(&d).map_err(proto_err)? {
                Info::Export { size, flags } => {
                    info.size = size;
                    info.flags = flags;
                    got_export = true;
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    info.min = min;
                    info.preferred = preferred;
                    info.max = max;
                }
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An old server: EXPORT_NAME instead.
                send_opt(s, &Opt::ExportName(cfg.export.clone())).await?;
                let mut b = [0u8; 10];
                s.read_exact(&mut b)
                    .await
                    .map_err(|e| io_err(&format!("opening export {:?}", cfg.export), e))?;
                info.size = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                info.flags = u16::from_be_bytes([b[8], b[9]]);
                if !no_zeroes {
                    let mut z = [0u8; EXPORT_NAME_ZEROES];
                    s.read_exact(&mut z)
                        .await
                        .map_err(|e| io_err("reading export info", e))?;
                }
                got_export = true;
                break;
            }
            r if is_rep_err(r) => {
                return Err(rep_error(
                    &format!("opening export {:?}", cfg.export),
                    &h,
                    &d,
                ));
            }
            _ => {}
        }
    }
    if !got_export {
        return Err(nbd_err("nbd: the server sent no export information"));
    }
    if info.min == 0 {
        info.min = 1;
    }
    if info.max == 0 {
        info.max = DEFAULT_MAX_PAYLOAD;
    }
    if info.preferred == 0 {
        info.preferred = 4096.max(info.min);
    }
    Ok(info)
}

/// What a finished request returns.
enum Done {
    Ok,
    Data(BytesMut),
    Extents(Vec<Descriptor>),
}

struct Pending {
    /// For reads: request offset and the buffer being filled.
    read: Option<(u64, BytesMut)>,
    descriptors: Option<Vec<Descriptor>>,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Done>>,
}

type PendingMap = parking_lot::Mutex<HashMap<u64, Pending>>;

/// One connection: a writer under a lock and a reader task.
struct Conn {
    w: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Arc<PendingMap>,
    dead: Arc<AtomicBool>,
    cookie: AtomicU64,
    extended: bool,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn fail_all(pending: &PendingMap, why: &str) {
    let all: Vec<_> = pending.lock().drain().collect();
    for (_, p) in all {
        let _ = p.tx.send(Err(nbd_err(format!("nbd: {why}"))));
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    r: R,
    pending: Arc<PendingMap>,
    dead: Arc<AtomicBool>,
    meta: Option<u32>,
    max_payload: u64,
) {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let why = match read_replies(&mut r, &pending, meta, max_payload).await {
        Ok(()) => "connection closed by the server".to_owned(),
        Err(e) => format!("connection lost: {e}"),
    };
    dead.store(true, Ordering::SeqCst);
    fail_all(&pending, &why);
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: &PendingMap,
    meta: Option<u32>,
    max_payload: u64,
) -> io::Result<()> {
    let mut hb = [0u8; EXTENDED_REPLY_LEN];
    loop {
        match r.read_exact(&mut hb[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
        let hl = reply_header_len(magic)
            .ok_or_else(|| bad_data(format!("bad reply magic {magic:#x}")))?;
        r.read_exact(&mut hb[4..hl]).await?;
        let h = parse_reply_header(&hb[..hl]).map_err(|e| bad_data(e.to_string()))?;
        let cookie = h.cookie();
        let Some(mut p) = pending.lock().remove(&cookie) else {
            return Err(bad_data(format!("reply for unknown cookie {cookie}")));
        };
        match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error = Some((error, String::new()));
                } else if let Some((_, buf)) = &mut p.read {
                    r.read_exact(&mut buf[..]).await?;
                }
                finish(p);
            }
            ReplyHeader::Chunk {
                flags, typ, len, ..
            } => {
                if len > max_payload + 64 * 1024 {
                    return Err(bad_data(format!("reply chunk of {len} bytes")));
                }
                match typ {
                    REPLY_TYPE_OFFSET_DATA => {
                        let Some((roff, buf)) = &mut p.read else {
                            return Err(bad_data("data chunk for a request that is not a read"));
                        };
                        if len < 9 {
                            return Err(bad_data("short data chunk"));
                        }
                        let off = r.read_u64().await?;
                        let n = len - 8;
                        let start = off
                            .checked_sub(*roff)
                            .ok_or_else(|| bad_data("data chunk before the request"))?;
                        let end = start
                            .checked_add(n)
                            .filter(|&e| e <= buf.len() as u64)
                            .ok_or_else(|| bad_data("data chunk beyond the request"))?;
                        r.read_exact(&mut buf[start as usize..end as usize]).await?;
                    }
                    _ => {
                        let mut payload = vec![0u8; len as usize];
                        r.read_exact(&mut payload).await?;
                        match typ {
                            REPLY_TYPE_NONE => {}
                            REPLY_TYPE_OFFSET_HOLE => {
                                let (off, n) = parse_offset_hole(&payload)
                                    .map_err(|e| bad_data(e.to_string()))?;
                                let Some((roff, buf)) = &mut p.read else {
                                    return Err(bad_data(
                                        "hole chunk for a request that is not a read",
                                    ));
                                };
                                let start = off
                                    .checked_sub(*roff)
                                    .ok_or_else(|| bad_data("hole before the request"))?;
                                let end = start
                                    .checked_add(n.into())
                                    .filter(|&e| e <= buf.len() as u64)
                                    .ok_or_else(|| bad_data("hole beyond the request"))?;
                                buf[start as usize..end as usize].fill(0);
                            }
                            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                                let (id, d) = parse_block_status(
                                    &payload,
                                    typ == REPLY_TYPE_BLOCK_STATUS_EXT,
                                )
                                .map_err(|e| bad_data(e.to_string()))?;
                                if Some(id) == meta {
                                    p.descriptors = Some(d);
                                }
                            }
                            t if is_error_chunk(t) => {
                                let e = parse_error_chunk(t, &payload)
                                    .map_err(|e| bad_data(e.to_string()))?;
                                p.error.get_or_insert((e.error, e.message));
                            }
                            t => return Err(bad_data(format!("unknown reply chunk type {t}"))),
                        }
                    }
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    finish(p);
                } else {
                    pending.lock().insert(cookie, p);
                }
            }
        }
    }
}

fn finish(p: Pending) {
    let res = if let Some((errno, msg)) = p.error {
        let e = io::Error::from_raw_os_error(errno as i32);
        Err(if msg.is_empty() {
            StoreError::io("nbd request", e)
        } else {
            StoreError::io("nbd request", e).context(format!("nbd server: {msg}"))
        })
    } else if let Some((_, buf)) = p.read {
        Ok(Done::Data(buf))
    } else if let Some(d) = p.descriptors {
        Ok(Done::Extents(d))
    } else {
        Ok(Done::Ok)
    };
    let _ = p.tx.send(res);
}

impl Conn {
    async fn request(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
    ) -> Result<Done> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(nbd_err("nbd: connection lost"));
        }
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read = (typ == CMD_READ).then(|| (offset, BytesMut::zeroed(len as usize)));
        self.pending.lock().insert(
            cookie,
            Pending {
                read,
                descriptors: None,
                error: None,
                tx,
            },
        );
        let mut b = BytesMut::with_capacity(
            EXTENDED_REQUEST_LEN
                + if payload.as_ref().is_some_and(|p| p.len() <= 16384) {
                    16384
                } else {
                    0
                },
        );
        encode_request(
            &mut b,
            &Request {
                flags,
                typ,
                cookie,
                offset,
                len,
            },
            self.extended,
        );
        let sent = async {
            let mut w = self.w.lock().await;
            match payload {
                Some(p) if p.len() <= 16384 => {
                    b.extend_from_slice(&p);
                    w.write_all(&b).await?;
                }
                Some(p) => {
                    w.write_all(&b).await?;
                    w.write_all(&p).await?;
                }
                None => w.write_all(&b).await?,
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.pending.lock().remove(&cookie);
            return Err(io_err("sending a request", e));
        }
        rx.await.map_err(|_| nbd_err("nbd: connection lost"))?
    }
}

/// A store backed by an NBD export.
pub struct NbdStore {
    conns: Vec<Conn>,
    next: AtomicUsize,
    info: ExportInfo,
    desc: String,
}

impl std::fmt::Debug for NbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NbdStore({}, {} connections)",
            self.desc,
            self.conns.len()
        )
    }
}

async fn open_conn<S: Transport>(mut s: S, cfg: &ClientConfig) -> Result<(Conn, ExportInfo)> {
    let no_zeroes = greet(&mut s).await?;
    if let Some(tls) = &cfg.tls {
        if let Some((h, d)) = simple_option(&mut s, Opt::StartTls).await? {
            return Err(rep_error("STARTTLS", &h, &d));
        }
        let host = cfg.tls_hostname.clone().unwrap_or_else(|| match &cfg.addr {
            NbdAddr::Tcp { host, .. } => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            NbdAddr::Unix(_) => "localhost".to_owned(),
        });
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| nbd_err(format!("nbd: TLS server name {host:?}: {e}")))?;
        let mut t = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, s)
            .await
            .map_err(|e| io_err("TLS handshake", e))?;
        let info = negotiate(&mut t, cfg, no_zeroes).await?;
        Ok((start_conn(t, info), info))
    } else {
        let info = negotiate(&mut s, cfg, no_zeroes).await?;
        Ok((start_conn(s, info), info))
    }
}

fn start_conn<S: Transport>(s: S, info: ExportInfo) -> Conn {
    let (r, w) = s.halves();
    let pending = Arc::new(PendingMap::default());
    let dead = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(reader_task(
        r,
        pending.clone(),
        dead.clone(),
        info.meta,
        info.max.into(),
    ));
    Conn {
        w: tokio::sync::Mutex::new(Box::new(w)),
        pending,
        dead,
        cookie: AtomicU64::new(1),
        extended: info.extended,
        reader,
    }
}

async fn connect_one(cfg: &ClientConfig) -> Result<(Conn, ExportInfo)> {
    match &cfg.addr {
        NbdAddr::Tcp { host, port } => {
            let s = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), *port))
                .await
                .map_err(|e| io_err(&format!("connecting to {host}:{port}"), e))?;
            let _ = s.set_nodelay(true);
            open_conn(s, cfg).await
        }
        NbdAddr::Unix(p) => {
            let s = UnixStream::connect(p)
                .await
                .map_err(|e| io_err(&format!("connecting to {}", p.display()), e))?;
            open_conn(s, cfg).await
        }
    }
}

impl NbdStore {
    /// Connect, negotiate, and open more connections if the server allows multi-conn.
    pub async fn connect(cfg: ClientConfig) -> Result<Self> {
        let t = cfg.timeout;
        let desc = match &cfg.addr {
            NbdAddr::Tcp { host, port } => format!("nbd://{host}:{port}/{}", cfg.export),
            NbdAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", cfg.export, p.display()),
        };
        let timed = |f| async move {
            tokio::time::timeout(t, f)
                .await
                .map_err(|_| StoreError::Timeout {
                    op: "nbd connect",
                    after_ms: t.as_millis() as u64,
                })?
        };
        let (first, info) = timed(Box::pin(connect_one(&cfg))).await?;
        let mut conns = vec![first];
        if info.flags & TF_CAN_MULTI_CONN != 0 && cfg.connections > 1 {
            let more =
                try_join_all((1..cfg.connections).map(|_| timed(Box::pin(connect_one(&cfg)))))
                    .await?;
            conns.extend(more.into_iter().map(|(c, _)| c));
        }
        Ok(NbdStore {
            conns,
            next: AtomicUsize::new(0),
            info,
            desc,
        })
    }

    fn conn(&self) -> &Conn {
        let n = self.conns.len();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let c = &self.conns[i];
        if c.dead.load(Ordering::Relaxed) {
            self.conns
                .iter()
                .find(|c| !c.dead.load(Ordering::Relaxed))
                .unwrap_or(c)
        } else {
            c
        }
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether extended headers / structured replies / base:allocation were negotiated.
    pub fn negotiated(&self) -> (bool, bool, bool) {
        (
            self.info.extended,
            self.info.structured,
            self.info.meta.is_some(),
        )
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    fn max_req(&self) -> u64 {
        let m = u64::from(self.info.max).clamp(4096, 32 << 20);
        let b = u64::from(self.info.min).max(1);
        (m / b * b).max(b)
    }

    /// Split `offset..offset+len` into requests of at most `step` bytes.
    fn pieces(offset: u64, len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            (o, (end - o).min(step))
        })
    }

    fn has(&self, f: u16) -> bool {
        self.info.flags & f != 0
    }
}

#[async_trait]
impl Store for NbdStore {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.read_only = self.has(TF_READ_ONLY);
        c.block_size = u64::from(self.info.min).max(1);
        c.max_io = self.max_req();
        c.preferred_io = u64::from(self.info.preferred).clamp(c.block_size, c.max_io);
        // NBD_CMD_TRIM is only a hint (contents are undefined afterwards), but a store's trim
        // must read back zeros: trim is sent as WRITE_ZEROES without NO_HOLE, which lets the
        // server deallocate and guarantees zeros.
        c.trim = self.has(TF_SEND_WRITE_ZEROES) && !c.read_only;
        c.fast_zero = self.has(TF_SEND_WRITE_ZEROES) && !c.read_only;
        c.extents = self.info.meta.is_some();
        c.flush = self.has(TF_SEND_FLUSH);
        c.multi_conn = self.has(TF_CAN_MULTI_CONN);
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(
            self.info.size,
            self.caps().block_size,
            offset,
            buf.len() as u64,
        )?;
        if buf.is_empty() {
            return Ok(());
        }
        let step = self.max_req();
        if buf.len() as u64 <= step {
            if let Done::Data(d) = self
                .conn()
                .request(CMD_READ, 0, offset, buf.len() as u64, None)
                .await?
            {
                buf.copy_from_slice(&d);
            }
            return Ok(());
        }
        let reqs = Self::pieces(offset, buf.len() as u64, step).map(|(o, n)| async move {
            match self.conn().request(CMD_READ, 0, o, n, None).await? {
                Done::Data(d) => Ok((o, d)),
                _ => Err(nbd_err("nbd: read returned no data")),
            }
        });
        for (o, d) in try_join_all(reqs).await? {
            let s = (o - offset) as usize;
            buf[s..s + d.len()].copy_from_slice(&d);
        }
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.info.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let step = self.max_req();
        let reqs = Self::pieces(offset, data.len() as u64, step).map(|(o, n)| {
            let s = (o - offset) as usize;
            let p = data.slice(s..s + n as usize);
            async move {
                self.conn()
                    .request(CMD_WRITE, 0, o, n, Some(p))
                    .await
                    .map(|_| ())
            }
        });
        try_join_all(reqs).await.map(|_| ())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(TF_SEND_FLUSH) {
            return Ok(());
        }
        if self.has(TF_CAN_MULTI_CONN) {
            return self
                .conn()
                .request(CMD_FLUSH, 0, 0, 0, None)
                .await
                .map(|_| ());
        }
        try_join_all(
            self.conns
                .iter()
                .map(|c| c.request(CMD_FLUSH, 0, 0, 0, None)),
        )
        .await
        .map(|_| ())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if !self.has(TF_SEND_WRITE_ZEROES) {
            return Err(StoreError::Unsupported { op: "trim" });
        }
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.info.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.has(TF_SEND_WRITE_ZEROES) {
            let step = self.zero_step();
            for (o, n) in Self::pieces(offset, len, step) {
                self.conn().request(CMD_WRITE_ZEROES, 0, o, n, None).await?;
            }
            return Ok(());
        }
        let step = self.max_req().min(1 << 20);
        let zeros = Bytes::from(vec![0u8; step as usize]);
        for (o, n) in Self::pieces(offset, len, step) {
            self.write(o, zeros.slice(..n as usize)).await?;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.info.size, 1, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.info.meta.is_none() {
            return Ok(vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]);
        }
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let bs = u64::from(self.info.min).max(1);
        while pos < end {
            // Block status ranges honour the minimum block size; widen to it and clip back.
            let qoff = pos / bs * bs;
            let qend = end.div_ceil(bs).saturating_mul(bs).min(self.info.size);
            let qlen = (qend - qoff).min(if self.info.extended { 1 << 40 } else { 1 << 31 });
            let d = match self
                .conn()
                .request(CMD_BLOCK_STATUS, 0, qoff, qlen, None)
                .await?
            {
                Done::Extents(d) => d,
                _ => return Err(nbd_err("nbd: block status returned no extents")),
            };
            let mut p = qoff;
            for x in d {
                let kind = if x.flags & STATE_ZERO != 0 {
                    if x.flags & STATE_HOLE != 0 {
                        ExtentKind::Hole
                    } else {
                        ExtentKind::Zero
                    }
                } else {
                    ExtentKind::Data
                };
                let (s, e) = (p.max(pos), (p + x.len).min(end));
                p += x.len;
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some(l) if l.kind == kind && l.end() == s => l.len += e - s,
                    _ => out.push(Extent {
                        offset: s,
                        len: e - s,
                        kind,
                    }),
                }
                if p >= end {
                    break;
                }
            }
            let new_pos = out.last().map_or(pos, |l| l.end());
            if new_pos <= pos {
                return Err(nbd_err("nbd: block status made no progress"));
            }
            pos = new_pos;
        }
        Ok(out)
    }
}

impl NbdStore {
    fn zero_step(&self) -> u64 {
        let bs = u64::from(self.info.min).max(1);
        let m: u64 = if self.info.extended { 1 << 40 } else { 1 << 31 };
        (m / bs * bs).max(bs)
    }
}

fn host_port(url: &StoreUrl) -> Result<(String, u16)> {
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
        _ => (a.to_owned(), 10809),
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
    if let Some(n) = url.param("connections") {
        cfg.connections = n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                url.error(
                    "query parameter \"connections\"",
                    format!("{n:?} is not a number from 1 to 64"),
                )
            })?;
    }
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
