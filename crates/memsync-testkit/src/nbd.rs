//! A deliberately broken NBD server, for tests that a client refuses replies it must not
//! trust. It does a real fixed-newstyle handshake (structured replies yes, extended headers and
//! metadata contexts no), then answers every READ with the malformed reply that the export name
//! chooses ([`Bad::name`]); export `good` answers correctly, so that a test can show the server
//! itself works.
//!
//! It is written from the protocol document with plain blocking sockets, independently of
//! memsync's own NBD code, so that a misreading shared by memsync's server and client cannot
//! hide here.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Size of every export.
pub const SIZE: u64 = 1 << 20;

/// The byte at export offset `o` (export `good` serves this pattern).
pub fn byte_at(o: u64) -> u8 {
    (o % 251) as u8 ^ 0x5a
}

/// What the server answers a READ with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// A correct reply: one data chunk with the whole range.
    Good,
    /// Only `NONE` with DONE: no data and no hole.
    NoData,
    /// Data for the first half, then `NONE` with DONE.
    HalfData,
    /// Data for the whole range, then a hole over its first half.
    Overlap,
    /// A data chunk that starts inside the request and ends past it.
    OutOfRange,
    /// A data chunk with more bytes than asked for.
    LongData,
    /// The right data under another request's cookie.
    WrongCookie,
    /// `NONE` with a 4-byte payload.
    NoneWithPayload,
    /// `NONE` without DONE, and nothing after it.
    NoneWithoutDone,
    /// An error chunk with bytes after its message.
    ErrorTrailing,
    /// An error chunk whose message length runs past its payload.
    ErrorMessageTooLong,
    /// An error chunk with error 0.
    ErrorZero,
    /// An `ERROR_OFFSET` chunk with an offset outside the request.
    ErrorOffsetOutside,
    /// A chunk of unknown type without the error bit.
    UnknownType,
    /// A hole chunk with a 16-byte payload.
    HoleBadLength,
    /// A data chunk with no data (length 8).
    EmptyData,
    /// A simple reply with the data, which structured replies forbid for reads.
    SimpleToRead,
    /// The data, then a block status chunk, which a read cannot have.
    BlockStatusToRead,
    /// The data under an extended reply header, which was not negotiated.
    ExtendedHeader,
}

impl Bad {
    pub const ALL: &[Bad] = &[
        Bad::Good,
        Bad::NoData,
        Bad::HalfData,
        Bad::Overlap,
        Bad::OutOfRange,
        Bad::LongData,
        Bad::WrongCookie,
        Bad::NoneWithPayload,
        Bad::NoneWithoutDone,
        Bad::ErrorTrailing,
        Bad::ErrorMessageTooLong,
        Bad::ErrorZero,
        Bad::ErrorOffsetOutside,
        Bad::UnknownType,
        Bad::HoleBadLength,
        Bad::EmptyData,
        Bad::SimpleToRead,
        Bad::BlockStatusToRead,
        Bad::ExtendedHeader,
    ];

    /// The export name that selects this reply.
    pub fn name(self) -> &'static str {
        match self {
            Bad::Good => "good",
            Bad::NoData => "no-data",
            Bad::HalfData => "half-data",
            Bad::Overlap => "overlap",
            Bad::OutOfRange => "out-of-range",
            Bad::LongData => "long-data",
            Bad::WrongCookie => "wrong-cookie",
            Bad::NoneWithPayload => "none-with-payload",
            Bad::NoneWithoutDone => "none-without-done",
            Bad::ErrorTrailing => "error-trailing",
            Bad::ErrorMessageTooLong => "error-message-too-long",
            Bad::ErrorZero => "error-zero",
            Bad::ErrorOffsetOutside => "error-offset-outside",
            Bad::UnknownType => "unknown-type",
            Bad::HoleBadLength => "hole-bad-length",
            Bad::EmptyData => "empty-data",
            Bad::SimpleToRead => "simple-to-read",
            Bad::BlockStatusToRead => "block-status-to-read",
            Bad::ExtendedHeader => "extended-header",
        }
    }

    fn from_name(s: &str) -> Option<Bad> {
        Bad::ALL.iter().copied().find(|b| b.name() == s)
    }
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_MAGIC: u32 = 0x6e8a_278c;
const DONE: u16 = 1;
const T_NONE: u16 = 0;
const T_DATA: u16 = 1;
const T_HOLE: u16 = 2;
const T_BLOCK_STATUS: u16 = 5;
const T_ERROR: u16 = 0x8001;
const T_ERROR_OFFSET: u16 = 0x8002;
/// HAS_FLAGS | READ_ONLY | SEND_FLUSH.
const TRANSMISSION_FLAGS: u16 = 1 | 2 | 4;

