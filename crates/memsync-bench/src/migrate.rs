//! `memsync bench migrate`: live migration of a 1 GiB store (64 MiB with `--quick`) while a
//! writer dirties random 4 KiB pages at 0, 50 and 500 MB/s, in each mode, over loopback TCP
//! and through the delay proxy at 30 ms RTT; downtime, total time, bytes sent against the
//! region, passes, and post-copy fault latency at the destination. Also the writer's
//! throughput with and without write tracking. The downtime limit is the pre-copy
//! target, 20 ms; the downtime measured runs from the suspend until the destination says it
//! resumed, so it includes two round trips (switch-over and commit, then the resume's answer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use memsync_core::{Bytes, DynStore, Result as StoreResult, Store, async_trait};
use memsync_local::MemStore;
use memsync_migrate::{
    DestConfig, Dialer, Hooks, Listener, Mode, SourceConfig, StoreTarget, Target,
};
use memsync_sync::{NoProgress, Tracked};
use memsync_testkit::proxy::{Proxy, ProxyConfig};
use rand::{Rng, RngCore, SeedableRng};

use crate::Env;
use crate::{Bench, Subject};

const PAGE: u64 = 4096;

/// Suspends the writer by taking the lock it writes under (its write in progress completes).
#[derive(Debug, Default)]
struct Pause {
    run: Arc<tokio::sync::Mutex<()>>,
    held: parking_lot::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
    stop: AtomicBool,
}

#[async_trait]
impl Hooks for Pause {
    async fn suspend(&self) -> StoreResult<()> {
        *self.held.lock() = Some(self.run.clone().lock_owned().await);
        Ok(())
    }
    async fn resume(&self) -> StoreResult<()> {
        self.held.lock().take();
        Ok(())
    }
}

/// Writes random pages at `rate` bytes/s (in 1 ms bursts) until stopped or suspended for good.
fn writer(store: DynStore, rate: u64, pause: Arc<Pause>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let pages = store.size() / PAGE;
        let page = Bytes::from(vec![0x5a; PAGE as usize]);
        let start = Instant::now();
        let mut written = 0u64;
        while !pause.stop.load(Relaxed) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            {
                let _g = pause.run.lock().await;
                if pause.stop.load(Relaxed) {
                    break;
                }
                while written < due {
                    let off = rng.random_range(0..pages) * PAGE;
                    if store.write(off, page.clone()).await.is_err() {
                        return written;
                    }
                    written += PAGE;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        written
    })
}

struct Outcome {
    downtime_ms: f64,
    total_s: f64,
    sent_ratio: f64,
    passes: f64,
    fault_p50_us: f64,
}

