//! Suite `nbd`: `memsync serve` against nbdkit, both driven by nbdcopy, side by side.
//!
//! Cases (each over TCP loopback and a unix socket):
//! - `write`: nbdcopy writes a scratch file of random data into `memsync serve mem:SIZE` and
//!   into `nbdkit memory SIZE` (GB/s). This also fills both exports for the next cases.
//! - `read`: nbdcopy reads the whole export to `null:` (GB/s).
//! - `4k-qd1`: nbdcopy with `--request-size=4096 -C 1 -R 1` (µs per request).
//! - `client-read`: the memsync NBD client reads the nbdkit export, against nbdcopy reading the
//!   same export to `null:` (GB/s).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::{RngCore, SeedableRng};

use super::{Bench, Proc, free_port, gbps, wait_tcp};
use crate::cmd::Context;

fn wait_unix(p: &Path) -> Result<()> {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on {}", p.display())
}

fn nbdkit(args: &[&str]) -> Result<Proc> {
    let c = Command::new("nbdkit")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting nbdkit (install it with scripts/setup.sh)")?;
    Ok(Proc(c))
}

/// Run nbdcopy; returns the wall time.
fn nbdcopy(args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let o = Command::new("nbdcopy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running nbdcopy (install libnbd-bin with scripts/setup.sh)")?;
    let el = t.elapsed();
    if !o.status.success() {
        bail!(
            "nbdcopy {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(el)
}

struct Targets {
    memsync_tcp: String,
    memsync_unix: String,
    nbdkit_tcp: String,
    nbdkit_unix: String,
    _procs: Vec<Proc>,
}

fn start(size: u64, chunk: u64, dir: &Path) -> Result<Targets> {
    let exe = std::env::current_exe()?;
    let ms_sock = dir.join("memsync.sock");
    let ms_port = free_port()?;
    let ms = Command::new(exe)
        .args([
            "serve",
            &format!("mem:{size}?chunk={chunk}"),
            "--listen",
            &format!("nbd://127.0.0.1:{ms_port}"),
        ])
        .args([
            "--listen",
            &format!("nbd+unix:///?socket={}", ms_sock.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting memsync serve")?;
    let ms = Proc(ms);
    let kit_port = free_port()?;
    let kit_sock = dir.join("nbdkit.sock");
    let kt = nbdkit(&[
        "-f",
        "-i",
        "127.0.0.1",
        "-p",
        &kit_port.to_string(),
        "memory",
        &size.to_string(),
    ])?;
    let ku = nbdkit(&[
        "-f",
        "-U",
        kit_sock.to_str().unwrap_or_default(),
        "memory",
        &size.to_string(),
    ])?;
    wait_tcp(ms_port)?;
    wait_unix(&ms_sock)?;
    wait_tcp(kit_port)?;
    wait_unix(&kit_sock)?;
    Ok(Targets {
        memsync_tcp: format!("nbd://127.0.0.1:{ms_port}/"),
        memsync_unix: format!("nbd+unix:///?socket={}", ms_sock.display()),
        nbdkit_tcp: format!("nbd://127.0.0.1:{kit_port}/"),
        nbdkit_unix: format!("nbd+unix:///?socket={}", kit_sock.display()),
        _procs: vec![ms, kt, ku],
    })
}

fn scratch_file(dir: &Path, size: u64) -> Result<PathBuf> {
    let p = dir.join("source.img");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
    let mut buf = vec![0u8; 1 << 20];
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p)?);
    let mut left = size;
    while left > 0 {
        rng.fill_bytes(&mut buf);
        let n = left.min(buf.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &buf[..n])?;
        left -= n as u64;
    }
    std::io::Write::flush(&mut f)?;
    Ok(p)
}

pub fn run(b: &mut Bench, ctx: &Context) -> Result<()> {
    let quick = b.config.quick;
    let size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let small: u64 = if quick { 8 << 20 } else { 64 << 20 };
    let dir = tempfile_dir(&b.config.scratch)?;
    let src = scratch_file(dir.path(), size)?;
    let src_s = src.to_str().unwrap_or_default().to_owned();
    let t = start(size, 64 << 10, dir.path())?;
    let gb = |el: Duration| gbps(size, el);

    for (transport, ms, kit) in [
        ("tcp", &t.memsync_tcp, &t.nbdkit_tcp),
        ("unix", &t.memsync_unix, &t.nbdkit_unix),
    ] {
        let case = format!("write {transport}");
        measure_pair(
            b,
            &case,
            ("memsync", "nbdkit"),
            ("throughput", "GB/s"),
            || Ok(gb(nbdcopy(&[&src_s, ms])?)),
            || Ok(gb(nbdcopy(&[&src_s, kit])?)),
        )?;
        let case = format!("read {transport}");
        measure_pair(
            b,
            &case,
            ("memsync", "nbdkit"),
            ("throughput", "GB/s"),
            || Ok(gb(nbdcopy(&[ms, "null:"])?)),
            || Ok(gb(nbdcopy(&[kit, "null:"])?)),
        )?;
    }
    // One 4 KiB request in flight, on small exports of their own (nbdcopy copies whole
    // exports); --no-extents makes every request a real read.
    let n = small / 4096;
    let dir2 = dir.path().join("small");
    std::fs::create_dir_all(&dir2)?;
    // Both advertise a 4 KiB preferred block size (nbdcopy raises its request size to the
    // preferred one), and both hold data, so that every request is a real 4 KiB read.
    let t2 = start(small, 4096, &dir2)?;
    let small_src = scratch_file(&dir2, small)?;
    let small_src = small_src.to_str().unwrap_or_default().to_owned();
    for uri in [
        &t2.memsync_tcp,
        &t2.memsync_unix,
        &t2.nbdkit_tcp,
        &t2.nbdkit_unix,
    ] {
        nbdcopy(&[&small_src, uri])?;
    }
    for (transport, ms, kit) in [
        ("tcp", &t2.memsync_tcp, &t2.nbdkit_tcp),
        ("unix", &t2.memsync_unix, &t2.nbdkit_unix),
    ] {
        let case = format!("4k-qd1 {transport}");
        let lat = |uri: &str| -> Result<f64> {
            let el = nbdcopy(&[
                "--request-size=4096",
                "-C",
                "1",
                "-R",
                "1",
                "--no-extents",
                uri,
                "null:",
            ])?;
            Ok(el.as_secs_f64() * 1e6 / n as f64)
        };
        measure_pair(
            b,
            &case,
            ("memsync", "nbdkit"),
            ("latency", "us"),
            || lat(ms),
            || lat(kit),
        )?;
    }
    // The memsync client reading the nbdkit export, against nbdcopy doing the same.
    let case = "client-read tcp";
    let url = format!("{}?connections=4", t.nbdkit_tcp);
    let store = ctx
        .rt
        .block_on(ctx.registry.open(&url))
        .with_context(|| format!("opening {url}"))?;
    // 32 reads of 2 MiB in flight, each reader task with a buffer of its own that is reused
    // from run to run (and touched beforehand): nbdcopy's `null:` sink neither allocates nor
    // zeroes, so neither should the measured loop.
    const PIECE: u64 = 2 << 20;
    const READERS: u64 = 32;
    let mut bufs: Vec<Vec<u8>> = (0..READERS).map(|_| vec![1u8; PIECE as usize]).collect();
    let client = || {
        let s = store.clone();
        let mine = std::mem::take(&mut bufs);
        let (el, back) = ctx.rt.block_on(async move {
            let t = Instant::now();
            let back = futures_util::future::try_join_all(mine.into_iter().zip(0..READERS).map(
                |(mut buf, r)| {
                    let s = s.clone();
                    async move {
                        let mut i = r;
                        while i < size / PIECE {
                            s.read(i * PIECE, &mut buf).await?;
                            i += READERS;
                        }
                        anyhow::Ok(buf)
                    }
                },
            ))
            .await?;
            anyhow::Ok((t.elapsed(), back))
        })?;
        bufs = back;
        Ok(gb(el))
    };
    measure_pair(
        b,
        case,
        ("memsync-client", "nbdcopy"),
        ("throughput", "GB/s"),
        client,
        || Ok(gb(nbdcopy(&[&t.nbdkit_tcp, "null:"])?)),
    )?;
    Ok(())
}

/// Measure memsync and its peer alternately (in the order m k, k m, m k, ...), so that a load
/// change on this shared machine hits both alike, then record both and their ratio. Measuring
/// all of one subject's runs before the other's turned a load change during the case into a
/// difference between the subjects.
fn measure_pair(
    b: &mut Bench,
    case: &str,
    (subject, peer): (&str, &str),
    (metric, unit): (&str, &str),
    mut fm: impl FnMut() -> Result<f64>,
    mut fk: impl FnMut() -> Result<f64>,
) -> Result<(f64, f64)> {
    let n = b.config.runs();
    let (mut ms, mut ks) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i % 2 == 0 {
            ms.push(fm()?);
            ks.push(fk()?);
        } else {
            ks.push(fk()?);
            ms.push(fm()?);
        }
    }
    let m = b.record(case, subject, metric, unit, &ms);
    let k = b.record(case, peer, metric, unit, &ks);
    b.ratio(case, peer, unit, m, k);
    Ok((m, k))
}

fn tempfile_dir(base: &Path) -> Result<TempDir> {
    let p = base.join(format!("memsync-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
