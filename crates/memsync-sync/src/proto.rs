//! The peer wire protocol (see `PROTOCOL.md` in this crate): length-prefixed frames, each one
//! message. Decoding is panic-free and checks every length and count against a limit before
//! using it; a frame that breaks a rule is an error, never trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use memsync_core::wire::{Frame, ProtoError, done, flag, need, truncate};

use crate::dest::{DestStats, Run};
use crate::digest::{Digest, MAX_CHUNK, MIN_CHUNK, PAGE, ScanStats};

/// "MSYNC" + protocol version 1.
pub const MAGIC: &[u8; 8] = b"MSYNC\0\0\x01";
/// What a peer that sends the wrong magic is not.
const MAGIC_WHAT: &str = "memsync sync peer, or another protocol version";
/// Largest frame body: a whole chunk of the largest size plus its run headers.
pub const MAX_FRAME: usize = MAX_CHUNK as usize + 64 * 1024;
/// Digests per `Digests` frame.
pub const MAX_DIGESTS: usize = 16384;
/// Page digests per chunk, and runs per patch.
pub const MAX_PAGES: usize = (MAX_CHUNK / PAGE) as usize;
/// Bytes of an error message.
pub const MAX_MESSAGE: usize = 4096;

const T_HELLO: u8 = 1;
const T_READY: u8 = 2;
const T_DIGESTS: u8 = 3;
const T_PAGE_REQ: u8 = 4;
const T_PAGE_DIGESTS: u8 = 5;
const T_PATCH: u8 = 6;
const T_PATCHED: u8 = 7;
const T_COMMIT: u8 = 8;
const T_COMMITTED: u8 = 9;
const T_ERROR: u8 = 10;

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Client → peer, first: the store size and chunk size the client will use.
    Hello {
        size: u64,
        chunk_size: u64,
        want_digests: bool,
    },
    /// Peer → client: accepted; `Digests` frames follow if they were asked for.
    Ready {
        index_used: bool,
    },
    /// Peer → client: digests of chunks `first..first + digests.len()`, in order.
    Digests {
        first: u64,
        digests: Vec<Digest>,
    },
    /// Client → peer: send the page digests of a chunk.
    PageReq {
        chunk: u64,
    },
    PageDigests {
        chunk: u64,
        digests: Vec<u64>,
    },
    /// Client → peer: apply runs to a chunk if the result has `digest`.
    Patch {
        chunk: u64,
        digest: Digest,
        runs: Vec<Run>,
    },
    Patched {
        chunk: u64,
        applied: bool,
    },
    /// Client → peer: make everything durable (flush, save the index).
    Commit,
    Committed(DestStats),
    /// Either way: the sender gives up; the connection ends.
    Error(String),
}

fn digest(b: &mut Bytes) -> Digest {
    let mut d = [0u8; 32];
    b.copy_to_slice(&mut d);
    d
}

impl Msg {
    /// The frame: a big-endian u32 body length, then the body (type byte and payload).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        match self {
            Msg::Hello {
                size,
                chunk_size,
                want_digests,
            } => {
                b.put_u8(T_HELLO);
                b.put_slice(MAGIC);
                b.put_u64(*size);
                b.put_u64(*chunk_size);
                b.put_u8(*want_digests as u8);
            }
            Msg::Ready { index_used } => {
                b.put_u8(T_READY);
                b.put_u8(*index_used as u8);
            }
            Msg::Digests { first, digests } => {
                b.reserve(digests.len() * 32 + 16);
                b.put_u8(T_DIGESTS);
                b.put_u64(*first);
                b.put_u32(digests.len() as u32);
                for d in digests {
                    b.put_slice(d);
                }
            }
            Msg::PageReq { chunk } => {
                b.put_u8(T_PAGE_REQ);
                b.put_u64(*chunk);
            }
            Msg::PageDigests { chunk, digests } => {
                b.reserve(digests.len() * 8 + 16);
                b.put_u8(T_PAGE_DIGESTS);
                b.put_u64(*chunk);
                b.put_u32(digests.len() as u32);
                for d in digests {
                    b.put_u64(*d);
                }
            }
            Msg::Patch {
                chunk,
                digest,
                runs,
            } => {
                let data: usize = runs
                    .iter()
                    .map(|r| r.data.as_ref().map_or(0, |d| d.len()))
                    .sum();
                b.reserve(data + runs.len() * 9 + 48);
                b.put_u8(T_PATCH);
                b.put_u64(*chunk);
                b.put_slice(digest);
                b.put_u32(runs.len() as u32);
                for r in runs {
                    b.put_u32(r.off);
                    b.put_u32(r.len);
                    match &r.data {
                        Some(d) => {
                            b.put_u8(0);
                            b.put_slice(d);
                        }
                        None => b.put_u8(1),
                    }
                }
            }
            Msg::Patched { chunk, applied } => {
                b.put_u8(T_PATCHED);
                b.put_u64(*chunk);
                b.put_u8(*applied as u8);
            }
            Msg::Commit => b.put_u8(T_COMMIT),
            Msg::Committed(s) => {
                b.put_u8(T_COMMITTED);
                for v in [
                    s.scan.read,
                    s.scan.hashed,
                    s.scan.holes,
                    s.read,
                    s.written,
                    s.zeroed,
                ] {
                    b.put_u64(v);
                }
                b.put_u8(s.index_used as u8);
            }
            Msg::Error(m) => {
                b.put_u8(T_ERROR);
                let m = truncate(m, MAX_MESSAGE);
                b.put_u16(m.len() as u16);
                b.put_slice(m.as_bytes());
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }

