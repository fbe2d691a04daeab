//! NBD wire format: constants and pure, panic-free parsers and encoders.
//!
//! Everything here works on byte slices with explicit limits, so that no byte sequence from a
//! peer can make it panic or allocate without bound. Numbers are big-endian, as in the
//! protocol. Values follow the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`),
//! including the 64-bit extended headers.

use bytes::{BufMut, BytesMut};

// ---- handshake ----
/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- options ----
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- option replies ----
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

/// Whether an option reply type is an error.
pub fn is_rep_err(t: u32) -> bool {
    t & REP_ERR != 0
}

// ---- info types ----
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- transmission flags ----
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---- requests ----
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Bytes in a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes in an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- replies ----
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Whether a structured reply chunk type is an error chunk.
pub fn is_error_chunk(t: u16) -> bool {
    t & (1 << 15) != 0
}

// ---- base:allocation ----
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---- errors ----
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Map an errno from a store to the set the protocol allows.
pub fn wire_errno(e: i32) -> u32 {
    match e {
        1 | 13 => EPERM,
        12 => ENOMEM,
        22 => EINVAL,
        28 | 27 | 122 => ENOSPC, // EFBIG, EDQUOT -> ENOSPC
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

// ---- limits ----
/// Longest string (export name, description, error message) accepted.
pub const MAX_STRING: usize = 4096;
/// Largest option payload accepted (the longest legitimate one is a meta-context request).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most meta-context queries in one option.
pub const MAX_QUERIES: u32 = 128;
/// Most info requests in one INFO/GO.
pub const MAX_INFO_REQUESTS: u16 = 64;
/// Default largest request payload (read or write).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Payloads up to this size should not be treated as an attack even beyond the advertised
/// maximum (the protocol's 2^25): a server answers them with an error instead of hanging up.
pub const PORTABLE_MAX_PAYLOAD: u64 = 1 << 25;
/// The TCP port of `nbd://HOST` without one (the NBD URI spec's).
pub const DEFAULT_PORT: u16 = 10809;
/// Bytes of zeros after an EXPORT_NAME reply without NO_ZEROES.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Why a message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("bad magic 0x{0:x}")]
    BadMagic(u64),
    #[error("{what} is {len} bytes, longer than the limit {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over a byte slice whose reads fail instead of panicking.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING`].
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::TooLong {
                what: "string",
                len: len as u64,
                max: MAX_STRING as u64,
            });
        }
        let b = self.take(len)?;
        check_string(b)
    }
}

fn check_string(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING {
        return Err(ProtoError::TooLong {
            what: "string",
            len: b.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    if b.contains(&0) {
        return Err(ProtoError::Invalid("string with NUL"));
    }
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ProtoError::Invalid("string (not UTF-8)"))
}

// ======================= handshake: options =======================

/// The 16-byte header of an option request (after which `len` bytes of data follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub const OPTION_HEADER_LEN: usize = 16;

/// Parse an option request header.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(b, "option header");
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: c.u32()?,
        len: c.u32()?,
    })
}

/// Encode an option request.
pub fn encode_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// An option parsed from its header and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// INFO (`go == false`) or GO: export name and the info types requested.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// LIST_META_CONTEXT (`set == false`) or SET_META_CONTEXT.
    MetaContext {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    ExtendedHeaders,
    Unknown(u32),
}

