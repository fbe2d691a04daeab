//! One retry and deadline policy for every layer that retries a store:
//! [`RetryPolicy`] (how long, how to back off) and [`Retry`] (one
//! operation's attempts), with [`StoreError::is_permanent`] deciding what is
//! worth retrying at all.
//!
//! # One clock per stack
//!
//! Layers that retry are stacked: a region maps a cache whose remote
//! reconnects. If each retried on its own clock, a dead remote would cost
//! the product of their attempts and the sum of their deadlines, and the
//! error would name the innermost timeout. Instead the **outermost** layer
//! that retries owns the deadline: [`Retry::scope`] makes its deadline
//! visible to every layer the request passes through, and a
//! [`RetryPolicy::start`] inside that scope adopts it instead of its own
//! ([`Retry::inherited`]). A layer below therefore gives up exactly when the
//! layer above would, and the layer above sees the deadline passed and does
//! not try again: one clock, one deadline, attempts counted once, by the
//! layer nearest the store.
//!
//! `Reconnect` (memsync-cache) has no deadline of its own: it fails at once
//! while its remote is away, reopening at most once per backoff step, and
//! leaves the waiting to the layer that retries.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::StoreError;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// How long to keep retrying a failed operation and how to wait between
/// attempts (exponential backoff from `backoff` up to `max_backoff`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up this long after the first attempt started (unless an
    /// enclosing [`Retry::scope`] set another deadline).
    pub deadline: Duration,
    /// The first pause after a failure.
    pub backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// A policy with `deadline`, backing off from `backoff` to `max_backoff`.
    #[must_use]
    pub const fn new(deadline: Duration, backoff: Duration, max_backoff: Duration) -> Self {
        Self {
            deadline,
            backoff,
            max_backoff,
        }
    }

    /// Starts retrying one operation now. Its deadline is the enclosing
    /// [`Retry::scope`]'s if there is one, otherwise `now + deadline`.
    #[must_use]
    pub fn start(&self) -> Retry {
        let (deadline, inherited) = match DEADLINE.try_with(|d| *d) {
            Ok(d) => (d, true),
            Err(_) => (Instant::now() + self.deadline, false),
        };
        Retry {
            deadline,
            inherited,
            backoff: self.backoff.max(Duration::from_micros(100)),
            max_backoff: self.max_backoff.max(self.backoff),
            attempts: 0,
        }
    }

    /// The deadline a request started now would have (see [`start`](Self::start)).
    #[must_use]
    pub fn deadline_from_now(&self) -> Instant {
        DEADLINE
            .try_with(|d| *d)
            .unwrap_or_else(|_| Instant::now() + self.deadline)
    }
}

/// The retries of one operation under a [`RetryPolicy`].
#[derive(Debug)]
pub struct Retry {
    deadline: Instant,
    inherited: bool,
    backoff: Duration,
    max_backoff: Duration,
    attempts: u32,
}

impl Retry {
    /// When the operation gives up.
    #[must_use]
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left until the deadline.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline is an enclosing layer's (so this layer's own
    /// setting does not apply).
    #[must_use]
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// Attempts that failed so far.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records a failed attempt. `Some(pause)`: wait that long, then try
    /// again if the deadline has not passed by then ([`remaining`](Self::remaining)
    /// is not zero). `None`: give up now, because `e` is permanent
    /// ([`StoreError::is_permanent`]) or the deadline passed.
    ///
    /// The pause is cut at the deadline rather than given up early: a
    /// layer retrying under an enclosing layer's deadline returns only when
    /// that deadline passed, so the enclosing layer does not try again.
    pub fn failed(&mut self, e: &StoreError) -> Option<Duration> {
        self.attempts += 1;
        let left = self.remaining();
        if e.is_permanent() || left.is_zero() {
            return None;
        }
        let pause = self.backoff.min(left);
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        Some(pause)
    }

    /// Runs `f` with this operation's deadline visible to the layers it
    /// calls: their [`RetryPolicy::start`] adopts it.
    pub fn scope<F: Future>(&self, f: F) -> impl Future<Output = F::Output> {
        DEADLINE.scope(self.deadline, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_not_retried_and_backoff_doubles() {
        let p = RetryPolicy::new(
            Duration::from_secs(60),
            Duration::from_millis(1),
            Duration::from_millis(3),
        );
        let mut r = p.start();
        assert!(!r.inherited());
        let transient = StoreError::backend("connection reset");
        assert_eq!(r.failed(&transient), Some(Duration::from_millis(1)));
        assert_eq!(r.failed(&transient), Some(Duration::from_millis(2)));
        assert_eq!(r.failed(&transient), Some(Duration::from_millis(3)));
        assert_eq!(r.failed(&transient), Some(Duration::from_millis(3)));
        assert_eq!(r.failed(&StoreError::ReadOnly.context("layer")), None);
        assert_eq!(r.attempts(), 5);
    }

    #[test]
    fn a_passed_deadline_stops_retrying() {
        let p = RetryPolicy::new(
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(1),
        );
        let mut r = p.start();
        assert_eq!(r.failed(&StoreError::backend("x")), None);
    }

    #[tokio::test]
    async fn an_enclosing_scope_owns_the_deadline() {
        let outer = RetryPolicy::new(Duration::from_secs(30), Duration::ZERO, Duration::ZERO);
        let inner = RetryPolicy::new(Duration::from_secs(10), Duration::ZERO, Duration::ZERO);
        let o = outer.start();
        let (d, inherited) = o
            .scope(async {
                let i = inner.start();
                (i.deadline(), i.inherited())
            })
            .await;
        assert!(inherited);
        assert_eq!(d, o.deadline());
        assert!(!inner.start().inherited(), "outside the scope: its own");
    }
}
