//! The NBD client: a [`Store`] backed by an NBD export.
//!
//! It negotiates fixed newstyle with GO (falling back to EXPORT_NAME), extended headers or
//! structured replies, `base:allocation` and optionally TLS, each only as far as the server
//! offers. Any number of requests are in flight on a connection; there is no reader task: the
//! waiting requests take turns reading replies, and a read's data goes straight from the
//! socket into the caller's buffer (see [`Conn`]). When the server advertises CAN_MULTI_CONN,
//! requests are spread round-robin over several connections, and large reads are split into
//! several requests in flight.

use std::collections::{BTreeMap, HashMap};
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
use std::task::{Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

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
    Extents(Vec<Descriptor>),
}

/// A request waiting for its reply.
#[derive(Default)]
struct Slot {
    /// The request's command, offset and length.
    typ: u16,
    offset: u64,
    len: u64,
    /// For reads: the length of the caller's buffer.
    read_len: Option<usize>,
    /// For reads: the ranges of the buffer that data and hole chunks have claimed (start to
    /// end, disjoint), and their total. A successful read must have claimed all of it.
    covered: BTreeMap<usize, usize>,
    covered_bytes: usize,
    /// Hole chunks read on the owner's behalf: ranges of its buffer to zero.
    holes: Vec<(usize, usize)>,
    descriptors: Option<Vec<Descriptor>>,
    error: Option<(u32, String)>,
    done: bool,
    /// The request's future was dropped: its data is discarded.
    cancelled: bool,
    /// The connection died before the reply was complete.
    lost: bool,
    waker: Option<Waker>,
}

/// The payload of a data chunk (or a simple read reply) whose header was read but whose
/// bytes are still in the socket: the request that owns it reads them straight into its
/// caller's buffer.
#[derive(Clone, Copy, Debug)]
struct Parked {
    cookie: u64,
    /// The owner is gone: the bytes are read and dropped.
    discard: bool,
    /// The range of the owner's buffer still to fill.
    pos: usize,
    end: usize,
    /// The chunk ends the reply.
    last: bool,
}

/// The read half with its own small buffer (for headers and small payloads). Every method is
/// cancel-safe: all progress is kept in `self`.
struct Reader {
    r: Box<dyn AsyncRead + Send + Unpin>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    parked: Option<Parked>,
}

const READ_BUF: usize = 64 * 1024;

impl Reader {
    fn new(r: Box<dyn AsyncRead + Send + Unpin>) -> Self {
        Reader {
            r,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            parked: None,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Buffer at least `n` bytes; `Ok(false)` on EOF before the first of them.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < n {
                    self.buf.resize(n, 0);
                }
            }
            let end = self.end;
            let got = self.r.read(&mut self.buf[end..]).await?;
            if got == 0 {
                if self.end == self.start {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += got;
        }
        Ok(true)
    }

    /// Read some bytes into `dst`: buffered ones first, else straight from the socket (small
    /// reads go through the buffer, which picks up the next headers too).
    async fn read_some(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if dst.len() >= READ_BUF / 2 {
                return match self.r.read(dst).await? {
                    0 => Err(io::ErrorKind::UnexpectedEof.into()),
                    n => Ok(n),
                };
            }
            self.fill(1).await?;
        }
        let b = self.buffered();
        let n = b.len().min(dst.len());
        dst[..n].copy_from_slice(&b[..n]);
        self.consume(n);
        Ok(n)
    }

    /// Consume the parked payload: into `dst` (the owner's whole buffer), or dropped.
    async fn drain_parked(&mut self, mut dst: Option<&mut [u8]>) -> io::Result<()> {
        let mut scratch = Vec::new();
        while let Some(p) = self.parked
            && p.pos < p.end
        {
            let n = match dst.as_deref_mut() {
                Some(d) if !p.discard => self.read_some(&mut d[p.pos..p.end]).await?,
                _ => {
                    scratch.resize((p.end - p.pos).min(READ_BUF), 0);
                    self.read_some(&mut scratch).await?
                }
            };
            if let Some(p) = &mut self.parked {
                p.pos += n;
            }
        }
        Ok(())
    }
}

struct State {
    /// The read half, when no request is reading.
    reader: Option<Reader>,
    dead: Option<String>,
    slots: HashMap<u64, Slot>,
}

