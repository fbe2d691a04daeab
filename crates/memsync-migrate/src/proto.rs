//! The migration wire protocol (`PROTOCOL.md` in this crate): length-prefixed frames, one
//! message each. Decoding never panics and checks every length and count against a limit before
//! it allocates or trusts it; a frame that breaks a rule is an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use memsync_core::wire::ProtoError;
use memsync_core::wire::{self, Frame, done, flag, need, truncate};
use memsync_sync::digest::{MAX_CHUNK, MIN_CHUNK};

/// "MEMSYNCM": the first bytes of every connection's HELLO.
pub const MAGIC: &[u8; 8] = b"MEMSYNCM";
/// The protocol version this code speaks.
pub const VERSION: u16 = 1;
/// Largest frame body: a whole chunk of the largest size plus its header.
/// What a peer that sends the wrong magic is not.
const MAGIC_WHAT: &str = "memsync migration peer";
pub const MAX_FRAME: usize = MAX_CHUNK as usize + 64 * 1024;
/// Bits of one bitmap segment (DIRTY, HELD): 256 KiB of bitmap, 2^21 chunks.
pub const MAX_BITS: u32 = 1 << 21;
/// Chunks of one ZERO run.
pub const MAX_ZERO_RUN: u32 = 1 << 20;
/// Bytes of an ABORT reason.
pub const MAX_MESSAGE: usize = 4096;
/// Largest region: 2^52 bytes (4 PiB), so chunk indices and offsets never overflow.
pub const MAX_SIZE: u64 = 1 << 52;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_GEOMETRY: u8 = 3;
const T_READY: u8 = 4;
const T_CHUNK: u8 = 5;
const T_ZERO: u8 = 6;
const T_MARK: u8 = 7;
const T_RECEIVED: u8 = 8;
const T_DIRTY: u8 = 9;
const T_SWITCHOVER: u8 = 10;
const T_SWITCHED: u8 = 11;
const T_COMMIT: u8 = 12;
const T_RESUMED: u8 = 13;
const T_REQUEST: u8 = 14;
const T_HELD: u8 = 15;
const T_HELD_END: u8 = 16;
const T_ALL_RECEIVED: u8 = 17;
const T_DONE: u8 = 18;
const T_ABORT: u8 = 19;

/// What a connection carries; announced in its HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Geometry, pass marks, switch-over, recovery, the end.
    Control = 1,
    /// The background stream of chunks (pre-copy passes, post-copy background).
    Bulk = 2,
    /// Post-copy requests for missing chunks and their answers, never behind the bulk stream.
    Urgent = 3,
}

impl Role {
    fn from_u8(v: u8) -> Result<Role, ProtoError> {
        match v {
            1 => Ok(Role::Control),
            2 => Ok(Role::Bulk),
            3 => Ok(Role::Urgent),
            _ => Err(ProtoError::Invalid("connection role")),
        }
    }
}

/// A run of a chunk bitmap: bit `k` of `bits` (LSB first in each byte) stands for chunk
/// `first + k`, for `k < count`. Bits past `count` are zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub first: u64,
    pub count: u32,
    pub bits: Bytes,
}

