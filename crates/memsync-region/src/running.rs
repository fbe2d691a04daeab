//! [`Running`]: a built [`Core`] with its threads. Both region kinds start
//! and stop their engine here ([`LazyRegion`](crate::LazyRegion) over its
//! own memory, [`ForeignRegion`](crate::ForeignRegion) over another
//! process's), so the handler, staging, evictor and puller threads are
//! spawned and joined in one place.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::RegionConfig;
use crate::engine::Engine;
use crate::error::{Error, sys};
use crate::exec::Exec;
use crate::fault::Core;
use crate::puller::Puller;
use crate::worker::{Worker, new_staging, staging_layout};

/// A core, its background pull and the threads serving them. Dropping it
/// stops and joins the threads.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) core: Arc<Core>,
    pub(crate) pull: Arc<Puller>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// Starts the threads of `core`: the fault handlers, the staging helper
    /// (when installs move pages), the evictor (under a budget) and the
    /// pullers of `pull`.
    pub(crate) fn start(core: Core, pull: Arc<Puller>, cfg: &RegionConfig) -> Result<Self, Error> {
        // Threads started before a failure are stopped and joined by the drop.
        let mut run = Self {
            core: Arc::new(core),
            pull,
            threads: Vec::new(),
        };
        let chunk = run.core.geo.chunk_size();
        let rt = cfg.runtime.as_ref();
        let workers = (0..cfg.handler_threads.max(1))
            .map(|_| Worker::new(chunk, rt, cfg.store_spin))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(sys("creating a handler"))?;
        let spinning = if cfg.spin.is_zero() {
            0
        } else {
            cfg.spin_threads
        };
        let handlers = Engine::spawn_handlers(&run.core, workers, cfg.pin_handlers, spinning)
            .map_err(|(started, e)| {
                run.threads.extend(started);
                e
            });
        run.threads
            .extend(handlers.map_err(sys("spawning a fault-handler thread"))?);
        if run.core.use_move.load(Ordering::Relaxed) {
            run.start_stager(chunk)?;
        }
        if run.core.budget.enabled {
            let exec =
                Exec::new(rt, Duration::ZERO).map_err(sys("creating the evictor's runtime"))?;
            let core = Arc::clone(&run.core);
            run.spawn("memsync-evict", "spawning the evictor thread", move || {
                core.evictor_main(&exec);
            })?;
        }
        for _ in 0..cfg.pull_threads.max(1) {
            // Background work does not spin: nobody waits for it.
            let w = Worker::new(chunk, rt, Duration::ZERO).map_err(sys("creating the puller"))?;
            let (core, pull) = (Arc::clone(&run.core), Arc::clone(&run.pull));
            run.spawn("memsync-pull", "spawning the puller thread", move || {
                pull.run(&core, w);
            })?;
        }
        Ok(run)
    }

    /// Spare staging buffers, populated ahead by a helper thread: up to
    /// 16 MiB, at most 4 buffers.
    fn start_stager(&mut self, chunk: usize) -> Result<(), Error> {
        let (blen, _) = staging_layout(chunk);
        let spares = if blen <= 8 << 20 {
            ((16 << 20) / blen).clamp(1, 4)
        } else {
            0
        };
        if spares == 0 {
            return Ok(());
        }
        {
            let mut empty = self.core.stage.empty.lock();
            for _ in 0..spares {
                empty.push(new_staging(chunk).map_err(sys("mapping a staging buffer"))?);
            }
        }
        let core = Arc::clone(&self.core);
        self.spawn("memsync-stage", "spawning the staging thread", move || {
            core.stage.stager_main(&|| core.stopping());
        })
    }

    fn spawn(
        &mut self,
        name: &str,
        what: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), Error> {
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(sys(what))?;
        self.threads.push(h);
        Ok(())
    }

    /// Stops the threads (cancelling store reads in progress) and joins
    /// them. Waiting faults are woken and resolve as ordinary faults.
    pub(crate) fn stop(&mut self) {
        let core = &self.core;
        core.engine.stop();
        self.pull.notify();
        core.budget.notify();
        {
            let _e = core.stage.empty.lock();
            core.stage.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The accessors both region kinds offer, over their `run: Running`.
macro_rules! engine_accessors {
    () => {
        /// The chunk layout.
        #[must_use]
        pub fn geometry(&self) -> $crate::Geometry {
            self.run.core.geo
        }

        /// Number of present chunks (installed by a fault, the puller or a
        /// driver).
        #[must_use]
        pub fn present_count(&self) -> usize {
            self.run.core.chunks.present_count()
        }

        /// Whether every chunk is present.
        #[must_use]
        pub fn is_complete(&self) -> bool {
            self.present_count() == self.run.core.chunks.len()
        }

        /// Live counters and latency histograms.
        #[must_use]
        pub fn stats(&self) -> &$crate::RegionStats {
            &self.run.core.stats
        }

        /// The most recent chunk failure.
        #[must_use]
        pub fn last_error(&self) -> Option<$crate::ChunkError> {
            self.run.core.errors.lock().last().cloned()
        }

        /// Every chunk failure so far, oldest first.
        #[must_use]
        pub fn errors(&self) -> Vec<$crate::ChunkError> {
            self.run.core.errors.lock().clone()
        }

        /// Starts (or restarts from scratch, retrying chunks it gave up on)
        /// the background pull.
        pub fn start_pull(&self) {
            self.run.pull.start();
        }

        /// Pauses the background pull after the chunk in progress.
        pub fn pause_pull(&self) {
            self.run.pull.pause();
        }

        /// Resumes a paused background pull where it stopped.
        pub fn resume_pull(&self) {
            self.run.pull.resume();
        }

        /// Background pull progress.
        #[must_use]
        pub fn progress(&self) -> $crate::PullProgress {
            self.run.pull.progress(&self.run.core)
        }

        /// Waits until the background pull has nothing left to do (`true`),
        /// or `timeout` passes (`false`).
        pub fn wait_pull(&self, timeout: std::time::Duration) -> bool {
            self.run.pull.wait(timeout)
        }
    };
}
pub(crate) use engine_accessors;
