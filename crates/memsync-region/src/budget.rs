//! The budget's state: a region holds at most N bytes resident. The fault
//! path reports claims and installs here; the evictor (`evictor.rs`) reads
//! it to pick chunks, drops clean ones first and writes dirty ones back to
//! the [`ChunkSource`](crate::ChunkSource) before dropping them.
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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memsync_core::chunks::AtomicChunkBitmap;
use parking_lot::{Condvar, Mutex};

/// The budget's state.
#[derive(Debug)]
pub(crate) struct Budget {
    /// Whether the region was built with a budget (installs write-protect).
    pub(crate) enabled: bool,
    /// At most this many chunks resident (`usize::MAX`: no limit).
    pub(crate) limit: AtomicUsize,
    pub(crate) referenced: AtomicChunkBitmap,
    /// Written since installed or written back.
    pub(crate) dirty: AtomicChunkBitmap,
    pub(crate) hand: Mutex<usize>,
    pub(crate) lock: Mutex<()>,
    pub(crate) cv: Condvar,
    /// The source refused a write-back: evict clean chunks only.
    pub(crate) no_write_back: AtomicBool,
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
