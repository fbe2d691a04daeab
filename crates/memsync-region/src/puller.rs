//! The background puller: threads that fetch the chunks nobody asked for
//! yet, in the order of a [`PullPriority`], yielding to faults.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::engine::Engine;
use crate::fault::{Core, Fetcher, NO_FAULT};
use crate::pull::{PullPriority, PullView};
use memsync_core::chunks::PullProgress;

#[derive(Debug, Default)]
pub(crate) struct PullState {
    pub(crate) running: bool,
    pub(crate) done: bool,
    pub(crate) generation: u64,
    pub(crate) pulled_chunks: u64,
    pub(crate) pulled_bytes: u64,
}

/// The pull's state and the pull order, shared by the puller threads and
/// the region handle.
#[derive(Debug)]
pub(crate) struct Puller {
    pub(crate) state: Mutex<PullState>,
    pub(crate) cv: Condvar,
    shared: Mutex<PullShared>,
}

/// The pull order and the chunks given up in this pull generation.
#[derive(Debug)]
struct PullShared {
    prio: Box<dyn PullPriority>,
    skip: Vec<bool>,
    seen_gen: u64,
    bogus: u32,
}

use std::sync::atomic::Ordering;

impl Puller {
    pub(crate) fn new(prio: Box<dyn PullPriority>, running: bool) -> Self {
        Self {
            state: Mutex::new(PullState {
                running,
                ..PullState::default()
            }),
            cv: Condvar::new(),
            shared: Mutex::new(PullShared {
                prio,
                skip: Vec::new(),
                seen_gen: u64::MAX,
                bogus: 0,
            }),
        }
    }

    /// Starts the pull, or starts it over (a new generation: chunks given up
    /// on are tried again).
    pub(crate) fn start(&self) {
        let mut st = self.state.lock();
        st.running = true;
        st.done = false;
        st.generation += 1;
        self.cv.notify_all();
    }

    /// Pauses the pull after the chunk in progress.
    pub(crate) fn pause(&self) {
        self.state.lock().running = false;
    }

    /// Resumes a paused pull where it stopped.
    pub(crate) fn resume(&self) {
        let mut st = self.state.lock();
        st.running = true;
        self.cv.notify_all();
    }

    /// Waits until the pull has nothing left to do (`true`), or `timeout`
    /// passes (`false`).
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.done {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return st.done;
            }
        }
        true
    }

    /// How far the pull over `core`'s chunks has come.
    pub(crate) fn progress(&self, core: &Core) -> PullProgress {
        let st = self.state.lock();
        PullProgress {
            chunks: core.chunks.len() as u64,
            present_chunks: core.chunks.present_count() as u64,
            dirty_chunks: 0,
            pulled_chunks: st.pulled_chunks,
            pulled_bytes: st.pulled_bytes,
            chunk_size: core.geo.chunk_size() as u64,
            size: core.geo.size(),
            running: st.running,
            done: st.done,
        }
    }

    /// Wakes the puller threads (to stop, or to start).
    pub(crate) fn notify(&self) {
        let _st = self.state.lock();
        self.cv.notify_all();
    }

    /// A puller thread's life.
    pub(crate) fn run(&self, core: &Core, mut w: crate::worker::Worker) {
        let n = core.chunks.len();
        // Chunks just past the last fault that are pulled without yielding
        // to faults being served: 8 MiB, at least 2 chunks.
        let readahead = ((8 << 20) / core.geo.chunk_size()).max(2);
        loop {
            let seen_gen = {
                let mut st = self.state.lock();
                loop {
                    if core.stopping() {
                        return;
                    }
                    if st.running && !st.done {
                        break;
                    }
                    self.cv.wait_for(&mut st, Duration::from_millis(100));
                }
                st.generation
            };
            let lf = core.last_fault.load(Ordering::Relaxed);
            let next = {
                let mut sh = self.shared.lock();
                let sh = &mut *sh;
                if sh.seen_gen != seen_gen {
                    sh.seen_gen = seen_gen;
                    sh.skip.clear();
                    sh.skip.resize(n, false);
                }
                let view = PullView::new(&core.chunks, &sh.skip, (lf != NO_FAULT).then_some(lf));
                match sh.prio.next_chunk(&view) {
                    Some(i) if view.wanted(i) => {
                        sh.bogus = 0;
                        Some(i)
                    }
                    Some(_) => {
                        sh.bogus += 1;
                        if sh.bogus > 64 {
                            sh.bogus = 0;
                            view.next_wanted_from(0)
                        } else {
                            continue;
                        }
                    }
                    None => None,
                }
            };
            // Faults first: while one is being served, stay out of the way
            // (sleeping, so the CPU is free for the fault and the staging
            // helper), unless this chunk lies just ahead of the last fault:
            // then it is read-ahead for the faulting thread, and fetching it
            // now, beside the fault, is what keeps a sequential reader from
            // faulting at all.
            if let Some(i) = next
                && !(lf != NO_FAULT && i > lf && i - lf <= readahead)
            {
                let until = Instant::now() + Duration::from_millis(5);
                while core.urgent.load(Ordering::Acquire) > 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            match next {
                Some(i) => {
                    // Another puller may have taken it meanwhile: then this
                    // one just asks for the next.
                    if core.chunks.try_claim(i).is_ok() {
                        let r = core.fetch(&mut w, i, Fetcher::Background);
                        Engine::serve_deferred(core, &mut w);
                        match r {
                            Ok(()) => {
                                let mut p = self.state.lock();
                                p.pulled_chunks += 1;
                                p.pulled_bytes += core.geo.chunk(i).1 as u64;
                            }
                            Err(_) => {
                                let mut sh = self.shared.lock();
                                if sh.seen_gen == seen_gen {
                                    sh.skip[i] = true;
                                }
                            }
                        }
                    }
                }
                None => {
                    if core.chunks.any_fetching() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let mut st = self.state.lock();
                    if st.generation == seen_gen {
                        st.done = true;
                        self.cv.notify_all();
                    }
                }
            }
        }
    }
}
