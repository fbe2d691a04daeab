//! Running store futures on a fault-handler thread: a private
//! current-thread runtime, or a shared runtime polled by hand with a short
//! spin before parking.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Runs store futures: a private current-thread runtime or a shared handle
/// (with how long to spin for the answer before sleeping).
#[derive(Debug)]
pub(crate) enum Exec {
    /// `None` only while it is dropped.
    Own(Option<tokio::runtime::Runtime>),
    Shared(tokio::runtime::Handle, Duration),
}

impl Exec {
    pub(crate) fn new(handle: Option<&tokio::runtime::Handle>, spin: Duration) -> io::Result<Self> {
        Ok(match handle {
            Some(h) => Self::Shared(h.clone(), spin),
            None => Self::Own(Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()?,
            )),
        })
    }

    pub(crate) fn block_on<F: Future>(&self, f: F) -> F::Output {
        match self {
            Self::Own(Some(rt)) => rt.block_on(f),
            Self::Own(None) => unreachable!("an executor used while it is dropped"),
            Self::Shared(h, spin) if spin.is_zero() => h.block_on(f),
            Self::Shared(h, spin) => {
                // The runtime's workers drive its I/O and timers; this thread
                // only polls the future, so any waker will do.
                let _g = h.enter();
                spin_block_on(f, *spin)
            }
        }
    }
}

impl Drop for Exec {
    /// A private runtime may be dropped from async code (a region whose
    /// pooled workers were made by `place` or `write_at` is dropped in a
    /// task): dropping it there would panic, so it is shut down without
    /// waiting (its only tasks are the store futures it ran to completion).
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok()
            && let Self::Own(rt) = self
            && let Some(rt) = rt.take()
        {
            rt.shutdown_background();
        }
    }
}

/// Wakes a thread that polls a future by hand: sets a flag it spins on and
/// unparks it in case it gave up spinning.
struct SpinWaker {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl std::task::Wake for SpinWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Polls `f` to completion on this thread, spinning up to `spin` for each
/// wake-up before parking. A parked thread whose vCPU went idle costs a
/// halted-vCPU wake-up (~50 µs on this VM) when the answer comes; a store
/// that answers within the spin (memory behind a loopback server, a LAN)
/// is seen at once.
fn spin_block_on<F: Future>(f: F, spin: Duration) -> F::Output {
    let w = Arc::new(SpinWaker {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = std::task::Waker::from(Arc::clone(&w));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        let t0 = Instant::now();
        while !w.woken.swap(false, Ordering::Acquire) {
            if t0.elapsed() >= spin {
                while !w.woken.swap(false, Ordering::Acquire) {
                    std::thread::park();
                }
                break;
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping a region's private runtime inside a task used to panic ("Cannot drop a
    /// runtime in a context where blocking is not allowed").
    #[tokio::test]
    async fn a_private_runtime_can_be_dropped_in_async_code() {
        let e = Exec::new(None, Duration::ZERO).unwrap();
        drop(e);
    }
}
