//! Suite `stores`: sequential read from the remote stores (Redis, S3) and `dir:` at RTT 0, on
//! real servers started by the suite (see memsync_testkit::servers), per chunk size, each beside
//! a same-run peer reading the same bytes, measured in alternation ([`Bench::compare`]); the
//! predecessor's figures are printed as `r3map (published)` and never divided by.
//!
//! Two ways of reading:
//! - `direct`: straight from the store (through `Chunked` where the store needs it) with many
//!   requests in flight, per store chunk size, with its ratio to the peer at that chunk size:
//!   `dir:` against `pread` of one plain file, Redis against `redis-benchmark` (GETs of values
//!   of the chunk size, as many as the store has chunks), S3 against boto3 (a thread pool of
//!   `get_object` calls on the very objects the store wrote; the AWS SDK for Python, installed by
//!   scripts/setup.sh) and against memsync's own HTTP client without the store layers.
//! - `cache`: through the cache layer (memsync-cache, what a managed mount reads through): a
//!   fresh cache over the store (at the store chunk size whose direct read was fastest),
//!   background pull on, read by one sequential reader in 1 MiB reads, timed from opening the
//!   cache to the last byte (what an application reading a freshly mounted file sees), in
//!   alternation with the direct read and the peer at that chunk size.
//!
//! Every timed read's bytes are checked (memsync's, outside the timed part; boto3's by a SHA-256
//! of a first, untimed pass). First-access latency is one 4 KiB read right after opening the
//! store (its connections not yet warm).

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use memsync_cache::{Cache, CacheConfig};
use memsync_core::{DynStore, Registry};
use memsync_testkit::servers::{self, RedisServer, S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};

use crate::{Bench, Compared, Proc, Subject, gbps};

/// Reads of this size are in flight at once during the sequential read.
const IO: usize = 4 << 20;
const INFLIGHT: usize = 16;

fn fill_pattern(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    Bytes::from(v)
}

async fn fill(store: &DynStore, total: u64) -> Result<()> {
    let pat = fill_pattern(IO);
    let offs: Vec<u64> = (0..total).step_by(IO).collect();
    let mut s = futures_util::stream::iter(offs)
        .map(|o| {
            let d = pat.slice(..(total - o).min(IO as u64) as usize);
            let st = store.clone();
            async move { st.write(o, d).await }
        })
        .buffer_unordered(INFLIGHT);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(())
}

async fn seq_read(store: &DynStore, buf: &mut [u8]) -> Result<Duration> {
    let t = Instant::now();
    let parts: Vec<(u64, &mut [u8])> = buf
        .chunks_mut(IO)
        .enumerate()
        .map(|(i, c)| ((i * IO) as u64, c))
        .collect();
    let mut s = futures_util::stream::iter(parts)
        .map(|(o, c)| {
            let st = store.clone();
            async move { st.read(o, c).await }
        })
        .buffer_unordered(INFLIGHT);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(t.elapsed())
}

/// Whether `buf` holds what [`fill`] wrote.
fn check_pattern(buf: &[u8]) -> Result<()> {
    let pat = fill_pattern(IO);
    for (i, c) in buf.chunks(IO).enumerate() {
        if c != &pat[..c.len()] {
            bail!("wrong data in the 4 MiB block at {}", i * IO);
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{}M", n >> 20)
    } else {
        format!("{}K", n >> 10)
    }
}

/// Builds a store's peers for one chunk size, once the store holds its data.
type MakePeers<'p> = dyn Fn(u64) -> Result<Vec<Subject<'p>>> + 'p;

struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    registry: &'a Registry,
    total: u64,
    /// The buffer every sequential read of the suite reads into (one at a time).
    buf: &'a RefCell<Vec<u8>>,
}

impl<'a> Ctx<'a> {
    fn open(&self, url: &str) -> Result<DynStore> {
        self.rt
            .block_on(self.registry.open(url))
            .map_err(|e| anyhow::anyhow!("{}", e.chain()))
            .with_context(|| format!("opening {url}"))
    }

