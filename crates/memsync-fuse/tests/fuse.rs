//! memsync-fuse: a store as a FUSE file, through the crate's API (`mount`), over a memory store
//! (with the statistics and injection layers, to see what reaches the store) and over a managed
//! cache of memsync's NBD server. Random reads and writes against a model, concurrent readers,
//! fsync and msync reaching the store, a separate process mmapping the file, who may open it,
//! store errors as EIO, fallocate, and unmount on drop. Mounting needs root (`/dev/fuse`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memsync_cache::{Cache, CacheConfig, Reconnect};
use memsync_core::layers::{Inject, InjectControl, OpKind, OpSet, Stats};
use memsync_core::{DynStore, Store, StoreExt};
use memsync_fuse::{FuseMount, FuseOptions};
use memsync_local::MemStore;
use memsync_nbd::{ClientConfig, Export, NbdAddr, NbdStore, Server, ServerConfig};
use memsync_testkit::random_bytes;

/// Whether this test can mount (root); otherwise it is skipped (a failure under CI).
fn can_mount(test: &str) -> bool {
    if memsync_sys::euid() != 0 || !Path::new("/dev/fuse").exists() {
        memsync_testkit::skip::skip(test, "mounting FUSE needs root and /dev/fuse");
        return false;
    }
    true
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Over a memory store: Stats → Inject → MemStore of random bytes.
// ---------------------------------------------------------------------------------------------

struct MemMount {
    rt: tokio::runtime::Runtime,
    mem: Arc<MemStore>,
    stats: Arc<Stats<Inject<Arc<MemStore>>>>,
    inject: InjectControl,
    mount: FuseMount,
    data: Vec<u8>,
    _mnt: tempfile::TempDir,
}

fn mem_mount(size: usize, seed: u64) -> MemMount {
    let rt = runtime();
    let data = random_bytes(seed, size).to_vec();
    let mem = Arc::new(MemStore::new(size as u64));
    rt.block_on(mem.write(0, data.clone().into())).unwrap();
    let inject = Inject::new(mem.clone());
    let control = inject.control();
    let stats = Arc::new(Stats::new(inject));
    let mnt = tempfile::tempdir().unwrap();
    let mount = memsync_fuse::mount(
        stats.clone() as DynStore,
        rt.handle().clone(),
        mnt.path(),
        FuseOptions::default(),
    )
    .unwrap();
    MemMount {
        rt,
        mem,
        stats,
        inject: control,
        mount,
        data,
        _mnt: mnt,
    }
}

impl MemMount {
    fn open(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.mount.file_path())
            .unwrap()
    }

    fn store_bytes(&self) -> Vec<u8> {
        self.rt
            .block_on(self.mem.read_bytes(0, self.data.len()))
            .unwrap()
            .to_vec()
    }
}

/// Random reads and writes of random lengths at random (unaligned) offsets through the file,
/// against a model: every read returns the model's bytes, and in the end the file, the model
/// and the store have one BLAKE3 checksum.
fn random_io_matches_the_model(file: &std::fs::File, model: &mut [u8], seed: u64) {
    use rand::{Rng, RngCore, SeedableRng};
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let size = model.len();
    for op in 0..600 {
        let len = rng.random_range(1..=200_000usize).min(size);
        let off = rng.random_range(0..=size - len);
        if rng.random_bool(0.5) {
            let mut d = vec![0u8; len];
            rng.fill_bytes(&mut d);
            file.write_all_at(&d, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&d);
        } else {
            let mut got = vec![0u8; len];
            file.read_exact_at(&mut got, off as u64).unwrap();
            assert!(got == model[off..off + len], "op {op}: read {off}+{len}");
        }
    }
}

fn whole_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn random_reads_and_writes_over_a_memory_store() {
    if !can_mount("random_reads_and_writes_over_a_memory_store") {
        return;
    }
    let m = mem_mount(8 << 20, 1);
    let f = m.open();
    let mut model = m.data.clone();
    random_io_matches_the_model(&f, &mut model, 2);
    f.sync_all().unwrap();
    let want = blake3::hash(&model);
    assert_eq!(blake3::hash(&whole_file(m.mount.file_path())), want);
    assert_eq!(blake3::hash(&m.store_bytes()), want, "the store");
}

