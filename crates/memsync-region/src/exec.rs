//! Running store futures on a fault-handler thread: a private
//! current-thread runtime, or a shared runtime waited for with
//! [`memsync_core::exec::block_on`] (a short spin before parking).

use std::io;
use std::time::Duration;

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
            Self::Shared(h, spin) => memsync_core::exec::block_on(h, f, *spin),
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
