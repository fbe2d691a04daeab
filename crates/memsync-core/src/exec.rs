//! Waiting for a future from a thread that is not a runtime worker: a fault handler, a FUSE
//! request thread. Both hand work to a runtime and need the answer back on their own thread,
//! where the cost of being woken is what a hand-off costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// Runs `f` to completion on this thread (which must not be a worker of a runtime) with
/// `handle`'s runtime driving its I/O and timers. With a `spin` of zero this is
/// [`Handle::block_on`]; otherwise the thread polls `f` itself and, after each poll that is
/// not ready, spins up to `spin` for the wake-up before parking. A parked thread whose CPU went
/// idle pays for waking a halted CPU (on a virtual machine, a halted vCPU) when the answer
/// comes; an answer that arrives within the spin (memory behind a loopback server, a LAN) is
/// seen at once, at the price of the spinning CPU time.
pub fn block_on<F: Future>(handle: &Handle, f: F, spin: Duration) -> F::Output {
    if spin.is_zero() {
        return handle.block_on(f);
    }
    // The runtime's workers drive its I/O and timers; this thread only polls the future, so
    // any waker will do.
    let _g = handle.enter();
    spin_block_on(f, spin)
}

/// Wakes a thread that polls a future by hand: sets a flag it spins on and unparks it in case
/// it gave up spinning.
struct SpinWaker {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl Wake for SpinWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

fn spin_block_on<F: Future>(f: F, spin: Duration) -> F::Output {
    let w = Arc::new(SpinWaker {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = Waker::from(Arc::clone(&w));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
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

    /// A future woken from a runtime task (a timer, then a channel), with and without a spin,
    /// and one that parks after its spin ran out.
    #[test]
    fn answers_from_the_runtime_arrive_spinning_or_parked() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        for spin in [
            Duration::ZERO,
            Duration::from_micros(50),
            Duration::from_secs(5),
        ] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.send(7u32).unwrap();
            });
            assert_eq!(block_on(rt.handle(), rx, spin).unwrap(), 7);
            let slept = block_on(
                rt.handle(),
                async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    3u32
                },
                spin,
            );
            assert_eq!(slept, 3);
        }
    }
}
