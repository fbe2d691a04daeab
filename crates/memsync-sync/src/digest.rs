//! Chunk and page digests, and the parallel scan that computes a store's chunk digests.
//!
//! Two levels:
//! - every chunk has a strong digest, BLAKE3-256 of its bytes: two chunks are taken as equal
//!   only when these match;
//! - inside a chunk whose strong digests differ, 4 KiB pages are compared by 32 bits of xxh3, which is
//!   ~3x cheaper than BLAKE3 per page here. A page-digest collision could hide a changed page,
//!   so every patched chunk is checked against the source's strong digest before it is written
//!   (see [`crate::dest`]); a mismatch sends the whole chunk. The weak digest only decides how
//!   little to send, never whether the result is right.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::BytesMut;
use futures_util::{StreamExt, stream};
use memsync_core::{DynStore, Result, Store, StoreError};
use parking_lot::Mutex;

/// The unit of sub-chunk deltas.
pub const PAGE: u64 = 4096;

/// A strong chunk digest (BLAKE3-256).
pub type Digest = [u8; 32];

/// Smallest and largest chunk sizes (a power of two, a multiple of [`PAGE`]).
pub const MIN_CHUNK: u64 = PAGE;
pub const MAX_CHUNK: u64 = 16 << 20;

/// The strong digest of a chunk's bytes.
pub fn chunk_digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// Two chunk digests agree in their first `n` bytes (a remote destination sends a prefix, see
/// [`crate::proto::WIRE_DIGEST`]).
pub fn same(a: &Digest, b: &Digest, n: usize) -> bool {
    a[..n.min(32)] == b[..n.min(32)]
}

/// The weak digest of a page: the low 32 bits of its xxh3-64. It only decides which pages of
/// a changed chunk are sent; a collision (about 2^-32 per page) hides a changed page from the
/// diff, which the chunk's strong check then catches, and the whole chunk is sent.
pub fn page_digest(page: &[u8]) -> u32 {
    twox_hash::XxHash3_64::oneshot(page) as u32
}

/// [`page_digest`] of each 4 KiB page of `data` (the last page may be shorter).
pub fn page_digests(data: &[u8]) -> Vec<u32> {
    data.chunks(PAGE as usize).map(page_digest).collect()
}

/// Length of a [`FpKey`]'s secret (XXH3 needs at least 136 bytes).
pub const FP_SECRET: usize = 192;

/// The key of chunk fingerprints: a random XXH3 secret.
///
/// A fingerprint (keyed XXH3-128 of a chunk, ~4x cheaper than BLAKE3 here) only tells whether a
/// chunk still has the bytes it had when its strong digest was computed, so that a rescan of a
/// changed file hashes with BLAKE3 only the chunks that changed. XXH3 is not a cryptographic
/// hash: the random secret, kept in the owner-only index, is what stops a writer of the file
/// from crafting a change that keeps a chunk's fingerprint (a chance collision is 2^-128). The
/// strong digests still decide every comparison with the other side.
#[derive(Clone)]
pub struct FpKey(Arc<[u8; FP_SECRET]>);

impl std::fmt::Debug for FpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FpKey(..)")
    }
}

impl FpKey {
    /// A new key from the kernel's random source.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut k = [0u8; FP_SECRET];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        Ok(FpKey(Arc::new(k)))
    }

    /// The key stored as these bytes (`None` if the length is wrong).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(FpKey(Arc::new(b.try_into().ok()?)))
    }

    pub fn bytes(&self) -> &[u8; FP_SECRET] {
        &self.0
    }

    /// The fingerprint of `data`; never [`FP_UNKNOWN`].
    pub fn fingerprint(&self, data: &[u8]) -> u128 {
        // The secret has a valid length, so this cannot fail; 1 keeps the result known.
        twox_hash::XxHash3_128::oneshot_with_secret(&self.0[..], data).map_or(1, |h| h.max(1))
    }

    /// Whether two keys are the same (fingerprints of different keys never compare).
    pub fn same(&self, other: &FpKey) -> bool {
        self.0 == other.0
    }
}

