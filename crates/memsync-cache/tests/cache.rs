//! memsync-cache: the contract suite over the cache, shared misses, restart without refetch,
//! crash with dirty chunks, a remote cut through the delay proxy (memsync's NBD server as the
//! remote), nbdkit as the remote, the proxy's delay and throughput. The cache behind a FUSE
//! file is tested in memsync-fuse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use memsync_cache::{Cache, CacheConfig, Reconnect};
use memsync_core::layers::{Inject, OpKind, OpSet, Stats};
use memsync_core::{Bytes, DynStore, Store, StoreExt};
use memsync_local::MemStore;
use memsync_nbd::{ClientConfig, Export, NbdAddr, NbdStore, Server, ServerConfig};
use memsync_testkit::contract::{self, ContractOpts};
use memsync_testkit::proxy::{Proxy, ProxyConfig};
use memsync_testkit::random_bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "cache/stack.rs"]
mod stack;

async fn filled_mem(size: u64, seed: u64) -> Arc<MemStore> {
    let m = Arc::new(MemStore::new(size));
    m.write(0, random_bytes(seed, size as usize)).await.unwrap();
    m
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

/// A delay proxy on a free loopback port in front of `up`.
async fn delay_proxy(up: &str, rtt: Duration) -> Proxy {
    Proxy::start(
        "127.0.0.1:0",
        up,
        ProxyConfig {
            rtt,
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap()
}

async fn bounded<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_small_chunks_no_pull() {
    let dir = tempfile::tempdir().unwrap();
    let remote: DynStore = Arc::new(MemStore::new(4 << 20));
    let cache = Arc::new(
        Cache::open(remote, dir.path(), cfg(4096, false))
            .await
            .unwrap(),
    );
    bounded(
        "contract",
        Duration::from_secs(120),
        contract::run(cache.clone(), ContractOpts::default()),
    )
    .await;
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_with_pull_and_push() {
    let dir = tempfile::tempdir().unwrap();
    let remote: DynStore = filled_mem(8 << 20, 1).await;
    let cache = Arc::new(
        Cache::open(remote.clone(), dir.path(), cfg(64 * 1024, true))
            .await
            .unwrap(),
    );
    bounded(
        "contract",
        Duration::from_secs(120),
        contract::run(
            cache.clone(),
            ContractOpts::default().expect_zero_initialised(false),
        ),
    )
    .await;
    cache.flush().await.unwrap();
    // After the flush the remote holds exactly what the cache shows.
    let a = cache.read_bytes(0, 8 << 20).await.unwrap();
    let b = remote.read_bytes(0, 8 << 20).await.unwrap();
    assert!(a == b, "remote differs from the cache after flush");
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let mem = filled_mem(1 << 20, 2).await;
    let fault = Inject::new(mem.clone() as DynStore);
    fault
        .control()
        .set_delay(OpSet::READ, Duration::from_millis(100));
    let stats = Arc::new(Stats::new(fault));
    let cache = Arc::new(
        Cache::open(stats.clone(), dir.path(), cfg(64 * 1024, false))
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = cache.clone();
        tasks.push(tokio::spawn(async move {
            c.read_bytes(3 * 65536 + i * 100, 100).await.unwrap()
        }));
    }
    let want = mem.read_bytes(3 * 65536, 1700).await.unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(&got[..], &want[i * 100..i * 100 + 100]);
    }
    assert_eq!(
        stats.snapshot().get(OpKind::Read).ops,
        1,
        "one remote read for 16 concurrent misses"
    );
    let s = cache.stats();
    assert_eq!(s.misses, 1, "{s}");
    assert!(s.shared_waits >= 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mem = filled_mem(size, 3).await;
    {
        let cache = Cache::open(mem.clone(), dir.path(), cfg(16 * 1024, true))
            .await
            .unwrap();
        assert!(
            bounded(
                "pull",
                Duration::from_secs(30),
                cache.wait_pulled(Duration::from_secs(30))
            )
            .await
        );
        cache
            .write(12345, Bytes::from_static(b"written before restart"))
            .await
            .unwrap();
        cache.close().await.unwrap();
        let s = cache.stats();
        assert_eq!(s.local_chunks, s.chunks, "{s}");
    }
    let want = mem.read_bytes(0, size as usize).await.unwrap();
    assert_eq!(&want[12345..12345 + 22], b"written before restart");
    let stats = Arc::new(Stats::new(mem.clone() as DynStore));
    let cache = Cache::open(stats.clone(), dir.path(), cfg(16 * 1024, true))
        .await
        .unwrap();
    assert_eq!(cache.progress().present_chunks, cache.chunk_count());
    let got = cache.read_bytes(0, size as usize).await.unwrap();
    assert!(got == want, "data differs after restart");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Nothing refetched: the only remote reads are the reopen's comparison of three clean
    // 4 KiB samples with the remote (that the directory is this remote's).
    let snap = stats.snapshot();
    let reads = snap.get(OpKind::Read);
    assert!(
        reads.ops <= 3 && reads.bytes <= 3 * 4096,
        "refetched after restart: {} reads, {} bytes",
        reads.ops,
        reads.bytes
    );
    assert_eq!(cache.stats().remote_reads, 0, "{}", cache.stats());
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_chunks_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let mem = filled_mem(size, 4).await;
    let fault = Inject::new(mem.clone() as DynStore);
    // The remote refuses writes: nothing can be pushed before the "crash".
    fault.control().fail_always(OpSet::WRITE);
    let data = random_bytes(44, 200_000);
    {
        let cache = Cache::open(Arc::new(fault), dir.path(), cfg(64 * 1024, false))
            .await
            .unwrap();
        cache.write(1_000_000, data.clone()).await.unwrap();
        cache.checkpoint().await.unwrap();
        assert!(cache.progress().dirty_chunks >= 4);
        // Crash: dropped without close or flush.
    }
    assert_ne!(mem.read_bytes(1_000_000, data.len()).await.unwrap(), data);
    let cache = Cache::open(mem.clone(), dir.path(), cfg(64 * 1024, false))
        .await
        .unwrap();
    // (The pusher may already be writing them back: no assertion on the dirty count here.)
    // The pusher writes them back by itself; flush waits for it.
    bounded("flush", Duration::from_secs(30), cache.flush())
        .await
        .unwrap();
    assert_eq!(mem.read_bytes(1_000_000, data.len()).await.unwrap(), data);
    assert!(
        cache.stats().pushed_bytes >= data.len() as u64,
        "{}",
        cache.stats()
    );
    assert_eq!(cache.progress().dirty_chunks, 0);
    cache.close().await.unwrap();
}

/// An in-process `memsync serve` of a memory store on loopback.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_cut_through_the_proxy() {
    let size = 16u64 << 20;
    let mem = filled_mem(size, 5).await;
    let (server, addr) = nbd_server(mem.clone()).await;
    let proxy = Proxy::start(
        "127.0.0.1:0",
        &addr,
        ProxyConfig {
            rtt: Duration::from_millis(4),
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();
    let remote = nbd_remote(&proxy.local_addr().to_string(), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(64 * 1024, false);
    let fetch_timeout = Duration::from_millis(700);
    c.fetch_timeout = fetch_timeout;
    let cache = Arc::new(Cache::open(remote.clone(), dir.path(), c).await.unwrap());
    // The first 4 MiB become local.
    let head = cache.read_bytes(0, 4 << 20).await.unwrap();
    assert_eq!(head, mem.read_bytes(0, 4 << 20).await.unwrap());

    proxy.set_blocked(true);
    proxy.cut_all();
    // Local chunks keep working, without asking the remote.
    let reads = cache.stats().remote_reads;
    assert_eq!(
        cache.read_bytes(1 << 20, 65536).await.unwrap(),
        head.slice(1 << 20..(1 << 20) + 65536)
    );
    assert_eq!(cache.stats().remote_reads, reads);
    // Missing chunks fail with EIO (after the fetch timeout; bounded only against a hang, with
    // a margin no scheduling delay reaches).
    let e = bounded(
        "a read of a missing chunk",
        fetch_timeout + Duration::from_secs(30),
        cache.read_bytes(10 << 20, 4096),
    )
    .await
    .unwrap_err();
    assert_eq!(e.errno(), libc_eio(), "{}", e.chain());
    // Writes to local chunks are acknowledged; the flush waits for the remote.
    let data = random_bytes(55, 100_000);
    cache.write(500_000, data.clone()).await.unwrap();
    let c2 = cache.clone();
    let flush = tokio::spawn(async move { c2.flush().await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !flush.is_finished(),
        "flush returned while the remote was unreachable"
    );
    assert_ne!(mem.read_bytes(500_000, data.len()).await.unwrap(), data);

    proxy.set_blocked(false);
    bounded(
        "flush after the remote came back",
        Duration::from_secs(20),
        flush,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(mem.read_bytes(500_000, data.len()).await.unwrap(), data);
    assert!(remote.reconnects() >= 1);
    // Missing chunks work again.
    assert_eq!(
        cache.read_bytes(10 << 20, 4096).await.unwrap(),
        mem.read_bytes(10 << 20, 4096).await.unwrap()
    );
    cache.close().await.unwrap();
    server.shutdown().await.unwrap();
}

fn libc_eio() -> i32 {
    5
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_as_the_remote() {
    let port = free_port();
    let child = std::process::Command::new("nbdkit")
        .args([
            "-f",
            "-p",
            &port.to_string(),
            "-i",
            "127.0.0.1",
            "memory",
            "16M",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map(Child)
        .expect("nbdkit is needed for this test: run scripts/setup.sh");
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "nbdkit did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let remote = nbd_remote(&addr, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(
        Cache::open(remote.clone(), dir.path(), cfg(64 * 1024, true))
            .await
            .unwrap(),
    );
    bounded(
        "contract",
        Duration::from_secs(120),
        contract::run(cache.clone(), ContractOpts::default()),
    )
    .await;
    let data = random_bytes(66, 3 << 20);
    cache.write(5 << 20, data.clone()).await.unwrap();
    bounded("flush", Duration::from_secs(30), cache.flush())
        .await
        .unwrap();
    // A fresh client sees every flushed byte.
    let other = nbd_remote(&addr, 1).await;
    assert_eq!(other.read_bytes(5 << 20, 3 << 20).await.unwrap(), data);
    let all_cache = cache.read_bytes(0, 16 << 20).await.unwrap();
    assert!(all_cache == other.read_bytes(0, 16 << 20).await.unwrap());
    cache.close().await.unwrap();
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_delays_without_limiting_throughput() {
    // Upstream: echoes 1-byte pings and swallows bulk data, reporting the count at EOF.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if n == 1 && total == 0 {
                        let _ = s.write_all(&buf[..1]).await;
                        continue;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    let rtt = Duration::from_millis(20);
    let proxy = delay_proxy(&up, rtt).await;
    let paddr = proxy.local_addr();
    // Round trip.
    let mut s = tokio::net::TcpStream::connect(paddr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        best = best.min(t.elapsed());
    }
    drop(s);
    // At least the RTT (the delay is applied); the upper bound only catches a runaway delay,
    // with a margin no scheduling noise reaches.
    assert!(
        best >= rtt - Duration::from_millis(1) && best < rtt + Duration::from_secs(5),
        "ping through the proxy took {best:?}"
    );
    // Bulk: far more than a window of data per RTT; at RTT 0 for comparison.
    let bulk = |paddr: std::net::SocketAddr| async move {
        let total = 512u64 << 20;
        let mut s = tokio::net::TcpStream::connect(paddr).await.unwrap();
        let chunk = vec![7u8; 1 << 20];
        let t = Instant::now();
        s.write_all(&chunk[..2]).await.unwrap();
        for _ in 0..(total >> 20) - 1 {
            s.write_all(&chunk).await.unwrap();
        }
        s.write_all(&chunk[..(1 << 20) - 2]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut cnt = [0u8; 8];
        bounded(
            "bulk transfer",
            Duration::from_secs(60),
            s.read_exact(&mut cnt),
        )
        .await
        .unwrap();
        let el = t.elapsed();
        assert_eq!(u64::from_be_bytes(cnt), total);
        total as f64 / el.as_secs_f64() / 1e9
    };
    let gbps = bulk(paddr).await;
    proxy.set_rtt(Duration::ZERO);
    let gbps0 = bulk(paddr).await;
    eprintln!("proxy bulk throughput: {gbps:.2} GB/s at RTT {rtt:?}, {gbps0:.2} GB/s at RTT 0");
    // Stop-and-wait at 256 KiB pieces would give 256 KiB / 20 ms = 13 MB/s: the bound is
    // more than twice that and far below what any pipelining does (0.5+ GB/s here), so only a
    // delay line that stops pipelining fails it, not a loaded machine.
    assert!(
        gbps > 0.03,
        "the delay line limits throughput: {gbps:.3} GB/s"
    );
}

/// Chunks the remote reports as zeros (NBD base:allocation holes) are made local without a
/// read; chunks with any data, even partly, are fetched; every byte matches the remote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_chunks_of_the_remote_are_not_fetched() {
    let size = 32u64 << 20;
    let mem = Arc::new(MemStore::new(size));
    // Data in chunks 0 and 81 (64 KiB chunks), and an unaligned piece over chunks 160-161.
    for (off, len, seed) in [
        (0u64, 65536usize, 1u64),
        ((5 << 20) + 65536, 65536, 2),
        ((10 << 20) + 100, 70000, 3),
    ] {
        mem.write(off, random_bytes(seed, len)).await.unwrap();
    }
    let (_server, addr) = nbd_server(mem.clone() as DynStore).await;
    let remote = nbd_remote(&addr, 1).await;
    assert!(remote.caps().extents, "the NBD remote reports extents");
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(remote as DynStore, dir.path(), cfg(65536, false))
        .await
        .unwrap();
    // Adoption runs in the background; it is quick here.
    let t = Instant::now();
    while cache.stats().zero_chunks < 512 - 4 && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = cache.stats();
    assert_eq!(s.zero_chunks, 512 - 4, "{s}");
    assert_eq!(cache.progress().present_chunks, 512 - 4);
    let mut got = vec![0u8; size as usize];
    for (i, part) in got.chunks_mut(1 << 20).enumerate() {
        cache.read((i as u64) << 20, part).await.unwrap();
    }
    let mut want = vec![0u8; size as usize];
    mem.read(0, &mut want).await.unwrap();
    assert!(got == want, "cache content differs from the remote");
    let s = cache.stats();
    assert_eq!(s.demand_bytes, 4 * 65536, "only data chunks are read: {s}");
    cache.close().await.unwrap();
}

/// Many connections through the proxy at once, in both directions, with writes of random sizes
/// (from 1 byte to several pieces): every byte arrives, in order, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_delivers_every_byte_in_order() {
    use rand::{Rng, SeedableRng};
    // Upstream echoes everything back.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    for rtt in [Duration::ZERO, Duration::from_millis(3)] {
        let proxy = delay_proxy(&up, rtt).await;
        let paddr = proxy.local_addr();
        let mut tasks = tokio::task::JoinSet::new();
        for conn in 0..8u64 {
            tasks.spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(conn);
                let total = rng.random_range(1usize..6 << 20);
                let data = random_bytes(conn + 100, total);
                let s = tokio::net::TcpStream::connect(paddr).await.unwrap();
                let (mut r, mut w) = s.into_split();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(conn + 1000);
                    let mut pos = 0;
                    while pos < sent.len() {
                        let n = rng.random_range(1usize..3 << 20).min(sent.len() - pos);
                        w.write_all(&sent[pos..pos + n]).await.unwrap();
                        pos += n;
                        if rng.random_bool(0.3) {
                            tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000)))
                                .await;
                        }
                    }
                    w.shutdown().await.unwrap();
                });
                let mut got = Vec::with_capacity(total);
                r.read_to_end(&mut got).await.unwrap();
                writer.await.unwrap();
                assert_eq!(got.len(), data.len(), "connection {conn}: length");
                assert!(got == data[..], "connection {conn}: bytes differ");
            });
        }
        bounded("8 echo connections", Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await;
        let st = proxy.stats();
        assert_eq!(st.up_bytes, st.down_bytes, "{st:?}");
    }
}

/// When one side of a proxied connection dies, the other side sees the end: its sends fail
/// instead of blocking forever on a delay line that nobody drains (the dead side's writer used
/// to stop while its reader kept taking bytes until the budget ran out, then waited forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_a_dead_peer_ends_the_connection_for_the_other_side() {
    for dead in ["upstream", "client"] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap().to_string();
        let cfg = ProxyConfig {
            max_buffer: 1 << 20,
            ..ProxyConfig::default()
        };
        let proxy = Proxy::start("127.0.0.1:0", &up, cfg).await.unwrap();
        let client = tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (victim, mut sender) = if dead == "upstream" {
            (server, client)
        } else {
            (client, server)
        };
        drop(victim);
        let block = vec![7u8; 64 << 10];
        let what = format!("sending after the {dead} died");
        let (sent, e) = bounded(&what, Duration::from_secs(60), async {
            let mut sent = 0u64;
            loop {
                if let Err(e) = sender.write_all(&block).await {
                    return (sent, e);
                }
                sent += block.len() as u64;
            }
        })
        .await;
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{what}: {e} after {sent} bytes"
        );
        bounded(
            "the proxy lets go of the connection",
            Duration::from_secs(60),
            async {
                while proxy.connections() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await;
    }
}

/// Pipes (two descriptors each) held by a connection's delay line stay bounded by
/// `max_pieces`, even when a trickle of tiny messages meets a peer that does not read (each
/// message used to become its own piece, so the proxy opened pipes until it ran out of
/// descriptors); and once the peer reads, every byte arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pipes_per_connection_are_bounded() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    /// Pipes open in this process (two descriptors each).
    fn pipes() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.to_string_lossy().starts_with("pipe:"))
            .count()
            / 2
    }
    const MAX_PIECES: usize = 8;
    const FILL: usize = 16 << 20;
    const MSGS: usize = 1000;
    const MSG: usize = 100;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap().to_string();
    let base = pipes();
    let cfg = ProxyConfig {
        max_pieces: MAX_PIECES,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::start("127.0.0.1:0", &up, cfg).await.unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let (mut server, _) = l.accept().await.unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let p = progress.clone();
    // The upstream reads nothing yet: the fill backs the line up, then each small message,
    // sent alone, is a piece of its own.
    let sender = tokio::spawn(async move {
        client.write_all(&vec![1u8; FILL]).await.unwrap();
        for i in 0..MSGS {
            client.write_all(&[(i % 251) as u8; MSG]).await.unwrap();
            p.store(i + 1, Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client.shutdown().await.unwrap();
        client
    });
    // Watch until every message is out or the sender has been stuck for a while (the proxy
    // stopped reading: the bound at work).
    let mut most = 0;
    let mut last = (usize::MAX, Instant::now());
    loop {
        most = most.max(pipes().saturating_sub(base));
        let n = progress.load(Relaxed);
        if n == MSGS {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Per direction: MAX_PIECES queued, one filling, one sending.
    let bound = 2 * (MAX_PIECES + 2);
    assert!(
        most <= bound,
        "{most} pipes open for one connection (bound {bound}; {} messages sent)",
        progress.load(Relaxed)
    );
    let mut got = Vec::new();
    bounded("reading everything", Duration::from_secs(60), async {
        server.read_to_end(&mut got).await.unwrap();
    })
    .await;
    let _client = sender.await.unwrap();
    assert_eq!(got.len(), FILL + MSGS * MSG);
    assert!(got[..FILL].iter().all(|&b| b == 1));
    for (i, m) in got[FILL..].chunks(MSG).enumerate() {
        assert!(
            m.iter().all(|&b| b == (i % 251) as u8),
            "message {i} differs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Crash safety of writes to clean chunks (write intents), the cache directory's identity, and
// flushes across a reconnect (issue 10, items 1, 4 and 8).
// ---------------------------------------------------------------------------------------------

/// Settings under which nothing happens by itself: no pull, push or checkpoint unless asked.
fn quiet_cfg(chunk: u64) -> CacheConfig {
    CacheConfig {
        push_interval: Duration::from_secs(3600),
        checkpoint_interval: Duration::from_secs(3600),
        ..cfg(chunk, false)
    }
}

/// A write to a chunk the map already records as present and clean, then a crash before the
/// next checkpoint: on reopen the write is pushed, so the remote and the cache agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_clean_chunk_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let mem = filled_mem(size, 8).await;
    let data = random_bytes(88, 4096);
    {
        let cache = Cache::open(mem.clone(), dir.path(), quiet_cfg(65536))
            .await
            .unwrap();
        let all = cache.read_bytes(0, size as usize).await.unwrap();
        assert_eq!(all, mem.read_bytes(0, size as usize).await.unwrap());
        cache.checkpoint().await.unwrap(); // the map: every chunk present and clean
        cache.write(1_000_000, data.clone()).await.unwrap();
        assert_eq!(cache.stats().intent_syncs, 1);
        // Crash: dropped without close, flush or checkpoint.
    }
    assert_ne!(mem.read_bytes(1_000_000, 4096).await.unwrap(), data);
    let stats = Arc::new(Stats::new(mem.clone() as DynStore));
    let cache = Cache::open(stats.clone(), dir.path(), quiet_cfg(65536))
        .await
        .unwrap();
    assert_eq!(cache.read_bytes(1_000_000, 4096).await.unwrap(), data);
    bounded("flush", Duration::from_secs(30), cache.flush())
        .await
        .unwrap();
    assert!(
        mem.read_bytes(1_000_000, 4096).await.unwrap() == data,
        "the write to a clean chunk never reached the remote"
    );
    // Only the intent region's chunks are pushed again, and nothing is fetched.
    assert_eq!(stats.snapshot().get(OpKind::Read).ops, 0);
    cache.close().await.unwrap();
    // A clean close clears the intents: reopening pushes nothing.
    let stats = Arc::new(Stats::new(mem.clone() as DynStore));
    let cache = Cache::open(stats.clone(), dir.path(), quiet_cfg(65536))
        .await
        .unwrap();
    assert_eq!(cache.progress().dirty_chunks, 0);
    cache.close().await.unwrap();
    assert_eq!(stats.snapshot().get(OpKind::Write).ops, 0);
}

/// One durable intent write serves every later write to its region until the region is clean
/// and checkpointed again; a write to another region needs its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_intent_sync_per_region_until_it_is_clean_again() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mem = filled_mem(size, 9).await;
    let c = CacheConfig {
        intent_region: 1 << 20,
        ..quiet_cfg(65536)
    };
    let cache = Cache::open(mem.clone(), dir.path(), c).await.unwrap();
    for i in 0..16u64 {
        cache
            .write(i * 65536 + 7, random_bytes(i, 3000))
            .await
            .unwrap();
    }
    assert_eq!(cache.stats().intent_syncs, 1, "{}", cache.stats());
    cache.write(3 << 20, random_bytes(1, 10)).await.unwrap();
    assert_eq!(cache.stats().intent_syncs, 2);
    // Pushed, flushed and checkpointed: the intents are cleared, the next write sets one again.
    cache.flush().await.unwrap();
    cache.checkpoint().await.unwrap();
    cache.write(5, random_bytes(2, 10)).await.unwrap();
    assert_eq!(cache.stats().intent_syncs, 3);
    // Concurrent first writes to many regions share syncs.
    let cache = Arc::new(cache);
    let tasks: Vec<_> = (0..8u64)
        .map(|r| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.write(r << 20, random_bytes(r, 100)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(cache.stats().intent_syncs <= 3 + 7, "{}", cache.stats());
    cache.close().await.unwrap();
}

/// A cache directory records its remote: another remote (by identity, or by content when the
/// identity is not known) is refused with a clear error; `Reinit` starts it over, but not while
/// it holds writes not yet pushed, unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_refuses_another_remote() {
    use memsync_cache::Reinit;
    let dir = tempfile::tempdir().unwrap();
    let size = 2u64 << 20;
    let a = filled_mem(size, 10).await;
    let b = filled_mem(size, 11).await;
    let with = |id: &str, reinit: Reinit| CacheConfig {
        remote_id: Some(id.into()),
        reinit,
        ..quiet_cfg(65536)
    };
    let cache = Cache::open(a.clone(), dir.path(), with("nbd://a/", Reinit::No))
        .await
        .unwrap();
    cache.read_bytes(0, size as usize).await.unwrap();
    cache.close().await.unwrap();
    // Another identity.
    let e = Cache::open(b.clone(), dir.path(), with("nbd://b/", Reinit::No))
        .await
        .unwrap_err()
        .chain();
    assert!(
        e.contains("nbd://a/") && e.contains("--cache-reinit"),
        "{e}"
    );
    // The same identity (or none), but other bytes: the clean sample differs.
    for id in [Some("nbd://a/"), None] {
        let c = CacheConfig {
            remote_id: id.map(Into::into),
            ..quiet_cfg(65536)
        };
        let e = Cache::open(b.clone(), dir.path(), c)
            .await
            .unwrap_err()
            .chain();
        assert!(e.contains("differ from the cache's clean copy"), "{e}");
    }
    // The right remote still opens.
    let cache = Cache::open(a.clone(), dir.path(), with("nbd://a/", Reinit::No))
        .await
        .unwrap();
    // With a write not pushed, a reinit for b is refused unless forced.
    let fault = Inject::new(a.clone() as DynStore);
    fault.control().fail_always(OpSet::WRITE);
    drop(cache);
    let cache = Cache::open(Arc::new(fault), dir.path(), with("nbd://a/", Reinit::No))
        .await
        .unwrap();
    cache.write(0, random_bytes(3, 100)).await.unwrap();
    cache.checkpoint().await.unwrap();
    drop(cache);
    let e = Cache::open(b.clone(), dir.path(), with("nbd://b/", Reinit::IfClean))
        .await
        .unwrap_err()
        .chain();
    assert!(e.contains("not yet pushed") && e.contains("force"), "{e}");
    let cache = Cache::open(b.clone(), dir.path(), with("nbd://b/", Reinit::Force))
        .await
        .unwrap();
    assert_eq!(cache.progress().present_chunks, 0);
    assert_eq!(
        cache.read_bytes(0, size as usize).await.unwrap(),
        b.read_bytes(0, size as usize).await.unwrap()
    );
    cache.close().await.unwrap();
}

/// A store whose writes are volatile until a flush, as an NBD server's may be: `lose_unflushed`
/// drops every write not flushed yet (the server's connection, or the server, went away).
/// Not multi-conn: a flush covers only what it has seen.
#[derive(Debug)]
struct Volatile {
    base: Arc<MemStore>,
    pending: parking_lot::Mutex<Vec<(u64, Bytes)>>,
    refuse_writes: std::sync::atomic::AtomicBool,
}

impl Volatile {
    fn new(base: Arc<MemStore>) -> Arc<Self> {
        Arc::new(Volatile {
            base,
            pending: parking_lot::Mutex::new(Vec::new()),
            refuse_writes: Default::default(),
        })
    }
    fn lose_unflushed(&self) {
        self.pending.lock().clear();
    }
}

#[memsync_core::async_trait]
impl Store for Volatile {
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn caps(&self) -> memsync_core::Caps {
        let mut caps = memsync_core::Caps::basic();
        caps.multi_conn = false;
        caps.flush = true;
        caps
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
        self.base.read(offset, buf).await?;
        for (o, d) in self.pending.lock().iter() {
            let (s, e) = (
                offset.max(*o),
                (offset + buf.len() as u64).min(o + d.len() as u64),
            );
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(())
    }
    async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
        if self.refuse_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(memsync_core::StoreError::backend("writes refused"));
        }
        self.pending.lock().push((offset, data));
        Ok(())
    }
    async fn flush(&self) -> memsync_core::Result<()> {
        let p = std::mem::take(&mut *self.pending.lock());
        for (o, d) in p {
            self.base.write(o, d).await?;
        }
        Ok(())
    }
}

/// Between the cache's push and its flush the connection is lost and the server forgets what
/// was not flushed (no multi-conn): the flush on the new connection must not count for the
/// old one's writes, so they are pushed again and reach the remote.
/// Returns the remote's durable store, the data written, whether the flush succeeded and how
/// many chunks were pushed again.
async fn cut_between_push_and_flush(refuse_after_cut: bool) -> (Arc<MemStore>, Bytes, bool, u64) {
    let size = 4u64 << 20;
    let base = filled_mem(size, 12).await;
    let vol = Volatile::new(base.clone());
    let (server, addr) = nbd_server(vol.clone() as DynStore).await;
    let proxy = delay_proxy(&addr, Duration::ZERO).await;
    let remote = nbd_remote(&proxy.local_addr().to_string(), 1).await;
    assert!(!remote.caps().multi_conn);
    // The cache's remote: before each flush (once armed), the connection is cut and the
    // server loses its unflushed writes.
    struct CutBeforeFlush {
        inner: Arc<Reconnect>,
        armed: std::sync::atomic::AtomicBool,
        cut: Box<dyn Fn() + Send + Sync>,
    }
    impl std::fmt::Debug for CutBeforeFlush {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "CutBeforeFlush({:?})", self.inner)
        }
    }
    #[memsync_core::async_trait]
    impl Store for CutBeforeFlush {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn caps(&self) -> memsync_core::Caps {
            self.inner.caps()
        }
        fn session(&self) -> u64 {
            self.inner.session()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
            self.inner.read(offset, buf).await
        }
        async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
            self.inner.write(offset, data).await
        }
        async fn flush(&self) -> memsync_core::Result<()> {
            if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                (self.cut)();
                self.inner.disconnect();
            }
            self.inner.flush().await
        }
    }
    let p2 = Arc::new(proxy);
    let (vol2, p3) = (vol.clone(), p2.clone());
    let wrapped = Arc::new(CutBeforeFlush {
        inner: remote.clone(),
        armed: std::sync::atomic::AtomicBool::new(false),
        cut: Box::new(move || {
            p3.cut_all();
            vol2.lose_unflushed();
            if refuse_after_cut {
                vol2.refuse_writes
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut c = quiet_cfg(65536);
    c.flush_timeout = Duration::from_secs(3);
    let cache = Cache::open(wrapped.clone(), dir.path(), c).await.unwrap();
    let data = random_bytes(99, 100_000);
    cache.write(300_000, data.clone()).await.unwrap();
    wrapped
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = bounded("flush", Duration::from_secs(60), cache.flush()).await;
    assert!(remote.reconnects() >= 1);
    if r.is_err() {
        assert!(
            cache.progress().dirty_chunks >= 2,
            "failed, but marked clean"
        );
    }
    let repushes = cache.stats().repushes;
    drop(cache);
    server.shutdown().await.unwrap();
    (base, data, r.is_ok(), repushes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acked_on_a_lost_connection_are_pushed_again() {
    let (base, data, ok, repushes) = cut_between_push_and_flush(false).await;
    assert!(ok, "the flush failed");
    assert!(
        base.read_bytes(300_000, data.len()).await.unwrap() == data,
        "the flush returned, but writes acknowledged on the lost connection are not in the remote"
    );
    assert!(repushes >= 2, "{repushes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_a_new_connection_does_not_cover_the_old_ones_writes() {
    // The new connection refuses writes: the lost ones cannot be pushed again, so the flush
    // must fail rather than report them durable.
    let (base, data, ok, _) = cut_between_push_and_flush(true).await;
    assert!(base.read_bytes(300_000, data.len()).await.unwrap() != data);
    assert!(
        !ok,
        "the flush reported success for writes the remote lost with the old connection"
    );
}

/// The cost of write intents, measured (not asserted): random 4 KiB writes, each the first to
/// its clean chunk, with the intent per 16 MiB region (the design), per chunk (a durable dirty
/// mark before each first write) and already set (what a write cost before intents existed).
/// `cargo nextest run -p memsync-cache -E 'test(first_write_cost)' --run-ignored only --no-capture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it by hand"]
async fn first_write_cost() {
    use rand::{Rng, SeedableRng};
    let size = 256u64 << 20;
    let mem = Arc::new(MemStore::new(size));
    let cs = 65536u64;
    let n = 1000usize;
    for (name, region, writers) in [
        ("intent per 16 MiB region, 1 writer", 16u64 << 20, 1usize),
        ("intent per chunk, 1 writer", cs, 1),
        ("intent per 16 MiB region, 8 writers", 16 << 20, 8),
        ("intent per chunk, 8 writers", cs, 8),
    ] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = CacheConfig {
            intent_region: region,
            pull: true,
            ..quiet_cfg(cs)
        };
        let cache = Arc::new(Cache::open(mem.clone(), dir.path(), c).await.unwrap());
        assert!(cache.wait_pulled(Duration::from_secs(120)).await);
        cache.checkpoint().await.unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut chunks: Vec<u64> = (0..size / cs).collect();
        for i in 0..chunks.len() {
            let j = rng.random_range(i..chunks.len());
            chunks.swap(i, j);
        }
        chunks.truncate(n);
        let data = random_bytes(5, 4096);
        let run = |chunks: Vec<u64>| {
            let cache = cache.clone();
            let data = data.clone();
            async move {
                let per = chunks.len().div_ceil(writers);
                let t = Instant::now();
                let tasks: Vec<_> = chunks
                    .chunks(per)
                    .map(|part| {
                        let (cache, data, part) = (cache.clone(), data.clone(), part.to_vec());
                        tokio::spawn(async move {
                            for c in part {
                                cache.write(c * cs + 4096, data.clone()).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                t.elapsed() / chunks.len() as u32
            }
        };
        let first = run(chunks.clone()).await;
        let syncs = cache.stats().intent_syncs;
        let again = run(chunks).await;
        eprintln!(
            "{name}: first write to a clean chunk {first:?} per write ({syncs} intent syncs for {n} writes); \
             a write with the intent already set {again:?}"
        );
        cache.close().await.unwrap();
    }
}