/// The server: accepts connections on 127.0.0.1 until dropped.
#[derive(Debug)]
pub struct BrokenNbd {
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl BrokenNbd {
    pub fn start() -> io::Result<BrokenNbd> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            for s in l.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = s {
                    std::thread::spawn(move || {
                        let _ = serve(s);
                    });
                }
            }
        });
        Ok(BrokenNbd {
            port,
            stop,
            accept: Some(accept),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nbd://127.0.0.1:PORT/NAME` for the export that answers with `bad`.
    pub fn url(&self, bad: Bad) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, bad.name())
    }
}

impl Drop for BrokenNbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn read_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn opt_reply(s: &mut TcpStream, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// The handshake; returns the reply mode chosen by the export name, or `None` to hang up.
fn handshake(s: &mut TcpStream) -> io::Result<Option<Bad>> {
    const ACK: u32 = 1;
    const INFO: u32 = 3;
    const ERR_UNSUP: u32 = (1 << 31) + 1;
    const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    let mut g = Vec::new();
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    let cflags = be32(&read_n(s, 4)?);
    loop {
        let h = read_n(s, 16)?;
        if be64(&h) != IHAVEOPT {
            return Ok(None);
        }
        let (option, len) = (be32(&h[8..]), be32(&h[12..]) as usize);
        if len > 64 * 1024 {
            return Ok(None);
        }
        let data = read_n(s, len)?;
        match option {
            // EXPORT_NAME
            1 => {
                let Some(bad) = std::str::from_utf8(&data).ok().and_then(Bad::from_name) else {
                    return Ok(None);
                };
                let mut b = Vec::new();
                b.extend_from_slice(&SIZE.to_be_bytes());
                b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if cflags & 2 == 0 {
                    b.resize(b.len() + 124, 0);
                }
                s.write_all(&b)?;
                return Ok(Some(bad));
            }
            // ABORT
            2 => {
                opt_reply(s, option, ACK, &[])?;
                return Ok(None);
            }
            // INFO, GO
            6 | 7 => {
                let name = (data.len() >= 4)
                    .then(|| be32(&data) as usize)
                    .and_then(|n| data.get(4..4 + n))
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(Bad::from_name);
                let Some(bad) = name else {
                    opt_reply(s, option, ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut info = Vec::new();
                info.extend_from_slice(&0u16.to_be_bytes()); // NBD_INFO_EXPORT
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                opt_reply(s, option, INFO, &info)?;
                opt_reply(s, option, ACK, &[])?;
                if option == 7 {
                    return Ok(Some(bad));
                }
            }
            // STRUCTURED_REPLY
            8 => opt_reply(s, option, ACK, &[])?,
            // SET_META_CONTEXT: no context is selected.
            10 => opt_reply(s, option, ACK, &[])?,
            _ => opt_reply(s, option, ERR_UNSUP, &[])?,
        }
    }
}

struct Out(Vec<u8>);

impl Out {
    fn chunk(&mut self, flags: u16, typ: u16, cookie: u64, payload: &[u8]) {
        self.0.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&typ.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
    }

    fn data(&mut self, flags: u16, cookie: u64, off: u64, len: u64) {
        self.chunk(flags, T_DATA, cookie, &data_payload(off, len));
    }

    fn hole(&mut self, flags: u16, cookie: u64, off: u64, len: u32) {
        let mut p = off.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(flags, T_HOLE, cookie, &p);
    }

    fn error(&mut self, typ: u16, cookie: u64, errno: u32, msg_len: u16, rest: &[u8]) {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&msg_len.to_be_bytes());
        p.extend_from_slice(rest);
        self.chunk(DONE, typ, cookie, &p);
    }
}

fn pattern(off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(byte_at).collect()
}

fn data_payload(off: u64, len: u64) -> Vec<u8> {
    let mut p = off.to_be_bytes().to_vec();
    p.extend_from_slice(&pattern(off, len));
    p
}

fn read_reply(bad: Bad, cookie: u64, off: u64, len: u64) -> Vec<u8> {
    let mut o = Out(Vec::new());
    let half = len / 2;
    match bad {
        Bad::Good => o.data(DONE, cookie, off, len),
        Bad::NoData => o.chunk(DONE, T_NONE, cookie, &[]),
        Bad::HalfData => {
            o.data(0, cookie, off, half);
            o.chunk(DONE, T_NONE, cookie, &[]);
        }
        Bad::Overlap => {
            o.data(0, cookie, off, len);
            o.hole(DONE, cookie, off, half as u32);
        }
        Bad::OutOfRange => o.data(DONE, cookie, off + half, len),
        Bad::LongData => o.data(DONE, cookie, off, len + 8),
        Bad::WrongCookie => o.data(DONE, cookie.wrapping_add(1000), off, len),
        Bad::NoneWithPayload => o.chunk(DONE, T_NONE, cookie, &[0; 4]),
        Bad::NoneWithoutDone => o.chunk(0, T_NONE, cookie, &[]),
        Bad::ErrorTrailing => o.error(T_ERROR, cookie, 5, 1, b"x\0\0"),
        Bad::ErrorMessageTooLong => o.error(T_ERROR, cookie, 5, 100, b"short"),
        Bad::ErrorZero => o.error(T_ERROR, cookie, 0, 0, &[]),
        Bad::ErrorOffsetOutside => o.error(
            T_ERROR_OFFSET,
            cookie,
            5,
            0,
            &(off + len + 4096).to_be_bytes(),
        ),
        Bad::UnknownType => o.chunk(DONE, 3, cookie, &[]),
        Bad::HoleBadLength => {
            let mut p = off.to_be_bytes().to_vec();
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0; 4]);
            o.chunk(DONE, T_HOLE, cookie, &p);
        }
        Bad::EmptyData => o.chunk(DONE, T_DATA, cookie, &off.to_be_bytes()),
        Bad::SimpleToRead => {
            o.0.extend_from_slice(&SIMPLE_MAGIC.to_be_bytes());
            o.0.extend_from_slice(&0u32.to_be_bytes());
            o.0.extend_from_slice(&cookie.to_be_bytes());
            o.0.extend_from_slice(&pattern(off, len));
        }
        Bad::BlockStatusToRead => {
            o.data(0, cookie, off, len);
            let mut p = 1u32.to_be_bytes().to_vec();
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            o.chunk(DONE, T_BLOCK_STATUS, cookie, &p);
        }
        Bad::ExtendedHeader => {
            let p = data_payload(off, len);
            o.0.extend_from_slice(&EXTENDED_MAGIC.to_be_bytes());
            o.0.extend_from_slice(&DONE.to_be_bytes());
            o.0.extend_from_slice(&T_DATA.to_be_bytes());
            o.0.extend_from_slice(&cookie.to_be_bytes());
            o.0.extend_from_slice(&off.to_be_bytes());
            o.0.extend_from_slice(&(p.len() as u64).to_be_bytes());
            o.0.extend_from_slice(&p);
        }
    }
    o.0
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let Some(bad) = handshake(&mut s)? else {
        return Ok(());
    };
    loop {
        let h = read_n(&mut s, 28)?;
        if be32(&h) != REQUEST_MAGIC {
            return Ok(());
        }
        let typ = be16(&h[6..]);
        let cookie = be64(&h[8..]);
        let off = be64(&h[16..]);
        let len = u64::from(be32(&h[24..]));
        let reply = match typ {
            0 if off.checked_add(len).is_some_and(|e| e <= SIZE) && len <= 32 << 20 => {
                read_reply(bad, cookie, off, len)
            }
            // DISC
            2 => return Ok(()),
            _ => {
                // Anything else (the export is read-only) succeeds or fails plainly.
                let errno: u32 = if typ == 3 { 0 } else { 22 };
                let mut o = Out(Vec::new());
                if errno == 0 {
                    o.chunk(DONE, T_NONE, cookie, &[]);
                } else {
                    o.error(T_ERROR, cookie, errno, 0, &[]);
                }
                o.0
            }
        };
        s.write_all(&reply)?;
    }
}