/// A fingerprint that matches nothing (a chunk whose fingerprint was not recorded).
pub const FP_UNKNOWN: u128 = 0;

/// Strong digests a scan may reuse: chunk `i` had digest `digests[i]` when its fingerprint
/// under `key` was `fps[i]`.
#[derive(Clone, Debug)]
pub struct Known {
    pub key: FpKey,
    pub fps: Vec<u128>,
    pub digests: Vec<Digest>,
}

/// All bytes are zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare 8 bytes at a time; the tail byte by byte.
    let (words, tail) = data.split_at(data.len() & !7);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// How a store of `size` bytes is cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub chunk_size: u64,
}

impl Layout {
    /// A layout; `chunk_size` must be a power of two in `MIN_CHUNK..=MAX_CHUNK`.
    pub fn new(size: u64, chunk_size: u64) -> Result<Self> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(StoreError::Config(format!(
                "chunk size {chunk_size} must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
            )));
        }
        Ok(Layout { size, chunk_size })
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// Byte offset and length of chunk `i` (the last one may be short).
    pub fn chunk(&self, i: u64) -> (u64, u64) {
        let off = i * self.chunk_size;
        (off, (self.size - off).min(self.chunk_size))
    }

    /// The digest of an all-zero chunk `i`.
    pub fn zero_digest(&self, i: u64) -> Digest {
        let (_, len) = self.chunk(i);
        zero_digest(len)
    }
}

/// The digest of `len` zero bytes (cached for the common lengths).
pub fn zero_digest(len: u64) -> Digest {
    static CACHE: Mutex<Vec<(u64, Digest)>> = Mutex::new(Vec::new());
    let mut c = CACHE.lock();
    if let Some((_, d)) = c.iter().find(|(l, _)| *l == len) {
        return *d;
    }
    let d = chunk_digest(&vec![0u8; len as usize]);
    if c.len() < 16 {
        c.push((len, d));
    }
    d
}

/// What a scan did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes read from the store.
    pub read: u64,
    /// Bytes hashed with BLAKE3 (read bytes whose digest was not reused; holes are neither read
    /// nor hashed).
    pub hashed: u64,
    /// Bytes known to be zero from the store's extents.
    pub holes: u64,
    /// Bytes read whose strong digest was reused, as their fingerprint had not changed (they
    /// are read but not in `hashed`).
    pub reused: u64,
}

/// Bytes per read and per hashing job: several chunks, so that small chunks still make large
/// reads, and few enough that both cores get work.
const PIECE: u64 = 4 << 20;

/// Bytes per read inside a piece (or one chunk, if larger): small enough to stay in a core's
/// L2 cache between the read's copy and the hash.
const STEP: u64 = 256 << 10;

/// A pool of read buffers: fresh 4 MiB buffers cost a page fault per 4 KiB on first touch.
#[derive(Debug, Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }
    fn put(&self, b: Vec<u8>) {
        let mut p = self.0.lock();
        if p.len() < 16 {
            p.push(b);
        }
    }
}

/// Which chunks of `first..first + n` read as zero according to the store's extents.
async fn zero_chunks(store: &dyn Store, layout: Layout) -> Result<Vec<bool>> {
    let n = layout.chunks() as usize;
    let mut zero = vec![false; n];
    if !store.caps().extents || n == 0 {
        return Ok(zero);
    }
    // Count the zero bytes in each chunk; a chunk whose bytes are all zero needs no read.
    let mut zero_bytes = vec![0u64; n];
    let mut off = 0;
    while off < layout.size {
        let len = (layout.size - off).min(1 << 30);
        for e in store.extents(off, len).await? {
            if !e.kind.reads_zero() {
                continue;
            }
            let mut p = e.offset;
            while p < e.end() {
                let i = p / layout.chunk_size;
                let (co, cl) = layout.chunk(i);
                let n = (co + cl).min(e.end()) - p;
                zero_bytes[i as usize] += n;
                p += n;
            }
        }
        off += len;
    }
    for (i, z) in zero.iter_mut().enumerate() {
        *z = zero_bytes[i] == layout.chunk(i as u64).1;
    }
    Ok(zero)
}

