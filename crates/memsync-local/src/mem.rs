//! `mem:` — sparse memory.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use memsync_core::range::{ChunkPiece, chunk_pieces};
use memsync_core::{
    Bytes, Caps, Extent, ExtentKind, Result, Store, StoreError, async_trait, check_range,
    check_write,
};
use parking_lot::RwLock;

use crate::util::{is_zero, usize_of};

/// Number of independently locked shards of the chunk table.
const SHARDS: usize = 64;

/// Largest chunk size [`MemStore::with_chunk_size`] accepts.
const MAX_CHUNK: u64 = 1 << 30;

/// Hashes a chunk index with one 128-bit multiply (folded), so both the low bits (bucket) and
/// the high bits (control tag) are well mixed even though all keys of one shard share their low
/// bits. SipHash would cost more than the lookup itself.
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let p = u128::from(n ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One chunk's bytes. The per-chunk lock lets writers to different chunks of the same shard
/// proceed in parallel: they only need the shard's map read-locked. The `Arc` lets
/// [`Store::read_shared`] hand the bytes out without copying them; a write to a chunk that is
/// still shared copies it first (`Arc::make_mut`), so what was handed out never changes.
type Chunk = RwLock<Arc<Box<[u8]>>>;
type ChunkMap = HashMap<u64, Chunk, BuildHasherDefault<IndexHasher>>;

/// A sparse, byte-addressable store in process memory (`mem:SIZE`).
///
/// Memory is kept per chunk (64 KiB unless configured). Chunks that were never written, or
/// whose bytes are all zero again, take no memory: writing zeros over a whole chunk, `trim` and
/// `write_zeroes` free it. So `mem:1T` is fine as long as little of it is written.
///
/// The chunk table is split into 64 shards, each a map under its own read-write lock, and each
/// chunk has its own lock: operations on different chunks do not wait on one global lock, and
/// concurrent partial writes to one chunk never lose each other's updates. Writes are atomic per
/// chunk (a concurrent reader sees a chunk's piece either before or after a write).
///
/// Data is lost when the store is dropped; `flush` does nothing.
///
/// # Example
/// ```
/// use memsync_core::{Bytes, Store, StoreExt};
/// use memsync_local::MemStore;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> memsync_core::Result<()> {
/// let store = MemStore::new(1 << 40); // 1 TiB, sparse
/// store.write(5 << 30, Bytes::from_static(b"far away")).await?;
/// assert_eq!(&store.read_bytes(5 << 30, 8).await?[..], b"far away");
/// assert_eq!(store.stored_chunks(), 1);
/// store.trim(5 << 30, 8).await?;
/// assert_eq!(store.stored_chunks(), 0);
/// # Ok(()) }
/// ```
pub struct MemStore {
    size: u64,
    chunk_size: u64,
    shards: Box<[RwLock<ChunkMap>]>,
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStore")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("stored_chunks", &self.stored_chunks())
            .finish()
    }
}

impl MemStore {
    /// The default chunk size, 64 KiB.
    pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

    /// A zero-filled store of `size` bytes with the default chunk size. Takes no memory until
    /// written.
    pub fn new(size: u64) -> Self {
        Self::with_chunk_size(size, Self::DEFAULT_CHUNK_SIZE).expect("default chunk size is valid")
    }

