//! Embedding migration: move a store that an application writes through a tracking layer to a
//! destination over TCP (both ends in this process here; normally on two hosts), pre-copy
//! passes while it runs, then a short stop.
//!
//! `cargo run -p memsync-migrate --example migrate_store`

use std::sync::Arc;

use memsync_core::{Bytes, DynStore, Result, Store, async_trait};
use memsync_local::MemStore;
use memsync_migrate::{
    DestConfig, Dialer, Hooks, Listener, NoHooks, SourceConfig, StoreTarget, Target, migrate,
    receive,
};
use memsync_sync::{NoProgress, Tracked};

/// Suspending takes the lock the writer writes under (so its write in progress completes) and
/// keeps it; resuming gives it back.
#[derive(Debug, Default)]
struct Pause {
    run: Arc<tokio::sync::Mutex<()>>,
    held: parking_lot::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
}

#[async_trait]
impl Hooks for Pause {
    async fn suspend(&self) -> Result<()> {
        *self.held.lock() = Some(self.run.clone().lock_owned().await);
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        self.held.lock().take();
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let size = 64 << 20;
    // The source: the application writes through `Tracked`, which records dirty pages.
    let store: DynStore = Arc::new(MemStore::new(size));
    store.write(0, Bytes::from(vec![7u8; 1 << 20])).await?;
    let tracked = Tracked::new(store, 4096);

    // The destination: a listener and a target store (which is also the store its
    // application would use after the switch-over).
    let dst: DynStore = Arc::new(MemStore::new(size));
    let target = StoreTarget::new(dst.clone());
    let listener = Arc::new(Listener::bind("127.0.0.1:0", None).await?);
    let url = listener.url();
    let t: Arc<dyn Target> = target;
    let dest =
        tokio::spawn(async move { receive(listener, t, &NoHooks, &DestConfig::default()).await });

    // A writer keeps dirtying pages while the passes run; it writes only while it holds `run`.
    let app = Arc::new(Pause::default());
    let (w, a) = (tracked.clone(), app.clone());
    let writer = tokio::spawn(async move {
        for i in 0..u64::MAX {
            let _run = a.run.lock().await;
            let _ = w
                .write((i * 7919 % 16384) * 4096, Bytes::from(vec![i as u8; 4096]))
                .await;
            drop(_run);
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
    });

    // The hooks suspend the application before the last copy (SignalHooks does it for a pid).
    let report = migrate(
        tracked.clone(),
        tracked.clone(),
        &Dialer::parse(&url)?,
        &*app,
        &SourceConfig::default(),
        &NoProgress,
    )
    .await?;
    dest.await??;
    // The source stays suspended after a migration; the application now runs at the destination.
    writer.abort();
    println!(
        "migrated {} MiB in {:?}: {} passes, downtime {:?}, {} bytes sent, {} zero chunks not sent",
        size >> 20,
        report.total,
        report.passes.len(),
        report.downtime,
        report.wire_sent,
        report.zero_chunks
    );
    Ok(())
}
