//! [`Geometry`]: how a byte range splits into chunks and pages.

/// How a region of `size` bytes splits into chunks.
///
/// Chunk `i` covers store bytes `i * chunk .. min((i + 1) * chunk, size)`;
/// the last chunk may be short. Memory is installed in whole pages, so the
/// last chunk's *install length* is its data length rounded up to the page
/// size; the bytes past `size` read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk: usize,
    page: usize,
    chunks: usize,
}

impl Geometry {
    /// The geometry of `size` bytes in chunks of `chunk` bytes on pages of
    /// `page` bytes. `None` unless `page` is a power of two, `chunk` a
    /// power-of-two multiple of `page`, and `size` non-zero.
    #[must_use]
    pub fn new(size: u64, chunk: usize, page: usize) -> Option<Self> {
        if size == 0 || !page.is_power_of_two() || !chunk.is_power_of_two() || chunk < page {
            return None;
        }
        let chunks = usize::try_from(size.div_ceil(chunk as u64)).ok()?;
        // The mapping length must fit in usize.
        usize::try_from(size.checked_add(page as u64 - 1)?).ok()?;
        Some(Self {
            size,
            chunk,
            page,
            chunks,
        })
    }

    /// Bytes of data (the store's size).
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Page size.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.page
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Length of the memory mapping: `size` rounded up to whole pages.
    #[must_use]
    pub fn map_len(&self) -> usize {
        let size = self.size as usize;
        size.div_ceil(self.page) * self.page
    }

    /// The chunk holding byte `offset` (clamped to the last chunk).
    #[must_use]
    pub fn chunk_of(&self, offset: usize) -> usize {
        (offset / self.chunk).min(self.chunks - 1)
    }

    /// Chunks overlapping `offset..offset + len` (empty for `len == 0`).
    #[must_use]
    pub fn chunks_in(&self, offset: usize, len: usize) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = self.chunk_of(offset);
        let last = self.chunk_of(offset.saturating_add(len - 1));
        first..last + 1
    }

    /// Chunk `i` as `(offset, data_len, install_len)`.
    ///
    /// # Panics
    ///
    /// If `i >= chunks()`.
    #[must_use]
    pub fn chunk(&self, i: usize) -> (usize, usize, usize) {
        assert!(
            i < self.chunks,
            "chunk {i} out of range ({} chunks)",
            self.chunks
        );
        let off = i * self.chunk;
        let end = ((i + 1) as u64 * self.chunk as u64).min(self.size) as usize;
        let data = end - off;
        let install = data.div_ceil(self.page) * self.page;
        (off, data, install)
    }
}