#[test]
fn random_reads_and_writes_over_a_cache() {
    if !can_mount("random_reads_and_writes_over_a_cache") {
        return;
    }
    let fx = fuse_fixture(8 << 20, 3);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mount.file_path())
        .unwrap();
    let mut model = random_bytes(3, 8 << 20).to_vec();
    random_io_matches_the_model(&f, &mut model, 4);
    // fsync flushes the cache: the remote behind NBD holds every write.
    f.sync_all().unwrap();
    let want = blake3::hash(&model);
    assert_eq!(blake3::hash(&whole_file(fx.mount.file_path())), want);
    let remote = fx.rt.block_on(fx.mem.read_bytes(0, 8 << 20)).unwrap();
    assert_eq!(blake3::hash(&remote), want, "the remote after fsync");
    drop(f);
    fx.close();
}

/// Several threads read random ranges of one file at once, each through its own descriptor.
#[test]
fn concurrent_readers_read_the_store() {
    if !can_mount("concurrent_readers_read_the_store") {
        return;
    }
    let m = mem_mount(16 << 20, 5);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (m, path) = (&m, m.mount.file_path());
            s.spawn(move || {
                use rand::{Rng, SeedableRng};
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(path).unwrap();
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                for _ in 0..300 {
                    let len = rng.random_range(1..=300_000usize);
                    let off = rng.random_range(0..=m.data.len() - len);
                    let mut got = vec![0u8; len];
                    f.read_exact_at(&mut got, off as u64).unwrap();
                    assert!(got == m.data[off..off + len], "thread {t}: {off}+{len}");
                }
            });
        }
    });
    assert!(m.stats.snapshot()[OpKind::Read].ops > 0);
}

/// `fsync` on the file flushes the store; without it the store is not flushed.
#[test]
fn fsync_reaches_the_store() {
    if !can_mount("fsync_reaches_the_store") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let m = mem_mount(1 << 20, 6);
    let f = m.open();
    f.write_all_at(b"durable?", 4096).unwrap();
    assert_eq!(m.stats.snapshot()[OpKind::Flush].ops, 0);
    f.sync_all().unwrap();
    let s = m.stats.snapshot();
    assert!(s[OpKind::Flush].ops >= 1, "fsync flushed the store: {s:?}");
    assert_eq!(&m.store_bytes()[4096..4104], b"durable?");
    // A store whose flush fails makes fsync fail.
    m.inject.fail_always(OpSet::FLUSH);
    f.write_all_at(b"lost?", 0).unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
}

/// Writes through a shared mapping of the file reach the store with `msync`.
#[test]
fn mmap_shared_writes_reach_the_store_with_msync() {
    if !can_mount("mmap_shared_writes_reach_the_store_with_msync") {
        return;
    }
    use std::os::fd::AsFd;
    let size = 4 << 20;
    let m = mem_mount(size, 7);
    let f = m.open();
    let map = memsync_sys::Mapping::shared_fd(f.as_fd(), size, 0).unwrap();
    let mut model = m.data.clone();
    // Reads through the mapping see the store.
    assert!(map.read_vec(0, size) == model);
    for (i, off) in [0usize, 4096 * 3 + 17, size / 2 + 1, size - 100]
        .into_iter()
        .enumerate()
    {
        let d = random_bytes(100 + i as u64, 100);
        map.write_at(off, &d);
        model[off..off + 100].copy_from_slice(&d);
    }
    map.sync(0, size).unwrap();
    let reached = m.store_bytes() == model;
    // Unmapping writes the pages back too (and needs the mount): check first, drop, then fail.
    drop(map);
    assert!(reached, "the store after msync");
}

/// The mount lifts the kernel's strict per-mount dirty limit (`strict_limit` of its backing
/// device), which held mmap writers once they had dirtied 1% of the dirty threshold.
/// An abort handle kept past its mount's unmount does nothing: the kernel gives the freed
/// connection number (and the mount point) to the next FUSE mount, which an abort by number
/// would kill (a mount giving up its final flush after its unmount did so to another test's
/// mount).
#[test]
fn an_abort_after_the_unmount_leaves_the_next_mount_alone() {
    if !can_mount("an_abort_after_the_unmount_leaves_the_next_mount_alone") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let a = mem_mount(1 << 20, 9);
    let handle = a.mount.abort_handle();
    let MemMount { mount, _mnt, .. } = a;
    mount.unmount().unwrap();
    drop(_mnt);
    let b = mem_mount(1 << 20, 10);
    let dev = std::fs::metadata(b.mount.file_path()).unwrap().dev();
    assert!(
        !handle.abort().unwrap(),
        "aborted a connection after the unmount"
    );
    assert_eq!(
        whole_file(b.mount.file_path()),
        b.data,
        "the next mount (dev {dev}) broke"
    );
}

