//! Migrations of a live memsync region (the kind (a)): the source region is tracked by
//! the engine's dirty tracker while a writer thread dirties it; the destination is a region
//! whose post-copy faults ask for their chunk on the urgent connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use memsync_core::{Bytes, DynStore, Result, Store, async_trait};
use memsync_local::MemStore;
use memsync_migrate::{
    DestConfig, DestReport, Dialer, Gate, Hooks, Listener, MigrateError, Mode, NoHooks,
    RegionSource, RegionTarget, Report, SourceConfig, SwitchReason, Throttle, migrate,
    migrate_region, receive_region,
};
use memsync_region::{LazyRegion, RegionConfig, WriteTracking};
use memsync_sync::{ChangeSource, NoProgress};
use memsync_testkit::proxy::{Proxy, ProxyConfig};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

type Log = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

fn apply(log: &Log, base: &mut [u8]) {
    for (off, d) in log.lock().iter() {
        base[*off..*off + d.len()].copy_from_slice(d);
    }
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill(&mut v[..]);
    // Holes: zero chunks travel as ZERO runs and stay absent at the destination until touched.
    for k in (0..len).step_by(1 << 20) {
        v[k..(k + (256 << 10)).min(len)].fill(0);
    }
    v
}

fn region_cfg(tracking: WriteTracking) -> RegionConfig {
    RegionConfig {
        chunk_size: PAGE,
        write_tracking: tracking,
        huge_pages: false,
        // Faults wait across a cut (longer than the recovery timeout).
        fetch_deadline: Duration::from_secs(120),
        ..RegionConfig::default()
    }
}

async fn source_region(initial: &[u8]) -> Arc<LazyRegion> {
    let s: DynStore = Arc::new(MemStore::new(initial.len() as u64));
    s.write(0, Bytes::copy_from_slice(initial)).await.unwrap();
    Arc::new(LazyRegion::new(s, region_cfg(WriteTracking::Dirty)).unwrap())
}

fn contents(r: &LazyRegion) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    r.read_at(0, &mut v).unwrap();
    v
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: contents differ (BLAKE3 {} vs {}), first at byte {at}",
            blake3::hash(got),
            blake3::hash(want)
        );
    }
}

/// A thread of the application: writes `len` random bytes at random offsets of `region`,
/// bursts of 8 every millisecond, while it holds the gate; through the page fault path
/// (`faulting`: raw memory accesses, as the application's own code would make) or the safe
/// accessor. Returns the number of writes.
fn writer(
    region: Arc<LazyRegion>,
    gate: Arc<Gate>,
    log: Log,
    stop: Arc<AtomicBool>,
    seed: u64,
    len: usize,
    faulting: bool,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let pages = region.len() / PAGE;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            {
                let _p = gate.enter();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for _ in 0..8 {
                    let off =
                        rng.random_range(0..pages) * PAGE + rng.random_range(0..PAGE - len + 1);
                    let mut d = vec![0u8; len];
                    rng.fill(&mut d[..]);
                    if faulting {
                        // Reads fault too: check that a fetched page is the source's.
                        let mut b = vec![0u8; len];
                        region.read_faulting(off, &mut b);
                        region.write_faulting(off, &d);
                    } else {
                        region.write_at(off, &d).unwrap();
                    }
                    log.lock().push((off, d));
                    n += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    })
}

/// The destination's resume hook: starts its application.
struct OnResume(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl std::fmt::Debug for OnResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OnResume")
    }
}

#[async_trait]
impl Hooks for OnResume {
    async fn suspend(&self) -> Result<()> {
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        if let Some(f) = self.0.lock().take() {
            f();
        }
        Ok(())
    }
}

impl OnResume {
    fn new(f: impl FnOnce() + Send + 'static) -> Arc<Self> {
        Arc::new(OnResume(Mutex::new(Some(Box::new(f)))))
    }
}

async fn listen() -> (Arc<Listener>, String) {
    let l = Arc::new(Listener::bind("127.0.0.1:0", None).await.unwrap());
    let url = l.url();
    (l, url)
}

struct Run {
    report: Report,
    dest: DestReport,
    source_writes: u64,
    dest_writes: u64,
}

