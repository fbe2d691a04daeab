//! [`SigbusResolver`]: an experiment resolving userfaultfd MISSING faults on
//! the faulting thread, in a `SIGBUS` handler (`UFFD_FEATURE_SIGBUS`).

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::mem::{Mapping, page_size};
use crate::raw;
use crate::uffd::{Features, OpenFlags, RegisterMode, Uffd};

/// How many resolvers can be active at the same time.
pub const MAX_SIGBUS_REGIONS: usize = 8;

const FREE: u8 = 0;
/// Claimed by a resolver that is filling or clearing the slot.
const BUSY: u8 = 1;
const ACTIVE: u8 = 2;

/// One region the handler may resolve; only atomics, so the handler can
/// read it without locks.
struct Slot {
    state: AtomicU8,
    /// Handlers currently using this slot's descriptor and source.
    inflight: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    src: AtomicUsize,
    chunk: AtomicUsize,
    fd: AtomicI32,
    /// Faults resolved (the faulting page is present afterwards).
    handled: AtomicU64,
    /// Pages installed by `UFFDIO_COPY`.
    installed: AtomicU64,
    /// `UFFDIO_COPY` failures passed on as real `SIGBUS`.
    failed: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(FREE),
            inflight: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            src: AtomicUsize::new(0),
            chunk: AtomicUsize::new(0),
            fd: AtomicI32::new(-1),
            handled: AtomicU64::new(0),
            installed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

static SLOTS: [Slot; MAX_SIGBUS_REGIONS] = [const { Slot::new() }; MAX_SIGBUS_REGIONS];

/// The `SIGBUS` disposition found when the handler was installed. Set once,
/// before the handler is installed, and never changed: the handler reads it
/// without a lock.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Serialises installing the handler (normal context only).
static INSTALL: Mutex<bool> = Mutex::new(false);

/// Resolves the missing pages of one region on the faulting thread, in a
/// process-wide `SIGBUS` handler, by copying them from a source mapping
/// that already holds the data. **An experiment**, not the lazy region's
/// path (see below).
///
/// The region is registered with a userfaultfd opened with
/// [`Features::SIGBUS`]: a touch of a missing page raises `SIGBUS`
/// (`BUS_ADRERR`) on the touching thread instead of queueing a message for
/// a handler thread. The `SIGBUS` handler installed by this type looks the
/// address up among the active resolvers and, on a hit, installs the chunk
/// around it (a power-of-two multiple of the page size) with `UFFDIO_COPY`
/// from the same offset of the source, then returns, so the access is
/// retried and succeeds. A chunk that another thread installed meanwhile
/// (`EEXIST`) counts as resolved. This models a store that can answer at
/// once (memory, page cache, chunks fetched earlier) and measures what the
/// signal path costs beside the handler threads of `memsync-region`
/// (`memsync bench lazy`, subject `sigbus-on-thread`).
///
/// The source must stay fully readable and must not itself be registered
/// with a userfaultfd; it is shared through an [`Arc`] so it outlives every
/// handler that reads it. Dropping the resolver waits for handlers still
/// running on its slot, closes the userfaultfd (the region's missing pages
/// then read as zeros) and unmaps the region. The `SIGBUS` handler stays
/// installed for the rest of the process and passes every signal on while
/// no resolver is active.
///
/// # Why this is not the region's default path
///
/// * A signal handler may only do async-signal-safe work: no allocation, no
///   lock, no async runtime. Fetching from a store does all three, so the
///   handler can only copy data that is already in memory; anything else
///   would have to be handed to a handler thread anyway (the cross-CPU
///   wake-up it was meant to avoid, plus the signal's cost).
/// * The `SIGBUS` disposition is process-wide. The handler has to coexist
///   with the application's own `SIGBUS` handler (whoever installs last
///   wins; an application handler installed later sees the userfaultfd
///   signals and cannot resolve them), with the `SIGBUS` of poisoned chunks
///   (`UFFDIO_POISON`, which must keep killing the process), with mapped
///   files truncated under the application, and with runtimes that install
///   their own handlers (sanitizers, JITs, the JVM).
///
/// # Real `SIGBUS` is never swallowed
///
/// A signal whose address is outside every active region, whose code is not
/// `BUS_ADRERR` (e.g. the `BUS_MCEERR_AR` of a poisoned page) or whose fault
/// cannot be resolved goes to the handler that was installed before ours
/// (called directly with the kernel's arguments). If that was the default
/// action, the default is restored (uninstalling ours) and the faulting
/// access is retried, so it faults again and the process dies of `SIGBUS`
/// as without this type; a signal that no access raises again (sent with
/// `kill`, `BUS_MCEERR_AO`) is re-raised instead.
///
/// # Async-signal safety
///
/// The handler reads a fixed table of [`MAX_SIGBUS_REGIONS`] slots made of
/// atomics, which a resolver fills before it activates its slot and clears
/// after deactivating it; it allocates nothing, takes no lock and preserves
/// `errno`. A slot's in-flight counter makes dropping a resolver wait until
/// no handler still uses its descriptor or source mapping.
pub struct SigbusResolver {
    slot: usize,
    uffd: Uffd,
    region: Mapping,
    source: Arc<Mapping>,
    chunk: usize,
}

impl fmt::Debug for SigbusResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigbusResolver")
            .field("slot", &self.slot)
            .field("uffd", &self.uffd)
            .field("region", &self.region)
            .field("source", &self.source)
            .field("chunk", &self.chunk)
            .finish()
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl SigbusResolver {
    /// Registers `region` (private anonymous memory, e.g.
    /// [`Mapping::anonymous`]) in MISSING mode with a new userfaultfd opened
    /// with [`Features::SIGBUS`] and [`OpenFlags::user_mode_only`] (which
    /// changes nothing here: with `SIGBUS`, a kernel access to a missing page
    /// fails with `EFAULT` either way), installs the process-wide `SIGBUS`
    /// handler if it is not yet installed, and activates the region.
    ///
    /// From then on, a user-mode touch of a missing page of `region` is
    /// resolved on the touching thread by copying `chunk` bytes from the same
    /// offset of `source`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `chunk` is not a power-of-two multiple of the page
    /// size or `source` is shorter than `region`; `EBUSY`
    /// (`ResourceBusy`) if [`MAX_SIGBUS_REGIONS`] resolvers are active; the
    /// errors of [`Uffd::with_features`] (`EINVAL`: the kernel lacks
    /// `UFFD_FEATURE_SIGBUS`), [`Uffd::register`] and `sigaction(2)`.
    pub fn new(region: Mapping, source: Arc<Mapping>, chunk: usize) -> io::Result<Self> {
        if !chunk.is_power_of_two() || chunk < page_size() {
            return Err(invalid(
                "chunk size must be a power-of-two multiple of the page size",
            ));
        }
        if source.len() < region.len() {
            return Err(invalid("source mapping shorter than the region"));
        }
        let flags = OpenFlags {
            user_mode_only: true,
            ..OpenFlags::default()
        };
        let (uffd, _) = Uffd::with_features(flags, Features::SIGBUS)?;
        uffd.register(&region, RegisterMode::MISSING)?;
        install_handler()?;
        let slot = SLOTS
            .iter()
            .position(|s| {
                s.state
                    .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "too many active SIGBUS resolvers",
                )
            })?;
        let s = &SLOTS[slot];
        s.start.store(region.addr(), Ordering::Relaxed);
        s.len.store(region.len(), Ordering::Relaxed);
        s.src.store(source.addr(), Ordering::Relaxed);
        s.chunk.store(chunk, Ordering::Relaxed);
        s.fd.store(uffd.as_raw_fd(), Ordering::Relaxed);
        s.handled.store(0, Ordering::Relaxed);
        s.installed.store(0, Ordering::Relaxed);
        s.failed.store(0, Ordering::Relaxed);
        // Publishes the fields above to handlers that see ACTIVE.
        s.state.store(ACTIVE, Ordering::SeqCst);
        Ok(Self {
            slot,
            uffd,
            region,
            source,
            chunk,
        })
    }