#[test]
fn the_mount_has_no_strict_dirty_limit() {
    if !can_mount("the_mount_has_no_strict_dirty_limit") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let m = mem_mount(1 << 20, 8);
    let dev = std::fs::metadata(m.mount.file_path()).unwrap().dev();
    let knob = memsync_fuse::bdi_dir(dev).join("strict_limit");
    let v = std::fs::read_to_string(&knob).unwrap();
    assert_eq!(v.trim(), "0", "{}", knob.display());
}

/// Two threads write every page of a shared mapping of a 96 MiB file, in random order (more
/// dirty pages than the kernel's strict FUSE limit allowed, about 1% of the dirty threshold);
/// after `fsync` the store equals the model byte for byte.
#[test]
fn concurrent_mmap_writers_reach_the_store_with_fsync() {
    if !can_mount("concurrent_mmap_writers_reach_the_store_with_fsync") {
        return;
    }
    use rand::seq::SliceRandom as _;
    use rand::{RngCore as _, SeedableRng as _};
    use std::os::fd::AsFd;
    let size = 96 << 20;
    let m = mem_mount(size, 9);
    let f = m.open();
    let map = memsync_sys::Mapping::shared_fd(f.as_fd(), size, 0).unwrap();
    let pages = size / 4096;
    let models: Vec<Vec<(usize, Vec<u8>)>> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2usize)
            .map(|t| {
                let map = &map;
                s.spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(t as u64);
                    let mut mine: Vec<usize> = (t..pages).step_by(2).collect();
                    mine.shuffle(&mut rng);
                    mine.into_iter()
                        .map(|p| {
                            // Part of a page, so that the rest must come from the store.
                            let mut d = vec![0u8; 1000];
                            rng.fill_bytes(&mut d);
                            let off = p * 4096 + (p % 3) * 1000;
                            map.write_at(off, &d);
                            (off, d)
                        })
                        .collect()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    f.sync_all().unwrap();
    let mut model = m.data.clone();
    for (off, d) in models.into_iter().flatten() {
        model[off..off + d.len()].copy_from_slice(&d);
    }
    let reached = m.store_bytes() == model;
    drop(map);
    assert!(reached, "the store after fsync");
}

/// A store that fails a read or a write makes the system call fail with EIO; the file never
/// returns other bytes, and once the store answers again the bytes are the store's.
#[test]
fn store_errors_are_eio_not_wrong_bytes() {
    if !can_mount("store_errors_are_eio_not_wrong_bytes") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let m = mem_mount(4 << 20, 8);
    let f = m.open();
    let bad = (1u64 << 20)..(1u64 << 20) + 65536;
    let rule = m.inject.fail_range(OpSet::READ, bad.clone());
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, bad.start + 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "read: {e}");
    // Elsewhere the store answers.
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf == m.data[3 << 20..(3 << 20) + 4096]);
    m.inject.remove_rule(rule);
    f.read_exact_at(&mut buf, bad.start + 8192).unwrap();
    let s = bad.start as usize + 8192;
    assert!(
        buf == m.data[s..s + 4096],
        "after the failure: the store's bytes"
    );
    // A failed write fails the write(2), and the store keeps its bytes.
    m.inject.fail_always(OpSet::WRITE);
    let e = f.write_all_at(b"never", 2 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "write: {e}");
    assert_eq!(
        &m.store_bytes()[2 << 20..(2 << 20) + 5],
        &m.data[2 << 20..(2 << 20) + 5]
    );
}

/// Dropping the mount unmounts it: the file is gone from the mount point, which is no longer in
/// the mount table.
#[test]
fn dropping_the_mount_unmounts() {
    if !can_mount("dropping_the_mount_unmounts") {
        return;
    }
    let m = mem_mount(1 << 20, 9);
    let dir = m.mount.mountpoint().to_path_buf();
    let file = m.mount.file_path().to_path_buf();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);
    let mounted = |d: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(d.to_str().unwrap()))
    };
    assert!(mounted(&dir));
    let MemMount { mount, _mnt, .. } = m;
    drop(mount);
    assert!(!mounted(&dir), "still mounted after the drop");
    assert!(!file.exists());
    drop(_mnt);
}

