//! [`Engine`]: the userfaultfd and the memory it serves (opening,
//! registration), the handler threads (pinning, standby, spin) and the
//! event pump.
//!
//! The engine knows nothing of chunks or stores: it hands every event to an
//! [`EventHandler`] (the region's fault path), which may call back into
//! [`Engine::drain_events`] when an install meets `EAGAIN`. Faults read
//! while draining are put aside on the [`Worker`] and served afterwards.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memsync_core::SharedMemory;
use memsync_sys::{
    Advice, Event, Features, Ioctls, MapOptions, Mapping, MemfdFlags, OpenFlags, PageFaultFlags,
    RegisterMode, Uffd, ftruncate, memfd_create, poll_readable,
};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::Backing;
use crate::error::{Error, sys};
use crate::stats::{RegionStats, inc};
use crate::worker::{Events, Worker};

/// After this long without faults the standby handlers sleep until the
/// next fault instead of napping.
const STANDBY_IDLE_NS: u64 = 50_000_000;

/// Serves the events the engine reads.
pub(crate) trait EventHandler: Send + Sync {
    /// The engine whose events these are.
    fn engine(&self) -> &Engine;
    /// Where the engine counts (standby takeovers).
    fn stats(&self) -> &RegionStats;
    /// Serves a fault read at `t0`.
    fn on_fault(&self, w: &mut Worker, addr: usize, flags: PageFaultFlags, t0: Instant);
    /// Serves any other event (at once: an install may be waiting for it).
    fn on_other(&self, ev: Event);
}

/// The handler threads of an engine.
pub(crate) type Handlers = Vec<JoinHandle<()>>;

/// How the engine maps and registers its memory.
#[derive(Debug, Clone)]
pub(crate) struct EngineSetup {
    pub(crate) backing: Backing,
    pub(crate) map_len: usize,
    pub(crate) page: usize,
    pub(crate) huge_pages: bool,
    pub(crate) user_mode_only: Option<bool>,
    /// Register for write-protect faults too (and ask for async WP when
    /// `wp_async`, the kernel's dirty tracking).
    pub(crate) wp: bool,
    pub(crate) wp_async: bool,
    /// Ask for `REMOVE` events ([`RegionConfig::remove_events`](crate::RegionConfig::remove_events)).
    pub(crate) remove_events: bool,
    pub(crate) spin: Duration,
    pub(crate) standby_after: Option<Duration>,
    /// The source's memory, for [`Backing::Shared`].
    pub(crate) shared: Option<SharedMemory>,
}

/// The userfaultfd, the registered mapping, and the handler threads'
/// shared state. Field order matters for drop: the userfaultfd is closed
/// before the memory is unmapped.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) uffd: Uffd,
    pub(crate) map: Mapping,
    pub(crate) memfd: Option<File>,
    pub(crate) ioctls: Ioctls,
    pub(crate) user_mode_only: bool,
    spin: Duration,
    pub(crate) standby_after: Option<Duration>,
    stop: AtomicBool,
    pub(crate) stop_tx: watch::Sender<bool>,
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    epoch: Instant,
    busy_since: AtomicU64,
    last_busy: AtomicU64,
    standby_lock: Mutex<()>,
    standby_cv: Condvar,
    /// Told about every `REMOVE` as soon as it is read, before the handler
    /// (a foreign engine's driver: pages removed there read as zeros next).
    pub(crate) remove_tap: Option<RemoveTap>,
}

/// What a `REMOVE` event's range is passed to on the reading thread, before
/// any fault read after it can be served.
pub(crate) struct RemoveTap(pub(crate) Box<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for RemoveTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoveTap")
    }
}