    /// The region whose faults this resolver serves. Touch it with
    /// [`Mapping::read_at`]/[`write_at`](Mapping::write_at) from any
    /// thread.
    #[must_use]
    pub fn region(&self) -> &Mapping {
        &self.region
    }

    /// The source the pages are copied from.
    #[must_use]
    pub fn source(&self) -> &Arc<Mapping> {
        &self.source
    }

    /// The size of one install.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// How many `SIGBUS` faults of the region the handler resolved: the
    /// faulting page was present when it returned (also when another thread
    /// had installed it meanwhile), or the kernel asked for a retry
    /// (`EAGAIN`).
    #[must_use]
    pub fn handled(&self) -> u64 {
        SLOTS[self.slot].handled.load(Ordering::Relaxed)
    }

    /// How many pages the handler installed.
    #[must_use]
    pub fn installed_pages(&self) -> u64 {
        SLOTS[self.slot].installed.load(Ordering::Relaxed)
    }

    /// How many faults of the region could not be resolved and were passed
    /// on as a real `SIGBUS` (non-zero only if the previous handler returned).
    #[must_use]
    pub fn failed(&self) -> u64 {
        SLOTS[self.slot].failed.load(Ordering::Relaxed)
    }
}

impl Drop for SigbusResolver {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        // Handlers entering from now on skip the slot; wait for those that
        // already use it (each is one ioctl away from leaving).
        s.state.store(BUSY, Ordering::SeqCst);
        while s.inflight.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        s.fd.store(-1, Ordering::Relaxed);
        s.start.store(0, Ordering::Relaxed);
        s.len.store(0, Ordering::Relaxed);
        s.src.store(0, Ordering::Relaxed);
        s.state.store(FREE, Ordering::Release);
        // The fields drop next: the userfaultfd closes (unregistering the
        // region), then the region is unmapped and the source released.
    }
}

