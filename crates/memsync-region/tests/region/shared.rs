//! `Backing::Shared`: the region maps its source's own memory (a `file:` store on tmpfs, a
//! cache whose directory is on tmpfs) with MINOR faults and `UFFDIO_CONTINUE`.

use std::os::unix::fs::FileExt;

use memsync_cache::{Cache, CacheConfig};
use memsync_core::DynStore;
use memsync_local::{FileOptions, FileStore};

use super::*;

fn shm_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm (tmpfs)")
}

fn shared_cfg(chunk: usize) -> RegionConfig {
    RegionConfig {
        backing: Backing::Shared,
        ..cfg(chunk)
    }
}

/// A tmpfs file of `size` random bytes, with a hole every third 64 KiB piece (zeros in the
/// returned model).
fn tmpfs_file(dir: &Path, size: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("data");
    let mut data = memsync_testkit::random_bytes(seed, size).to_vec();
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size as u64).unwrap();
    for (k, start) in (0..size).step_by(64 * KIB).enumerate() {
        let end = (start + 64 * KIB).min(size);
        if k % 3 == 0 {
            data[start..end].fill(0);
        } else {
            f.write_all_at(&data[start..end], start as u64).unwrap();
        }
    }
    (path, data)
}

/// Reads the whole region through faults from `threads` threads, each in its own order.
fn read_all_faulting(region: &Arc<LazyRegion>, threads: usize, chunk: usize) -> Vec<u8> {
    let len = region.len();
    let rxs: Vec<_> = (0..threads)
        .map(|t| {
            let region = Arc::clone(region);
            spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t as u64);
                let mut got = vec![0u8; len];
                let mut order: Vec<usize> = (0..len).step_by(chunk).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                for off in order {
                    let n = chunk.min(len - off);
                    region.read_faulting(off, &mut got[off..off + n]);
                }
                got
            })
        })
        .collect();
    let mut first = None;
    for rx in &rxs {
        let got = join(rx);
        if let Some(f) = &first {
            assert!(&got == f, "threads read different bytes");
        } else {
            first = Some(got);
        }
    }
    first.unwrap()
}

fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!("{what}: differs first at byte {at}");
    }
}

#[test]
fn shared_region_maps_a_tmpfs_file_without_copying() {
    let dir = shm_dir();
    let size = 4 * MIB + 12_345;
    let (path, data) = tmpfs_file(dir.path(), size, 41);
    let store: DynStore = Arc::new(FileStore::open(&path, FileOptions::default()).unwrap());
    assert!(
        store.shared_memory().is_some(),
        "a tmpfs file has shared memory"
    );
    let region = Arc::new(LazyRegion::new(Arc::clone(&store), shared_cfg(256 * KIB)).unwrap());
    let got = read_all_faulting(&region, 4, 256 * KIB);
    assert_bytes(&got, &data, "the region");
    let s = region.stats().snapshot();
    assert!(s.installs_continue > 0, "{s:?}");
    assert_eq!(
        s.installs_copy + s.installs_move,
        0,
        "nothing is copied: {s:?}"
    );

    // One memory: a write to the file shows in the region, and a write through the region is
    // in the file (a hole written through the region included).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all_at(b"from the file", 100_000).unwrap();
    let mut back = [0u8; 13];
    region.read_at(100_000, &mut back).unwrap();
    assert_eq!(&back, b"from the file");
    region.write_at(10, b"through the region").unwrap();
    let mut back = [0u8; 18];
    f.read_exact_at(&mut back, 10).unwrap();
    assert_eq!(&back, b"through the region");

    // Dropped pages keep their bytes in the file: the next touch maps them again.
    region.advise(0, 2 * MIB, Advice::DontNeed).unwrap();
    let n = region.invalidate(2 * MIB, MIB).unwrap();
    assert!(n > 0);
    let mut want = data.clone();
    want[100_000..100_013].copy_from_slice(b"from the file");
    want[10..28].copy_from_slice(b"through the region");
    let got = read_all_faulting(&region, 2, 64 * KIB);
    assert_bytes(&got, &want, "the region after drops");
    drop(region);
    let on_disk = std::fs::read(&path).unwrap();
    assert_bytes(&on_disk, &want, "the file");
}