fn open_uffd(
    memfd: bool,
    hugetlb: bool,
    force_user_mode: Option<bool>,
    wp: bool,
    wp_async: bool,
    remove_events: bool,
) -> Result<(Uffd, bool), Error> {
    let open = |user_mode_only| {
        Uffd::open(OpenFlags {
            nonblock: true,
            cloexec: true,
            user_mode_only,
        })
    };
    let (uffd, umo) = match force_user_mode {
        Some(u) => (open(u).map_err(sys("opening a userfaultfd"))?, u),
        None => match open(false) {
            Ok(u) => (u, false),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => (
                open(true).map_err(sys("opening a user-mode-only userfaultfd"))?,
                true,
            ),
            Err(e) => {
                return Err(Error::Sys {
                    context: "opening a userfaultfd",
                    source: e,
                });
            }
        },
    };
    let supported = Uffd::probe_features().map_err(sys("probing userfaultfd features"))?;
    let mut required = if memfd {
        Features::MISSING_SHMEM | Features::MINOR_SHMEM
    } else if hugetlb {
        Features::MISSING_HUGETLBFS
    } else {
        Features::empty()
    };
    if wp && (memfd || hugetlb) {
        required |= Features::WP_HUGETLBFS_SHMEM;
    }
    if wp_async {
        required |= Features::WP_ASYNC;
    }
    // A memfd chunk is installed write-protected with UFFDIO_CONTINUE_MODE_WP, which came with
    // Linux 6.4 in the series that added WP_UNPOPULATED and has no feature bit of its own:
    // older kernels (6.1 LTS) reject the mode with EINVAL at the first install, and mapping the
    // page first and protecting it after would let a write slip through unseen in between.
    if wp && memfd && !supported.contains(Features::WP_UNPOPULATED) {
        return Err(Error::Config(
            "write tracking or a budget on a memfd region needs UFFDIO_CONTINUE_MODE_WP \
             (Linux 6.4), which this kernel lacks: use Backing::Anonymous"
                .into(),
        ));
    }
    if !supported.contains(required) {
        return Err(Error::Config(format!(
            "the kernel lacks userfaultfd features {:?}",
            required - supported
        )));
    }
    // Not EVENT_UNMAP: a failed chunk may be replaced by a SIGBUS mapping,
    // and with unmap events that mmap would wait until a handler has read
    // its event, which the handler doing it cannot.
    let mut optional = Features::MOVE | Features::POISON;
    if remove_events {
        optional |= Features::EVENT_REMOVE;
    }
    uffd.api(required | (optional & supported))
        .map_err(sys("userfaultfd handshake"))?;
    Ok((uffd, umo))
}

impl Engine {
    /// Opens a userfaultfd, maps `setup.map_len` bytes of memory of the
    /// given backing (2 MiB aligned, not inherited by `fork()`) and
    /// registers it.
    pub(crate) fn open(setup: EngineSetup) -> Result<Self, Error> {
        let memfd_mode = setup.backing == Backing::Memfd;
        let shared = match (&setup.shared, setup.backing) {
            (Some(m), Backing::Shared) => Some(m),
            (None, Backing::Shared) => {
                return Err(Error::Config(
                    "Backing::Shared needs a source with shared memory".into(),
                ));
            }
            _ => None,
        };
        let hugetlb = setup.backing == Backing::Hugetlb;
        let (uffd, user_mode_only) = open_uffd(
            memfd_mode || shared.is_some(),
            hugetlb,
            setup.user_mode_only,
            setup.wp,
            setup.wp && setup.wp_async,
            setup.remove_events,
        )?;
        let len = setup.map_len;
        let align = memsync_sys::pmd_size().max(setup.page);
        let (map, memfd) = if let Some(m) = shared {
            let map = Mapping::shared_fd_with(m.file.as_fd(), len, m.offset, m.writable)
                .map_err(sys("mapping the source's shared memory"))?;
            (map, None)
        } else if memfd_mode {
            let fd = memfd_create("memsync-region", MemfdFlags::default())
                .map_err(sys("memfd_create"))?;
            ftruncate(fd.as_fd(), len as u64).map_err(sys("sizing the memfd"))?;
            let map = Mapping::shared_fd(fd.as_fd(), len, 0).map_err(sys("mapping the memfd"))?;
            (map, Some(File::from(fd)))
        } else if hugetlb {
            let map = Mapping::anonymous_with(
                len,
                MapOptions {
                    align,
                    hugetlb: true,
                    ..MapOptions::default()
                },
            )
            .map_err(sys(
                "mapping the region with huge pages (are enough reserved in vm.nr_hugepages?)",
            ))?;
            (map, None)
        } else {
            let map = Mapping::anonymous_with(
                len,
                MapOptions {
                    align,
                    ..MapOptions::default()
                },
            )
            .map_err(sys("mapping the region"))?;
            if setup.huge_pages {
                let _ = map.advise(0, map.len(), Advice::HugePage);
            }
            (map, None)
        };
        let mut mode = if memfd_mode || shared.is_some() {
            RegisterMode::MISSING | RegisterMode::MINOR
        } else {
            RegisterMode::MISSING
        };
        if setup.wp {
            mode |= RegisterMode::WP;
        }
        let ioctls = uffd
            .register(&map, mode)
            .map_err(sys("registering the region with the userfaultfd"))?;
        // A forked child would see the chunks never fetched as zeros (the
        // userfaultfd registration is not inherited): it gets nothing here.
        map.advise(0, map.len(), Advice::DontFork)
            .map_err(sys("MADV_DONTFORK on the region"))?;
        Ok(Self {
            memfd,
            user_mode_only,
            ..Self::assemble(uffd, map, ioctls, setup.spin, setup.standby_after)?
        })
    }

