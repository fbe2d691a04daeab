//! End-to-end migrations of a store (the region kind (b)) between a source and a
//! destination in this process, over TCP, unix sockets, TLS and the delay/cut proxy, with a
//! writer dirtying pages during the migration.

// One test binary for the crate: the region kind and the live-region push are modules.
#[path = "migrate/push_region.rs"]
mod push_region;
#[path = "migrate/region.rs"]
mod region;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use memsync_core::layers::{Inject, InjectControl, OpKind};
use memsync_core::{Bytes, DynStore, Result, Store, async_trait};
use memsync_local::MemStore;
use memsync_migrate::{
    DestConfig, DestReport, Dialer, Fallback, Hooks, Listener, MigrateError, Mode, NoHooks, Report,
    SourceConfig, StoreTarget, SwitchReason, Target, Verify, migrate, receive,
};
use memsync_sync::{ChangeSource, NoProgress, Tracked};
use memsync_testkit::proxy::{Proxy, ProxyConfig};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;

/// Every write the application made, in order, so the expected contents can be rebuilt.
#[derive(Default)]
struct Log(Mutex<Vec<(u64, Bytes)>>);

impl Log {
    fn apply(&self, base: &mut [u8]) {
        for (off, d) in self.0.lock().iter() {
            base[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
    }
}

/// An application: writes random pages through `store` until suspended; suspending waits for
/// the write in progress (as SIGSTOP does for a system call).
struct App {
    run: Arc<tokio::sync::Mutex<()>>,
    held: Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
    suspends: AtomicU64,
    resumes: AtomicU64,
    writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App")
    }
}

impl App {
    fn new() -> Arc<App> {
        Arc::new(App {
            run: Arc::new(tokio::sync::Mutex::new(())),
            held: Mutex::new(None),
            suspends: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            writes: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Write a random page every `every` (bursts of `burst`), through `store`, logging it.
    fn start(
        self: &Arc<Self>,
        store: DynStore,
        log: Arc<Log>,
        seed: u64,
        every: Duration,
        burst: usize,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let pages = store.size() / PAGE;
            while !me.stop.load(Ordering::Relaxed) {
                {
                    let _g = me.run.lock().await;
                    if me.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    for _ in 0..burst {
                        let off = rng.random_range(0..pages) * PAGE;
                        let mut d = vec![0u8; PAGE as usize];
                        rng.fill(&mut d[..]);
                        let d = Bytes::from(d);
                        // Log under the run lock, in the order the store sees the writes.
                        store.write(off, d.clone()).await.expect("app write");
                        log.0.lock().push((off, d));
                        me.writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

#[async_trait]
impl Hooks for App {
    async fn suspend(&self) -> Result<()> {
        let g = self.run.clone().lock_owned().await;
        *self.held.lock() = Some(g);
        self.suspends.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        self.held.lock().take();
        self.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill(&mut v[..]);
    // Holes: zero chunks are not sent as bytes.
    for k in (0..len).step_by(1 << 20) {
        v[k..(k + (256 << 10)).min(len)].fill(0);
    }
    v
}

async fn contents(s: &dyn Store) -> Vec<u8> {
    let mut v = vec![0u8; s.size() as usize];
    s.read(0, &mut v).await.unwrap();
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

async fn mem_with(data: &[u8]) -> DynStore {
    let s: DynStore = Arc::new(MemStore::new(data.len() as u64));
    s.write(0, Bytes::copy_from_slice(data)).await.unwrap();
    s
}

struct Dest {
    store: DynStore,
    target: Arc<StoreTarget>,
    task: tokio::task::JoinHandle<Result<DestReport>>,
    url: String,
}

async fn destination(
    size: u64,
    hooks: Arc<dyn Hooks>,
    cfg: DestConfig,
    at: &str,
    wrap: impl FnOnce(DynStore) -> DynStore,
) -> Dest {
    let store: DynStore = Arc::new(MemStore::new(size));
    // Old contents that must all be replaced.
    store
        .write(0, Bytes::from(vec![0xAA; size as usize]))
        .await
        .unwrap();
    let target = StoreTarget::new(wrap(store.clone()));
    let l = Arc::new(Listener::bind(at, None).await.unwrap());
    let url = l.url();
    let t: Arc<dyn Target> = target.clone();
    let task = tokio::spawn(async move { receive(l, t, &*hooks, &cfg).await });
    Dest {
        store,
        target,
        task,
        url,
    }
}

struct Run {
    report: Report,
    dest: DestReport,
    /// What the source holds at the end, and what the application wrote (source then dest).
    src_final: Vec<u8>,
    dst_final: Vec<u8>,
    src_expected: Vec<u8>,
    expected: Vec<u8>,
    source_writes: u64,
}

/// Migrate a 16 MiB store in `mode` while an application writes to it, then keep writing at
/// the destination after it resumes there (post-copy faults).
async fn run_mode(mode: Mode, cfg_edit: impl FnOnce(&mut SourceConfig)) -> Run {
    run_with(mode, cfg_edit, None, true).await
}

/// Reports the tracker's changes plus chunks that were not written: `grow` more each call, or
/// the same 20 each call (a writer that never lets the passes converge, deterministically).
#[derive(Debug)]
struct Extra {
    inner: Arc<Tracked>,
    calls: AtomicU64,
    grow: bool,
}

#[async_trait]
impl ChangeSource for Extra {
    async fn take_changes(&self) -> Result<Vec<std::ops::Range<u64>>> {
        let mut v = self.inner.take_changes().await?;
        let k = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let n = if self.grow { 10 * k } else { 20 };
        v.push(0..n * (64 << 10));
        Ok(v)
    }
}

async fn run_with(
    mode: Mode,
    cfg_edit: impl FnOnce(&mut SourceConfig),
    extra: Option<bool>,
    write: bool,
) -> Run {
    let size = 16u64 << 20;
    let initial = random(1, size as usize);
    let raw = mem_with(&initial).await;
    let tracked = Tracked::new(raw.clone(), PAGE);
    let log = Arc::new(Log::default());
    let app = App::new();
    let writer =
        write.then(|| app.start(tracked.clone(), log.clone(), 7, Duration::from_millis(1), 8));
    // The destination's application starts writing when it is resumed there.
    let dapp = App::new();
    let dlog = Arc::new(Log::default());
    let resumed = Arc::new(tokio::sync::Notify::new());
    #[derive(Debug)]
    struct Resume(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl Hooks for Resume {
        async fn suspend(&self) -> Result<()> {
            Ok(())
        }
        async fn resume(&self) -> Result<()> {
            self.0.notify_one();
            Ok(())
        }
    }
    let dest = destination(
        size,
        Arc::new(Resume(resumed.clone())),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let target = dest.target.clone();
    let dwriter = {
        let dapp = dapp.clone();
        let dlog = dlog.clone();
        tokio::spawn(async move {
            resumed.notified().await;
            let t: DynStore = target;
            dapp.start(t, dlog, 8, Duration::from_millis(1), 4)
                .await
                .unwrap();
        })
    };
    let mut cfg = SourceConfig {
        mode,
        chunk_size: 64 << 10,
        ..SourceConfig::default()
    };
    cfg_edit(&mut cfg);
    let dialer = Dialer::parse(&dest.url).unwrap();
    let changes: Arc<dyn ChangeSource> = match extra {
        Some(grow) => Arc::new(Extra {
            inner: tracked.clone(),
            calls: AtomicU64::new(0),
            grow,
        }),
        None => tracked.clone(),
    };
    let report = migrate(tracked.clone(), changes, &dialer, &*app, &cfg, &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    let dreport = dest.task.await.unwrap().expect("destination");
    // The source stays suspended after a migration: no write after the suspend.
    let source_writes = app.writes.load(Ordering::Relaxed);
    app.stop.store(true, Ordering::Relaxed);
    app.resume().await.unwrap();
    if let Some(w) = writer {
        w.await.unwrap();
    }
    dapp.stop.store(true, Ordering::Relaxed);
    dwriter.await.unwrap();
    let mut src_expected = initial;
    log.apply(&mut src_expected);
    let mut expected = src_expected.clone();
    dlog.apply(&mut expected);
    Run {
        report,
        dest: dreport,
        src_final: contents(&*raw).await,
        dst_final: contents(&*dest.store).await,
        src_expected,
        expected,
        source_writes,
    }
}

fn check(r: &Run, what: &str) {
    check_contents(r, what);
    assert!(r.source_writes > 0, "{what}: the writer never ran");
}

fn check_contents(r: &Run, what: &str) {
    assert_same(what, &r.dst_final, &r.expected);
    // The source's store is untouched by the migration.
    assert_same(what, &r.src_final, &r.src_expected);
    assert!(r.report.downtime > Duration::ZERO, "{what}: {:?}", r.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn precopy_with_a_writer_arrives_identical() {
    let r = run_mode(Mode::Precopy, |_| {}).await;
    check(&r, "precopy");
    assert!(!r.report.postcopy);
    assert!(!r.report.passes.is_empty());
    assert_eq!(r.dest.faults, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postcopy_with_writers_on_both_sides_arrives_identical() {
    let r = run_mode(Mode::Postcopy, |_| {}).await;
    check(&r, "postcopy");
    assert!(r.report.postcopy && r.report.passes.is_empty());
    assert_eq!(r.report.reason, SwitchReason::Postcopy);
    assert_eq!(r.dest.missing_at_switchover, 256);
    // The destination's writer touched missing chunks: some were requested on the urgent path.
    assert!(r.dest.faults > 0, "{:?}", r.dest);
    assert!(r.report.urgent_served > 0, "{:?}", r.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hybrid_with_writers_on_both_sides_arrives_identical() {
    // A downtime limit nothing meets and chunks that are always dirty (besides the writer's),
    // so the pass count decides and post-copy has work.
    let r = run_with(
        Mode::Hybrid,
        |c| {
            c.max_downtime = Duration::ZERO;
            c.hybrid_passes = 2;
        },
        Some(false),
        true,
    )
    .await;
    check(&r, "hybrid");
    assert!(r.report.postcopy);
    assert_eq!(r.report.passes.len(), 2, "{:?}", r.report);
    assert_eq!(r.report.reason, SwitchReason::HybridPasses);
    assert!(r.dest.missing_at_switchover >= 20, "{:?}", r.dest);
}

/// KVM's rule: two passes whose dirty set grew, or the pass limit, end pre-copy; then the
/// fallback applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn precopy_that_never_converges_falls_back_by_kvms_rule() {
    for (grow, fallback, passes) in [
        // Dirty 10, 20, 30 chunks after passes 1, 2, 3: the second growth ends it at pass 3.
        (true, Fallback::StopAndCopy, 3),
        (true, Fallback::Postcopy, 3),
        // 20 dirty chunks after every pass: never grows, the limit of 5 passes ends it.
        (false, Fallback::StopAndCopy, 5),
    ] {
        let r = run_with(
            Mode::Precopy,
            |c| {
                c.max_downtime = Duration::ZERO;
                c.max_passes = 5;
                c.fallback = fallback;
            },
            Some(grow),
            // Without writes of its own the dirty counts are exactly the made-up ones.
            false,
        )
        .await;
        let what = format!("grow {grow}, {fallback:?}");
        check_contents(&r, &what);
        assert_eq!(r.report.reason, SwitchReason::NotConverged, "{what}");
        assert_eq!(r.report.postcopy, fallback == Fallback::Postcopy, "{what}");
        assert_eq!(
            r.report.passes.len(),
            passes,
            "{what}: {:?}",
            r.report.passes
        );
    }
}

/// Any failure before the commit aborts: the source resumes unchanged, with every write the
/// application made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_before_the_commit_aborts_and_the_source_runs_on() {
    let size = 8u64 << 20;
    let initial = random(2, size as usize);
    // Two ways to fail: a cut of every connection during the first pass, and a destination
    // whose flush at the switch-over fails (after the source suspended).
    // A black-holed link (no error, no data) fails by the timeouts on both sides.
    for case in [
        "cut during a pass",
        "destination flush fails",
        "link black-holed",
    ] {
        let raw = mem_with(&initial).await;
        let tracked = Tracked::new(raw.clone(), PAGE);
        let log = Arc::new(Log::default());
        let app = App::new();
        let writer = app.start(tracked.clone(), log.clone(), 3, Duration::from_millis(1), 4);
        let control = InjectControl::new();
        let c2 = control.clone();
        let dest = destination(
            size,
            Arc::new(NoHooks),
            DestConfig {
                idle_timeout: Duration::from_millis(500),
                ..DestConfig::default()
            },
            "127.0.0.1:0",
            move |s| Arc::new(Inject::with_control(s, c2)),
        )
        .await;
        let proxy = Proxy::start(
            "127.0.0.1:0",
            dest.url.trim_start_matches("migrate://"),
            ProxyConfig {
                bandwidth: Some(8 << 20),
                ..ProxyConfig::default()
            },
        )
        .await
        .unwrap();
        let dialer = Dialer::parse(&format!("migrate://{}", proxy.local_addr())).unwrap();
        if case == "destination flush fails" {
            control.fail_always(OpKind::Flush);
            proxy.set_bandwidth(None);
        }
        let cfg = SourceConfig {
            reply_timeout: Duration::from_millis(500),
            ..SourceConfig::default()
        };
        let mig = migrate(
            tracked.clone(),
            tracked.clone(),
            &dialer,
            &*app,
            &cfg,
            &NoProgress,
        );
        let cut = async {
            if case == "cut during a pass" {
                // Cut once the first pass is under way.
                while proxy.stats().up_bytes < 1 << 20 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                proxy.cut_all();
            }
            if case == "link black-holed" {
                while proxy.stats().up_bytes < 1 << 20 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                proxy.set_blocked(true);
            }
        };
        let (r, ()) = tokio::join!(mig, cut);
        match r {
            Err(MigrateError::Aborted(e)) => {
                let want = match case {
                    "cut during a pass" => "connection closed",
                    "destination flush fails" => "injected fault in flush",
                    _ => "within 500ms",
                };
                assert!(e.chain().contains(want), "{case}: {}", e.chain());
            }
            other => panic!("{case}: expected an abort, got {other:?}"),
        }
        let de = dest
            .task
            .await
            .unwrap()
            .expect_err("the destination fails too");
        if case == "link black-holed" {
            assert!(
                de.chain().contains("nothing from the source"),
                "{}",
                de.chain()
            );
        }
        // Resumed if it had been suspended; and it keeps running: more writes arrive.
        assert_eq!(
            app.suspends.load(Ordering::Relaxed),
            app.resumes.load(Ordering::Relaxed),
            "{case}"
        );
        if case == "destination flush fails" {
            assert_eq!(app.suspends.load(Ordering::Relaxed), 1, "{case}");
        }
        let before = app.writes.load(Ordering::Relaxed);
        while app.writes.load(Ordering::Relaxed) < before + 10 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        app.stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        let mut expected = initial.clone();
        log.apply(&mut expected);
        assert_same(case, &contents(&*raw).await, &expected);
    }
}

/// After the commit of a post-copy migration, a cut pauses the destination's readers until the
/// source reconnects; the two agree on what the destination holds and finish with identical
/// contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_during_postcopy_pauses_then_completes_identical() {
    let size = 16u64 << 20;
    let initial = random(4, size as usize);
    let raw = mem_with(&initial).await;
    let tracked = Tracked::new(raw.clone(), PAGE);
    let resumed = Arc::new(tokio::sync::Notify::new());
    #[derive(Debug)]
    struct Resume(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl Hooks for Resume {
        async fn suspend(&self) -> Result<()> {
            Ok(())
        }
        async fn resume(&self) -> Result<()> {
            self.0.notify_one();
            Ok(())
        }
    }
    let dest = destination(
        size,
        Arc::new(Resume(resumed.clone())),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    // Slow enough that the cut comes in the middle of the background stream.
    let proxy = Arc::new(
        Proxy::start(
            "127.0.0.1:0",
            dest.url.trim_start_matches("migrate://"),
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
        chunk_size: 64 << 10,
        recovery_timeout: Duration::from_secs(30),
        ..SourceConfig::default()
    };
    let target = dest.target.clone();
    let p = proxy.clone();
    let reader = tokio::spawn(async move {
        resumed.notified().await;
        // Cut and black-hole the link, then read a chunk that is still missing: the read waits.
        p.set_blocked(true);
        p.cut_all();
        let held = target.held();
        let missing = (0..held.len()).rev().find(|&i| !held.contains(i)).unwrap();
        let t: DynStore = target.clone();
        let read = tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            t.read(missing * (64 << 10), &mut b).await.map(|()| b)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !read.is_finished(),
            "a missing chunk was read during the cut"
        );
        p.set_blocked(false);
        (missing, read.await.unwrap().expect("read after the cut"))
    });
    let report = migrate(
        tracked.clone(),
        tracked.clone(),
        &dialer,
        &NoHooks,
        &cfg,
        &NoProgress,
    )
    .await
    .expect("migration across the cut");
    let dreport = dest.task.await.unwrap().expect("destination");
    let (missing, page) = reader.await.unwrap();
    let off = (missing * (64 << 10)) as usize;
    assert_eq!(&page[..], &initial[off..off + 4096]);
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(dreport.reconnects >= 1, "{dreport:?}");
    assert_same("after the cut", &contents(&*dest.store).await, &initial);
}

/// A destination that dies after the commit leaves the source with every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_killed_after_the_commit_leaves_the_source_whole() {
    let size = 8u64 << 20;
    let initial = random(5, size as usize);
    let raw = mem_with(&initial).await;
    let tracked = Tracked::new(raw.clone(), PAGE);
    let killed = Arc::new(tokio::sync::Notify::new());
    #[derive(Debug)]
    struct Resume(Arc<tokio::sync::Notify>);
    #[async_trait]
    impl Hooks for Resume {
        async fn suspend(&self) -> Result<()> {
            Ok(())
        }
        async fn resume(&self) -> Result<()> {
            self.0.notify_one();
            Ok(())
        }
    }
    let dest = destination(
        size,
        Arc::new(Resume(killed.clone())),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let proxy = Proxy::start(
        "127.0.0.1:0",
        dest.url.trim_start_matches("migrate://"),
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
        recovery_timeout: Duration::from_millis(500),
        ..SourceConfig::default()
    };
    let task = dest.task;
    let kill = async {
        killed.notified().await;
        task.abort();
        proxy.cut_all();
    };
    let (r, ()) = tokio::join!(
        migrate(
            tracked.clone(),
            tracked.clone(),
            &dialer,
            &NoHooks,
            &cfg,
            &NoProgress
        ),
        kill
    );
    match r {
        Err(MigrateError::AfterCommit(e)) => eprintln!("after commit: {}", e.chain()),
        other => panic!("expected a failure after the commit, got {other:?}"),
    }
    assert_same("source", &contents(&*raw).await, &initial);
}

fn make_certs(dir: &std::path::Path, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

/// Over TLS and a unix socket; a source that does not trust the certificate gets an error and
/// the destination nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_and_unix_sockets() {
    let size = 4u64 << 20;
    let initial = random(6, size as usize);
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), "dest.test");
    let tls =
        memsync_nbd::server_tls_config(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
            .unwrap();
    let sock = dir.path().join("m.sock");
    for (at, tls) in [
        ("127.0.0.1:0".to_owned(), Some(tls)),
        (format!("unix:{}", sock.display()), None),
    ] {
        let src = mem_with(&initial).await;
        let tracked = Tracked::new(src, PAGE);
        let store: DynStore = Arc::new(MemStore::new(size));
        let target = StoreTarget::new(store.clone());
        let l = Arc::new(Listener::bind(&at, tls.clone()).await.unwrap());
        let url = if tls.is_some() {
            format!(
                "{}?tls-ca={}&tls-hostname=dest.test",
                l.url(),
                dir.path().join("ca.pem").display()
            )
        } else {
            l.url()
        };
        let t: Arc<dyn Target> = target.clone();
        let task =
            tokio::spawn(async move { receive(l, t, &NoHooks, &DestConfig::default()).await });
        if tls.is_some() {
            // Another CA: the handshake fails, nothing is migrated.
            let other = tempfile::tempdir().unwrap();
            make_certs(other.path(), "dest.test");
            let bad = url.replace(
                &dir.path().join("ca.pem").display().to_string(),
                &other.path().join("ca.pem").display().to_string(),
            );
            let r = migrate(
                tracked.clone(),
                tracked.clone(),
                &Dialer::parse(&bad).unwrap(),
                &NoHooks,
                &SourceConfig::default(),
                &NoProgress,
            )
            .await;
            assert!(matches!(r, Err(MigrateError::Aborted(_))), "{r:?}");
        }
        migrate(
            tracked.clone(),
            tracked.clone(),
            &Dialer::parse(&url).unwrap(),
            &NoHooks,
            &SourceConfig::default(),
            &NoProgress,
        )
        .await
        .unwrap_or_else(|e| panic!("{at}: {e}"));
        task.await.unwrap().unwrap();
        assert_same(&at, &contents(&*store).await, &initial);
    }
}

/// A destination of another size refuses at once, with a clear error on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_mismatch_is_refused() {
    let src = mem_with(&random(7, 1 << 20)).await;
    let tracked = Tracked::new(src, PAGE);
    let dest = destination(
        2 << 20,
        Arc::new(NoHooks),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let r = migrate(
        tracked.clone(),
        tracked,
        &Dialer::parse(&dest.url).unwrap(),
        &NoHooks,
        &SourceConfig::default(),
        &NoProgress,
    )
    .await;
    match r {
        Err(MigrateError::Aborted(e)) => {
            assert!(e.chain().contains("equal sizes"), "{}", e.chain())
        }
        other => panic!("{other:?}"),
    }
    let e = dest.task.await.unwrap().unwrap_err();
    assert!(e.chain().contains("equal sizes"), "{}", e.chain());
}

/// Resumes by waking whoever waits for it.
#[derive(Debug)]
struct Wake(Arc<tokio::sync::Notify>);

#[async_trait]
impl Hooks for Wake {
    async fn suspend(&self) -> Result<()> {
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        self.0.notify_one();
        Ok(())
    }
}

/// A region whose size is no multiple of the chunk (a short last chunk), in every mode, with
/// the destination's application reading it all once it resumes (post-copy: faults, the short
/// chunk included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_last_chunk_arrives_in_every_mode() {
    let size = (3 << 20) + 1234;
    let initial = random(8, size);
    for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
        let src = mem_with(&initial).await;
        let tracked = Tracked::new(src, PAGE);
        let resumed = Arc::new(tokio::sync::Notify::new());
        let dest = destination(
            size as u64,
            Arc::new(Wake(resumed.clone())),
            DestConfig::default(),
            "127.0.0.1:0",
            |s| s,
        )
        .await;
        let target = dest.target.clone();
        let reader = tokio::spawn(async move {
            resumed.notified().await;
            contents(&*target).await
        });
        let dialer = Dialer::parse(&dest.url).unwrap();
        let cfg = SourceConfig {
            mode,
            ..SourceConfig::default()
        };
        let r = migrate(
            tracked.clone(),
            tracked,
            &dialer,
            &NoHooks,
            &cfg,
            &NoProgress,
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        // The holes (256 KiB at the start of each MiB, and the short last chunk) are sent as
        // ZERO, not as bytes (post-copy may send a chunk twice: on the urgent path and in the
        // background stream).
        if mode == Mode::Precopy {
            assert_eq!(r.zero_chunks, 3 * 64 + 1, "{r:?}");
            assert_eq!(r.data_chunks, 769 - 193, "{r:?}");
            assert!(
                r.wire_sent < size as u64 - 3 * (256 << 10) + (64 << 10),
                "{r:?}"
            );
        } else {
            assert!(r.zero_chunks > 3 * 64, "{mode:?}: {r:?}");
        }
        dest.task.await.unwrap().unwrap();
        assert_same(
            &format!("{mode:?}"),
            &contents(&*dest.store).await,
            &initial,
        );
        assert_same(
            &format!("{mode:?}, read by the destination's application"),
            &reader.await.unwrap(),
            &initial,
        );
    }
}

/// Chained migrations: A to B in post-copy, then B (its target, as the store its application
/// uses, tracked again) on to C in pre-copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_migrations_a_to_b_to_c() {
    let size = 4 << 20;
    let initial = random(9, size);
    let a = Tracked::new(mem_with(&initial).await, PAGE);
    let b = destination(
        size as u64,
        Arc::new(NoHooks),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let cfg = SourceConfig {
        mode: Mode::Postcopy,
        ..SourceConfig::default()
    };
    let dialer = Dialer::parse(&b.url).unwrap();
    migrate(a.clone(), a, &dialer, &NoHooks, &cfg, &NoProgress)
        .await
        .unwrap();
    b.task.await.unwrap().unwrap();
    // B's application wrote one page after taking over.
    let page = Bytes::from(vec![0x77u8; PAGE as usize]);
    b.target.write(12 * PAGE, page.clone()).await.unwrap();
    let mut expected = initial.clone();
    expected[12 * PAGE as usize..13 * PAGE as usize].fill(0x77);
    let from_b = Tracked::new(b.target.clone(), PAGE);
    let c = destination(
        size as u64,
        Arc::new(NoHooks),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let dialer = Dialer::parse(&c.url).unwrap();
    migrate(
        from_b.clone(),
        from_b,
        &dialer,
        &NoHooks,
        &SourceConfig::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    c.task.await.unwrap().unwrap();
    assert_same("C", &contents(&*c.store).await, &expected);
}

/// A request that a cut swallows (sent into a black-holed link) is sent again after the
/// reconnection: the reader gets its chunk long before the background stream would reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_lost_in_a_cut_is_sent_again() {
    let size = 16usize << 20;
    let initial = random(10, size);
    let raw = mem_with(&initial).await;
    // Every read of the source takes 5 ms: the background stream needs over a second for the
    // region, an urgent answer 5 ms.
    let control = InjectControl::new();
    control.set_delay(OpKind::Read, Duration::from_millis(5));
    let slow: DynStore = Arc::new(Inject::with_control(raw, control));
    let tracked = Tracked::new(slow, PAGE);
    let resumed = Arc::new(tokio::sync::Notify::new());
    let dest = destination(
        size as u64,
        Arc::new(Wake(resumed.clone())),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let proxy = Arc::new(
        Proxy::start(
            "127.0.0.1:0",
            dest.url.trim_start_matches("migrate://"),
            ProxyConfig::default(),
        )
        .await
        .unwrap(),
    );
    let dialer = Dialer::parse(&format!("migrate://{}", proxy.local_addr())).unwrap();
    let cfg = SourceConfig {
        mode: Mode::Postcopy,
        chunk_size: 64 << 10,
        ..SourceConfig::default()
    };
    let target = dest.target.clone();
    let p = proxy.clone();
    let reader = tokio::spawn(async move {
        resumed.notified().await;
        // The request goes out on the urgent connection into a black hole...
        p.set_blocked(true);
        let held = target.held();
        let last = (0..held.len()).rev().find(|&i| !held.contains(i)).unwrap();
        let t: DynStore = target.clone();
        let read = tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            t.read(last * (64 << 10), &mut b).await.map(|()| b)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!read.is_finished(), "read through a black hole");
        // ...then the connections break and come back.
        p.cut_all();
        p.set_blocked(false);
        let page = read.await.unwrap().expect("read after the reconnection");
        (last, page, target.missing())
    });
    let report = migrate(
        tracked.clone(),
        tracked.clone(),
        &dialer,
        &NoHooks,
        &cfg,
        &NoProgress,
    )
    .await
    .expect("migration across the cut");
    dest.task.await.unwrap().expect("destination");
    let (last, page, missing_then) = reader.await.unwrap();
    let off = last as usize * (64 << 10);
    assert_eq!(&page[..], &initial[off..off + 4096]);
    // The last chunk came on the urgent path, not at the end of the background stream.
    assert!(
        missing_then > 100,
        "{missing_then} chunks were missing at the read"
    );
    assert!(report.reconnects >= 1, "{report:?}");
    assert_same("after the cut", &contents(&*dest.store).await, &initial);
}

/// The destination resumes its application when COMMIT arrives, and that application may
/// fault at once: the source serves urgent requests from before it sends COMMIT, not only once
/// it has read RESUMED. Here the destination's resume hook itself reads a missing chunk, so
/// RESUMED follows that chunk's arrival; a source that began serving only after RESUMED waited
/// for it until its reply timeout, then read the late RESUMED where it expected ALL_RECEIVED and
/// failed (seen failing so before the urgent server was started ahead of the COMMIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_the_resume_is_served_before_resumed() {
    /// Reads the last chunk through the target while resuming.
    #[derive(Debug, Default)]
    struct ReadOnResume {
        target: std::sync::OnceLock<Arc<StoreTarget>>,
        got: Mutex<Option<Vec<u8>>>,
    }
    #[async_trait]
    impl Hooks for ReadOnResume {
        async fn suspend(&self) -> Result<()> {
            Ok(())
        }
        async fn resume(&self) -> Result<()> {
            let t: DynStore = self.target.get().expect("the target").clone();
            let mut b = vec![0u8; PAGE as usize];
            t.read(t.size() - PAGE, &mut b).await?;
            *self.got.lock() = Some(b);
            Ok(())
        }
    }
    let size = 4u64 << 20;
    let initial = random(12, size as usize);
    let raw = mem_with(&initial).await;
    let tracked = Tracked::new(raw, PAGE);
    let hook = Arc::new(ReadOnResume::default());
    let dest = destination(
        size,
        hook.clone(),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    hook.target.set(dest.target.clone()).unwrap();
    let cfg = SourceConfig {
        mode: Mode::Postcopy,
        chunk_size: 64 << 10,
        reply_timeout: Duration::from_secs(5),
        ..SourceConfig::default()
    };
    let report = migrate(
        tracked.clone(),
        tracked.clone(),
        &Dialer::parse(&dest.url).unwrap(),
        &NoHooks,
        &cfg,
        &NoProgress,
    )
    .await
    .expect("a migration whose destination faults while resuming");
    dest.task.await.unwrap().expect("destination");
    let got = hook.got.lock().take().expect("the resume hook's read");
    assert_eq!(&got[..], &initial[initial.len() - PAGE as usize..]);
    assert!(report.urgent_served >= 1, "{report:?}");
    assert_same("after the resume", &contents(&*dest.store).await, &initial);
}

/// Strangers on the destination's port (garbage, a huge length prefix, a frame that is no
/// HELLO, a connection for an unknown session) are turned away; a real migration still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_turned_away_and_a_migration_still_works() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let size = 1 << 20;
    let initial = random(11, size);
    let dest = destination(
        size as u64,
        Arc::new(NoHooks),
        DestConfig::default(),
        "127.0.0.1:0",
        |s| s,
    )
    .await;
    let addr = dest.url.trim_start_matches("migrate://").to_owned();
    let mut bulk_hello = memsync_migrate::proto::Msg::Hello {
        version: memsync_migrate::proto::VERSION,
        role: memsync_migrate::proto::Role::Bulk,
        session: 42,
        resume: false,
        features: 0,
    }
    .encode()
    .to_vec();
    let not_hello = memsync_migrate::proto::Msg::Done.encode().to_vec();
    for bytes in [
        vec![0xffu8; 4],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        not_hello,
        std::mem::take(&mut bulk_hello),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        // Closed (after an ABORT for the ones that parse), never left hanging.
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
    }
    let tracked = Tracked::new(mem_with(&initial).await, PAGE);
    migrate(
        tracked.clone(),
        tracked,
        &Dialer::parse(&dest.url).unwrap(),
        &NoHooks,
        &SourceConfig::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    dest.task.await.unwrap().unwrap();
    assert_same("after strangers", &contents(&*dest.store).await, &initial);
}

/// A source without a tracker (the CLI's: the application writes a file behind memsync's back,
/// changes are found by hashing) verifies when it is told. `Verify::AfterResume` (hybrid's
/// default) does not hash while the application is suspended: the switch-over turns to
/// post-copy and each chunk is verified after the resume (SAME when the destination's copy is
/// current). Pre-copy's default, `Verify::Suspended`, hashes while suspended and ends with a
/// stop-and-copy: the destination needs nothing from the source after its resume. Contents
/// arrive identical in every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hashing_source_verifies_where_it_is_told() {
    /// Counts the scans made while the application is suspended.
    #[derive(Debug)]
    struct Watch {
        inner: Arc<memsync_sync::Rescan>,
        app: Arc<App>,
        suspended_scans: AtomicU64,
    }
    #[async_trait]
    impl ChangeSource for Watch {
        async fn take_changes(&self) -> Result<Vec<std::ops::Range<u64>>> {
            if self.app.held.lock().is_some() {
                self.suspended_scans.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.take_changes().await
        }
        fn pushed(&self, layout: memsync_sync::digest::Layout, first: u64, d: &[[u8; 32]]) {
            self.inner.pushed(layout, first, d)
        }
    }
    for (mode, verify, used) in [
        (
            Mode::Precopy,
            Some(Verify::AfterResume),
            Verify::AfterResume,
        ),
        (Mode::Hybrid, None, Verify::AfterResume),
        (Mode::Precopy, None, Verify::Suspended),
    ] {
        let size = 8u64 << 20;
        let initial = random(21, size as usize);
        let raw = mem_with(&initial).await;
        let log = Arc::new(Log::default());
        let app = App::new();
        let writer = app.start(raw.clone(), log.clone(), 5, Duration::from_millis(1), 8);
        let dest = destination(
            size,
            Arc::new(NoHooks),
            DestConfig::default(),
            "127.0.0.1:0",
            |s| s,
        )
        .await;
        let watch = Arc::new(Watch {
            inner: memsync_sync::Rescan::new(raw.clone(), 64 << 10).unwrap(),
            app: app.clone(),
            suspended_scans: AtomicU64::new(0),
        });
        let cfg = SourceConfig {
            mode,
            chunk_size: 64 << 10,
            hash_sent: true,
            verify,
            ..SourceConfig::default()
        };
        let report = migrate(
            raw.clone(),
            watch.clone(),
            &Dialer::parse(&dest.url).unwrap(),
            &*app,
            &cfg,
            &NoProgress,
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let dreport = dest.task.await.unwrap().expect("destination");
        app.stop.store(true, Ordering::Relaxed);
        let src_final = contents(&*raw).await;
        app.resume().await.unwrap();
        writer.await.unwrap();
        let mut expected = initial;
        log.apply(&mut expected);
        assert_same("source", &src_final, &expected);
        assert_same(mode.name(), &contents(&*dest.store).await, &expected);
        assert_eq!(report.verify, Some(used), "{report:?}");
        let scans = watch.suspended_scans.load(Ordering::Relaxed);
        match used {
            Verify::AfterResume => {
                assert_eq!(scans, 0, "{mode:?}: hashed while suspended");
                assert!(report.postcopy && dreport.postcopy, "{report:?}");
                assert!(report.unchanged_chunks > 0, "{report:?}");
            }
            Verify::Suspended => {
                assert!(scans > 0, "{mode:?}: no hashing while suspended");
                // Independent of the source at the resume: nothing was missing there.
                assert!(!report.postcopy && !dreport.postcopy, "{report:?}");
                assert_eq!(report.unchanged_chunks, 0, "{report:?}");
            }
        }
    }
}
