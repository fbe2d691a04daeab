//! A region mapping a cache (the stack of `memsync map --cache`): one retry clock, owned by the
//! region, and one background puller.

use std::sync::Arc;
use std::time::Duration;

use memsync_cache::{Cache, CacheConfig};
use memsync_core::layers::{Inject, InjectControl, OpKind, OpSet, Stats};
use memsync_core::{DynStore, Store};
use memsync_local::MemStore;
use memsync_region::{LazyRegion, RegionConfig};
use memsync_testkit::random_bytes;

const KIB: usize = 1024;
const SIZE: usize = 2 << 20;

struct Stack {
    rt: tokio::runtime::Runtime,
    cache: Arc<Cache>,
    region: LazyRegion,
    inject: InjectControl,
    remote: Arc<Stats<Inject<Arc<MemStore>>>>,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// region (64 KiB chunks) → cache (64 KiB chunks, no pull of its own unless `pull`) →
/// Stats → Inject → a memory store of random data.
fn stack(cache_cfg: CacheConfig, region_cfg: RegionConfig) -> Stack {
    stack_with(cache_cfg, region_cfg, |_| {})
}

/// [`stack`], with `before` given the remote's injection control before the cache opens.
fn stack_with(
    cache_cfg: CacheConfig,
    region_cfg: RegionConfig,
    before: impl FnOnce(&InjectControl),
) -> Stack {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = random_bytes(31, SIZE).to_vec();
    let mem = Arc::new(MemStore::new(SIZE as u64));
    let inject = Inject::new(mem.clone());
    let control = inject.control();
    let remote = Arc::new(Stats::new(inject));
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(mem.write(0, data.clone().into())).unwrap();
    before(&control);
    let cache = rt.block_on(async {
        Arc::new(
            Cache::open(remote.clone() as DynStore, dir.path(), cache_cfg)
                .await
                .unwrap(),
        )
    });
    // Outside the runtime: the region's threads have runtimes of their own.
    let region = LazyRegion::new(cache.clone() as DynStore, region_cfg).unwrap();
    Stack {
        rt,
        cache,
        region,
        inject: control,
        remote,
        data,
        _dir: dir,
    }
}

fn cache_cfg(fetch_timeout: Duration, pull: bool) -> CacheConfig {
    CacheConfig {
        chunk_size: 64 * KIB as u64,
        pull,
        fetch_timeout,
        demand_request_size: 64 * KIB as u64,
        ..CacheConfig::default()
    }
}

fn region_cfg(fetch_deadline: Duration, prefetch: bool) -> RegionConfig {
    RegionConfig {
        chunk_size: 64 * KIB,
        prefetch,
        fetch_deadline,
        retry_backoff: Duration::from_millis(5),
        ..RegionConfig::default()
    }
}

#[test]
fn stack_rides_out_a_transient_failure() {
    let s = stack(
        cache_cfg(Duration::from_secs(10), false),
        region_cfg(Duration::from_secs(30), false),
    );
    s.inject.fail_next(OpSet::READ, 5);
    let mut buf = vec![0u8; 3 * 64 * KIB];
    s.region.read_at(64 * KIB, &mut buf).unwrap();
    assert!(buf == s.data[64 * KIB..4 * 64 * KIB]);
    assert_eq!(s.inject.injected(), 5);
    assert!(s.region.errors().is_empty(), "{:?}", s.region.errors());
    assert_eq!(
        s.region.stats().snapshot().store_errors,
        0,
        "the cache retried, not the region"
    );
    s.rt.block_on(s.cache.close()).unwrap();
}

/// The remote fails for good. The cache's own timeout (100 ms) is far shorter than the region's
/// deadline (2 s): with a clock each, the region would try again and again, each attempt a
/// fresh round of the cache's retries. With one clock the region's read reaches the cache once,
/// the cache retries until the region's deadline, and the region gives up after that one
/// attempt.
#[test]
fn stack_gives_up_at_the_one_deadline_of_the_region() {
    let s = stack(
        cache_cfg(Duration::from_millis(100), false),
        region_cfg(Duration::from_secs(2), false),
    );
    s.inject.fail_always(OpSet::READ);
    let mut b = [0u8; 8];
    let err = s.region.read_at(5 * 64 * KIB + 3, &mut b).unwrap_err();
    assert_eq!(err.chunk, 5);
    assert!(err.poisoned, "{err}");
    assert_eq!(err.attempts, 1, "one attempt of the region: {err}");
    assert!(
        err.message
            .contains("before the deadline of the layer above"),
        "the cache names whose deadline passed: {err}"
    );
    let remote_reads = s.inject.calls(OpKind::Read);
    let cache = s.cache.stats();
    assert_eq!(cache.misses, 1, "one miss in the cache: {cache}");
    assert!(
        remote_reads >= 2 && cache.fetch_errors == remote_reads,
        "the cache retried the remote ({remote_reads} reads, {} errors)",
        cache.fetch_errors
    );
    assert_eq!(s.region.stats().snapshot().store_errors, 1);
    s.inject.clear();
    drop(s.region);
    s.rt.block_on(s.cache.close()).unwrap();
}

/// The region's background pull reaches the cache as a pull, not as demand misses (which would
/// hold back the cache's own puller and send its follow-the-demand scan after the region's
/// order): every byte comes from the remote once, as pulled bytes. The cache's puller is off
/// here so that every chunk goes through the region's pull (with it on, which of the two gets a
/// chunk first is a race).
#[test]
fn stack_has_one_background_puller() {
    let s = stack(
        cache_cfg(Duration::from_secs(10), false),
        region_cfg(Duration::from_secs(30), true),
    );
    assert!(
        s.region.wait_pull(Duration::from_secs(60)),
        "{:?}",
        s.region.progress()
    );
    assert!(s.rt.block_on(s.cache.wait_pulled(Duration::from_secs(60))));
    let c = s.cache.stats();
    assert_eq!(c.misses, 0, "no pull read counted as a demand miss: {c}");
    assert_eq!(c.demand_bytes, 0, "{c}");
    assert_eq!(c.pulled_bytes, SIZE as u64, "{c}");
    assert_eq!(
        s.remote.snapshot()[OpKind::Read].bytes,
        SIZE as u64,
        "every byte read from the remote once: {c}"
    );
    let mut buf = vec![0u8; SIZE];
    s.region.read_at(0, &mut buf).unwrap();
    assert!(buf == s.data);
    drop(s.region);
    s.rt.block_on(s.cache.close()).unwrap();
}

/// How the region's pull ends in [`cache_pull_takes_over`].
enum RegionPullEnds {
    Paused,
    Dropped,
}

/// The region's pull reads through the cache, so the cache's own puller stands down. Once the
/// region's pull is paused, or the region is gone, the cache's puller takes over and the cache
/// fills completely: a stack is never left without a puller. (It used to stand down until the
/// cache closed, and the cache never filled.)
///
/// Every remote read stalls at first, so the order of events is fixed: the cache's puller has
/// one request in flight (window 1, for the last chunk), the region's one puller thread has one
/// read through the cache in flight (chunk 0, a pull read that makes the cache stand down), then
/// the region's pull ends and the reads go on.
fn cache_pull_takes_over(how: RegionPullEnds) {
    let cache = CacheConfig {
        window: memsync_cache::WindowLimits {
            initial: 1,
            min: 1,
            max: 1,
        },
        request_size: 64 * KIB as u64,
        hints: std::iter::once((SIZE - 64 * KIB) as u64..SIZE as u64).collect(),
        ..cache_cfg(Duration::from_secs(30), true)
    };
    let region = RegionConfig {
        pull_threads: 1,
        ..region_cfg(Duration::from_secs(30), true)
    };
    let s = stack_with(cache, region, |inject| {
        inject.stall(OpSet::READ, None);
    });
    s.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), s.inject.wait_stalled(2)).await
    })
    .expect("the cache's and the region's pull reads reach the remote");
    let region = match how {
        RegionPullEnds::Paused => {
            s.region.pause_pull();
            Some(s.region)
        }
        RegionPullEnds::Dropped => {
            drop(s.region);
            None
        }
    };
    s.inject.release_stalls();
    assert!(
        s.rt.block_on(s.cache.wait_pulled(Duration::from_secs(60))),
        "the cache's puller took over: {}",
        s.cache.stats()
    );
    if let Some(region) = &region {
        let p = region.progress();
        assert!(!p.running, "{p:?}");
        assert!(
            p.pulled_chunks <= 2,
            "the region's pull stayed paused: {p:?}"
        );
    }
    let mut buf = vec![0u8; SIZE];
    s.rt.block_on(s.cache.read(0, &mut buf)).unwrap();
    assert!(buf == s.data);
    assert_eq!(
        s.remote.snapshot()[OpKind::Read].bytes,
        SIZE as u64,
        "every byte read from the remote once"
    );
    drop(region);
    s.rt.block_on(s.cache.close()).unwrap();
}

