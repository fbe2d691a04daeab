//! Continuous push of a live memsync region to a sync peer (issue 13): the region's dirty
//! tracker (`WP_ASYNC` + `PAGEMAP_SCAN`, through [`RegionSource`]) says which chunks were
//! written since the last round, and only those are pushed. A writer thread keeps dirtying the
//! region (through page faults, as the application's own code would) while rounds run; after
//! it stops and a final round runs, the peer's file equals the region.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use memsync_core::{Bytes, DynStore, Store};
use memsync_local::{FileOptions, FileStore, MemStore};
use memsync_migrate::RegionSource;
use memsync_region::{LazyRegion, RegionConfig, WriteTracking};
use memsync_sync::{
    ChangeSource, Dest, NoProgress, Peer, PeerAddr, PeerConfig, Pusher, RemoteDest, Source,
    SyncOptions,
};
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;
const SIZE: usize = 8 << 20;
/// The sync's chunk: several of the region's 4 KiB grains.
const CHUNK: u64 = 16 << 10;
/// Small writes per round (each touches at most two of the region's 512 chunks).
const PER_ROUND: u64 = 128;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_region_pushed_round_by_round_ends_equal_to_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut initial = vec![0u8; SIZE];
    rand::rngs::SmallRng::seed_from_u64(1).fill(&mut initial[..]);
    let backing: DynStore = Arc::new(MemStore::new(SIZE as u64));
    backing
        .write(0, Bytes::copy_from_slice(&initial))
        .await
        .unwrap();
    let region = Arc::new(
        LazyRegion::new(
            backing,
            RegionConfig {
                chunk_size: PAGE,
                write_tracking: WriteTracking::Dirty,
                huge_pages: false,
                ..RegionConfig::default()
            },
        )
        .unwrap(),
    );
    let source = RegionSource::new(region.clone()).unwrap();

    // The peer: a file of old bytes (zeros).
    let file = dir.path().join("remote.img");
    let store: DynStore =
        Arc::new(FileStore::open(&file, FileOptions::with_size(SIZE as u64)).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("memsync://{}", l.local_addr().unwrap());
    let peer = Peer::new(store, PeerConfig::default());
    tokio::spawn(async move {
        let _ = peer.serve(l).await;
    });
    let dest = RemoteDest::connect(&PeerAddr::parse(&url).unwrap(), SIZE as u64, CHUNK, true)
        .await
        .unwrap();
    let changes: Arc<dyn ChangeSource> = source.clone();
    let (pusher, first) = Pusher::start(
        Source {
            store: source.clone(),
            index: None,
        },
        dest.clone(),
        changes,
        SyncOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(first.updated, SIZE as u64 / CHUNK, "{first:?}");

    // The application writes small pieces at random places, through page faults.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    // Writes allowed before the next round starts: a loaded machine may stretch a round to
    // seconds, and a writer paced by time alone would then dirty every chunk and make the
    // check below fail for a reason that is not the tracker's.
    let allowed = Arc::new(AtomicU64::new(PER_ROUND));
    let w = {
        let (region, stop, writes, allowed) = (
            region.clone(),
            stop.clone(),
            writes.clone(),
            allowed.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
            while !stop.load(Relaxed) {
                if writes.load(Relaxed) >= allowed.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                for _ in 0..16 {
                    let off = rng.random_range(0..SIZE - 100);
                    let mut d = [0u8; 100];
                    rng.fill(&mut d[..]);
                    region.write_faulting(off, &d);
                    writes.fetch_add(1, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut busy_rounds = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        allowed.fetch_add(PER_ROUND, Relaxed);
        let r = pusher.round().await.unwrap();
        // Only written chunks: a round never covers the whole region again.
        assert!(r.chunks < SIZE as u64 / CHUNK, "{r:?}");
        busy_rounds += (r.updated > 0) as u32;
    }
    stop.store(true, Relaxed);
    w.join().unwrap();
    assert!(writes.load(Relaxed) > 0 && busy_rounds > 0);

    // The final round takes what was written since the last one.
    pusher.round().await.unwrap();
    dest.commit().await.unwrap();
    let mut now = vec![0u8; SIZE];
    region.read_at(0, &mut now).unwrap();
    let remote = std::fs::read(&file).unwrap();
    assert_eq!(
        blake3::hash(&remote),
        blake3::hash(&now),
        "the peer differs from the region after the final round"
    );
    assert_ne!(now, initial, "the writer changed nothing");
    // Nothing written since: a round finds nothing.
    let r = pusher.round().await.unwrap();
    assert_eq!((r.chunks, r.data_bytes), (0, 0), "{r:?}");
}
