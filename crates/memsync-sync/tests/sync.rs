//! memsync-sync end to end: every pair of store kinds (local, NBD, Redis, S3, a sync peer over
//! TCP and TLS), the persisted index, sub-chunk deltas, a cut in the middle, continuous push.

use std::sync::Arc;
use std::time::Duration;

use memsync_core::{Bytes, DynStore, Registry, Store, StoreExt};
use memsync_sync::dest::{Dest, PatchOutcome, Run};
use memsync_sync::digest::{self, Layout};
use memsync_sync::index::IndexFile;
use memsync_sync::{
    ChangeSource, LocalDest, NoProgress, Peer, PeerAddr, PeerConfig, Pusher, RemoteDest, Report,
    Rescan, Source, SyncOptions, Tracked, sync,
};
use memsync_testkit::servers::{RedisServer, S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};
use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng};

const CHUNK: u64 = 64 << 10;

fn registry() -> Registry {
    let mut r = Registry::new();
    memsync_local::register(&mut r);
    memsync_nbd::register(&mut r);
    memsync_redis::register(&mut r);
    memsync_s3::register(&mut r);
    r
}

/// Random contents with holes, then every kind of change the issue lists.
fn base(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    rng.fill_bytes(&mut v);
    // Holes: a whole chunk and a few pages of zeros.
    let c = CHUNK as usize;
    v[c..2 * c].fill(0);
    v[5 * 4096..7 * 4096].fill(0);
    v
}

fn mutate(seed: u64, v: &mut [u8]) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = v.len();
    for _ in 0..5 {
        let i = rng.random_range(0..n);
        v[i] ^= 0x5a; // single bytes
    }
    for _ in 0..3 {
        let p = rng.random_range(0..n / 4096) * 4096; // whole pages
        let end = (p + 4096).min(n);
        rng.fill_bytes(&mut v[p..end]);
    }
    let c = CHUNK as usize;
    rng.fill_bytes(&mut v[3 * c..4 * c]); // a whole chunk
    v[c..c + 100].fill(7); // data into the hole
    v[n - 3000..].fill(0); // zeros at the end
    v[8 * c..9 * c].fill(0); // a chunk becomes a hole
}

async fn fill(store: &DynStore, data: &[u8]) {
    store.write(0, Bytes::copy_from_slice(data)).await.unwrap();
    store.flush().await.unwrap();
}