/// Parse an option's data. Options that take no data fail with `Invalid` if they have some.
pub fn parse_option(option: u32, data: &[u8]) -> Result<Opt, ProtoError> {
    if data.len() > MAX_OPTION_LEN as usize {
        return Err(ProtoError::TooLong {
            what: "option",
            len: data.len() as u64,
            max: MAX_OPTION_LEN as u64,
        });
    }
    let no_data = |o: Opt| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(ProtoError::Invalid("data in an option that takes none"))
        }
    };
    match option {
        OPT_EXPORT_NAME => Ok(Opt::ExportName(check_string(data)?)),
        OPT_ABORT => Ok(Opt::Abort), // data is ignored: the session ends anyway
        OPT_LIST => no_data(Opt::List),
        OPT_STARTTLS => no_data(Opt::StartTls),
        OPT_STRUCTURED_REPLY => no_data(Opt::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(Opt::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let mut c = Cursor::new(data, "INFO/GO data");
            let nlen = c.u32()? as usize;
            let name = c.string(nlen)?;
            let n = c.u16()?;
            if n > MAX_INFO_REQUESTS {
                return Err(ProtoError::TooLong {
                    what: "info request list",
                    len: n.into(),
                    max: MAX_INFO_REQUESTS.into(),
                });
            }
            let mut requests = Vec::with_capacity(n.into());
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            if c.remaining() != 0 {
                return Err(ProtoError::Invalid("trailing bytes in INFO/GO"));
            }
            Ok(Opt::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut c = Cursor::new(data, "meta context data");
            let nlen = c.u32()? as usize;
            let name = c.string(nlen)?;
            let n = c.u32()?;
            if n > MAX_QUERIES {
                return Err(ProtoError::TooLong {
                    what: "meta context query list",
                    len: n.into(),
                    max: MAX_QUERIES.into(),
                });
            }
            let mut queries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let l = c.u32()? as usize;
                queries.push(c.string(l)?);
            }
            if c.remaining() != 0 {
                return Err(ProtoError::Invalid("trailing bytes in meta context option"));
            }
            Ok(Opt::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            })
        }
        other => Ok(Opt::Unknown(other)),
    }
}

/// Encode an option (the inverse of [`parse_option`]).
pub fn encode_opt(out: &mut BytesMut, opt: &Opt) {
    let mut d = BytesMut::new();
    let code = match opt {
        Opt::ExportName(n) => {
            d.put_slice(n.as_bytes());
            OPT_EXPORT_NAME
        }
        Opt::Abort => OPT_ABORT,
        Opt::List => OPT_LIST,
        Opt::StartTls => OPT_STARTTLS,
        Opt::StructuredReply => OPT_STRUCTURED_REPLY,
        Opt::ExtendedHeaders => OPT_EXTENDED_HEADERS,
        Opt::Info { go, name, requests } => {
            d.put_u32(name.len() as u32);
            d.put_slice(name.as_bytes());
            d.put_u16(requests.len() as u16);
            for r in requests {
                d.put_u16(*r);
            }
            if *go { OPT_GO } else { OPT_INFO }
        }
        Opt::MetaContext { set, name, queries } => {
            d.put_u32(name.len() as u32);
            d.put_slice(name.as_bytes());
            d.put_u32(queries.len() as u32);
            for q in queries {
                d.put_u32(q.len() as u32);
                d.put_slice(q.as_bytes());
            }
            if *set {
                OPT_SET_META_CONTEXT
            } else {
                OPT_LIST_META_CONTEXT
            }
        }
        Opt::Unknown(c) => *c,
    };
    encode_option(out, code, &d);
}

/// The 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

pub const OPT_REPLY_HEADER_LEN: usize = 20;

pub fn parse_opt_reply_header(b: &[u8]) -> Result<OptReplyHeader, ProtoError> {
    let mut c = Cursor::new(b, "option reply header");
    let magic = c.u64()?;
    if magic != REPLY_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptReplyHeader {
        option: c.u32()?,
        reply: c.u32()?,
        len: c.u32()?,
    })
}

pub fn encode_opt_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Information about an export, as sent in `NBD_REP_INFO` replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown(u16),
}

pub fn encode_info(info: &Info) -> BytesMut {
    let mut d = BytesMut::new();
    match info {
        Info::Export { size, flags } => {
            d.put_u16(INFO_EXPORT);
            d.put_u64(*size);
            d.put_u16(*flags);
        }
        Info::Name(n) => {
            d.put_u16(INFO_NAME);
            d.put_slice(n.as_bytes());
        }
        Info::Description(n) => {
            d.put_u16(INFO_DESCRIPTION);
            d.put_slice(n.as_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            d.put_u16(INFO_BLOCK_SIZE);
            d.put_u32(*min);
            d.put_u32(*preferred);
            d.put_u32(*max);
        }
        Info::Unknown(t) => d.put_u16(*t),
    }
    d
}

pub fn parse_info(data: &[u8]) -> Result<Info, ProtoError> {
    let mut c = Cursor::new(data, "info reply");
    let t = c.u16()?;
    let info = match t {
        INFO_EXPORT => Info::Export {
            size: c.u64()?,
            flags: c.u16()?,
        },
        INFO_NAME => Info::Name(check_string(c.rest())?),
        INFO_DESCRIPTION => Info::Description(check_string(c.rest())?),
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: c.u32()?,
            preferred: c.u32()?,
            max: c.u32()?,
        },
        other => {
            c.rest();
            Info::Unknown(other)
        }
    };
    if c.remaining() != 0 {
        return Err(ProtoError::Invalid("trailing bytes in info reply"));
    }
    Ok(info)
}

