//! Suite `sync`: delta synchronisation against rsync, same files, same changes, same run.
//!
//! A source file of random data (1 GiB; 64 MiB with `--quick`) and one destination per subject,
//! all equal to the source before each sample. A sample changes `pct`% of the source's 4 KiB
//! pages (random pages, random data), then every subject brings its destination up to date,
//! one after another in the same sample (so runs alternate), and every destination is verified
//! byte for byte (BLAKE3 of the whole file) before the next sample. Subjects:
//! - `memsync`: the library's sync with the digest index next to both files (what
//!   `memsync sync --no-fsync file:A file:B` does), timed from opening the stores; like rsync
//!   it leaves the written data in the page cache;
//! - `memsync-fsync`: the same with the destination flushed at the end (`memsync sync`'s
//!   default);
//! - `rsync-B4096`: `rsync -t --inplace --no-whole-file -B4096` (its best setting here);
//! - `rsync`: `rsync -t --inplace --no-whole-file` (rsync's default block size);
//! - remote (`peer rtt=N`): memsync to a `memsync sync --listen` child, and rsync to an rsync
//!   daemon on loopback, both through the in-process delay proxy at 0 and 30 ms RTT (the peer
//!   runs with `--no-fsync`, as the rsync daemon does not flush either).
//!
//! Metrics: seconds; bytes moved (memsync local: data bytes written; memsync remote: bytes on
//! the wire both ways; rsync: its `--stats` total bytes sent + received); and that over the
//! changed bytes. Before the samples of a case one untimed sync runs, so the unchanged case
//! (0%) measures a resync with valid indexes (rsync's equivalent is its size+mtime quick check).
//!
//! `push`: continuous push at the store layer. A writer dirties random 4 KiB pages of a
//! [`Tracked`] file store at 0, 50 and 500 MB/s while rounds run every 0.5 s to a peer; per round
//! the time and bytes on the wire, beside the bytes the writer wrote in that interval (the
//! lower bound), and the same with [`Rescan`] (hashing) instead of tracking.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use memsync_core::DynStore;
use memsync_local::{FileOptions, FileStore};
use memsync_sync::index::IndexFile;
use memsync_sync::{
    ChangeSource, Dest, LocalDest, NoProgress, PeerAddr, Pusher, RemoteDest, Rescan, Source,
    SyncOptions, Tracked,
};
use memsync_testkit::proxy::{Proxy, ProxyConfig};
use rand::{Rng, RngCore, SeedableRng};

use crate::Env;
use crate::{Bench, Proc, free_port, hash_file, wait_tcp};

const CHUNK: u64 = memsync_sync::DEFAULT_CHUNK;

