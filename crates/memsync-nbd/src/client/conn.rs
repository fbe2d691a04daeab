//! One connection in transmission: requests in flight, replies read in turns by the waiting
//! requests, straight into the callers' buffers.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use memsync_core::{Result, StoreError};
use std::task::{Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ExportInfo, io_err, nbd_err};
use crate::proto::*;

/// What a finished request returns.
pub(super) enum Done {
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
pub(super) struct Conn {
    w: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    st: parking_lot::Mutex<State>,
    pub(super) dead: AtomicBool,
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
    pub(super) fn new(
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
    pub(super) async fn request(
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