// ---------------------------------------------------------------------------------------------
// Over a managed cache of memsync's NBD server exporting a memory store.
// ---------------------------------------------------------------------------------------------

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn filled_mem(size: u64, seed: u64) -> Arc<MemStore> {
    let m = Arc::new(MemStore::new(size));
    m.write(0, random_bytes(seed, size as usize)).await.unwrap();
    m
}

async fn nbd_server(store: DynStore) -> (Server, String) {
    let server = Server::new(ServerConfig::new(vec![Export::new("", store)])).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    server.listen_tcp(l);
    (server, addr)
}

async fn nbd_remote(addr: &str, connections: usize) -> Arc<Reconnect> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cc = ClientConfig::new(
        NbdAddr::Tcp {
            host: host.to_owned(),
            port: port.parse().unwrap(),
        },
        "",
    );
    cc.connections = connections;
    cc.timeout = Duration::from_secs(2);
    let opener: memsync_cache::Opener = Arc::new(move || {
        let cc = cc.clone();
        Box::pin(async move { Ok(Arc::new(NbdStore::connect(cc).await?) as DynStore) })
    });
    Arc::new(Reconnect::new(opener).await.unwrap())
}

fn cfg(chunk: u64, pull: bool) -> CacheConfig {
    CacheConfig {
        chunk_size: chunk,
        pull,
        push_interval: Duration::from_millis(50),
        checkpoint_interval: Duration::from_millis(100),
        fetch_timeout: Duration::from_secs(5),
        flush_timeout: Duration::from_secs(30),
        ..CacheConfig::default()
    }
}

const FUSE_SIZE: u64 = 32 << 20;
const PAGE: usize = 4096;
const THREADS: usize = 4;
const OPS: usize = 3000;

/// The writes of worker thread `t` (deterministic), as (page, data) in order, and whether each
/// op is a read.
fn worker_ops(seed: u64, t: usize) -> Vec<(usize, Option<Vec<u8>>)> {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed * 31 + t as u64);
    let pages = FUSE_SIZE as usize / PAGE;
    (0..OPS)
        .map(|_| {
            let page = rng.random_range(0..pages / THREADS) * THREADS + t;
            if rng.random_bool(0.5) {
                let mut d = vec![0u8; PAGE];
                rng.fill_bytes(&mut d);
                (page, Some(d))
            } else {
                (page, None)
            }
        })
        .collect()
}

/// The child: runs only when spawned by `fuse_mmap_integrity` (the env var names the file).
#[test]
fn fuse_child_worker() {
    let Ok(path) = std::env::var("MEMSYNC_FUSE_CHILD_FILE") else {
        return;
    };
    let seed: u64 = std::env::var("MEMSYNC_FUSE_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    use std::os::fd::AsFd;
    let map =
        Arc::new(memsync_sys::Mapping::shared_fd(file.as_fd(), FUSE_SIZE as usize, 0).unwrap());
    let original = random_bytes(seed, FUSE_SIZE as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let map = map.clone();
            let original = &original;
            s.spawn(move || {
                let mut model: std::collections::HashMap<usize, Vec<u8>> = Default::default();
                let mut buf = vec![0u8; PAGE];
                for (page, op) in worker_ops(seed, t) {
                    let off = page * PAGE;
                    match op {
                        Some(d) => {
                            map.write_at(off, &d);
                            model.insert(page, d);
                        }
                        None => {
                            map.read_at(off, &mut buf);
                            let want = model
                                .get(&page)
                                .map_or(&original[off..off + PAGE], |v| &v[..]);
                            assert!(
                                buf == want,
                                "thread {t}: page {page} differs in the mapping"
                            );
                        }
                    }
                }
            });
        }
    });
    // Write the dirty pages back and flush the cache to the remote.
    file.sync_all().unwrap();
    drop(map);
    println!("child done");
}

