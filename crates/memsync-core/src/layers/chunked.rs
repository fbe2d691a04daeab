//! [`Chunked`]: accept any byte range over a store that needs aligned, chunk-sized requests.

use std::fmt;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Mutex, MutexGuard};

use crate::error::{Result, StoreError};
use crate::range::{ChunkPiece, ChunkPieces, align_down, align_up, chunk_count, chunk_pieces};
use crate::store::{Caps, Extent, Store, check_range, check_write};

/// Default number of chunk requests one call keeps in flight.
pub const DEFAULT_MAX_CONCURRENCY: usize = 16;

/// Largest accepted chunk size (partial-chunk requests allocate a buffer of up to this size).
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// Number of lock stripes guarding read-modify-write cycles.
const STRIPES: usize = 256;

/// Adapts arbitrary byte ranges to an inner store that only accepts aligned requests, splitting
/// every request into at most one inner request per chunk.
///
/// The inner store's [`Caps::block_size`] is its required alignment (for a store with one file
/// or object per chunk it equals the chunk size). `Chunked` itself is byte-addressable
/// (`block_size` 1) and:
///
/// - sends at most `chunk_size` bytes per inner request, never crossing a chunk boundary;
/// - reads and writes the parts of a request that are aligned for the inner store directly
///   (into the caller's buffer, or as zero-copy [`Bytes::slice`]s of the caller's data);
/// - handles unaligned edges with a scratch buffer (reads) or a read-modify-write of the
///   smallest aligned span around them (writes, partial trims and partial write-zeroes), under a
///   per-chunk lock, so concurrent partial writes to one chunk never lose each other's bytes;
/// - runs the chunk requests of one call concurrently, at most
///   [`max_concurrency`](Chunked::with_max_concurrency) at a time.
///
/// The inner store's size need not be a multiple of the chunk size: the last chunk is then
/// shorter, and requests for it end exactly at the store's size (also when that is not a
/// multiple of the inner block size; a store with a short last chunk accepts such a tail).
///
/// Trimming part of an inner block cannot discard it, so those bytes are zeroed instead (reads
/// return zeros either way, as [`Store::trim`] promises). Read-modify-write cycles are ordered
/// only among users of the same `Chunked` value: share one (e.g. in an `Arc`) rather than
/// wrapping the same inner store twice.
///
/// Errors from the inner store get context naming the chunk, such as
/// `"read of chunk 12 (offset 786432)"`.
///
/// # Example
/// ```no_run
/// use memsync_core::layers::Chunked;
/// use memsync_core::{DynStore, Store, StoreExt};
/// # async fn demo(objects: DynStore) -> memsync_core::Result<()> {
/// // `objects` stores 4 MiB objects and rejects anything else.
/// let store = Chunked::new(objects, 4 << 20)?.with_max_concurrency(8);
/// assert_eq!(store.caps().block_size, 1);
/// store.write(1000, bytes::Bytes::from_static(b"any range")).await?;
/// assert_eq!(&store.read_bytes(1000, 9).await?[..], b"any range");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Chunked<S> {
    inner: S,
    chunk_size: u64,
    /// The inner store's required alignment (its `block_size`, at least 1).
    align: u64,
    size: u64,
    max_concurrency: usize,
    locks: Stripes,
}

/// Striped per-chunk locks; `Debug` says how many rather than listing them.
struct Stripes(Box<[Mutex<()>]>);

impl fmt::Debug for Stripes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stripes({})", self.0.len())
    }
}

/// One chunk piece, planned: where it is, and the span around it the inner store accepts.
#[derive(Clone, Copy, Debug)]
struct Span {
    index: u64,
    /// Offset of the chunk in the store.
    chunk_off: u64,
    /// The piece: `within..within + len` inside the chunk.
    within: u64,
    len: u64,
    /// The smallest inner-aligned span `a0..a1` (within the chunk) that contains the piece.
    a0: u64,
    a1: u64,
    /// Offset of the piece in the caller's request.
    pos: u64,
}

impl Span {
    /// The piece itself is aligned for the inner store: no scratch buffer or RMW needed.
    fn direct(&self) -> bool {
        self.a0 == self.within && self.a1 == self.within + self.len
    }

    /// Offset of the piece in the store.
    fn offset(&self) -> u64 {
        self.chunk_off + self.within
    }