impl Segment {
    /// Chunks whose bit is set.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count as u64).filter_map(move |k| {
            let byte = self.bits.get((k / 8) as usize).copied().unwrap_or(0);
            (byte >> (k % 8) & 1 == 1).then_some(self.first + k)
        })
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Source → destination, the first frame of every connection.
    Hello {
        version: u16,
        role: Role,
        /// Chosen by the source; ties a migration's connections together.
        session: u64,
        /// This connection replaces one that was lost after switch-over.
        resume: bool,
    },
    /// Destination → source: the connection is accepted.
    Welcome { version: u16 },
    /// Control, source → destination: what is migrated.
    Geometry { size: u64, chunk_size: u64 },
    /// Control, destination → source: the geometry fits the destination.
    Ready,
    /// Bulk or urgent, source → destination: the bytes of one chunk.
    Chunk { index: u64, data: Bytes },
    /// Bulk or urgent, source → destination: chunks `first..first + count` are all zeros.
    Zero { first: u64, count: u32 },
    /// Bulk, source → destination: everything before this frame on the bulk connection belongs
    /// to mark `seq` (the end of a pass).
    Mark { seq: u64 },
    /// Control, destination → source: everything up to mark `seq` is written.
    Received { seq: u64 },
    /// Control, source → destination, before a post-copy SWITCHOVER: these chunks are missing
    /// (never sent, or dirtied after they were sent).
    Dirty(Segment),
    /// Control, source → destination: the application is suspended; once mark `mark` is
    /// written, the destination holds everything but the DIRTY chunks.
    Switchover { mark: u64, postcopy: bool },
    /// Control, destination → source: ready to take over.
    Switched,
    /// Control, source → destination: the source will not resume; resume at the destination.
    Commit,
    /// Control, destination → source: the application was resumed at the destination.
    Resumed,
    /// Urgent, destination → source: a reader waits for this chunk.
    Request { index: u64 },
    /// Control, destination → source, after a resumed control connection: chunks held.
    Held(Segment),
    /// Control, destination → source: the HELD segments are complete; `held` chunks in all.
    HeldEnd { held: u64 },
    /// Control, destination → source: every chunk is held; fault statistics.
    AllReceived {
        faults: u64,
        p50_ns: u64,
        p99_ns: u64,
    },
    /// Control, source → destination: the end.
    Done,
    /// Either way: the sender gives up (before commit: the migration is abandoned).
    Abort(String),
}

fn put_segment(b: &mut BytesMut, s: &Segment) {
    b.put_u64(s.first);
    b.put_u32(s.count);
    b.put_slice(&s.bits);
}

fn get_segment(b: &mut Bytes, what: &'static str) -> Result<Segment, ProtoError> {
    need(b, 12, what)?;
    let first = b.get_u64();
    let count = b.get_u32();
    if count == 0 || count > MAX_BITS {
        return Err(ProtoError::Invalid("bitmap segment length"));
    }
    if first.checked_add(count as u64).is_none_or(|e| e > MAX_SIZE) {
        return Err(ProtoError::Invalid("bitmap segment range"));
    }
    let n = count.div_ceil(8) as usize;
    need(b, n, what)?;
    let bits = b.split_to(n);
    // Canonical form: unused bits of the last byte are zero.
    if !count.is_multiple_of(8) && bits[n - 1] >> (count % 8) != 0 {
        return Err(ProtoError::Invalid("bitmap segment padding"));
    }
    Ok(Segment { first, count, bits })
}

