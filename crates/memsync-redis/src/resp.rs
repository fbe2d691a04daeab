//! RESP2/RESP3 encoding and a panic-free, bounded parser.
//!
//! The parser works in two steps on bytes from the network: [`scan`] finds where the next
//! complete frame ends (or how many bytes are needed at least), without allocating; the caller
//! then splits that frame off its read buffer and [`decode`]s it, which slices bulk strings out of
//! the frame without copying. Both steps reject malformed input with [`ProtoError`] and never
//! panic; nesting depth, line length, bulk length and aggregate length are bounded.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Deepest nesting of aggregates accepted.
pub const MAX_DEPTH: usize = 32;
/// Longest bulk string accepted (Redis' own `proto-max-bulk-len` default).
pub const MAX_BULK: usize = 512 << 20;
/// Most elements in one aggregate.
pub const MAX_AGGREGATE: usize = 1 << 24;
/// Longest simple line (simple strings, errors, numbers) accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One RESP value (RESP2 and RESP3 types; sets are returned as arrays, attributes are skipped).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// RESP2 null bulk/array, RESP3 `_`.
    Nil,
    /// `+OK`.
    Simple(Bytes),
    /// `-ERR ...` or RESP3 bulk error `!`.
    Error(Bytes),
    /// `:42`.
    Int(i64),
    /// `$3\r\nfoo` (also RESP3 verbatim strings, with their `txt:` prefix kept, and big numbers).
    Bulk(Bytes),
    /// `*N` (and RESP3 sets `~N`).
    Array(Vec<Value>),
    /// RESP3 `#t` / `#f`.
    Bool(bool),
    /// RESP3 `,3.14` as text (exact round trip).
    Double(Bytes),
    /// RESP3 `%N`.
    Map(Vec<(Value, Value)>),
    /// RESP3 `>N` out-of-band push.
    Push(Vec<Value>),
}

impl Value {
    /// The error text, if this is an error reply.
    pub fn as_error(&self) -> Option<String> {
        match self {
            Value::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
            _ => None,
        }
    }
}

/// Malformed RESP from the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RESP protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtoError {}

fn perr(why: impl Into<String>) -> ProtoError {
    ProtoError(why.into())
}

/// Result of [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// A whole frame occupies the first `n` bytes.
    Complete(usize),
    /// Not enough bytes yet; at least this many are needed in total before scanning again helps.
    Incomplete(usize),
}

/// Find the end of the first frame in `buf`.
pub fn scan(buf: &[u8]) -> Result<Scan, ProtoError> {
    match walk(buf, 0, 0, None)? {
        Step::Done(_, end) => Ok(Scan::Complete(end)),
        Step::Need(n) => Ok(Scan::Incomplete(n)),
    }
}

/// Decode a complete frame (as found by [`scan`]); bulk strings are slices of `frame`.
pub fn decode(frame: &Bytes) -> Result<Value, ProtoError> {
    match walk(frame, 0, 0, Some(frame))? {
        Step::Done(v, end) if end == frame.len() => Ok(v),
        Step::Done(..) => Err(perr("trailing bytes after frame")),
        Step::Need(_) => Err(perr("incomplete frame")),
    }
}

/// Parse the first frame of `buf` in one go (copies bulk strings); for tests and the fuzzer.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtoError> {
    match scan(buf)? {
        Scan::Incomplete(_) => Ok(None),
        Scan::Complete(n) => {
            let frame = Bytes::copy_from_slice(&buf[..n]);
            Ok(Some((decode(&frame)?, n)))
        }
    }
}

enum Step {
    Done(Value, usize),
    Need(usize),
}

/// Find `\r\n` starting at `pos`; returns the line end (index of `\r`).
fn line(buf: &[u8], pos: usize) -> Result<Option<usize>, ProtoError> {
    let limit = buf.len().min(pos.saturating_add(MAX_LINE + 2));
    let hay = buf.get(pos..limit).unwrap_or(&[]);
    match hay.iter().position(|&b| b == b'\n') {
        Some(i) => {
            if i == 0 || hay[i - 1] != b'\r' {
                return Err(perr("line not terminated by CRLF"));
            }
            Ok(Some(pos + i - 1))
        }
        None if limit - pos.min(limit) > MAX_LINE => Err(perr("line too long")),
        None => Ok(None),
    }
}

fn int_of(s: &[u8]) -> Result<i64, ProtoError> {
    let t = std::str::from_utf8(s).map_err(|_| perr("number is not ASCII"))?;
    t.parse::<i64>()
        .map_err(|_| perr(format!("bad number {:?}", truncate(t))))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn len_of(s: &[u8], max: usize, what: &str) -> Result<Option<usize>, ProtoError> {
    let n = int_of(s)?;
    if n == -1 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|_| perr(format!("negative {what} length")))?;
    if n > max {
        return Err(perr(format!("{what} length {n} exceeds {max}")));
    }
    Ok(Some(n))
}

