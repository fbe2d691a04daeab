//! Small helpers shared by the local stores.

/// `true` if every byte of `b` is zero. Compiles to wide vector compares (no `unsafe` needed).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (blocks, rest) = b.as_chunks::<64>();
    blocks
        .iter()
        .all(|blk| blk.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Largest single `pwrite` the local stores make into a file.
///
/// ext4 gives a buffered write page-cache folios as large as the write (up to 2 MiB). On a VM
/// that hands the memory its guest frees back to the host (virtio-balloon free page reporting,
/// in 2 MiB blocks, as on the machines memsync is measured on), large folios come from the
/// blocks handed back, which the host must back again at their first touch, while small ones
/// come from memory the guest recycles. Measured there (docs/perf.md, "Why the FUSE subject
/// varied"): 1 GiB written into a new ext4 file after 5 s of idle took 0.6–1.15 s in 1 MiB
/// `pwrite`s and 0.18–0.20 s in 256 KiB ones, and a managed mount's FUSE read of a fresh cache
/// went from 0.74–0.82 to 1.64–1.90 GB/s (8 alternated rounds each). Four calls per MiB
/// instead of one cost nothing measurable.
pub(crate) const WRITE_PIECE: usize = 256 << 10;

/// `pwrite` all of `data` at `offset`, in pieces of at most [`WRITE_PIECE`].
pub(crate) fn write_all_at(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let mut pos = offset;
    for piece in data.chunks(WRITE_PIECE) {
        file.write_all_at(piece, pos)?;
        pos += piece.len() as u64;
    }
    Ok(())
}

/// Convert a `u64` length that is already known to fit in memory (it is bounded by a buffer or a
/// chunk size) into `usize`.
pub(crate) fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("length bounded by an in-memory buffer")
}

/// Run a slow blocking call (fsync, which takes milliseconds) on tokio's blocking pool when
/// called inside a tokio runtime, so that it does not stall a worker thread; run it inline
/// otherwise. Fast calls (pread/pwrite on the page cache, open) are made inline instead: the
/// hand-off to the pool and back costs more than they do.
pub(crate) async fn blocking<T, F>(op: &'static str, f: F) -> memsync_core::Result<T>
where
    F: FnOnce() -> memsync_core::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => match handle.spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(memsync_core::StoreError::backend_with(
                format!("{op} was cancelled (runtime shutting down)"),
                e,
            )),
        },
        Err(_) => f(),
    }
}

/// A failed `fsync` is final. The kernel may have dropped the dirty pages it could not write
/// back (and reported the error once), so a later `fsync` can succeed without the data ever
/// reaching the disk. Like PostgreSQL after "fsyncgate", a store whose `fsync` failed once fails
/// every later flush: what it holds is unknown from then on.
#[derive(Debug, Default)]
pub(crate) struct StickyFsync(parking_lot::Mutex<Option<(i32, String)>>);

impl StickyFsync {
    /// The error every flush returns once an `fsync` of `what` failed.
    pub(crate) fn check(&self, what: &str) -> memsync_core::Result<()> {
        match &*self.0.lock() {
            None => Ok(()),
            Some((errno, first)) => Err(memsync_core::StoreError::io(
                "fsync",
                std::io::Error::from_raw_os_error(*errno),
            )
            .context(format!(
                "{what}: an earlier fsync failed ({first}); writes made before it may be lost, so the contents are unknown and no flush can succeed any more"
            ))),
        }
    }

    /// Remember the first failure.
    pub(crate) fn record(&self, e: &memsync_core::StoreError) {
        let mut g = self.0.lock();
        if g.is_none() {
            *g = Some((e.errno(), e.chain()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_pieces_lands_whole_and_in_place() {
        use std::os::unix::fs::FileExt as _;
        let f = tempfile::tempfile().unwrap();
        let n = 3 * WRITE_PIECE + 5;
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8 + 1).collect();
        write_all_at(&f, &data, 4099).unwrap();
        write_all_at(&f, &[], 1).unwrap();
        let mut got = vec![0u8; n + 4099 + 10];
        let read = f.read_at(&mut got, 0).unwrap();
        assert_eq!(read, n + 4099, "the file ends where the write did");
        assert!(is_zero(&got[..4099]));
        assert_eq!(&got[4099..4099 + n], &data[..]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 200]));
        for len in [1usize, 63, 64, 65, 200] {
            for pos in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[pos] = 1;
                assert!(!is_zero(&v), "len {len} pos {pos}");
            }
        }
    }
}
