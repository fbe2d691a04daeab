//! Where the post-copy background stream runs: a runtime of its own whose threads have a lower
//! CPU priority than the caller's.
//!
//! After a post-copy switch-over the background stream (the source reading and sending every
//! missing chunk, the destination placing them) keeps the CPUs busy, while each fault at the
//! destination waits for four threads in turn: the source's urgent task, the destination's
//! urgent reader, its fault handler, the faulting thread. On a host whose CPUs the stream fills,
//! each of those wake-ups waits until the scheduler preempts a stream thread; at a lower
//! priority the stream is preempted at once. Lowering a thread's priority needs no privilege.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;

/// How much nicer than the process the background threads are: a weight of about a third of
/// the process's other threads, so the stream still gets most of an otherwise idle CPU.
const NICER: i32 = 5;

/// Lower the calling thread's priority by [`NICER`], relative to what it inherited (a process
/// started with `nice` stays below its parent's priority: never raised).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let r = rustix::process::getpriority_process(Some(tid))
        .and_then(|now| rustix::process::setpriority_process(Some(tid), (now + NICER).min(19)));
    if let Err(e) = r {
        tracing::debug!("migrate: lowering the background stream's priority: {e}");
    }
}

fn runtime() -> Option<&'static Runtime> {
    static RT: OnceLock<Option<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        Builder::new_multi_thread()
            // A source and a destination in one process (tests, benchmarks) each stream.
            .worker_threads(2)
            .thread_name("memsync-bulk")
            .enable_all()
            .on_thread_start(lower_priority)
            .build()
            .inspect_err(|e| {
                tracing::warn!(
                    "migrate: no background runtime ({e}); the stream runs beside faults"
                );
            })
            .ok()
    })
    .as_ref()
}

/// Run a background stream's task on the low-priority runtime (or, if it cannot be made, on
/// the caller's). Its sockets may belong to the caller's runtime: their readiness still comes
/// from that runtime's driver.
pub(crate) fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime() {
        Some(rt) => rt.spawn(f),
        None => tokio::spawn(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    /// The stream's threads are nicer than the thread that spawned them, never less nice.
    #[test]
    fn background_threads_are_nicer_than_the_caller() {
        let caller = nice();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bg = rt.block_on(spawn(async { nice() })).unwrap();
        assert_eq!(bg, (caller + NICER).min(19), "caller {caller}");
    }
}
