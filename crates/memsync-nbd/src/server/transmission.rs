//! The transmission phase: requests read, served inline or on their own task, replies written
//! (simple, structured or extended), with bounded memory and slots.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use memsync_core::{Caps, DynStore, ExtentKind, StoreError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tracing::info;

use super::handshake::{Negotiated, export_caps};
use super::{Inner, PayloadCharge};
use crate::proto::*;
use crate::transport::Transport;

/// One connection in transmission.
struct Conn {
    store: DynStore,
    size: u64,
    caps: Caps,
    read_only: bool,
    structured: bool,
    extended: bool,
    meta: bool,
    max_payload: u32,
    /// Read reply buffers, kept between requests.
    pool: Arc<Pool>,
    /// A range the store last reported as data (no hole of 4 KiB or more): reads inside it
    /// skip the extents query. Only data is remembered: if it has become zero since, the read
    /// sends the zeros as data, which is still right, whereas a remembered hole could hide
    /// data written since.
    data_hint: parking_lot::Mutex<(u64, u64)>,
}

/// Reply batches smaller than this are collected and written together.
const BATCH: usize = 64 * 1024;

/// Send buffer asked for on unix sockets. The default (208 KiB) is smaller than one 256 KiB
/// read reply, so every such reply would wait for the client to drain the socket half-way.
/// Linux caps it at `net.core.wmem_max`. (TCP sockets keep the kernel's auto-tuning.)
pub(crate) const UNIX_SNDBUF: usize = 4 << 20;

/// A reply ready to be written.
enum Reply {
    Buf(BytesMut),
    Pooled(PoolBuf),
    /// Headers and the store's own buffers ([`memsync_core::Store::read_shared`]), sent with
    /// one `writev` instead of being copied into a reply buffer first.
    Shared(Vec<Bytes>),
}

impl From<BytesMut> for Reply {
    fn from(b: BytesMut) -> Self {
        Reply::Buf(b)
    }
}

impl Reply {
    /// The reply as one buffer, unless it is made of several.
    fn contiguous(&self) -> Option<&[u8]> {
        match self {
            Reply::Buf(b) => Some(b),
            Reply::Pooled(p) => Some(p),
            Reply::Shared(_) => None,
        }
    }
}

