//! The DSM wire protocol (`PROTOCOL.md` in this crate): length-prefixed frames, one message
//! each. Decoding never panics and checks every length, count and identifier against a limit
//! before it trusts it; a frame that breaks a rule is an error and ends the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use memsync_core::wire::ProtoError;
use memsync_core::wire::{Frame, done, flag, need, truncate};

/// "MEMSYNCD": the first bytes of every connection's HELLO.
pub const MAGIC: &[u8; 8] = b"MEMSYNCD";
/// The protocol version this code speaks (2: RECOVER, WHO, HAVE and TAKE, the dynamic
/// scheme's node loss).
pub const VERSION: u16 = 2;
/// Most nodes of one region (a copyset is a 64-bit set).
pub const MAX_NODES: usize = 64;
/// Smallest page (the granularity of coherence): 4 KiB.
pub const MIN_PAGE: u32 = 4096;
/// Largest page: 2 MiB.
pub const MAX_PAGE: u32 = 2 << 20;
/// Most pages of a region (2^40: with 4 KiB pages, 4 PiB).
pub const MAX_PAGES: u64 = 1 << 40;
/// Largest frame body: a PAGE of the largest page size and its header.
pub const MAX_FRAME: usize = MAX_PAGE as usize + 64;
/// Bytes of an ERROR reason.
pub const MAX_REASON: usize = 256;

/// A node's index in the static node list.
pub type NodeId = u16;

const T_HELLO: u8 = 1;
const T_REQUEST: u8 = 2;
const T_FORWARD: u8 = 3;
const T_PAGE: u8 = 4;
const T_INVALIDATE: u8 = 5;
const T_INV_ACK: u8 = 6;
const T_CONFIRM: u8 = 7;
const T_ERROR: u8 = 8;
const T_PING: u8 = 9;
const T_PONG: u8 = 10;
const T_RECOVER: u8 = 11;
const T_WHO: u8 = 12;
const T_HAVE: u8 = 13;
const T_TAKE: u8 = 14;

/// What a requester wants of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Want {
    /// A read copy (the owner keeps ownership and adds the requester to the copyset).
    Read = 1,
    /// Ownership and the page (the requester invalidates the copyset before it writes).
    Write = 2,
}

impl Want {
    fn from_u8(v: u8) -> Result<Want, ProtoError> {
        match v {
            1 => Ok(Want::Read),
            2 => Ok(Want::Write),
            _ => Err(ProtoError::Invalid("access kind")),
        }
    }
}

/// Why a request failed (ERROR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The page's only copy was on a node that died and there is no backing store.
    Lost = 1,
    /// The request broke the protocol (e.g. it was forwarded more than the chain bound).
    Protocol = 2,
    /// The node is shutting down.
    Shutdown = 3,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Result<ErrorCode, ProtoError> {
        match v {
            1 => Ok(ErrorCode::Lost),
            2 => Ok(ErrorCode::Protocol),
            3 => Ok(ErrorCode::Shutdown),
            _ => Err(ProtoError::Invalid("error code")),
        }
    }
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// First frame on a connection, both ways: who is speaking and the region's shape, which
    /// must match on both sides.
    Hello {
        node: NodeId,
        nodes: u16,
        scheme: u8,
        page_size: u32,
        pages: u64,
    },
    /// Requester to the page's manager (centralized and fixed distributed schemes).
    Request {
        want: Want,
        req: u64,
        page: u64,
        from: NodeId,
    },
    /// To the (probable) owner: from the manager, or along probable owners (dynamic scheme),
    /// `hops` counting the forwards so far.
    Forward {
        want: Want,
        req: u64,
        page: u64,
        from: NodeId,
        hops: u8,
    },
    /// Owner to requester: the page's data at `version`; with `grant`, ownership and the
    /// copyset the new owner must invalidate.
    Page {
        req: u64,
        page: u64,
        owner: NodeId,
        version: u64,
        grant: bool,
        copyset: u64,
        data: Bytes,
    },
    /// New owner to a copy holder: drop the copy; `owner` is the new owner at `version`.
    Invalidate {
        req: u64,
        page: u64,
        owner: NodeId,
        version: u64,
    },
    /// The copy is gone.
    InvAck { req: u64, page: u64 },
    /// Requester to manager: the request `req` for `page` is complete (the manager may serve
    /// the next one).
    Confirm { req: u64, page: u64, from: NodeId },
    /// A request failed.
    Error {
        req: u64,
        page: u64,
        code: ErrorCode,
        reason: String,
    },
    /// Liveness probe (membership).
    Ping { nonce: u64 },
    /// Answer to a PING.
    Pong { nonce: u64 },
    /// Dynamic scheme: a request (as FORWARD) whose next hop, node `dead`, is down, sent to
    /// the heir (the lowest-numbered live node), which recovers the page's owner.
    Recover {
        want: Want,
        req: u64,
        page: u64,
        from: NodeId,
        hops: u8,
        dead: NodeId,
    },
    /// Heir to every live node: what do you know of `page`? Answered (HAVE) once every node
    /// of `down` (a set) is down at the receiver too, so that what they sent it is in.
    Who { req: u64, page: u64, down: u64 },
    /// Answer to WHO and TAKE: whether this node owns `page` (or has been granted it), holds a
    /// read copy, at which `version`, and its probable owner.
    Have {
        req: u64,
        page: u64,
        owner: bool,
        copy: bool,
        version: u64,
        prob: NodeId,
        prob_v: u64,
    },
    /// Heir to a read-copy holder: take ownership of `page` at `version` if the copy held is
    /// still the one of version `copy_v`, with `copyset` the nodes that may hold copies.
    /// Answered by HAVE (`owner` set if taken).
    Take {
        req: u64,
        page: u64,
        version: u64,
        copy_v: u64,
        copyset: u64,
    },
}