/// Called for each piece a scan hashed, on the thread that hashed it, while the bytes are still
/// in memory (and in the CPU's cache): the index of the piece's first chunk, its bytes and the
/// digests of its chunks. The sync uses it to patch a local destination without reading or
/// hashing a changed chunk a second time. An error ends the scan.
pub type PieceHook = Arc<dyn Fn(u64, &[u8], &[Digest]) -> Result<()> + Send + Sync>;

/// The strong digest of every chunk of `store`, read in pieces of up to 4 MiB with several in
/// flight. Each piece is read and hashed by the same thread of tokio's blocking pool: for a
/// local file the read is a copy out of the page cache that costs about as much as hashing, so
/// reading on one thread and hashing on others left the reader as the bottleneck, and hashing
/// right after the read finds the bytes still in the cache. Chunks the store reports as holes
/// or zeros are neither read nor hashed. `progress` is called with bytes covered; `hook` (see
/// [`PieceHook`]) with every piece hashed.
pub async fn scan(
    store: &DynStore,
    layout: Layout,
    progress: &(dyn Fn(u64) + Sync),
    hook: Option<PieceHook>,
) -> Result<(Vec<Digest>, ScanStats)> {
    let s = scan_with(store, layout, progress, hook, None).await?;
    Ok((s.digests, s.stats))
}

/// What [`scan_with`] found.
#[derive(Clone, Debug)]
pub struct Scanned {
    pub digests: Vec<Digest>,
    /// Each chunk's fingerprint under the key given ([`FP_UNKNOWN`] for holes), if one was.
    pub fps: Option<Vec<u128>>,
    pub stats: ScanStats,
}