    /// A subject reading `store` sequentially into the shared buffer; each run checks the
    /// bytes afterwards (untimed).
    fn direct_subject(&self, name: String, store: DynStore) -> Subject<'a> {
        let (rt, buf, total) = (self.rt, self.buf, self.total);
        Subject::new(name, move || {
            let mut buf = buf.borrow_mut();
            buf.fill(0);
            let el = rt.block_on(seq_read(&store, &mut buf))?;
            check_pattern(&buf)?;
            Ok(gbps(total, el))
        })
    }

    /// For each chunk size: fill the store, read it sequentially in alternation with its peers
    /// (case `seq_read_direct_NAME_chunkC`, a ratio to each peer), then its first-access and
    /// warm 4 KiB latency. Returns the chunk size whose direct read was fastest.
    fn sweep(
        &self,
        bench: &mut Bench,
        name: &str,
        chunks: &[u64],
        url_of: &dyn Fn(u64) -> String,
        between: &dyn Fn(),
        peers: &MakePeers<'_>,
    ) -> Result<u64> {
        let mut best = (0.0f64, 0u64);
        for &chunk in chunks {
            between();
            let url = url_of(chunk);
            let store = self.open(&url)?;
            self.rt.block_on(fill(&store, self.total))?;
            let subject = format!("memsync-{name}");
            let mut subjects = vec![self.direct_subject(subject.clone(), store.clone())];
            subjects.extend(peers(chunk)?);
            let case = format!("seq_read_direct_{name}_chunk{}", human(chunk));
            let c = bench.compare(&case, &[("throughput", "GB/s")], subjects)?;
            ratios(bench, &c, &subject, &[])?;
            let v = c.median(&subject, "throughput")?;
            if v > best.0 {
                best = (v, chunk);
            }
            // First access: a fresh store, one 4 KiB read.
            let mut lat = Vec::new();
            for i in 0..bench.config.runs() {
                let fresh = self.open(&url)?;
                let mut small = vec![0u8; 4096];
                let off = (i as u64 * 7919 * 4096) % (self.total - 4096);
                let t = Instant::now();
                self.rt.block_on(fresh.read(off, &mut small))?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            bench.record(
                &format!("first_read_4k_{name}_chunk{}", human(chunk)),
                &subject,
                "latency",
                "us",
                &lat,
            );
            // Warm 4 KiB reads, one at a time.
            let mut warm = Vec::new();
            let mut small = vec![0u8; 4096];
            for i in 0..if bench.config.quick { 50u64 } else { 200 } {
                let off = (i * 7919 * 4096) % (self.total - 4096);
                let t = Instant::now();
                self.rt.block_on(store.read(off, &mut small))?;
                warm.push(t.elapsed().as_secs_f64() * 1e6);
            }
            bench.record(
                &format!("read_4k_qd1_{name}_chunk{}", human(chunk)),
                &subject,
                "latency",
                "us",
                &warm,
            );
        }
        Ok(best.1)
    }

    /// Case `seq_read_cache_NAME`: refill the store at `chunk`, then in alternation: for each
    /// cache chunk size a fresh cache over it read sequentially to the end, the direct read,
    /// and the peers at that chunk size. Ratios of each cache size to the direct read and to
    /// each peer.
    #[allow(clippy::too_many_arguments)]
    fn cache_case(
        &self,
        bench: &mut Bench,
        name: &str,
        url: &str,
        chunk: u64,
        cache_chunks: &[u64],
        between: &dyn Fn(),
        peers: &MakePeers<'_>,
    ) -> Result<()> {
        between();
        let store = self.open(url)?;
        self.rt.block_on(fill(&store, self.total))?;
        let scratch = super::store::tempfile_dir(&bench.config.scratch)?;
        let mut subjects = Vec::new();
        let mut names = Vec::new();
        for &cc in cache_chunks {
            let subject = format!("memsync-{name}-cache{}", human(cc));
            names.push(subject.clone());
            let (rt, buf, total, store) = (self.rt, self.buf, self.total, store.clone());
            let dir = scratch.path().join("cache");
            let this = self;
            subjects.push(Subject::new(subject, move || {
                // A second instance (its own connections) for demand misses, as a mount does.
                let demand = this.open(url)?;
                let _ = std::fs::remove_dir_all(&dir);
                let mut buf = buf.borrow_mut();
                buf.fill(0);
                let el = rt.block_on(cache_seq_read(store.clone(), demand, &dir, cc, &mut buf))?;
                std::fs::remove_dir_all(&dir)?;
                check_pattern(&buf).context("read through the cache")?;
                Ok(gbps(total, el))
            }));
        }
        let direct = format!("memsync-{name}");
        subjects.push(self.direct_subject(direct.clone(), store.clone()));
        subjects.extend(peers(chunk)?);
        let case = format!("seq_read_cache_{name}_chunk{}", human(chunk));
        let c = bench.compare(&case, &[("throughput", "GB/s")], subjects)?;
        for n in &names {
            ratios(bench, &c, n, &names)?;
        }
        drop(scratch);
        Ok(())
    }
}

