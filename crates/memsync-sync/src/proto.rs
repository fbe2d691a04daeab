//! The peer wire protocol (see `PROTOCOL.md` in this crate): length-prefixed frames, each one
//! message. Decoding is panic-free and checks every length and count against a limit before
//! using it; a frame that breaks a rule is an error, never trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use memsync_core::wire::{Frame, ProtoError, done, flag, need, truncate};

use crate::dest::{DestStats, Run};
use crate::digest::{Digest, MAX_CHUNK, MIN_CHUNK, PAGE, ScanStats};

/// "MSYNC" + protocol version 2.
pub const MAGIC: &[u8; 8] = b"MSYNC\0\0\x02";
/// Bytes of a chunk's BLAKE3 digest in DIGESTS: 128 bits decide which chunks are looked at
/// (see PROTOCOL.md); every patch carries and checks all 256.
pub const WIRE_DIGEST: usize = 16;
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
const T_PULL_REQ: u8 = 11;
const T_PULL_DATA: u8 = 12;

const HELLO_DIGESTS: u8 = 1;
const HELLO_COMPRESS: u8 = 2;
const HELLO_PULL: u8 = 4;

/// Run kinds in PATCH and PULL_DATA.
const RUN_DATA: u8 = 0;
const RUN_ZERO: u8 = 1;
const RUN_LZ4: u8 = 2;

/// A chunk digest as DIGESTS carries it.
pub type WireDigest = [u8; WIRE_DIGEST];

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Client → peer, first: the store size and chunk size the client will use.
    Hello {
        size: u64,
        chunk_size: u64,
        want_digests: bool,
        /// The client would like data runs lz4-compressed (both ways).
        compress: bool,
        /// The peer's store is the source: the client pulls (PULL_REQ), it does not patch.
        pull: bool,
    },
    /// Peer → client: accepted; `Digests` frames follow if they were asked for.
    Ready {
        index_used: bool,
        /// Data runs may be compressed (the client asked and the peer agrees).
        compress: bool,
    },
    /// Peer → client: digests of chunks `first..first + digests.len()`, in order.
    Digests {
        first: u64,
        digests: Vec<WireDigest>,
    },
    /// Client → peer: send the page digests of a chunk.
    PageReq {
        chunk: u64,
    },
    PageDigests {
        chunk: u64,
        digests: Vec<u32>,
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
    /// Client → peer (pull): send chunk `chunk` as runs against these page digests of the
    /// client's copy (none: send it all).
    PullReq {
        chunk: u64,
        pages: Vec<u32>,
    },
    /// Peer → client (pull): the chunk's digest and the runs that differ from the page digests
    /// of the request.
    PullData {
        chunk: u64,
        digest: Digest,
        runs: Vec<Run>,
    },
}

fn digest(b: &mut Bytes) -> Digest {
    let mut d = [0u8; 32];
    b.copy_to_slice(&mut d);
    d
}

fn put_runs(b: &mut BytesMut, chunk: u64, digest: &Digest, runs: &[Run], compress: bool) {
    let data: usize = runs
        .iter()
        .map(|r| r.data.as_ref().map_or(0, |d| d.len()))
        .sum();
    b.reserve(data + runs.len() * 13 + 48);
    b.put_u64(chunk);
    b.put_slice(digest);
    b.put_u32(runs.len() as u32);
    for r in runs {
        b.put_u32(r.off);
        b.put_u32(r.len);
        match &r.data {
            Some(d) => {
                let packed = compress
                    .then(|| lz4_flex::block::compress(d))
                    .filter(|c| c.len() + 4 < d.len());
                match packed {
                    Some(c) => {
                        b.put_u8(RUN_LZ4);
                        b.put_u32(c.len() as u32);
                        b.put_slice(&c);
                    }
                    None => {
                        b.put_u8(RUN_DATA);
                        b.put_slice(d);
                    }
                }
            }
            None => b.put_u8(RUN_ZERO),
        }
    }
}