fn make_random(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut block = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Change `pct`% of the pages of `path` (distinct random pages); returns the bytes changed.
fn mutate(path: &Path, size: u64, pct: f64, rng: &mut rand::rngs::SmallRng) -> Result<u64> {
    let pages = size / 4096;
    let n = (pages as f64 * pct / 100.0).round() as u64;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    // rsync's quick check compares whole seconds of mtime: a change within the second of the
    // last sync (quick runs on small files) would look unchanged to it. Wait (untimed) until
    // the writes below give the file an mtime in a later second.
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs());
    let before = secs(f.metadata()?.modified()?)?;
    while n > 0 && secs(std::time::SystemTime::now())? <= before {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut chosen = std::collections::HashSet::new();
    let mut page = [0u8; 4096];
    while (chosen.len() as u64) < n {
        let p = rng.random_range(0..pages);
        if chosen.insert(p) {
            rng.fill_bytes(&mut page);
            f.write_all_at(&page, p * 4096)?;
        }
    }
    if n > 0 {
        // The kernel stamps writes from a coarse clock that can lag `now()` by a tick, so the
        // writes may still carry the second waited out above (seen: 618.9995 after waiting
        // for 619): stamp the file from the precise clock instead.
        f.set_modified(std::time::SystemTime::now())?;
    }
    Ok(n * 4096)
}

fn open(path: &Path) -> Result<DynStore> {
    Ok(Arc::new(FileStore::open(path, FileOptions::default())?))
}

/// memsync local→local (`durable`: flush the destination, as `--no-fsync` does not); returns
/// (seconds, data bytes).
fn memsync_local(env: &Env<'_>, src: &Path, dst: &Path, durable: bool) -> Result<(f64, u64)> {
    let t = Instant::now();
    let r = env.rt.block_on(async {
        let source = Source {
            store: open(src)?,
            index: Some(IndexFile::for_file(src)),
        };
        let dest = Arc::new(LocalDest::new(open(dst)?, CHUNK, Some(dst))?);
        dest.set_durable(durable);
        anyhow::Ok(memsync_sync::sync(&source, dest, SyncOptions::default(), &NoProgress).await?)
    })?;
    Ok((t.elapsed().as_secs_f64(), r.data_bytes + r.zero_bytes))
}

/// memsync to a peer; returns (seconds, wire bytes both ways).
fn memsync_peer(env: &Env<'_>, src: &Path, peer: &str) -> Result<(f64, u64)> {
    let t = Instant::now();
    let r = env.rt.block_on(async {
        let store = open(src)?;
        let addr = PeerAddr::parse(peer)?;
        let dest = RemoteDest::connect(&addr, store.size(), CHUNK, true).await?;
        let source = Source {
            store,
            index: Some(IndexFile::for_file(src)),
        };
        anyhow::Ok(memsync_sync::sync(&source, dest, SyncOptions::default(), &NoProgress).await?)
    })?;
    Ok((t.elapsed().as_secs_f64(), r.wire_sent + r.wire_received))
}

/// A number from rsync's `--stats` output (it groups digits with commas).
pub fn stat_number(out: &str, key: &str) -> Result<u64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("rsync --stats has no {key:?}"))?;
    let digits: String = line[key.len()..]
        .chars()
        .take_while(|c| !c.is_alphabetic())
        .filter(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

/// rsync with `extra` flags; returns (seconds, bytes sent + received).
fn rsync(src: &Path, dst: &str, extra: &[&str]) -> Result<(f64, u64)> {
    let t = Instant::now();
    let o = Command::new("rsync")
        .args(["-t", "--inplace", "--no-whole-file", "--stats"])
        .args(extra)
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .context("running rsync (install it with scripts/setup.sh)")?;
    let el = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let bytes =
        stat_number(&out, "Total bytes sent:")? + stat_number(&out, "Total bytes received:")?;
    Ok((el, bytes))
}

struct Subject<'a> {
    name: String,
    dst: PathBuf,
    run: Box<dyn Fn() -> Result<(f64, u64)> + 'a>,
}

