//! Embedding migration of a live memory region between two processes: this process is the
//! source (a region a writer thread keeps dirtying), and it starts itself again as the
//! destination (a region that takes over and faults in what is still missing). Both print the
//! BLAKE3 of the region at the end; they must match.
//!
//! `cargo run -p memsync-migrate --example migrate_region [precopy|postcopy|hybrid]`

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use memsync_core::{Bytes, DynStore, Result, Store, async_trait};
use memsync_local::MemStore;
use memsync_migrate::{
    DestConfig, Dialer, Gate, Hooks, Listener, Mode, RegionTarget, SourceConfig, migrate_region,
    receive_region,
};
use memsync_region::{LazyRegion, RegionConfig, WriteTracking};
use memsync_sync::NoProgress;

const SIZE: u64 = 64 << 20;
const CHUNK: usize = 4096;

fn region_cfg(tracking: WriteTracking) -> RegionConfig {
    RegionConfig {
        chunk_size: CHUNK,
        write_tracking: tracking,
        huge_pages: false,
        fetch_deadline: Duration::from_secs(120),
        ..RegionConfig::default()
    }
}

fn digest(r: &LazyRegion) -> blake3::Hash {
    let mut v = vec![0u8; r.len()];
    r.read_at(0, &mut v).expect("reading the region");
    blake3::hash(&v)
}

#[derive(Debug)]
struct Announce;

#[async_trait]
impl Hooks for Announce {
    async fn suspend(&self) -> Result<()> {
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        // The application would start using the region here.
        eprintln!("destination: resumed");
        Ok(())
    }
}

async fn destination() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let target = RegionTarget::new(SIZE, region_cfg(WriteTracking::Off))?;
    let listener = Arc::new(Listener::bind("127.0.0.1:0", None).await?);
    println!("{}", listener.url());
    let rep = receive_region(listener, target.clone(), &Announce, &DestConfig::default()).await?;
    eprintln!(
        "destination: {} faults, p50 {:?}, p99 {:?}",
        rep.faults, rep.fault_p50, rep.fault_p99
    );
    let r = target.region().clone();
    let d = tokio::task::spawn_blocking(move || digest(&r)).await?;
    println!("{d}");
    Ok(())
}

async fn source(mode: Mode) -> std::result::Result<(), Box<dyn std::error::Error>> {
    // The destination: this program again, in another process.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--destination")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut url = String::new();
    out.read_line(&mut url)?;

    // The source region, filled from a store, tracked by the engine's dirty tracker.
    let store: DynStore = Arc::new(MemStore::new(SIZE));
    store.write(0, Bytes::from(vec![7u8; 8 << 20])).await?;
    let region = Arc::new(LazyRegion::new(store, region_cfg(WriteTracking::Dirty))?);

    // The application: a thread that writes pages while it holds the gate.
    let gate = Gate::new();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, g, stop) = (region.clone(), gate.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let _pass = g.enter();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for _ in 0..16 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 33) as usize % (r.len() / CHUNK) * CHUNK;
                    r.write_faulting(off, &x.to_le_bytes());
                }
                drop(_pass);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;

    let cfg = SourceConfig {
        mode,
        chunk_size: CHUNK as u64,
        max_downtime: Duration::from_millis(20),
        ..SourceConfig::default()
    };
    let dialer = Dialer::parse(url.trim())?;
    let rep = migrate_region(region.clone(), &dialer, &*gate, &cfg, &NoProgress).await?;
    println!(
        "{}: {} passes, downtime {:?}, {:.2}x the region sent, {} faults at the destination \
         (p50 {:?})",
        mode.name(),
        rep.passes.len(),
        rep.downtime,
        rep.wire_sent as f64 / SIZE as f64,
        rep.faults,
        rep.fault_p50
    );
    // The application runs at the destination now; here it stays suspended.
    let r = region.clone();
    let here = tokio::task::spawn_blocking(move || digest(&r)).await?;
    let mut there = String::new();
    out.read_line(&mut there)?;
    child.wait()?;
    stop.store(true, Ordering::Relaxed);
    gate.resume().await?;
    writer.join().map_err(|_| "writer panicked")?;
    println!("source      {here}\ndestination {}", there.trim());
    if here.to_string() != there.trim() {
        return Err("the regions differ".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "hybrid".into());
    if arg == "--destination" {
        return destination().await;
    }
    let mode = Mode::parse(&arg).ok_or("mode: precopy, postcopy or hybrid")?;
    source(mode).await
}
