//! Suite `store`: each local store against the plain memory/page-cache limit, side by side.
//!
//! For every store (`mem:`, `file:`, `dir:`) it measures sequential 1 MiB reads and writes
//! (GB/s) and random 4 KiB reads and writes at queue depth 1 (µs per operation). The limit is
//! measured in the same run on the same data: `memcpy` for `mem:`, and `pread`/`pwrite` on one
//! plain file for `file:` and `dir:` (what the page cache gives without a store in the way).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use memsync_core::{DynStore, Registry};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{Bench, gbps};

const SEQ_IO: usize = 1 << 20;
const RAND_IO: usize = 4096;

struct Sizes {
    total: u64,
    rand_ops: usize,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            total: 64 << 20,
            rand_ops: 20_000,
        }
    } else {
        Sizes {
            total: 1 << 30,
            rand_ops: 200_000,
        }
    }
}

fn random_offsets(total: u64, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let blocks = total / RAND_IO as u64;
    (0..n)
        .map(|_| rng.random_range(0..blocks) * RAND_IO as u64)
        .collect()
}

fn random_block(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The same operations done directly on memory or on a plain file: the limit for a store.
trait Limit {
    /// What the limit is called in write cases (`memcpy`, `pwrite`).
    fn write_name(&self) -> &'static str;
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()>;
}

struct Memcpy(Vec<u8>);

impl Limit for Memcpy {
    fn write_name(&self) -> &'static str {
        "memcpy"
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let o = off as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        let o = off as usize;
        self.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

struct Pread(File);

impl Limit for Pread {
    fn write_name(&self) -> &'static str {
        "pwrite"
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.0.read_exact_at(buf, off)?)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        Ok(self.0.write_all_at(buf, off)?)
    }
}

/// Run one store against its limit for all four cases.
fn run_store(
    bench: &mut Bench,
    rt: &tokio::runtime::Runtime,
    label: &str,
    store: DynStore,
    limit: &mut dyn Limit,
    limit_name: &str,
) -> Result<()> {
    let sz = sizes(bench.config.quick);
    let total = sz.total;
    let block = Bytes::from(random_block(7, SEQ_IO));

    // Fill both with the same non-zero data so reads are of real data, not holes.
    rt.block_on(async {
        let mut off = 0;
        while off < total {
            store.write(off, block.clone()).await?;
            off += SEQ_IO as u64;
        }
        store.flush().await
    })
    .with_context(|| format!("filling {label}"))?;
    let mut off = 0;
    while off < total {
        limit.write_at(off, &block)?;
        off += SEQ_IO as u64;
    }

    // Sequential read.
    let case = format!("{label} seq-read-1M");
    let mut buf = vec![0u8; SEQ_IO];
    let m = bench.measure(&case, "memsync", "throughput", "GB/s", || {
        let t = Instant::now();
        rt.block_on(async {
            let mut off = 0;
            while off < total {
                store.read(off, &mut buf).await?;
                off += SEQ_IO as u64;
            }
            Ok::<(), memsync_core::StoreError>(())
        })?;
        Ok(gbps(total, t.elapsed()))
    })?;
    anyhow::ensure!(buf[..] == block[..], "{label}: read back different data");
    let p = bench.measure(&case, limit_name, "throughput", "GB/s", || {
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            limit.read_at(off, &mut buf)?;
            off += SEQ_IO as u64;
        }
        Ok(gbps(total, t.elapsed()))
    })?;
    bench.ratio(&case, limit_name, "GB/s", m, p);

    // Sequential write.
    let wname = limit.write_name();
    let case = format!("{label} seq-write-1M");
    let m = bench.measure(&case, "memsync", "throughput", "GB/s", || {
        let t = Instant::now();
        rt.block_on(async {
            let mut off = 0;
            while off < total {
                store.write(off, block.clone()).await?;
                off += SEQ_IO as u64;
            }
            Ok::<(), memsync_core::StoreError>(())
        })?;
        Ok(gbps(total, t.elapsed()))
    })?;
    let p = bench.measure(&case, wname, "throughput", "GB/s", || {
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            limit.write_at(off, &block)?;
            off += SEQ_IO as u64;
        }
        Ok(gbps(total, t.elapsed()))
    })?;
    bench.ratio(&case, wname, "GB/s", m, p);

    // Random 4 KiB reads and writes, one at a time: µs per operation.
    let offsets = random_offsets(total, sz.rand_ops, 42);
    let n = offsets.len() as f64;
    let mut small = vec![0u8; RAND_IO];
    let case = format!("{label} rand-read-4K");
    let m = bench.measure(&case, "memsync", "latency", "us", || {
        let t = Instant::now();
        rt.block_on(async {
            for &o in &offsets {
                store.read(o, &mut small).await?;
            }
            Ok::<(), memsync_core::StoreError>(())
        })?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / n)
    })?;
    let p = bench.measure(&case, limit_name, "latency", "us", || {
        let t = Instant::now();
        for &o in &offsets {
            limit.read_at(o, &mut small)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / n)
    })?;
    bench.ratio(&case, limit_name, "us", m, p);

    let case = format!("{label} rand-write-4K");
    let small_block = block.slice(..RAND_IO);
    let m = bench.measure(&case, "memsync", "latency", "us", || {
        let t = Instant::now();
        rt.block_on(async {
            for &o in &offsets {
                store.write(o, small_block.clone()).await?;
            }
            Ok::<(), memsync_core::StoreError>(())
        })?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / n)
    })?;
    let p = bench.measure(&case, wname, "latency", "us", || {
        let t = Instant::now();
        for &o in &offsets {
            limit.write_at(o, &small_block)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / n)
    })?;
    bench.ratio(&case, wname, "us", m, p);
    Ok(())
}

fn plain_file(path: &Path, size: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(size)?;
    Ok(f)
}

/// Run the `store` suite.
pub fn run(bench: &mut Bench, registry: &Registry) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let total = sizes(bench.config.quick).total;
    let scratch = tempfile_dir(&bench.config.scratch)?;
    let open = |url: String| -> Result<DynStore> {
        rt.block_on(registry.open(&url))
            .with_context(|| format!("opening {url}"))
    };

    let mem = open(format!("mem:{total}"))?;
    let mut limit = Memcpy(vec![0u8; total as usize]);
    run_store(bench, &rt, "mem", mem, &mut limit, "memcpy")?;
    drop(limit);

    let pread_path = scratch.path().join("limit.img");
    let mut limit = Pread(plain_file(&pread_path, total)?);
    let file = open(format!(
        "file:{}?size={total}",
        scratch.path().join("store.img").display()
    ))?;
    run_store(bench, &rt, "file", file, &mut limit, "pread")?;

    let dir = open(format!(
        "dir:{}?size={total}",
        scratch.path().join("chunks").display()
    ))?;
    run_store(bench, &rt, "dir", dir, &mut limit, "pread")?;
    Ok(())
}

/// A scratch directory removed on drop.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Make a fresh scratch directory under `base`.
pub fn tempfile_dir(base: &Path) -> Result<ScratchDir> {
    let name = format!(
        "memsync-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let p = base.join(name);
    std::fs::create_dir_all(&p).with_context(|| format!("creating scratch dir {}", p.display()))?;
    Ok(ScratchDir(p))
}
