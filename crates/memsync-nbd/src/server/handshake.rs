//! The server's side of the handshake: greeting, options (INFO/GO, LIST, STARTTLS, structured
//! replies, extended headers, meta contexts), until the client picks an export.

use std::io;

use bytes::{BufMut, BytesMut};
use memsync_core::Caps;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::{Export, Inner, TlsMode};
use crate::proto::*;
use crate::transport::Transport;

/// State negotiated during the handshake.
#[derive(Default, Clone, Debug)]
pub(super) struct Negotiated {
    no_zeroes: bool,
    pub(super) structured: bool,
    pub(super) extended: bool,
    /// Export name for which base:allocation was selected.
    pub(super) meta: Option<String>,
}

enum HsEnd {
    Close,
    StartTls,
    Go(usize),
}

/// A connection that has finished negotiating: the stream, what was negotiated, the export.
pub(super) enum Ready<S> {
    Plain(S, Negotiated, usize),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Negotiated, usize),
}

pub(super) async fn handshake<S: Transport>(inner: &Inner, mut s: S) -> Option<Ready<S>> {
    let mut neg = Negotiated::default();
    // Greeting.
    let mut g = BytesMut::with_capacity(18);
    g.put_u64(NBDMAGIC);
    g.put_u64(IHAVEOPT);
    g.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&g).await.ok()?;
    let cflags = read_u32(&mut s).await.ok()?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        debug!("nbd: unknown client flags {cflags:#x}");
        return None;
    }
    neg.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    match negotiate(inner, &mut s, &mut neg, false).await {
        Ok(HsEnd::Go(i)) => Some(Ready::Plain(s, neg, i)),
        Ok(HsEnd::StartTls) => {
            let cfg = inner.cfg.tls.clone()?;
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let mut t = match acceptor.accept(s).await {
                Ok(t) => t,
                Err(e) => {
                    info!("nbd: TLS handshake failed: {e}");
                    return None;
                }
            };
            // Options negotiated before TLS do not carry over.
            let mut neg = Negotiated {
                no_zeroes: neg.no_zeroes,
                ..Default::default()
            };
            match negotiate(inner, &mut t, &mut neg, true).await {
                Ok(HsEnd::Go(i)) => Some(Ready::Tls(Box::new(t), neg, i)),
                _ => {
                    let _ = t.shutdown().await;
                    None
                }
            }
        }
        Ok(HsEnd::Close) | Err(_) => None,
    }
}

async fn read_u32<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

fn find_export(inner: &Inner, name: &str) -> Option<usize> {
    inner
        .cfg
        .exports
        .iter()
        .position(|e| e.name == name)
        .or_else(|| name.is_empty().then_some(0))
}

pub(super) fn export_caps(e: &Export) -> (Caps, bool) {
    let caps = e.store.caps();
    (caps, e.read_only || caps.read_only)
}

