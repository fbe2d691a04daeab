//! Whole-store operations over any [`Store`]: copy one store into another, and checksum a
//! store's contents. `memsync copy`, `memsync checksum` and `memsync demo` are thin calls into
//! them.

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};

use crate::{Result, Store, StoreError};

/// How [`copy`] moves the data.
#[derive(Clone, Copy, Debug)]
pub struct CopyOptions {
    /// Bytes per request.
    pub io_size: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Zero the destination's ranges that read as zeros in the source (holes, zero extents)
    /// with `write_zeroes` instead of reading and writing them.
    pub sparse: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            io_size: 1 << 20,
            concurrency: 8,
            sparse: true,
        }
    }
}

/// Copy `src` to `dst` (at least as large) with `opts.concurrency` requests in flight, then
/// flush `dst`; returns the bytes of data copied (zeroed ranges not counted). `progress` is
/// called with the bytes of each piece done, zeroed ones included.
pub async fn copy(
    src: &dyn Store,
    dst: &dyn Store,
    opts: CopyOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let size = src.size();
    if dst.size() < size {
        return Err(StoreError::Config(format!(
            "destination is smaller ({} bytes) than the source ({} bytes)",
            dst.size(),
            size
        )));
    }
    let io_size = opts.io_size.max(1);
    let mut copied = 0;
    let mut off = 0;
    while off < size {
        let window = (size - off).min(1 << 30);
        let extents = src
            .extents(off, window)
            .await
            .map_err(|e| e.context("reading source extents"))?;
        let mut pieces = Vec::new();
        for e in extents {
            if e.kind.reads_zero() && opts.sparse {
                dst.write_zeroes(e.offset, e.len).await.map_err(|err| {
                    err.context(format!("zeroing {}+{} in destination", e.offset, e.len))
                })?;
                progress(e.len);
                continue;
            }
            let mut p = e.offset;
            while p < e.end() {
                let n = (e.end() - p).min(io_size);
                pieces.push((p, n));
                p += n;
            }
        }
        let mut s = stream::iter(pieces)
            .map(|(p, n)| async move {
                let mut buf = BytesMut::zeroed(n as usize);
                src.read(p, &mut buf)
                    .await
                    .map_err(|e| e.context(format!("reading {p}+{n} from source")))?;
                dst.write(p, buf.freeze())
                    .await
                    .map_err(|e| e.context(format!("writing {p}+{n} to destination")))?;
                Ok::<u64, StoreError>(n)
            })
            .buffer_unordered(opts.concurrency.max(1));
        while let Some(r) = s.next().await {
            let n = r?;
            copied += n;
            progress(n);
        }
        off += window;
    }
    dst.flush()
        .await
        .map_err(|e| e.context("flushing destination"))?;
    Ok(copied)
}

/// BLAKE3 of the store's whole contents, read in 4 MiB pieces with four reads in flight.
/// `progress` is called with the bytes of each piece hashed.
pub async fn checksum(store: &dyn Store, progress: &(dyn Fn(u64) + Sync)) -> Result<blake3::Hash> {
    const PIECE: u64 = 4 << 20;
    let size = store.size();
    let pieces = (0..size.div_ceil(PIECE)).map(|i| (i * PIECE, (size - i * PIECE).min(PIECE)));
    let mut s = stream::iter(pieces)
        .map(|(off, n)| async move {
            let mut buf = BytesMut::zeroed(n as usize);
            store
                .read(off, &mut buf)
                .await
                .map_err(|e| e.context(format!("reading {off}+{n}")))?;
            Ok::<Bytes, StoreError>(buf.freeze())
        })
        .buffered(4);
    let mut h = blake3::Hasher::new();
    while let Some(b) = s.next().await {
        let b = b?;
        h.update(&b);
        progress(b.len() as u64);
    }
    Ok(h.finalize())
}
