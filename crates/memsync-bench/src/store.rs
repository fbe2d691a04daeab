//! Suite `store`: each local store against the plain memory/page-cache limit, side by side.
//!
//! For every store (`mem:`, `file:`, `dir:`) it measures sequential 1 MiB reads and writes
//! (GB/s) and random 4 KiB reads and writes at queue depth 1 (µs per operation). The limit is
//! measured in the same run on the same data, in alternation with the store: `memcpy` for
//! `mem:`, and `pread`/`pwrite` on one plain file for `file:` and `dir:` (what the page cache
//! gives without a store in the way).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use memsync_core::{DynStore, Registry};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::{Bench, Subject, gbps};

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
    let seq_offsets: Vec<u64> = (0..total).step_by(SEQ_IO).collect();
    for &off in &seq_offsets {
        limit.write_at(off, &block)?;
    }

    // Sequential read.
    let mut buf = vec![0u8; SEQ_IO];
    let mut lbuf = vec![0u8; SEQ_IO];
    let lim = &*limit;
    bench.pair(
        &format!("{label} seq-read-1M"),
        ("throughput", "GB/s"),
        Subject::new("memsync", || {
            let el = timed(rt, &store, Op::Read(&mut buf), &seq_offsets)?;
            anyhow::ensure!(buf[..] == block[..], "{label}: read back different data");
            Ok(gbps(total, el))
        }),
        Subject::new(limit_name, || {
            let el = timed_limit(&mut |off| lim.read_at(off, &mut lbuf), &seq_offsets)?;
            Ok(gbps(total, el))
        }),
    )?;

    // Sequential write.
    let wname = limit.write_name();
    bench.pair(
        &format!("{label} seq-write-1M"),
        ("throughput", "GB/s"),
        Subject::new("memsync", || {
            let el = timed(rt, &store, Op::Write(&block), &seq_offsets)?;
            Ok(gbps(total, el))
        }),
        Subject::new(wname, || {
            let el = timed_limit(&mut |off| limit.write_at(off, &block), &seq_offsets)?;
            Ok(gbps(total, el))
        }),
    )?;

    // Random 4 KiB reads and writes, one at a time: µs per operation.
    let offsets = random_offsets(total, sz.rand_ops, 42);
    let per_op = |el: std::time::Duration| el.as_secs_f64() * 1e6 / offsets.len() as f64;
    let mut small = vec![0u8; RAND_IO];
    let mut lsmall = vec![0u8; RAND_IO];
    let lim = &*limit;
    bench.pair(
        &format!("{label} rand-read-4K"),
        ("latency", "us"),
        Subject::new("memsync", || {
            Ok(per_op(timed(rt, &store, Op::Read(&mut small), &offsets)?))
        }),
        Subject::new(limit_name, || {
            Ok(per_op(timed_limit(
                &mut |o| lim.read_at(o, &mut lsmall),
                &offsets,
            )?))
        }),
    )?;
    let small_block = block.slice(..RAND_IO);
    bench.pair(
        &format!("{label} rand-write-4K"),
        ("latency", "us"),
        Subject::new("memsync", || {
            Ok(per_op(timed(
                rt,
                &store,
                Op::Write(&small_block),
                &offsets,
            )?))
        }),
        Subject::new(wname, || {
            Ok(per_op(timed_limit(
                &mut |o| limit.write_at(o, &small_block),
                &offsets,
            )?))
        }),
    )?;
    Ok(())
}

/// A store operation done at each offset of a case.
enum Op<'b> {
    Read(&'b mut [u8]),
    Write(&'b Bytes),
}

/// The time to do `op` on `store` at each of `offsets` in turn.
fn timed(
    rt: &tokio::runtime::Runtime,
    store: &DynStore,
    op: Op<'_>,
    offsets: &[u64],
) -> Result<std::time::Duration> {
    let t = Instant::now();
    rt.block_on(async {
        match op {
            Op::Read(buf) => {
                for &o in offsets {
                    store.read(o, buf).await?;
                }
            }
            Op::Write(data) => {
                for &o in offsets {
                    store.write(o, data.clone()).await?;
                }
            }
        }
        Ok::<(), memsync_core::StoreError>(())
    })?;
    Ok(t.elapsed())
}

/// The time to run the limit's operation `op` at each of `offsets` in turn.
fn timed_limit(
    op: &mut dyn FnMut(u64) -> Result<()>,
    offsets: &[u64],
) -> Result<std::time::Duration> {
    let t = Instant::now();
    for &o in offsets {
        op(o)?;
    }
    Ok(t.elapsed())
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
#[derive(Debug)]
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