/// Buffers kept per connection for read replies. They stay initialised, so a read neither
/// zeroes its buffer nor faults fresh pages in: the store overwrites the bytes it returns.
#[derive(Default)]
struct Pool {
    free: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept in one connection's pool.
const POOL_KEEP: usize = 4;
/// Larger buffers are not kept.
const POOL_MAX_BUF: usize = (4 << 20) + 64;

impl Pool {
    /// A buffer of `len` initialised bytes (whatever they hold).
    fn get(self: &Arc<Self>, len: usize) -> PoolBuf {
        if len > POOL_MAX_BUF {
            return PoolBuf {
                buf: vec![0; len],
                len,
                pool: None,
            };
        }
        let mut buf = self.free.lock().pop().unwrap_or_default();
        if buf.len() < len {
            // Only the growth is zeroed, once per buffer.
            buf.resize(len, 0);
        }
        PoolBuf {
            buf,
            len,
            pool: Some(self.clone()),
        }
    }
}

/// A buffer from a [`Pool`]; it goes back when dropped.
struct PoolBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<Pool>>,
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            let mut free = p.free.lock();
            if free.len() < POOL_KEEP {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// Write payloads at least this long are read from the socket straight into their own
/// buffer; shorter ones are copied out of the connection's read buffer (which batches many
/// small requests into one read).
const DIRECT_MIN: usize = 16 * 1024;
/// How much the connection's read buffer asks for at once.
const RX_CHUNK: usize = 64 * 1024;
/// What it asks for right after a large write, when the next bytes are most likely a header
/// followed by another large payload that should not be copied through this buffer.
const RX_SMALL: usize = 1024;
/// A direct payload read also takes up to this many bytes beyond the payload (usually the
/// next request's header), saving one read call per request; they are moved to the read
/// buffer.
const RX_EXTRA: usize = 512;

/// The read half of a connection with a small buffer for request headers and short payloads.
struct Rx<R> {
    r: R,
    buf: BytesMut,
    /// Ask for [`RX_SMALL`] bytes only on the next refill.
    small: bool,
}

impl<R: AsyncRead + Unpin> Rx<R> {
    fn new(r: R) -> Self {
        Rx {
            r,
            buf: BytesMut::with_capacity(RX_CHUNK),
            small: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Read once into the buffer (at least one byte, or an error).
    async fn refill(&mut self, at_least: usize) -> io::Result<()> {
        let want = if std::mem::take(&mut self.small) {
            RX_SMALL
        } else {
            RX_CHUNK
        }
        .max(at_least);
        self.buf.reserve(want);
        let n = (&mut self.r)
            .take(want as u64)
            .read_buf(&mut self.buf)
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Buffer at least `n` bytes.
    async fn fill(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            self.refill(n - self.buf.len()).await?;
        }
        Ok(())
    }

    /// The next `len` bytes as a buffer of their own.
    async fn payload(&mut self, len: usize) -> io::Result<Bytes> {
        let have = self.buf.len().min(len);
        if have == len {
            // A copy of its own: a store that keeps the bytes must not pin the read buffer.
            let p = Bytes::copy_from_slice(&self.buf[..len]);
            self.buf.advance(len);
            return Ok(p);
        }
        let mut p = BytesMut::with_capacity(len + RX_EXTRA);
        p.extend_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        while p.len() < len {
            let want = len - p.len();
            if want < DIRECT_MIN {
                self.refill(0).await?;
                let k = want.min(self.buf.len());
                p.extend_from_slice(&self.buf[..k]);
                self.buf.advance(k);
            } else {
                // The read buffer is empty here, so bytes read past the payload go to it in
                // order.
                let n = (&mut self.r)
                    .take((want + RX_EXTRA) as u64)
                    .read_buf(&mut p)
                    .await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        if p.len() > len {
            self.buf.extend_from_slice(&p[len..]);
            p.truncate(len);
        }
        self.small = len >= DIRECT_MIN && self.buf.len() < RX_SMALL;
        Ok(p.freeze())
    }

    /// Discard the next `n` bytes.
    async fn skip(&mut self, n: u64) -> io::Result<()> {
        let have = (self.buf.len() as u64).min(n) as usize;
        self.buf.advance(have);
        let left = n - have as u64;
        let got = tokio::io::copy(&mut (&mut self.r).take(left), &mut tokio::io::sink()).await?;
        if got != left {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

pub(super) async fn transmission<S: Transport>(
    inner: Arc<Inner>,
    s: S,
    neg: Negotiated,
    export: usize,
) {
    let e = &inner.cfg.exports[export];
    let (caps, read_only) = export_caps(e);
    let conn = Arc::new(Conn {
        store: e.store.clone(),
        size: e.store.size(),
        caps,
        read_only,
        structured: neg.structured,
        extended: neg.extended,
        meta: neg.meta.is_some(),
        max_payload: inner.cfg.max_payload,
        pool: Arc::default(),
        data_hint: parking_lot::Mutex::new((0, 0)),
    });
    let (r, w) = s.halves();
    let mut rx = Rx::new(r);
    let w = Arc::new(Mutex::new(w));
    let max_in_flight = inner.cfg.max_in_flight.max(1);
    let sem = Arc::new(Semaphore::new(max_in_flight));
    let hlen = if conn.extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut stop = inner.shutdown.subscribe();
    let mut pending = BytesMut::with_capacity(BATCH);
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    loop {
        if rx.buffered() < hlen {
            // About to wait for the client: send what is ready first.
            if !pending.is_empty() {
                if write_reply(&w, &pending).await.is_err() {
                    break;
                }
                pending.clear();
            }
            let got = if rx.buffered() == 0 {
                if *stop.borrow() {
                    break;
                }
                tokio::select! {
                    r = rx.fill(hlen) => r,
                    _ = stop.changed() => break,
                }
            } else {
                rx.fill(hlen).await
            };
            if got.is_err() {
                break; // EOF or a truncated header: this connection ends
            }
        }
        hdr[..hlen].copy_from_slice(&rx.buf[..hlen]);
        rx.buf.advance(hlen);
        let req = match parse_request(&hdr[..hlen], conn.extended) {
            Ok(r) => r,
            Err(e) => {
                info!("nbd: closing connection: {e}");
                break;
            }
        };
        if req.typ == CMD_DISC {
            break;
        }
        if req.typ == CMD_WRITE && req.len > conn.max_payload.into() {
            // The client broke the advertised limit. Up to the size the protocol asks servers
            // to tolerate, the payload is skipped (never buffered) and the request fails;
            // beyond it the connection ends. Skipping may wait for the client, which may be
            // waiting for a reply batched so far: those go out first, as before any wait.
            let must_wait = (rx.buffered() as u64) < req.len;
            if req.len > PORTABLE_MAX_PAYLOAD
                || (must_wait && flush_pending(&w, &mut pending).await.is_err())
                || rx.skip(req.len).await.is_err()
            {
                info!("nbd: closing connection: a write of {} bytes", req.len);
                break;
            }
            let rep = conn.error(&req, EINVAL, "write larger than the maximum payload");
            pending.extend_from_slice(&rep);
            continue;
        }
        // Every wait below may last until other requests finish: the replies ready so far go
        // out first.
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if flush_pending(&w, &mut pending).await.is_err() {
                    break;
                }
                let Ok(p) = sem.clone().acquire_owned().await else {
                    break;
                };
                p
            }
        };
        let mut payload = None;
        let mut charge = None;
        if req.typ == CMD_WRITE && req.len > 0 {
            let len = req.len as usize;
            // The payload's share of the global budget is taken before a byte of it is read.
            let n = req.len as u32;
            let p = match inner.budget.clone().try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => {
                    if flush_pending(&w, &mut pending).await.is_err() {
                        break;
                    }
                    let Ok(p) = inner.budget.clone().acquire_many_owned(n).await else {
                        break;
                    };
                    p
                }
            };
            charge = Some(PayloadCharge::new(&inner, p));
            if rx.buffered() < len && flush_pending(&w, &mut pending).await.is_err() {
                break;
            }
            match rx.payload(len).await {
                Ok(p) => payload = Some(p),
                Err(_) => break,
            }
        }
        let mut fut: Pin<Box<dyn Future<Output = Reply> + Send>> =
            Box::pin(handle(conn.clone(), req, payload));
        match poll_once(fut.as_mut()) {
            Poll::Ready(rep) => {
                drop(fut);
                drop(charge);
                drop(permit);
                match rep.contiguous() {
                    Some(r) if r.len() < BATCH => {
                        pending.extend_from_slice(r);
                        if pending.len() >= BATCH {
                            if write_reply(&w, &pending).await.is_err() {
                                break;
                            }
                            pending.clear();
                        }
                    }
                    _ => {
                        // The batch goes out in the same call, ahead of the reply.
                        if send(&w, &pending, &rep).await.is_err() {
                            break;
                        }
                        pending.clear();
                    }
                }
            }
            Poll::Pending => {
                let w = w.clone();
                tokio::spawn(async move {
                    let rep = fut.await;
                    // The store has the payload: its budget is free for the next one, even
                    // if the client is slow to take the reply.
                    drop(charge);
                    let _ = send(&w, &[], &rep).await;
                    drop(permit);
                });
            }
        }
    }
    if !pending.is_empty() {
        let _ = write_reply(&w, &pending).await;
    }
    // Finish the requests still in flight, then close.
    let _ = sem.acquire_many(max_in_flight as u32).await;
    let mut g = w.lock().await;
    let _ = g.flush().await;
    let _ = g.shutdown().await;
}

/// Poll a future once without a task context: a store that answers without waiting is
/// served right here, with no task hop.
fn poll_once(f: Pin<&mut (dyn Future<Output = Reply> + Send)>) -> Poll<Reply> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// Write the batched replies, if any.
async fn flush_pending<W: AsyncWrite + Unpin>(
    w: &Mutex<W>,
    pending: &mut BytesMut,
) -> io::Result<()> {
    if !pending.is_empty() {
        write_reply(w, pending).await?;
        pending.clear();
    }
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &Mutex<W>, buf: &[u8]) -> io::Result<()> {
    let mut g = w.lock().await;
    g.write_all(buf).await?;
    g.flush().await
}

/// Linux's limit on the buffers of one `writev`.
const IOV_MAX: usize = 1024;

/// Write `first` (batched replies, may be empty) and then `rep`, as few calls as possible.
async fn send<W: AsyncWrite + Unpin>(w: &Mutex<W>, first: &[u8], rep: &Reply) -> io::Result<()> {
    let mut iov: Vec<io::IoSlice<'_>> = Vec::new();
    if !first.is_empty() {
        iov.push(io::IoSlice::new(first));
    }
    match rep {
        Reply::Shared(parts) => iov.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| io::IoSlice::new(p)),
        ),
        Reply::Buf(b) => iov.push(io::IoSlice::new(b)),
        Reply::Pooled(p) => iov.push(io::IoSlice::new(p)),
    }
    let mut g = w.lock().await;
    let mut bufs = &mut iov[..];
    while !bufs.is_empty() {
        let k = bufs.len().min(IOV_MAX);
        let n = g.write_vectored(&bufs[..k]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    g.flush().await
}

impl Conn {
    fn ext_off(&self, req: &Request) -> Option<u64> {
        self.extended.then_some(req.offset)
    }

    fn ok(&self, req: &Request) -> BytesMut {
        let mut b = BytesMut::with_capacity(32);
        if self.extended || (self.structured && req.typ == CMD_READ) {
            encode_chunk_header(
                &mut b,
                self.ext_off(req),
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            );
        } else {
            encode_simple_reply(&mut b, 0, req.cookie);
        }
        b
    }

    fn error(&self, req: &Request, errno: u32, msg: &str) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        if self.structured {
            let mut p = BytesMut::new();
            encode_error_payload(&mut p, errno, msg, None);
            encode_chunk_header(
                &mut b,
                self.ext_off(req),
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                p.len() as u64,
            );
            b.extend_from_slice(&p);
        } else {
            encode_simple_reply(&mut b, errno, req.cookie);
        }
        b
    }

    fn store_error(&self, req: &Request, e: &StoreError) -> BytesMut {
        self.error(req, wire_errno(e.errno()), &e.to_string())
    }

    /// `None` if `offset..offset+len` is within the export.
    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.len)
            .is_some_and(|end| end <= self.size)
    }
}

/// Flags each command accepts.
fn allowed_flags(c: &Conn, typ: u16) -> u16 {
    let base = CMD_FLAG_FUA | if c.extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    match typ {
        CMD_READ => CMD_FLAG_FUA | if c.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE => base,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

async fn handle(c: Arc<Conn>, req: Request, payload: Option<Bytes>) -> Reply {
    if req.typ == CMD_READ && req.flags & !allowed_flags(&c, req.typ) == 0 {
        if req.len > c.max_payload.into() {
            return c
                .error(&req, EOVERFLOW, "read larger than the maximum payload")
                .into();
        }
        if !c.in_range(&req) {
            return c
                .error(&req, EINVAL, "read beyond the end of the export")
                .into();
        }
        if req.len == 0 {
            return c.ok(&req).into();
        }
        return read(&c, &req).await;
    }
    handle_other(&c, req, payload).await.into()
}

/// Every command but a valid READ.
async fn handle_other(c: &Conn, req: Request, payload: Option<Bytes>) -> BytesMut {
    if req.flags & !allowed_flags(c, req.typ) != 0 {
        return c.error(&req, EINVAL, "flag not valid for this command");
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.typ {
        CMD_WRITE => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "write beyond the end of the export");
            }
            let data = payload.unwrap_or_default();
            if !data.is_empty()
                && let Err(e) = c.store.write(req.offset, data).await
            {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_FLUSH => finish(c, &req, true).await,
        CMD_TRIM => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.caps.trim {
                return c.error(&req, EINVAL, "trim is not supported by this export");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "trim beyond the end of the export");
            }
            if req.len > 0
                && let Err(e) = c.store.trim(req.offset, req.len).await
            {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_WRITE_ZEROES => {
            if c.read_only {
                return c.error(&req, EPERM, "export is read-only");
            }
            if !c.in_range(&req) {
                return c.error(&req, ENOSPC, "write zeroes beyond the end of the export");
            }
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if fast && (!c.caps.fast_zero || no_hole) {
                return c.error(&req, ENOTSUP, "fast zeroing is not possible here");
            }
            let r = if req.len == 0 {
                Ok(())
            } else if no_hole {
                write_zero_buffers(c, req.offset, req.len).await
            } else {
                c.store.write_zeroes(req.offset, req.len).await
            };
            if let Err(e) = r {
                return c.store_error(&req, &e);
            }
            finish(c, &req, fua).await
        }
        CMD_CACHE => {
            if !c.in_range(&req) {
                return c.error(&req, EINVAL, "cache beyond the end of the export");
            }
            c.ok(&req)
        }
        CMD_BLOCK_STATUS => block_status(c, &req).await,
        _ => c.error(&req, EINVAL, "unknown command"),
    }
}

async fn finish(c: &Conn, req: &Request, flush: bool) -> BytesMut {
    if flush && let Err(e) = c.store.flush().await {
        return c.store_error(req, &e);
    }
    c.ok(req)
}

async fn write_zero_buffers(c: &Conn, offset: u64, len: u64) -> memsync_core::Result<()> {
    let step = (1u64 << 20).min(len);
    let zeros = Bytes::from(vec![0u8; step as usize]);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(step);
        c.store.write(pos, zeros.slice(..n as usize)).await?;
        pos += n;
    }
    Ok(())
}

/// Reads at least this long, on stores that report extents, are answered with hole chunks
/// for their zero ranges.
const SPARSE_READ_MIN: u64 = 64 * 1024;

/// How far ahead of a read the store's extents are asked for, so that a sequential reader
/// through data costs one extents query per this many bytes (see `Conn::data_hint`).
const EXTENT_WINDOW: u64 = 8 << 20;

/// Pieces of a structured read: `(offset, len, is_hole)`. Empty means one data piece.
async fn sparse_pieces(c: &Conn, req: &Request) -> Vec<(u64, u64, bool)> {
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    if !c.caps.extents || req.flags & CMD_FLAG_DF != 0 || req.len < SPARSE_READ_MIN {
        return pieces;
    }
    let end = req.offset + req.len;
    {
        let h = c.data_hint.lock();
        if h.0 <= req.offset && end <= h.1 {
            return pieces;
        }
    }
    let qlen = req.len.max(EXTENT_WINDOW).min(c.size - req.offset);
    let Ok(ex) = c.store.extents(req.offset, qlen).await else {
        return pieces;
    };
    let mut pos = req.offset;
    // End of the run of data from the request's offset.
    let mut data_end = Some(req.offset);
    for e in ex {
        if e.offset != pos || e.len == 0 {
            break;
        }
        let hole = e.kind.reads_zero() && e.len >= 4096;
        if hole {
            data_end = None;
        } else if let Some(d) = data_end.as_mut() {
            *d = e.offset + e.len;
        }
        if pos < end {
            let plen = e.len.min(end - pos);
            match pieces.last_mut() {
                Some(last) if last.2 == hole => last.1 += plen,
                _ => pieces.push((pos, plen, hole)),
            }
        }
        pos += e.len;
        if pos >= end && data_end.is_none() {
            break;
        }
    }
    if pos < end {
        // The extents do not cover the request: read it all as data.
        pieces.clear();
        return pieces;
    }
    if let Some(d) = data_end
        && d >= end
    {
        *c.data_hint.lock() = (req.offset, d);
    }
    if pieces.len() == 1 && !pieces[0].2 {
        pieces.clear();
    }
    pieces
}

async fn read(c: &Conn, req: &Request) -> Reply {
    let len = req.len as usize;
    if len >= BATCH
        && let Some(r) = read_shared(c, req).await
    {
        return r;
    }
    if !c.structured {
        let mut b = c.pool.get(SIMPLE_REPLY_LEN + len);
        encode_simple_reply(&mut &mut b[..SIMPLE_REPLY_LEN], 0, req.cookie);
        return match c.store.read(req.offset, &mut b[SIMPLE_REPLY_LEN..]).await {
            Ok(()) => Reply::Pooled(b),
            Err(e) => c.store_error(req, &e).into(),
        };
    }
    let mut pieces = sparse_pieces(c, req).await;
    if pieces.is_empty() {
        pieces.push((req.offset, req.len, false));
    }
    let hlen = if c.extended {
        EXTENDED_REPLY_LEN
    } else {
        STRUCTURED_REPLY_LEN
    };
    let total: usize = pieces
        .iter()
        .map(|p| hlen + if p.2 { 12 } else { 8 + p.1 as usize })
        .sum();
    let mut b = c.pool.get(total);
    let mut at = 0;
    let n = pieces.len();
    for (i, &(off, plen, hole)) in pieces.iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let (typ, clen) = if hole {
            (REPLY_TYPE_OFFSET_HOLE, 12)
        } else {
            (REPLY_TYPE_OFFSET_DATA, 8 + plen)
        };
        let mut h = &mut b[at..at + hlen + 8];
        encode_chunk_header(&mut h, c.ext_off(req), flags, typ, req.cookie, clen);
        h.put_u64(off);
        at += hlen + 8;
        if hole {
            b[at..at + 4].copy_from_slice(&(plen as u32).to_be_bytes());
            at += 4;
        } else {
            let data = &mut b[at..at + plen as usize];
            if let Err(e) = c.store.read(off, data).await {
                return c.store_error(req, &e).into();
            }
            at += plen as usize;
        }
    }
    debug_assert_eq!(at, total);
    Reply::Pooled(b)
}

/// A read reply made of the store's own buffers, if the store lends them
/// ([`memsync_core::Store::read_shared`]); `None` to copy them as usual.
async fn read_shared(c: &Conn, req: &Request) -> Option<Reply> {
    let mut parts = Vec::new();
    if !c.structured {
        let shared = match c.store.read_shared(req.offset, req.len).await? {
            Ok(v) => v,
            Err(e) => return Some(c.store_error(req, &e).into()),
        };
        let mut h = BytesMut::with_capacity(SIMPLE_REPLY_LEN);
        encode_simple_reply(&mut h, 0, req.cookie);
        parts.push(h.freeze());
        parts.extend(shared);
        return Some(Reply::Shared(parts));
    }
    let mut pieces = sparse_pieces(c, req).await;
    if pieces.is_empty() {
        pieces.push((req.offset, req.len, false));
    }
    let n = pieces.len();
    let mut h = BytesMut::new();
    for (i, &(off, plen, hole)) in pieces.iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        if hole {
            encode_chunk_header(
                &mut h,
                c.ext_off(req),
                flags,
                REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                12,
            );
            h.put_u64(off);
            h.put_u32(plen as u32);
            continue;
        }
        let shared = match c.store.read_shared(off, plen).await? {
            Ok(v) => v,
            Err(e) => return Some(c.store_error(req, &e).into()),
        };
        encode_chunk_header(
            &mut h,
            c.ext_off(req),
            flags,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            8 + plen,
        );
        h.put_u64(off);
        parts.push(h.split().freeze());
        parts.extend(shared);
    }
    if !h.is_empty() {
        parts.push(h.freeze());
    }
    Some(Reply::Shared(parts))
}

/// Most descriptors in one block status reply.
const MAX_REPLY_DESCRIPTORS: usize = 64 * 1024;

async fn block_status(c: &Conn, req: &Request) -> BytesMut {
    if !c.meta {
        return c.error(req, EINVAL, "no metadata context was negotiated");
    }
    if req.len == 0 || !c.in_range(req) {
        return c.error(req, EINVAL, "block status range is empty or beyond the end");
    }
    // Descriptor lengths are 32-bit in compact mode; keep each query well inside that.
    let qlen = req.len.min(if c.extended { 1 << 40 } else { 1 << 31 });
    let ex = match c.store.extents(req.offset, qlen).await {
        Ok(ex) => ex,
        Err(e) => return c.store_error(req, &e),
    };
    let mut d: Vec<Descriptor> = Vec::new();
    for e in ex {
        let flags = match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => STATE_ZERO,
            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
        };
        match d.last_mut() {
            Some(l) if l.flags == flags => l.len += e.len,
            _ => {
                if d.len() == MAX_REPLY_DESCRIPTORS {
                    break;
                }
                d.push(Descriptor { len: e.len, flags })
            }
        }
    }
    if d.is_empty() {
        d.push(Descriptor {
            len: qlen,
            flags: 0,
        });
    }
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        d.truncate(1);
    }
    let mut p = BytesMut::new();
    encode_block_status(&mut p, 1, c.extended, &d);
    let typ = if c.extended {
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        REPLY_TYPE_BLOCK_STATUS
    };
    let mut b = BytesMut::with_capacity(p.len() + 32);
    encode_chunk_header(
        &mut b,
        c.ext_off(req),
        REPLY_FLAG_DONE,
        typ,
        req.cookie,
        p.len() as u64,
    );
    b.extend_from_slice(&p);
    b
}
