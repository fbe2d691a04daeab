//! Layers: stores that wrap another store and are stores themselves (the nbdkit-filter idea).
//!
//! - [`Chunked`] accepts any byte range and turns it into aligned, chunk-sized requests for a
//!   store that needs them (one file per chunk, an object store, ...).
//! - [`Stats`] counts operations, bytes and errors and keeps latency histograms
//!   ([`LatencyHistogram`]), rendered as a [`StatsSnapshot`] or in the Prometheus text format.
//! - [`Inject`] delays, stalls and fails calls on command, for tests ([`InjectControl`]).
//!
//! Every layer is generic over its inner store, so layers stack in any order and work over a
//! type-erased [`DynStore`](crate::DynStore) too:
//!
//! ```no_run
//! use std::sync::Arc;
//! use memsync_core::layers::{Chunked, Inject, Stats};
//! use memsync_core::{DynStore, StoreExt};
//! # async fn demo(dir_store: DynStore) -> memsync_core::Result<()> {
//! let fault = Inject::new(dir_store);
//! let control = fault.control();
//! let stats = Stats::new(Chunked::new(fault, 64 << 10)?);
//! let metrics = stats.handle();
//! let store: DynStore = Arc::new(stats);
//!
//! control.fail_next(memsync_core::layers::OpSet::READ, 1);
//! assert!(store.read_bytes(100, 10).await.is_err());
//! println!("{}", metrics.render_prometheus("memsync_store", r#"store="cache""#));
//! # Ok(()) }
//! ```
//!
//! Errors that come from below a layer are wrapped with context ([`StoreError::context`]), so the
//! final error's [`StoreError::chain`] says what each layer was doing and [`StoreError::root`] is
//! the original failure. Errors about the request itself (out of range, misaligned, read-only,
//! unsupported) are returned unwrapped, so callers can match on them directly.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use crate::error::StoreError;
use crate::store::{Extent, ExtentKind};

pub mod chunked;
pub mod inject;
pub mod stats;

pub use chunked::Chunked;
pub use inject::{Inject, InjectAction, InjectControl, InjectError, InjectRule, RuleId};
pub use stats::{LatencyHistogram, OpStats, Stats, StatsHandle, StatsSnapshot};

/// The kinds of [`Store`](crate::Store) operation, as layers count and filter them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// [`Store::read`](crate::Store::read).
    Read,
    /// [`Store::write`](crate::Store::write).
    Write,
    /// [`Store::flush`](crate::Store::flush).
    Flush,
    /// [`Store::trim`](crate::Store::trim).
    Trim,
    /// [`Store::write_zeroes`](crate::Store::write_zeroes).
    Zero,
    /// [`Store::extents`](crate::Store::extents).
    Extents,
}

impl OpKind {
    /// Number of kinds.
    pub const COUNT: usize = 6;
    /// Every kind, in declaration order (`ALL[k.index()] == k`).
    pub const ALL: [OpKind; OpKind::COUNT] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Trim,
        OpKind::Zero,
        OpKind::Extents,
    ];

    /// Lower-case name, as used in metric labels and error messages (`"read"`, `"zero"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::Zero => "zero",
            OpKind::Extents => "extents",
        }
    }

    /// Position in [`OpKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The operation modifies data (write, trim, zero).
    pub const fn is_write(self) -> bool {
        matches!(self, OpKind::Write | OpKind::Trim | OpKind::Zero)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`OpKind`]s, combined with `|`: `OpSet::READ | OpSet::WRITE`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OpSet(u8);

impl OpSet {
    /// No operation.
    pub const NONE: OpSet = OpSet(0);
    /// Reads.
    pub const READ: OpSet = OpSet::of(OpKind::Read);
    /// Writes.
    pub const WRITE: OpSet = OpSet::of(OpKind::Write);
    /// Flushes.
    pub const FLUSH: OpSet = OpSet::of(OpKind::Flush);
    /// Trims.
    pub const TRIM: OpSet = OpSet::of(OpKind::Trim);
    /// Write-zeroes.
    pub const ZERO: OpSet = OpSet::of(OpKind::Zero);
    /// Extent queries.
    pub const EXTENTS: OpSet = OpSet::of(OpKind::Extents);
    /// Everything that modifies data: write, trim and zero.
    pub const MODIFY: OpSet = OpSet(OpSet::WRITE.0 | OpSet::TRIM.0 | OpSet::ZERO.0);
    /// Every operation.
    pub const ALL: OpSet = OpSet((1 << OpKind::COUNT) - 1);

    /// The set holding just `op`.
    pub const fn of(op: OpKind) -> OpSet {
        OpSet(1 << op as u8)
    }