impl Slot {
    /// Claim `start..end` of the read buffer for a content chunk: chunks may not overlap.
    fn cover(&mut self, start: usize, end: usize) -> io::Result<()> {
        if let Some((_, &e)) = self.covered.range(..end).next_back()
            && e > start
        {
            return Err(bad_data("content chunks overlap"));
        }
        self.covered.insert(start, end);
        self.covered_bytes += end - start;
        Ok(())
    }
}

impl State {
    /// Wake one waiting request, so that someone reads the socket.
    fn wake_successor(&mut self) {
        if let Some(w) = self
            .slots
            .values_mut()
            .filter(|s| !s.done && !s.cancelled)
            .find_map(|s| s.waker.take())
        {
            w.wake();
        }
    }

    fn complete(&mut self, cookie: u64) {
        if let Some(s) = self.slots.get_mut(&cookie) {
            s.done = true;
            if s.cancelled {
                self.slots.remove(&cookie);
            } else if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }
}

/// One connection. There is no reader task: the requests take turns reading replies
/// (whichever finds the read half free reads until its own reply is complete). A data chunk
/// for another request is handed over to that request, which reads it straight from the
/// socket into its caller's buffer (one copy, by the kernel); everything else (holes, errors,
/// block status) the current reader records in the owner's slot.
struct Conn {
    w: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    st: parking_lot::Mutex<State>,
    dead: AtomicBool,
    cookie: AtomicU64,
    structured: bool,
    extended: bool,
    meta: Option<u32>,
    max_payload: u64,
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `off..off+n` of a reply as a range of the buffer of a read of `len` bytes at `roff`.
fn chunk_range(off: u64, n: u64, roff: u64, len: usize) -> Option<(usize, usize)> {
    let start = off.checked_sub(roff)?;
    let end = start.checked_add(n)?;
    (end <= len as u64).then_some((start as usize, end as usize))
}

/// Marks the request cancelled if its future is dropped before it finished.
struct SlotGuard<'a> {
    conn: &'a Conn,
    cookie: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.conn.st.lock();
        match st.slots.get_mut(&self.cookie) {
            Some(s) if !s.done => s.cancelled = true,
            _ => {
                st.slots.remove(&self.cookie);
            }
        }
        if let Some(r) = &mut st.reader
            && let Some(p) = &mut r.parked
            && p.cookie == self.cookie
            && !p.discard
        {
            p.discard = true;
            st.wake_successor();
        }
    }
}

/// Puts the read half back and wakes whoever reads next, also when the reading request's
/// future is dropped.
struct ReaderGuard<'a> {
    conn: &'a Conn,
    reader: Option<Reader>,
}

impl ReaderGuard<'_> {
    fn release(&mut self) {
        let Some(mut r) = self.reader.take() else {
            return;
        };
        let mut st = self.conn.st.lock();
        if st.dead.is_some() {
            return;
        }
        let owner = match &mut r.parked {
            Some(p) if !p.discard => {
                if st.slots.get(&p.cookie).is_none_or(|s| s.cancelled) {
                    p.discard = true;
                    None
                } else {
                    Some(p.cookie)
                }
            }
            _ => None,
        };
        st.reader = Some(r);
        match owner.and_then(|c| st.slots.get_mut(&c)) {
            Some(s) => {
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
            None => st.wake_successor(),
        }
    }
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Kills the connection if a request is dropped half-way through being sent.
struct SendGuard<'a>(Option<&'a Conn>);

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.fail_all("a request was cancelled while being sent".into());
        }
    }
}

enum Turn {
    Finished,
    Read(Reader),
}

impl Conn {
    fn new(
        r: Box<dyn AsyncRead + Send + Unpin>,
        w: Box<dyn AsyncWrite + Send + Unpin>,
        info: &ExportInfo,
    ) -> Self {
        Conn {
            w: tokio::sync::Mutex::new(w),
            st: parking_lot::Mutex::new(State {
                reader: Some(Reader::new(r)),
                dead: None,
                slots: HashMap::new(),
            }),
            dead: AtomicBool::new(false),
            cookie: AtomicU64::new(1),
            structured: info.structured,
            extended: info.extended,
            meta: info.meta,
            max_payload: info.max.into(),
        }
    }

