//! Framing shared by memsync's own peer-to-peer protocols (sync, migrate, DSM).
//!
//! Every frame is a big-endian `u32` body length followed by the body, whose first byte is the
//! message type. Each protocol defines its messages and a [`Frame`] impl; this module owns what
//! they have in common: the one error type for refused bytes, the bounded length prefix, the
//! small field checks, and reading a frame from a stream. Bytes from a peer are never trusted:
//! every length is checked against a limit before anything is allocated for it.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use bytes::Bytes;

/// Why a frame from a peer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLong(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("truncated {0} message")]
    Short(&'static str),
    #[error("{0} message has {1} trailing bytes")]
    Trailing(&'static str, usize),
    /// The peer's hello does not carry this protocol's magic; the text names what was expected.
    #[error("bad magic in hello (not a {0})")]
    Magic(&'static str),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A message type that travels in frames.
pub trait Frame: Sized {
    /// The largest body this protocol accepts.
    const MAX_FRAME: usize;

    /// Parse one body (type byte and payload). Never panics on any input.
    fn decode(body: Bytes) -> Result<Self, ProtoError>;
}

/// Fail with [`ProtoError::Short`] unless `b` holds at least `n` more bytes.
pub fn need(b: &impl Buf, n: usize, what: &'static str) -> Result<(), ProtoError> {
    if b.remaining() < n {
        return Err(ProtoError::Short(what));
    }
    Ok(())
}

/// Fail with [`ProtoError::Trailing`] if `b` has bytes left after a message.
pub fn done(b: &impl Buf, what: &'static str) -> Result<(), ProtoError> {
    if b.has_remaining() {
        return Err(ProtoError::Trailing(what, b.remaining()));
    }
    Ok(())
}

/// A boolean byte: 0 or 1, anything else is refused so that one message has one encoding.
pub fn flag(v: u8) -> Result<bool, ProtoError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::Invalid("flag")),
    }
}

/// `s` cut to at most `max` bytes at a char boundary, for texts that must fit a bounded field.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut n = max;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// The body length from a frame's 4-byte prefix, checked against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, ProtoError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > max {
        return Err(ProtoError::TooLong(n));
    }
    if n == 0 {
        return Err(ProtoError::Empty);
    }
    Ok(n)
}

/// An `InvalidData` I/O error carrying `e`'s text: how a refused frame surfaces on a connection.
pub fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Read one frame of at most `max` body bytes (at most `F::MAX_FRAME` in any case); `None` at
/// a clean end of stream between frames. Adds the frame's bytes to `count`.
pub async fn read_frame<F: Frame, R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    count: &AtomicU64,
    max: usize,
) -> io::Result<Option<F>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = frame_len(prefix, max.min(F::MAX_FRAME)).map_err(invalid)?;
    let mut body = BytesMut::zeroed(n);
    r.read_exact(&mut body).await?;
    count.fetch_add(4 + n as u64, Relaxed);
    F::decode(body.freeze()).map(Some).map_err(invalid)
}

/// Parse a byte stream of frames as a receiver would, until the bytes end or one is refused.
/// Fuzz targets drive this.
pub fn decode_stream<F: Frame>(mut b: Bytes) -> (Vec<F>, Option<ProtoError>) {
    let mut out = Vec::new();
    while b.remaining() >= 4 {
        let prefix = [b[0], b[1], b[2], b[3]];
        let n = match frame_len(prefix, F::MAX_FRAME) {
            Ok(n) => n,
            Err(e) => return (out, Some(e)),
        };
        if b.remaining() < 4 + n {
            // A receiver would wait for the rest.
            break;
        }
        b.advance(4);
        match F::decode(b.split_to(n)) {
            Ok(m) => out.push(m),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Echo(Bytes);

    impl Frame for Echo {
        const MAX_FRAME: usize = 8;
        fn decode(mut body: Bytes) -> Result<Self, ProtoError> {
            need(&body, 1, "echo")?;
            if body.get_u8() != 7 {
                return Err(ProtoError::Type(body[0]));
            }
            Ok(Echo(body))
        }
    }

    #[test]
    fn lengths_are_bounded_and_never_zero() {
        assert_eq!(
            frame_len(9u32.to_be_bytes(), 8),
            Err(ProtoError::TooLong(9))
        );
        assert_eq!(frame_len([0; 4], 8), Err(ProtoError::Empty));
        assert_eq!(frame_len(8u32.to_be_bytes(), 8), Ok(8));
    }

    #[test]
    fn flags_have_one_encoding() {
        assert_eq!(flag(0), Ok(false));
        assert_eq!(flag(1), Ok(true));
        assert_eq!(flag(2), Err(ProtoError::Invalid("flag")));
    }

    #[test]
    fn truncate_keeps_whole_chars() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 9), "abc");
    }

    #[test]
    fn a_stream_stops_at_the_first_refused_frame() {
        let mut s = Vec::new();
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&[7, 1]);
        s.extend_from_slice(&100u32.to_be_bytes());
        s.extend_from_slice(&[7; 100]);
        let (ok, err) = decode_stream::<Echo>(Bytes::from(s));
        assert_eq!(ok, vec![Echo(Bytes::from_static(&[1]))]);
        assert_eq!(err, Some(ProtoError::TooLong(100)));
    }

    #[tokio::test]
    async fn read_frame_counts_bytes_and_refuses_oversize() {
        let count = AtomicU64::new(0);
        let mut ok: &[u8] = &[0, 0, 0, 2, 7, 9];
        let m: Option<Echo> = read_frame(&mut ok, &count, usize::MAX).await.unwrap();
        assert_eq!(m, Some(Echo(Bytes::from_static(&[9]))));
        assert_eq!(count.load(Relaxed), 6);
        let none: Option<Echo> = read_frame(&mut ok, &count, usize::MAX).await.unwrap();
        assert!(none.is_none());
        let mut big: &[u8] = &[0, 0, 0, 3, 7, 9, 9];
        let e = read_frame::<Echo, _>(&mut big, &count, 2)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
