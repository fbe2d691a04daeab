//! Operations for drivers: install data that arrived from elsewhere
//! ([`Core::place`]) and drop chunks so that the next touch fetches them
//! again ([`Core::drop_chunks`]).
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

/// Tests make [`Core::zap`] of the region mapped at this address fail, to reach the error
/// paths of its callers (0: none).
#[cfg(test)]
pub(crate) static FAIL_ZAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

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
        if self.cfg.shared {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "place on a Backing::Shared region: its memory is the source's",
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

    /// Drops the pages of the chunks of `range` (any local writes with
    /// them); they become absent and their next touch fetches them from the
    /// source. Waits for a fetch or place in progress to settle first. One
    /// `madvise` (and so one `REMOVE` event to wait for) per run of
    /// neighbouring chunks, not one per chunk: a migration's
    /// switch-over drops thousands of chunks while the application is
    /// suspended, and each round trip through a handler thread costs tens
    /// of microseconds here. Returns how many chunks were dropped (poisoned
    /// ones are left as they are).
    pub(crate) fn drop_chunks(&self, range: std::ops::Range<usize>) -> io::Result<usize> {
        let mut run: Vec<(usize, ChunkState)> = Vec::new();
        let mut dropped = 0;
        for i in range {
            let mut nap = Duration::from_micros(1);
            loop {
                match self.chunks.apply(i, &ChunkState::DROP) {
                    Ok(prev) => {
                        run.push((i, prev));
                        break;
                    }
                    Err(ChunkState::Poisoned) => {
                        dropped += self.drop_run(&mut run)?;
                        break;
                    }
                    Err(_) => {
                        // Fetching or dropping: wait for the owner. The
                        // chunks of the run are owned meanwhile; a fault on
                        // them waits, as it would for their fetch.
                        if self.stopping() {
                            self.undo_drop(&mut run);
                            return Err(io::Error::other("the region is shutting down"));
                        }
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(Duration::from_millis(1));
                    }
                }
            }
        }
        dropped += self.drop_run(&mut run)?;
        Ok(dropped)
    }

    /// Drops the pages of `run` (neighbouring chunks the caller owns) at
    /// once, and empties it.
    fn drop_run(&self, run: &mut Vec<(usize, ChunkState)>) -> io::Result<usize> {
        let (Some(&(first, _)), Some(&(last, _))) = (run.first(), run.last()) else {
            return Ok(0);
        };
        let (off, _, _) = self.geo.chunk(first);
        let (last_off, _, last_len) = self.geo.chunk(last);
        let len = last_off + last_len - off;
        if let Err(e) = self.zap_span(first..last + 1, off, len) {
            self.undo_drop(run);
            return Err(e);
        }
        for &(i, _) in run.iter() {
            inc(&self.stats.chunks_dropped);
            let _ = self.chunks.apply(i, &ChunkState::DROPPED);
        }
        // Faults that came in while the pages were going waited: they fault
        // again and fetch their chunk.
        let _ = self.engine.uffd.wake(self.base() + off, len);
        let n = run.len();
        run.clear();
        Ok(n)
    }

    /// Gives the chunks of `run` back as they were before the drop.
    fn undo_drop(&self, run: &mut Vec<(usize, ChunkState)>) {
        for (i, prev) in run.drain(..) {
            let t = if prev == ChunkState::Present {
                &ChunkState::KEEP
            } else {
                &ChunkState::DROPPED
            };
            let _ = self.chunks.apply(i, t);
            let (off, _, len) = self.geo.chunk(i);
            let _ = self.engine.uffd.wake(self.base() + off, len);
        }
    }

    /// Drops the pages of chunk `i`, which the caller owns (`Dropping`),
    /// and waits until a handler has seen the `REMOVE` event.
    pub(crate) fn zap(&self, i: usize) -> io::Result<()> {
        #[cfg(test)]
        if FAIL_ZAP.load(std::sync::atomic::Ordering::SeqCst) == self.base() {
            return Err(io::Error::other("zap failed (test)"));
        }
        let (off, _, inst_len) = self.geo.chunk(i);
        self.zap_span(i..i + 1, off, inst_len)
    }

    /// Drops the pages of `chunks` (owned by the caller, `Dropping`), which
    /// span `off..off + len`, and waits until a handler has seen the
    /// `REMOVE` event for each.
    fn zap_span(&self, chunks: std::ops::Range<usize>, off: usize, len: usize) -> io::Result<()> {
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
        for i in chunks.clone() {
            self.remove_ack.clear(i);
        }
        self.engine.map.advise(off, len, advice)?;
        if self.engine.uffd.features().contains(Features::EVENT_REMOVE) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            for i in chunks {
                while !self.remove_ack.get(i) {
                    if self.stopping() || std::time::Instant::now() > deadline {
                        tracing::warn!(
                            chunk = i,
                            "memsync-region: no REMOVE event seen for a dropped chunk"
                        );
                        return Ok(());
                    }
                    std::thread::yield_now();
                }
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
            // Under the chunk's stripe: a handler lifting a stale fault's protection has
            // finished its ioctl, or will see the bit (see `Core::protect_locks`).
            {
                let _g = self.protect_lock(i).lock();
                self.protected.set(i);
            }
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
