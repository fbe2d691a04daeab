//! Suite `stores`: sequential read from the remote stores (Redis, S3) and `dir:` at RTT 0, on
//! real servers started by the suite (see memsync_testkit::servers), for several chunk sizes,
//! reporting the best and its chunk size, next to a same-run peer and the predecessor's
//! published figures.
//!
//! Two ways of reading:
//! - `direct`: straight from the store (through `Chunked` where the store needs it) with many
//!   requests in flight, per store chunk size;
//! - `cache`: through the cache layer (memsync-cache, what a managed mount reads through): a
//!   fresh cache over the store (at the store chunk size that was best direct), background pull
//!   on, read by one sequential reader in 1 MiB reads, timed from opening the cache to the last
//!   byte (what an application reading a freshly mounted file sees). The bytes read are checked.
//!
//! First-access latency is one 4 KiB read right after opening the store (its connections not yet
//! warm).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use memsync_cache::{Cache, CacheConfig};
use memsync_core::{DynStore, Registry};
use memsync_testkit::servers::{self, RedisServer, S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};

use super::{Bench, gbps};

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

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{}M", n >> 20)
    } else {
        format!("{}K", n >> 10)
    }
}

struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    registry: &'a Registry,
    total: u64,
    buf: Vec<u8>,
}

impl Ctx<'_> {
    fn open(&self, url: &str) -> Result<DynStore> {
        self.rt
            .block_on(self.registry.open(url))
            .map_err(|e| anyhow::anyhow!("{}", e.chain()))
            .with_context(|| format!("opening {url}"))
    }

    /// Fill and read the store at each chunk size; report each, then the best and its size.
    fn sweep(
        &mut self,
        bench: &mut Bench,
        name: &str,
        chunks: &[u64],
        url_of: &dyn Fn(u64) -> String,
        between: &dyn Fn(),
    ) -> Result<(f64, u64)> {
        let mut best = (0.0f64, 0u64);
        for &chunk in chunks {
            between();
            let url = url_of(chunk);
            let store = self.open(&url)?;
            self.rt.block_on(fill(&store, self.total))?;
            let mut samples = Vec::new();
            for _ in 0..bench.config.runs() {
                let el = self.rt.block_on(seq_read(&store, &mut self.buf))?;
                samples.push(gbps(self.total, el));
            }
            let case = format!("seq_read_direct_{name}_chunk{}", human(chunk));
            let v = bench.record(
                &case,
                &format!("memsync-{name}"),
                "throughput",
                "GB/s",
                &samples,
            );
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
                &format!("memsync-{name}"),
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
                &format!("memsync-{name}"),
                "latency",
                "us",
                &warm,
            );
        }
        let case = format!("seq_read_direct_{name}_best");
        bench.record(
            &case,
            &format!("memsync-{name}"),
            "throughput",
            "GB/s",
            &[best.0],
        );
        bench.record(
            &case,
            &format!("memsync-{name}"),
            "best_chunk",
            "bytes",
            &[best.1 as f64],
        );
        Ok(best)
    }

    /// Case `seq_read_cache_NAME`: refill the store at `url`, then for each cache chunk size,
    /// `runs` times: a fresh cache over it read sequentially to the end. Reports each cache chunk
    /// size, then the best with both chunk sizes; returns the best GB/s.
    fn cache_case(
        &mut self,
        bench: &mut Bench,
        name: &str,
        url: &str,
        cache_chunks: &[u64],
        between: &dyn Fn(),
    ) -> Result<f64> {
        between();
        let store = self.open(url)?;
        self.rt.block_on(fill(&store, self.total))?;
        let scratch = super::store::tempfile_dir(&bench.config.scratch)?;
        let mut best = (0.0f64, 0u64);
        for &cc in cache_chunks {
            let mut samples = Vec::new();
            for _ in 0..bench.config.runs() {
                // A second instance (its own connections) for demand misses, as a mount does.
                let demand = self.open(url)?;
                let dir = scratch.path().join("cache");
                let _ = std::fs::remove_dir_all(&dir);
                let el = self.rt.block_on(cache_seq_read(
                    store.clone(),
                    demand,
                    &dir,
                    cc,
                    &mut self.buf,
                ))?;
                std::fs::remove_dir_all(&dir)?;
                check_pattern(&self.buf)
                    .with_context(|| format!("{name} read through the cache"))?;
                self.buf.fill(0);
                samples.push(gbps(self.total, el));
            }
            let v = bench.record(
                &format!("seq_read_cache_{name}_cachechunk{}", human(cc)),
                &format!("memsync-{name}-cache"),
                "throughput",
                "GB/s",
                &samples,
            );
            if v > best.0 {
                best = (v, cc);
            }
        }
        let case = format!("seq_read_cache_{name}");
        let subject = format!("memsync-{name}-cache");
        bench.record(&case, &subject, "throughput", "GB/s", &[best.0]);
        let store_chunk = memsync_core::StoreUrl::parse(url)
            .ok()
            .and_then(|u| u.size_param("chunk").ok().flatten())
            .unwrap_or(0);
        bench.record(
            &case,
            &subject,
            "store_chunk",
            "bytes",
            &[store_chunk as f64],
        );
        bench.record(&case, &subject, "cache_chunk", "bytes", &[best.1 as f64]);
        Ok(best.0)
    }
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