/// Transmission flags, advertised from the store's capabilities.
pub(super) fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let (caps, ro) = export_caps(e);
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
    if ro {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_WRITE_ZEROES;
        if caps.trim {
            f |= TF_SEND_TRIM;
        }
        if caps.fast_zero {
            f |= TF_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if caps.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

fn block_sizes(e: &Export, max_payload: u32) -> Info {
    let caps = e.store.caps();
    let min = caps.block_size.clamp(1, 64 * 1024) as u32;
    let max = max_payload.max(min);
    let preferred = (caps.preferred_io.clamp(min.into(), max.into()) as u32).max(4096.min(max));
    Info::BlockSize {
        min,
        preferred,
        max,
    }
}

const MAX_OPTIONS: usize = 4096;

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    s: &mut S,
    neg: &mut Negotiated,
    tls: bool,
) -> io::Result<HsEnd> {
    let cfg = &inner.cfg;
    let mut shutting_down = inner.shutdown.subscribe();
    let mut out = BytesMut::new();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        if *shutting_down.borrow() {
            return Ok(HsEnd::Close);
        }
        tokio::select! {
            r = s.read_exact(&mut h) => { r?; }
            _ = shutting_down.changed() => return Ok(HsEnd::Close),
        }
        let hdr =
            parse_option_header(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.clear();
        if hdr.len > MAX_OPTION_LEN {
            if hdr.len > 16 << 20 || hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            tokio::io::copy(&mut (&mut *s).take(hdr.len.into()), &mut tokio::io::sink()).await?;
            encode_opt_reply(&mut out, hdr.option, REP_ERR_TOO_BIG, b"option too large");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        let mut data = vec![0u8; hdr.len as usize];
        s.read_exact(&mut data).await?;
        let err = |out: &mut BytesMut, code: u32, msg: &str| {
            encode_opt_reply(out, hdr.option, code, truncate_str(msg, 1024).as_bytes())
        };
        if *shutting_down.borrow_and_update() && hdr.option != OPT_ABORT {
            if hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            err(&mut out, REP_ERR_SHUTDOWN, "server shutting down");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        if cfg.tls_mode == TlsMode::Required
            && !tls
            && !matches!(hdr.option, OPT_STARTTLS | OPT_ABORT)
        {
            if hdr.option == OPT_EXPORT_NAME {
                return Ok(HsEnd::Close);
            }
            err(&mut out, REP_ERR_TLS_REQD, "TLS is required on this server");
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
        let opt = match parse_option(hdr.option, &data) {
            Ok(o) => o,
            Err(e) => {
                if hdr.option == OPT_EXPORT_NAME {
                    return Ok(HsEnd::Close);
                }
                err(&mut out, REP_ERR_INVALID, &e.to_string());
                s.write_all(&out).await?;
                s.flush().await?;
                continue;
            }
        };
        let mut end = None;
        match opt {
            Opt::ExportName(name) => {
                let Some(i) = find_export(inner, &name) else {
                    debug!("nbd: EXPORT_NAME {name:?}: no such export");
                    return Ok(HsEnd::Close);
                };
                let e = &cfg.exports[i];
                out.put_u64(e.store.size());
                out.put_u16(transmission_flags(e, neg.structured));
                if !neg.no_zeroes {
                    out.put_bytes(0, EXPORT_NAME_ZEROES);
                }
                end = Some(HsEnd::Go(i));
            }
            Opt::Abort => {
                encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                end = Some(HsEnd::Close);
            }
            Opt::List => {
                for e in &cfg.exports {
                    encode_opt_reply(
                        &mut out,
                        hdr.option,
                        REP_SERVER,
                        &encode_rep_server(&e.name, &e.description),
                    );
                }
                encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
            }
            Opt::StartTls => {
                if tls {
                    err(&mut out, REP_ERR_INVALID, "TLS is already active");
                } else if cfg.tls_mode == TlsMode::Off {
                    err(
                        &mut out,
                        REP_ERR_POLICY,
                        "TLS is not enabled on this server",
                    );
                } else {
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                    end = Some(HsEnd::StartTls);
                }
            }
            Opt::Info { go, name, requests } => match find_export(inner, &name) {
                None => err(
                    &mut out,
                    REP_ERR_UNKNOWN,
                    &format!("no export named {name:?}"),
                ),
                Some(i) => {
                    let e = &cfg.exports[i];
                    let mut infos = vec![Info::Export {
                        size: e.store.size(),
                        flags: transmission_flags(e, neg.structured),
                    }];
                    if requests.contains(&INFO_NAME) {
                        infos.push(Info::Name(e.name.clone()));
                    }
                    if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
                        infos.push(Info::Description(e.description.clone()));
                    }
                    infos.push(block_sizes(e, cfg.max_payload));
                    for i in &infos {
                        encode_opt_reply(&mut out, hdr.option, REP_INFO, &encode_info(i));
                    }
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                    if go {
                        if neg
                            .meta
                            .as_deref()
                            .is_some_and(|m| m != e.name && !(m.is_empty() && i == 0))
                        {
                            // Contexts were selected for another export.
                            neg.meta = None;
                        }
                        end = Some(HsEnd::Go(i));
                    }
                }
            },
            Opt::StructuredReply => {
                if neg.extended {
                    err(
                        &mut out,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if neg.structured {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    neg.structured = true;
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::ExtendedHeaders => {
                if neg.extended {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    neg.extended = true;
                    neg.structured = true;
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::MetaContext { set, name, queries } => {
                if !neg.structured {
                    err(
                        &mut out,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else if find_export(inner, &name).is_none() {
                    err(
                        &mut out,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    );
                } else {
                    let selected = if set {
                        queries.iter().any(|q| q == META_BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries
                                .iter()
                                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                    };
                    if selected {
                        let mut d = BytesMut::new();
                        d.put_u32(if set { 1 } else { 0 });
                        d.put_slice(META_BASE_ALLOCATION.as_bytes());
                        encode_opt_reply(&mut out, hdr.option, REP_META_CONTEXT, &d);
                    }
                    if set {
                        neg.meta = selected.then_some(name);
                    }
                    encode_opt_reply(&mut out, hdr.option, REP_ACK, &[]);
                }
            }
            Opt::Unknown(o) => err(
                &mut out,
                REP_ERR_UNSUP,
                &format!("option {o} is not supported"),
            ),
        }
        s.write_all(&out).await?;
        s.flush().await?;
        if let Some(e) = end {
            return Ok(e);
        }
    }
    Ok(HsEnd::Close)
}