/// Run the cases of one setting (local or one RTT) over `subjects`.
fn cases(
    b: &mut Bench,
    label: &str,
    src: &Path,
    size: u64,
    subjects: &[Subject<'_>],
    rng: &mut rand::rngs::SmallRng,
) -> Result<()> {
    for pct in [1.0, 10.0, 0.0] {
        let case = format!("{label} {pct}%");
        // Untimed: brings every destination and index up to date (and warms the page cache).
        for s in subjects {
            (s.run)()?;
        }
        // One round runs every subject once (Bench::compare alternates their order); the first
        // call of a round changes the source, so that every subject syncs the same change.
        let calls = std::cell::Cell::new(0usize);
        let round = std::cell::RefCell::new((0u64, blake3::Hash::from([0; 32])));
        let rng = std::cell::RefCell::new(&mut *rng);
        let n = subjects.len();
        let mut list = Vec::new();
        for s in subjects {
            let (calls, round, rng, case) = (&calls, &round, &rng, &case);
            list.push(super::Subject::multi(s.name.clone(), move || {
                if calls.get() % n == 0 {
                    let changed = if pct > 0.0 {
                        mutate(src, size, pct, &mut rng.borrow_mut())?
                    } else {
                        0
                    };
                    *round.borrow_mut() = (changed, hash_file(src)?);
                }
                calls.set(calls.get() + 1);
                let (changed, want) = *round.borrow();
                let (t, n) = (s.run)()?;
                if hash_file(&s.dst)? != want {
                    bail!(
                        "{case}: {} left a destination that differs from the source \
                         (call {}, source mtime {:?}, destination mtime {:?})",
                        s.name,
                        calls.get(),
                        std::fs::metadata(src)?.modified()?,
                        std::fs::metadata(&s.dst)?.modified()?
                    );
                }
                let mut v = vec![t, n as f64 / 1e6];
                if pct > 0.0 {
                    v.push(n as f64 / changed.max(1) as f64);
                }
                Ok(v)
            }));
        }
        // Bytes per changed byte only where something changed.
        let metrics: &[(&str, &str)] = if pct > 0.0 {
            &[("time", "s"), ("bytes", "MB"), ("bytes/changed", "x")]
        } else {
            &[("time", "s"), ("bytes", "MB")]
        };
        let c = b.compare(&case, metrics, list)?;
        for s in subjects.iter().skip(1) {
            b.ratio(&c, &subjects[0].name, &s.name, "time")?;
        }
    }
    Ok(())
}

fn spawn_peer(exe: &Path, dst: &Path) -> Result<(Proc, String)> {
    let mut c = Command::new(exe)
        .args(["sync", "--no-fsync", "--listen", "127.0.0.1:0"])
        .arg(format!("file:{}", dst.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting memsync sync --listen")?;
    let mut line = String::new();
    use std::io::BufRead as _;
    std::io::BufReader::new(c.stdout.take().context("peer stdout")?).read_line(&mut line)?;
    let addr = line
        .rsplit(' ')
        .next()
        .map(str::trim)
        .filter(|a| a.contains(':'))
        .with_context(|| format!("peer printed {line:?}"))?
        .to_owned();
    Ok((Proc(c), addr))
}

fn spawn_rsyncd(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = false\nuid = root\ngid = root\n[m]\npath = {}\nread only = false\n",
            dir.display()
        ),
    )?;
    let c = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the rsync daemon")?;
    let p = Proc(c);
    wait_tcp(port)?;
    Ok((p, port))
}

pub fn run(b: &mut Bench, env: &Env<'_>) -> Result<()> {
    let size: u64 = if b.config.quick { 64 << 20 } else { 1 << 30 };
    let dir = tempfile::tempdir_in(&b.config.scratch)?;
    let d = dir.path();
    let src = d.join("src.img");
    make_random(&src, size, 1)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let copy = |name: &str| -> Result<PathBuf> {
        let p = d.join(name);
        std::fs::copy(&src, &p)?;
        Ok(p)
    };

    // Local to local.
    let (m, mf, r4, rd) = (
        copy("m.img")?,
        copy("mf.img")?,
        copy("r4.img")?,
        copy("rd.img")?,
    );
    let subjects = vec![
        subject_memsync_local(env, &src, &m, false),
        subject_memsync_local(env, &src, &mf, true),
        subject_rsync(&src, &r4, r4.display().to_string(), true),
        subject_rsync(&src, &rd, rd.display().to_string(), false),
    ];
    cases(b, "local", &src, size, &subjects, &mut rng)?;
    cli_unchanged(b, &env.exe, &src, &m)?;
    drop(subjects);
    for p in [&m, &mf, &r4, &rd] {
        std::fs::remove_file(p)?;
    }

    // To a peer through the delay proxy.
    let rdir = d.join("rsyncd");
    std::fs::create_dir(&rdir)?;
    let p = copy("p.img")?;
    std::fs::copy(&src, rdir.join("r4.img"))?;
    std::fs::copy(&src, rdir.join("rd.img"))?;
    let (_peer, peer_addr) = spawn_peer(&env.exe, &p)?;
    let (_rsyncd, rport) = spawn_rsyncd(&rdir)?;
    for rtt_ms in [0u64, 30] {
        let cfg = ProxyConfig {
            rtt: Duration::from_millis(rtt_ms),
            ..ProxyConfig::default()
        };
        let (pp, rp) = env.rt.block_on(async {
            anyhow::Ok((
                Proxy::start("127.0.0.1:0", &peer_addr, cfg).await?,
                Proxy::start("127.0.0.1:0", &format!("127.0.0.1:{rport}"), cfg).await?,
            ))
        })?;
        let peer_url = format!("memsync://{}", pp.local_addr());
        let rurl = |f: &str| format!("rsync://127.0.0.1:{}/m/{f}", rp.local_addr().port());
        let src2 = src.clone();
        let subjects = vec![
            Subject {
                name: "memsync".into(),
                dst: p.clone(),
                run: Box::new(move || memsync_peer(env, &src2, &peer_url)),
            },
            subject_rsync(&src, &rdir.join("r4.img"), rurl("r4.img"), true),
            subject_rsync(&src, &rdir.join("rd.img"), rurl("rd.img"), false),
        ];
        cases(
            b,
            &format!("peer rtt={rtt_ms}ms"),
            &src,
            size,
            &subjects,
            &mut rng,
        )?;
    }

    push(b, env, d, size)?;
    Ok(())
}

fn subject_memsync_local<'a>(
    env: &'a Env<'a>,
    src: &Path,
    dst: &Path,
    durable: bool,
) -> Subject<'a> {
    let (s, d) = (src.to_owned(), dst.to_owned());
    Subject {
        name: if durable { "memsync-fsync" } else { "memsync" }.into(),
        dst: dst.to_owned(),
        run: Box::new(move || memsync_local(env, &s, &d, durable)),
    }
}

