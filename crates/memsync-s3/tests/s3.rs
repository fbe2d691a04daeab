//! memsync-s3 against a real S3-compatible server (s3s-fs 0.14.1, installed by
//! scripts/setup.sh), started on loopback by the test (see memsync_testkit::servers).

use std::time::{Duration, Instant};

use memsync_core::{Bytes, Registry, Store, StoreExt, StoreUrl};
use memsync_s3::S3Config;
use memsync_testkit::contract::{self, ContractOpts};
use memsync_testkit::servers::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};

fn registry() -> Registry {
    let mut r = Registry::new();
    memsync_s3::register(&mut r);
    r
}

fn url(srv: &S3Server, rest: &str) -> String {
    let sep = if rest.contains('?') { '&' } else { '?' };
    format!(
        "s3://{rest}{sep}endpoint={}&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}",
        srv.endpoint()
    )
}

fn client(u: &str) -> memsync_s3::S3Client {
    S3Config::from_url(&StoreUrl::parse(u).unwrap())
        .unwrap()
        .client()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_contract() {
    let Some(srv) = S3Server::start() else { return };
    let store = registry()
        .open(&url(&srv, "contract/vm?size=8M&chunk=64K&create&conns=16"))
        .await
        .unwrap();
    assert_eq!(store.caps().block_size, 1);
    contract::run(store, ContractOpts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_objects_read_zero_and_trim_deletes() {
    let Some(srv) = S3Server::start() else { return };
    let u = url(&srv, "zeros/p?size=4M&chunk=1M&create");
    let s = registry().open(&u).await.unwrap();
    assert!(
        s.read_bytes(0, 3 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    let data = memsync_testkit::random_bytes(5, 2 << 20);
    s.write(1 << 20, data.clone()).await.unwrap();
    let c = client(&u);
    assert_eq!(c.head("p/1").await.unwrap(), Some(1 << 20));
    assert_eq!(c.head("p/2").await.unwrap(), Some(1 << 20));
    assert_eq!(c.head("p/0").await.unwrap(), None);
    assert!(srv.bucket_dir("zeros").join("p/1").exists());
    assert_eq!(s.read_bytes(1 << 20, 2 << 20).await.unwrap(), data);
    // Trim of a whole chunk deletes its object; the partial rest is zeroed by read-modify-write.
    s.trim(1 << 20, (1 << 20) + 100).await.unwrap();
    assert_eq!(c.head("p/1").await.unwrap(), None);
    assert_eq!(c.head("p/2").await.unwrap(), Some(1 << 20));
    let back = s.read_bytes(1 << 20, 2 << 20).await.unwrap();
    assert!(back[..(1 << 20) + 100].iter().all(|&b| b == 0));
    assert_eq!(&back[(1 << 20) + 100..], &data[(1 << 20) + 100..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_object_read_only() {
    let Some(srv) = S3Server::start() else { return };
    let u = url(&srv, "images/x?size=1M&create");
    drop(registry().open(&u).await.unwrap()); // creates the bucket
    let c = client(&u);
    let len = (5 << 20) + 12345;
    let data = memsync_testkit::random_bytes(9, len);
    c.put("disk.img", data.clone()).await.unwrap();
    let s = registry()
        .open(&url(&srv, "images?object=disk.img&chunk=1M"))
        .await
        .unwrap();
    assert_eq!(s.size(), len as u64);
    assert!(s.caps().read_only);
    assert_eq!(s.read_bytes(0, len).await.unwrap(), data);
    assert_eq!(
        &s.read_bytes(999_999, 77).await.unwrap()[..],
        &data[999_999..999_999 + 77]
    );
    let opts = ContractOpts::default().expect_zero_initialised(false);
    contract::run(s, opts).await;
    // A missing object is a clear error naming it.
    let e = match registry().open(&url(&srv, "images?object=nope.img")).await {
        Ok(_) => panic!("opened a missing object"),
        Err(e) => e.chain(),
    };
    assert!(e.contains("nope.img") && e.contains("object"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_is_retried_then_reported() {
    let Some(mut srv) = S3Server::start() else {
        return;
    };
    let s = registry()
        .open(&url(&srv, "loss?size=4M&chunk=64K&create&timeout=2s"))
        .await
        .unwrap();
    s.write(0, Bytes::from_static(b"before")).await.unwrap();
    srv.proc.kill();
    let t = Instant::now();
    let e = s.read_bytes(0, 6).await.unwrap_err().chain();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(e.contains("gave up") && e.contains("connect"), "{e}");
    // Back (s3s-fs keeps objects on disk): the data is still there.
    srv.proc.restart();
    assert_eq!(&s.read_bytes(0, 6).await.unwrap()[..], b"before");
    // Down for less than the deadline: the operation rides it out.
    srv.proc.kill();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        srv.proc.restart();
        srv
    });
    s.write(0, Bytes::from_static(b"retried")).await.unwrap();
    let _srv = restarter.join().unwrap();
    assert_eq!(&s.read_bytes(0, 7).await.unwrap()[..], b"retried");
}

/// The object `PREFIX/.memsync-meta` records size, chunk size and identity at creation and is
/// checked on every open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_recorded_and_checked() {
    let Some(srv) = S3Server::start() else { return };
    let r = registry();
    let open_err = |u: String| {
        let r = r.clone();
        async move {
            match r.open(&u).await {
                Ok(_) => panic!("{u} opened"),
                Err(e) => e.chain(),
            }
        }
    };
    let data = memsync_testkit::random_bytes(6, 1 << 20);
    let s = r
        .open(&url(&srv, "meta/vm?size=1M&chunk=64K&create"))
        .await
        .unwrap();
    s.write(0, data.clone()).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
    let rec_path = srv.bucket_dir("meta").join("vm/.memsync-meta");
    let rec = memsync_core::StoreMeta::parse(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!((rec.size, rec.chunk_size), (1 << 20, 64 << 10));
    assert!(rec.id.is_some());
    // Reopened without size: the record decides; the identity shows through the layers.
    let s = r.open(&url(&srv, "meta/vm")).await.unwrap();
    assert_eq!(s.size(), 1 << 20);
    assert_eq!(s.identity(), rec.id);
    assert!(s.read_bytes(0, 1 << 20).await.unwrap() == data);
    drop(s);
    for (q, want) in [
        ("meta/vm?chunk=256K", "not chunk=262144"),
        ("meta/vm?chunk=16K", "not chunk=16384"),
        ("meta/vm?size=2M", "not size=2097152"),
    ] {
        let e = open_err(url(&srv, q)).await;
        assert!(e.contains(want) && e.contains(".memsync-meta"), "{q}: {e}");
    }
    // Chunk objects without a record: refused, unless adopted.
    let c = client(&url(&srv, "meta/vm?size=1M"));
    c.delete("vm/.memsync-meta").await.unwrap();
    let e = open_err(url(&srv, "meta/vm?size=1M&chunk=64K")).await;
    assert!(e.contains("init=adopt"), "{e}");
    let s = r
        .open(&url(&srv, "meta/vm?size=1M&chunk=64K&init=adopt"))
        .await
        .unwrap();
    assert!(s.read_bytes(0, 1 << 20).await.unwrap() == data);
    drop(s);
    let adopted = memsync_core::StoreMeta::parse(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert!(adopted.id.is_some() && adopted.id != rec.id);
    // init=force rewrites it, keeping what the URL leaves out.
    r.open(&url(&srv, "meta/vm?chunk=16K&init=force"))
        .await
        .unwrap();
    let forced = memsync_core::StoreMeta::parse(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!((forced.size, forced.chunk_size), (1 << 20, 16 << 10));
    // A damaged or oversized record is an error, never a guess.
    c.put("vm/.memsync-meta", Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    let e = open_err(url(&srv, "meta/vm")).await;
    assert!(e.contains("bad store metadata"), "{e}");
    c.put("vm/.memsync-meta", Bytes::from(vec![b'#'; 5000]))
        .await
        .unwrap();
    let e = open_err(url(&srv, "meta/vm")).await;
    assert!(e.contains("longer than"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_credentials() {
    let Some(srv) = S3Server::start() else { return };
    let r = registry();
    for (u, part) in [
        ("s3://Bad_Bucket?size=1M".to_owned(), "bucket"),
        (url(&srv, "nosize?create"), "give size="),
        (
            "s3://ok-bucket?size=1M&endpoint=127.0.0.1:1".to_owned(),
            "endpoint",
        ),
        ("s3://ok-bucket?size=1M&chunk=2G".to_owned(), "chunk"),
    ] {
        let e = match r.open(&u).await {
            Ok(_) => panic!("{u} opened"),
            Err(e) => e.chain(),
        };
        assert!(e.contains(part), "{u}: {e}");
    }
    // A wrong secret: the server's reason is in the error.
    let bad = format!(
        "s3://creds?size=1M&create&endpoint={}&access_key={S3_ACCESS_KEY}&secret_key=wrong",
        srv.endpoint()
    );
    let e = match r.open(&bad).await {
        Ok(_) => panic!("opened with a wrong secret"),
        Err(e) => e.chain(),
    };
    assert!(e.contains("403") || e.contains("Signature"), "{e}");
}