    /// An engine over another process's memory: `uffd` is that process's
    /// userfaultfd (already registered there) translated with a
    /// [`Remap`](memsync_sys::Remap) into the local addresses of `map`, a
    /// [`Mapping::placeholder`]. Nothing is mapped or registered here; the
    /// installs are `COPY`/`ZEROPAGE`/`POISON` (`MOVE` cannot cross
    /// processes).
    pub(crate) fn foreign(
        uffd: Uffd,
        map: Mapping,
        spin: Duration,
        standby_after: Option<Duration>,
        remove_tap: Option<RemoveTap>,
    ) -> Result<Self, Error> {
        let ioctls = Ioctls::WAKE | Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::POISON;
        Ok(Self {
            remove_tap,
            ..Self::assemble(uffd, map, ioctls, spin, standby_after)?
        })
    }

    /// The engine around a userfaultfd and its memory (no memfd, no tap):
    /// the handlers' shared state (stop, wake-up, standby) starts here for
    /// both kinds.
    fn assemble(
        uffd: Uffd,
        map: Mapping,
        ioctls: Ioctls,
        spin: Duration,
        standby_after: Option<Duration>,
    ) -> Result<Self, Error> {
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(sys("creating the wake-up socket"))?;
        let (stop_tx, _) = watch::channel(false);
        Ok(Self {
            uffd,
            map,
            memfd: None,
            ioctls,
            user_mode_only: false,
            spin,
            standby_after,
            stop: AtomicBool::new(false),
            stop_tx,
            wake_rx,
            wake_tx,
            epoch: Instant::now(),
            busy_since: AtomicU64::new(0),
            last_busy: AtomicU64::new(0),
            standby_lock: Mutex::new(()),
            standby_cv: Condvar::new(),
            remove_tap: None,
        })
    }

    /// Hands a `REMOVE` to the tap, if any, then to the handler.
    fn other_event<H: EventHandler + ?Sized>(&self, h: &H, ev: Event) {
        if let (Some(tap), Event::Remove { start, end }) = (&self.remove_tap, &ev) {
            (tap.0)(*start, *end);
        }
        h.on_other(ev);
    }

    /// Start address of the memory.
    pub(crate) fn base(&self) -> usize {
        self.map.addr()
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells every thread to stop: sets the flag, cancels store reads in
    /// progress and wakes sleeping handlers (the caller joins them).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stop_tx.send_replace(true);
        let _g = self.standby_lock.lock();
        self.standby_cv.notify_all();
        // Wake handlers blocked in poll(2): they watch the wake-up socket.
        let _ = (&self.wake_tx).write_all(&[1]);
    }

    /// Reads pending events without blocking: non-fault events are served
    /// at once (that is what `EAGAIN` waits for), faults are put aside on
    /// the worker for [`serve_deferred`](Self::serve_deferred).
    pub(crate) fn drain_events<H: EventHandler + ?Sized>(&self, h: &H, w: &mut Events) {
        let n = self.uffd.read_events(&mut w.drained).unwrap_or(0);
        if n == 0 {
            std::thread::yield_now();
            return;
        }
        let now = Instant::now();
        for k in 0..n {
            match w.drained[k].event() {
                Event::PageFault { addr, flags, .. } => w.deferred.push((addr, flags, now)),
                ev => self.other_event(h, ev),
            }
        }
    }

    /// Serves the faults this worker read while draining events (an install
    /// that met `EAGAIN` reads every pending event): nobody else will.
    pub(crate) fn serve_deferred<H: EventHandler + ?Sized>(h: &H, w: &mut Worker) {
        while let Some((addr, flags, t0)) = w.ev.deferred.pop() {
            h.on_fault(w, addr, flags, t0);
        }
    }

