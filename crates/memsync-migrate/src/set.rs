//! A set of chunk numbers as a bitmap, and its wire form (bitmap segments).

use bytes::Bytes;

use crate::proto::{MAX_BITS, Segment};

/// Chunks `0..len`, each in or out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u64,
}

impl ChunkSet {
    pub fn new(len: u64) -> Self {
        ChunkSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub fn full(len: u64) -> Self {
        ChunkSet::new(len).complement()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Adds `i` (ignored past the end); returns whether it was new.
    pub fn insert(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w >> (i % 64) & 1 == 1;
        *w |= 1 << (i % 64);
        !was
    }

    pub fn remove(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w >> (i % 64) & 1 == 1;
        *w &= !(1 << (i % 64));
        was
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(k, &w)| {
            let mut v = w;
            std::iter::from_fn(move || {
                if v == 0 {
                    return None;
                }
                let b = v.trailing_zeros() as u64;
                v &= v - 1;
                Some(k as u64 * 64 + b)
            })
        })
    }

    /// The first member at or after `from`, wrapping around to the start.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        let from = if from >= self.len { 0 } else { from };
        self.first_at_or_after(from)
            .or_else(|| self.first_at_or_after(0))
    }

    fn first_at_or_after(&self, from: u64) -> Option<u64> {
        let mut k = (from / 64) as usize;
        let mut w = *self.words.get(k)? & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                return Some(k as u64 * 64 + w.trailing_zeros() as u64);
            }
            k += 1;
            w = *self.words.get(k)?;
        }
    }

    /// Every chunk not in the set.
    pub fn complement(&self) -> ChunkSet {
        let mut s = ChunkSet::new(self.len);
        for (k, w) in s.words.iter_mut().enumerate() {
            *w = !self.words[k];
        }
        if !self.len.is_multiple_of(64)
            && let Some(last) = s.words.last_mut()
        {
            *last &= (1u64 << (self.len % 64)) - 1;
        }
        s
    }

    pub fn union_with(&mut self, other: &ChunkSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every member of `other`.
    pub fn subtract(&mut self, other: &ChunkSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// Keeps only the members whose bit is set in `words` (least significant bit first, bit
    /// `i` in word `i / 64`, as `memsync_core::ChunkBitmap::words` gives them).
    pub fn intersect_words(&mut self, words: &[u64]) {
        for (k, a) in self.words.iter_mut().enumerate() {
            *a &= words.get(k).copied().unwrap_or(0);
        }
    }

    /// The wire form: segments of at most [`MAX_BITS`] chunks covering `0..len`.
    ///
    /// Word at a time (a segment starts on a multiple of 64, as `MAX_BITS` is one): the sets of
    /// a post-copy switch-over are built and sent while the application is suspended, and a
    /// 1 GiB region has 262144 chunks of 4 KiB.
    pub fn segments(&self) -> Vec<Segment> {
        const _: () = assert!(MAX_BITS.is_multiple_of(64));
        let mut out = Vec::new();
        let mut first = 0u64;
        while first < self.len {
            let count = (self.len - first).min(MAX_BITS as u64) as u32;
            let nbytes = count.div_ceil(8) as usize;
            let w0 = (first / 64) as usize;
            let mut bits = Vec::with_capacity(nbytes + 8);
            for w in &self.words[w0..w0 + nbytes.div_ceil(8)] {
                bits.extend_from_slice(&w.to_le_bytes());
            }
            // Bits past `len` are always clear in `words`.
            bits.truncate(nbytes);
            out.push(Segment {
                first,
                count,
                bits: Bytes::from(bits),
            });
            first += count as u64;
        }
        out
    }

    /// Adds the members of a received segment; a segment reaching past the set is an error.
    pub fn apply(&mut self, s: &Segment) -> Result<(), String> {
        if s.first
            .checked_add(s.count as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(format!(
                "bitmap segment {}+{} reaches past the {} chunks",
                s.first, s.count, self.len
            ));
        }
        if !s.first.is_multiple_of(64) {
            for i in s.ones() {
                self.insert(i);
            }
            return Ok(());
        }
        // Word at a time, as in `segments`; bits past `count` are ignored.
        let w0 = (s.first / 64) as usize;
        let full_words = (s.count / 64) as usize;
        for k in 0..(s.count as usize).div_ceil(64) {
            let mut b = [0u8; 8];
            let src = s.bits.get(k * 8..).unwrap_or(&[]);
            let n = src.len().min(8);
            b[..n].copy_from_slice(&src[..n]);
            let mut w = u64::from_le_bytes(b);
            if k == full_words {
                w &= (1u64 << (s.count % 64)) - 1;
            }
            self.words[w0 + k] |= w;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn segments_roundtrip(len in 1u64..5000, members in proptest::collection::vec(0u64..5000, 0..100)) {
            let mut s = ChunkSet::new(len);
            for m in &members {
                s.insert(*m);
            }
            let mut t = ChunkSet::new(len);
            for seg in s.segments() {
                t.apply(&seg).unwrap();
            }
            prop_assert_eq!(&t, &s);
            let c = s.complement();
            prop_assert_eq!(c.count() + s.count(), len);
            prop_assert!(s.iter().all(|i| !c.contains(i)));
            if let Some(&m) = members.iter().find(|&&m| m < len) {
                prop_assert!(s.next_from(m).is_some());
                prop_assert_eq!(s.next_from(m + 1 ).map(|x| s.contains(x)), Some(true));
            }
        }
    }

    proptest! {
        /// The word-at-a-time `apply` equals setting each bit `Segment::ones` names, for
        /// aligned and unaligned segments, bit strings short of `count` and junk bits past it.
        #[test]
        fn apply_matches_bit_by_bit(
            len in 1u64..3000,
            // Half the segments start on a word (the fast path), half anywhere.
            first in prop_oneof![(0u64..47).prop_map(|k| k * 64), 0u64..3000],
            count in 1u32..1500,
            bits in proptest::collection::vec(any::<u8>(), 0..200),
            before in proptest::collection::vec(0u64..3000, 0..50),
        ) {
            let seg = Segment { first, count, bits: Bytes::from(bits) };
            let mut fast = ChunkSet::new(len);
            for &m in &before {
                fast.insert(m);
            }
            let mut slow = fast.clone();
            let r = fast.apply(&seg);
            prop_assert_eq!(r.is_ok(), first + count as u64 <= len);
            if r.is_ok() {
                for i in seg.ones() {
                    slow.insert(i);
                }
            }
            prop_assert_eq!(&fast, &slow);
        }

        #[test]
        fn full_subtract_and_intersect_agree_with_membership(
            len in 1u64..3000,
            a in proptest::collection::vec(0u64..3000, 0..100),
            b in proptest::collection::vec(0u64..3000, 0..100),
        ) {
            let (mut x, mut y) = (ChunkSet::new(len), ChunkSet::new(len));
            a.iter().for_each(|&i| { x.insert(i); });
            b.iter().for_each(|&i| { y.insert(i); });
            let full = ChunkSet::full(len);
            prop_assert_eq!(full.count(), len);
            let mut d = x.clone();
            d.subtract(&y);
            let mut n = x.clone();
            n.intersect_words(&y.words);
            for i in 0..len {
                prop_assert_eq!(d.contains(i), x.contains(i) && !y.contains(i));
                prop_assert_eq!(n.contains(i), x.contains(i) && y.contains(i));
            }
            let mut short = x.clone();
            short.intersect_words(&[]);
            prop_assert!(short.is_empty());
        }
    }

    #[test]
    fn next_from_wraps_and_apply_checks_range() {
        let mut s = ChunkSet::new(200);
        s.insert(3);
        s.insert(150);
        assert_eq!(s.next_from(4), Some(150));
        assert_eq!(s.next_from(151), Some(3));
        assert_eq!(s.next_from(999), Some(3));
        assert_eq!(ChunkSet::new(10).next_from(0), None);
        let seg = Segment {
            first: 195,
            count: 8,
            bits: Bytes::from_static(&[1]),
        };
        assert!(s.apply(&seg).is_err());
    }
}