async fn contents(store: &DynStore) -> Vec<u8> {
    store
        .read_bytes(0, store.size() as usize)
        .await
        .unwrap()
        .to_vec()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// A memsync NBD server over a mem store, on loopback.
async fn nbd_server(size: u64) -> (memsync_nbd::Server, String) {
    let store: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let srv = memsync_nbd::Server::new(memsync_nbd::ServerConfig::new(vec![
        memsync_nbd::Export::new("e", store),
    ]))
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    srv.listen_tcp(l);
    (srv, format!("nbd://127.0.0.1:{port}/e"))
}

/// A sync peer over a file store, on loopback; returns its URL and the file.
async fn peer(
    dir: &std::path::Path,
    size: u64,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (String, std::path::PathBuf, tokio::task::JoinHandle<()>) {
    let file = dir.join(format!("peer-{}.img", rand::random::<u32>()));
    let store: DynStore = Arc::new(
        memsync_local::FileStore::open(&file, memsync_local::FileOptions::with_size(size)).unwrap(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let tls_on = tls.is_some();
    let p = Peer::new(
        store,
        PeerConfig {
            tls,
            index_file: Some(file.clone()),
            ..PeerConfig::default()
        },
    );
    let h = tokio::spawn(async move {
        let _ = p.serve(l).await;
    });
    let url = if tls_on {
        format!(
            "memsyncs://localhost:{port}?tls-ca={}",
            dir.join("ca-cert.pem").display()
        )
    } else {
        format!("memsync://127.0.0.1:{port}")
    };
    (url, file, h)
}

async fn dest_for(url: &str, store: Option<DynStore>, size: u64) -> Arc<dyn Dest> {
    if memsync_sync::is_peer_url(url) {
        let a = PeerAddr::parse(url).unwrap();
        RemoteDest::connect(&a, size, CHUNK, true).await.unwrap()
    } else {
        Arc::new(LocalDest::new(store.unwrap(), CHUNK, None).unwrap())
    }
}

async fn sync_once(src: &DynStore, dst_url: &str, dst: Option<DynStore>) -> Report {
    let dest = dest_for(dst_url, dst, src.size()).await;
    let source = Source {
        store: src.clone(),
        index: None,
    };
    sync(&source, dest, SyncOptions::default(), &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("sync to {dst_url}: {e}"))
}

/// The URL of the `k`th store of one kind.
type UrlOf = Box<dyn Fn(usize) -> String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_store_kinds_ends_byte_identical() {
    let size: usize = (1 << 20) + 12345; // a short last chunk and a short last page
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let (_nbd, nbd_url) = nbd_server(size as u64).await;
    let redis = RedisServer::start();
    let s3 = S3Server::start();
    let mut kinds: Vec<(String, UrlOf)> = Vec::new();
    let d = dir.path().to_owned();
    kinds.push(("mem".into(), Box::new(move |_| format!("mem:{size}"))));
    let d2 = d.clone();
    kinds.push((
        "file".into(),
        Box::new(move |k| format!("file:{}/f{k}.img?size={size}", d2.display())),
    ));
    let d3 = d.clone();
    kinds.push((
        "dir".into(),
        Box::new(move |k| format!("dir:{}/d{k}?size={size}&chunk=16K", d3.display())),
    ));
    kinds.push(("nbd".into(), Box::new(move |_| nbd_url.clone())));
    if let Some(r) = &redis {
        let port = r.port();
        kinds.push((
            "redis".into(),
            Box::new(move |k| {
                format!("redis://127.0.0.1:{port}?size={size}&chunk=64K&prefix=s{k}")
            }),
        ));
    }
    if let Some(s) = &s3 {
        let ep = s.endpoint();
        kinds.push((
            "s3".into(),
            Box::new(move |k| {
                format!("s3://sync/p{k}?size={size}&chunk=256K&create&endpoint={ep}&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}")
            }),
        ));
    }
    let mut k = 0;
    for (si, (sname, surl)) in kinds.iter().enumerate() {
        // Destinations: every kind, and a sync peer.
        for (di, dname) in kinds
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(["peer"])
            .enumerate()
        {
            if si == di {
                continue; // the shared NBD export cannot be both sides
            }
            k += 1;
            let what = format!("{sname} -> {dname}");
            eprintln!("sync {what}");
            let src = reg.open(&surl(k * 2)).await.unwrap();
            let mut want = base(k as u64, size);
            let (dst_url, dst, peer_file, _h) = if dname == "peer" {
                let (url, file, h) = peer(dir.path(), size as u64, None).await;
                std::fs::write(&file, &want).unwrap();
                (url, None, Some(file), Some(h))
            } else {
                let u = kinds[di].1(k * 2 + 1);
                let s = reg.open(&u).await.unwrap();
                fill(&s, &want).await;
                (u, Some(s), None, None)
            };
            mutate(k as u64 + 1000, &mut want);
            fill(&src, &want).await;
            let r = sync_once(&src, &dst_url, dst.clone()).await;
            assert!(r.updated > 0 && r.updated < r.chunks, "{what}: {r:?}");
            let got = match (&dst, &peer_file) {
                (Some(s), _) => contents(s).await,
                (None, Some(f)) => std::fs::read(f).unwrap(),
                (None, None) => unreachable!(),
            };
            assert_same(&what, &got, &want);
            let again = sync_once(&src, &dst_url, dst).await;
            assert_eq!(
                (again.differing, again.data_bytes),
                (0, 0),
                "{what}: {again:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_destination_is_byte_identical_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let (url, file, _h) = peer(dir.path(), size as u64, None).await;
    let mut want = base(7, size);
    std::fs::write(&file, &want).unwrap();
    mutate(8, &mut want);
    let src: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
    fill(&src, &want).await;
    let r = sync_once(&src, &url, None).await;
    assert!(r.wire_sent > r.data_bytes, "{r:?}");
    assert_same("peer file", &std::fs::read(&file).unwrap(), &want);
    // The peer saved its index: the next sync hashes nothing there.
    let r = sync_once(&src, &url, None).await;
    assert!(r.dest.index_used, "{r:?}");
    assert_eq!(r.dest.scan.hashed, 0, "{r:?}");
}

fn make_certs(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_over_tls_and_a_plain_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let tls = memsync_nbd::server_tls_config(
        &dir.path().join("server-cert.pem"),
        &dir.path().join("server-key.pem"),
    )
    .unwrap();
    let size = 1 << 20;
    let (url, file, _h) = peer(dir.path(), size as u64, Some(tls)).await;
    let mut want = base(3, size);
    mutate(4, &mut want);
    let src: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
    fill(&src, &want).await;
    let r = sync_once(&src, &url, None).await;
    assert!(r.updated > 0);
    assert_same("tls peer", &std::fs::read(&file).unwrap(), &want);
    // The same port without TLS: the handshake fails, the client gets an error, not data.
    let plain = url
        .replace("memsyncs://localhost", "memsync://127.0.0.1")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let a = PeerAddr::parse(&plain).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        RemoteDest::connect(&a, size as u64, CHUNK, true),
    )
    .await
    .expect("a plain client must not hang");
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_skips_hashing_and_is_invalidated_by_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let (sf, df) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let mut want = base(11, size);
    std::fs::write(&sf, &want).unwrap();
    std::fs::write(&df, vec![0u8; size]).unwrap();
    let open = |p: &std::path::Path| -> DynStore {
        Arc::new(memsync_local::FileStore::open(p, memsync_local::FileOptions::default()).unwrap())
    };
    let run = |src: DynStore, dst: DynStore| {
        let (sf, df) = (sf.clone(), df.clone());
        async move {
            let source = Source {
                store: src,
                index: Some(IndexFile::for_file(&sf)),
            };
            let dest = Arc::new(LocalDest::new(dst, CHUNK, Some(&df)).unwrap());
            sync(&source, dest, SyncOptions::default(), &NoProgress)
                .await
                .unwrap()
        }
    };
    // The source index is only saved when its file changed more than a tick before the scan.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r1 = run(open(&sf), open(&df)).await;
    assert!(r1.src_scan.hashed > 0 && r1.updated > 0, "{r1:?}");
    assert_same("first", &std::fs::read(&df).unwrap(), &want);
    let r2 = run(open(&sf), open(&df)).await;
    assert_eq!(
        (
            r2.src_scan.hashed,
            r2.dest.scan.hashed,
            r2.src_index.as_str(),
            r2.dest.index_used
        ),
        (0, 0, "used", true),
        "{r2:?}"
    );
    // Change one byte and put the old mtime back: ctime still tells.
    let mtime = std::fs::metadata(&sf).unwrap().modified().unwrap();
    want[12345] ^= 1;
    std::fs::write(&sf, &want).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&sf)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let r3 = run(open(&sf), open(&df)).await;
    assert!(r3.src_index.starts_with("stale"), "{r3:?}");
    assert_eq!((r3.updated, r3.data_bytes), (1, 4096), "{r3:?}");
    assert_same("after one byte", &std::fs::read(&df).unwrap(), &want);
    // The stale index's fingerprints spared every chunk but the changed one a BLAKE3 hash.
    assert_eq!(
        (r3.src_scan.read, r3.src_scan.hashed, r3.src_scan.reused),
        (size as u64, CHUNK, size as u64 - CHUNK),
        "{r3:?}"
    );
    // Many kinds of change at once, found by fingerprints against the index r3 saved.
    tokio::time::sleep(Duration::from_millis(30)).await;
    mutate(12, &mut want);
    std::fs::write(&sf, &want).unwrap();
    let r4 = run(open(&sf), open(&df)).await;
    assert!(r4.src_index.starts_with("stale"), "{r4:?}");
    assert!(r4.src_scan.reused > 0, "{r4:?}");
    assert_same("after mutate", &std::fs::read(&df).unwrap(), &want);
    // Only the owner may read the index: its key is what makes fingerprints hard to forge.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(IndexFile::for_file(&sf).path())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "index mode {mode:o}");
}

/// A destination reads a changed chunk once for its page digests and its patch, and never
/// builds a patch on bytes that one of its own writes has replaced since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_reuses_the_chunk_read_for_its_page_digests_until_it_is_written() {
    let size = 4 * CHUNK;
    let store: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let random = |seed, n| {
        let mut v = vec![0u8; n];
        SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    };
    let v = random(41, size as usize);
    fill(&store, &v).await;
    let dest = LocalDest::new(store.clone(), CHUNK, None).unwrap();
    let c = CHUNK as usize;
    // Chunk 1 with its second page changed, patched after its page digests.
    let mut new1 = v[c..2 * c].to_vec();
    new1[4096..8192].fill(0x33);
    let pages = dest.page_digests(1).await.unwrap();
    assert_eq!(pages, digest::page_digests(&v[c..2 * c]));
    let run = |off: usize, data: &[u8]| Run {
        off: off as u32,
        len: data.len() as u32,
        data: Some(Bytes::copy_from_slice(data)),
    };
    let out = dest
        .patch(
            1,
            digest::chunk_digest(&new1),
            vec![run(4096, &new1[4096..8192])],
        )
        .await
        .unwrap();
    assert_eq!(out, PatchOutcome::Applied);
    // Chunk 2: page digests, then a whole-chunk write, then a partial patch on top of it. The
    // patch must start from the written bytes, not from those read for the page digests.
    dest.page_digests(2).await.unwrap();
    let whole = random(42, c);
    let out = dest
        .patch(2, digest::chunk_digest(&whole), vec![run(0, &whole)])
        .await
        .unwrap();
    assert_eq!(out, PatchOutcome::Applied);
    let mut new2 = whole.clone();
    new2[0..4096].fill(0x44);
    let out = dest
        .patch(2, digest::chunk_digest(&new2), vec![run(0, &new2[..4096])])
        .await
        .unwrap();
    assert_eq!(
        out,
        PatchOutcome::Applied,
        "the patch was built on stale bytes"
    );
    let stats = dest.commit().await.unwrap();
    // Chunk 1 read once (page digests), chunk 2 twice (page digests, then after the write).
    assert_eq!(stats.read, 3 * CHUNK, "{stats:?}");
    let got = contents(&store).await;
    assert_same("chunk 1", &got[c..2 * c], &new1);
    assert_same("chunk 2", &got[2 * c..3 * c], &new2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_page_in_a_large_chunk_sends_one_page() {
    let size = 8 << 20;
    let src: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let dst: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let v = base(5, size as usize);
    fill(&src, &v).await;
    fill(&dst, &v).await;
    src.write(3 * (1 << 20) + 8192, Bytes::from(vec![9u8; 4096]))
        .await
        .unwrap();
    let dest = Arc::new(LocalDest::new(dst.clone(), 1 << 20, None).unwrap());
    let source = Source {
        store: src.clone(),
        index: None,
    };
    let r = sync(&source, dest, SyncOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (r.differing, r.updated, r.data_bytes),
        (1, 1, 4096),
        "{r:?}"
    );
    assert_same("1 MiB chunks", &contents(&dst).await, &contents(&src).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_does_not_give_its_digest_writes_nothing() {
    let size = 1 << 20;
    let dst: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let old = base(2, size as usize);
    fill(&dst, &old).await;
    let d = LocalDest::new(dst.clone(), CHUNK, None).unwrap();
    // Runs that would make chunk 0 something other than what the digest says.
    let runs = vec![Run {
        off: 4096,
        len: 4096,
        data: Some(Bytes::from(vec![1u8; 4096])),
    }];
    assert_eq!(
        d.patch(0, [0u8; 32], runs.clone()).await.unwrap(),
        PatchOutcome::Mismatch
    );
    assert_same("untouched", &contents(&dst).await, &old);
    // The right digest applies it.
    let mut new = old[..CHUNK as usize].to_vec();
    new[4096..8192].fill(1);
    let want = digest::chunk_digest(&new);
    assert_eq!(d.patch(0, want, runs).await.unwrap(), PatchOutcome::Applied);
    assert_eq!(&contents(&dst).await[..CHUNK as usize], &new[..]);
    // Runs outside the chunk are an error, not a write.
    let bad = vec![Run {
        off: CHUNK as u32 - 10,
        len: 20,
        data: None,
    }];
    assert!(d.patch(0, want, bad).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_in_the_middle_leaves_each_chunk_old_or_new_and_a_rerun_completes() {
    use memsync_testkit::proxy::{Proxy, ProxyConfig};
    let dir = tempfile::tempdir().unwrap();
    let size: usize = 16 << 20;
    let (url, file, _h) = peer(dir.path(), size as u64, None).await;
    let old = base(21, size);
    std::fs::write(&file, &old).unwrap();
    let mut new = old.clone();
    SmallRng::seed_from_u64(22).fill_bytes(&mut new);
    let src: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
    fill(&src, &new).await;
    // 4 MB/s through the proxy: the cut lands while chunks are in flight.
    let upstream = url.trim_start_matches("memsync://").to_owned();
    let proxy = Proxy::start(
        "127.0.0.1:0",
        &upstream,
        ProxyConfig {
            bandwidth: Some(4 << 20),
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();
    let purl = format!("memsync://{}", proxy.local_addr());
    let a = PeerAddr::parse(&purl).unwrap();
    let dest = RemoteDest::connect(&a, size as u64, CHUNK, true)
        .await
        .unwrap();
    let source = Source {
        store: src.clone(),
        index: None,
    };
    let task =
        tokio::spawn(async move { sync(&source, dest, SyncOptions::default(), &NoProgress).await });
    // Cut once some chunks have gone through.
    while proxy.stats().up_bytes < (3 << 20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut_all();
    let err = task.await.unwrap().expect_err("the cut must fail the sync");
    let r = &err.report;
    assert!(r.updated > 0 && !r.pending.is_empty(), "{r:?}");
    // Wait for the peer to finish what it received whole (it commits at the end).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_disk = std::fs::read(&file).unwrap();
    let layout = Layout::new(size as u64, CHUNK).unwrap();
    let pending: std::collections::HashSet<u64> =
        r.pending.iter().flat_map(|x| x.clone()).collect();
    let (mut n_old, mut n_new) = (0, 0);
    for i in 0..layout.chunks() {
        let (o, l) = layout.chunk(i);
        let (o, l) = (o as usize, l as usize);
        let got = &on_disk[o..o + l];
        let is_new = got == &new[o..o + l];
        let is_old = got == &old[o..o + l];
        assert!(is_new || is_old, "chunk {i} is neither old nor new");
        if !pending.contains(&i) {
            assert!(is_new, "chunk {i} reported done but not new");
        } else if !r.uncertain.contains(&i) {
            assert!(
                is_old,
                "chunk {i} reported pending (not in flight) but not old"
            );
        }
        n_old += is_old as u32;
        n_new += is_new as u32;
    }
    assert!(n_old > 0 && n_new > 0, "old {n_old} new {n_new}");
    // A rerun (direct) completes and sends only what is still old.
    let r2 = sync_once(&src, &url, None).await;
    assert_eq!(r2.updated, n_old as u64, "{r2:?}");
    assert_same("after rerun", &std::fs::read(&file).unwrap(), &new);
}

/// Writes random pages at random places until told to stop.
fn writer(
    store: DynStore,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = SmallRng::seed_from_u64(99);
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let pages = store.size() / 4096;
            let off = rng.random_range(0..pages) * 4096;
            let mut b = vec![0u8; 4096];
            if rng.random_bool(0.9) {
                rng.fill_bytes(&mut b);
            }
            store.write(off, Bytes::from(b)).await.unwrap();
            n += 1;
            if n % 64 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        n
    })
}

async fn continuous(
    src: DynStore,
    changes: Arc<dyn ChangeSource>,
    dst_url: &str,
    dst: Option<DynStore>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(src.clone(), stop.clone());
    let dest = dest_for(dst_url, dst, src.size()).await;
    let (pusher, first) = start_pusher(src.clone(), dest, changes).await;
    assert!(first.updated > 0);
    let mut busy = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = pusher.round().await.unwrap();
        busy += (r.updated > 0) as u32;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = w.await.unwrap();
    assert!(
        writes > 0 && busy > 0,
        "writes {writes}, busy rounds {busy}"
    );
    pusher.round().await.unwrap();
    // One more round after a quiet one finds nothing.
    let r = pusher.round().await.unwrap();
    assert_eq!(r.updated, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_push_with_write_tracking_to_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let (url, file, _h) = peer(dir.path(), size, None).await;
    let mem: DynStore = Arc::new(memsync_local::MemStore::new(size));
    fill(&mem, &base(1, size as usize)).await;
    let tracked = Tracked::new(mem.clone(), 4096);
    let changes: Arc<dyn ChangeSource> = tracked.clone();
    continuous(tracked, changes, &url, None).await;
    assert_same(
        "peer after final round",
        &std::fs::read(&file).unwrap(),
        &contents(&mem).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_push_by_hashing_to_a_local_store() {
    let size = 4 << 20;
    let src: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let dst: DynStore = Arc::new(memsync_local::MemStore::new(size));
    fill(&src, &base(2, size as usize)).await;
    let changes: Arc<dyn ChangeSource> = Rescan::new(src.clone(), CHUNK).unwrap();
    continuous(src.clone(), changes, "mem", Some(dst.clone())).await;
    assert_same(
        "after final round",
        &contents(&dst).await,
        &contents(&src).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_marks_after_the_write_and_takes_atomically() {
    let mem: DynStore = Arc::new(memsync_local::MemStore::new(1 << 20));
    let t = Tracked::new(mem, 4096);
    assert!(t.take_changes().await.unwrap().is_empty());
    t.write(5000, Bytes::from_static(b"x")).await.unwrap();
    t.write_zeroes(8192, 8192).await.unwrap();
    t.write((1 << 20) - 1, Bytes::from_static(b"y"))
        .await
        .unwrap();
    assert_eq!(
        t.take_changes().await.unwrap(),
        vec![4096..16384, (1 << 20) - 4096..1 << 20]
    );
    assert!(t.take_changes().await.unwrap().is_empty());
}

/// The first, full sync of `src` to `dest` (default options, no index) and the pusher after it.
async fn start_pusher(
    src: DynStore,
    dest: Arc<dyn Dest>,
    changes: Arc<dyn ChangeSource>,
) -> (Pusher, memsync_sync::Report) {
    let source = Source {
        store: src,
        index: None,
    };
    Pusher::start(source, dest, changes, SyncOptions::default(), &NoProgress)
        .await
        .unwrap()
}

/// A round whose writes to the destination fail gives its changes back to the tracker: the
/// next round pushes them (before, they were taken and lost, and the destination stayed old).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tracked_round_is_pushed_by_the_next() {
    use memsync_core::layers::{Inject, OpSet};
    let size = 1 << 20;
    let mem: DynStore = Arc::new(memsync_local::MemStore::new(size));
    fill(&mem, &base(3, size as usize)).await;
    let dst_mem: DynStore = Arc::new(memsync_local::MemStore::new(size));
    let inject = Inject::new(dst_mem.clone());
    let control = inject.control();
    let dest: Arc<dyn Dest> = Arc::new(LocalDest::new(Arc::new(inject), CHUNK, None).unwrap());
    let tracked = Tracked::new(mem.clone(), 4096);
    let (pusher, _) = start_pusher(tracked.clone(), dest, tracked.clone()).await;
    tracked
        .write(200_000, Bytes::from(vec![7u8; 10_000]))
        .await
        .unwrap();
    control.fail_always(OpSet::WRITE);
    assert!(
        pusher.round().await.is_err(),
        "the destination's writes fail"
    );
    control.clear();
    let r = pusher.round().await.unwrap();
    assert!(r.updated >= 1 && r.data_bytes >= 10_000, "{r:?}");
    assert_same(
        "after the round that followed a failed one",
        &contents(&dst_mem).await,
        &contents(&mem).await,
    );
}

/// A local destination whose commit can fail, and a failed commit loses every write since the
/// last good one (like a peer that dies before its commit): its store gets back the bytes it
/// had at that commit.
#[derive(Debug)]
struct RevertingDest {
    inner: LocalDest,
    store: DynStore,
    committed: parking_lot::Mutex<Vec<u8>>,
    fail: std::sync::atomic::AtomicBool,
}

#[memsync_core::async_trait]
impl Dest for RevertingDest {
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    async fn digests(&self) -> memsync_core::Result<Vec<digest::Digest>> {
        self.inner.digests().await
    }
    async fn page_digests(&self, i: u64) -> memsync_core::Result<Vec<u32>> {
        self.inner.page_digests(i).await
    }
    async fn patch(
        &self,
        i: u64,
        d: digest::Digest,
        runs: Vec<Run>,
    ) -> memsync_core::Result<PatchOutcome> {
        self.inner.patch(i, d, runs).await
    }
    async fn commit(&self) -> memsync_core::Result<memsync_sync::dest::DestStats> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            let old = self.committed.lock().clone();
            self.store.write(0, Bytes::from(old)).await?;
            return Err(memsync_core::StoreError::backend(
                "commit failed; its writes are gone",
            ));
        }
        let stats = self.inner.commit().await?;
        *self.committed.lock() = contents(&self.store).await;
        Ok(stats)
    }
    fn as_local(&self) -> Option<&LocalDest> {
        Some(&self.inner)
    }
}

/// A round whose commit fails may leave the destination without its writes: the next round
/// must send them again, not take the chunks as already there (with write tracking, and with
/// a rescan whose baseline must not take the failed round's digests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_whose_commit_failed_is_resent_by_the_next() {
    for rescan in [false, true] {
        let size = 1 << 20;
        let mem: DynStore = Arc::new(memsync_local::MemStore::new(size));
        fill(&mem, &base(4, size as usize)).await;
        let dst_mem: DynStore = Arc::new(memsync_local::MemStore::new(size));
        let dest = Arc::new(RevertingDest {
            inner: LocalDest::new(dst_mem.clone(), CHUNK, None).unwrap(),
            store: dst_mem.clone(),
            committed: parking_lot::Mutex::new(Vec::new()),
            fail: false.into(),
        });
        let tracked = Tracked::new(mem.clone(), 4096);
        let changes: Arc<dyn ChangeSource> = if rescan {
            Rescan::new(mem.clone(), CHUNK).unwrap()
        } else {
            tracked.clone()
        };
        let (pusher, _) = start_pusher(tracked.clone(), dest.clone(), changes).await;
        // Pages in two chunks, and a whole chunk.
        tracked
            .write(200_000, Bytes::from(vec![7u8; 10_000]))
            .await
            .unwrap();
        tracked
            .write(5 * CHUNK + 4096, Bytes::from(vec![9u8; 4096]))
            .await
            .unwrap();
        tracked
            .write(10 * CHUNK, Bytes::from(vec![3u8; CHUNK as usize]))
            .await
            .unwrap();
        dest.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            pusher.round().await.is_err(),
            "rescan {rescan}: the commit fails"
        );
        assert_ne!(
            contents(&dst_mem).await,
            contents(&mem).await,
            "rescan {rescan}: the failed commit took its writes back"
        );
        dest.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let r = pusher.round().await.unwrap();
        assert!(
            r.updated >= 3 && r.data_bytes >= 10_000 + 4096 + CHUNK,
            "rescan {rescan}: {r:?}"
        );
        assert_same(
            &format!("rescan {rescan}: after the round that followed a failed commit"),
            &contents(&dst_mem).await,
            &contents(&mem).await,
        );
        // And the round after that has nothing left to do.
        let r = pusher.round().await.unwrap();
        assert_eq!(r.updated, 0, "rescan {rescan}: {r:?}");
    }
}

/// A peer serving `data` from a read-only file store; returns its URL.
async fn read_only_peer(
    dir: &std::path::Path,
    data: &[u8],
) -> (String, tokio::task::JoinHandle<()>) {
    let file = dir.join("ro-peer.img");
    std::fs::write(&file, data).unwrap();
    // An index is trusted only if the file's last change lies RACY_NS before the scan began (a
    // change within one timestamp tick would not show): let the write age past that, so that
    // the second pull may use the index the first one saved.
    std::thread::sleep(std::time::Duration::from_nanos(
        memsync_sync::index::RACY_NS as u64 + 5_000_000,
    ));
    let store: DynStore = Arc::new(
        memsync_local::FileStore::open(&file, memsync_local::FileOptions::read_only()).unwrap(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let p = Peer::new(
        store,
        PeerConfig {
            tls: None,
            index_file: Some(file),
            ..PeerConfig::default()
        },
    );
    let h = tokio::spawn(async move {
        let _ = p.serve(l).await;
    });
    (format!("memsync://127.0.0.1:{port}"), h)
}

async fn pull_once(url: &str, local: &DynStore, compress: bool) -> Report {
    let a = PeerAddr::parse(url).unwrap();
    let opts = memsync_sync::Connect {
        want_digests: true,
        compress,
        pull: true,
    };
    let remote = RemoteDest::connect_with(&a, local.size(), CHUNK, opts)
        .await
        .unwrap();
    let dest = Arc::new(LocalDest::new(local.clone(), CHUNK, None).unwrap());
    memsync_sync::pull(remote, dest, SyncOptions::default(), &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("pull from {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_read_only_peer_makes_the_local_store_equal_sending_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let old = base(31, size);
    let mut new = old.clone();
    mutate(32, &mut new);
    let (url, _h) = read_only_peer(dir.path(), &new).await;
    let local: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
    fill(&local, &old).await;
    let r = pull_once(&url, &local, false).await;
    assert_same("pulled", &contents(&local).await, &new);
    // The changes of `mutate`: a few pages, a whole chunk, some zeros; far less than the store.
    assert!(r.updated > 0 && r.data_bytes < 4 * CHUNK, "{r:?}");
    assert!(r.wire_received < r.data_bytes + 64 * 1024, "{r:?}");
    // Nothing left to pull; the peer's index (saved by the first pull) spares it a hash.
    let r = pull_once(&url, &local, false).await;
    assert_eq!((r.differing, r.updated, r.data_bytes), (0, 0, 0), "{r:?}");
    assert_eq!(r.src_scan.hashed, 0, "{r:?}");
    // A push to a read-only peer is refused.
    let a = PeerAddr::parse(&url).unwrap();
    assert!(
        RemoteDest::connect(&a, size as u64, CHUNK, true)
            .await
            .is_err()
    );
}

/// Text-like pages (compressible) written over random data.
fn text_pages(seed: u64, v: &mut [u8]) -> u64 {
    let mut rng = SmallRng::seed_from_u64(seed);
    let words = [
        "memsync ", "delta ", "sync ", "chunk ", "page ", "digest ", "peer ",
    ];
    let mut changed = 0;
    for _ in 0..40 {
        let p = rng.random_range(0..v.len() / 4096) * 4096;
        let mut text = Vec::with_capacity(4096);
        while text.len() < 4096 {
            text.extend_from_slice(words[rng.random_range(0..words.len())].as_bytes());
        }
        v[p..p + 4096].copy_from_slice(&text[..4096]);
        changed += 4096;
    }
    changed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_negotiated_and_sends_less_for_text_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let mut sent = Vec::new();
    for compress in [false, true] {
        let (url, file, _h) = peer(dir.path(), size as u64, None).await;
        let old = base(41, size);
        std::fs::write(&file, &old).unwrap();
        let mut new = old.clone();
        let changed = text_pages(42, &mut new);
        let src: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
        fill(&src, &new).await;
        let a = PeerAddr::parse(&url).unwrap();
        let opts = memsync_sync::Connect {
            want_digests: true,
            compress,
            pull: false,
        };
        let dest = RemoteDest::connect_with(&a, size as u64, CHUNK, opts)
            .await
            .unwrap();
        assert_eq!(dest.compressed(), compress);
        let source = Source {
            store: src.clone(),
            index: None,
        };
        let r = sync(&source, dest, SyncOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(r.data_bytes, changed, "{r:?}");
        assert_same("peer file", &std::fs::read(&file).unwrap(), &new);
        // Pull it back into the old bytes, compressed or not.
        let back: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
        fill(&back, &old).await;
        let p = pull_once(&url, &back, compress).await;
        assert_same("pulled back", &contents(&back).await, &new);
        sent.push((r.wire_sent, p.wire_received));
    }
    let ((push_plain, pull_plain), (push_lz4, pull_lz4)) = (sent[0], sent[1]);
    assert!(push_lz4 * 2 < push_plain, "{sent:?}");
    assert!(pull_lz4 * 2 < pull_plain, "{sent:?}");
}

/// A destination that was scanned and not written saves its index only if the file is as it
/// was when the scan began: a change during the sync must not be covered by old digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanned_index_is_not_saved_over_a_change_made_after_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.img");
    std::fs::write(&file, base(51, 1 << 20)).unwrap();
    let store: DynStore = Arc::new(
        memsync_local::FileStore::open(&file, memsync_local::FileOptions::default()).unwrap(),
    );
    let dest = LocalDest::new(store, CHUNK, Some(&file)).unwrap();
    let before = dest.digests().await.unwrap();
    // Another program changes the file after the scan, before the commit.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|h| std::os::unix::fs::FileExt::write_all_at(&h, &[9u8; 4096], 0))
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    dest.commit().await.unwrap();
    let layout = Layout::new(1 << 20, CHUNK).unwrap();
    match IndexFile::for_file(&file).load(layout) {
        Ok(d) => panic!(
            "an index was saved over the change (chunk 0 old: {})",
            d[0] == before[0]
        ),
        Err(s) => assert_ne!(s, memsync_sync::index::IndexStatus::Used),
    }
}

/// The scan reads a piece in steps smaller than the piece (and than a large chunk): every
/// chunk's digest is that of its bytes, and the hook sees every chunk once with its own bytes,
/// for chunks smaller and larger than a step, and a short last chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_digests_and_hook_cover_every_chunk_once() {
    let size = (9 << 20) + 5000;
    let data = base(4, size);
    let store: DynStore = Arc::new(memsync_local::MemStore::new(size as u64));
    fill(&store, &data).await;
    for chunk in [4096u64, 64 << 10, 1 << 20, 4 << 20] {
        let layout = Layout::new(size as u64, chunk).unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(vec![
            0u32;
            layout.chunks() as usize
        ]));
        let (seen2, data2) = (seen.clone(), data.clone());
        let hook: digest::PieceHook = Arc::new(move |first, buf, digests| {
            let (off, _) = layout.chunk(first);
            assert_eq!(buf, &data2[off as usize..off as usize + buf.len()]);
            assert_eq!(digests.len() as u64, (buf.len() as u64).div_ceil(chunk));
            for k in 0..digests.len() {
                seen2.lock()[first as usize + k] += 1;
            }
            Ok(())
        });
        let (d, stats) = digest::scan(&store, layout, &|_| {}, Some(hook))
            .await
            .unwrap();
        let want: Vec<_> = data
            .chunks(chunk as usize)
            .map(digest::chunk_digest)
            .collect();
        assert!(d == want, "chunk {chunk}: digests differ");
        assert_eq!(stats.hashed + stats.holes, size as u64, "chunk {chunk}");
        // Chunks the store reports as holes are neither read nor shown to the hook.
        let holes = stats.holes.div_ceil(chunk) as usize;
        let seen = seen.lock();
        assert!(
            seen.iter().all(|&n| n <= 1)
                && seen.iter().filter(|&&n| n == 1).count() + holes == seen.len(),
            "chunk {chunk}: hook coverage"
        );
    }
}
