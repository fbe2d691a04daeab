//! [`Reconnect`]: a store that reopens its inner store after a connection failure.
//!
//! Remote stores (an NBD client) fail every request once their connection is cut and do not
//! come back by themselves. This layer keeps an opener (usually `registry.open(url)`), drops the
//! inner store when a request fails with anything but a request error (bounds, alignment,
//! read-only, unsupported, configuration), and opens a new one on the next request. Failed
//! reconnects are rate-limited so that a dead remote costs one connection attempt per interval,
//! not one per request. The cache above retries; this layer only makes retrying possible.
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
use memsync_core::{Caps, DynStore, Extent, Result, Store, StoreError, async_trait};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Opens the inner store (again).
pub type Opener = Arc<dyn Fn() -> BoxFuture<'static, Result<DynStore>> + Send + Sync>;

/// A store that reconnects; see the module documentation.
pub struct Reconnect {
    opener: Opener,
    cur: Mutex<Option<DynStore>>,
    connecting: tokio::sync::Mutex<()>,
    last_failure: Mutex<Option<(Instant, String)>>,
    size: u64,
    caps: Caps,
    desc: String,
    reconnects: AtomicU64,
    /// The session of the newest connection (1 for the first). Only changed under the `cur`
    /// lock together with `cur`, and read under it: a session read before a request is at
    /// most the one that serves it, one read after at least.
    session: AtomicU64,
    retry_interval: Duration,
}

impl fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reconnect({})", self.desc)
    }
}

fn permanent(e: &StoreError) -> bool {
    matches!(
        e.root(),
        StoreError::OutOfRange { .. }
            | StoreError::Misaligned { .. }
            | StoreError::ReadOnly
            | StoreError::Unsupported { .. }
            | StoreError::Config(_)
    )
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
            retry_interval: Duration::from_millis(100),
        })
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
        if let Some((at, why)) = self.last_failure.lock().clone()
            && at.elapsed() < self.retry_interval
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
                *self.last_failure.lock() = Some((Instant::now(), e.chain()));
                Err(e.context(format!("{}: reconnecting", self.desc)))
            }
        }
    }

    fn failed(&self, s: &DynStore, e: &StoreError) {
        if permanent(e) {
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
