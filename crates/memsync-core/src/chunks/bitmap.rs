//! [`ChunkBitmap`]: one bit per chunk.

/// A bitmap with one bit per chunk (e.g. a snapshot of the present chunks,
/// or a set of dirty chunks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkBitmap {
    words: Vec<u64>,
    len: usize,
}

impl ChunkBitmap {
    /// Number of chunks (bits).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap has no bits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set.
    #[must_use]
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of set bits.
    #[must_use]
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The set bits in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }

    /// The words, least significant bit first (bit `i` is in word `i / 64`).
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

impl ChunkBitmap {
    /// `len` clear bits.
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// A bitmap of `len` bits from its words (bits past `len` are cleared).
    #[must_use]
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Self {
        words.resize(len.div_ceil(64), 0);
        if !len.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (len % 64)) - 1;
        }
        Self { words, len }
    }

    /// Sets bit `i`.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn set(&mut self, i: usize) {
        assert!(i < self.len, "bit {i} out of range ({} bits)", self.len);
        self.words[i / 64] |= 1 << (i % 64);
    }

    /// Clears bit `i`.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn clear(&mut self, i: usize) {
        assert!(i < self.len, "bit {i} out of range ({} bits)", self.len);
        self.words[i / 64] &= !(1 << (i % 64));
    }

    /// Sets the bits of `range` (clamped to the bitmap).
    pub fn set_range(&mut self, range: std::ops::Range<usize>) {
        for i in range.start..range.end.min(self.len) {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// The runs of set bits, in increasing order.
    pub fn runs(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let mut it = self.iter().peekable();
        std::iter::from_fn(move || {
            let start = it.next()?;
            let mut end = start + 1;
            while it.peek() == Some(&end) {
                it.next();
                end += 1;
            }
            Some(start..end)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_bits() {
        let mut b = ChunkBitmap::new(200);
        b.set_range(3..7);
        b.set(63);
        b.set(64);
        b.set(199);
        b.clear(5);
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![3..5, 6..7, 63..65, 199..200]);
        assert_eq!(b.count(), 6);
        assert!(!b.get(200));
    }

    #[test]
    fn from_words_clears_bits_past_the_end() {
        let b = ChunkBitmap::from_words(vec![u64::MAX], 3);
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}

/// A bitmap with one bit per chunk that threads set and clear at once
/// (e.g. the chunks a driver write-protected).
#[derive(Debug)]
pub struct AtomicChunkBitmap {
    words: Box<[std::sync::atomic::AtomicU64]>,
    len: usize,
}

impl AtomicChunkBitmap {
    /// `len` clear bits.
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self {
            words: (0..len.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            len,
        }
    }

    /// Number of bits.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap has no bits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set (`false` past the end).
    #[must_use]
    pub fn get(&self, i: usize) -> bool {
        i < self.len
            && self.words[i / 64].load(std::sync::atomic::Ordering::SeqCst) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was set before.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn set(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range ({} bits)", self.len);
        let m = 1 << (i % 64);
        self.words[i / 64].fetch_or(m, std::sync::atomic::Ordering::SeqCst) & m != 0
    }

    /// Clears bit `i`; returns whether it was set before.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn clear(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range ({} bits)", self.len);
        let m = 1 << (i % 64);
        self.words[i / 64].fetch_and(!m, std::sync::atomic::Ordering::SeqCst) & m != 0
    }

    /// A snapshot.
    #[must_use]
    pub fn snapshot(&self) -> ChunkBitmap {
        ChunkBitmap::from_words(
            self.words
                .iter()
                .map(|w| w.load(std::sync::atomic::Ordering::SeqCst))
                .collect(),
            self.len,
        )
    }
}
