//! Lining up userfaultfd tests without sleeping: knowing when a thread waits in the kernel.

use std::time::{Duration, Instant};

/// Waits until thread `tid` of this process sleeps in a userfaultfd wait (on a fault, or for
/// an event such as a `MADV_DONTNEED` to be read), so its message is queued; panics after
/// `timeout`.
///
/// The kernel reports the function a thread sleeps in (`/proc/self/task/TID/wchan`) only once
/// it is off the CPU, so a fault seen here can no longer be resolved before the thread sleeps
/// (which would let it continue without a wake-up).
#[track_caller]
pub fn wait_in_userfault(tid: u32, timeout: Duration) {
    let path = format!("/proc/self/task/{tid}/wchan");
    let start = Instant::now();
    loop {
        let wchan = std::fs::read_to_string(&path).unwrap_or_default();
        if wchan.contains("userfault") {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "thread {tid} does not wait in userfaultfd (wchan {wchan:?})"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