#[test]
fn shared_region_is_refused_for_a_source_without_shared_memory() {
    let (store, _) = random_store(MIB, 3, None);
    let err = LazyRegion::new(store, shared_cfg(64 * KIB)).unwrap_err();
    assert!(err.to_string().contains("shared memory"), "{err}");
    // A file off tmpfs has none either.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![7u8; MIB]).unwrap();
    let store = FileStore::open(&path, FileOptions::default()).unwrap();
    if store.shared_memory().is_none() {
        let err = LazyRegion::new(Arc::new(store), shared_cfg(64 * KIB)).unwrap_err();
        assert!(err.to_string().contains("shared memory"), "{err}");
    }
    // Nor with a budget or write tracking.
    let dir = shm_dir();
    let (path, _) = tmpfs_file(dir.path(), MIB, 5);
    let store: DynStore = Arc::new(FileStore::open(&path, FileOptions::default()).unwrap());
    let err = LazyRegion::new(
        store,
        RegionConfig {
            budget: Some(MIB),
            ..shared_cfg(64 * KIB)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("no budget"), "{err}");
}

fn multi_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open_cache(
    rt: &tokio::runtime::Runtime,
    remote: DynStore,
    dir: &Path,
    pull: bool,
) -> Arc<Cache> {
    let cfg = CacheConfig {
        chunk_size: 64 * KIB as u64,
        pull,
        ..CacheConfig::default()
    };
    Arc::new(rt.block_on(Cache::open(remote, dir, cfg)).unwrap())
}

#[test]
fn shared_region_over_a_cache_on_tmpfs_reads_the_remote_once_and_is_read_only() {
    let rt = multi_rt();
    let size = 3 * MIB + 4096 * 3;
    let (remote, data) = random_store(size, 77, Some(4));
    let dir = shm_dir();
    let cache = open_cache(&rt, remote.clone(), dir.path(), false);
    assert!(cache.shared_memory().is_some_and(|m| !m.writable));
    let region = Arc::new(
        LazyRegion::new(
            cache.clone() as DynStore,
            RegionConfig {
                runtime: Some(rt.handle().clone()),
                ..shared_cfg(128 * KIB)
            },
        )
        .unwrap(),
    );
    let got = read_all_faulting(&region, 3, 128 * KIB);
    assert_bytes(&got, &data, "the region");
    let s = region.stats().snapshot();
    assert!(
        s.installs_continue > 0 && s.installs_copy + s.installs_move == 0,
        "{s:?}"
    );
    // Every chunk went into the cache's local copy: what the region maps.
    for c in 0..cache.chunk_count() {
        assert!(cache.chunk_state(c).is_local(), "chunk {c} is not local");
    }
    let local = std::fs::read(dir.path().join("data")).unwrap();
    assert_bytes(&local[..size], &data, "the cache's local copy");

    // Read-only: a write is an error, not a change the cache would not know about.
    let err = region.write_at(0, b"x").unwrap_err();
    assert!(err.message.contains("read-only"), "{err:?}");
    assert!(region.place(0, &vec![0u8; 128 * KIB]).is_err());

    // A write to the cache (as through its FUSE file) is seen by the region at once, and is
    // pushed to the remote as usual.
    rt.block_on(cache.write(5000, Bytes::from_static(b"new bytes")))
        .unwrap();
    let mut back = [0u8; 9];
    region.read_at(5000, &mut back).unwrap();
    assert_eq!(&back, b"new bytes");
    rt.block_on(cache.flush()).unwrap();
    let mut remote_back = [0u8; 9];
    rt.block_on(remote.read(5000, &mut remote_back)).unwrap();
    assert_eq!(&remote_back, b"new bytes");
    drop(region);
    rt.block_on(cache.close()).unwrap();
}

#[test]
fn shared_region_over_a_failing_cache_reports_the_chunk() {
    let rt = multi_rt();
    let (remote, _) = random_store(MIB, 9, None);
    let failing = Inject::new(remote as DynStore);
    failing.control().add_rule(InjectRule::fail(OpSet::READ));
    let failing: DynStore = Arc::new(failing);
    let dir = shm_dir();
    let cache = open_cache(&rt, failing, dir.path(), false);
    let region = LazyRegion::new(
        cache.clone() as DynStore,
        RegionConfig {
            runtime: Some(rt.handle().clone()),
            fetch_deadline: Duration::from_millis(300),
            retry_backoff: Duration::from_millis(20),
            ..shared_cfg(64 * KIB)
        },
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let err = region.read_at(128 * KIB, &mut buf).unwrap_err();
    assert_eq!(err.chunk, 2, "{err:?}");
    assert!(err.attempts >= 1, "{err:?}");
    drop(region);
    rt.block_on(cache.close()).unwrap();
}

/// Threads fault, write through the region, write the file behind it, invalidate and drop
/// chunks of one shared region at once (beside its background pull), and every read is checked
/// against a model: the region and the file are one memory, whatever drops it goes through.
#[test]
fn shared_region_stays_one_memory_with_its_file_under_concurrent_use() {
    let dir = shm_dir();
    let chunk = 64 * KIB;
    let size = 4 * MIB + 5000;
    let (path, data) = tmpfs_file(dir.path(), size, 99);
    let store: DynStore = Arc::new(FileStore::open(&path, FileOptions::default()).unwrap());
    let region = Arc::new(
        LazyRegion::new(
            store,
            RegionConfig {
                prefetch: true,
                ..shared_cfg(chunk)
            },
        )
        .unwrap(),
    );
    let n = size.div_ceil(chunk);
    let model: Arc<Vec<parking_lot::Mutex<Vec<u8>>>> = Arc::new(
        (0..n)
            .map(|i| parking_lot::Mutex::new(data[i * chunk..((i + 1) * chunk).min(size)].to_vec()))
            .collect(),
    );
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
    );
    let rxs: Vec<_> = (0..4u64)
        .map(|t| {
            let (region, model, file) = (Arc::clone(&region), Arc::clone(&model), file.clone());
            spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t + 100);
                for _ in 0..400 {
                    let i = rng.random_range(0..n);
                    let mut m = model[i].lock();
                    let base = i * chunk;
                    match rng.random_range(0..5) {
                        0 => {
                            let mut got = vec![0u8; m.len()];
                            region.read_faulting(base, &mut got);
                            assert!(got == *m, "chunk {i} read wrong bytes");
                        }
                        1 => {
                            let at = rng.random_range(0..m.len());
                            let len = rng.random_range(1..=(m.len() - at).min(9000));
                            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                            region.write_at(base + at, &bytes).unwrap();
                            m[at..at + len].copy_from_slice(&bytes);
                        }
                        2 => {
                            let at = rng.random_range(0..m.len());
                            let len = rng.random_range(1..=(m.len() - at).min(9000));
                            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                            file.write_all_at(&bytes, (base + at) as u64).unwrap();
                            m[at..at + len].copy_from_slice(&bytes);
                        }
                        3 => {
                            region.invalidate(base, m.len()).unwrap();
                        }
                        _ => {
                            let len = m.len().next_multiple_of(4096);
                            region.advise(base, len, Advice::DontNeed).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for rx in &rxs {
        join(rx);
    }
    let want: Vec<u8> = model.iter().flat_map(|m| m.lock().clone()).collect();
    assert_same(&region, &want);
    drop(region);
    assert_bytes(&std::fs::read(&path).unwrap(), &want, "the file");
}