/// Migrate a 16 MiB region in `mode` while a thread writes it, then keep writing at the
/// destination after it resumes there (post-copy faults through raw memory accesses). Checks
/// that the source kept exactly its contents and the destination holds them plus its own
/// writes.
async fn run_mode(mode: Mode) -> Run {
    let size = 16usize << 20;
    let initial = random(1, size);
    let src = source_region(&initial).await;
    let gate = Gate::new();
    let (slog, stop) = (Log::default(), Arc::new(AtomicBool::new(false)));
    let sw = writer(
        src.clone(),
        gate.clone(),
        slog.clone(),
        stop.clone(),
        7,
        PAGE,
        false,
    );

    let target = RegionTarget::new(size as u64, region_cfg(WriteTracking::Off)).unwrap();
    let (dlog, dstop) = (Log::default(), Arc::new(AtomicBool::new(false)));
    let dw: Arc<Mutex<Option<JoinHandle<u64>>>> = Arc::default();
    let hooks = {
        let (r, dlog, dstop, dw) = (
            target.region().clone(),
            dlog.clone(),
            dstop.clone(),
            dw.clone(),
        );
        OnResume::new(move || {
            *dw.lock() = Some(writer(r, Gate::new(), dlog, dstop, 8, 64, true));
        })
    };
    let (l, url) = listen().await;
    let t = target.clone();
    let dest =
        tokio::spawn(async move { receive_region(l, t, &*hooks, &DestConfig::default()).await });
    // The writer must have run before the migration starts: post-copy suspends it at once,
    // and on a loaded machine its thread may not have been scheduled by then.
    while slog.lock().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cfg = SourceConfig {
        mode,
        chunk_size: PAGE as u64,
        ..SourceConfig::default()
    };
    let report = migrate_region(
        src.clone(),
        &Dialer::parse(&url).unwrap(),
        &*gate,
        &cfg,
        &NoProgress,
    )
    .await
    .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    let dreport = dest.await.unwrap().expect("destination");
    // The source stays suspended: its contents are the initial ones plus what it wrote.
    let src_final = contents(&src);
    stop.store(true, Ordering::Relaxed);
    gate.resume().await.unwrap();
    let source_writes = sw.join().unwrap();
    dstop.store(true, Ordering::Relaxed);
    let dest_writes = dw.lock().take().expect("resumed").join().unwrap();
    let mut expected = initial;
    apply(&slog, &mut expected);
    assert_same("source", &src_final, &expected);
    apply(&dlog, &mut expected);
    assert_same(mode.name(), &contents(target.region()), &expected);
    assert!(source_writes > 0, "the writer never ran");
    assert!(report.downtime > Duration::ZERO);
    Run {
        report,
        dest: dreport,
        source_writes,
        dest_writes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_precopy_with_a_writer_arrives_identical() {
    let r = run_mode(Mode::Precopy).await;
    assert!(!r.report.postcopy);
    assert_eq!(r.dest.faults, 0);
    eprintln!(
        "{} source writes, {} dest writes, {:?}",
        r.source_writes, r.dest_writes, r.report
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_postcopy_with_writers_on_both_sides_arrives_identical() {
    let r = run_mode(Mode::Postcopy).await;
    assert!(r.report.postcopy);
    eprintln!(
        "{} source writes, {} dest writes, {:?} {:?}",
        r.source_writes, r.dest_writes, r.report, r.dest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_hybrid_with_writers_on_both_sides_arrives_identical() {
    let r = run_mode(Mode::Hybrid).await;
    assert!(r.report.postcopy || r.report.remaining_chunks == 0);
    assert!(!r.report.passes.is_empty());
}

/// A cut after the commit of a post-copy migration: a fault on a missing chunk waits (no
/// SIGBUS) until the source reconnects, then gets the source's bytes; the region ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_cut_during_postcopy_pauses_faults_then_completes_identical() {
    let size = 16usize << 20;
    let initial = random(4, size);
    let src = source_region(&initial).await;
    let target = RegionTarget::new(size as u64, region_cfg(WriteTracking::Off)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = Mutex::new(Some(tx));
    let hooks = OnResume::new(move || {
        let _ = tx.lock().take().unwrap().send(());
    });
    let (l, url) = listen().await;
    let t = target.clone();
    let dest =
        tokio::spawn(async move { receive_region(l, t, &*hooks, &DestConfig::default()).await });
    // Slow enough that the cut comes in the middle of the background stream.
    let proxy = Arc::new(
        Proxy::start(
            "127.0.0.1:0",
            url.trim_start_matches("migrate://"),
            ProxyConfig {
                bandwidth: Some(16 << 20),
                ..ProxyConfig::default()
            },
        )
        .await
        .unwrap(),
    );
    let dialer = Dialer::parse(&format!("migrate://{}", proxy.local_addr())).unwrap();
    let cfg = SourceConfig {
        mode: Mode::Postcopy,
        chunk_size: PAGE as u64,
        recovery_timeout: Duration::from_secs(30),
        ..SourceConfig::default()
    };
    let (p, t) = (proxy.clone(), target.clone());
    let reader = std::thread::spawn(move || {
        rx.recv().unwrap();
        p.set_blocked(true);
        p.cut_all();
        // A chunk with data that is still missing: its fault waits through the cut.
        let held = memsync_migrate::Target::held(&*t);
        let missing = (0..held.len())
            .rev()
            .find(|&i| !held.contains(i) && initial[i as usize * PAGE] != 0)
            .unwrap() as usize;
        let r = t.region().clone();
        let read = std::thread::spawn(move || {
            let mut b = vec![0u8; PAGE];
            r.read_faulting(missing * PAGE, &mut b);
            b
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !read.is_finished(),
            "a missing chunk was read during the cut"
        );
        p.set_blocked(false);
        let page = read.join().unwrap();
        assert_eq!(&page[..], &initial[missing * PAGE..(missing + 1) * PAGE]);
        initial
    });
    let report = migrate_region(src.clone(), &dialer, &NoHooks, &cfg, &NoProgress)
        .await
        .expect("migration across the cut");
    let dreport = dest.await.unwrap().expect("destination");
    let initial = reader.join().unwrap();
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(dreport.reconnects >= 1, "{dreport:?}");
    assert!(dreport.faults >= 1, "{dreport:?}");
    assert_same("after the cut", &contents(target.region()), &initial);
    assert_same("source", &contents(&src), &initial);
}

/// A destination that dies after the commit leaves the source region with every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_destination_killed_after_the_commit_leaves_the_source_whole() {
    let size = 8usize << 20;
    let initial = random(5, size);
    let src = source_region(&initial).await;
    let target = RegionTarget::new(size as u64, region_cfg(WriteTracking::Off)).unwrap();
    let killed = Arc::new(tokio::sync::Notify::new());
    let k = killed.clone();
    let hooks = OnResume::new(move || k.notify_one());
    let (l, url) = listen().await;
    let t = target.clone();
    let dest =
        tokio::spawn(async move { receive_region(l, t, &*hooks, &DestConfig::default()).await });
    let proxy = Proxy::start(
        "127.0.0.1:0",
        url.trim_start_matches("migrate://"),
        ProxyConfig {
            bandwidth: Some(4 << 20),
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();
    let dialer = Dialer::parse(&format!("migrate://{}", proxy.local_addr())).unwrap();
    let cfg = SourceConfig {
        mode: Mode::Postcopy,
        chunk_size: PAGE as u64,
        recovery_timeout: Duration::from_millis(500),
        ..SourceConfig::default()
    };
    let kill = async {
        killed.notified().await;
        dest.abort();
        proxy.cut_all();
    };
    let (r, ()) = tokio::join!(
        migrate_region(src.clone(), &dialer, &NoHooks, &cfg, &NoProgress),
        kill
    );
    match r {
        Err(MigrateError::AfterCommit(e)) => eprintln!("after commit: {}", e.chain()),
        other => panic!("expected a failure after the commit, got {other:?}"),
    }
    assert_same("source", &contents(&src), &initial);
    // The destination's pending faults fail instead of waiting forever.
    target.fail("killed");
}

/// Auto-converge: a writer that dirties the whole region over and over never lets pre-copy
/// converge; holding it suspended for most of each period (through the same gate that
/// suspends it for the switch-over) does. Judged by the outcome (why the passes ended), not
/// by times: while the writer may run, each dirty scan waits until it swept the whole region
/// once more (so a starved writer cannot make a pass converge), and the throttle's suspended
/// part (990 ms) outlasts a pass of the whole region.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_converge_makes_a_writer_too_fast_for_precopy_converge() {
    /// The region's tracker, whose scans wait for a full sweep of the writer while it runs.
    #[derive(Debug)]
    struct Sweeping {
        inner: Arc<RegionSource>,
        gate: Arc<Gate>,
        sweeps: Arc<std::sync::atomic::AtomicU64>,
        seen: std::sync::atomic::AtomicU64,
    }
    #[async_trait]
    impl ChangeSource for Sweeping {
        async fn take_changes(&self) -> Result<Vec<std::ops::Range<u64>>> {
            let seen = self.seen.load(Ordering::Relaxed);
            while !self.gate.is_closed() && self.sweeps.load(Ordering::Relaxed) <= seen + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.seen
                .store(self.sweeps.load(Ordering::Relaxed), Ordering::Relaxed);
            self.inner.take_changes().await
        }
    }
    async fn run(throttle: Option<Throttle>) -> Report {
        let size = 16usize << 20;
        let initial = random(9, size);
        let src = source_region(&initial).await;
        let gate = Gate::new();
        let stop = Arc::new(AtomicBool::new(false));
        let sweeps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w = {
            let (r, g, stop, sweeps) = (src.clone(), gate.clone(), stop.clone(), sweeps.clone());
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for batch in (0..r.len() / PAGE).step_by(64) {
                        let _p = g.enter();
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        for p in batch..batch + 64 {
                            x = x.wrapping_add(1);
                            r.write_at(p * PAGE, &x.to_le_bytes()).unwrap();
                        }
                    }
                    sweeps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let target = RegionTarget::new(size as u64, region_cfg(WriteTracking::Off)).unwrap();
        let (l, url) = listen().await;
        let t = target.clone();
        let dest =
            tokio::spawn(
                async move { receive_region(l, t, &NoHooks, &DestConfig::default()).await },
            );
        let cfg = SourceConfig {
            mode: Mode::Precopy,
            chunk_size: PAGE as u64,
            max_downtime: Duration::from_millis(1),
            max_passes: 8,
            auto_converge: throttle,
            ..SourceConfig::default()
        };
        let rs = RegionSource::new(src.clone()).unwrap();
        let changes = Arc::new(Sweeping {
            inner: rs.clone(),
            gate: gate.clone(),
            sweeps,
            seen: Default::default(),
        });
        let rep = migrate(
            rs,
            changes,
            &Dialer::parse(&url).unwrap(),
            &*gate,
            &cfg,
            &NoProgress,
        )
        .await
        .unwrap();
        dest.await.unwrap().unwrap();
        let want = contents(&src);
        stop.store(true, Ordering::Relaxed);
        gate.resume().await.unwrap();
        w.join().unwrap();
        assert_same("auto-converge", &contents(target.region()), &want);
        eprintln!(
            "{:?}: {:?}",
            rep.reason,
            rep.passes
                .iter()
                .map(|p| (p.dirty_after, p.throttle_percent))
                .collect::<Vec<_>>()
        );
        rep
    }
    let without = run(None).await;
    assert_eq!(without.reason, SwitchReason::NotConverged, "{without:?}");
    assert!(without.passes.iter().all(|p| p.throttle_percent == 0));
    let with = run(Some(Throttle {
        initial: 0.99,
        increment: 0.0,
        max: 0.99,
        period: Duration::from_secs(1),
    }))
    .await;
    assert_eq!(with.reason, SwitchReason::Converged, "{with:?}");
    assert!(with.passes.iter().any(|p| p.throttle_percent == 99));
}

/// With compression offered and granted, compressible chunks travel as LZ4 blocks (fewer
/// bytes than the region) and arrive identical; incompressible ones go as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_bulk_stream_arrives_identical() {
    let size = 8usize << 20;
    // Half text-like, half random.
    let mut initial: Vec<u8> = b"memsync migrates live memory regions; "
        .iter()
        .copied()
        .cycle()
        .take(size / 2)
        .collect();
    initial.extend_from_slice(&random(13, size / 2));
    let src = source_region(&initial).await;
    let mut sent = Vec::new();
    for compress in [false, true] {
        let target = RegionTarget::new(size as u64, region_cfg(WriteTracking::Off)).unwrap();
        let (l, url) = listen().await;
        let t = target.clone();
        let dest =
            tokio::spawn(
                async move { receive_region(l, t, &NoHooks, &DestConfig::default()).await },
            );
        let cfg = SourceConfig {
            mode: Mode::Hybrid,
            chunk_size: PAGE as u64,
            compress,
            ..SourceConfig::default()
        };
        let rep = migrate_region(
            src.clone(),
            &Dialer::parse(&url).unwrap(),
            &NoHooks,
            &cfg,
            &NoProgress,
        )
        .await
        .unwrap();
        dest.await.unwrap().unwrap();
        assert_same("compressed", &contents(target.region()), &initial);
        sent.push(rep.wire_sent);
    }
    // The text half shrinks; the random half and the zero holes cost what they did.
    assert!(sent[1] < sent[0] * 3 / 4, "{sent:?}");
    assert!(sent[0] > size as u64 / 2, "{sent:?}");
}