    fn fail_all(&self, why: String) {
        let mut st = self.st.lock();
        self.dead.store(true, Ordering::SeqCst);
        st.reader = None;
        st.dead.get_or_insert(why);
        for s in st.slots.values_mut() {
            if !s.done {
                s.done = true;
                s.lost = true;
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn dead_err(&self) -> StoreError {
        let why = self.st.lock().dead.clone().unwrap_or_default();
        nbd_err(format!("nbd: connection lost: {why}"))
    }

    /// Send a request and wait for its reply; a read's data lands in `buf`, which must be
    /// `len` bytes long.
    async fn request(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
        mut buf: Option<&mut [u8]>,
    ) -> Result<Done> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.st.lock();
            if st.dead.is_some() {
                drop(st);
                return Err(self.dead_err());
            }
            st.slots.insert(
                cookie,
                Slot {
                    typ,
                    offset,
                    len,
                    read_len: buf.as_ref().map(|b| b.len()),
                    ..Slot::default()
                },
            );
        }
        let _slot = SlotGuard { conn: self, cookie };
        let mut b = BytesMut::with_capacity(
            EXTENDED_REQUEST_LEN
                + payload
                    .as_ref()
                    .filter(|p| p.len() <= 16384)
                    .map_or(0, |p| p.len()),
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
            let mut g = SendGuard(Some(self));
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
            let r = w.flush().await;
            g.0 = None;
            r
        }
        .await;
        if let Err(e) = sent {
            self.fail_all(format!("sending a request: {e}"));
            return Err(io_err("sending a request", e));
        }
        loop {
            let turn = std::future::poll_fn(|cx| {
                let mut st = self.st.lock();
                let st = &mut *st;
                let Some(s) = st.slots.get_mut(&cookie) else {
                    return Poll::Ready(Turn::Finished);
                };
                if s.done {
                    return Poll::Ready(Turn::Finished);
                }
                let mine = match &st.reader {
                    Some(r) => r.parked.is_none_or(|p| p.discard || p.cookie == cookie),
                    None => false,
                };
                if mine && let Some(r) = st.reader.take() {
                    return Poll::Ready(Turn::Read(r));
                }
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            match turn {
                Turn::Finished => break,
                Turn::Read(r) => {
                    let mut g = ReaderGuard {
                        conn: self,
                        reader: Some(r),
                    };
                    let res = match g.reader.as_mut() {
                        Some(r) => self.read_replies(r, cookie, buf.as_deref_mut()).await,
                        None => Ok(()),
                    };
                    if let Err(e) = res {
                        g.reader = None;
                        self.fail_all(format!("{e}"));
                    }
                    g.release();
                }
            }
        }
        let slot = self.st.lock().slots.remove(&cookie);
        let Some(slot) = slot else {
            return Err(self.dead_err());
        };
        if slot.lost {
            return Err(self.dead_err());
        }
        if let Some((errno, msg)) = slot.error {
            let e = io::Error::from_raw_os_error(errno as i32);
            return Err(if msg.is_empty() {
                StoreError::io("nbd request", e)
            } else {
                StoreError::io("nbd request", e).context(format!("nbd server: {msg}"))
            });
        }
        if let Some(n) = slot.read_len
            && slot.covered_bytes != n
        {
            // A reply that leaves part of the buffer unwritten would hand the caller whatever
            // the buffer held before.
            return Err(
                StoreError::io("nbd read", io::Error::from_raw_os_error(EIO as i32)).context(
                    format!(
                        "nbd server: the read reply covered {} of {n} bytes",
                        slot.covered_bytes
                    ),
                ),
            );
        }
        if let Some(b) = buf {
            for (s, e) in slot.holes {
                b[s..e].fill(0);
            }
        }
        Ok(match slot.descriptors {
            Some(d) => Done::Extents(d),
            None => Done::Ok,
        })
    }

    /// Read replies until request `me` is complete, or until the data of another request is
    /// next in the socket (then it is parked for its owner).
    async fn read_replies(
        &self,
        r: &mut Reader,
        me: u64,
        mut buf: Option<&mut [u8]>,
    ) -> io::Result<()> {
        loop {
            if let Some(p) = r.parked {
                if !p.discard && p.cookie != me {
                    return Ok(()); // someone else's data: hand over
                }
                r.drain_parked(buf.as_deref_mut()).await?;
                r.parked = None;
                let mut st = self.st.lock();
                if p.last {
                    st.complete(p.cookie);
                }
                if st.slots.get(&me).is_none_or(|s| s.done) {
                    return Ok(());
                }
            }
            if !r.fill(4).await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ));
            }
            let b = r.buffered();
            let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let hl = reply_header_len(magic)
                .ok_or_else(|| bad_data(format!("bad reply magic {magic:#x}")))?;
            r.fill(hl).await?;
            let h = parse_reply_header(&r.buffered()[..hl]).map_err(|e| bad_data(e.to_string()))?;
            let cookie = h.cookie();
            let (rtyp, roff, rlen, read_len, cancelled) = {
                let st = self.st.lock();
                match st.slots.get(&cookie) {
                    Some(s) if !s.done => (s.typ, s.offset, s.len, s.read_len, s.cancelled),
                    _ => return Err(bad_data(format!("reply for unknown cookie {cookie}"))),
                }
            };
            match h {
                ReplyHeader::Simple { error, .. } => {
                    if self.extended {
                        return Err(bad_data("simple reply after extended headers"));
                    }
                    if self.structured && rtyp == CMD_READ {
                        return Err(bad_data("simple reply to a read after structured replies"));
                    }
                    r.consume(hl);
                    match (error, read_len) {
                        (0, Some(n)) => {
                            if let Some(s) = self.st.lock().slots.get_mut(&cookie) {
                                s.cover(0, n)?;
                            }
                            r.parked = Some(Parked {
                                cookie,
                                discard: cancelled,
                                pos: 0,
                                end: n,
                                last: true,
                            });
                        }
                        _ => {
                            let mut st = self.st.lock();
                            if error != 0
                                && let Some(s) = st.slots.get_mut(&cookie)
                            {
                                s.error = Some((error, String::new()));
                            }
                            st.complete(cookie);
                        }
                    }
                }
                ReplyHeader::Chunk {
                    flags,
                    typ,
                    len,
                    offset,
                    ..
                } => {
                    if !self.structured {
                        return Err(bad_data("structured reply chunk that was not negotiated"));
                    }
                    if offset.is_some() != self.extended {
                        return Err(bad_data(
                            "reply header kind does not match the negotiated headers",
                        ));
                    }
                    if len > self.max_payload + 64 * 1024 {
                        return Err(bad_data(format!("reply chunk of {len} bytes")));
                    }
                    let last = flags & REPLY_FLAG_DONE != 0;
                    if typ == REPLY_TYPE_OFFSET_DATA {
                        let Some(n) = read_len else {
                            return Err(bad_data("data chunk for a request that is not a read"));
                        };
                        if len < 9 {
                            return Err(bad_data("short data chunk"));
                        }
                        r.fill(hl + 8).await?;
                        let b = &r.buffered()[hl..hl + 8];
                        let off =
                            u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                        r.consume(hl + 8);
                        let (pos, end) = chunk_range(off, len - 8, roff, n)
                            .ok_or_else(|| bad_data("data chunk outside the request"))?;
                        if let Some(s) = self.st.lock().slots.get_mut(&cookie) {
                            s.cover(pos, end)?;
                        }
                        r.parked = Some(Parked {
                            cookie,
                            discard: cancelled,
                            pos,
                            end,
                            last,
                        });
                    } else {
                        let len = len as usize;
                        r.fill(hl + len).await?;
                        let payload = &r.buffered()[hl..hl + len];
                        let mut st = self.st.lock();
                        let Some(s) = st.slots.get_mut(&cookie) else {
                            return Err(bad_data(format!("reply for unknown cookie {cookie}")));
                        };
                        match typ {
                            REPLY_TYPE_NONE => {
                                if len != 0 || !last {
                                    return Err(bad_data(
                                        "NONE chunk with a payload or without DONE",
                                    ));
                                }
                            }
                            REPLY_TYPE_OFFSET_HOLE => {
                                let (off, hn) = parse_offset_hole(payload)
                                    .map_err(|e| bad_data(e.to_string()))?;
                                let Some(n) = read_len else {
                                    return Err(bad_data(
                                        "hole chunk for a request that is not a read",
                                    ));
                                };
                                let rg = chunk_range(off, hn.into(), roff, n)
                                    .ok_or_else(|| bad_data("hole chunk outside the request"))?;
                                s.cover(rg.0, rg.1)?;
                                s.holes.push(rg);
                            }
                            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                                let ext = typ == REPLY_TYPE_BLOCK_STATUS_EXT;
                                if rtyp != CMD_BLOCK_STATUS || ext != self.extended {
                                    return Err(bad_data(format!(
                                        "block status chunk of type {typ} for command {rtyp}"
                                    )));
                                }
                                let (id, d) = parse_block_status(payload, ext)
                                    .map_err(|e| bad_data(e.to_string()))?;
                                if Some(id) != self.meta {
                                    return Err(bad_data(format!(
                                        "block status for context {id}, which was not selected"
                                    )));
                                }
                                if s.descriptors.replace(d).is_some() {
                                    return Err(bad_data("two block status chunks for a context"));
                                }
                            }
                            t if is_error_chunk(t) => {
                                let e = parse_error_chunk(t, payload)
                                    .map_err(|e| bad_data(e.to_string()))?;
                                if let Some(o) = e.offset
                                    && (rtyp == CMD_FLUSH || o < roff || o - roff >= rlen.max(1))
                                {
                                    return Err(bad_data("error offset outside the request"));
                                }
                                s.error.get_or_insert((e.error, e.message));
                            }
                            t => return Err(bad_data(format!("unknown reply chunk type {t}"))),
                        }
                        if last {
                            st.complete(cookie);
                        }
                        drop(st);
                        r.consume(hl + len);
                    }
                }
            }
            if r.parked.is_none() && self.st.lock().slots.get(&me).is_none_or(|s| s.done) {
                return Ok(());
            }
        }
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
    Conn::new(Box::new(r), Box::new(w), &info)
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
        let timed = move |cfg: ClientConfig| async move {
            tokio::time::timeout(t, connect_one(&cfg))
                .await
                .map_err(|_| StoreError::Timeout {
                    op: "nbd connect",
                    after_ms: t.as_millis() as u64,
                })?
        };
        // The extra connections negotiate while the first one does: over a long link each
        // handshake is several round trips, and doing them one after the other doubles the
        // time to open. They are kept only if the server allows multi-conn; otherwise they are
        // dropped unused (a server that serves one client at a time never gets to them):
        // dropping the set aborts whatever is still negotiating.
        let mut extras = tokio::task::JoinSet::new();
        for _ in 1..cfg.connections.max(1) {
            extras.spawn(timed(cfg.clone()));
        }
        let (first, info) = timed(cfg.clone()).await?;
        let mut conns = vec![first];
        if info.flags & TF_CAN_MULTI_CONN != 0 {
            while let Some(r) = extras.join_next().await {
                match r {
                    Ok(Ok((c, _))) => conns.push(c),
                    Ok(Err(e)) => {
                        tracing::warn!("nbd: {desc}: an extra connection failed: {}", e.chain())
                    }
                    Err(e) => tracing::warn!("nbd: {desc}: an extra connection failed: {e}"),
                }
            }
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

    /// The size of the requests a read of `len` bytes is split into: at most the maximum
    /// block size, and small enough to keep every connection busy, but not below 1 MiB.
    fn read_step(&self, len: u64) -> u64 {
        let max = self.max_req();
        let bs = u64::from(self.info.min).max(1);
        let per_conn = len.div_ceil(self.conns.len() as u64 * 2).max(1 << 20);
        (per_conn.div_ceil(bs) * bs).min(max)
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
        let step = self.read_step(buf.len() as u64) as usize;
        if buf.len() <= step {
            let len = buf.len() as u64;
            self.conn()
                .request(CMD_READ, 0, offset, len, None, Some(buf))
                .await?;
            return Ok(());
        }
        // Several requests in flight (spread over the connections), each reading straight
        // into its own part of `buf`.
        try_join_all(buf.chunks_mut(step).enumerate().map(|(i, part)| {
            let o = offset + (i * step) as u64;
            let n = part.len() as u64;
            self.conn().request(CMD_READ, 0, o, n, None, Some(part))
        }))
        .await?;
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
                    .request(CMD_WRITE, 0, o, n, Some(p), None)
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
                .request(CMD_FLUSH, 0, 0, 0, None, None)
                .await
                .map(|_| ());
        }
        try_join_all(
            self.conns
                .iter()
                .map(|c| c.request(CMD_FLUSH, 0, 0, 0, None, None)),
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
                self.conn()
                    .request(CMD_WRITE_ZEROES, 0, o, n, None, None)
                    .await?;
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
                .request(CMD_BLOCK_STATUS, 0, qoff, qlen, None, None)
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
