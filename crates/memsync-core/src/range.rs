//! Chunk arithmetic: splitting byte ranges into aligned fixed-size chunks.

/// One piece of a byte range that falls inside a single chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPiece {
    /// Index of the chunk (`offset / chunk_size`).
    pub index: u64,
    /// Offset of the piece within the chunk.
    pub within: u64,
    /// Length of the piece.
    pub len: u64,
    /// Offset of the piece within the original range (where it goes in the caller's buffer).
    pub pos: u64,
}

impl ChunkPiece {
    /// The piece covers its whole chunk.
    pub fn is_whole(&self, chunk_size: u64) -> bool {
        self.within == 0 && self.len == chunk_size
    }
}

/// Iterate over the chunk pieces of `offset..offset+len` for a chunk size.
///
/// Pieces are in order, non-empty, and together cover the range exactly.
///
/// ```
/// use memsync_core::range::chunk_pieces;
/// let p: Vec<_> = chunk_pieces(4000, 200, 4096).collect();
/// assert_eq!(p.len(), 2);
/// assert_eq!((p[0].index, p[0].within, p[0].len), (0, 4000, 96));
/// assert_eq!((p[1].index, p[1].within, p[1].len), (1, 0, 104));
/// ```
pub fn chunk_pieces(offset: u64, len: u64, chunk_size: u64) -> ChunkPieces {
    assert!(chunk_size > 0, "chunk size must be positive");
    ChunkPieces {
        pos: offset,
        end: offset.saturating_add(len),
        start: offset,
        chunk_size,
    }
}

/// Iterator returned by [`chunk_pieces`].
#[derive(Clone, Debug)]
pub struct ChunkPieces {
    pos: u64,
    end: u64,
    start: u64,
    chunk_size: u64,
}

impl Iterator for ChunkPieces {
    type Item = ChunkPiece;

    fn next(&mut self) -> Option<ChunkPiece> {
        if self.pos >= self.end {
            return None;
        }
        let index = self.pos / self.chunk_size;
        let within = self.pos % self.chunk_size;
        let len = (self.chunk_size - within).min(self.end - self.pos);
        let piece = ChunkPiece {
            index,
            within,
            len,
            pos: self.pos - self.start,
        };
        self.pos += len;
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.pos >= self.end {
            return (0, Some(0));
        }
        let first = self.pos / self.chunk_size;
        let last = (self.end - 1) / self.chunk_size;
        let n = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        (n, Some(n))
    }
}

/// Round `x` down to a multiple of `align` (`align > 0`).
pub fn align_down(x: u64, align: u64) -> u64 {
    x - x % align
}

/// Round `x` up to a multiple of `align` (`align > 0`), or `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    let r = x % align;
    if r == 0 {
        Some(x)
    } else {
        x.checked_add(align - r)
    }
}

/// Number of chunks of `chunk_size` needed to hold `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_tile_the_range(offset in 0u64..1 << 40, len in 0u64..1 << 22, shift in 0u32..23) {
            let cs = 1u64 << shift;
            let pieces: Vec<_> = chunk_pieces(offset, len, cs).collect();
            prop_assert_eq!(pieces.len(), chunk_pieces(offset, len, cs).size_hint().0);
            let mut expect_pos = 0;
            for (i, p) in pieces.iter().enumerate() {
                prop_assert!(p.len > 0);
                prop_assert!(p.within + p.len <= cs);
                prop_assert_eq!(p.pos, expect_pos);
                prop_assert_eq!(p.index * cs + p.within, offset + p.pos);
                if i > 0 { prop_assert_eq!(p.within, 0); }
                if i + 1 < pieces.len() { prop_assert_eq!(p.within + p.len, cs); }
                expect_pos += p.len;
            }
            prop_assert_eq!(expect_pos, len);
        }

        #[test]
        fn non_power_of_two_chunks(offset in 0u64..1 << 30, len in 0u64..1 << 20, cs in 1u64..100_000) {
            let total: u64 = chunk_pieces(offset, len, cs).map(|p| p.len).sum();
            prop_assert_eq!(total, len);
        }

        #[test]
        fn align_roundtrip(x in 0u64..u64::MAX / 2, shift in 0u32..30) {
            let a = 1u64 << shift;
            let d = align_down(x, a);
            let u = align_up(x, a).unwrap();
            prop_assert!(d <= x && x <= u);
            prop_assert_eq!(d % a, 0);
            prop_assert_eq!(u % a, 0);
            prop_assert!(u - d == 0 || u - d == a);
        }
    }

    #[test]
    fn align_up_overflow() {
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(4097, 4096), 2);
    }
}