fn slice(frame: Option<&Bytes>, a: usize, b: usize) -> Bytes {
    match frame {
        Some(f) if a <= b && b <= f.len() => f.slice(a..b),
        _ => Bytes::new(),
    }
}

fn walk(buf: &[u8], pos: usize, depth: usize, frame: Option<&Bytes>) -> Result<Step, ProtoError> {
    if depth > MAX_DEPTH {
        return Err(perr("nesting too deep"));
    }
    let Some(&tag) = buf.get(pos) else {
        return Ok(Step::Need(pos + 1));
    };
    let Some(eol) = line(buf, pos + 1)? else {
        return Ok(Step::Need(buf.len() + 1));
    };
    let body = &buf[pos + 1..eol];
    let next = eol + 2;
    let build = frame.is_some();
    match tag {
        b'+' => Ok(Step::Done(Value::Simple(slice(frame, pos + 1, eol)), next)),
        b'-' => Ok(Step::Done(Value::Error(slice(frame, pos + 1, eol)), next)),
        b':' => Ok(Step::Done(Value::Int(int_of(body)?), next)),
        b'_' => {
            if !body.is_empty() {
                return Err(perr("null with payload"));
            }
            Ok(Step::Done(Value::Nil, next))
        }
        b'#' => match body {
            b"t" => Ok(Step::Done(Value::Bool(true), next)),
            b"f" => Ok(Step::Done(Value::Bool(false), next)),
            _ => Err(perr("bad boolean")),
        },
        b',' | b'(' => {
            if body.is_empty() || !body.iter().all(|b| b.is_ascii_graphic()) {
                return Err(perr("bad number"));
            }
            let v = slice(frame, pos + 1, eol);
            Ok(Step::Done(
                if tag == b',' {
                    Value::Double(v)
                } else {
                    Value::Bulk(v)
                },
                next,
            ))
        }
        b'$' | b'!' | b'=' => {
            let Some(n) = len_of(body, MAX_BULK, "bulk")? else {
                if tag != b'$' {
                    return Err(perr("null bulk error/verbatim"));
                }
                return Ok(Step::Done(Value::Nil, next));
            };
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(Step::Need(end + 2));
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(perr("bulk string not terminated by CRLF"));
            }
            let v = slice(frame, next, end);
            let v = match tag {
                b'$' => Value::Bulk(v),
                b'!' => Value::Error(v),
                _ => {
                    if n < 4 || buf[next + 3] != b':' {
                        return Err(perr("verbatim string without format"));
                    }
                    Value::Bulk(v)
                }
            };
            Ok(Step::Done(v, end + 2))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let Some(n) = len_of(body, MAX_AGGREGATE, "aggregate")? else {
                if tag != b'*' {
                    return Err(perr("null aggregate"));
                }
                return Ok(Step::Done(Value::Nil, next));
            };
            let items = if matches!(tag, b'%' | b'|') {
                n.checked_mul(2).ok_or_else(|| perr("map too long"))?
            } else {
                n
            };
            // Every element takes at least 3 bytes; don't allocate for claims the buffer can't
            // back yet.
            let mut out = Vec::with_capacity(if build { items.min(1024) } else { 0 });
            let mut p = next;
            for _ in 0..items {
                match walk(buf, p, depth + 1, frame)? {
                    Step::Done(v, e) => {
                        if build {
                            out.push(v);
                        }
                        p = e;
                    }
                    Step::Need(n) => return Ok(Step::Need(n)),
                }
            }
            if tag == b'|' {
                // An attribute precedes the real reply: skip it.
                return walk(buf, p, depth + 1, frame);
            }
            let v = match tag {
                b'>' => Value::Push(out),
                b'%' => {
                    let mut m = Vec::with_capacity(out.len() / 2);
                    let mut it = out.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        m.push((k, v));
                    }
                    Value::Map(m)
                }
                _ => Value::Array(out),
            };
            Ok(Step::Done(v, p))
        }
        other => Err(perr(format!("unknown type byte 0x{other:02x}"))),
    }
}