    /// Offset of the piece inside the aligned span, and the span's length.
    fn in_span(&self) -> (usize, usize) {
        (
            (self.within - self.a0) as usize,
            (self.a1 - self.a0) as usize,
        )
    }

    fn context(&self, what: &str) -> impl FnOnce(StoreError) -> StoreError + use<> {
        let msg = format!("{what} of chunk {} (offset {})", self.index, self.chunk_off);
        move |e| e.context(msg)
    }
}

impl<S: Store> Chunked<S> {
    /// Wrap `inner`, splitting requests into chunks of `chunk_size` bytes.
    ///
    /// `chunk_size` must be positive, at most [`MAX_CHUNK_SIZE`], and a multiple of the inner
    /// store's `block_size`.
    pub fn new(inner: S, chunk_size: u64) -> Result<Self> {
        let align = inner.caps().block_size.max(1);
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(StoreError::Config(format!(
                "chunk size {chunk_size} must be between 1 and {MAX_CHUNK_SIZE} bytes"
            )));
        }
        if !chunk_size.is_multiple_of(align) {
            return Err(StoreError::Config(format!(
                "chunk size {chunk_size} is not a multiple of the inner store's block size {align}"
            )));
        }
        let locks = Stripes((0..STRIPES).map(|_| Mutex::new(())).collect());
        Ok(Chunked {
            size: inner.size(),
            inner,
            chunk_size,
            align,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            locks,
        })
    }

    /// Keep at most `n` (at least 1) chunk requests of one call in flight at a time.
    pub fn with_max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.max(1);
        self
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// How many chunk requests one call keeps in flight at most.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// Number of chunks (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwrap the inner store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn span(&self, p: ChunkPiece) -> Span {
        let chunk_off = p.index * self.chunk_size;
        let chunk_len = (self.size - chunk_off).min(self.chunk_size);
        let end = p.within + p.len;
        let a0 = align_down(p.within, self.align);
        // `end <= chunk_len <= chunk_size`, a multiple of `align`, so this cannot overflow.
        let a1 = align_up(end, self.align).unwrap_or(end).min(chunk_len);
        Span {
            index: p.index,
            chunk_off,
            within: p.within,
            len: p.len,
            a0,
            a1,
            pos: p.pos,
        }
    }

    fn jobs<'a>(&'a self, offset: u64, len: u64, op: JobKind<'a>) -> Jobs<'a, S> {
        Jobs {
            me: self,
            pieces: chunk_pieces(offset, len, self.chunk_size),
            op,
        }
    }

    async fn lock(&self, index: u64) -> MutexGuard<'_, ()> {
        // Consecutive chunks use different stripes, so a sequential request never waits on itself.
        self.locks.0[(index % STRIPES as u64) as usize].lock().await
    }

    /// Run the per-chunk futures, at most `max_concurrency` at a time; stop at the first error.
    async fn run_all(&self, jobs: Jobs<'_, S>) -> Result<()> {
        let mut jobs = jobs.peekable();
        let Some(first) = jobs.next() else {
            return Ok(());
        };
        if jobs.peek().is_none() {
            return first.await;
        }
        let mut running = FuturesUnordered::new();
        running.push(first);
        for job in jobs {
            if running.len() >= self.max_concurrency
                && let Some(r) = running.next().await
            {
                r?;
            }
            running.push(job);
        }
        while let Some(r) = running.next().await {
            r?;
        }
        Ok(())
    }

    async fn read_span(&self, s: Span, dst: &mut [u8]) -> Result<()> {
        if s.direct() {
            return self
                .inner
                .read(s.offset(), dst)
                .await
                .map_err(s.context("read"));
        }
        let (at, span_len) = s.in_span();
        let mut scratch = vec![0u8; span_len];
        self.inner
            .read(s.chunk_off + s.a0, &mut scratch)
            .await
            .map_err(s.context("read"))?;
        dst.copy_from_slice(&scratch[at..at + dst.len()]);
        Ok(())
    }

    /// Read the aligned span around `s`, let `fill` change the piece, write the span back.
    /// The caller holds the chunk's lock.
    async fn read_modify_write(
        &self,
        s: Span,
        what: &str,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        let ctx = || s.context(&format!("{what} (read-modify-write)"));
        let (at, span_len) = s.in_span();
        let mut buf = BytesMut::zeroed(span_len);
        self.inner
            .read(s.chunk_off + s.a0, &mut buf)
            .await
            .map_err(ctx())?;
        fill(&mut buf[at..at + s.len as usize]);
        self.inner
            .write(s.chunk_off + s.a0, buf.freeze())
            .await
            .map_err(ctx())
    }

    async fn write_span(&self, s: Span, data: Bytes) -> Result<()> {
        let _guard = self.lock(s.index).await;
        if s.direct() {
            self.inner
                .write(s.offset(), data)
                .await
                .map_err(s.context("write"))
        } else {
            self.read_modify_write(s, "write", |piece| piece.copy_from_slice(&data))
                .await
        }
    }

    async fn trim_span(&self, s: Span) -> Result<()> {
        let _guard = self.lock(s.index).await;
        if s.direct() {
            self.inner
                .trim(s.offset(), s.len)
                .await
                .map_err(s.context("trim"))
        } else {
            self.read_modify_write(s, "trim", |piece| piece.fill(0))
                .await
        }
    }

    async fn zero_span(&self, s: Span, zeros: Option<&Bytes>) -> Result<()> {
        let _guard = self.lock(s.index).await;
        if !s.direct() {
            return self
                .read_modify_write(s, "write-zeroes", |piece| piece.fill(0))
                .await;
        }
        let r = match zeros {
            None => self.inner.write_zeroes(s.offset(), s.len).await,
            Some(z) => {
                self.inner
                    .write(s.offset(), z.slice(..s.len as usize))
                    .await
            }
        };
        r.map_err(s.context("write-zeroes"))
    }
}