    /// A zero-filled store of `size` bytes kept in chunks of `chunk_size` bytes
    /// (1 byte ..= 1 GiB; powers of two are not required).
    pub fn with_chunk_size(size: u64, chunk_size: u64) -> Result<Self> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(StoreError::Config(format!(
                "mem store chunk size {chunk_size} is out of range (1 byte to 1 GiB)"
            )));
        }
        let shards = (0..SHARDS)
            .map(|_| RwLock::new(ChunkMap::default()))
            .collect();
        Ok(MemStore {
            size,
            chunk_size,
            shards,
        })
    }

    /// The chunk size memory is allocated in.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// How many chunks currently hold memory (chunks with at least one non-zero byte, or that
    /// were partly zeroed and still hold data elsewhere).
    pub fn stored_chunks(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Bytes of chunk memory currently held (excluding bookkeeping).
    pub fn stored_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .values()
                    .map(|c| c.read().len() as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    fn shard(&self, index: u64) -> &RwLock<ChunkMap> {
        &self.shards[(index % SHARDS as u64) as usize]
    }

    /// Length of chunk `index` (the last chunk may be short).
    fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk_size).min(self.chunk_size)
    }

    fn read_piece(&self, p: ChunkPiece, out: &mut [u8]) {
        let map = self.shard(p.index).read();
        match map.get(&p.index) {
            Some(chunk) => {
                let w = usize_of(p.within);
                out.copy_from_slice(&chunk.read()[w..w + out.len()]);
            }
            None => out.fill(0),
        }
    }

    fn write_piece(&self, p: ChunkPiece, data: &[u8]) {
        if is_zero(data) {
            self.zero_piece(p);
            return;
        }
        let w = usize_of(p.within);
        let shard = self.shard(p.index);
        {
            let map = shard.read();
            if let Some(chunk) = map.get(&p.index) {
                Arc::make_mut(&mut chunk.write())[w..w + data.len()].copy_from_slice(data);
                return;
            }
        }
        let mut map = shard.write();
        let chunk = map.entry(p.index).or_insert_with(|| {
            // `vec![0; n]` uses calloc: fresh zeroed pages, no memset.
            RwLock::new(Arc::new(
                vec![0u8; usize_of(self.chunk_len(p.index))].into_boxed_slice(),
            ))
        });
        Arc::make_mut(chunk.get_mut())[w..w + data.len()].copy_from_slice(data);
    }

    /// Make a piece read as zeros, freeing its chunk if the whole chunk is then zero.
    fn zero_piece(&self, p: ChunkPiece) {
        let shard = self.shard(p.index);
        if p.within == 0 && p.len == self.chunk_len(p.index) {
            shard.write().remove(&p.index);
            return;
        }
        {
            let map = shard.read();
            let Some(chunk) = map.get(&p.index) else {
                return;
            };
            let mut bytes = chunk.write();
            let w = usize_of(p.within);
            Arc::make_mut(&mut bytes)[w..w + usize_of(p.len)].fill(0);
            if !is_zero(&bytes) {
                return;
            }
        }
        // The chunk became all zero. Free it, unless a writer slipped in between the locks.
        let mut map = shard.write();
        if let Entry::Occupied(mut e) = map.entry(p.index)
            && is_zero(e.get_mut().get_mut().as_ref())
        {
            e.remove();
        }
    }

    /// The bytes of `p` as a buffer shared with the chunk, or zeros.
    fn share_piece(&self, p: ChunkPiece, out: &mut Vec<Bytes>) {
        let chunk = self
            .shard(p.index)
            .read()
            .get(&p.index)
            .map(|c| c.read().clone());
        match chunk {
            Some(c) => {
                let w = usize_of(p.within);
                out.push(Bytes::from_owner(Shared(c)).slice(w..w + usize_of(p.len)));
            }
            None => {
                let mut left = usize_of(p.len);
                while left > 0 {
                    let n = left.min(ZEROS.len());
                    out.push(Bytes::from_static(&ZEROS[..n]));
                    left -= n;
                }
            }
        }
    }

    fn zero_range(&self, offset: u64, len: u64) {
        for p in chunk_pieces(offset, len, self.chunk_size) {
            self.zero_piece(p);
        }
    }

    /// Indices of stored chunks in `first..=last`, sorted.
    fn stored_in(&self, first: u64, last: u64) -> Vec<u64> {
        let span = last - first + 1;
        let stored = self.stored_chunks() as u64;
        let mut out = Vec::new();
        if span <= stored.saturating_mul(2).max(1024) {
            // Probing each index is cheaper than walking every stored chunk.
            for i in first..=last {
                if self.shard(i).read().contains_key(&i) {
                    out.push(i);
                }
            }
        } else {
            for shard in self.shards.iter() {
                out.extend(
                    shard
                        .read()
                        .keys()
                        .copied()
                        .filter(|i| (first..=last).contains(i)),
                );
            }
            out.sort_unstable();
        }
        out
    }
}

