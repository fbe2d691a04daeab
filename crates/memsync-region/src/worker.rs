//! Per-thread fetch state ([`Worker`]) and the staging buffers whose pages
//! are allocated ahead of time ([`StagePool`]).

use std::io;
use std::time::{Duration, Instant};

use memsync_sys::{PageFaultFlags, Staging, UffdMsg};
use parking_lot::{Condvar, Mutex};

use crate::exec::Exec;
use crate::stats::{RegionStats, inc};

/// Per-thread fetch state: a staging buffer of one chunk, an executor and
/// faults put aside while draining events.
#[derive(Debug)]
pub(crate) struct Worker {
    /// Data is read into `staging[cur..cur + chunk]`; moved pages leave a
    /// hole, so `cur` advances after every move and the buffer is swapped
    /// for a pre-populated one from the [`StagePool`] when used up.
    pub(crate) staging: Staging,
    pub(crate) cur: usize,
    pub(crate) chunk: usize,
    pub(crate) exec: Exec,
    pub(crate) ev: Events,
}

/// A worker's event buffers: apart from its staging buffer, so that an
/// install in progress from the staging buffer can drain events.
#[derive(Debug)]
pub(crate) struct Events {
    pub(crate) msg: [UffdMsg; 1],
    /// Events read while draining: a buffer of its own, because a drain
    /// happens while the message in `msg` is being served.
    pub(crate) drained: Vec<UffdMsg>,
    /// Faults read while draining, served afterwards.
    pub(crate) deferred: Vec<(usize, PageFaultFlags, Instant)>,
}

/// Length of a staging buffer for `chunk`-byte chunks and whether it uses
/// transparent huge pages: one chunk for chunks of a huge page or more
/// (each move takes whole huge pages), otherwise one huge page's worth of
/// small pages that successive chunks are carved from (so refilling the
/// buffer happens once per many small chunks, off the fault path).
pub(crate) fn staging_layout(chunk: usize) -> (usize, bool) {
    let pmd = memsync_sys::pmd_size();
    if chunk >= pmd {
        (chunk, true)
    } else {
        (pmd, false)
    }
}

pub(crate) fn new_staging(chunk: usize) -> io::Result<Staging> {
    let (len, huge) = staging_layout(chunk);
    Staging::with_huge_pages(len, huge)
}

impl Worker {
    pub(crate) fn new(
        chunk: usize,
        handle: Option<&tokio::runtime::Handle>,
        spin: Duration,
    ) -> io::Result<Self> {
        Ok(Self {
            staging: new_staging(chunk)?,
            cur: 0,
            chunk,
            exec: Exec::new(handle, spin)?,
            ev: Events {
                msg: [UffdMsg::default()],
                drained: (0..16).map(|_| UffdMsg::default()).collect(),
                deferred: Vec::new(),
            },
        })
    }

    /// The staging range the next chunk is read into.
    pub(crate) fn buf(&mut self, len: usize) -> &mut [u8] {
        let cur = self.cur;
        &mut self.staging.as_mut_slice()[cur..cur + len]
    }
}

/// Staging buffers whose pages are allocated ahead of time by a helper
/// thread (`MADV_POPULATE_WRITE`), so that a fetch that moves its pages
/// into the region does not also pay for allocating and zeroing the next
/// buffer's pages (for 2 MiB chunks that is as long as reading the data):
/// allocation runs on the other CPU, overlapped with fetches and installs.
#[derive(Debug, Default)]
pub(crate) struct StagePool {
    pub(crate) ready: Mutex<Vec<Staging>>,
    pub(crate) empty: Mutex<Vec<Staging>>,
    pub(crate) cv: Condvar,
}

impl StagePool {
    /// Gives `w` a fresh buffer after its current one was used up: a
    /// pre-populated one if there is one (the used one goes to the helper),
    /// otherwise the used one again (its pages are allocated while it is
    /// filled).
    pub(crate) fn recycle(&self, w: &mut Worker, stats: &RegionStats) {
        w.cur = 0;
        let fresh = self.ready.lock().pop();
        inc(if fresh.is_some() {
            &stats.staging_ready
        } else {
            &stats.staging_cold
        });
        if let Some(b) = fresh {
            let used = std::mem::replace(&mut w.staging, b);
            self.empty.lock().push(used);
            self.cv.notify_one();
        }
    }

    /// Moved pages leave their staging range empty (whether all, some or
    /// none moved): the next chunk is read into the next range.
    pub(crate) fn advance(&self, w: &mut Worker, stats: &RegionStats) {
        w.cur += w.chunk;
        if w.cur + w.chunk > w.staging.len() {
            self.recycle(w, stats);
        }
    }

    /// The helper thread: allocates the pages of used buffers ahead of time
    /// until `stopping()`.
    pub(crate) fn stager_main(&self, stopping: &dyn Fn() -> bool) {
        loop {
            let mut buf = {
                let mut empty = self.empty.lock();
                loop {
                    if stopping() {
                        return;
                    }
                    if let Some(b) = empty.pop() {
                        break b;
                    }
                    self.cv.wait_for(&mut empty, Duration::from_millis(100));
                }
            };
            if let Err(e) = buf.populate() {
                // Only an optimisation: the pages are allocated on use then.
                tracing::debug!(error = %e, "memsync-region: populating a staging buffer failed");
            }
            self.ready.lock().push(buf);
        }
    }
}
