//! memsync-redis against real redis-server processes (single node, a 3-master cluster, TLS),
//! started on loopback by the test (see memsync_testkit::servers).

use std::time::{Duration, Instant};

use memsync_core::{Bytes, Registry, Store, StoreExt, StoreUrl};
use memsync_testkit::contract::{self, ContractOpts};
use memsync_testkit::servers::{RedisCluster, RedisServer, redis_cli};

fn registry() -> Registry {
    let mut r = Registry::new();
    memsync_redis::register(&mut r);
    r
}

async fn open(url: &str) -> memsync_redis::RedisStore {
    memsync_redis::open(&StoreUrl::parse(url).unwrap())
        .await
        .unwrap_or_else(|e| panic!("open {url}: {}", e.chain()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_contract() {
    let Some(srv) = RedisServer::start() else {
        return;
    };
    // A size that is not a multiple of the chunk size: the last chunk is short.
    let url = format!(
        "redis://127.0.0.1:{}/2?size=24M&chunk=16K&prefix=ct&conns=3",
        srv.port()
    );
    let store = registry().open(&url).await.unwrap();
    contract::run(store, ContractOpts::default()).await;
    // Keys went to database 2.
    let n = srv.cli(&["-n", "2", "dbsize"]).unwrap();
    assert!(n.trim().parse::<u64>().unwrap() > 0, "{n}");
}

async fn open_err(url: &str) -> String {
    match memsync_redis::open(&StoreUrl::parse(url).unwrap()).await {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e.chain(),
    }
}

/// The key `PREFIX:meta` records size, chunk size and identity at creation and is checked on
/// every open: the same keys read with another chunk size used to come back scrambled, silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_recorded_and_checked() {
    let Some(srv) = RedisServer::start() else {
        return;
    };
    let base = format!("redis://127.0.0.1:{}?prefix=m", srv.port());
    let data = memsync_testkit::random_bytes(5, 1 << 20);
    let s = open(&format!("{base}&size=1M&chunk=64K")).await;
    s.write(0, data.clone()).await.unwrap();
    let id = s.id().expect("an identity");
    drop(s);
    let rec = srv.cli(&["get", "m:meta"]).unwrap();
    assert!(
        rec.contains("chunk=65536") && rec.contains(&format!("id={id}")),
        "{rec}"
    );
    // Reopened without size or chunk: the record decides.
    let s = open(&base).await;
    assert_eq!(
        (s.size(), s.chunk_size(), s.id()),
        (1 << 20, 64 << 10, Some(id))
    );
    assert!(s.read_bytes(0, 1 << 20).await.unwrap() == data);
    assert_eq!(s.identity(), Some(id));
    drop(s);
    for (q, want) in [
        ("&chunk=256K", "not chunk=262144"),
        ("&chunk=16K&size=1M", "not chunk=16384"),
        ("&size=2M", "not size=2097152"),
    ] {
        let e = open_err(&format!("{base}{q}")).await;
        assert!(e.contains(want) && e.contains("m:meta"), "{q}: {e}");
    }
    // Chunks without a record (written before memsync kept one): refused, unless adopted.
    srv.cli(&["del", "m:meta"]).unwrap();
    let e = open_err(&format!("{base}&size=1M&chunk=64K")).await;
    assert!(e.contains("init=adopt"), "{e}");
    let s = open(&format!("{base}&size=1M&chunk=64K&init=adopt")).await;
    assert!(s.id().is_some() && s.id() != Some(id));
    assert!(s.read_bytes(0, 1 << 20).await.unwrap() == data);
    drop(s);
    // init=force rewrites it; what the URL leaves out is kept.
    let s = open(&format!("{base}&chunk=16K&init=force")).await;
    assert_eq!((s.size(), s.chunk_size()), (1 << 20, 16 << 10));
    drop(s);
    assert_eq!(open(&base).await.chunk_size(), 16 << 10);
    // A damaged record is an error, never a guess.
    srv.cli(&["set", "m:meta", "garbage"]).unwrap();
    let e = open_err(&base).await;
    assert!(e.contains("bad store metadata"), "{e}");
    srv.cli(&["set", "m:meta", &"#".repeat(5000)]).unwrap();
    let e = open_err(&base).await;
    assert!(e.contains("longer than"), "{e}");
    // A new prefix with no size cannot be created.
    let e = open_err(&format!("redis://127.0.0.1:{}?prefix=new", srv.port())).await;
    assert!(e.contains("give size="), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_read_zero_and_trim_deletes() {
    let Some(srv) = RedisServer::start() else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}?size=1M&chunk=4K&prefix=z", srv.port());
    let s = open(&url).await;
    assert_eq!(s.read_bytes(0, 10000).await.unwrap(), vec![0u8; 10000]);
    let data = memsync_testkit::random_bytes(1, 3 * 4096);
    s.write(4096, data.clone()).await.unwrap();
    assert_eq!(s.key(1), "z:1");
    assert_eq!(
        srv.cli(&["exists", "z:1", "z:2", "z:3"]).unwrap().trim(),
        "3"
    );
    assert_eq!(srv.cli(&["strlen", "z:2"]).unwrap().trim(), "4096");
    // A partial write to a missing chunk uses SETRANGE: the rest of the chunk reads as zeros.
    s.write(100 * 4096 + 10, Bytes::from_static(b"abc"))
        .await
        .unwrap();
    let back = s.read_bytes(100 * 4096, 4096).await.unwrap();
    assert_eq!(&back[10..13], b"abc");
    assert!(back[..10].iter().chain(&back[13..]).all(|&b| b == 0));
    // Trim of whole chunks deletes the keys; a partial chunk is zeroed.
    s.trim(4096, 2 * 4096 + 100).await.unwrap();
    assert_eq!(srv.cli(&["exists", "z:1", "z:2"]).unwrap().trim(), "0");
    assert_eq!(srv.cli(&["exists", "z:3"]).unwrap().trim(), "1");
    let back = s.read_bytes(4096, 3 * 4096).await.unwrap();
    assert!(back[..2 * 4096 + 100].iter().all(|&b| b == 0));
    assert_eq!(&back[2 * 4096 + 100..], &data[2 * 4096 + 100..]);
    // Extents: holes where keys are missing.
    let ext = s.extents(0, 5 * 4096).await.unwrap();
    assert!(ext.iter().any(|e| e.kind.reads_zero()), "{ext:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_is_retried_then_reported() {
    let Some(mut srv) = RedisServer::start() else {
        return;
    };
    let url = format!(
        "redis://127.0.0.1:{}?size=1M&chunk=4K&timeout=2s",
        srv.port()
    );
    let s = open(&url).await;
    s.write(0, Bytes::from_static(b"before")).await.unwrap();

    // Down for longer than the deadline: a clear error, within the deadline plus slack.
    srv.proc.kill();
    let t = Instant::now();
    let err = s.read_bytes(0, 6).await.unwrap_err();
    let took = t.elapsed();
    let msg = err.chain();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "gave up too early: {took:?}"
    );
    assert!(
        msg.contains("unavailable") && msg.contains("gave up") && msg.contains("connect"),
        "{msg}"
    );

    // Back up: works again (the server kept nothing: no persistence).
    srv.proc.restart();
    s.write(0, Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(&s.read_bytes(0, 5).await.unwrap()[..], b"after");

    // Down for less than the deadline: the operation rides it out.
    srv.proc.kill();
    let port = srv.port();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        srv.proc.restart();
        srv
    });
    s.write(0, Bytes::from_static(b"retried")).await.unwrap();
    let srv = restarter.join().unwrap();
    assert_eq!(&s.read_bytes(0, 7).await.unwrap()[..], b"retried");
    assert_eq!(srv.port(), port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_name_the_part() {
    let r = registry();
    for (url, part) in [
        ("redis://127.0.0.1:1?size=4Q", "size"),
        ("redis://127.0.0.1:notaport?size=1M", "port"),
        ("redis://127.0.0.1:6379?size=1M&bogus=1", "bogus"),
        ("rediss://127.0.0.1:6379?size=1M&ca=/nonexistent.pem", "ca"),
    ] {
        let e = match r.open(url).await {
            Ok(_) => panic!("{url} opened"),
            Err(e) => e.chain(),
        };
        assert!(e.contains(part), "{url}: {e}");
    }
    // Nothing listens: a clear error after the timeout.
    let t = Instant::now();
    let e = match r.open("redis://127.0.0.1:1?size=1M&timeout=300ms").await {
        Ok(_) => panic!("opened"),
        Err(e) => e.chain(),
    };
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.contains("127.0.0.1:1") && e.contains("connect"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_contract_and_redirects() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let url = format!(
        "redis+cluster://{}?size=16M&chunk=8K&prefix=cl",
        cluster.hosts()
    );
    let store = registry().open(&url).await.unwrap();
    contract::run(store, ContractOpts::default()).await;

    // Keys spread over all three masters.
    for n in &cluster.nodes {
        let k = redis_cli(n.port(), &["dbsize"]).unwrap();
        assert!(
            k.trim().parse::<u64>().unwrap() > 0,
            "node {} empty",
            n.port()
        );
    }

    // A stale slot map (every slot pointing at one node) is corrected through MOVED.
    let s = open(&format!(
        "redis://127.0.0.1:{}?cluster=true&size=4M&chunk=4K&prefix=mv",
        cluster.nodes[0].port()
    ))
    .await;
    let data = memsync_testkit::random_bytes(7, 1 << 20);
    s.write(0, data.clone()).await.unwrap();
    s.client().scramble_slots();
    assert_eq!(s.read_bytes(0, 1 << 20).await.unwrap(), data);
    s.client().scramble_slots();
    s.trim(0, 1 << 20).await.unwrap();
    assert!(
        s.read_bytes(0, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls() {
    use rcgen::{CertificateParams, IsCa, KeyPair};
    let Some(_) = memsync_testkit::servers::require_tool("redis-server", "the TLS test") else {
        return;
    };
    let dir = memsync_testkit::servers::TempDir::new("redis-tls");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("cert.pem"), cert.pem()).unwrap();
    std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
    let tls_port = memsync_testkit::servers::free_port(false);
    let tls_port_s = tls_port.to_string();
    let (cert_p, key_p, ca_p) = (p("cert.pem"), p("key.pem"), p("ca.pem"));
    let Some(srv) = RedisServer::start_with(&[
        "--tls-port",
        &tls_port_s,
        "--tls-cert-file",
        &cert_p,
        "--tls-key-file",
        &key_p,
        "--tls-ca-cert-file",
        &ca_p,
        "--tls-auth-clients",
        "no",
    ]) else {
        return;
    };
    memsync_testkit::servers::wait_port(tls_port, Duration::from_secs(10)).unwrap();
    let url =
        format!("rediss://127.0.0.1:{tls_port}?size=4M&chunk=64K&ca={ca_p}&tls_name=localhost");
    let s = registry().open(&url).await.unwrap();
    let data = memsync_testkit::random_bytes(3, 300_000);
    s.write(12345, data.clone()).await.unwrap();
    assert_eq!(s.read_bytes(12345, data.len()).await.unwrap(), data);
    // The data went to the same server (plain port).
    assert_eq!(srv.cli(&["exists", "memsync:1"]).unwrap().trim(), "1");
    // A wrong name fails the handshake, with a clear error.
    let bad = format!("rediss://127.0.0.1:{tls_port}?size=4M&ca={ca_p}&tls_name=other&timeout=1s");
    let e = match registry().open(&bad).await {
        Ok(_) => panic!("opened with a wrong TLS name"),
        Err(e) => e.chain(),
    };
    assert!(e.contains("TLS"), "{e}");
}