fn subject_rsync(src: &Path, dst: &Path, target: String, b4096: bool) -> Subject<'static> {
    let s = src.to_owned();
    Subject {
        name: if b4096 { "rsync-B4096" } else { "rsync" }.into(),
        dst: dst.to_owned(),
        run: Box::new(move || {
            let extra: &[&str] = if b4096 { &["-B4096"] } else { &[] };
            rsync(&s, &target, extra)
        }),
    }
}

/// `memsync sync` as a process on an unchanged file (process start included).
fn cli_unchanged(b: &mut Bench, exe: &Path, src: &Path, dst: &Path) -> Result<()> {
    let run = || -> Result<f64> {
        let t = Instant::now();
        let o = Command::new(exe)
            .args(["sync", "--json"])
            .arg(format!("file:{}", src.display()))
            .arg(format!("file:{}", dst.display()))
            .stdin(Stdio::null())
            .output()?;
        let el = t.elapsed().as_secs_f64();
        if !o.status.success() {
            bail!(
                "memsync sync failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        if v["src_hashed"] != 0 || v["dst_hashed"] != 0 {
            bail!("an unchanged resync hashed data: {v}");
        }
        Ok(el)
    };
    run()?;
    let samples = (0..b.config.runs())
        .map(|_| run())
        .collect::<Result<Vec<f64>>>()?;
    b.record(
        "local 0% (memsync sync process)",
        "memsync",
        "time",
        "s",
        &samples,
    );
    Ok(())
}

/// Writes random 4 KiB pages to `store` at `rate` bytes/s until `stop`; counts into `written`.
async fn dirty(
    store: DynStore,
    rate: u64,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(rate);
    let pages = store.size() / 4096;
    let t = Instant::now();
    let mut total = 0u64;
    let mut page = vec![0u8; 4096];
    while !stop.load(Relaxed) {
        if rate == 0 || total as f64 >= rate as f64 * t.elapsed().as_secs_f64() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        rng.fill_bytes(&mut page);
        let off = rng.random_range(0..pages) * 4096;
        store
            .write(off, bytes::Bytes::copy_from_slice(&page))
            .await?;
        total += 4096;
        written.fetch_add(4096, Relaxed);
    }
    Ok(())
}

fn push(b: &mut Bench, env: &Env<'_>, d: &Path, size: u64) -> Result<()> {
    let src = d.join("push.img");
    make_random(&src, size, 3)?;
    let dst = d.join("push-dst.img");
    std::fs::copy(&src, &dst)?;
    let (_peer, addr) = spawn_peer(&env.exe, &dst)?;
    let url = format!("memsync://{addr}");
    let interval = Duration::from_millis(500);
    for rate_mb in [0u64, 50, 500] {
        let case = format!("push {rate_mb}MB/s");
        for method in ["tracked", "rescan"] {
            let (mut secs, mut sent, mut wrote) = (Vec::new(), Vec::new(), Vec::new());
            env.rt.block_on(async {
                let file = open(&src)?;
                let (store, changes): (DynStore, Arc<dyn ChangeSource>) = if method == "tracked" {
                    let t = Tracked::new(file, 4096);
                    (t.clone(), t)
                } else {
                    (file.clone(), Rescan::new(file, CHUNK)?)
                };
                let dest = RemoteDest::connect(&PeerAddr::parse(&url)?, size, CHUNK, true).await?;
                let source = Source {
                    store: store.clone(),
                    index: None,
                };
                let (pusher, _) = Pusher::start(
                    source,
                    dest.clone(),
                    changes,
                    SyncOptions::default(),
                    &NoProgress,
                )
                .await?;
                let written = Arc::new(AtomicU64::new(0));
                let stop = Arc::new(AtomicBool::new(false));
                let w = tokio::spawn(dirty(
                    store.clone(),
                    rate_mb * 1_000_000,
                    written.clone(),
                    stop.clone(),
                ));
                for _ in 0..b.config.runs() {
                    tokio::time::sleep(interval).await;
                    let n = written.swap(0, Relaxed);
                    let r = pusher.round().await?;
                    secs.push(r.elapsed.as_secs_f64() * 1e3);
                    sent.push(r.wire_sent as f64 / 1e6);
                    wrote.push(n as f64 / 1e6);
                }
                stop.store(true, Relaxed);
                w.await??;
                pusher.round().await?;
                let _ = dest.commit().await?;
                anyhow::Ok(())
            })?;
            if hash_file(&src)? != hash_file(&dst)? {
                bail!("{case} {method}: the peer differs from the source after the final round");
            }
            b.record(&case, method, "round time", "ms", &secs);
            b.record(&case, method, "sent/round", "MB", &sent);
            b.record(&case, method, "written/round", "MB", &wrote);
        }
    }
    Ok(())
}