/// Parse `NBD_REP_SERVER` data: the export name and its description.
pub fn parse_rep_server(data: &[u8]) -> Result<(String, String), ProtoError> {
    let mut c = Cursor::new(data, "server reply");
    let l = c.u32()? as usize;
    let name = c.string(l)?;
    let desc = check_string(c.rest())?;
    Ok((name, desc))
}

pub fn encode_rep_server(name: &str, description: &str) -> BytesMut {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_slice(description.as_bytes());
    d
}

/// Parse `NBD_REP_META_CONTEXT` data: the context id and name.
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut c = Cursor::new(data, "meta context reply");
    let id = c.u32()?;
    Ok((id, check_string(c.rest())?))
}

// ======================= transmission: requests =======================

/// A request header (compact or extended; `len` is 64-bit in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

/// Parse a request header; `extended` selects the 32-byte form.
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(b, "request header");
    let magic = c.u32()?;
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    let flags = c.u16()?;
    let typ = c.u16()?;
    let cookie = c.u64()?;
    let offset = c.u64()?;
    let len = if extended { c.u64()? } else { c.u32()?.into() };
    Ok(Request {
        flags,
        typ,
        cookie,
        offset,
        len,
    })
}

/// Encode a request header. In compact mode `len` must fit in 32 bits (it is truncated
/// otherwise, which callers prevent).
pub fn encode_request(out: &mut BytesMut, r: &Request, extended: bool) {
    if extended {
        out.put_u32(EXTENDED_REQUEST_MAGIC);
    } else {
        out.put_u32(REQUEST_MAGIC);
    }
    out.put_u16(r.flags);
    out.put_u16(r.typ);
    out.put_u64(r.cookie);
    out.put_u64(r.offset);
    if extended {
        out.put_u64(r.len);
    } else {
        out.put_u32(r.len as u32);
    }
}

// ======================= transmission: replies =======================

/// A reply header of any of the three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    /// A structured (20-byte) or extended (32-byte, `offset` set) chunk header.
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: Option<u64>,
        len: u64,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Bytes of the reply header that starts with `magic` (first 4 bytes), if it is known.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_LEN),
        _ => None,
    }
}

/// Parse a reply header; the kind is chosen by its magic.
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut c = Cursor::new(b, "reply header");
    let magic = c.u32()?;
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: c.u32()?,
            cookie: c.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
            flags: c.u16()?,
            typ: c.u16()?,
            cookie: c.u64()?,
            offset: None,
            len: c.u32()?.into(),
        }),
        EXTENDED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
            flags: c.u16()?,
            typ: c.u16()?,
            cookie: c.u64()?,
            offset: Some(c.u64()?),
            len: c.u64()?,
        }),
        other => Err(ProtoError::BadMagic(other.into())),
    }
}