/// Installs the `SIGBUS` handler once per process, remembering the
/// disposition it replaces.
fn install_handler() -> io::Result<()> {
    let mut installed = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    // SAFETY: sigaction is plain old data for which all-zero is valid.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries the current one into `old`,
    // a live, exclusively borrowed `sigaction`.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &raw mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Set before the handler can run; never changed afterwards.
    let _ = PREVIOUS.set(old);
    // SAFETY: as above.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    new.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `new.sa_mask` is a live sigset_t; sigemptyset only clears it.
    unsafe { libc::sigemptyset(&raw mut new.sa_mask) };
    // SAFETY: `new` is a fully initialised sigaction whose handler is
    // `on_sigbus`, a function that stays valid for the life of the process
    // and is async-signal-safe (it only uses atomics, ioctl(2),
    // sigaction(2) and raise(3)).
    if unsafe { libc::sigaction(libc::SIGBUS, &raw const new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    *installed = true;
    Ok(())
}

/// `UFFDIO_COPY` of `len` bytes from `src` to `dst` with a raw descriptor,
/// for the signal handler: `Ok(())` when the whole range was installed,
/// else the errno and the bytes installed before it.
fn copy_raw(fd: libc::c_int, dst: usize, src: usize, len: usize) -> Result<(), (i32, usize)> {
    let mut arg = raw::uffdio_copy {
        dst: dst as u64,
        src: src as u64,
        len: len as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY transfers exactly one `uffdio_copy` (pinned in
    // `raw`), `arg`. `fd` is the userfaultfd of an active slot, kept open by
    // the caller's in-flight count; the kernel reads the source (a live
    // `Mapping` held by the resolver) and fills only missing pages of the
    // registered region, whose contents Rust never assumes stable.
    let ret = unsafe { libc::ioctl(fd, raw::UFFDIO_COPY as libc::Ioctl, &raw mut arg) };
    if ret == 0 {
        Ok(())
    } else {
        // SAFETY: __errno_location returns this thread's errno slot.
        let errno = unsafe { *libc::__errno_location() };
        Err((errno, usize::try_from(arg.copy).unwrap_or(0)))
    }
}

/// Resolves a fault at `addr` of the active slot `s`. Returns whether the
/// faulting page is present now (or will be after the retry of `EAGAIN`).
fn resolve(s: &Slot, addr: usize) -> bool {
    let (start, len) = (
        s.start.load(Ordering::Relaxed),
        s.len.load(Ordering::Relaxed),
    );
    let (src, chunk) = (
        s.src.load(Ordering::Relaxed),
        s.chunk.load(Ordering::Relaxed),
    );
    let fd = s.fd.load(Ordering::Relaxed);
    // Cached by `SigbusResolver::new`, so only an atomic load here.
    let page = page_size();
    let off = addr - start;
    let chunk_off = off & !(chunk - 1);
    let n = chunk.min(len - chunk_off);
    let counted = |bytes: usize| {
        s.installed
            .fetch_add((bytes / page) as u64, Ordering::Relaxed);
    };
    match copy_raw(fd, start + chunk_off, src + chunk_off, n) {
        Ok(()) => {
            counted(n);
            return true;
        }
        // Stopped early (pending event, or a later page exists): the access
        // is retried; a still missing page faults again.
        Err((libc::EAGAIN, done)) => {
            counted(done);
            return true;
        }
        Err((libc::EEXIST, done)) => counted(done),
        Err(_) => return false,
    }
    // Part of the chunk exists: install just the faulting page.
    let page_off = off & !(page - 1);
    match copy_raw(fd, start + page_off, src + page_off, page) {
        Ok(()) => {
            counted(page);
            true
        }
        Err((libc::EEXIST | libc::EAGAIN, _)) => true,
        Err(_) => false,
    }
}

/// The process-wide `SIGBUS` handler.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno slot; the
    // handler restores it before returning to the interrupted code.
    let errno_slot = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved_errno = unsafe { *errno_slot };
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let code = unsafe { (*info).si_code };
    // SAFETY: as above; si_addr is the fault address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    if code == libc::BUS_ADRERR {
        for s in &SLOTS {
            if s.state.load(Ordering::Acquire) != ACTIVE {
                continue;
            }
            // Announce the use before re-checking the state (a resolver being
            // dropped stores the state, then waits for `inflight` to drain);
            // read the fields only after seeing ACTIVE, which publishes them.
            s.inflight.fetch_add(1, Ordering::SeqCst);
            let hit = s.state.load(Ordering::SeqCst) == ACTIVE
                && addr.wrapping_sub(s.start.load(Ordering::Relaxed))
                    < s.len.load(Ordering::Relaxed);
            if !hit {
                s.inflight.fetch_sub(1, Ordering::Release);
                continue;
            }
            let ok = resolve(s, addr);
            if ok {
                s.handled.fetch_add(1, Ordering::Relaxed);
            } else {
                s.failed.fetch_add(1, Ordering::Relaxed);
            }
            s.inflight.fetch_sub(1, Ordering::Release);
            if ok {
                // SAFETY: see above.
                unsafe { *errno_slot = saved_errno };
                return;
            }
            break;
        }
    }
    // SAFETY: called from the SIGBUS handler with the kernel's arguments.
    unsafe { chain(sig, info, ctx) };
    // SAFETY: see above.
    unsafe { *errno_slot = saved_errno };
}

/// Whether a `SIGBUS` with this `si_code` was raised by the faulting
/// access itself, so that returning retries the access and faults again.
fn refaults(code: libc::c_int) -> bool {
    matches!(
        code,
        libc::BUS_ADRALN | libc::BUS_ADRERR | libc::BUS_OBJERR | libc::BUS_MCEERR_AR
    )
}

/// Passes a `SIGBUS` that is not ours to the disposition found at
/// installation.
///
/// # Safety
///
/// Only from the `SIGBUS` handler, with the arguments the kernel passed.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    type Action = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
    type Handler = extern "C" fn(libc::c_int);
    // SAFETY: the kernel passes a valid siginfo_t (caller contract).
    let code = unsafe { (*info).si_code };
    // PREVIOUS is set before the handler is installed; the default action
    // stands in for it all the same.
    // SAFETY: sigaction is plain old data for which all-zero is valid
    // (SIG_DFL, empty mask, no flags).
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    let prev = PREVIOUS.get().unwrap_or(&default);
    match prev.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => {
            // An ignored signal that the access does not raise again stays
            // ignored (and ours stays installed). A fault with SIG_IGN
            // kills the process when it recurs, as the kernel does.
            if prev.sa_sigaction == libc::SIG_IGN && !refaults(code) {
                return;
            }
            // SAFETY: putting the previous disposition back (`prev` lives in
            // a static, or on this stack for the call) only undoes ours.
            // The access then faults again and gets it; any other signal is
            // raised again, blocked until this handler returns. Both calls
            // are async-signal-safe.
            unsafe {
                libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut());
                if !refaults(code) {
                    libc::raise(libc::SIGBUS);
                }
            }
        }
        f if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with SA_SIGINFO,
            // so `f` is a function of this signature; it gets the kernel's
            // arguments, as if the kernel had called it.
            let f = unsafe { std::mem::transmute::<libc::sighandler_t, Action>(f) };
            f(sig, info, ctx);
        }
        f => {
            // SAFETY: a handler installed without SA_SIGINFO is a function
            // taking the signal number only.
            let f = unsafe { std::mem::transmute::<libc::sighandler_t, Handler>(f) };
            f(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_chunk_and_short_source() {
        let page = page_size();
        let src = Arc::new(Mapping::anonymous(page).unwrap());
        let e = SigbusResolver::new(Mapping::anonymous(page).unwrap(), Arc::clone(&src), 3000)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = SigbusResolver::new(Mapping::anonymous(2 * page).unwrap(), src, page).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