    /// Decode one frame body (without its length prefix).
    pub fn decode(mut b: Bytes) -> Result<Msg, ProtoError> {
        if b.len() > MAX_FRAME {
            return Err(ProtoError::TooLong(b.len()));
        }
        if b.is_empty() {
            return Err(ProtoError::Empty);
        }
        let t = b.get_u8();
        let (msg, what) = match t {
            T_HELLO => {
                need(&b, 8 + 8 + 8 + 1, "hello")?;
                if &b[..8] != MAGIC {
                    return Err(ProtoError::Magic(MAGIC_WHAT));
                }
                b.advance(8);
                let size = b.get_u64();
                let chunk_size = b.get_u64();
                if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
                    return Err(ProtoError::Invalid("chunk size"));
                }
                let want_digests = flag(b.get_u8())?;
                (
                    Msg::Hello {
                        size,
                        chunk_size,
                        want_digests,
                    },
                    "hello",
                )
            }
            T_READY => {
                need(&b, 1, "ready")?;
                (
                    Msg::Ready {
                        index_used: flag(b.get_u8())?,
                    },
                    "ready",
                )
            }
            T_DIGESTS => {
                need(&b, 12, "digests")?;
                let first = b.get_u64();
                let n = b.get_u32() as usize;
                if n == 0 || n > MAX_DIGESTS {
                    return Err(ProtoError::Invalid("digest count"));
                }
                need(&b, n * 32, "digests")?;
                let digests = (0..n).map(|_| digest(&mut b)).collect();
                (Msg::Digests { first, digests }, "digests")
            }
            T_PAGE_REQ => {
                need(&b, 8, "page request")?;
                (Msg::PageReq { chunk: b.get_u64() }, "page request")
            }
            T_PAGE_DIGESTS => {
                need(&b, 12, "page digests")?;
                let chunk = b.get_u64();
                let n = b.get_u32() as usize;
                if n == 0 || n > MAX_PAGES {
                    return Err(ProtoError::Invalid("page digest count"));
                }
                need(&b, n * 8, "page digests")?;
                let digests = (0..n).map(|_| b.get_u64()).collect();
                (Msg::PageDigests { chunk, digests }, "page digests")
            }
            T_PATCH => {
                need(&b, 8 + 32 + 4, "patch")?;
                let chunk = b.get_u64();
                let digest = digest(&mut b);
                let n = b.get_u32() as usize;
                if n > MAX_PAGES {
                    return Err(ProtoError::Invalid("run count"));
                }
                let mut runs = Vec::with_capacity(n);
                let mut end = 0u64;
                for _ in 0..n {
                    need(&b, 9, "patch run")?;
                    let off = b.get_u32();
                    let len = b.get_u32();
                    let kind = b.get_u8();
                    let run_end = off as u64 + len as u64;
                    if len == 0 || (off as u64) < end || run_end > MAX_CHUNK {
                        return Err(ProtoError::Invalid("patch run"));
                    }
                    end = run_end;
                    let data = match kind {
                        0 => {
                            need(&b, len as usize, "patch data")?;
                            Some(b.split_to(len as usize))
                        }
                        1 => None,
                        _ => return Err(ProtoError::Invalid("patch run kind")),
                    };
                    runs.push(Run { off, len, data });
                }
                (
                    Msg::Patch {
                        chunk,
                        digest,
                        runs,
                    },
                    "patch",
                )
            }
            T_PATCHED => {
                need(&b, 9, "patched")?;
                let chunk = b.get_u64();
                let applied = flag(b.get_u8())?;
                (Msg::Patched { chunk, applied }, "patched")
            }
            T_COMMIT => (Msg::Commit, "commit"),
            T_COMMITTED => {
                need(&b, 6 * 8 + 1, "committed")?;
                let mut v = [0u64; 6];
                for x in &mut v {
                    *x = b.get_u64();
                }
                let index_used = flag(b.get_u8())?;
                (
                    Msg::Committed(DestStats {
                        scan: ScanStats {
                            read: v[0],
                            hashed: v[1],
                            holes: v[2],
                        },
                        read: v[3],
                        written: v[4],
                        zeroed: v[5],
                        index_used,
                    }),
                    "committed",
                )
            }
            T_ERROR => {
                need(&b, 2, "error")?;
                let n = b.get_u16() as usize;
                if n > MAX_MESSAGE {
                    return Err(ProtoError::Invalid("error message length"));
                }
                need(&b, n, "error")?;
                let m = String::from_utf8(b.split_to(n).to_vec())
                    .map_err(|_| ProtoError::Invalid("error message (not UTF-8)"))?;
                (Msg::Error(m), "error")
            }
            other => return Err(ProtoError::Type(other)),
        };
        done(&b, what)?;
        Ok(msg)
    }
}

