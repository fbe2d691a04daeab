//! Operations for drivers: install data that arrived from elsewhere
//! ([`Core::place`]) and drop chunks so that the next touch fetches them
//! again ([`Core::drop_chunk`]).
//!
//! Both own the chunk through the chunk table while they change its memory,
//! so they race safely with faults, the puller and each other: of a fetch
//! and a place of one chunk exactly one installs, and a fault waiting on
//! the chunk is woken once it is settled.

use std::io;
use std::time::Duration;

use memsync_sys::{Advice, Features};

use crate::config::WriteTracking;
use crate::fault::Core;
use crate::installer::Step;
use crate::state::ChunkState;
use crate::stats::inc;
use crate::worker::Worker;

impl Core {
    /// Installs `data` as chunk `i` if the chunk is absent. `Ok(true)`: this
    /// call installed it; `Ok(false)`: the chunk was not absent (present,
    /// being fetched or placed by another party, dropping or poisoned) and
    /// nothing was changed.
    pub(crate) fn place(&self, w: &mut Worker, i: usize, data: &[u8]) -> io::Result<bool> {
        let (off, data_len, inst_len) = self.geo.chunk(i);
        if data.len() != data_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunk {i} holds {data_len} bytes, {} were placed",
                    data.len()
                ),
            ));
        }
        if self.chunks.try_claim(i).is_err() {
            return Ok(false);
        }
        self.budget.claimed(i);
        let buf = w.buf(inst_len);
        buf[..data_len].copy_from_slice(data);
        buf[data_len..].fill(0);
        let dst = self.base() + off;
        let r = self.install(w, off, dst, inst_len, self.how(), self.wp_for(i));
        match r {
            Ok(()) => {
                inc(&self.stats.chunks_placed);
                if self.chunks.finish(i) {
                    self.budget.installed(i, self.chunks.present_count());
                }
                let _ = self.engine.uffd.wake(dst, inst_len);
                Ok(true)
            }
            Err(e) => {
                self.chunks.abandon(i);
                let _ = self.engine.uffd.wake(dst, inst_len);
                Err(e)
            }
        }
    }

    /// Drops the pages of chunk `i` (any local writes with them); the chunk
    /// becomes absent and its next touch fetches it from the source. Waits
    /// for a fetch or place in progress to settle first. `Ok(false)` for a
    /// poisoned chunk (left as it is). `before_drop` runs while the chunk is
    /// owned and its pages are still there (the evictor writes it back):
    /// an error keeps the chunk present.
    pub(crate) fn drop_chunk(
        &self,
        i: usize,
        before_drop: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<bool> {
        let mut nap = Duration::from_micros(1);
        loop {
            match self.chunks.apply(i, &ChunkState::DROP) {
                Ok(prev) => return self.dropping(i, prev, before_drop).map(|()| true),
                Err(ChunkState::Poisoned) => return Ok(false),
                Err(_) => {
                    // Fetching or dropping: wait for the owner.
                    if self.stopping() {
                        return Err(io::Error::other("the region is shutting down"));
                    }
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(1));
                }
            }
        }
    }

    fn dropping(
        &self,
        i: usize,
        prev: ChunkState,
        before_drop: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let (off, _, inst_len) = self.geo.chunk(i);
        let undo = |state: ChunkState| {
            let t = if state == ChunkState::Present {
                &ChunkState::KEEP
            } else {
                &ChunkState::DROPPED
            };
            let _ = self.chunks.apply(i, t);
        };
        if let Err(e) = before_drop() {
            undo(prev);
            return Err(e);
        }
        if let Err(e) = self.zap(i) {
            undo(prev);
            return Err(e);
        }
        inc(&self.stats.chunks_dropped);
        let _ = self.chunks.apply(i, &ChunkState::DROPPED);
        // Faults that came in while the pages were going waited: they fault
        // again and fetch the chunk.
        let _ = self.engine.uffd.wake(self.base() + off, inst_len);
        Ok(())
    }

    /// Drops the pages of chunk `i`, which the caller owns (`Dropping`),
    /// and waits until a handler has seen the `REMOVE` event.
    pub(crate) fn zap(&self, i: usize) -> io::Result<()> {
        let (off, _, inst_len) = self.geo.chunk(i);
        // memfd: MADV_DONTNEED would keep the data in the page cache (the
        // next touch maps it again); punch it out instead.
        let advice = if self.cfg.memfd {
            Advice::Remove
        } else {
            Advice::DontNeed
        };
        // This raises a REMOVE event, which a handler thread must read
        // before the call returns. The handler leaves a dropping chunk
        // alone but acknowledges it: until then the chunk stays dropping, so
        // a late event cannot invalidate the chunk after it was fetched
        // again.
        self.remove_ack.clear(i);
        self.engine.map.advise(off, inst_len, advice)?;
        if self.engine.uffd.features().contains(Features::EVENT_REMOVE) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.remove_ack.get(i) {
                if self.stopping() || std::time::Instant::now() > deadline {
                    tracing::warn!(
                        chunk = i,
                        "memsync-region: no REMOVE event seen for a dropped chunk"
                    );
                    break;
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Write-protects (`on`) or releases chunk `i` for a driver
    /// ([`WriteTracking::Protect`]). Protection of a chunk that is being
    /// filled waits for the fill (which may not have seen the protection
    /// bit); an absent chunk is installed protected when it is fetched.
    /// Releasing wakes writers held by [`WpAction::Hold`].
    pub(crate) fn set_protection(&self, i: usize, on: bool) -> io::Result<()> {
        if self.tracking != WriteTracking::Protect {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "protect/unprotect need RegionConfig::write_tracking = WriteTracking::Protect",
            ));
        }
        let (off, _, inst_len) = self.geo.chunk(i);
        let dst = self.base() + off;
        if on {
            self.protected.set(i);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let mut nap = Duration::from_micros(1);
            while matches!(
                self.chunks.get(i),
                ChunkState::Fetching | ChunkState::Dropping
            ) {
                if self.stopping() {
                    return Err(io::Error::other("the region is shutting down"));
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(1));
            }
        } else {
            self.protected.clear(i);
        }
        self.protect_now(dst, inst_len, on)
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