/// A chunk's bytes lent out by [`Store::read_shared`].
struct Shared(Arc<Box<[u8]>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What holes are lent out as.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `read_shared` answers only reads it can lend in at most this many buffers: a reply is sent
/// with one `writev` of them, and Linux takes at most 1024 per call.
const MAX_SHARED_BUFS: u64 = 512;

/// Append an extent, merging it into the previous one if they are adjacent and of one kind.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, end: u64, kind: ExtentKind) {
    if end <= offset {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.kind == kind
        && last.end() == offset
    {
        last.len += end - offset;
        return;
    }
    out.push(Extent {
        offset,
        len: end - offset,
        kind,
    });
}

#[async_trait]
impl Store for MemStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let mut caps = Caps::basic();
        caps.block_size = 1;
        caps.preferred_io = self.chunk_size;
        caps.max_io = caps.max_io.max(self.chunk_size);
        caps.trim = true;
        caps.fast_zero = true;
        caps.extents = true;
        caps.flush = false;
        caps.multi_conn = true;
        caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.size, 1, offset, buf.len() as u64)?;
        for p in chunk_pieces(offset, buf.len() as u64, self.chunk_size) {
            let pos = usize_of(p.pos);
            self.read_piece(p, &mut buf[pos..pos + usize_of(p.len)]);
        }
        Ok(())
    }

    async fn read_shared(&self, offset: u64, len: u64) -> Option<Result<Vec<Bytes>>> {
        if let Err(e) = check_range(self.size, 1, offset, len) {
            return Some(Err(e));
        }
        if len == 0 {
            return Some(Ok(Vec::new()));
        }
        let cs = self.chunk_size;
        let pieces = (offset + len - 1) / cs - offset / cs + 1;
        // Holes take a buffer per 64 KiB.
        if pieces + len / ZEROS.len() as u64 > MAX_SHARED_BUFS {
            return None;
        }
        let mut out = Vec::with_capacity(pieces as usize);
        for p in chunk_pieces(offset, len, cs) {
            self.share_piece(p, &mut out);
        }
        Some(Ok(out))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64)?;
        for p in chunk_pieces(offset, data.len() as u64, self.chunk_size) {
            let pos = usize_of(p.pos);
            self.write_piece(p, &data[pos..pos + usize_of(p.len)]);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, 1, offset, len)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let cs = self.chunk_size;
        let mut pos = offset;
        for i in self.stored_in(offset / cs, (end - 1) / cs) {
            let start = (i * cs).max(offset);
            let stop = (i * cs).saturating_add(cs).min(end);
            push_extent(&mut out, pos, start, ExtentKind::Hole);
            push_extent(&mut out, start, stop, ExtentKind::Data);
            pos = stop;
        }
        push_extent(&mut out, pos, end, ExtentKind::Hole);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsync_core::StoreExt;

    #[tokio::test]
    async fn sparse_and_freeing() {
        let s = MemStore::with_chunk_size(1 << 20, 4096).unwrap();
        s.write(4000, Bytes::from(vec![7u8; 200])).await.unwrap();
        assert_eq!(s.stored_chunks(), 2);
        // Zeroing part of chunk 0 that holds all its data frees it.
        s.write(4000, Bytes::from(vec![0u8; 96])).await.unwrap();
        assert_eq!(s.stored_chunks(), 1);
        s.write_zeroes(4096, 104).await.unwrap();
        assert_eq!(s.stored_chunks(), 0);
        // Writing zeros to an absent chunk allocates nothing.
        s.write(0, Bytes::from(vec![0u8; 10000])).await.unwrap();
        assert_eq!(s.stored_chunks(), 0);
        assert!(s.read_bytes(0, 9000).await.unwrap().iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn short_last_chunk() {
        let s = MemStore::with_chunk_size(10_000, 4096).unwrap();
        s.write(9000, Bytes::from(vec![1u8; 1000])).await.unwrap();
        assert_eq!(s.stored_bytes(), 10_000 - 8192);
        let ex = s.extents(0, 10_000).await.unwrap();
        assert_eq!(
            ex,
            vec![
                Extent {
                    offset: 0,
                    len: 8192,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: 8192,
                    len: 1808,
                    kind: ExtentKind::Data
                },
            ]
        );
        s.trim(8192, 1808).await.unwrap();
        assert_eq!(s.stored_chunks(), 0);
    }

    #[tokio::test]
    async fn extents_merge_and_walk_sparse_terabyte() {
        let s = MemStore::new(1 << 40);
        let cs = MemStore::DEFAULT_CHUNK_SIZE;
        s.write(cs, Bytes::from(vec![1u8; 2 * cs as usize]))
            .await
            .unwrap();
        s.write(1 << 39, Bytes::from_static(b"x")).await.unwrap();
        let ex = s.extents(0, 1 << 40).await.unwrap();
        assert_eq!(
            ex,
            vec![
                Extent {
                    offset: 0,
                    len: cs,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: cs,
                    len: 2 * cs,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 3 * cs,
                    len: (1 << 39) - 3 * cs,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: 1 << 39,
                    len: cs,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: (1 << 39) + cs,
                    len: (1 << 39) - cs,
                    kind: ExtentKind::Hole
                },
            ]
        );
        let ex = s.extents(cs + 5, 10).await.unwrap();
        assert_eq!(
            ex,
            vec![Extent {
                offset: cs + 5,
                len: 10,
                kind: ExtentKind::Data
            }]
        );
    }

    /// `read_shared` lends the bytes `read` returns, holes as zeros, and what it lent does not
    /// change with later writes, zeroing or trims of those chunks.
    #[tokio::test]
    async fn shared_reads_are_reads_and_keep_their_snapshot() {
        let s = MemStore::with_chunk_size(4 << 20, 4096).unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8 + 1).collect();
        s.write(1000, Bytes::from(data.clone())).await.unwrap();
        let cat = |v: &[Bytes]| {
            v.iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<u8>>()
        };
        for (off, len) in [
            (0, 30_000),
            (1000, 20_000),
            (4095, 2),
            (50_000, 9000),
            (7, 0),
        ] {
            let lent = s.read_shared(off, len).await.unwrap().unwrap();
            assert_eq!(
                cat(&lent),
                s.read_bytes(off, len as usize).await.unwrap(),
                "{off}+{len}"
            );
        }
        let before = s.read_shared(0, 30_000).await.unwrap().unwrap();
        let snapshot = cat(&before);
        s.write(5000, Bytes::from(vec![9u8; 10_000])).await.unwrap();
        s.write_zeroes(0, 4096).await.unwrap();
        s.trim(16_384, 4096).await.unwrap();
        s.write(2, Bytes::from_static(b"xy")).await.unwrap();
        assert_eq!(cat(&before), snapshot);
        let after = s.read_bytes(0, 30_000).await.unwrap();
        assert_eq!(&after[5000..15_000], &[9u8; 10_000][..]);
        assert_eq!(&after[2..4], b"xy");
        assert!(after[16_384..20_480].iter().all(|&b| b == 0));
        // Errors are `read`'s; reads needing too many buffers are left to `read`.
        assert!(matches!(
            s.read_shared(4 << 20, 1).await,
            Some(Err(StoreError::OutOfRange { .. }))
        ));
        assert!(s.read_shared(0, 4 << 20).await.is_none());
    }

    #[test]
    fn bad_chunk_size() {
        assert!(MemStore::with_chunk_size(100, 0).is_err());
        assert!(MemStore::with_chunk_size(100, 2 << 30).is_err());
    }
}
