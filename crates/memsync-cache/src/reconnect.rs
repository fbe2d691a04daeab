//! [`Reconnect`]: a store that reopens its inner store after a connection failure.
//!
//! Remote stores (an NBD client) fail every request once their connection is cut and do not
//! come back by themselves. This layer keeps an opener (usually `registry.open(url)`), drops the
//! inner store when a request fails with anything but a permanent error
//! ([`StoreError::is_permanent`]: bounds, alignment, read-only, unsupported, configuration), and
//! opens a new one on the next request. Failed reconnects are paced by the backoff of a
//! [`RetryPolicy`] (the one type every retrying layer uses) so that a dead remote costs one
//! connection attempt per pause, not one per request. This layer has no deadline and never
//! waits: while the remote is away requests fail at once, and the layer above that retries (the
//! cache, or the region mapping it) owns the one deadline of the stack (see
//! [`memsync_core::retry`]).
//!
//! Each connection is a new [`Store::session`]: a flush on a new connection says nothing about
//! writes acknowledged on an older one unless the store advertises multi-conn (see
//! [`Store::session`]); the cache pushes such writes again.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use memsync_core::{Caps, DynStore, Extent, Result, RetryPolicy, Store, StoreError, async_trait};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Opens the inner store (again).
pub type Opener = Arc<dyn Fn() -> BoxFuture<'static, Result<DynStore>> + Send + Sync>;

/// A store that reconnects; see the module documentation.
pub struct Reconnect {
    opener: Opener,
    cur: Mutex<Option<DynStore>>,
    connecting: tokio::sync::Mutex<()>,
    /// The last failed reconnect: when, why, and how many failed in a row.
    last_failure: Mutex<Option<(Instant, String, u32)>>,
    size: u64,
    caps: Caps,
    desc: String,
    reconnects: AtomicU64,
    /// The session of the newest connection (1 for the first). Only changed under the `cur`
    /// lock together with `cur`, and read under it: a session read before a request is at
    /// most the one that serves it, one read after at least.
    session: AtomicU64,
    /// Its backoff paces reconnects (its deadline is not used: see the module documentation).
    policy: RetryPolicy,
}

impl fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reconnect({})", self.desc)
    }
}

impl Reconnect {
    /// Open the first connection (its error is returned as is) and keep the opener.
    pub async fn new(opener: Opener) -> Result<Self> {
        let first = opener().await?;
        Ok(Reconnect {
            size: first.size(),
            caps: first.caps(),
            desc: format!("{first:?}"),
            cur: Mutex::new(Some(first)),
            opener,
            connecting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            session: AtomicU64::new(1),
            policy: Self::DEFAULT_POLICY,
        })
    }

    /// Reconnects at most every 100 ms.
    pub const DEFAULT_POLICY: RetryPolicy = RetryPolicy::new(
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_millis(100),
    );

    /// Pace reconnects by `policy`'s backoff: after the n-th failed reconnect in a row, the
    /// next is tried no sooner than `backoff * 2^(n-1)` (at most `max_backoff`) later.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The pause after `failures` failed reconnects in a row.
    fn pause(&self, failures: u32) -> Duration {
        let p = &self.policy;
        p.backoff
            .saturating_mul(1 << failures.saturating_sub(1).min(20))
            .min(p.max_backoff.max(p.backoff))
    }

    /// How many times the inner store was reopened.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Relaxed)
    }

    /// Drop the current connection (the next request reconnects).
    pub fn disconnect(&self) {
        *self.cur.lock() = None;
    }

    async fn get(&self) -> Result<DynStore> {
        if let Some(s) = self.cur.lock().clone() {
            return Ok(s);
        }
        let _g = self.connecting.lock().await;
        if let Some(s) = self.cur.lock().clone() {
            return Ok(s);
        }
        let failures = self.last_failure.lock().as_ref().map_or(0, |f| f.2);
        if let Some((at, why, n)) = self.last_failure.lock().clone()
            && at.elapsed() < self.pause(n)
        {
            return Err(StoreError::backend(format!(
                "{}: not connected (last attempt failed: {why})",
                self.desc
            )));
        }
        match (self.opener)().await {
            Ok(s) if s.size() != self.size => Err(StoreError::Config(format!(
                "{}: reconnected to a store of another size ({} instead of {})",
                self.desc,
                s.size(),
                self.size
            ))),
            Ok(s) => {
                self.reconnects.fetch_add(1, Relaxed);
                tracing::info!("{}: reconnected", self.desc);
                *self.last_failure.lock() = None;
                let mut cur = self.cur.lock();
                self.session.fetch_add(1, SeqCst);
                *cur = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                *self.last_failure.lock() = Some((Instant::now(), e.chain(), failures + 1));
                Err(e.context(format!("{}: reconnecting", self.desc)))
            }
        }
    }

    fn failed(&self, s: &DynStore, e: &StoreError) {
        if e.is_permanent() {
            return;
        }
        let mut cur = self.cur.lock();
        if cur
            .as_ref()
            .is_some_and(|c| std::ptr::addr_eq(Arc::as_ptr(c), Arc::as_ptr(s)))
        {
            tracing::debug!(
                "{}: dropping the connection after: {}",
                self.desc,
                e.chain()
            );
            *cur = None;
        }
    }
}

macro_rules! through {
    ($self:ident, $s:ident => $call:expr) => {{
        let $s = $self.get().await?;
        let r = $call;
        if let Err(e) = &r {
            $self.failed(&$s, e);
        }
        r
    }};
}

#[async_trait]
impl Store for Reconnect {
    fn size(&self) -> u64 {
        self.size
    }
    fn caps(&self) -> Caps {
        self.caps
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        through!(self, s => s.read(offset, buf).await)
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        through!(self, s => s.write(offset, data).await)
    }
    async fn flush(&self) -> Result<()> {
        through!(self, s => s.flush().await)
    }
    /// The newest connection's session (a dropped connection's until the next one opens).
    fn session(&self) -> u64 {
        let _cur = self.cur.lock();
        self.session.load(SeqCst)
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        through!(self, s => s.trim(offset, len).await)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        through!(self, s => s.write_zeroes(offset, len).await)
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        through!(self, s => s.extents(offset, len).await)
    }
}