/// What to do with each chunk piece of a request.
enum JobKind<'a> {
    /// Read into the rest of the caller's buffer (each piece splits its part off the front).
    Read(&'a mut [u8]),
    /// Write the matching slice of the caller's data.
    Write(&'a Bytes),
    Trim,
    /// Zero, from this shared buffer of zeros if the inner store lacks fast zeroing.
    Zero(Option<&'a Bytes>),
}

/// The futures of one request, one per chunk piece, made as they are needed.
///
/// Boxed, and driven by a plain `FuturesUnordered` loop in `run_all`: stream combinators with
/// closures over these futures trip the compiler's check that the `async_trait` future is
/// `Send` ("one type is more general than the other", rust-lang/rust#64552).
struct Jobs<'a, S> {
    me: &'a Chunked<S>,
    pieces: ChunkPieces,
    op: JobKind<'a>,
}

impl<'a, S: Store> Iterator for Jobs<'a, S> {
    type Item = BoxFuture<'a, Result<()>>;

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.me.span(self.pieces.next()?);
        let me = self.me;
        Some(match &mut self.op {
            JobKind::Read(rest) => {
                // Each piece gets its own disjoint part of the caller's buffer.
                let (dst, tail) = std::mem::take(rest).split_at_mut(s.len as usize);
                *rest = tail;
                me.read_span(s, dst).boxed()
            }
            JobKind::Write(data) => me
                .write_span(s, data.slice(s.pos as usize..(s.pos + s.len) as usize))
                .boxed(),
            JobKind::Trim => me.trim_span(s).boxed(),
            JobKind::Zero(zeros) => me.zero_span(s, *zeros).boxed(),
        })
    }
}

#[async_trait]
impl<S: Store> Store for Chunked<S> {
    fn size(&self) -> u64 {
        self.size
    }

    /// Byte-addressable; `preferred_io` is the chunk size and `max_io` one full round of
    /// concurrent chunk requests. Read-only, trim, fast-zero, extents, flush and multi-conn are
    /// the inner store's.
    fn identity(&self) -> Option<crate::StoreId> {
        self.inner.identity()
    }

    fn caps(&self) -> Caps {
        let inner = self.inner.caps();
        Caps {
            block_size: 1,
            preferred_io: self.chunk_size,
            max_io: self.chunk_size.saturating_mul(self.max_concurrency as u64),
            ..inner
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        check_range(self.size, 1, offset, len)?;
        self.run_all(self.jobs(offset, len, JobKind::Read(buf)))
            .await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64)?;
        self.run_all(self.jobs(offset, data.len() as u64, JobKind::Write(&data)))
            .await
    }

    fn session(&self) -> u64 {
        self.inner.session()
    }

    async fn flush(&self) -> Result<()> {
        self.inner
            .flush()
            .await
            .map_err(|e| e.context("flush of chunked store"))
    }

