//! Page-level deltas inside one chunk: which 4 KiB pages of the new bytes differ from what
//! the destination is known to hold, merged into runs (zero runs carry no data).

use bytes::Bytes;

use crate::digest::{self, PAGE};

/// A run of bytes within a chunk: new data, or zeros (sent without data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset within the chunk.
    pub off: u32,
    /// Length in bytes.
    pub len: u32,
    /// The bytes (`len` of them), or `None` for zeros.
    pub data: Option<Bytes>,
}

/// What the destination's chunk is known to be, page by page.
#[derive(Clone, Copy, Debug)]
pub enum Theirs<'a> {
    /// All zeros.
    Zero,
    /// Its page digests.
    Pages(&'a [u32]),
    /// Its bytes.
    Bytes(&'a [u8]),
}

/// Runs of pages of `data` that differ from `theirs`. Adjacent pages merge; zero pages become
/// zero runs without data.
pub fn diff_runs(data: &bytes::Bytes, theirs: Theirs<'_>) -> Vec<Run> {
    diff_ranges(data, theirs)
        .into_iter()
        .map(|(s, e, zero)| Run {
            off: s as u32,
            len: (e - s) as u32,
            data: (!zero).then(|| data.slice(s..e)),
        })
        .collect()
}

/// [`diff_runs`] of bytes that are not in a [`bytes::Bytes`] (a scan's buffer): only the
/// changed pages are copied.
pub(crate) fn diff_runs_copied(data: &[u8], theirs: Theirs<'_>) -> Vec<Run> {
    diff_ranges(data, theirs)
        .into_iter()
        .map(|(s, e, zero)| Run {
            off: s as u32,
            len: (e - s) as u32,
            data: (!zero).then(|| bytes::Bytes::copy_from_slice(&data[s..e])),
        })
        .collect()
}

/// `(start, end, zero)` of the runs of [`diff_runs`].
fn diff_ranges(data: &[u8], theirs: Theirs<'_>) -> Vec<(usize, usize, bool)> {
    let page = PAGE as usize;
    let mut runs = Vec::new();
    // (start, end, zero) of the run being built.
    let mut cur: Option<(usize, usize, bool)> = None;
    for (p, chunk) in data.chunks(page).enumerate() {
        let zero = digest::is_zero(chunk);
        let s = p * page;
        let e = s + chunk.len();
        let differs = match theirs {
            Theirs::Zero => !zero,
            Theirs::Pages(t) => t.get(p) != Some(&digest::page_digest(chunk)),
            Theirs::Bytes(b) => b.get(s..e) != Some(chunk),
        };
        if !differs {
            runs.extend(cur.take());
            continue;
        }
        match &mut cur {
            Some((_, end, z)) if *z == zero => *end = e,
            _ => {
                runs.extend(cur.take());
                cur = Some((s, e, zero));
            }
        }
    }
    runs.extend(cur);
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_pages_and_send_zeros_without_data() {
        let mut v = vec![1u8; 6 * 4096];
        v[4 * 4096..5 * 4096].fill(0);
        let data = Bytes::from(v.clone());
        let mut theirs = digest::page_digests(&v);
        // Pages 1, 2 differ (one data run), page 4 is zero and differs (zero run).
        theirs[1] ^= 1;
        theirs[2] ^= 1;
        theirs[4] ^= 1;
        let runs = diff_runs(&data, Theirs::Pages(&theirs));
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].off, runs[0].len), (4096, 8192));
        assert!(runs[0].data.is_some());
        assert_eq!(
            (runs[1].off, runs[1].len, runs[1].data.clone()),
            (4 * 4096, 4096, None)
        );
        // Against an all-zero chunk only non-zero pages go, as two runs around the zero page.
        let runs = diff_runs(&data, Theirs::Zero);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].off, runs[0].len), (0, 4 * 4096));
        assert_eq!((runs[1].off, runs[1].len), (5 * 4096, 4096));
    }
}