fn node(v: u16) -> Result<NodeId, ProtoError> {
    if usize::from(v) >= MAX_NODES {
        return Err(ProtoError::Invalid("node id"));
    }
    Ok(v)
}

fn page(v: u64) -> Result<u64, ProtoError> {
    if v >= MAX_PAGES {
        return Err(ProtoError::Invalid("page number"));
    }
    Ok(v)
}

/// Whether `n` is a valid page size: a power of two from [`MIN_PAGE`] to [`MAX_PAGE`].
#[must_use]
pub fn valid_page_size(n: u32) -> bool {
    n.is_power_of_two() && (MIN_PAGE..=MAX_PAGE).contains(&n)
}

impl Msg {
    /// The frame: a big-endian u32 body length, then the body (type byte and payload).
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        match self {
            Msg::Hello {
                node,
                nodes,
                scheme,
                page_size,
                pages,
            } => {
                b.put_u8(T_HELLO);
                b.put_slice(MAGIC);
                b.put_u16(VERSION);
                b.put_u16(*node);
                b.put_u16(*nodes);
                b.put_u8(*scheme);
                b.put_u32(*page_size);
                b.put_u64(*pages);
            }
            Msg::Request {
                want,
                req,
                page,
                from,
            } => {
                b.put_u8(T_REQUEST);
                b.put_u8(*want as u8);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*from);
            }
            Msg::Forward {
                want,
                req,
                page,
                from,
                hops,
            } => {
                b.put_u8(T_FORWARD);
                b.put_u8(*want as u8);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*from);
                b.put_u8(*hops);
            }
            Msg::Page {
                req,
                page,
                owner,
                version,
                grant,
                copyset,
                data,
            } => {
                b.reserve(data.len());
                b.put_u8(T_PAGE);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*owner);
                b.put_u64(*version);
                b.put_u8(u8::from(*grant));
                b.put_u64(*copyset);
                b.put_u32(data.len() as u32);
                b.put_slice(data);
            }
            Msg::Invalidate {
                req,
                page,
                owner,
                version,
            } => {
                b.put_u8(T_INVALIDATE);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*owner);
                b.put_u64(*version);
            }
            Msg::InvAck { req, page } => {
                b.put_u8(T_INV_ACK);
                b.put_u64(*req);
                b.put_u64(*page);
            }
            Msg::Confirm { req, page, from } => {
                b.put_u8(T_CONFIRM);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*from);
            }
            Msg::Error {
                req,
                page,
                code,
                reason,
            } => {
                let r = truncate(reason, MAX_REASON);
                b.put_u8(T_ERROR);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u8(*code as u8);
                b.put_u16(r.len() as u16);
                b.put_slice(r.as_bytes());
            }
            Msg::Ping { nonce } => {
                b.put_u8(T_PING);
                b.put_u64(*nonce);
            }
            Msg::Pong { nonce } => {
                b.put_u8(T_PONG);
                b.put_u64(*nonce);
            }
            Msg::Recover {
                want,
                req,
                page,
                from,
                hops,
                dead,
            } => {
                b.put_u8(T_RECOVER);
                b.put_u8(*want as u8);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u16(*from);
                b.put_u8(*hops);
                b.put_u16(*dead);
            }
            Msg::Who { req, page, down } => {
                b.put_u8(T_WHO);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u64(*down);
            }
            Msg::Have {
                req,
                page,
                owner,
                copy,
                version,
                prob,
                prob_v,
            } => {
                b.put_u8(T_HAVE);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u8(u8::from(*owner));
                b.put_u8(u8::from(*copy));
                b.put_u64(*version);
                b.put_u16(*prob);
                b.put_u64(*prob_v);
            }
            Msg::Take {
                req,
                page,
                version,
                copy_v,
                copyset,
            } => {
                b.put_u8(T_TAKE);
                b.put_u64(*req);
                b.put_u64(*page);
                b.put_u64(*version);
                b.put_u64(*copy_v);
                b.put_u64(*copyset);
            }
        }
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        b.freeze()
    }

    /// Decodes one frame body (without the length prefix).
    ///
    /// # Errors
    ///
    /// A [`ProtoError`] for a body that breaks a rule of `PROTOCOL.md`.
    pub fn decode(mut b: Bytes) -> Result<Msg, ProtoError> {
        if b.len() > MAX_FRAME {
            return Err(ProtoError::TooLong(b.len()));
        }
        if b.is_empty() {
            return Err(ProtoError::Empty);
        }
        let t = b.get_u8();
        let (what, m) = match t {
            T_HELLO => {
                let what = "HELLO";
                need(&b, 8 + 2 + 2 + 2 + 1 + 4 + 8, what)?;
                if &b.split_to(8)[..] != MAGIC {
                    return Err(ProtoError::Magic("memsync DSM peer"));
                }
                if b.get_u16() != VERSION {
                    return Err(ProtoError::Invalid("protocol version"));
                }
                let id = node(b.get_u16())?;
                let nodes = b.get_u16();
                if nodes == 0 || usize::from(nodes) > MAX_NODES || id >= nodes {
                    return Err(ProtoError::Invalid("node count"));
                }
                let scheme = b.get_u8();
                let page_size = b.get_u32();
                if !valid_page_size(page_size) {
                    return Err(ProtoError::Invalid("page size"));
                }
                let pages = b.get_u64();
                if pages == 0 || pages > MAX_PAGES {
                    return Err(ProtoError::Invalid("page count"));
                }
                (
                    what,
                    Msg::Hello {
                        node: id,
                        nodes,
                        scheme,
                        page_size,
                        pages,
                    },
                )
            }
            T_REQUEST => {
                let what = "REQUEST";
                need(&b, 1 + 8 + 8 + 2, what)?;
                let want = Want::from_u8(b.get_u8())?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let from = node(b.get_u16())?;
                (
                    what,
                    Msg::Request {
                        want,
                        req,
                        page,
                        from,
                    },
                )
            }
            T_FORWARD => {
                let what = "FORWARD";
                need(&b, 1 + 8 + 8 + 2 + 1, what)?;
                let want = Want::from_u8(b.get_u8())?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let from = node(b.get_u16())?;
                let hops = b.get_u8();
                (
                    what,
                    Msg::Forward {
                        want,
                        req,
                        page,
                        from,
                        hops,
                    },
                )
            }
            T_PAGE => {
                let what = "PAGE";
                need(&b, 8 + 8 + 2 + 8 + 1 + 8 + 4, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let owner = node(b.get_u16())?;
                let version = b.get_u64();
                let grant = flag(b.get_u8())?;
                let copyset = b.get_u64();
                let n = b.get_u32();
                if !valid_page_size(n) {
                    return Err(ProtoError::Invalid("page data length"));
                }
                need(&b, n as usize, what)?;
                let data = b.split_to(n as usize);
                (
                    what,
                    Msg::Page {
                        req,
                        page,
                        owner,
                        version,
                        grant,
                        copyset,
                        data,
                    },
                )
            }
            T_INVALIDATE => {
                let what = "INVALIDATE";
                need(&b, 8 + 8 + 2 + 8, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let owner = node(b.get_u16())?;
                let version = b.get_u64();
                (
                    what,
                    Msg::Invalidate {
                        req,
                        page,
                        owner,
                        version,
                    },
                )
            }
            T_INV_ACK => {
                let what = "INV_ACK";
                need(&b, 16, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                (what, Msg::InvAck { req, page })
            }
            T_CONFIRM => {
                let what = "CONFIRM";
                need(&b, 18, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let from = node(b.get_u16())?;
                (what, Msg::Confirm { req, page, from })
            }
            T_ERROR => {
                let what = "ERROR";
                need(&b, 8 + 8 + 1 + 2, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let code = ErrorCode::from_u8(b.get_u8())?;
                let n = usize::from(b.get_u16());
                if n > MAX_REASON {
                    return Err(ProtoError::Invalid("error reason length"));
                }
                need(&b, n, what)?;
                let reason = String::from_utf8(b.split_to(n).to_vec())
                    .map_err(|_| ProtoError::Invalid("error reason (not UTF-8)"))?;
                (
                    what,
                    Msg::Error {
                        req,
                        page,
                        code,
                        reason,
                    },
                )
            }
            T_PING | T_PONG => {
                let what = if t == T_PING { "PING" } else { "PONG" };
                need(&b, 8, what)?;
                let nonce = b.get_u64();
                (
                    what,
                    if t == T_PING {
                        Msg::Ping { nonce }
                    } else {
                        Msg::Pong { nonce }
                    },
                )
            }
            T_RECOVER => {
                let what = "RECOVER";
                need(&b, 1 + 8 + 8 + 2 + 1 + 2, what)?;
                let want = Want::from_u8(b.get_u8())?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let from = node(b.get_u16())?;
                let hops = b.get_u8();
                let dead = node(b.get_u16())?;
                (
                    what,
                    Msg::Recover {
                        want,
                        req,
                        page,
                        from,
                        hops,
                        dead,
                    },
                )
            }
            T_WHO => {
                let what = "WHO";
                need(&b, 8 + 8 + 8, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let down = b.get_u64();
                (what, Msg::Who { req, page, down })
            }
            T_HAVE => {
                let what = "HAVE";
                need(&b, 8 + 8 + 1 + 1 + 8 + 2 + 8, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let owner = flag(b.get_u8())?;
                let copy = flag(b.get_u8())?;
                let version = b.get_u64();
                let prob = node(b.get_u16())?;
                let prob_v = b.get_u64();
                (
                    what,
                    Msg::Have {
                        req,
                        page,
                        owner,
                        copy,
                        version,
                        prob,
                        prob_v,
                    },
                )
            }
            T_TAKE => {
                let what = "TAKE";
                need(&b, 8 * 5, what)?;
                let req = b.get_u64();
                let page = page(b.get_u64())?;
                let version = b.get_u64();
                let copy_v = b.get_u64();
                let copyset = b.get_u64();
                (
                    what,
                    Msg::Take {
                        req,
                        page,
                        version,
                        copy_v,
                        copyset,
                    },
                )
            }
            t => return Err(ProtoError::Type(t)),
        };
        done(&b, what)?;
        Ok(m)
    }

    /// The message's name in `PROTOCOL.md`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "HELLO",
            Msg::Request { .. } => "REQUEST",
            Msg::Forward { .. } => "FORWARD",
            Msg::Page { .. } => "PAGE",
            Msg::Invalidate { .. } => "INVALIDATE",
            Msg::InvAck { .. } => "INV_ACK",
            Msg::Confirm { .. } => "CONFIRM",
            Msg::Error { .. } => "ERROR",
            Msg::Ping { .. } => "PING",
            Msg::Pong { .. } => "PONG",
            Msg::Recover { .. } => "RECOVER",
            Msg::Who { .. } => "WHO",
            Msg::Have { .. } => "HAVE",
            Msg::Take { .. } => "TAKE",
        }
    }
}

impl Frame for Msg {
    const MAX_FRAME: usize = MAX_FRAME;

    fn decode(body: Bytes) -> Result<Self, ProtoError> {
        Msg::decode(body)
    }
}

/// The body length from a frame's 4-byte prefix, checked against [`MAX_FRAME`].
///
/// # Errors
///
/// [`ProtoError::TooLong`] or [`ProtoError::Empty`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    memsync_core::wire::frame_len(prefix, MAX_FRAME)
}

/// Parses a stream of frames (as a receiver reads them) until the bytes end or one is refused;
/// returns the messages decoded. The fuzz target drives this.
#[must_use]
pub fn decode_stream(b: Bytes) -> (Vec<Msg>, Option<ProtoError>) {
    memsync_core::wire::decode_stream(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn want() -> impl Strategy<Value = Want> {
        prop_oneof![Just(Want::Read), Just(Want::Write)]
    }

    fn nid() -> impl Strategy<Value = NodeId> {
        0..MAX_NODES as u16
    }

    fn pg() -> impl Strategy<Value = u64> {
        0..MAX_PAGES
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (nid(), any::<u8>(), 12u32..=21, 1..=MAX_PAGES).prop_map(|(n, s, shift, pages)| {
                Msg::Hello {
                    node: n,
                    nodes: n + 1,
                    scheme: s,
                    page_size: 1 << shift,
                    pages,
                }
            }),
            (want(), any::<u64>(), pg(), nid()).prop_map(|(want, req, page, from)| {
                Msg::Request {
                    want,
                    req,
                    page,
                    from,
                }
            }),
            (want(), any::<u64>(), pg(), nid(), any::<u8>()).prop_map(
                |(want, req, page, from, hops)| Msg::Forward {
                    want,
                    req,
                    page,
                    from,
                    hops,
                }
            ),
            (
                any::<u64>(),
                pg(),
                nid(),
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<u8>()
            )
                .prop_map(|(req, page, owner, version, grant, copyset, fill)| {
                    Msg::Page {
                        req,
                        page,
                        owner,
                        version,
                        grant,
                        copyset,
                        data: Bytes::from(vec![fill; MIN_PAGE as usize]),
                    }
                }),
            (any::<u64>(), pg(), nid(), any::<u64>()).prop_map(|(req, page, owner, version)| {
                Msg::Invalidate {
                    req,
                    page,
                    owner,
                    version,
                }
            }),
            (any::<u64>(), pg()).prop_map(|(req, page)| Msg::InvAck { req, page }),
            (any::<u64>(), pg(), nid()).prop_map(|(req, page, from)| Msg::Confirm {
                req,
                page,
                from
            }),
            (
                any::<u64>(),
                pg(),
                prop_oneof![
                    Just(ErrorCode::Lost),
                    Just(ErrorCode::Protocol),
                    Just(ErrorCode::Shutdown)
                ],
                "[a-zé ]{0,40}"
            )
                .prop_map(|(req, page, code, reason)| Msg::Error {
                    req,
                    page,
                    code,
                    reason
                }),
            any::<u64>().prop_map(|nonce| Msg::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Msg::Pong { nonce }),
            (want(), any::<u64>(), pg(), nid(), any::<u8>(), nid()).prop_map(
                |(want, req, page, from, hops, dead)| Msg::Recover {
                    want,
                    req,
                    page,
                    from,
                    hops,
                    dead,
                }
            ),
            (any::<u64>(), pg(), any::<u64>()).prop_map(|(req, page, down)| Msg::Who {
                req,
                page,
                down
            }),
            (
                any::<u64>(),
                pg(),
                any::<bool>(),
                any::<bool>(),
                any::<u64>(),
                nid(),
                any::<u64>()
            )
                .prop_map(|(req, page, owner, copy, version, prob, prob_v)| {
                    Msg::Have {
                        req,
                        page,
                        owner,
                        copy,
                        version,
                        prob,
                        prob_v,
                    }
                }),
            (any::<u64>(), pg(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(req, page, version, copy_v, copyset)| Msg::Take {
                    req,
                    page,
                    version,
                    copy_v,
                    copyset,
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_roundtrips(m in msg()) {
            let f = m.encode();
            let n = frame_len([f[0], f[1], f[2], f[3]]).unwrap();
            prop_assert_eq!(n, f.len() - 4);
            let back = Msg::decode(f.slice(4..)).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.encode(), f);
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..96)) {
            let b = Bytes::from(body.clone());
            if let Ok(m) = Msg::decode(b) {
                prop_assert_eq!(&m.encode()[4..], &body[..]);
            }
        }

        #[test]
        fn streams_decode_in_order(ms in proptest::collection::vec(msg(), 0..8)) {
            let mut all = BytesMut::new();
            for m in &ms {
                all.extend_from_slice(&m.encode());
            }
            let (got, err) = decode_stream(all.freeze());
            prop_assert_eq!(err, None);
            prop_assert_eq!(got, ms);
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(ProtoError::TooLong(MAX_FRAME + 1))
        );
        assert_eq!(frame_len([0; 4]), Err(ProtoError::Empty));
        // A node id past the copyset's width.
        let m = Msg::Confirm {
            req: 1,
            page: 2,
            from: MAX_NODES as u16,
        };
        assert_eq!(
            Msg::decode(m.encode().slice(4..)),
            Err(ProtoError::Invalid("node id"))
        );
        // A page number past the limit.
        let m = Msg::InvAck {
            req: 1,
            page: MAX_PAGES,
        };
        assert_eq!(
            Msg::decode(m.encode().slice(4..)),
            Err(ProtoError::Invalid("page number"))
        );
        // PAGE data that is not a valid page size, or that claims more than is there.
        let good = Msg::Page {
            req: 1,
            page: 0,
            owner: 0,
            version: 1,
            grant: false,
            copyset: 0,
            data: Bytes::from(vec![7; MIN_PAGE as usize]),
        }
        .encode();
        let len_at = 4 + 1 + 8 + 8 + 2 + 8 + 1 + 8;
        let mut bad = good.to_vec();
        bad[len_at..len_at + 4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Invalid("page data length"))
        );
        let mut bad = good.to_vec();
        bad[len_at..len_at + 4].copy_from_slice(&(2 * MIN_PAGE).to_be_bytes());
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Short("PAGE"))
        );
        // A grant flag other than 0/1.
        let mut bad = good.to_vec();
        bad[len_at - 9] = 2;
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Invalid("flag"))
        );
        // Trailing bytes.
        let mut bad = Msg::Ping { nonce: 3 }.encode().to_vec();
        bad.push(0);
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Trailing("PING", 1))
        );
        // A HELLO from something else, or with a node id outside its own count.
        let h = Msg::Hello {
            node: 3,
            nodes: 4,
            scheme: 0,
            page_size: MIN_PAGE,
            pages: 1,
        }
        .encode();
        let mut bad = h.to_vec();
        bad[5] ^= 1;
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Magic("memsync DSM peer"))
        );
        let mut bad = h.to_vec();
        let nodes_at = 4 + 1 + 8 + 2 + 2;
        bad[nodes_at..nodes_at + 2].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Invalid("node count"))
        );
        // Recovery messages: a dead node id past the copyset's width, a flag other than 0/1.
        let m = Msg::Recover {
            want: Want::Write,
            req: 1,
            page: 2,
            from: 0,
            hops: 0,
            dead: MAX_NODES as u16,
        };
        assert_eq!(
            Msg::decode(m.encode().slice(4..)),
            Err(ProtoError::Invalid("node id"))
        );
        let h = Msg::Have {
            req: 1,
            page: 2,
            owner: false,
            copy: true,
            version: 3,
            prob: 1,
            prob_v: 2,
        }
        .encode();
        let mut bad = h.to_vec();
        bad[4 + 1 + 8 + 8 + 1] = 2;
        assert_eq!(
            Msg::decode(Bytes::from(bad[4..].to_vec())),
            Err(ProtoError::Invalid("flag"))
        );
        let t = Msg::Take {
            req: 1,
            page: MAX_PAGES,
            version: 1,
            copy_v: 0,
            copyset: 0,
        };
        assert_eq!(
            Msg::decode(t.encode().slice(4..)),
            Err(ProtoError::Invalid("page number"))
        );
        let w = Msg::Who {
            req: 1,
            page: 0,
            down: 1,
        }
        .encode();
        assert_eq!(
            Msg::decode(w.slice(4..w.len() - 1)),
            Err(ProtoError::Short("WHO"))
        );
        // An over-long reason is cut at a char boundary when encoded.
        let e = Msg::Error {
            req: 0,
            page: 0,
            code: ErrorCode::Lost,
            reason: "é".repeat(MAX_REASON),
        };
        match Msg::decode(e.encode().slice(4..)).unwrap() {
            Msg::Error { reason, .. } => assert!(reason.len() <= MAX_REASON),
            m => panic!("{m:?}"),
        }
    }
}
