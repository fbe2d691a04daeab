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
        let mut s = ChunkSet::new(len);
        for i in 0..len {
            s.insert(i);
        }
        s
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

    /// The wire form: segments of at most [`MAX_BITS`] chunks covering `0..len`.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut first = 0u64;
        while first < self.len {
            let count = (self.len - first).min(MAX_BITS as u64) as u32;
            let mut bits = vec![0u8; count.div_ceil(8) as usize];
            for k in 0..count as u64 {
                if self.contains(first + k) {
                    bits[(k / 8) as usize] |= 1 << (k % 8);
                }
            }
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
        for i in s.ones() {
            self.insert(i);
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