/// The ratio of `subject` to every other subject of `c` but those in `not`.
fn ratios(bench: &mut Bench, c: &Compared, subject: &str, not: &[String]) -> Result<()> {
    for peer in c
        .subjects()
        .filter(|s| *s != subject && !not.iter().any(|n| n == s))
    {
        bench.ratio(c, subject, peer, "throughput")?;
    }
    Ok(())
}

/// A fresh cache over `remote` in `dir` (pull on), read from offset 0 to the end in 1 MiB reads
/// one after another into `buf`; the time from opening the cache to the last byte.
async fn cache_seq_read(
    remote: DynStore,
    demand: DynStore,
    dir: &Path,
    chunk: u64,
    buf: &mut [u8],
) -> Result<Duration> {
    let t = Instant::now();
    let cfg = CacheConfig {
        chunk_size: chunk,
        request_size: chunk.max(4 << 20),
        demand_request_size: chunk.max(1 << 20),
        push_interval: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(60),
        demand_remote: Some(demand),
        ..CacheConfig::default()
    };
    let cache = Arc::new(Cache::open(remote, dir, cfg).await?);
    let store: DynStore = cache.clone();
    for (i, c) in buf.chunks_mut(1 << 20).enumerate() {
        store.read((i as u64) << 20, c).await?;
    }
    let el = t.elapsed();
    cache.close().await?;
    Ok(el)
}

/// The predecessor's published managed-mount sequential-read figures (not measured here).
fn published(bench: &mut Bench, name: &str, mbps: f64) {
    bench.published(
        &format!("seq_read_managed_{name}"),
        "r3map",
        "throughput",
        "GB/s",
        mbps / 1000.0,
    );
}

/// `redis-benchmark` GETs of `chunk`-byte values, as many as a store of `total` bytes has
/// chunks (the same bytes), 16 pipelined on each of 50 connections: GB/s of the GET phase.
fn redis_benchmark_gbps(port: u16, chunk: u64, total: u64) -> Result<f64> {
    let Some(bin) = servers::find_tool("redis-benchmark") else {
        bail!("redis-benchmark is not installed (scripts/setup.sh installs it)")
    };
    let out = servers::run_bounded(
        &bin,
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-d",
            &chunk.to_string(),
            "-P",
            "16",
            "-c",
            "50",
            "-n",
            &total.div_ceil(chunk).to_string(),
            "--csv",
        ],
        Duration::from_secs(120),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    for line in out.lines() {
        let f: Vec<&str> = line.split(',').map(|s| s.trim_matches('"')).collect();
        if f.first() == Some(&"GET")
            && let Some(rps) = f.get(1).and_then(|v| v.parse::<f64>().ok())
        {
            return Ok(rps * chunk as f64 / 1e9);
        }
    }
    bail!("no GET line in redis-benchmark output: {out}")
}

/// `pread` of one plain file of `total` bytes holding the same data: the page cache without a
/// store in the way.
fn pread_limit(path: &Path, total: u64, buf: &mut [u8]) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if f.metadata()?.len() != total {
        let pat = fill_pattern(IO);
        for o in (0..total).step_by(IO) {
            f.write_all_at(&pat[..(total - o).min(IO as u64) as usize], o)?;
        }
    }
    let t = Instant::now();
    for (i, c) in buf.chunks_mut(IO).enumerate() {
        f.read_exact_at(c, (i * IO) as u64)?;
    }
    Ok(gbps(total, t.elapsed()))
}

/// The boto3 peer: a Python process that reads objects `PREFIX/0..COUNT` of a bucket with a
/// pool of threads, each `get_object` and read of the body, when asked on stdin, and prints the
/// bytes it read. Its first, untimed pass opens the connections and prints the SHA-256 of all
/// objects in order.
const BOTO3_READER: &str = r#"
import concurrent.futures, hashlib, sys
import boto3, botocore.config

endpoint, bucket, prefix = sys.argv[1:4]
count, threads = int(sys.argv[4]), int(sys.argv[5])
opts = dict(max_pool_connections=threads, s3={"addressing_style": "path"}, retries={"max_attempts": 1})
try:
    # botocore >= 1.36 checksums bodies by default; the store's objects carry none.
    cfg = botocore.config.Config(request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required", **opts)
except TypeError:
    cfg = botocore.config.Config(**opts)
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg)
pool = concurrent.futures.ThreadPoolExecutor(threads)