#[test]
fn cache_pull_takes_over_when_the_region_pull_pauses() {
    cache_pull_takes_over(RegionPullEnds::Paused);
}

#[test]
fn cache_pull_takes_over_when_the_region_is_dropped() {
    cache_pull_takes_over(RegionPullEnds::Dropped);
}

/// A remote that refuses every read with an error retrying cannot help.
#[derive(Debug, Default)]
struct Refusing {
    reads: std::sync::atomic::AtomicU64,
}

#[memsync_core::async_trait]
impl Store for Refusing {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn caps(&self) -> memsync_core::Caps {
        memsync_core::Caps::basic()
    }
    async fn read(&self, _offset: u64, _buf: &mut [u8]) -> memsync_core::Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(memsync_core::StoreError::Unsupported { op: "read" })
    }
    async fn write(&self, _offset: u64, _data: memsync_core::Bytes) -> memsync_core::Result<()> {
        Err(memsync_core::StoreError::ReadOnly)
    }
    async fn flush(&self) -> memsync_core::Result<()> {
        Ok(())
    }
}

/// A permanent error ([`memsync_core::StoreError::is_permanent`]) is retried by no layer: one
/// remote read, one attempt of the region, the chunk poisoned at once rather than at the
/// deadline.
#[test]
fn stack_stops_at_once_on_a_permanent_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Refusing::default());
    let cache = rt.block_on(async {
        Arc::new(
            Cache::open(
                remote.clone() as DynStore,
                dir.path(),
                cache_cfg(Duration::from_secs(10), false),
            )
            .await
            .unwrap(),
        )
    });
    let region = LazyRegion::new(
        cache.clone() as DynStore,
        region_cfg(Duration::from_secs(30), false),
    )
    .unwrap();
    let mut b = [0u8; 8];
    let err = region.read_at(7 * 64 * KIB, &mut b).unwrap_err();
    assert_eq!(err.attempts, 1, "{err}");
    assert!(err.poisoned, "{err}");
    assert!(err.message.contains("not supported"), "{err}");
    assert_eq!(remote.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(region);
    rt.block_on(cache.close()).unwrap();
}
