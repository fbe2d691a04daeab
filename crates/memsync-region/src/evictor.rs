//! The evictor: keeps a region within its [budget](crate::RegionConfig::budget).
//! It picks chunks by clock (second chance for chunks installed since the
//! hand last passed), drops clean ones first, and writes dirty ones back
//! to the [`ChunkSource`](crate::ChunkSource) before dropping them (see
//! `budget.rs` for why no write is lost). It stands above the fault path
//! and the driver operations it uses (`zap`, `protect_now`); they reach
//! the budget only through its state.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use memsync_core::Bytes;

use crate::exec::Exec;
use crate::fault::Core;
use crate::state::ChunkState;
use crate::stats::inc;

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
    pub(crate) fn evict_chunk(&self, i: usize, exec: &Exec) -> io::Result<bool> {
        if self.chunks.apply(i, &ChunkState::EVICT).is_err() {
            return Ok(false);
        }
        // Pairs with `on_wp_fault`, which marks the chunk dirty before it
        // looks for `Dropping`: either the write is seen here, or the writer
        // is held until the chunk is gone.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (off, _, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        let r = self.write_back_and_drop(i, exec);
        if r.is_err() && self.chunks.get(i) == ChunkState::Dropping {
            // Writers held by the dropping chunk wait for this wake; the chunk stays present
            // (and dirty, if it was: its write-back may not have happened).
            let _ = self.chunks.apply(i, &ChunkState::KEEP);
            let _ = self.engine.uffd.wake(dst, inst_len);
        }
        r
    }

    /// The part of [`evict_chunk`](Self::evict_chunk) after the chunk was taken: on an error
    /// the chunk may still be `Dropping`, and the caller gives it back.
    fn write_back_and_drop(&self, i: usize, exec: &Exec) -> io::Result<bool> {
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
}