/// Encode a simple reply header.
pub fn encode_simple_reply(out: &mut impl BufMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Encode a structured (`extended == None`) or extended (`Some(request offset)`) chunk header.
pub fn encode_chunk_header(
    out: &mut impl BufMut,
    extended: Option<u64>,
    flags: u16,
    typ: u16,
    cookie: u64,
    len: u64,
) {
    match extended {
        None => {
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u32(len as u32);
        }
        Some(off) => {
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u64(off);
            out.put_u64(len);
        }
    }
}

/// An error chunk's payload: errno, message, and (for ERROR_OFFSET) the offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

pub fn encode_error_payload(out: &mut BytesMut, error: u32, message: &str, offset: Option<u64>) {
    let msg = truncate_str(message, 1024);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
    if let Some(o) = offset {
        out.put_u64(o);
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while cut > 0 && !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.get(..cut).unwrap_or("")
}

/// Parse an error chunk payload of type `typ`. Unknown error types (bit 15 set) parse as
/// errors without offset, as the spec asks; their payload may go on after the message (fields
/// this parser does not know), whereas the two known types must end exactly where their fields
/// do.
pub fn parse_error_chunk(typ: u16, payload: &[u8]) -> Result<ErrorChunk, ProtoError> {
    let mut c = Cursor::new(payload, "error chunk");
    let error = c.u32()?;
    let ml = c.u16()? as usize;
    if ml > MAX_STRING {
        return Err(ProtoError::TooLong {
            what: "error message",
            len: ml as u64,
            max: MAX_STRING as u64,
        });
    }
    let msg = c.take(ml)?;
    let message = String::from_utf8_lossy(msg).into_owned();
    let offset = if typ == REPLY_TYPE_ERROR_OFFSET {
        Some(c.u64()?)
    } else {
        None
    };
    if matches!(typ, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET) && c.remaining() != 0 {
        return Err(ProtoError::Invalid("error chunk length"));
    }
    if error == 0 {
        return Err(ProtoError::Invalid("error chunk with error 0"));
    }
    Ok(ErrorChunk {
        error,
        message,
        offset,
    })
}

/// Parse an OFFSET_HOLE payload: offset and hole size.
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtoError> {
    let mut c = Cursor::new(payload, "hole chunk");
    let off = c.u64()?;
    let len = c.u32()?;
    if c.remaining() != 0 || len == 0 {
        return Err(ProtoError::Invalid("hole chunk"));
    }
    Ok((off, len))
}

/// A block status descriptor: length and status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub flags: u32,
}

/// Most descriptors accepted in one block status chunk.
pub const MAX_DESCRIPTORS: usize = 1 << 20;

/// Parse a BLOCK_STATUS (`ext == false`) or BLOCK_STATUS_EXT payload.
pub fn parse_block_status(payload: &[u8], ext: bool) -> Result<(u32, Vec<Descriptor>), ProtoError> {
    let mut c = Cursor::new(payload, "block status chunk");
    let id = c.u32()?;
    let (count, size) = if ext {
        (c.u32()? as usize, 16)
    } else {
        (c.remaining() / 8, 8)
    };
    if c.remaining() != count.saturating_mul(size) || count == 0 {
        return Err(ProtoError::Invalid("block status descriptor count"));
    }
    if count > MAX_DESCRIPTORS {
        return Err(ProtoError::TooLong {
            what: "block status",
            len: count as u64,
            max: MAX_DESCRIPTORS as u64,
        });
    }
    let mut v = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, flags) = if ext {
            let l = c.u64()?;
            let f = u32::try_from(c.u64()?)
                .map_err(|_| ProtoError::Invalid("block status flags beyond 32 bits"))?;
            (l, f)
        } else {
            (c.u32()?.into(), c.u32()?)
        };
        if len == 0 {
            return Err(ProtoError::Invalid("zero-length block status descriptor"));
        }
        v.push(Descriptor { len, flags });
    }
    Ok((id, v))
}