impl Msg {
    /// The frame: a big-endian u32 body length, then the body (type byte and payload).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(match self {
            Msg::Chunk { data, .. } => data.len() + 16,
            Msg::Dirty(s) | Msg::Held(s) => s.bits.len() + 20,
            _ => 32,
        });
        b.put_u32(0);
        match self {
            Msg::Hello {
                version,
                role,
                session,
                resume,
            } => {
                b.put_u8(T_HELLO);
                b.put_slice(MAGIC);
                b.put_u16(*version);
                b.put_u8(*role as u8);
                b.put_u64(*session);
                b.put_u8(*resume as u8);
            }
            Msg::Welcome { version } => {
                b.put_u8(T_WELCOME);
                b.put_u16(*version);
            }
            Msg::Geometry { size, chunk_size } => {
                b.put_u8(T_GEOMETRY);
                b.put_u64(*size);
                b.put_u64(*chunk_size);
            }
            Msg::Ready => b.put_u8(T_READY),
            Msg::Chunk { index, data } => {
                b.put_u8(T_CHUNK);
                b.put_u64(*index);
                b.put_slice(data);
            }
            Msg::Zero { first, count } => {
                b.put_u8(T_ZERO);
                b.put_u64(*first);
                b.put_u32(*count);
            }
            Msg::Mark { seq } => {
                b.put_u8(T_MARK);
                b.put_u64(*seq);
            }
            Msg::Received { seq } => {
                b.put_u8(T_RECEIVED);
                b.put_u64(*seq);
            }
            Msg::Dirty(s) => {
                b.put_u8(T_DIRTY);
                put_segment(&mut b, s);
            }
            Msg::Switchover { mark, postcopy } => {
                b.put_u8(T_SWITCHOVER);
                b.put_u64(*mark);
                b.put_u8(*postcopy as u8);
            }
            Msg::Switched => b.put_u8(T_SWITCHED),
            Msg::Commit => b.put_u8(T_COMMIT),
            Msg::Resumed => b.put_u8(T_RESUMED),
            Msg::Request { index } => {
                b.put_u8(T_REQUEST);
                b.put_u64(*index);
            }
            Msg::Held(s) => {
                b.put_u8(T_HELD);
                put_segment(&mut b, s);
            }
            Msg::HeldEnd { held } => {
                b.put_u8(T_HELD_END);
                b.put_u64(*held);
            }
            Msg::AllReceived {
                faults,
                p50_ns,
                p99_ns,
            } => {
                b.put_u8(T_ALL_RECEIVED);
                b.put_u64(*faults);
                b.put_u64(*p50_ns);
                b.put_u64(*p99_ns);
            }
            Msg::Done => b.put_u8(T_DONE),
            Msg::Abort(m) => {
                b.put_u8(T_ABORT);
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
                need(&b, 8 + 2 + 1 + 8 + 1, "hello")?;
                if &b[..8] != MAGIC {
                    return Err(ProtoError::Magic(MAGIC_WHAT));
                }
                b.advance(8);
                let version = b.get_u16();
                let role = Role::from_u8(b.get_u8())?;
                let session = b.get_u64();
                let resume = flag(b.get_u8())?;
                (
                    Msg::Hello {
                        version,
                        role,
                        session,
                        resume,
                    },
                    "hello",
                )
            }
            T_WELCOME => {
                need(&b, 2, "welcome")?;
                (
                    Msg::Welcome {
                        version: b.get_u16(),
                    },
                    "welcome",
                )
            }
            T_GEOMETRY => {
                need(&b, 16, "geometry")?;
                let size = b.get_u64();
                let chunk_size = b.get_u64();
                if size == 0 || size > MAX_SIZE {
                    return Err(ProtoError::Invalid("region size"));
                }
                if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
                    return Err(ProtoError::Invalid("chunk size"));
                }
                (Msg::Geometry { size, chunk_size }, "geometry")
            }
            T_READY => (Msg::Ready, "ready"),
            T_CHUNK => {
                need(&b, 8, "chunk")?;
                let index = b.get_u64();
                if b.is_empty() || b.len() as u64 > MAX_CHUNK {
                    return Err(ProtoError::Invalid("chunk length"));
                }
                let data = b.split_to(b.len());
                (Msg::Chunk { index, data }, "chunk")
            }
            T_ZERO => {
                need(&b, 12, "zero")?;
                let first = b.get_u64();
                let count = b.get_u32();
                if count == 0 || count > MAX_ZERO_RUN {
                    return Err(ProtoError::Invalid("zero run length"));
                }
                (Msg::Zero { first, count }, "zero")
            }
            T_MARK => {
                need(&b, 8, "mark")?;
                (Msg::Mark { seq: b.get_u64() }, "mark")
            }
            T_RECEIVED => {
                need(&b, 8, "received")?;
                (Msg::Received { seq: b.get_u64() }, "received")
            }
            T_DIRTY => (Msg::Dirty(get_segment(&mut b, "dirty")?), "dirty"),
            T_SWITCHOVER => {
                need(&b, 9, "switchover")?;
                let mark = b.get_u64();
                let postcopy = flag(b.get_u8())?;
                (Msg::Switchover { mark, postcopy }, "switchover")
            }
            T_SWITCHED => (Msg::Switched, "switched"),
            T_COMMIT => (Msg::Commit, "commit"),
            T_RESUMED => (Msg::Resumed, "resumed"),
            T_REQUEST => {
                need(&b, 8, "request")?;
                (Msg::Request { index: b.get_u64() }, "request")
            }
            T_HELD => (Msg::Held(get_segment(&mut b, "held")?), "held"),
            T_HELD_END => {
                need(&b, 8, "held end")?;
                (Msg::HeldEnd { held: b.get_u64() }, "held end")
            }
            T_ALL_RECEIVED => {
                need(&b, 24, "all received")?;
                (
                    Msg::AllReceived {
                        faults: b.get_u64(),
                        p50_ns: b.get_u64(),
                        p99_ns: b.get_u64(),
                    },
                    "all received",
                )
            }
            T_DONE => (Msg::Done, "done"),
            T_ABORT => {
                need(&b, 2, "abort")?;
                let n = b.get_u16() as usize;
                if n > MAX_MESSAGE {
                    return Err(ProtoError::Invalid("abort reason length"));
                }
                need(&b, n, "abort")?;
                let m = String::from_utf8(b.split_to(n).to_vec())
                    .map_err(|_| ProtoError::Invalid("abort reason (not UTF-8)"))?;
                (Msg::Abort(m), "abort")
            }
            other => return Err(ProtoError::Type(other)),
        };
        done(&b, what)?;
        Ok(msg)
    }

    /// A short name for errors and logs (never the payload).
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "HELLO",
            Msg::Welcome { .. } => "WELCOME",
            Msg::Geometry { .. } => "GEOMETRY",
            Msg::Ready => "READY",
            Msg::Chunk { .. } => "CHUNK",
            Msg::Zero { .. } => "ZERO",
            Msg::Mark { .. } => "MARK",
            Msg::Received { .. } => "RECEIVED",
            Msg::Dirty(_) => "DIRTY",
            Msg::Switchover { .. } => "SWITCHOVER",
            Msg::Switched => "SWITCHED",
            Msg::Commit => "COMMIT",
            Msg::Resumed => "RESUMED",
            Msg::Request { .. } => "REQUEST",
            Msg::Held(_) => "HELD",
            Msg::HeldEnd { .. } => "HELD_END",
            Msg::AllReceived { .. } => "ALL_RECEIVED",
            Msg::Done => "DONE",
            Msg::Abort(_) => "ABORT",
        }
    }
}

