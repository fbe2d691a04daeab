//! Suite `nbd`: `memsync serve` against nbdkit and qemu-nbd, all driven by nbdcopy, side by
//! side.
//!
//! The servers keep the export in memory: `memsync serve mem:SIZE`, `nbdkit memory SIZE`, and
//! `qemu-nbd` serving a raw file on tmpfs (`/dev/shm`; qemu-nbd has no memory backend).
//!
//! Cases (each over TCP loopback and a unix socket):
//! - `write`: nbdcopy writes a scratch file of random data into each export (GB/s). This also
//!   fills the exports for the next cases.
//! - `read`: nbdcopy reads the whole export to `null:` (GB/s).
//! - `4k-qd1`: nbdcopy with `--request-size=4096 -C 1 -R 1` (µs per request).
//! - `client-read`: the memsync NBD client reads the nbdkit export, against nbdcopy reading the
//!   same export to `null:` (GB/s). Both are timed the same way, as whole commands from start to
//!   exit (process start-up, connections and handshakes included): nbdcopy, and `memsync
//!   bench-nbd-read` (a hidden command that reads a store to nowhere). The bytes the memsync
//!   client reads are checked against the source file once, outside the timed runs.
//!
//! Every case measures memsync and its peers in alternation ([`Bench::compare`]) and prints
//! the ratios memsync/nbdkit and memsync/qemu-nbd. After the timed runs of a case, and before
//! it records anything, each subject's export is read once more the case's own way (the same
//! server, transport and nbdcopy options) into a file, whose BLAKE3 must be the source
//! file's: a server that loses or garbles bytes fails the case instead of scoring.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::{RngCore, SeedableRng};

use crate::Env;
use crate::{Bench, Proc, Subject, free_port, gbps, hash_file, wait_tcp};

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

/// `qemu-nbd` serving the raw file `file` on `listen` (`-p PORT` or `-k SOCKET`) until killed.
fn qemu_nbd(file: &Path, listen: &[&str]) -> Result<Proc> {
    let c = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--persistent",
            "--shared=16",
            "--cache=writeback",
        ])
        .args(listen)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd (install qemu-utils with scripts/setup.sh)")?;
    Ok(Proc(c))
}

/// Run nbdcopy; returns the wall time.
fn nbdcopy(args: &[&str]) -> Result<Duration> {
    timed_command(Command::new("nbdcopy").args(args))
        .context("running nbdcopy (install libnbd-bin with scripts/setup.sh)")
}

/// Run a command to its exit: the wall time from spawning it, or its error output.
pub fn timed_command(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let o = cmd.stdin(Stdio::null()).output()?;
    let el = t.elapsed();
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(el)
}

/// `memsync bench-nbd-read URL`: read the store `url` from start to end with `in_flight`
/// reads of `request_size` bytes, into buffers that are allocated and touched once (nbdcopy's
/// `null:` sink neither allocates nor zeroes per request, so neither does this); the `nbd`
/// suite times it as a whole command, like nbdcopy.
pub fn read_to_nowhere(env: &Env<'_>, url: &str, request_size: u64, in_flight: u64) -> Result<()> {
    anyhow::ensure!(
        request_size > 0 && in_flight > 0,
        "--request-size and --in-flight must be positive"
    );
    let store = env.rt.block_on(async {
        env.registry
            .open(url)
            .await
            .with_context(|| format!("opening {url}"))
    })?;
    read_in_tasks(env.rt, &store, request_size, in_flight)
}