/// A FUSE file over a cache (64 KiB chunks, pull on, pushes only on flush) over memsync's NBD
/// server exporting a memory store of random bytes.
struct FuseFixture {
    rt: tokio::runtime::Runtime,
    mem: Arc<MemStore>,
    server: Server,
    cache: Arc<Cache>,
    mount: FuseMount,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn fuse_fixture(size: u64, seed: u64) -> FuseFixture {
    fuse_fixture_with(
        size,
        seed,
        FuseOptions {
            name: "disk".into(),
            ..Default::default()
        },
    )
}

fn fuse_fixture_with(size: u64, seed: u64, opts: FuseOptions) -> FuseFixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mem = rt.block_on(filled_mem(size, seed));
    let (server, addr) = rt.block_on(nbd_server(mem.clone()));
    let remote = rt.block_on(nbd_remote(&addr, 2));
    let dir = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mut c = cfg(64 * 1024, true);
    c.push_interval = Duration::from_secs(3600);
    let cache = Arc::new(rt.block_on(Cache::open(remote, dir.path(), c)).unwrap());
    let mount = memsync_fuse::mount(cache.clone(), rt.handle().clone(), mnt.path(), opts).unwrap();
    FuseFixture {
        rt,
        mem,
        server,
        cache,
        mount,
        _dirs: (dir, mnt),
    }
}

impl FuseFixture {
    fn close(self) {
        self.mount.unmount().unwrap();
        self.rt.block_on(self.cache.close()).unwrap();
        self.rt.block_on(self.server.shutdown()).unwrap();
    }
}

#[test]
fn fuse_mmap_integrity() {
    if !can_mount("fuse_mmap_integrity") {
        return;
    }
    let seed = 77u64;
    let fx = fuse_fixture(FUSE_SIZE, seed);
    let (rt, mem, mount) = (&fx.rt, &fx.mem, &fx.mount);
    let file = mount.file_path().to_path_buf();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), FUSE_SIZE);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "fuse_child_worker",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MEMSYNC_FUSE_CHILD_FILE", &file)
        .env("MEMSYNC_FUSE_CHILD_SEED", seed.to_string())
        .spawn()
        .map(Child)
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the mmap child did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the mmap child failed: {status}");
    // The child's fsync flushed the cache: the remote holds its view.
    let mut want = random_bytes(seed, FUSE_SIZE as usize).to_vec();
    for t in 0..THREADS {
        for (page, op) in worker_ops(seed, t) {
            if let Some(d) = op {
                want[page * PAGE..(page + 1) * PAGE].copy_from_slice(&d);
            }
        }
    }
    let got = rt.block_on(mem.read_bytes(0, FUSE_SIZE as usize)).unwrap();
    let bad = (0..FUSE_SIZE as usize / PAGE)
        .filter(|p| got[p * PAGE..(p + 1) * PAGE] != want[p * PAGE..(p + 1) * PAGE])
        .count();
    assert_eq!(
        bad, 0,
        "{bad} pages of the remote differ from the child's view after fsync"
    );
    // Plain read(2) through the file sees the same.
    let via_file = std::fs::read(&file).unwrap();
    assert!(via_file == want, "read(2) of the FUSE file differs");
    fx.close();
}

/// The child of `fuse_mount_is_private_unless_opened_to_others`, run as nobody: tries to open
/// the FUSE file for reading and for writing, and expects `MEMSYNC_FUSE_NOBODY_EXPECT`.
#[test]
fn fuse_as_nobody_child() {
    let Ok(path) = std::env::var("MEMSYNC_FUSE_NOBODY_FILE") else {
        return;
    };
    let expect = std::env::var("MEMSYNC_FUSE_NOBODY_EXPECT").unwrap();
    assert_ne!(memsync_sys::euid(), 0, "the child must run unprivileged");
    let r = std::fs::File::open(&path);
    let w = std::fs::OpenOptions::new().write(true).open(&path);
    match expect.as_str() {
        "denied" => {
            for (what, res) in [("read", r), ("write", w)] {
                let e = res
                    .err()
                    .unwrap_or_else(|| panic!("nobody opened it for {what}"));
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied,
                    "{what}: {e}"
                );
            }
        }
        "allowed" => {
            use std::os::unix::fs::FileExt;
            let mut buf = [0u8; 16];
            r.unwrap().read_exact_at(&mut buf, 0).unwrap();
            let w = w.unwrap();
            w.write_all_at(b"nobody was here", 0).unwrap();
            w.sync_all().unwrap();
        }
        other => panic!("unknown expectation {other}"),
    }
    println!("nobody child ok: {expect}");
}

