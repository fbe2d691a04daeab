//! [`HintOrder`]: the background pull order from a page-access hint file.

use memsync_region::{PullPriority, PullView};

/// Pulls the chunks named by a hint first, in the hint's order, then every
/// other chunk from the start.
///
/// The hint file is text: one guest memory file offset per line (decimal,
/// or hexadecimal with `0x`), e.g. the pages a previous restore of the same
/// snapshot faulted, in the order it faulted them; empty lines and lines
/// starting with `#` are skipped.
#[derive(Debug, Clone)]
pub struct HintOrder {
    chunks: Vec<usize>,
    next: usize,
    cursor: usize,
}

/// Largest hint file accepted.
pub const MAX_HINT_BYTES: usize = 64 << 20;

impl HintOrder {
    /// Parses a hint for a memory of `size` bytes in chunks of `chunk`.
    ///
    /// # Errors
    ///
    /// A line that is not an offset inside the memory (with its number), or
    /// a hint larger than [`MAX_HINT_BYTES`].
    pub fn parse(text: &str, size: u64, chunk: usize) -> Result<Self, crate::Error> {
        if text.len() > MAX_HINT_BYTES {
            return Err(crate::Error::Protocol(format!(
                "the hint file is larger than {MAX_HINT_BYTES} bytes"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut chunks = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let off = match line.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => line.parse(),
            }
            .ok()
            .filter(|&o| o < size)
            .ok_or_else(|| {
                crate::Error::Protocol(format!(
                    "hint line {}: {line:?} is not an offset below {size}",
                    n + 1
                ))
            })?;
            let i = usize::try_from(off / chunk as u64).unwrap_or(usize::MAX);
            if seen.insert(i) {
                chunks.push(i);
            }
        }
        Ok(Self {
            chunks,
            next: 0,
            cursor: 0,
        })
    }

    /// The chunks named, in order.
    #[must_use]
    pub fn chunks(&self) -> &[usize] {
        &self.chunks
    }
}

impl PullPriority for HintOrder {
    fn next_chunk(&mut self, view: &PullView<'_>) -> Option<usize> {
        while let Some(&i) = self.chunks.get(self.next) {
            self.next += 1;
            if view.wanted(i) {
                return Some(i);
            }
        }
        let i = view.next_wanted_from(self.cursor)?;
        self.cursor = i + 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_lines_become_chunks_in_order() {
        let h = HintOrder::parse("# faults\n0x20000\n\n4096\n131072\n0\n", 1 << 20, 65536).unwrap();
        assert_eq!(h.chunks(), &[2, 0]);
        let e = HintOrder::parse("12\nbanana\n", 1 << 20, 65536).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(HintOrder::parse("0x100000\n", 1 << 20, 65536).is_err());
    }
}