    /// Whole inner blocks are trimmed in the inner store; the unaligned edges of a range are
    /// zeroed instead (they read as zeros afterwards either way).
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let caps = self.caps();
        if !caps.trim {
            return Err(StoreError::Unsupported { op: "trim" });
        }
        check_write(&caps, self.size, offset, len)?;
        self.run_all(self.jobs(offset, len, JobKind::Trim)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let caps = self.caps();
        check_write(&caps, self.size, offset, len)?;
        // Without fast zeroing, aligned pieces are written from one shared zero buffer.
        let zeros = (!caps.fast_zero && len > 0)
            .then(|| Bytes::from(vec![0u8; len.min(self.chunk_size) as usize]));
        self.run_all(self.jobs(offset, len, JobKind::Zero(zeros.as_ref())))
            .await
    }

    /// The inner store's extents of the range widened to its alignment, clipped back.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, 1, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let a0 = align_down(offset, self.align);
        let a1 = align_up(end, self.align)
            .unwrap_or(self.size)
            .min(self.size);
        let raw = self.inner.extents(a0, a1 - a0).await.map_err(|e| {
            e.context(format!(
                "extents of {a0}+{} (chunks {}..={})",
                a1 - a0,
                a0 / self.chunk_size,
                (a1 - 1) / self.chunk_size
            ))
        })?;
        Ok(super::normalize_extents(raw, offset, end))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use proptest::prelude::*;