/// [`scan`], fingerprinting every chunk read with `key`; a chunk whose fingerprint equals the
/// one in `known` (same key, same layout) keeps the digest `known` has for it instead of
/// being hashed with BLAKE3.
pub async fn scan_with(
    store: &DynStore,
    layout: Layout,
    progress: &(dyn Fn(u64) + Sync),
    hook: Option<PieceHook>,
    fp: Option<(FpKey, Option<Arc<Known>>)>,
) -> Result<Scanned> {
    let zero = zero_chunks(&**store, layout).await?;
    let mut digests = vec![[0u8; 32]; zero.len()];
    let want_fps = fp.is_some();
    let mut fps = vec![FP_UNKNOWN; if want_fps { zero.len() } else { 0 }];
    let (key, known) = match fp {
        Some((key, known)) => {
            let known = known.filter(|k| {
                k.key.same(&key) && k.fps.len() == zero.len() && k.digests.len() == zero.len()
            });
            (Some(key), known)
        }
        None => (None, None),
    };
    let mut stats = ScanStats::default();
    // Pieces: runs of non-zero chunks, at most PIECE bytes each.
    let per_piece = (PIECE / layout.chunk_size).max(1);
    let mut pieces = Vec::new();
    let mut i = 0u64;
    while i < layout.chunks() {
        if zero[i as usize] {
            digests[i as usize] = layout.zero_digest(i);
            let len = layout.chunk(i).1;
            stats.holes += len;
            progress(len);
            i += 1;
            continue;
        }
        let start = i;
        while i < layout.chunks() && !zero[i as usize] && i - start < per_piece {
            i += 1;
        }
        pieces.push(start..i);
    }
    let pool = Arc::new(Pool::default());
    // Two per core: a piece of a remote store waits on the network, not on a core.
    let concurrency = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let rt = tokio::runtime::Handle::current();
    let failed = Arc::new(AtomicBool::new(false));
    let mut s = stream::iter(pieces)
        .map(|r| {
            let (pool, store, hook, rt) = (pool.clone(), store.clone(), hook.clone(), rt.clone());
            let (key, known) = (key.clone(), known.clone());
            let failed = failed.clone();
            async move {
                let (off, _) = layout.chunk(r.start);
                let (lo, ll) = layout.chunk(r.end - 1);
                let len = lo + ll - off;
                let first = r.start;
                let nchunks = (r.end - r.start) as usize;
                let flag = failed.clone();
                let out = tokio::task::spawn_blocking(move || {
                    if flag.load(Relaxed) {
                        return Ok(None);
                    }
                    // The piece in reads of STEP bytes into one small buffer, each hashed
                    // at once: the buffer stays in the core's cache, so the copy out of the
                    // page cache writes to cache lines it already holds and the hash reads
                    // them from there (a 4 MiB buffer went to memory and back).
                    let step = STEP.max(layout.chunk_size);
                    let mut buf = pool.get(step.min(len) as usize);
                    let mut d: Vec<Digest> = Vec::with_capacity(nchunks);
                    let mut f: Vec<u128> =
                        Vec::with_capacity(if key.is_some() { nchunks } else { 0 });
                    let mut hashed = 0u64;
                    let mut o = 0;
                    while o < len {
                        let n = step.min(len - o);
                        let b = &mut buf[..n as usize];
                        let at = off + o;
                        rt.block_on(store.read(at, b))
                            .map_err(|e| e.context(format!("reading {at}+{n} to hash it")))?;
                        let k = d.len();
                        for c in b.chunks(layout.chunk_size as usize) {
                            let i = first as usize + d.len();
                            let fp = key.as_ref().map(|key| key.fingerprint(c));
                            let reuse = match (&known, fp) {
                                (Some(kn), Some(fp)) if kn.fps[i] == fp => Some(kn.digests[i]),
                                _ => None,
                            };
                            d.push(reuse.unwrap_or_else(|| {
                                hashed += c.len() as u64;
                                chunk_digest(c)
                            }));
                            f.extend(fp);
                        }
                        if let Some(hook) = &hook {
                            hook(first + k as u64, b, &d[k..])?;
                        }
                        o += n;
                    }
                    pool.put(buf);
                    Ok::<_, StoreError>(Some((d, f, hashed)))
                })
                .await
                .map_err(|e| StoreError::backend(format!("hashing task failed: {e}")))
                .and_then(|r| r)
                .inspect_err(|_| failed.store(true, Relaxed))?;
                Ok::<_, StoreError>((r, len, out))
            }
        })
        .buffer_unordered(concurrency);
    // After a failure no piece starts, and the scan returns only when those running have
    // ended: a hook must not act after its scan has returned.
    let mut error = None;
    while let Some(res) = s.next().await {
        let (r, len, (d, f, hashed)) = match res {
            Ok((r, len, Some(d))) => (r, len, d),
            Ok((_, _, None)) => continue,
            Err(e) => {
                error.get_or_insert(e);
                continue;
            }
        };
        for (k, i) in r.enumerate() {
            digests[i as usize] = d[k];
            if let Some(fp) = f.get(k) {
                fps[i as usize] = *fp;
            }
        }
        stats.read += len;
        stats.hashed += hashed;
        stats.reused += len - hashed;
        progress(len);
    }
    match error {
        Some(e) => Err(e),
        None => Ok(Scanned {
            digests,
            fps: want_fps.then_some(fps),
            stats,
        }),
    }
}

/// Read chunk `i` of `store` into a new buffer.
pub async fn read_chunk(store: &dyn Store, layout: Layout, i: u64) -> Result<BytesMut> {
    let (off, len) = layout.chunk(i);
    let mut buf = BytesMut::zeroed(len as usize);
    store
        .read(off, &mut buf)
        .await
        .map_err(|e| e.context(format!("reading chunk {i} ({off}+{len})")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_zero() {
        assert!(Layout::new(100, 3000).is_err());
        assert!(Layout::new(100, 1 << 30).is_err());
        let l = Layout::new(10_000, 4096).unwrap();
        assert_eq!(l.chunks(), 3);
        assert_eq!(l.chunk(2), (8192, 1808));
        assert_eq!(l.zero_digest(2), chunk_digest(&[0u8; 1808]));
        assert!(is_zero(&[0u8; 13]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert_eq!(page_digests(&v).len(), 2);
    }
}