/// Read `store` from start to end with `in_flight` reads of `piece` bytes at once, each in a
/// task of its own on `rt`, so that the runtime's workers receive in parallel as nbdcopy's
/// threads do (futures joined in one `block_on` would all run on the calling thread, which
/// then does all the receiving, and its softirqs, alone: `docs/perf.md`).
fn read_in_tasks(
    rt: &tokio::runtime::Runtime,
    store: &memsync_core::DynStore,
    piece: u64,
    in_flight: u64,
) -> Result<()> {
    let size = store.size();
    let tasks: Vec<_> = (0..in_flight)
        .map(|r| {
            let s = store.clone();
            rt.spawn(async move {
                let mut buf = vec![1u8; piece as usize];
                let mut i = r;
                while i * piece < size {
                    let off = i * piece;
                    let n = (size - off).min(piece) as usize;
                    s.read(off, &mut buf[..n]).await?;
                    i += in_flight;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    rt.block_on(async {
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
}

/// Read `store` from start to end with `in_flight` reads of `piece` bytes at once, handing
/// each piece (offset, bytes) to `seen`.
async fn read_all(
    store: &memsync_core::DynStore,
    piece: u64,
    in_flight: u64,
    seen: impl Fn(u64, &[u8]) -> Result<()> + Sync,
) -> Result<()> {
    let size = store.size();
    let seen = &seen;
    futures_util::future::try_join_all((0..in_flight).map(|r| {
        let s = store.clone();
        async move {
            let mut buf = vec![1u8; piece as usize];
            let mut i = r;
            while i * piece < size {
                let off = i * piece;
                let n = (size - off).min(piece) as usize;
                s.read(off, &mut buf[..n]).await?;
                seen(off, &buf[..n])?;
                i += in_flight;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(())
}

/// Time `memsync bench-nbd-read URL ARGS...` as a whole command.
pub fn memsync_read_command(exe: &Path, url: &str, args: &[&str]) -> Result<Duration> {
    timed_command(Command::new(exe).arg("bench-nbd-read").arg(url).args(args))
}

/// The untimed data check of a subject: nbdcopy with `opts` reads the export at `uri` into a
/// file in `dir` (the case's own read path, a file instead of `null:` as the sink); its
/// contents must hash to `want`, the hash of the data written into the export.
fn check_export(uri: &str, opts: &[&str], dir: &Path, want: &blake3::Hash) -> Result<()> {
    let out = TempPath(dir.join("read-back.img"));
    let _ = std::fs::remove_file(out.path());
    let out_s = out.path().to_str().unwrap_or_default();
    nbdcopy(&[opts, &[uri, out_s]].concat())?;
    let got = hash_file(out.path())?;
    anyhow::ensure!(
        got == *want,
        "{uri} does not hold the data written into it: read back with nbdcopy, it hashes to \
         BLAKE3 {got}, the source to {want}"
    );
    Ok(())
}

/// Check once, outside the timed runs, that the memsync client reads `url` as `src` holds it.
fn verify_client_read(env: &Env<'_>, url: &str, src: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(src)?;
    env.rt.block_on(async {
        let store = env.registry.open(url).await?;
        anyhow::ensure!(
            store.size() == file.metadata()?.len(),
            "{url} has another size than {}",
            src.display()
        );
        read_all(&store, 2 << 20, 32, |off, got| {
            let mut want = vec![0u8; got.len()];
            file.read_exact_at(&mut want, off)?;
            anyhow::ensure!(got == want, "{url}: the client read wrong bytes at {off}");
            Ok(())
        })
        .await
    })
}

struct Targets {
    memsync_tcp: String,
    memsync_unix: String,
    nbdkit_tcp: String,
    nbdkit_unix: String,
    qemu_tcp: String,
    qemu_unix: String,
    _procs: Vec<Proc>,
    /// qemu-nbd's files on tmpfs, and the data checks' read-back copies (on disk, writing one
    /// 4 KiB at a time made the check of `4k-qd1` longer than its timed runs); removed last.
    shm: TempPath,
}

/// `dir` holds the sockets; qemu-nbd's files go to a directory of their own on `/dev/shm`.
fn start(exe: &Path, size: u64, chunk: u64, dir: &Path) -> Result<Targets> {
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
    let q_port = free_port()?;
    let shm = TempPath(PathBuf::from(format!(
        "/dev/shm/memsync-bench-nbd-{}-{q_port}",
        std::process::id()
    )));
    std::fs::create_dir_all(shm.path()).context("qemu-nbd's export lives on tmpfs at /dev/shm")?;
    let (qf_tcp, qf_unix) = (shm.path().join("tcp.img"), shm.path().join("unix.img"));
    for f in [&qf_tcp, &qf_unix] {
        std::fs::File::create(f)?.set_len(size)?;
    }
    let q_sock = dir.join("qemu-nbd.sock");
    let qt = qemu_nbd(&qf_tcp, &["-b", "127.0.0.1", "-p", &q_port.to_string()])?;
    let qu = qemu_nbd(&qf_unix, &["-k", q_sock.to_str().unwrap_or_default()])?;
    let procs = vec![ms, kt, ku, qt, qu];
    wait_tcp(ms_port)?;
    wait_unix(&ms_sock)?;
    wait_tcp(kit_port)?;
    wait_unix(&kit_sock)?;
    wait_tcp(q_port)?;
    wait_unix(&q_sock)?;
    Ok(Targets {
        memsync_tcp: format!("nbd://127.0.0.1:{ms_port}/"),
        memsync_unix: format!("nbd+unix:///?socket={}", ms_sock.display()),
        nbdkit_tcp: format!("nbd://127.0.0.1:{kit_port}/"),
        nbdkit_unix: format!("nbd+unix:///?socket={}", kit_sock.display()),
        qemu_tcp: format!("nbd://127.0.0.1:{q_port}/"),
        qemu_unix: format!("nbd+unix:///?socket={}", q_sock.display()),
        _procs: procs,
        shm,
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

pub fn run(b: &mut Bench, env: &Env<'_>) -> Result<()> {
    let quick = b.config.quick;
    let size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let small: u64 = if quick { 8 << 20 } else { 64 << 20 };
    let dir = tempfile_dir(&b.config.scratch)?;
    let src = scratch_file(dir.path(), size)?;
    let src_s = src.to_str().unwrap_or_default().to_owned();
    let want = hash_file(&src)?;
    let t = start(&env.exe, size, 64 << 10, dir.path())?;
    let gb = |el: Duration| gbps(size, el);
    let check = |uri: &str, opts: &[&str]| check_export(uri, opts, t.shm.path(), &want);

    for (transport, uris) in [
        ("tcp", [&t.memsync_tcp, &t.nbdkit_tcp, &t.qemu_tcp]),
        ("unix", [&t.memsync_unix, &t.nbdkit_unix, &t.qemu_unix]),
    ] {
        let case = format!("write {transport}");
        servers(
            b,
            &case,
            ("throughput", "GB/s"),
            uris,
            |uri| Ok(gb(nbdcopy(&[&src_s, uri])?)),
            |uri| check(uri, &[]),
        )?;
        let case = format!("read {transport}");
        servers(
            b,
            &case,
            ("throughput", "GB/s"),
            uris,
            |uri| Ok(gb(nbdcopy(&[uri, "null:"])?)),
            |uri| check(uri, &[]),
        )?;
    }
    // One 4 KiB request in flight, on small exports of their own (nbdcopy copies whole
    // exports); --no-extents makes every request a real read.
    let n = small / 4096;
    let dir2 = dir.path().join("small");
    std::fs::create_dir_all(&dir2)?;
    // Both advertise a 4 KiB preferred block size (nbdcopy raises its request size to the
    // preferred one), and both hold data, so that every request is a real 4 KiB read.
    let t2 = start(&env.exe, small, 4096, &dir2)?;
    let small_src = scratch_file(&dir2, small)?;
    let small_want = hash_file(&small_src)?;
    let small_src = small_src.to_str().unwrap_or_default().to_owned();
    let small_uris = [
        ("tcp", [&t2.memsync_tcp, &t2.nbdkit_tcp, &t2.qemu_tcp]),
        ("unix", [&t2.memsync_unix, &t2.nbdkit_unix, &t2.qemu_unix]),
    ];
    for uri in small_uris.iter().flat_map(|(_, u)| u) {
        nbdcopy(&[&small_src, uri])?;
    }
    for (transport, uris) in small_uris {
        let case = format!("4k-qd1 {transport}");
        servers(
            b,
            &case,
            ("latency", "us"),
            uris,
            |uri| Ok(nbdcopy_4k_qd1(uri)?.as_secs_f64() * 1e6 / n as f64),
            |uri| check_export(uri, QD1_4K, t2.shm.path(), &small_want),
        )?;
    }
    // The memsync client reading the nbdkit export, against nbdcopy doing the same: both as
    // whole commands.
    let case = "client-read tcp";
    let url = format!("{}?connections=4", t.nbdkit_tcp);
    verify_client_read(env, &url, &src)?;
    b.pair(
        case,
        ("throughput", "GB/s"),
        Subject::new("memsync-client", || {
            Ok(gb(memsync_read_command(&env.exe, &url, &[])?))
        }),
        Subject::new("nbdcopy", || Ok(gb(nbdcopy(&[&t.nbdkit_tcp, "null:"])?)))
            .checked(|| check(&t.nbdkit_tcp, &[])),
    )?;
    Ok(())
}

/// The three servers (`uris`: memsync, nbdkit, qemu-nbd) driven the same way by `run`, in
/// alternation, then each checked once by `check` (untimed; see [`Subject::checked`]);
/// records each and the ratios of memsync to each peer.
fn servers(
    b: &mut Bench,
    case: &str,
    metric: (&str, &str),
    uris: [&String; 3],
    run: impl Fn(&str) -> Result<f64>,
    check: impl Fn(&str) -> Result<()>,
) -> Result<()> {
    let names = ["memsync", "nbdkit", "qemu-nbd"];
    let (run, check) = (&run, &check);
    let subjects = names
        .iter()
        .zip(uris)
        .map(|(name, uri)| Subject::new(*name, move || run(uri)).checked(move || check(uri)))
        .collect();
    let c = b.compare(case, &[metric], subjects)?;
    for peer in &names[1..] {
        b.ratio(&c, names[0], peer, metric.0)?;
    }
    Ok(())
}

/// nbdcopy's options for one 4 KiB request in flight on one connection, every request a real
/// read.
const QD1_4K: &[&str] = &["--request-size=4096", "-C", "1", "-R", "1", "--no-extents"];

/// nbdcopy reading the whole export at `uri` to `null:` with [`QD1_4K`]: the wall time of the
/// command.
pub fn nbdcopy_4k_qd1(uri: &str) -> Result<Duration> {
    nbdcopy(&[QD1_4K, &[uri, "null:"]].concat())
}

fn tempfile_dir(base: &Path) -> Result<TempPath> {
    let p = base.join(format!("memsync-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(TempPath(p))
}

/// A scratch directory or file (a read-back copy: the full suite's are 1 GiB each), removed
/// when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = if self.0.is_dir() {
            std::fs::remove_dir_all(&self.0)
        } else {
            std::fs::remove_file(&self.0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use memsync_core::{Bytes, Caps, DynStore, Result, Store, async_trait};

    /// A store of zeros that records which threads read from it.
    #[derive(Debug)]
    struct Threads {
        size: u64,
        seen: Mutex<HashSet<ThreadId>>,
    }

    #[async_trait]
    impl Store for Threads {
        fn size(&self) -> u64 {
            self.size
        }
        fn caps(&self) -> Caps {
            Caps::basic()
        }
        async fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            self.seen
                .lock()
                .unwrap()
                .insert(std::thread::current().id());
            buf.fill(0);
            // Give the other workers a chance to take the next reads.
            tokio::task::yield_now().await;
            Ok(())
        }
        async fn write(&self, _offset: u64, _data: Bytes) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    /// `bench-nbd-read` reads on the runtime's workers, not on the thread that runs the command
    /// (where all its reads once ran, one thread receiving for every connection).
    #[test]
    fn reads_to_nowhere_run_on_the_runtime_workers() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let store = Arc::new(Threads {
            size: 64 << 20,
            seen: Mutex::new(HashSet::new()),
        });
        let dyn_store: DynStore = store.clone();
        super::read_in_tasks(&rt, &dyn_store, 1 << 20, 8).unwrap();
        let seen = store.seen.lock().unwrap();
        assert!(!seen.is_empty());
        assert!(
            !seen.contains(&std::thread::current().id()),
            "a read ran on the calling thread"
        );
    }

    /// The data check passes on an export that holds the source and fails, naming the export,
    /// when one byte differs; through both read paths the suite uses.
    #[test]
    fn check_export_catches_one_wrong_byte() {
        for tool in ["nbdkit", "nbdcopy"] {
            if memsync_testkit::servers::require_tool(tool, "nbd check_export").is_none() {
                return;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kit.sock");
        let _kit = nbdkit(&["-f", "-U", sock.to_str().unwrap(), "memory", "1M"]).unwrap();
        wait_unix(&sock).unwrap();
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let src = scratch_file(dir.path(), 1 << 20).unwrap();
        nbdcopy(&[src.to_str().unwrap(), &uri]).unwrap();
        let want = hash_file(&src).unwrap();
        for opts in [&[][..], QD1_4K] {
            check_export(&uri, opts, dir.path(), &want).unwrap();
        }
        let mut other = std::fs::read(&src).unwrap();
        other[300_000] ^= 1;
        let other_hash = blake3::hash(&other);
        for opts in [&[][..], QD1_4K] {
            let e = check_export(&uri, opts, dir.path(), &other_hash).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{uri} does not hold the data")),
                "{e}"
            );
        }
        assert!(!dir.path().join("read-back.img").exists());
    }
}