impl Frame for Msg {
    const MAX_FRAME: usize = MAX_FRAME;

    fn decode(body: Bytes) -> Result<Self, ProtoError> {
        Msg::decode(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_core::wire::frame_len;

    fn roundtrip(m: Msg) {
        let f = m.encode();
        let n = frame_len(f[..4].try_into().unwrap(), MAX_FRAME).unwrap();
        assert_eq!(n, f.len() - 4);
        assert_eq!(Msg::decode(f.slice(4..)).unwrap(), m);
        // Every truncation is an error, never a panic.
        for k in 4..f.len() {
            assert!(Msg::decode(f.slice(4..k)).is_err(), "{m:?} cut at {k}");
        }
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Msg::Hello {
            size: 1 << 30,
            chunk_size: 65536,
            want_digests: true,
        });
        roundtrip(Msg::Ready { index_used: false });
        roundtrip(Msg::Digests {
            first: 7,
            digests: vec![[1; 32], [2; 32]],
        });
        roundtrip(Msg::PageReq { chunk: 9 });
        roundtrip(Msg::PageDigests {
            chunk: 9,
            digests: vec![1, 2, 3],
        });
        roundtrip(Msg::Patch {
            chunk: 3,
            digest: [5; 32],
            runs: vec![
                Run {
                    off: 0,
                    len: 3,
                    data: Some(Bytes::from_static(b"abc")),
                },
                Run {
                    off: 4096,
                    len: 4096,
                    data: None,
                },
            ],
        });
        roundtrip(Msg::Patched {
            chunk: 3,
            applied: true,
        });
        roundtrip(Msg::Commit);
        roundtrip(Msg::Committed(DestStats {
            written: 5,
            index_used: true,
            ..DestStats::default()
        }));
        roundtrip(Msg::Error("no".into()));
    }

    /// What the fuzz target checks, on random and mutated frames: never a panic, and what
    /// decodes encodes back to the same message.
    #[test]
    fn random_bodies_never_panic_and_roundtrip() {
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
        let valid = Msg::Patch {
            chunk: 1,
            digest: [2; 32],
            runs: vec![Run {
                off: 0,
                len: 4,
                data: Some(Bytes::from_static(b"abcd")),
            }],
        }
        .encode();
        for _ in 0..200_000 {
            let body = if rng.random_bool(0.5) {
                let mut b = vec![0u8; rng.random_range(0..64)];
                rng.fill_bytes(&mut b);
                if let Some(t) = b.first_mut() {
                    *t %= 12; // mostly known types
                }
                b
            } else {
                let mut b = valid[4..].to_vec();
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
                b.truncate(rng.random_range(1..=b.len()));
                b
            };
            if let Ok(m) = Msg::decode(Bytes::from(body)) {
                assert_eq!(Msg::decode(m.encode().slice(4..)).unwrap(), m);
            }
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert!(frame_len((MAX_FRAME as u32 + 1).to_be_bytes(), MAX_FRAME).is_err());
        assert!(frame_len([0; 4], MAX_FRAME).is_err());
        let mut b = BytesMut::new();
        b.put_u8(T_DIGESTS);
        b.put_u64(0);
        b.put_u32(u32::MAX);
        assert_eq!(
            Msg::decode(b.freeze()),
            Err(ProtoError::Invalid("digest count"))
        );
        // Overlapping runs are refused.
        let mut b = BytesMut::new();
        b.put_u8(T_PATCH);
        b.put_u64(0);
        b.put_slice(&[0; 32]);
        b.put_u32(2);
        for _ in 0..2 {
            b.put_u32(0);
            b.put_u32(8);
            b.put_u8(1);
        }
        assert_eq!(
            Msg::decode(b.freeze()),
            Err(ProtoError::Invalid("patch run"))
        );
        assert_eq!(
            Msg::decode(Bytes::from_static(&[99])),
            Err(ProtoError::Type(99))
        );
    }
}