/// Decode `chunk, digest, runs` (PATCH and PULL_DATA).
fn get_runs(b: &mut Bytes, what: &'static str) -> Result<(u64, Digest, Vec<Run>), ProtoError> {
    need(b, 8 + 32 + 4, what)?;
    let chunk = b.get_u64();
    let digest = digest(b);
    let n = b.get_u32() as usize;
    if n > MAX_PAGES {
        return Err(ProtoError::Invalid("run count"));
    }
    let mut runs = Vec::with_capacity(n);
    let mut end = 0u64;
    for _ in 0..n {
        need(b, 9, "run")?;
        let off = b.get_u32();
        let len = b.get_u32();
        let kind = b.get_u8();
        let run_end = off as u64 + len as u64;
        if len == 0 || (off as u64) < end || run_end > MAX_CHUNK {
            return Err(ProtoError::Invalid("patch run"));
        }
        end = run_end;
        let data = match kind {
            RUN_DATA => {
                need(b, len as usize, "run data")?;
                Some(b.split_to(len as usize))
            }
            RUN_ZERO => None,
            RUN_LZ4 => {
                need(b, 4, "compressed run")?;
                let clen = b.get_u32() as usize;
                // Compression that does not pay is never sent.
                if clen + 4 >= len as usize {
                    return Err(ProtoError::Invalid("compressed run length"));
                }
                need(b, clen, "compressed run")?;
                let packed = b.split_to(clen);
                let mut out = vec![0u8; len as usize];
                match lz4_flex::block::decompress_into(&packed, &mut out) {
                    Ok(n) if n == len as usize => Some(Bytes::from(out)),
                    _ => return Err(ProtoError::Invalid("compressed run")),
                }
            }
            _ => return Err(ProtoError::Invalid("patch run kind")),
        };
        runs.push(Run { off, len, data });
    }
    Ok((chunk, digest, runs))
}

impl Msg {
    /// The frame: a big-endian u32 body length, then the body (type byte and payload).
    pub fn encode(&self) -> Bytes {
        self.encode_with(false)
    }