    /// Starts one handler thread per worker: the first `spinning` spin
    /// before they block, and with `pin`, handler `k` is pinned to the
    /// `k`-th CPU this thread may use (under a cpuset they are not `0..n`;
    /// if they cannot be read, nothing is pinned). Handler 0 is the primary.
    /// On failure returns the threads already started with the error.
    pub(crate) fn spawn_handlers<H: EventHandler + 'static>(
        h: &Arc<H>,
        workers: Vec<Worker>,
        pin: bool,
        spinning: usize,
    ) -> Result<Handlers, (Handlers, io::Error)> {
        let cpus = if pin {
            memsync_sys::allowed_cpus().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut threads = Vec::new();
        for (t, w) in workers.into_iter().enumerate() {
            let h = Arc::clone(h);
            let cpu = pin
                .then(|| cpus.get(t % cpus.len().max(1)).copied())
                .flatten();
            let spin = t < spinning;
            let r = std::thread::Builder::new()
                .name(format!("memsync-fault-{t}"))
                .spawn(move || {
                    if let Some(cpu) = cpu
                        && let Err(e) = memsync_sys::set_thread_affinity(&[cpu])
                    {
                        tracing::debug!(cpu, error = %e, "memsync-region: pinning a fault handler failed");
                    }
                    Self::handler_main(&*h, w, spin, t == 0);
                });
            match r {
                Ok(j) => threads.push(j),
                Err(e) => return Err((threads, e)),
            }
        }
        Ok(threads)
    }

    /// A handler thread's life: serve events until the region stops (the
    /// primary polls; with `standby_after`, the others stand by).
    pub(crate) fn handler_main<H: EventHandler + ?Sized>(
        h: &H,
        mut w: Worker,
        spin: bool,
        primary: bool,
    ) {
        let eng = h.engine();
        match eng.standby_after {
            Some(after) if !primary => eng.standby_main(h, w, after),
            _ => eng.serve(
                h,
                &mut w,
                spin,
                primary,
                &|| true,
                Duration::from_millis(200),
            ),
        }
    }

    /// Nanoseconds since the engine was created, never 0.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) | 1
    }

    /// The primary handler starts serving events.
    fn mark_busy(&self) {
        let now = self.now_ns();
        self.busy_since.store(now, Ordering::Release);
        let prev = self.last_busy.swap(now, Ordering::AcqRel);
        if self.standby_after.is_some() && now.saturating_sub(prev) > STANDBY_IDLE_NS {
            // First fault after a quiet spell: wake the standby handlers
            // from their long sleep (they nap briefly while faults come).
            let _g = self.standby_lock.lock();
            self.standby_cv.notify_all();
        }
    }

    /// Reads and serves userfaultfd events until `go()` is false when there
    /// is nothing to do, or the region stops. The primary handler records
    /// when it is busy, for the standby handlers.
    fn serve<H: EventHandler + ?Sized>(
        &self,
        h: &H,
        w: &mut Worker,
        spin: bool,
        primary: bool,
        go: &dyn Fn() -> bool,
        poll_timeout: Duration,
    ) {
        let mut last = Instant::now();
        loop {
            if self.stopping() {
                return;
            }
            if !w.ev.deferred.is_empty() {
                if primary {
                    self.mark_busy();
                }
                Self::serve_deferred(h, w);
            }
            // One message at a time: a fault read here is served before the
            // next read, so faults read together would wait behind a slow
            // store read while another handler could serve them. The price
            // against reading up to 16 messages is in docs/perf.md.
            let n = match self.uffd.read_events(&mut w.ev.msg) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "memsync-region: reading userfaultfd events failed");
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            if n > 0 {
                if primary {
                    self.mark_busy();
                }
                match w.ev.msg[0].event() {
                    Event::PageFault { addr, flags, .. } => {
                        h.on_fault(w, addr, flags, Instant::now());
                    }
                    ev => self.other_event(h, ev),
                }
                last = Instant::now();
                continue;
            }
            if primary {
                self.busy_since.store(0, Ordering::Release);
            }
            if !go() {
                return;
            }
            if spin && last.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            let _ = poll_readable(
                &[self.uffd.as_fd(), self.wake_rx.as_fd()],
                Some(poll_timeout),
            );
            last = Instant::now();
        }
    }

    /// A standby handler: does not poll the userfaultfd (so a fault wakes
    /// only the primary handler, the one the scheduler tends to run on the
    /// faulting thread's CPU) until the primary has been busy with one
    /// batch of events for `after` (e.g. a stalled store read); then it
    /// serves events beside it until the primary is free again.
    fn standby_main<H: EventHandler + ?Sized>(&self, h: &H, mut w: Worker, after: Duration) {
        let after_ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        // Naps wake the other CPU: keep them rare (a takeover comes within
        // `after` + one nap; shorter naps raised the random 4 KiB fault p99,
        // docs/perf.md).
        let nap = (after * 4).max(Duration::from_millis(2));
        loop {
            if self.stopping() {
                return;
            }
            let b = self.busy_since.load(Ordering::Acquire);
            let now = self.now_ns();
            if b != 0 && now.saturating_sub(b) >= after_ns {
                inc(&h.stats().standby_takeovers);
                let go = || self.busy_since.load(Ordering::Acquire) != 0;
                self.serve(h, &mut w, false, false, &go, Duration::from_millis(1));
                continue;
            }
            if now.saturating_sub(self.last_busy.load(Ordering::Acquire)) < STANDBY_IDLE_NS {
                std::thread::sleep(nap);
            } else {
                let mut g = self.standby_lock.lock();
                // Checked under the lock: `mark_busy` notifies under it.
                if self
                    .now_ns()
                    .saturating_sub(self.last_busy.load(Ordering::Acquire))
                    >= STANDBY_IDLE_NS
                    && !self.stopping()
                {
                    self.standby_cv.wait_for(&mut g, Duration::from_millis(100));
                }
            }
        }
    }
}