impl Frame for Msg {
    const MAX_FRAME: usize = MAX_FRAME;

    fn decode(body: Bytes) -> Result<Self, ProtoError> {
        Msg::decode(body)
    }
}

/// Parse a stream of frames (as a receiver reads them) until the bytes end or one is refused;
/// returns the messages decoded. The fuzz target drives this.
pub fn decode_stream(b: Bytes) -> (Vec<Msg>, Option<ProtoError>) {
    wire::decode_stream(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_core::wire::frame_len;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = Segment> {
        (0u64..1 << 40, 1u32..300).prop_flat_map(|(first, count)| {
            proptest::collection::vec(any::<u8>(), count.div_ceil(8) as usize).prop_map(
                move |mut v| {
                    if count % 8 != 0 {
                        let last = v.len() - 1;
                        v[last] &= (1u8 << (count % 8)) - 1;
                    }
                    Segment {
                        first,
                        count,
                        bits: Bytes::from(v),
                    }
                },
            )
        })
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Control), Just(Role::Bulk), Just(Role::Urgent)]
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (any::<u16>(), role(), any::<u64>(), any::<bool>()).prop_map(
                |(version, role, session, resume)| Msg::Hello {
                    version,
                    role,
                    session,
                    resume
                }
            ),
            any::<u16>().prop_map(|version| Msg::Welcome { version }),
            (1u64..=MAX_SIZE, 12u32..=24).prop_map(|(size, s)| Msg::Geometry {
                size,
                chunk_size: 1 << s
            }),
            Just(Msg::Ready),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 1..2000)
            )
                .prop_map(|(index, d)| Msg::Chunk {
                    index,
                    data: Bytes::from(d)
                }),
            (any::<u64>(), 1..=MAX_ZERO_RUN).prop_map(|(first, count)| Msg::Zero { first, count }),
            any::<u64>().prop_map(|seq| Msg::Mark { seq }),
            any::<u64>().prop_map(|seq| Msg::Received { seq }),
            segment().prop_map(Msg::Dirty),
            (any::<u64>(), any::<bool>())
                .prop_map(|(mark, postcopy)| Msg::Switchover { mark, postcopy }),
            Just(Msg::Switched),
            Just(Msg::Commit),
            Just(Msg::Resumed),
            any::<u64>().prop_map(|index| Msg::Request { index }),
            segment().prop_map(Msg::Held),
            any::<u64>().prop_map(|held| Msg::HeldEnd { held }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(faults, p50_ns, p99_ns)| {
                Msg::AllReceived {
                    faults,
                    p50_ns,
                    p99_ns,
                }
            }),
            Just(Msg::Done),
            "\\PC{0,200}".prop_map(Msg::Abort),
        ]
    }

    proptest! {
        /// Every message survives encode → decode, and every truncation of it is an error.
        #[test]
        fn every_message_roundtrips(m in msg()) {
            let f = m.encode();
            let n = frame_len(f[..4].try_into().unwrap(), MAX_FRAME).unwrap();
            prop_assert_eq!(n, f.len() - 4);
            prop_assert_eq!(Msg::decode(f.slice(4..)).unwrap(), m.clone());
            for k in 4..f.len() {
                // A CHUNK cut short is a shorter chunk, still a valid message.
                if matches!(m, Msg::Chunk { .. }) && k > 4 + 1 + 8 {
                    continue;
                }
                prop_assert!(Msg::decode(f.slice(4..k)).is_err(), "{:?} cut at {}", m, k);
            }
        }

        /// Arbitrary bytes never panic, and what decodes encodes back to the same bytes.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(m) = Msg::decode(Bytes::from(body.clone())) {
                prop_assert_eq!(&m.encode()[4..], &body[..]);
            }
        }

        /// A stream of frames decodes to the messages in order.
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
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes(), MAX_FRAME),
            Err(ProtoError::TooLong(MAX_FRAME + 1))
        );
        assert_eq!(frame_len([0; 4], MAX_FRAME), Err(ProtoError::Empty));
        let body = |t: u8, f: &dyn Fn(&mut BytesMut)| {
            let mut b = BytesMut::new();
            b.put_u8(t);
            f(&mut b);
            Msg::decode(b.freeze())
        };
        // A bitmap segment longer than the limit, or one that reaches past MAX_SIZE.
        assert_eq!(
            body(T_DIRTY, &|b| {
                b.put_u64(0);
                b.put_u32(MAX_BITS + 1);
            }),
            Err(ProtoError::Invalid("bitmap segment length"))
        );
        assert_eq!(
            body(T_HELD, &|b| {
                b.put_u64(u64::MAX);
                b.put_u32(8);
                b.put_u8(0);
            }),
            Err(ProtoError::Invalid("bitmap segment range"))
        );
        // Padding bits must be zero (one encoding per bitmap).
        assert_eq!(
            body(T_HELD, &|b| {
                b.put_u64(0);
                b.put_u32(3);
                b.put_u8(0b1000);
            }),
            Err(ProtoError::Invalid("bitmap segment padding"))
        );
        assert_eq!(
            body(T_ZERO, &|b| {
                b.put_u64(0);
                b.put_u32(0);
            }),
            Err(ProtoError::Invalid("zero run length"))
        );
        assert_eq!(
            body(T_GEOMETRY, &|b| {
                b.put_u64(1 << 30);
                b.put_u64(3000);
            }),
            Err(ProtoError::Invalid("chunk size"))
        );
        assert_eq!(
            body(T_CHUNK, &|b| b.put_u64(0)),
            Err(ProtoError::Invalid("chunk length"))
        );
        assert_eq!(
            body(T_HELLO, &|b| {
                b.put_slice(b"MEMSYNCX");
                b.put_slice(&[0; 12]);
            }),
            Err(ProtoError::Magic(MAGIC_WHAT))
        );
        assert_eq!(
            body(T_ABORT, &|b| b.put_u16(MAX_MESSAGE as u16 + 1)),
            Err(ProtoError::Invalid("abort reason length"))
        );
        assert_eq!(body(99, &|_| {}), Err(ProtoError::Type(99)));
        assert_eq!(
            body(T_DONE, &|b| b.put_u8(0)),
            Err(ProtoError::Trailing("done", 1))
        );
        // A long reason is cut at a char boundary when encoded.
        let m = Msg::Abort("é".repeat(MAX_MESSAGE));
        match Msg::decode(m.encode().slice(4..)).unwrap() {
            Msg::Abort(s) => assert!(s.len() <= MAX_MESSAGE && s.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn segment_ones() {
        let s = Segment {
            first: 10,
            count: 10,
            bits: Bytes::from_static(&[0b1000_0001, 0b10]),
        };
        assert_eq!(s.ones().collect::<Vec<_>>(), vec![10, 17, 19]);
    }
}