    /// `op` is in the set.
    pub const fn contains(self, op: OpKind) -> bool {
        self.0 & (1 << op as u8) != 0
    }

    /// The set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kinds in the set, in [`OpKind::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = OpKind> {
        OpKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

impl From<OpKind> for OpSet {
    fn from(op: OpKind) -> Self {
        OpSet::of(op)
    }
}

impl BitOr for OpSet {
    type Output = OpSet;
    fn bitor(self, rhs: OpSet) -> OpSet {
        OpSet(self.0 | rhs.0)
    }
}

impl BitOr<OpKind> for OpSet {
    type Output = OpSet;
    fn bitor(self, rhs: OpKind) -> OpSet {
        self | OpSet::of(rhs)
    }
}

impl BitOrAssign for OpSet {
    fn bitor_assign(&mut self, rhs: OpSet) {
        self.0 |= rhs.0;
    }
}

impl FromIterator<OpKind> for OpSet {
    fn from_iter<I: IntoIterator<Item = OpKind>>(iter: I) -> Self {
        iter.into_iter().fold(OpSet::NONE, |s, k| s | k)
    }
}

impl fmt::Debug for OpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Errors that describe the request rather than a failure below it; layers pass them up
/// without context so callers can match on the variant.
pub(crate) fn is_request_error(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::OutOfRange { .. }
            | StoreError::Misaligned { .. }
            | StoreError::ReadOnly
            | StoreError::Unsupported { .. }
    )
}

/// Turn whatever extents a store returned for a range that contains `offset..end` into a sorted,
/// gap-free, non-overlapping list covering exactly `offset..end`, with neighbours of the same
/// kind merged. Gaps (which a correct store never leaves) are reported as data, the safe answer.
pub(crate) fn normalize_extents(mut raw: Vec<Extent>, offset: u64, end: u64) -> Vec<Extent> {
    raw.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(raw.len().min(1024));
    let push = |out: &mut Vec<Extent>, offset: u64, end: u64, kind: ExtentKind| {
        if end <= offset {
            return;
        }
        match out.last_mut() {
            Some(last) if last.kind == kind && last.end() == offset => last.len = end - last.offset,
            _ => out.push(Extent {
                offset,
                len: end - offset,
                kind,
            }),
        }
    };
    let mut cursor = offset;
    for e in raw {
        let start = e.offset.max(cursor);
        let stop = e.offset.saturating_add(e.len).min(end);
        if stop <= start {
            continue;
        }
        push(&mut out, cursor, start, ExtentKind::Data);
        push(&mut out, start, stop, e.kind);
        cursor = stop;
        if cursor >= end {
            break;
        }
    }
    push(&mut out, cursor, end, ExtentKind::Data);
    out
}

#[cfg(test)]
pub(crate) mod test_store {
    //! A tiny in-memory store for the layer tests, with a configurable block size that it
    //! enforces strictly, so tests prove the layers above never send a misaligned request.

    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use parking_lot::Mutex;

    use crate::error::{Result, StoreError};
    use crate::store::{Caps, Extent, ExtentKind, Store, check_range};

    #[derive(Debug)]
    pub(crate) struct VecStore {
        data: Mutex<Vec<u8>>,
        caps: Caps,
        /// Yield to the scheduler inside every call, so concurrent callers interleave.
        yield_io: bool,
        /// Requests rejected as misaligned (must stay 0 under a correct layer).
        pub misaligned: AtomicU64,
        /// Calls received, of any kind.
        pub calls: AtomicU64,
        /// Bytes moved by read and write calls.
        pub io_bytes: AtomicU64,
    }

    impl VecStore {
        /// A zero-filled store of `size` bytes that requires `block_size` alignment (a short
        /// last block, ending exactly at `size`, is allowed, like a short last chunk file).
        pub(crate) fn new(size: u64, block_size: u64) -> Self {
            let caps = Caps {
                block_size,
                preferred_io: block_size.max(4096),
                trim: true,
                fast_zero: true,
                extents: true,
                ..Caps::basic()
            };
            VecStore {
                data: Mutex::new(vec![0; size as usize]),
                caps,
                yield_io: true,
                misaligned: AtomicU64::new(0),
                calls: AtomicU64::new(0),
                io_bytes: AtomicU64::new(0),
            }
        }

        pub(crate) fn with_caps(mut self, f: impl FnOnce(&mut Caps)) -> Self {
            f(&mut self.caps);
            self
        }

        pub(crate) fn contents(&self) -> Vec<u8> {
            self.data.lock().clone()
        }

        fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if write && self.caps.read_only {
                return Err(StoreError::ReadOnly);
            }
            let size = self.size();
            check_range(size, 1, offset, len)?;
            let bs = self.caps.block_size.max(1);
            if !offset.is_multiple_of(bs) || (!len.is_multiple_of(bs) && offset + len != size) {
                self.misaligned.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Misaligned {
                    offset,
                    len,
                    align: bs,
                });
            }
            Ok(())
        }

        async fn pause(&self) {
            if self.yield_io {
                tokio::task::yield_now().await;
            }
        }
    }

    #[async_trait]
    impl Store for VecStore {
        fn size(&self) -> u64 {
            self.data.lock().len() as u64
        }
        fn caps(&self) -> Caps {
            self.caps
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.check(offset, buf.len() as u64, false)?;
            self.pause().await;
            let o = offset as usize;
            buf.copy_from_slice(&self.data.lock()[o..o + buf.len()]);
            self.io_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
            self.check(offset, data.len() as u64, true)?;
            self.pause().await;
            let o = offset as usize;
            self.data.lock()[o..o + data.len()].copy_from_slice(&data);
            self.io_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<()> {
            if !self.caps.trim {
                return Err(StoreError::Unsupported { op: "trim" });
            }
            self.write_zeroes(offset, len).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.check(offset, len, true)?;
            self.pause().await;
            let o = offset as usize;
            self.data.lock()[o..o + len as usize].fill(0);
            Ok(())
        }
        async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.check(offset, len, false)?;
            let data = self.data.lock();
            let g = self.caps.block_size.max(16);
            let mut out: Vec<Extent> = Vec::new();
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let stop = (crate::range::align_down(pos, g) + g).min(end);
                let zero = data[pos as usize..stop as usize].iter().all(|b| *b == 0);
                let kind = if zero {
                    ExtentKind::Hole
                } else {
                    ExtentKind::Data
                };
                match out.last_mut() {
                    Some(l) if l.kind == kind => l.len += stop - pos,
                    _ => out.push(Extent {
                        offset: pos,
                        len: stop - pos,
                        kind,
                    }),
                }
                pos = stop;
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Caps, Store};
    use crate::{Bytes, Result};
    use test_store::VecStore;

    /// Forwards only the required methods, so the trait's default `write_zeroes` runs.
    #[derive(Debug)]
    struct Plain(VecStore);

    #[async_trait::async_trait]
    impl Store for Plain {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn caps(&self) -> Caps {
            self.0.caps()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(offset, buf).await
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
            self.0.write(offset, data).await
        }
        async fn flush(&self) -> Result<()> {
            self.0.flush().await
        }
    }

    #[tokio::test]
    async fn default_write_zeroes_respects_odd_and_huge_blocks() {
        for block in [3 * 4096, 4 << 20, 1000] {
            let store = Plain(VecStore::new(block * 5, block));
            store
                .write(0, Bytes::from(vec![7u8; (block * 5) as usize]))
                .await
                .unwrap();
            store.write_zeroes(block, block * 3).await.unwrap();
            let data = store.0.contents();
            let b = block as usize;
            assert!(data[..b].iter().all(|x| *x == 7), "block {block}");
            assert!(data[b..4 * b].iter().all(|x| *x == 0), "block {block}");
            assert!(data[4 * b..].iter().all(|x| *x == 7), "block {block}");
        }
    }

    #[test]
    fn opset() {
        let s = OpSet::READ | OpKind::Write;
        assert!(s.contains(OpKind::Read) && s.contains(OpKind::Write) && !s.contains(OpKind::Trim));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![OpKind::Read, OpKind::Write]
        );
        assert_eq!(OpSet::ALL.iter().count(), OpKind::COUNT);
        assert_eq!(format!("{s:?}"), "{Read, Write}");
        for (i, k) in OpKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        assert!(OpSet::MODIFY.contains(OpKind::Zero) && !OpSet::MODIFY.contains(OpKind::Read));
    }

    #[test]
    fn normalize() {
        let d = |offset, len| Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        };
        let h = |offset, len| Extent {
            offset,
            len,
            kind: ExtentKind::Hole,
        };
        // Clipped to the range, neighbours merged.
        assert_eq!(
            normalize_extents(vec![d(0, 10), d(10, 10), h(20, 10)], 5, 25),
            vec![d(5, 15), h(20, 5)]
        );
        // Gaps become data, overlaps are cut.
        assert_eq!(
            normalize_extents(vec![h(0, 4), h(8, 4), h(2, 4)], 0, 14),
            vec![h(0, 6), d(6, 2), h(8, 4), d(12, 2)]
        );
        assert_eq!(normalize_extents(vec![], 3, 9), vec![d(3, 6)]);
    }
}