/// The predecessor's published managed-mount sequential-read figures (not measured here).
fn published(bench: &mut Bench, name: &str, mbps: f64) {
    bench.record(
        &format!("seq_read_managed_{name}_published"),
        "r3map",
        "published_not_measured_here",
        "GB/s",
        &[mbps / 1000.0],
    );
}

fn redis_benchmark_gbps(port: u16, chunk: u64, n: u64) -> Result<f64> {
    let Some(bin) = servers::find_tool("redis-benchmark") else {
        bail!("redis-benchmark is not installed")
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
            &n.to_string(),
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

pub fn run(bench: &mut Bench, registry: &Registry) -> Result<()> {
    let quick = bench.config.quick;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let total: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let mut cx = Ctx {
        rt: &rt,
        registry,
        total,
        buf: vec![0u8; total as usize],
    };

    // dir: (page cache), limit: pread of one plain file.
    let scratch = super::store::tempfile_dir(&bench.config.scratch)?;
    // Cache chunk sizes tried (the cache allows 4 KiB to 4 MiB).
    let cache_chunks: &[u64] = if quick {
        &[1 << 20]
    } else {
        &[1 << 20, 4 << 20]
    };
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
    let (best_dir, dir_chunk) = cx.sweep(bench, "dir", dir_chunks, &dir_url, &|| {})?;
    let mut lim = Vec::new();
    for _ in 0..bench.config.runs() {
        lim.push(pread_limit(
            &scratch.path().join("limit.img"),
            total,
            &mut cx.buf,
        )?);
    }
    let l = bench.record(
        "seq_read_pread_plain_file",
        "limit-pread",
        "throughput",
        "GB/s",
        &lim,
    );
    bench.ratio("seq_read_direct_dir_best", "pread", "GB/s", best_dir, l);
    let cached = cx.cache_case(bench, "dir", &dir_url(dir_chunk), cache_chunks, &|| {})?;
    bench.ratio("seq_read_cache_dir", "pread", "GB/s", cached, l);
    bench.ratio("seq_read_cache_dir", "direct", "GB/s", cached, best_dir);
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
            let (best, best_chunk) = cx.sweep(bench, "redis", chunks, &url, &flush)?;
            let chunk = 256 << 10;
            let n = if quick { 2000 } else { 8000 };
            let mut peer = Vec::new();
            for _ in 0..bench.config.runs().min(3) {
                peer.push(redis_benchmark_gbps(port, chunk, n)?);
            }
            let p = bench.record(
                "redis_benchmark_get_256K_P16_c50",
                "redis-benchmark",
                "throughput",
                "GB/s",
                &peer,
            );
            bench.ratio(
                "seq_read_direct_redis_best",
                "redis-benchmark",
                "GB/s",
                best,
                p,
            );
            let cached = cx.cache_case(bench, "redis", &url(best_chunk), cache_chunks, &flush)?;
            bench.ratio("seq_read_cache_redis", "redis-benchmark", "GB/s", cached, p);
            bench.ratio("seq_read_cache_redis", "direct", "GB/s", cached, best);
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
            let (best, best_chunk) = cx.sweep(bench, "s3", chunks, &url, &|| {})?;
            // Peer: the same objects fetched with the bare HTTP client (no store layers).
            let c = 4u64 << 20;
            let cfg = memsync_s3::S3Config::from_url(
                &memsync_core::StoreUrl::parse(&format!(
                    "s3://bench?size=1&endpoint={ep}&conns=32&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}"
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let client = std::sync::Arc::new(cfg.client().map_err(|e| anyhow::anyhow!("{e}"))?);
            let mut peer = Vec::new();
            for _ in 0..bench.config.runs() {
                let t = Instant::now();
                let cl = client.clone();
                rt.block_on(async {
                    let parts: Vec<(u64, &mut [u8])> = cx
                        .buf
                        .chunks_mut(c as usize)
                        .enumerate()
                        .map(|(i, b)| (i as u64, b))
                        .collect();
                    let mut s = futures_util::stream::iter(parts)
                        .map(|(i, b)| {
                            let cl = cl.clone();
                            async move { cl.get_into(&format!("c{c}/{i}"), None, b).await }
                        })
                        .buffer_unordered(32);
                    while let Some(r) = s.next().await {
                        r.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
                    }
                    Ok::<_, anyhow::Error>(())
                })?;
                peer.push(gbps(total, t.elapsed()));
            }
            let p = bench.record(
                "raw_get_4M_objects_32_in_flight",
                "bare-http-client",
                "throughput",
                "GB/s",
                &peer,
            );
            bench.ratio(
                "seq_read_direct_s3_best",
                "bare-http-client",
                "GB/s",
                best,
                p,
            );
            let cached = cx.cache_case(bench, "s3", &url(best_chunk), cache_chunks, &|| {})?;
            bench.ratio("seq_read_cache_s3", "bare-http-client", "GB/s", cached, p);
            bench.ratio("seq_read_cache_s3", "direct", "GB/s", cached, best);
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