    use super::*;
    use crate::layers::test_store::VecStore;
    use crate::store::{ExtentKind, StoreExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn rejects_bad_chunk_sizes() {
        let e = Chunked::new(VecStore::new(4096, 512), 0).unwrap_err();
        assert!(matches!(e, StoreError::Config(_)), "{e}");
        let e = Chunked::new(VecStore::new(4096, 512), 700).unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        assert!(Chunked::new(VecStore::new(4096, 512), MAX_CHUNK_SIZE + 512).is_err());
        let c = Chunked::new(VecStore::new(4096, 512), 1536).unwrap();
        assert_eq!(c.chunk_count(), 3);
    }

    #[test]
    fn caps_are_derived() {
        let inner = VecStore::new(1 << 16, 4096).with_caps(|c| {
            c.trim = false;
            c.flush = true;
        });
        let c = Chunked::new(inner, 8192).unwrap().with_max_concurrency(4);
        let caps = c.caps();
        assert_eq!(caps.block_size, 1);
        assert_eq!(caps.preferred_io, 8192);
        assert_eq!(caps.max_io, 4 * 8192);
        assert!(!caps.trim && caps.fast_zero && caps.extents && caps.flush);
        let e = rt().block_on(c.trim(0, 10)).unwrap_err();
        assert!(matches!(e, StoreError::Unsupported { op: "trim" }));
    }

    #[tokio::test]
    async fn request_errors_are_plain() {
        let c = Chunked::new(VecStore::new(10_000, 1000), 3000).unwrap();
        let mut buf = [0u8; 10];
        assert!(matches!(
            c.read(9995, &mut buf).await,
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.write(u64::MAX, Bytes::from_static(b"x")).await,
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.extents(10_001, 0).await,
            Err(StoreError::OutOfRange { .. })
        ));
        c.read(10_000, &mut []).await.unwrap();
        c.write(0, Bytes::new()).await.unwrap();
        let ro = Chunked::new(
            VecStore::new(10_000, 1000).with_caps(|c| c.read_only = true),
            1000,
        )
        .unwrap();
        assert!(ro.caps().read_only);
        assert!(matches!(
            ro.write(5, Bytes::from_static(b"x")).await,
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(
            ro.write_zeroes(5, 1).await,
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(ro.trim(5, 1).await, Err(StoreError::ReadOnly)));
    }

    #[tokio::test]
    async fn whole_chunks_go_straight_through() {
        let inner = Arc::new(VecStore::new(1 << 20, 64 << 10));
        let c = Chunked::new(inner.clone(), 64 << 10).unwrap();
        let data = Bytes::from(pattern(7, 256 << 10));
        c.write(128 << 10, data.clone()).await.unwrap();
        // Four whole chunks: four inner writes of exactly the chunk size, no reads.
        assert_eq!(inner.calls.load(Ordering::Relaxed), 4);
        assert_eq!(inner.io_bytes.load(Ordering::Relaxed), 256 << 10);
        let back = c.read_bytes(128 << 10, 256 << 10).await.unwrap();
        assert_eq!(back, data);
        assert_eq!(inner.calls.load(Ordering::Relaxed), 8);
        // An unaligned write reads and rewrites just the two edge chunks.
        c.write(100, Bytes::from(pattern(1, 64 << 10)))
            .await
            .unwrap();
        assert_eq!(inner.calls.load(Ordering::Relaxed), 8 + 4);
        assert_eq!(inner.misaligned.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn rmw_touches_only_the_aligned_span() {
        // Inner blocks of 512 inside chunks of 4096: a 10-byte write rewrites one block.
        let inner = Arc::new(VecStore::new(1 << 16, 512));
        let c = Chunked::new(inner.clone(), 4096).unwrap();
        c.write(4100, Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(inner.io_bytes.load(Ordering::Relaxed), 1024);
        assert_eq!(&c.read_bytes(4100, 10).await.unwrap()[..], b"0123456789");
        assert_eq!(inner.io_bytes.load(Ordering::Relaxed), 1024 + 512);
    }

    #[tokio::test]
    async fn short_last_chunk() {
        // 10 000 bytes in chunks of 4096: the last chunk holds 1808 bytes.
        let inner = Arc::new(VecStore::new(10_000, 4096));
        let c = Chunked::new(inner.clone(), 4096).unwrap();
        assert_eq!(c.chunk_count(), 3);
        c.write(9000, Bytes::from(pattern(3, 1000))).await.unwrap();
        c.write(8192, Bytes::from(pattern(4, 1808))).await.unwrap();
        c.write(8000, Bytes::from(pattern(5, 300))).await.unwrap();
        let mut shadow = vec![0u8; 10_000];
        shadow[9000..].copy_from_slice(&pattern(3, 1000));
        shadow[8192..].copy_from_slice(&pattern(4, 1808));
        shadow[8000..8300].copy_from_slice(&pattern(5, 300));
        assert_eq!(c.read_bytes(0, 10_000).await.unwrap(), shadow);
        c.trim(9999, 1).await.unwrap();
        c.write_zeroes(8190, 5).await.unwrap();
        shadow[9999] = 0;
        shadow[8190..8195].fill(0);
        assert_eq!(inner.contents(), shadow);
        assert_eq!(inner.misaligned.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn slow_zeroing_writes_zero_buffers() {
        let inner = Arc::new(VecStore::new(1 << 16, 1024).with_caps(|c| c.fast_zero = false));
        let c = Chunked::new(inner.clone(), 2048).unwrap();
        c.write(0, Bytes::from(pattern(9, 1 << 16))).await.unwrap();
        let before = inner.io_bytes.load(Ordering::Relaxed);
        c.write_zeroes(1000, 10_000).await.unwrap();
        // The edge chunks 0 and 5 are read-modify-written over their inner-aligned spans (2048 and
        // 1024 bytes, read and written); chunks 1..5 are written from a zero buffer.
        assert_eq!(
            inner.io_bytes.load(Ordering::Relaxed) - before,
            2 * 2048 + 2 * 1024 + 4 * 2048
        );
        let back = c.read_bytes(0, 1 << 16).await.unwrap();
        assert!(back[1000..11_000].iter().all(|b| *b == 0));
        assert_eq!(back[..1000], pattern(9, 1 << 16)[..1000]);
        assert_eq!(back[11_000..], pattern(9, 1 << 16)[11_000..]);
    }

    #[tokio::test]
    async fn extents_are_clipped_to_the_request() {
        let c = Chunked::new(VecStore::new(1 << 16, 4096), 4096).unwrap();
        c.write(5000, Bytes::from_static(b"data")).await.unwrap();
        let ext = c.extents(100, 20_000).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 100,
                    len: 3996,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: 4096,
                    len: 4096,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 8192,
                    len: 20_100 - 8192,
                    kind: ExtentKind::Hole
                },
            ]
        );
        assert!(c.extents(0, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn inner_errors_name_the_chunk() {
        use crate::layers::{Inject, OpSet};
        let fault = Inject::new(VecStore::new(1 << 20, 65536));
        let control = fault.control();
        let c = Chunked::new(fault, 65536).unwrap();
        control.fail_range(OpSet::ALL, 786_432..786_433);
        let e = c.read_bytes(700_000, 200_000).await.unwrap_err();
        assert!(
            e.chain().contains("read of chunk 12 (offset 786432)"),
            "{}",
            e.chain()
        );
        assert!(matches!(e.root(), StoreError::Injected { op: "read" }));
        let e = c
            .write(786_432 + 5, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(
            e.chain().contains("write (read-modify-write) of chunk 12"),
            "{}",
            e.chain()
        );
        assert!(c.read_bytes(0, 786_432).await.is_ok());
    }

    #[test]
    fn concurrent_partial_writes_to_one_chunk_all_land() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            const TASKS: usize = 64;
            const PIECE: usize = 37;
            let chunk = (TASKS * PIECE).next_multiple_of(512) as u64;
            let inner = Arc::new(VecStore::new(chunk * 2, chunk));
            let c = Arc::new(Chunked::new(inner.clone(), chunk).unwrap());
            for round in 0..4u8 {
                let tasks: Vec<_> = (0..TASKS)
                    .map(|i| {
                        let c = c.clone();
                        tokio::spawn(async move {
                            let data = vec![(i as u8) ^ round | 0x80; PIECE];
                            c.write((i * PIECE) as u64 + 3, Bytes::from(data)).await
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
                let content = inner.contents();
                for i in 0..TASKS {
                    let at = i * PIECE + 3;
                    assert!(
                        content[at..at + PIECE]
                            .iter()
                            .all(|b| *b == (i as u8) ^ round | 0x80),
                        "round {round}: task {i}'s bytes were lost"
                    );
                }
            }
        });
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read(u64, u64),
        Write(u64, u64, u8),
        Trim(u64, u64),
        Zero(u64, u64),
        Extents(u64, u64),
    }

    fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
        let range = (0..=size).prop_flat_map(move |o| (Just(o), 0..=size - o));
        let op = (0u8..5, range, any::<u8>()).prop_map(|(k, (o, l), seed)| match k {
            0 => Op::Read(o, l),
            1 => Op::Write(o, l, seed),
            2 => Op::Trim(o, l),
            3 => Op::Zero(o, l),
            _ => Op::Extents(o, l),
        });
        prop::collection::vec(op, 1..40)
    }

    fn divisors(n: u64) -> Vec<u64> {
        (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
    }

    /// (chunk size, inner block size, store size, max concurrency)
    fn geometry() -> impl Strategy<Value = (u64, u64, u64, usize)> {
        (
            1u64..=48,
            1u64..=6,
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            1usize..=4,
        )
            .prop_map(|(cs, n, block, short, conc)| {
                let ds = divisors(cs);
                let bs = ds[block.index(ds.len())];
                let short = short.index(cs as usize) as u64; // 0..cs
                (cs, bs, cs * n - short, conc)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn matches_a_shadow_copy(
            ((cs, bs, size, conc), ops) in geometry().prop_flat_map(|g| (Just(g), ops(g.2)))
        ) {
            rt().block_on(async {
                let inner = Arc::new(VecStore::new(size, bs));
                let c = Chunked::new(inner.clone(), cs).unwrap().with_max_concurrency(conc);
                let mut shadow = vec![0u8; size as usize];
                for op in ops {
                    match op {
                        Op::Read(o, l) => {
                            let got = c.read_bytes(o, l as usize).await.unwrap();
                            prop_assert_eq!(&got[..], &shadow[o as usize..(o + l) as usize], "{:?}", op);
                        }
                        Op::Write(o, l, seed) => {
                            let data = pattern(seed, l as usize);
                            c.write(o, Bytes::from(data.clone())).await.unwrap();
                            shadow[o as usize..(o + l) as usize].copy_from_slice(&data);
                        }
                        Op::Trim(o, l) => {
                            c.trim(o, l).await.unwrap();
                            shadow[o as usize..(o + l) as usize].fill(0);
                        }
                        Op::Zero(o, l) => {
                            c.write_zeroes(o, l).await.unwrap();
                            shadow[o as usize..(o + l) as usize].fill(0);
                        }
                        Op::Extents(o, l) => {
                            let ext = c.extents(o, l).await.unwrap();
                            let mut at = o;
                            for e in &ext {
                                prop_assert_eq!(e.offset, at);
                                prop_assert!(e.len > 0);
                                if e.kind.reads_zero() {
                                    prop_assert!(shadow[e.offset as usize..e.end() as usize].iter().all(|b| *b == 0));
                                }
                                at = e.end();
                            }
                            prop_assert_eq!(at, o + l);
                        }
                    }
                }
                prop_assert_eq!(inner.contents(), shadow);
                prop_assert_eq!(inner.misaligned.load(Ordering::Relaxed), 0);
                Ok(())
            })?;
        }
    }
}