def get(i):
    return s3.get_object(Bucket=bucket, Key=f"{prefix}/{i}")["Body"].read()

h, n = hashlib.sha256(), 0
for body in pool.map(get, range(count)):
    h.update(body)
    n += len(body)
print(n, h.hexdigest(), flush=True)
for _ in sys.stdin:
    print(sum(len(b) for b in pool.map(get, range(count))), flush=True)
"#;

/// Whether `python3` on PATH can import boto3.
fn boto3_available() -> bool {
    Command::new("python3")
        .args(["-c", "import boto3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The boto3 peer reading `bucket`'s objects `prefix/0..count` (`total` bytes, whose SHA-256
/// must be `sha256`), with 32 threads.
fn boto3_peer<'p>(
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    count: u64,
    total: u64,
    sha256: &str,
) -> Result<Subject<'p>> {
    let mut child = Command::new("python3")
        .args(["-c", BOTO3_READER, endpoint, bucket, prefix])
        .arg(count.to_string())
        .arg("32")
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting python3 with boto3 (scripts/setup.sh installs it)")?;
    let mut stdin = child.stdin.take().context("boto3 peer stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("boto3 peer stdout")?);
    let proc = Proc(child);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let want = format!("{total} {sha256}");
    anyhow::ensure!(
        line.trim() == want,
        "boto3 read {:?} from {bucket}/{prefix}, expected {want:?} (bytes and SHA-256)",
        line.trim()
    );
    Ok(Subject::new("boto3", move || {
        let _alive = &proc;
        let mut line = String::new();
        let t = Instant::now();
        stdin.write_all(b"run\n")?;
        stdin.flush()?;
        stdout.read_line(&mut line)?;
        let el = t.elapsed();
        let n: u64 = line
            .trim()
            .parse()
            .with_context(|| format!("boto3 peer said {line:?}"))?;
        anyhow::ensure!(n == total, "boto3 read {n} bytes of {total}");
        Ok(gbps(total, el))
    }))
}

pub fn run(bench: &mut Bench, registry: &Registry) -> Result<()> {
    let quick = bench.config.quick;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let total: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let buf = RefCell::new(vec![0u8; total as usize]);
    let cx = Ctx {
        rt: &rt,
        registry,
        total,
        buf: &buf,
    };
    // Cache chunk sizes tried (the cache allows 4 KiB to 4 MiB).
    let cache_chunks: &[u64] = if quick {
        &[1 << 20]
    } else {
        &[1 << 20, 4 << 20]
    };

    // dir: (page cache), limit: pread of one plain file.
    let scratch = super::store::tempfile_dir(&bench.config.scratch)?;
    let dir_chunks: &[u64] = if quick {
        &[1 << 20]
    } else {
        &[64 << 10, 1 << 20]
    };
    let sp = scratch.path().to_owned();
    let dir_url = |c: u64| {
        format!(
            "dir:{}?size={total}&chunk={c}",
            sp.join(format!("chunks{c}")).display()
        )
    };
    let limit_path = scratch.path().join("limit.img");
    let pread_peer = |_chunk: u64| -> Result<Vec<Subject<'_>>> {
        let path = limit_path.clone();
        let buf = &buf;
        Ok(vec![Subject::new("pread", move || {
            pread_limit(&path, total, &mut buf.borrow_mut())
        })])
    };
    let dir_chunk = cx.sweep(bench, "dir", dir_chunks, &dir_url, &|| {}, &pread_peer)?;
    cx.cache_case(
        bench,
        "dir",
        &dir_url(dir_chunk),
        dir_chunk,
        cache_chunks,
        &|| {},
        &pread_peer,
    )?;
    published(bench, "dir", 264.0);

    // Redis, single node.
    match RedisServer::start() {
        None => eprintln!("stores: redis-server missing, Redis cases skipped"),
        Some(srv) => {
            let port = srv.port();
            let chunks: &[u64] = if quick {
                &[256 << 10, 1 << 20]
            } else {
                &[64 << 10, 256 << 10, 1 << 20]
            };
            let url = |c: u64| {
                format!("redis://127.0.0.1:{port}?size={total}&chunk={c}&conns=4&pipeline=8")
            };
            let flush = || {
                let _ = srv.cli(&["flushall"]);
            };
            let peer = |chunk: u64| -> Result<Vec<Subject<'_>>> {
                Ok(vec![Subject::new("redis-benchmark", move || {
                    redis_benchmark_gbps(port, chunk, total)
                })])
            };
            let best = cx.sweep(bench, "redis", chunks, &url, &flush, &peer)?;
            cx.cache_case(
                bench,
                "redis",
                &url(best),
                best,
                cache_chunks,
                &flush,
                &peer,
            )?;
        }
    }
    published(bench, "redis", 439.0);

    // S3 (s3s-fs).
    match S3Server::start() {
        None => eprintln!("stores: s3s-fs missing, S3 cases skipped"),
        Some(srv) => {
            let ep = srv.endpoint();
            let chunks: &[u64] = if quick {
                &[1 << 20, 4 << 20]
            } else {
                &[1 << 20, 4 << 20, 16 << 20]
            };
            let url = |c: u64| {
                format!(
                    "s3://bench/c{c}?size={total}&chunk={c}&create&conns=32&endpoint={ep}\
                     &access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}"
                )
            };
            let cfg = memsync_s3::S3Config::from_url(
                &memsync_core::StoreUrl::parse(&format!(
                    "s3://bench?size=1&endpoint={ep}&conns=32&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}"
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let client = Arc::new(cfg.client().map_err(|e| anyhow::anyhow!("{e}"))?);
            let with_boto3 = boto3_available();
            if !with_boto3 {
                let msg = "python3 cannot import boto3 (scripts/setup.sh installs it)";
                if memsync_testkit::skip::in_ci() {
                    bail!("stores: {msg}");
                }
                eprintln!("stores: {msg}: the S3 cases have no third-party peer");
            }
            // What every object set holds in order (fill's pattern), for boto3's check.
            let sha256 = {
                let mut b = buf.borrow_mut();
                let pat = fill_pattern(IO);
                for c in b.chunks_mut(IO) {
                    c.copy_from_slice(&pat[..c.len()]);
                }
                memsync_s3::sigv4::sha256_hex(&b)
            };
            let peers = |chunk: u64| -> Result<Vec<Subject<'_>>> {
                let prefix = format!("c{chunk}");
                let mut v = Vec::new();
                if with_boto3 {
                    v.push(boto3_peer(
                        &ep,
                        "bench",
                        &prefix,
                        total.div_ceil(chunk),
                        total,
                        &sha256,
                    )?);
                }
                // memsync's own HTTP client on the same objects, without the store layers.
                let (client, rt, buf) = (client.clone(), &rt, &buf);
                v.push(Subject::new("memsync-http-client", move || {
                    let mut buf = buf.borrow_mut();
                    let t = Instant::now();
                    rt.block_on(async {
                        let parts: Vec<(u64, &mut [u8])> = buf
                            .chunks_mut(chunk as usize)
                            .enumerate()
                            .map(|(i, b)| (i as u64, b))
                            .collect();
                        let mut s = futures_util::stream::iter(parts)
                            .map(|(i, b)| {
                                let (cl, key) = (client.clone(), format!("{prefix}/{i}"));
                                async move { cl.get_into(&key, None, b).await }
                            })
                            .buffer_unordered(32);
                        while let Some(r) = s.next().await {
                            r.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
                        }
                        anyhow::Ok(())
                    })?;
                    Ok(gbps(total, t.elapsed()))
                }));
                Ok(v)
            };
            let best = cx.sweep(bench, "s3", chunks, &url, &|| {}, &peers)?;
            cx.cache_case(bench, "s3", &url(best), best, cache_chunks, &|| {}, &peers)?;
            // Small-object latency (TCP_NODELAY, head+body in one write): 4 KiB PUT and GET.
            let small = Bytes::from(vec![7u8; 4096]);
            let (mut put, mut get) = (Vec::new(), Vec::new());
            let mut b = vec![0u8; 4096];
            for i in 0..if quick { 30 } else { 100 } {
                let t = Instant::now();
                rt.block_on(client.put(&format!("small/{i}"), small.clone()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                put.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                rt.block_on(client.get_into(&format!("small/{i}"), None, &mut b))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                get.push(t.elapsed().as_secs_f64() * 1e6);
            }
            bench.record(
                "s3_put_4k_object_qd1",
                "memsync-s3-client",
                "latency",
                "us",
                &put,
            );
            bench.record(
                "s3_get_4k_object_qd1",
                "memsync-s3-client",
                "latency",
                "us",
                &get,
            );
        }
    }
    published(bench, "s3_minio", 44.0);
    Ok(())
}