/// Encode a BLOCK_STATUS / BLOCK_STATUS_EXT payload. In compact mode, descriptor lengths must
/// fit in 32 bits (callers split them).
pub fn encode_block_status(out: &mut BytesMut, id: u32, ext: bool, d: &[Descriptor]) {
    out.put_u32(id);
    if ext {
        out.put_u32(d.len() as u32);
        for x in d {
            out.put_u64(x.len);
            out.put_u64(x.flags.into());
        }
    } else {
        for x in d {
            out.put_u32(x.len as u32);
            out.put_u32(x.flags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn magic_values() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(REPLY_TYPE_ERROR, 32769);
        assert!(is_rep_err(REP_ERR_UNSUP) && !is_rep_err(REP_ACK));
    }

    #[test]
    fn truncated_and_bad_input_is_an_error() {
        assert!(matches!(
            parse_request(&[0x25, 0x60, 0x95, 0x13, 0, 0], false),
            Err(ProtoError::Truncated(_))
        ));
        assert!(matches!(
            parse_request(&[0u8; 28], false),
            Err(ProtoError::BadMagic(0))
        ));
        assert!(parse_option(OPT_LIST, b"x").is_err());
        assert!(parse_option(OPT_GO, &[0, 0, 0, 5, b'a']).is_err());
        assert!(parse_option(OPT_GO, &[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], false).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9]).is_err());
        // Known error types end with their fields; an unknown one may carry more.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 1, b'x', 0]).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 1, b'x']).is_ok());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &[0, 0, 0, 5, 0, 0, 0]).is_err());
        assert!(parse_error_chunk((1 << 15) + 9, &[0, 0, 0, 5, 0, 1, b'x', 0]).is_ok());
        let mut ext = vec![0, 0, 0, 1, 0, 0, 0, 1];
        ext.extend_from_slice(&4096u64.to_be_bytes());
        ext.extend_from_slice(&(1u64 << 32).to_be_bytes());
        assert!(parse_block_status(&ext, true).is_err());
        assert_eq!(truncate_str("héllo", 2), "h");
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/_ é-]{0,40}"
    }

    fn arb_opt() -> impl Strategy<Value = Opt> {
        prop_oneof![
            arb_string().prop_map(Opt::ExportName),
            Just(Opt::List),
            Just(Opt::StartTls),
            Just(Opt::StructuredReply),
            Just(Opt::ExtendedHeaders),
            (
                any::<bool>(),
                arb_string(),
                proptest::collection::vec(any::<u16>(), 0..8)
            )
                .prop_map(|(go, name, requests)| Opt::Info { go, name, requests }),
            (
                any::<bool>(),
                arb_string(),
                proptest::collection::vec(arb_string(), 0..5)
            )
                .prop_map(|(set, name, queries)| Opt::MetaContext {
                    set,
                    name,
                    queries
                }),
            (12u32..1000).prop_map(Opt::Unknown),
        ]
    }

    proptest! {
        #[test]
        fn option_round_trip(opt in arb_opt()) {
            let mut b = BytesMut::new();
            encode_opt(&mut b, &opt);
            let h = parse_option_header(&b).unwrap();
            prop_assert_eq!(h.len as usize, b.len() - OPTION_HEADER_LEN);
            let back = parse_option(h.option, &b[OPTION_HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, opt);
        }

        #[test]
        fn request_round_trip(flags: u16, typ: u16, cookie: u64, offset: u64, len: u64, ext: bool) {
            let len = if ext { len } else { len & 0xffff_ffff };
            let r = Request { flags, typ, cookie, offset, len };
            let mut b = BytesMut::new();
            encode_request(&mut b, &r, ext);
            prop_assert_eq!(b.len(), if ext { EXTENDED_REQUEST_LEN } else { REQUEST_LEN });
            prop_assert_eq!(parse_request(&b, ext).unwrap(), r);
            prop_assert!(parse_request(&b, !ext).is_err());
        }

        #[test]
        fn reply_round_trip(flags: u16, typ: u16, cookie: u64, off: Option<u64>, len: u32, error: u32) {
            let mut b = BytesMut::new();
            encode_chunk_header(&mut b, off, flags, typ, cookie, len.into());
            let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            prop_assert_eq!(reply_header_len(magic), Some(b.len()));
            prop_assert_eq!(parse_reply_header(&b).unwrap(), ReplyHeader::Chunk { flags, typ, cookie, offset: off, len: len.into() });
            let mut s = BytesMut::new();
            encode_simple_reply(&mut s, error, cookie);
            prop_assert_eq!(parse_reply_header(&s).unwrap(), ReplyHeader::Simple { error, cookie });
        }

        #[test]
        fn block_status_round_trip(id: u32, ext: bool, d in proptest::collection::vec((1u64..u32::MAX as u64, any::<u32>()), 1..20)) {
            let d: Vec<Descriptor> = d.into_iter().map(|(len, flags)| Descriptor { len, flags }).collect();
            let mut b = BytesMut::new();
            encode_block_status(&mut b, id, ext, &d);
            prop_assert_eq!(parse_block_status(&b, ext).unwrap(), (id, d));
        }

        #[test]
        fn info_and_error_round_trip(size: u64, flags: u16, min: u32, error in 1u32.., msg in arb_string(), off: Option<u64>) {
            for i in [Info::Export { size, flags }, Info::BlockSize { min, preferred: min, max: min }, Info::Name(msg.clone())] {
                prop_assert_eq!(parse_info(&encode_info(&i)).unwrap(), i);
            }
            let mut b = BytesMut::new();
            encode_error_payload(&mut b, error, &msg, off);
            let typ = if off.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
            prop_assert_eq!(parse_error_chunk(typ, &b).unwrap(), ErrorChunk { error, message: msg, offset: off });
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128), option in 0u32..14, ext: bool) {
            let _ = parse_option_header(&data);
            let _ = parse_option(option, &data);
            let _ = parse_opt_reply_header(&data);
            let _ = parse_info(&data);
            let _ = parse_rep_server(&data);
            let _ = parse_rep_meta_context(&data);
            let _ = parse_request(&data, ext);
            let _ = parse_reply_header(&data);
            let _ = parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &data);
            let _ = parse_offset_hole(&data);
            let _ = parse_block_status(&data, ext);
        }
    }
}