/// By default only the mounting user can reach the FUSE file: nobody can neither read nor write
/// it (and so cannot reach the remote). `allow_other` alone lets others reach the mount but the
/// file's mode 0600 still keeps them out; `allow_other` with mode 0666 lets them read and write.
#[test]
fn fuse_mount_is_private_unless_opened_to_others() {
    const TEST: &str = "fuse_mount_is_private_unless_opened_to_others";
    if !can_mount(TEST) {
        return;
    }
    // The cargo target directory may not be traversable by nobody: run a copy.
    let dir = memsync_testkit::child::TempDir::new("fuse-nobody");
    let exe = dir.0.join("fuse-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let seed = 91;
    for (allow_other, mode, expect) in [
        (false, None, "denied"),
        (true, None, "denied"),
        (true, Some(0o666), "allowed"),
    ] {
        let mut opts = FuseOptions {
            name: "disk".into(),
            allow_other,
            ..Default::default()
        };
        if let Some(m) = mode {
            opts.mode = m;
        }
        let fx = fuse_fixture_with(1 << 20, seed, opts);
        let file = fx.mount.file_path().to_path_buf();
        // The owner (root, who mounted it) always can.
        assert_eq!(std::fs::read(&file).unwrap().len(), 1 << 20);
        let out = memsync_testkit::child::run_test_binary(
            &exe,
            "fuse_as_nobody_child",
            Duration::from_secs(120),
            |c| {
                use std::os::unix::process::CommandExt;
                c.uid(65534)
                    .gid(65534)
                    .current_dir(&dir.0)
                    .env("TMPDIR", &dir.0)
                    .env("MEMSYNC_FUSE_NOBODY_FILE", &file)
                    .env("MEMSYNC_FUSE_NOBODY_EXPECT", expect);
            },
        );
        let what = format!(
            "allow_other={allow_other} mode={mode:?}: {}",
            memsync_testkit::child::describe(&out)
        );
        assert!(out.status.success(), "{what}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("nobody child ok: {expect}")),
            "{what}"
        );
        let head = fx.rt.block_on(fx.mem.read_bytes(0, 15)).unwrap();
        let original = random_bytes(seed, 15);
        if expect == "allowed" {
            assert_eq!(&head[..], b"nobody was here", "{what}");
        } else {
            assert_eq!(&head[..], &original[..], "the remote changed: {what}");
        }
        fx.close();
    }
}

/// `fallocate` on the FUSE file: a punched hole and a zeroed range read as zeros through the
/// file and, after fsync, in the remote; the bytes around them are intact; growing the file is
/// refused.
#[test]
fn fuse_fallocate_punches_and_zeroes_through_to_the_remote() {
    if !can_mount("fuse_fallocate_punches_and_zeroes_through_to_the_remote") {
        return;
    }
    use rustix::fs::{FallocateFlags, fallocate};
    use std::os::unix::fs::FileExt;
    let size = 8u64 << 20;
    let fx = fuse_fixture(size, 91);
    let (rt, mem, mount) = (&fx.rt, &fx.mem, &fx.mount);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.file_path())
        .unwrap();
    let mut want = vec![0u8; size as usize];
    rt.block_on(mem.read(0, &mut want)).unwrap();
    // Read everything first, so stale page cache would show if the kernel kept it.
    let mut got = vec![0u8; size as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want);
    let holes = [
        (
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            1_000_000u64,
            300_000u64,
        ),
        (FallocateFlags::ZERO_RANGE, 4_000_123, 70_001),
        (
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            size - 5000,
            5000,
        ),
    ];
    for (flags, off, len) in holes {
        fallocate(&f, flags, off, len).unwrap_or_else(|e| panic!("{flags:?} {off}+{len}: {e}"));
        want[off as usize..(off + len) as usize].fill(0);
    }
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == want,
        "the file does not read the zeroed ranges as zeros"
    );
    let e = fallocate(&f, FallocateFlags::empty(), size - 10, 100).unwrap_err();
    assert_eq!(e, rustix::io::Errno::FBIG, "growing the file");
    f.sync_all().unwrap();
    let mut remote_now = vec![0u8; size as usize];
    rt.block_on(mem.read(0, &mut remote_now)).unwrap();
    assert!(remote_now == want, "the remote differs after fsync");
    drop(f);
    fx.close();
}