/// Append a command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut BytesMut, args: &[&[u8]]) {
    encode_header(out, b'*', args.len());
    for a in args {
        encode_header(out, b'$', a.len());
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

/// Append `TAG LEN \r\n`.
pub fn encode_header(out: &mut BytesMut, tag: u8, len: usize) {
    out.put_u8(tag);
    out.put_slice(&itoa_buf(len as u64));
    out.put_slice(b"\r\n");
}

fn itoa_buf(mut n: u64) -> Vec<u8> {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    tmp[i..].to_vec()
}

/// Encode any value in RESP3 form (used for round-trip tests and test servers).
pub fn encode_value(out: &mut BytesMut, v: &Value) {
    match v {
        Value::Nil => out.put_slice(b"_\r\n"),
        Value::Simple(s) => {
            out.put_u8(b'+');
            out.put_slice(s);
            out.put_slice(b"\r\n");
        }
        Value::Error(s) => {
            encode_header(out, b'!', s.len());
            out.put_slice(s);
            out.put_slice(b"\r\n");
        }
        Value::Int(i) => {
            out.put_u8(b':');
            out.put_slice(i.to_string().as_bytes());
            out.put_slice(b"\r\n");
        }
        Value::Bulk(s) => {
            encode_header(out, b'$', s.len());
            out.put_slice(s);
            out.put_slice(b"\r\n");
        }
        Value::Bool(b) => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
        Value::Double(d) => {
            out.put_u8(b',');
            out.put_slice(d);
            out.put_slice(b"\r\n");
        }
        Value::Array(a) | Value::Push(a) => {
            encode_header(
                out,
                if matches!(v, Value::Push(_)) {
                    b'>'
                } else {
                    b'*'
                },
                a.len(),
            );
            for x in a {
                encode_value(out, x);
            }
        }
        Value::Map(m) => {
            encode_header(out, b'%', m.len());
            for (k, x) in m {
                encode_value(out, k);
                encode_value(out, x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &[u8]) -> Result<Option<(Value, usize)>, ProtoError> {
        parse(s)
    }

    #[test]
    fn basics() {
        assert_eq!(
            p(b"+OK\r\n").unwrap(),
            Some((Value::Simple(Bytes::from_static(b"OK")), 5))
        );
        assert_eq!(p(b"$-1\r\n").unwrap(), Some((Value::Nil, 5)));
        assert_eq!(p(b"*-1\r\n").unwrap(), Some((Value::Nil, 5)));
        assert_eq!(p(b":-12\r\n").unwrap(), Some((Value::Int(-12), 6)));
        assert_eq!(
            p(b"$3\r\nfoo\r\n").unwrap(),
            Some((Value::Bulk(Bytes::from_static(b"foo")), 9))
        );
        assert_eq!(p(b"$3\r\nfo").unwrap(), None);
        assert_eq!(scan(b"$10\r\n").unwrap(), Scan::Incomplete(17));
        assert_eq!(
            p(b"*2\r\n:1\r\n$0\r\n\r\n").unwrap(),
            Some((
                Value::Array(vec![Value::Int(1), Value::Bulk(Bytes::new())]),
                14
            ))
        );
        assert_eq!(
            p(b"|1\r\n+a\r\n:1\r\n:7\r\n").unwrap().map(|x| x.0),
            Some(Value::Int(7))
        );
        assert_eq!(
            p(b"-MOVED 1 127.0.0.1:7000\r\n")
                .unwrap()
                .unwrap()
                .0
                .as_error()
                .as_deref(),
            Some("MOVED 1 127.0.0.1:7000")
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"?\r\n"[..],
            b"$3\r\nfooX\r\n",
            b"$-2\r\n",
            b":abc\r\n",
            b"+OK\n",
            b"$99999999999999999999\r\n",
            b"*-5\r\n",
            b"#x\r\n",
            b"=2\r\nab\r\n",
        ] {
            assert!(p(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2);
        assert!(p(deep.as_bytes()).is_err());
        let long = vec![b'+'; MAX_LINE + 10];
        assert!(p(&long).is_err());
        // A huge aggregate claim does not allocate up front.
        assert_eq!(p(b"*16000000\r\n").unwrap(), None);
    }

    fn value() -> impl Strategy<Value = Value> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from);
        let line = "[a-zA-Z0-9 ]{0,20}".prop_map(|s| Bytes::from(s.into_bytes()));
        let leaf = prop_oneof![
            Just(Value::Nil),
            line.clone().prop_map(Value::Simple),
            bytes.clone().prop_map(Value::Error),
            any::<i64>().prop_map(Value::Int),
            bytes.prop_map(Value::Bulk),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Value::Double(Bytes::from(f.to_string()))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Push),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn round_trip(v in value(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut out = BytesMut::new();
            encode_value(&mut out, &v);
            let n = out.len();
            // Every strict prefix is incomplete, never an error.
            for cut in 0..n {
                prop_assert_eq!(parse(&out[..cut]).unwrap(), None);
                match scan(&out[..cut]).unwrap() {
                    Scan::Incomplete(need) => prop_assert!(need > cut && need <= n),
                    Scan::Complete(_) => prop_assert!(false, "complete at {}", cut),
                }
            }
            out.extend_from_slice(&tail);
            let (back, used) = parse(&out).unwrap().unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(back, v);
        }

        #[test]
        fn command_round_trip(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..6)) {
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let mut out = BytesMut::new();
            encode_command(&mut out, &refs);
            let (v, n) = parse(&out).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(v, Value::Array(args.into_iter().map(|a| Value::Bulk(Bytes::from(a))).collect()));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&data);
        }

        #[test]
        fn never_panics_respish(s in "([*$:+\\-_#,%~>|!=(]([0-9-]{0,3})?\r\n){0,8}") {
            let _ = parse(s.as_bytes());
        }
    }
}