    /// [`Msg::encode`], with the data runs of PATCH and PULL_DATA lz4-compressed where that
    /// makes them smaller (only after both sides agreed in HELLO/READY).
    pub fn encode_with(&self, compress: bool) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        match self {
            Msg::Hello {
                size,
                chunk_size,
                want_digests,
                compress,
                pull,
            } => {
                b.put_u8(T_HELLO);
                b.put_slice(MAGIC);
                b.put_u64(*size);
                b.put_u64(*chunk_size);
                b.put_u8(
                    (*want_digests as u8 * HELLO_DIGESTS)
                        | (*compress as u8 * HELLO_COMPRESS)
                        | (*pull as u8 * HELLO_PULL),
                );
            }
            Msg::Ready {
                index_used,
                compress,
            } => {
                b.put_u8(T_READY);
                b.put_u8(*index_used as u8);
                b.put_u8(*compress as u8);
            }
            Msg::Digests { first, digests } => {
                b.reserve(digests.len() * WIRE_DIGEST + 16);
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
                b.reserve(digests.len() * 4 + 16);
                b.put_u8(T_PAGE_DIGESTS);
                b.put_u64(*chunk);
                b.put_u32(digests.len() as u32);
                for d in digests {
                    b.put_u32(*d);
                }
            }
            Msg::Patch {
                chunk,
                digest,
                runs,
            } => {
                b.put_u8(T_PATCH);
                put_runs(&mut b, *chunk, digest, runs, compress);
            }
            Msg::PullData {
                chunk,
                digest,
                runs,
            } => {
                b.put_u8(T_PULL_DATA);
                put_runs(&mut b, *chunk, digest, runs, compress);
            }
            Msg::PullReq { chunk, pages } => {
                b.reserve(pages.len() * 4 + 16);
                b.put_u8(T_PULL_REQ);
                b.put_u64(*chunk);
                b.put_u32(pages.len() as u32);
                for d in pages {
                    b.put_u32(*d);
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
                let flags = b.get_u8();
                if flags & !(HELLO_DIGESTS | HELLO_COMPRESS | HELLO_PULL) != 0 {
                    return Err(ProtoError::Invalid("hello flags"));
                }
                (
                    Msg::Hello {
                        size,
                        chunk_size,
                        want_digests: flags & HELLO_DIGESTS != 0,
                        compress: flags & HELLO_COMPRESS != 0,
                        pull: flags & HELLO_PULL != 0,
                    },
                    "hello",
                )
            }
            T_READY => {
                need(&b, 2, "ready")?;
                (
                    Msg::Ready {
                        index_used: flag(b.get_u8())?,
                        compress: flag(b.get_u8())?,
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
                need(&b, n * WIRE_DIGEST, "digests")?;
                let digests = (0..n)
                    .map(|_| {
                        let mut d = [0u8; WIRE_DIGEST];
                        b.copy_to_slice(&mut d);
                        d
                    })
                    .collect();
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
                need(&b, n * 4, "page digests")?;
                let digests = (0..n).map(|_| b.get_u32()).collect();
                (Msg::PageDigests { chunk, digests }, "page digests")
            }
            T_PULL_REQ => {
                need(&b, 12, "pull request")?;
                let chunk = b.get_u64();
                let n = b.get_u32() as usize;
                if n > MAX_PAGES {
                    return Err(ProtoError::Invalid("page digest count"));
                }
                need(&b, n * 4, "pull request")?;
                let pages = (0..n).map(|_| b.get_u32()).collect();
                (Msg::PullReq { chunk, pages }, "pull request")
            }
            T_PULL_DATA => {
                let (chunk, digest, runs) = get_runs(&mut b, "pull data")?;
                (
                    Msg::PullData {
                        chunk,
                        digest,
                        runs,
                    },
                    "pull data",
                )
            }
            T_PATCH => {
                let (chunk, digest, runs) = get_runs(&mut b, "patch")?;
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
                            reused: 0,
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
            compress: true,
            pull: false,
        });
        roundtrip(Msg::Ready {
            index_used: false,
            compress: true,
        });
        roundtrip(Msg::Digests {
            first: 7,
            digests: vec![[1; WIRE_DIGEST], [2; WIRE_DIGEST]],
        });
        roundtrip(Msg::PullReq {
            chunk: 4,
            pages: vec![1, 2],
        });
        roundtrip(Msg::PullReq {
            chunk: 4,
            pages: vec![],
        });
        roundtrip(Msg::PullData {
            chunk: 3,
            digest: [5; 32],
            runs: vec![Run {
                off: 8192,
                len: 3,
                data: Some(Bytes::from_static(b"abc")),
            }],
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

    #[test]
    fn compressed_runs_roundtrip_and_incompressible_ones_go_plain() {
        let text = Bytes::from(b"memsync sync ".repeat(400)[..4096].to_vec());
        use rand::{RngCore, SeedableRng};
        let mut noise = vec![0u8; 4096];
        rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut noise);
        let m = Msg::Patch {
            chunk: 1,
            digest: [3; 32],
            runs: vec![
                Run {
                    off: 0,
                    len: 4096,
                    data: Some(text.clone()),
                },
                Run {
                    off: 8192,
                    len: 4096,
                    data: Some(Bytes::from(noise)),
                },
            ],
        };
        let plain = m.encode();
        let packed = m.encode_with(true);
        assert!(
            packed.len() < plain.len() - 3000,
            "{} {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(Msg::decode(packed.slice(4..)).unwrap(), m);
        // Only the text run was compressed: the noise costs its own size plus the header.
        assert!(packed.len() > 4096 + 4096 / 50);
        for k in 4..packed.len() {
            assert!(Msg::decode(packed.slice(4..k)).is_err(), "cut at {k}");
        }
        // A compressed run that decompresses to another length is refused.
        let mut bad = packed.slice(4..).to_vec();
        let kind_at = 1 + 8 + 32 + 4 + 8;
        assert_eq!(bad[kind_at], RUN_LZ4);
        bad[kind_at - 1] ^= 1; // the run length, low byte: 4096 becomes 4097
        assert!(Msg::decode(Bytes::from(bad)).is_err());
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
                    *t %= 14; // mostly known types
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