/// One migration of `src` (a filled store) in `mode` with a writer at `rate`, optionally
/// through the delay proxy at `rtt`.
async fn one(src: &DynStore, mode: Mode, rate: u64, rtt: Option<Duration>) -> Result<Outcome> {
    let size = src.size();
    let tracked = Tracked::new(src.clone(), PAGE);
    let pause = Arc::new(Pause::default());
    let w = writer(tracked.clone(), rate, pause.clone());
    let dst: DynStore = Arc::new(MemStore::new(size));
    let target = StoreTarget::new(dst);
    let l = Arc::new(Listener::bind("127.0.0.1:0", None).await?);
    let mut url = l.url();
    let resumed = Arc::new(tokio::sync::Notify::new());
    #[derive(Debug)]
    struct Resume(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl Hooks for Resume {
        async fn suspend(&self) -> StoreResult<()> {
            Ok(())
        }
        async fn resume(&self) -> StoreResult<()> {
            self.0.notify_one();
            Ok(())
        }
    }
    let t: Arc<dyn Target> = target.clone();
    let hooks = Resume(resumed.clone());
    let dest = tokio::spawn(async move {
        memsync_migrate::receive(l, t, &hooks, &DestConfig::default()).await
    });
    // After the switch-over the destination's application reads random pages: post-copy
    // faults on the missing ones.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let t: DynStore = target.clone();
        let done = done.clone();
        tokio::spawn(async move {
            resumed.notified().await;
            let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
            let mut b = vec![0u8; PAGE as usize];
            while !done.load(Relaxed) {
                let off = rng.random_range(0..size / PAGE) * PAGE;
                if t.read(off, &mut b).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    let _proxy = match rtt {
        Some(rtt) => {
            let p = Proxy::start(
                "127.0.0.1:0",
                url.trim_start_matches("migrate://"),
                ProxyConfig {
                    rtt,
                    ..ProxyConfig::default()
                },
            )
            .await?;
            url = format!("migrate://{}", p.local_addr());
            Some(p)
        }
        None => None,
    };
    let cfg = SourceConfig {
        mode,
        hybrid_passes: 1,
        max_downtime: Duration::from_millis(20),
        ..SourceConfig::default()
    };
    let r = memsync_migrate::migrate(
        tracked.clone(),
        tracked.clone(),
        &Dialer::parse(&url)?,
        &*pause,
        &cfg,
        &NoProgress,
    )
    .await
    .context("migration")?;
    let d = dest.await?.context("destination")?;
    done.store(true, Relaxed);
    pause.stop.store(true, Relaxed);
    pause.resume().await?;
    w.await?;
    reader.await?;
    Ok(Outcome {
        downtime_ms: r.downtime.as_secs_f64() * 1e3,
        total_s: r.total.as_secs_f64(),
        sent_ratio: r.wire_sent as f64 / size as f64,
        passes: r.passes.len() as f64,
        fault_p50_us: if d.faults > 0 {
            d.fault_p50.as_secs_f64() * 1e6
        } else {
            f64::NAN
        },
    })
}

pub fn run(b: &mut Bench, env: &Env<'_>) -> Result<()> {
    let size: u64 = if b.config.quick { 64 << 20 } else { 1 << 30 };
    let runs = b.config.runs();
    let src: DynStore = Arc::new(MemStore::new(size));
    env.rt.block_on(async {
        // Random contents with a hole of 1/8: zero chunks are not sent.
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut buf = vec![0u8; 8 << 20];
        for off in (0..size).step_by(buf.len()) {
            if off % (64 << 20) != 0 {
                rng.fill_bytes(&mut buf);
                src.write(off, Bytes::copy_from_slice(&buf)).await?;
            }
        }
        anyhow::Ok(())
    })?;
    let rates: &[u64] = &[0, 50, 500];
    let mut cases: Vec<(String, Mode, u64, Option<Duration>)> = Vec::new();
    for &rate in rates {
        for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
            cases.push((format!("{}-{rate}MBps", mode.name()), mode, rate, None));
        }
    }
    for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
        cases.push((
            format!("{}-50MBps-rtt30ms", mode.name()),
            mode,
            50,
            Some(Duration::from_millis(30)),
        ));
    }
    for (case, mode, rate, rtt) in cases {
        let mut o: Vec<Outcome> = Vec::new();
        for _ in 0..runs {
            o.push(env.rt.block_on(one(&src, mode, rate * 1_000_000, rtt))?);
        }
        let col = |f: fn(&Outcome) -> f64| o.iter().map(f).collect::<Vec<f64>>();
        b.record(&case, "memsync", "downtime", "ms", &col(|x| x.downtime_ms));
        b.record(&case, "memsync", "total", "s", &col(|x| x.total_s));
        b.record(
            &case,
            "memsync",
            "bytes-sent",
            "x region",
            &col(|x| x.sent_ratio),
        );
        if mode != Mode::Postcopy {
            b.record(&case, "memsync", "passes", "passes", &col(|x| x.passes));
        }
        // Only runs that had faults have a latency (a hybrid with nothing dirty has none).
        let faults: Vec<f64> = col(|x| x.fault_p50_us)
            .into_iter()
            .filter(|v| v.is_finite())
            .collect();
        if !faults.is_empty() {
            b.record(&case, "memsync", "fault-p50", "us", &faults);
        }
    }
    b.published(
        "postcopy-0MBps",
        "qemu postcopy-preempt, 10 GbE",
        "fault-p50",
        "us",
        229.0,
    );
    b.published(
        "precopy-50MBps",
        "qemu, one host, limit 300 ms",
        "downtime",
        "ms",
        483.0,
    );

    // What tracking costs the writer: random 4 KiB writes as fast as it goes, for 200 ms.
    let bytes_in = |store: DynStore| -> Result<f64> {
        env.rt.block_on(async {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
            let page = Bytes::from(vec![1u8; PAGE as usize]);
            let pages = store.size() / PAGE;
            let t = Instant::now();
            let n = AtomicU64::new(0);
            while t.elapsed() < Duration::from_millis(200) {
                for _ in 0..64 {
                    store
                        .write(rng.random_range(0..pages) * PAGE, page.clone())
                        .await?;
                    n.fetch_add(PAGE, Relaxed);
                }
            }
            anyhow::Ok(n.load(Relaxed) as f64 / t.elapsed().as_secs_f64() / 1e6)
        })
    };
    let tracked = Tracked::new(src.clone(), PAGE);
    b.pair(
        "tracking",
        ("write", "MB/s"),
        Subject::new("tracked", || bytes_in(tracked.clone())),
        Subject::new("untracked", || bytes_in(src.clone())),
    )?;
    Ok(())
}
