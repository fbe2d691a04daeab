//! The budget: a region holds at most N bytes resident. An evictor thread
//! picks chunks by clock (second chance for chunks installed since the
//! hand last passed), drops clean ones first, and writes dirty ones back
//! to the [`ChunkSource`](crate::ChunkSource) before dropping them.
//!
//! Under a budget every chunk is installed write-protected (synchronous
//! userfaultfd WP): the first write to a chunk faults once, which marks it
//! dirty and lifts the protection. To evict a dirty chunk the evictor owns
//! it (`Dropping`), protects it again, so writers wait in a fault, copies
//! and writes it back, then drops it; the waiting writers fault the chunk
//! back in from the source, which has their earlier writes. A write is
//! therefore never lost to an eviction. The budget is enforced after each
//! install by the evictor thread, so residency can exceed it by the chunks
//! being installed meanwhile.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use memsync_core::Bytes;
use memsync_core::chunks::AtomicChunkBitmap;
use parking_lot::{Condvar, Mutex};

use crate::exec::Exec;
use crate::fault::Core;
use crate::installer::Step;
use crate::state::ChunkState;
use crate::stats::inc;

/// The budget's state.
#[derive(Debug)]
pub(crate) struct Budget {
    /// Whether the region was built with a budget (installs write-protect).
    pub(crate) enabled: bool,
    /// At most this many chunks resident (`usize::MAX`: no limit).
    pub(crate) limit: AtomicUsize,
    referenced: AtomicChunkBitmap,
    /// Written since installed or written back.
    pub(crate) dirty: AtomicChunkBitmap,
    hand: Mutex<usize>,
    lock: Mutex<()>,
    cv: Condvar,
    /// The source refused a write-back: evict clean chunks only.
    no_write_back: AtomicBool,
}

impl Budget {
    pub(crate) fn new(chunks: usize, limit: Option<usize>) -> Self {
        Self {
            enabled: limit.is_some(),
            limit: AtomicUsize::new(limit.unwrap_or(usize::MAX)),
            referenced: AtomicChunkBitmap::new(chunks),
            dirty: AtomicChunkBitmap::new(chunks),
            hand: Mutex::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            no_write_back: AtomicBool::new(false),
        }
    }

    /// Chunk `i` was claimed to be filled: it is clean. (Cleared now, while
    /// its pages are missing: a write to a page of the fill, once
    /// installed, must leave it dirty.)
    pub(crate) fn claimed(&self, i: usize) {
        if self.enabled {
            self.dirty.clear(i);
        }
    }

    /// Chunk `i` was installed; wakes the evictor if the region is over its
    /// budget.
    pub(crate) fn installed(&self, i: usize, present: usize) {
        if !self.enabled {
            return;
        }
        self.referenced.set(i);
        if present > self.limit.load(Ordering::Relaxed) {
            self.notify();
        }
    }

    pub(crate) fn notify(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

impl Core {
    /// The evictor thread: keeps the region within its budget.
    pub(crate) fn evictor_main(&self, exec: &Exec) {
        loop {
            {
                let mut g = self.budget.lock.lock();
                if self.stopping() {
                    return;
                }
                if !self.over_budget() {
                    self.budget.cv.wait_for(&mut g, Duration::from_millis(100));
                    continue;
                }
            }
            while self.over_budget() && !self.stopping() {
                match self.evict_one(exec) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Nothing evictable now (all being filled, or dirty
                        // without write-back): look again later.
                        std::thread::sleep(Duration::from_millis(1));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "memsync-region: eviction failed");
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
    }

    fn over_budget(&self) -> bool {
        self.chunks.present_count() > self.budget.limit.load(Ordering::Relaxed)
    }

    /// Evicts one chunk chosen by the clock, clean ones first. `Ok(false)`
    /// if none could be.
    pub(crate) fn evict_one(&self, exec: &Exec) -> io::Result<bool> {
        let n = self.chunks.len();
        let dirty_ok = !self.budget.no_write_back.load(Ordering::Relaxed);
        let pick = {
            let mut hand = self.budget.hand.lock();
            let mut clean = None;
            let mut dirty = None;
            for _ in 0..2 * n {
                let i = *hand;
                *hand = (i + 1) % n;
                if self.chunks.get(i) != ChunkState::Present {
                    continue;
                }
                if self.budget.referenced.clear(i) {
                    continue;
                }
                if !self.budget.dirty.get(i) {
                    clean = Some(i);
                    break;
                }
                if dirty_ok && dirty.is_none() {
                    dirty = Some(i);
                }
            }
            clean.or(dirty)
        };
        match pick {
            Some(i) => self.evict_chunk(i, exec),
            None => Ok(false),
        }
    }

    /// Evicts chunk `i` if it is present: writes it back first if dirty.
    fn evict_chunk(&self, i: usize, exec: &Exec) -> io::Result<bool> {
        if self.chunks.apply(i, &ChunkState::EVICT).is_err() {
            return Ok(false);
        }
        // Pairs with `on_wp_fault`, which marks the chunk dirty before it
        // looks for `Dropping`: either the write is seen here, or the writer
        // is held until the chunk is gone.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (off, data_len, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        if self.budget.dirty.get(i) {
            // Writers wait in a fault from here on (the chunk is dropping).
            self.protect_now(dst, inst_len, true)?;
            let mut buf = vec![0u8; data_len];
            self.engine.map.read_at(off, &mut buf);
            if let Err(e) = exec.block_on(self.source.write_back(off as u64, Bytes::from(buf))) {
                let _ = self.chunks.apply(i, &ChunkState::KEEP);
                // Release the writers held meanwhile.
                let _ = self.protect_now(dst, inst_len, false);
                if matches!(e, memsync_core::StoreError::Unsupported { .. }) {
                    self.budget.no_write_back.store(true, Ordering::Relaxed);
                }
                return Err(io::Error::other(format!(
                    "writing back chunk {i}: {}",
                    e.chain()
                )));
            }
            inc(&self.stats.chunks_written_back);
        }
        self.zap(i)?;
        self.budget.dirty.clear(i);
        inc(&self.stats.chunks_evicted);
        let _ = self.chunks.apply(i, &ChunkState::DROPPED);
        let _ = self.engine.uffd.wake(dst, inst_len);
        Ok(true)
    }

    /// `UFFDIO_WRITEPROTECT` from a thread that is not a handler: a pending
    /// event (`EAGAIN`) is read by the handlers, so try again.
    pub(crate) fn protect_now(&self, dst: usize, len: usize, on: bool) -> io::Result<()> {
        let inst = self.installer();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match inst.write_protect(dst, len, on)? {
                Step::Done => return Ok(()),
                Step::Again { .. } if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Step::Again { .. } => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "UFFDIO_WRITEPROTECT kept returning EAGAIN",
                    ));
                }
            }
        }
    }
}
