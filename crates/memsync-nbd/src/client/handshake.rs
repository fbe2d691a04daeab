//! The client's side of the handshake: greeting, STARTTLS, the options it asks for, and the
//! export's size, flags and block sizes.

use bytes::BytesMut;
use memsync_core::{Result, StoreError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClientConfig, io_err, nbd_err, proto_err};
use crate::proto::*;

/// What the handshake established: the export's size, its transmission flags (`TF_*`), its
/// block sizes, and the reply formats and `base:allocation` context the requests may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size of the export in bytes.
    pub size: u64,
    /// Transmission flags (`proto::TF_*`): read-only, flush, FUA, trim, multi-conn, ...
    pub flags: u16,
    /// Minimum block size (1 if the server sent none).
    pub min: u32,
    /// Preferred block size (4096, or the minimum if larger, if the server sent none).
    pub preferred: u32,
    /// Maximum payload of one request (32 MiB if the server sent none).
    pub max: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated (they imply structured replies).
    pub extended: bool,
    /// The id of the `base:allocation` meta context, if the server selected it.
    pub meta: Option<u32>,
}

/// The client's side of the handshake on a connected stream (TCP, a unix socket, anything that
/// reads and writes), in the clear: the greeting, then what `cfg` asks for (extended headers,
/// structured replies with `base:allocation`, each only as far as the server offers) and GO
/// for `cfg.export` (EXPORT_NAME with a server that has no GO). On success the stream is in
/// transmission as the returned [`ExportInfo`] says. A kernel NBD device, which knows neither
/// structured replies nor extended headers, takes over a stream negotiated with
/// `cfg.structured` and `cfg.extended_headers` off. `cfg.addr` is not used; a `cfg.tls` is
/// refused here, since STARTTLS replaces the stream ([`NbdStore::connect`](super::NbdStore::connect)
/// negotiates it).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
) -> Result<ExportInfo> {
    if cfg.tls.is_some() {
        return Err(StoreError::Config(
            "nbd: a handshake on a given stream is in the clear; NbdStore::connect negotiates TLS"
                .into(),
        ));
    }
    let no_zeroes = greet(s).await?;
    negotiate(s, cfg, no_zeroes).await
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

pub(super) fn rep_error(what: &str, h: &OptReplyHeader, d: &[u8]) -> StoreError {
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
pub(super) async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
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
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool> {
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

pub(super) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
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
