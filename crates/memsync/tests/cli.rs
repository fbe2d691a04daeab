//! End-to-end tests that drive the `memsync` binary.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

#[path = "device/mod.rs"]
mod device;
#[path = "report/mod.rs"]
mod report;
#[path = "vmm/mod.rs"]
mod vmm;

fn memsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(args)
        .output()
        .expect("run memsync")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_teaches_store_urls() {
    let o = memsync(&["--help"]);
    assert!(o.status.success());
    let s = stdout(&o);
    for needle in [
        "mem:SIZE",
        "file:PATH",
        "dir:PATH",
        "bench",
        "copy",
        "EXAMPLES",
    ] {
        assert!(s.contains(needle), "--help lacks {needle:?}:\n{s}");
    }
    let o = memsync(&["stores"]);
    assert!(o.status.success());
    let s = stdout(&o);
    assert!(
        s.contains("mem") && s.contains("file") && s.contains("dir"),
        "{s}"
    );
}

#[test]
fn bad_urls_fail_with_one_clear_line() {
    for (url, part) in [
        ("mem:12Q", "size"),
        ("s4://x", "scheme"),
        ("dir:/tmp/x?chunck=4K", "chunck"),
        ("nofile", "scheme"),
    ] {
        let o = memsync(&["info", url]);
        assert!(!o.status.success(), "{url} should fail");
        let e = stderr(&o);
        assert_eq!(
            e.trim_end().lines().count(),
            1,
            "one line expected for {url}: {e}"
        );
        assert!(e.starts_with("memsync: error:"), "{e}");
        assert!(
            e.contains(part),
            "error for {url} should name {part:?}: {e}"
        );
    }
}

#[test]
fn copy_file_to_dir_and_checksums_match() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let mut data = vec![0u8; 5 << 20];
    rand::rngs::SmallRng::seed_from_u64(9).fill_bytes(&mut data);
    // A hole in the middle and an unaligned tail.
    data[(1 << 20)..(3 << 20)].fill(0);
    data.truncate((5 << 20) - 1234);
    std::fs::write(&src, &data).unwrap();
    let size = data.len();
    let src_url = format!("file:{}", src.display());
    let dst_url = format!(
        "dir:{}?size={size}&chunk=64K",
        tmp.path().join("chunks").display()
    );
    let metrics = tmp.path().join("metrics.prom");
    let o = memsync(&[
        "copy",
        &src_url,
        &dst_url,
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "copy failed: {}", stderr(&o));
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("memsync_store_ops_total"), "{prom}");
    assert!(prom.contains("op=\"read\""), "{prom}");

    let a = memsync(&["checksum", &src_url]);
    let b = memsync(&["checksum", &dst_url]);
    assert!(
        a.status.success() && b.status.success(),
        "{} {}",
        stderr(&a),
        stderr(&b)
    );
    let ha = stdout(&a).split_whitespace().next().unwrap().to_owned();
    let hb = stdout(&b).split_whitespace().next().unwrap().to_owned();
    assert_eq!(ha, blake3::hash(&data).to_hex().to_string());
    assert_eq!(ha, hb);

    // The copy left the hole unallocated in the directory store.
    let info = memsync(&["info", &dst_url]);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(stdout(&info).contains("hole"), "{}", stdout(&info));
}

/// The same Redis keys (default prefix) read back with another chunk size used to give a
/// different checksum each time, all with exit 0. Now the store records its geometry: a
/// mismatch fails and says what it was created with, and the right one (or none) reads back.
#[test]
fn redis_store_read_with_another_chunk_size_fails_clearly() {
    let Some(srv) = memsync_testkit::servers::RedisServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let size = 1 << 20;
    let data = random(61, size);
    std::fs::write(&src, &data).unwrap();
    let url = |q: &str| format!("redis://127.0.0.1:{}?{q}", srv.port());
    let o = memsync(&[
        "copy",
        &format!("file:{}", src.display()),
        &url(&format!("size={size}&chunk=64K")),
    ]);
    assert!(o.status.success(), "copy: {}", stderr(&o));
    let want = blake3::hash(&data).to_hex().to_string();
    for chunk in ["256K", "16K"] {
        let o = memsync(&["checksum", &url(&format!("size={size}&chunk={chunk}"))]);
        assert!(
            !o.status.success(),
            "chunk={chunk} read the 64K store: {}",
            stdout(&o)
        );
        let e = stderr(&o);
        assert!(
            e.contains("was created with chunk=65536") && e.contains("memsync:meta"),
            "chunk={chunk}: {e}"
        );
    }
    for q in [format!("size={size}&chunk=64K"), String::new()] {
        let o = memsync(&["checksum", &url(&q)]);
        assert!(o.status.success(), "{q}: {}", stderr(&o));
        assert_eq!(stdout(&o).split_whitespace().next().unwrap(), want, "{q}");
    }
}

/// Passwords and secret keys in a store URL appear neither in error messages nor in the
/// `--metrics` file nor in what a command prints.
#[test]
fn secrets_in_store_urls_are_redacted() {
    use memsync_testkit::servers::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};
    let tmp = tempfile::tempdir().unwrap();
    // An error (nothing listens on port 1).
    let secret = "hunter2-redis-password";
    let o = memsync(&[
        "info",
        &format!("redis://127.0.0.1:1?size=1M&timeout=300ms&password={secret}"),
    ]);
    assert!(!o.status.success());
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("cannot open"), "{all}");
    assert!(!all.contains(secret), "the password leaked: {all}");
    // A malformed URL's error quotes it redacted too.
    let o = memsync(&["info", &format!("redis://h?password={secret}&size=1Q")]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && all.contains("size"), "{all}");
    assert!(!all.contains(secret), "the password leaked: {all}");
    // A working S3 store: the metrics, the output and the logs keep its secret key out.
    let Some(srv) = S3Server::start() else { return };
    let url = format!(
        "s3://redact/vm?size=1M&create&endpoint={}&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}",
        srv.endpoint()
    );
    let metrics = tmp.path().join("m.prom");
    let o = memsync(&[
        "-vv",
        "--metrics",
        metrics.to_str().unwrap(),
        "checksum",
        &url,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("s3://redact/vm"), "{prom}");
    for (what, text) in [
        ("metrics", prom),
        ("stdout", stdout(&o)),
        ("stderr", stderr(&o)),
    ] {
        assert!(
            !text.contains(S3_SECRET_KEY),
            "the secret key leaked into {what}: {text}"
        );
    }
}

#[test]
fn copy_refuses_smaller_destination() {
    let o = memsync(&["copy", "mem:2M", "mem:1M"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("smaller"), "{}", stderr(&o));
}

#[test]
fn demo_runs_and_verifies() {
    let o = memsync(&["demo", "--quick"]);
    let out = stdout(&o);
    assert!(o.status.success(), "demo failed: {}\n{out}", stderr(&o));
    // Each step prints its verification line only after comparing the results itself.
    for line in [
        "   checksum matches: ",
        "contents match: ",
        "files equal: ",
        "counter = 3000 on every node",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    // FUSE needs root and /dev/fuse; without them the step says why it skipped.
    assert!(
        out.contains("mounted file checksum matches: ") || out.contains("   skipped: "),
        "{out}"
    );
    assert!(out.contains("== summary"), "{out}");
}

/// What `memsync bench SUITE --quick --json` printed, checked line by line: every field is
/// there and finite; a measured figure lies within its min and max; a published one says so in
/// its subject, has 0 runs and takes part in no ratio; a ratio names two subjects measured in
/// its case, over as many rounds as both have samples. Returns each case's subjects (with
/// their metrics) and each case's ratio subjects.
struct BenchJson {
    subjects: BTreeMap<String, BTreeSet<String>>,
    ratios: BTreeMap<String, BTreeSet<String>>,
}

fn bench_json(suite: &str, runs: usize) -> BenchJson {
    let tmp = tempfile::tempdir().unwrap();
    let runs_s = runs.to_string();
    let o = memsync(&[
        "bench",
        suite,
        "--quick",
        "--json",
        "--runs",
        &runs_s,
        "--scratch",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bench {suite} failed: {}", stderr(&o));
    // (case, subject, metric) -> runs
    let mut measured: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut out = BenchJson {
        subjects: BTreeMap::new(),
        ratios: BTreeMap::new(),
    };
    let mut ratio_lines = Vec::new();
    for line in stdout(&o).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        for key in [
            "suite", "case", "subject", "metric", "value", "unit", "runs", "min", "max",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {line}");
        }
        assert_eq!(v["suite"], suite, "{line}");
        let case = v["case"].as_str().unwrap().to_owned();
        let subject = v["subject"].as_str().unwrap().to_owned();
        let metric = v["metric"].as_str().unwrap().to_owned();
        let value = v["value"].as_f64().unwrap_or(f64::NAN);
        let n = v["runs"].as_u64().unwrap();
        assert!(value.is_finite() && value > 0.0, "bad value in {line}");
        if metric == "ratio" {
            ratio_lines.push((case, subject, n, line.to_owned()));
            continue;
        }
        if subject.contains("(published)") {
            assert_eq!(n, 0, "a published figure is not measured here: {line}");
        } else {
            assert!(n >= 1, "{line}");
            assert!(
                v["min"].as_f64().unwrap() <= value && value <= v["max"].as_f64().unwrap(),
                "{line}"
            );
        }
        measured.insert((case.clone(), subject.clone(), metric), n);
        out.subjects.entry(case).or_default().insert(subject);
    }
    for (case, subject, n, line) in ratio_lines {
        let (pair, metric) = subject.split_once(' ').unwrap_or((&subject, ""));
        let (a, b) = pair
            .split_once('/')
            .unwrap_or_else(|| panic!("a ratio of two subjects: {line}"));
        for s in [a, b] {
            assert!(
                !s.contains("published"),
                "a ratio against a published figure: {line}"
            );
            let runs_of = measured
                .iter()
                .find(|((c, sub, m), _)| {
                    *c == case && sub == s && (metric.is_empty() || m == metric)
                })
                .map(|(_, r)| *r)
                .unwrap_or_else(|| panic!("{s} is not measured in case {case}: {line}"));
            assert_eq!(n, runs_of, "the ratio's rounds are {s}'s samples: {line}");
        }
        assert_eq!(n, runs as u64, "{line}");
        out.ratios.entry(case).or_default().insert(subject);
    }
    out
}

impl BenchJson {
    /// Assert that `case` was measured with `subject` and `peer` and has their ratio.
    #[track_caller]
    fn has_ratio(&self, case: &str, subject: &str, peer: &str) {
        let s = self
            .subjects
            .get(case)
            .unwrap_or_else(|| panic!("no case {case} in {:?}", self.subjects.keys()));
        assert!(
            s.contains(subject) && s.contains(peer),
            "{case} lacks {subject} or {peer}: {s:?}"
        );
        let r = self.ratios.get(case).cloned().unwrap_or_default();
        assert!(
            r.iter()
                .any(|x| x.starts_with(&format!("{subject}/{peer}"))),
            "{case} has no ratio {subject}/{peer}: {r:?}"
        );
    }
}

#[test]
fn bench_store_json_has_limits_and_ratios() {
    let j = bench_json("store", 2);
    for store in ["mem", "file", "dir"] {
        for (kind, limit) in [
            ("seq-read-1M", "pread"),
            ("seq-write-1M", "pwrite"),
            ("rand-read-4K", "pread"),
            ("rand-write-4K", "pwrite"),
        ] {
            let limit = if store == "mem" { "memcpy" } else { limit };
            j.has_ratio(&format!("{store} {kind}"), "memsync", limit);
        }
    }
}

#[test]
fn bench_nbd_json_has_peers_and_ratios() {
    let j = bench_json("nbd", 2);
    for t in ["tcp", "unix"] {
        for kind in ["write", "read", "4k-qd1"] {
            j.has_ratio(&format!("{kind} {t}"), "memsync", "nbdkit");
        }
    }
    j.has_ratio("client-read tcp", "memsync-client", "nbdcopy");
}

#[test]
fn bench_lazy_json_has_limits_and_ratios() {
    let j = bench_json("lazy", 2);
    let cpus = std::thread::available_parallelism().unwrap().get();
    for s in ["lazy-2M", "lazy-2M-pull"] {
        for limit in ["memcpy", "memcpy-fresh"] {
            j.has_ratio("seq-first-touch-256M", s, &format!("{limit}-{cpus}thr"));
        }
        j.has_ratio("nbd-seq-first-touch-256M", s, "client-read-2M-qd2");
    }
    j.has_ratio("rand-4k-first-touch", "lazy-default", "anon-fault");
    j.has_ratio("nbd-rand-4k-first-touch", "lazy-default", "client-4k-read");
    j.has_ratio("nbd-4k-qd1", "memsync-client", "nbdcopy");
}

#[test]
fn bench_mount_json_has_peers_and_ratios() {
    let j = bench_json("mount", 2);
    // `--quick` leaves 10 ms out (the same path as 30 ms).
    for rtt in [0, 30] {
        let case = format!("seq-read rtt={rtt}ms");
        j.has_ratio(&case, "fuse", "nbdcopy");
        j.has_ratio(&case, "fuse", "fuse-local-file");
        j.has_ratio(&case, "lazy-region", "nbdcopy");
        j.has_ratio(&case, "lazy-region-small-pages", "lazy-region");
        assert!(j.subjects[&case].contains("r3map (published)"), "{case}");
        // What the whole machine spent per GiB, beside what the ceiling spent.
        assert!(
            j.ratios[&case].contains("fuse/fuse-local-file cpu"),
            "{case}: {:?}",
            j.ratios[&case]
        );
    }
    // The machine's limit for the lazy region, without the proxy.
    j.has_ratio("seq-read rtt=0ms direct", "lazy-region-shm", "tcp-to-tmpfs");
    j.has_ratio("proxy-cost", "nbdcopy-proxy", "nbdcopy-direct");
    // How dear fresh memory was in the run, and what the file: store's pieces gain.
    j.has_ratio("fresh-memory", "after-idle", "reused");
    j.has_ratio("fresh-memory", "file-store-after-idle", "after-idle");
}

/// FUSE mounts under `dir` in this mount namespace: mount point and kernel connection number
/// (the minor of the mount's device, read from `mountinfo` without touching the mount).
fn fuse_mounts_under(dir: &std::path::Path) -> Vec<(String, String)> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = f.iter().skip_while(|x| **x != "-").nth(1)?;
            let conn = f.get(2)?.strip_prefix("0:")?;
            (fstype.starts_with("fuse") && f.get(4)?.starts_with(dir))
                .then(|| (f[4].to_owned(), conn.to_owned()))
        })
        .collect()
}

/// SIGTERM while the mount suite reads a FUSE file it serves itself: the process stops and
/// leaves no mount behind. Before, a signal in the middle of a read left the process waiting
/// forever in the kernel for a reply from its own request threads, already gone (state D,
/// `request_wait_answer`), or, between reads, left a dead mount point.
#[test]
fn bench_stops_cleanly_at_sigterm_during_a_fuse_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["bench", "mount", "--quick", "--runs", "3", "--scratch"])
        .arg(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Not piped: nobody reads it, and a full pipe would block the bench's handler.
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while fuse_mounts_under(tmp.path()).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the suite ended before mounting FUSE"
        );
        assert!(t.elapsed() < Duration::from_secs(300), "no FUSE mount");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The seq-read case's FUSE subjects read the file from the mount's own process now.
    std::thread::sleep(Duration::from_millis(20));
    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(90) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let left = fuse_mounts_under(tmp.path());
    // Free the machine before failing: abort this run's stuck connections (only them: other
    // tests' mounts are alive), detach its mounts.
    for (m, conn) in &left {
        let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
        let _ = Command::new("umount").args(["-l", m]).status();
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status.expect("the bench did not end within 90 s of SIGTERM");
    assert!(left.is_empty(), "FUSE mounts left behind: {left:?}");
    assert!(
        !status.success(),
        "an interrupted suite must not report success"
    );
    // The suite unwound: its servers and proxies (children naming its scratch directory) were
    // killed on the way out, none runs on.
    let scratch = tmp.path().to_str().unwrap().to_owned();
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&scratch) && c.contains("serve"))
        .collect();
    assert!(orphans.is_empty(), "children left running: {orphans:?}");
}

#[test]
fn bench_migrate_json_has_every_case() {
    let j = bench_json("migrate", 2);
    for rate in ["0MBps", "50MBps", "500MBps", "50MBps-rtt30ms"] {
        for mode in ["precopy", "postcopy", "hybrid"] {
            let case = format!("{mode}-{rate}");
            let s = j
                .subjects
                .get(&case)
                .unwrap_or_else(|| panic!("no case {case}"));
            assert!(s.contains("memsync"), "{case}: {s:?}");
        }
    }
    assert!(
        j.subjects["postcopy-0MBps"]
            .iter()
            .any(|s| s.contains("(published)")),
        "{:?}",
        j.subjects["postcopy-0MBps"]
    );
    j.has_ratio("tracking", "tracked", "untracked");
}

#[test]
fn bench_stores_json_has_peers_and_ratios() {
    let j = bench_json("stores", 2);
    j.has_ratio("seq_read_direct_dir_chunk1M", "memsync-dir", "pread");
    j.has_ratio(
        "seq_read_cache_dir_chunk1M",
        "memsync-dir-cache1M",
        "memsync-dir",
    );
    for chunk in ["256K", "1M"] {
        j.has_ratio(
            &format!("seq_read_direct_redis_chunk{chunk}"),
            "memsync-redis",
            "redis-benchmark",
        );
    }
    for chunk in ["1M", "4M"] {
        let case = format!("seq_read_direct_s3_chunk{chunk}");
        j.has_ratio(&case, "memsync-s3", "boto3");
        j.has_ratio(&case, "memsync-s3", "memsync-http-client");
    }
    assert!(
        j.subjects
            .keys()
            .any(|c| c.starts_with("seq_read_cache_s3")),
        "{:?}",
        j.subjects.keys()
    );
}

/// `memsync serve`: a child process killed on drop, with the address it printed.
struct Serve {
    child: std::process::Child,
    uri: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Serve {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run memsync serve");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("memsync serve printed its address");
    let uri = line.trim_start_matches("memsync: serving ").to_owned();
    Serve { child, uri }
}

fn run_ok(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} (scripts/setup.sh installs it): {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[test]
fn serve_nbd_to_qemu_and_libnbd_then_stop_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    let mut s = serve(&[
        &format!("file:{}?size=16M", img.display()),
        "--listen",
        "nbd://127.0.0.1:0",
        "--export",
        "disk",
        "--export",
        "scratch=mem:8M",
        "--description",
        "memsync test",
    ]);
    let uri = format!("{}/disk", s.uri);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 3M 4k",
        ],
    );
    run_ok("qemu-img", &["info", &uri]);
    let list = run_ok("nbdinfo", &["--list", &s.uri]);
    assert!(
        list.contains("\"disk\"") && list.contains("\"scratch\"") && list.contains("memsync test"),
        "{list}"
    );
    // SIGTERM: clean shutdown with the file store flushed.
    let st = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut status = None;
    for _ in 0..300 {
        if let Some(x) = s.child.try_wait().unwrap() {
            status = Some(x);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = status.expect("memsync serve stopped within 6 s");
    assert!(status.success(), "{status:?}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[..1 << 20].iter().all(|&b| b == 0xab) && data[3 << 20] == 0xcd);
}

#[test]
fn serve_read_only_over_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("s.sock");
    let s = serve(&[
        "mem:4M",
        "--read-only",
        "--listen",
        &format!("nbd+unix:///?socket={}", sock.display()),
    ]);
    assert!(s.uri.starts_with("nbd+unix://"), "{}", s.uri);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let json = run_ok("nbdinfo", &["--json", &uri]);
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write 0 4k"])
        .output()
        .unwrap();
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        !o.status.success()
            || all.contains("rror")
            || all.contains("ermission")
            || all.contains("read-only")
            || all.contains("read only"),
        "{all}"
    );
    // The memsync client reads it by URL.
    let o = memsync(&["info", &uri]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("read-only:    true"), "{}", stdout(&o));
}

/// `memsync mount`: a child process (killed on drop, its FUSE mount detached) that printed
/// "memsync: mounted PATH".
struct MountProc {
    child: std::process::Child,
    file: std::path::PathBuf,
    mountpoint: std::path::PathBuf,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for MountProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .output();
    }
}

fn mount_proc(remote: &str, cache: &std::path::Path, mnt: &std::path::Path) -> MountProc {
    mount_proc_with(remote, cache, mnt, &[])
}

/// [`mount_proc`] with more arguments.
fn mount_proc_with(
    remote: &str,
    cache: &std::path::Path,
    mnt: &std::path::Path,
    extra: &[&str],
) -> MountProc {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["mount", remote, "--cache"])
        .arg(cache)
        .arg("--fuse")
        .arg(mnt)
        .args(["--name", "disk", "--chunk", "64K", "--push-interval", "1h"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run memsync mount");
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (etx, erx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("memsync mount printed its file");
    let file = std::path::PathBuf::from(line.trim_start_matches("memsync: mounted "));
    MountProc {
        child,
        file,
        mountpoint: mnt.to_path_buf(),
        stdout: rx,
        stderr: erx,
    }
}

#[test]
fn mount_fuse_durable_after_sigkill_and_restart_refetches_nothing() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("remote.img");
    let size = 8usize << 20;
    let mut want = vec![0u8; size];
    rand::rngs::SmallRng::seed_from_u64(9).fill_bytes(&mut want);
    std::fs::write(&img, &want).unwrap();
    let srv = serve(&[
        &format!("file:{}", img.display()),
        "--listen",
        "nbd://127.0.0.1:0",
    ]);
    let remote = format!("{}/", srv.uri);
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    let m = mount_proc(&remote, &cache, &mnt);
    // The file is the mounting user's alone unless `--allow-other`/`--mode` say otherwise.
    {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&m.file).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600, "mode of the FUSE file");
        assert_eq!(md.uid(), memsync_sys::euid(), "owner of the FUSE file");
    }
    // Everything becomes local; then writes, fsync (= flush to the remote), SIGKILL at once.
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "first read through FUSE differs"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    for (i, off) in [0usize, 1_000_000, 3_333_333, size - 70_000]
        .into_iter()
        .enumerate()
    {
        let mut d = vec![0u8; 70_000];
        rand::rngs::SmallRng::seed_from_u64(100 + i as u64).fill_bytes(&mut d);
        f.write_all_at(&d, off as u64).unwrap();
        want[off..off + d.len()].copy_from_slice(&d);
    }
    f.sync_all().unwrap();
    let mut m = m;
    m.child.kill().unwrap(); // SIGKILL right after the flush returned
    let _ = m.child.wait();
    drop(f);
    drop(m);
    let remote_now = std::fs::read(&img).unwrap();
    assert!(
        remote_now == want,
        "the remote lacks flushed bytes after SIGKILL"
    );

    // Restart from the same cache directory: identical data, nothing fetched from the remote.
    let mut m = mount_proc(&remote, &cache, &mnt);
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "data differs after restart"
    );
    let err = stop_mount(&mut m);
    assert!(
        err.contains("pulled 0 B (demand 0 B) in 0 reads"),
        "refetched after restart:\n{err}"
    );
    assert!(err.contains("memsync: stopped"), "{err}");
}

/// SIGTERM to a mount; waits (30 s at most) for a successful exit and returns its stderr.
fn stop_mount(m: &mut MountProc) -> String {
    run_ok("kill", &["-TERM", &m.child.id().to_string()]);
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "mount did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    while let Ok(l) = m.stderr.recv_timeout(std::time::Duration::from_secs(2)) {
        err.push_str(&l);
        err.push('\n');
    }
    assert!(status.success(), "mount exited with {status}:\n{err}");
    err
}

/// A mount whose remote stops answering (its `memsync serve` SIGSTOPped) while chunks written
/// through it (a `pwrite`, and a page of a shared mapping that is still mapped) wait for the final
/// flush: `stop` makes it give the flush up, and it must then exit non-zero (before: it waited
/// for the remote forever) naming the ranges it did not push, with the mount point gone. Nothing
/// is lost: once the remote answers again, a mount of the same cache directory pushes them.
fn unmount_with_a_stopped_remote(extra: &[&str], stop: impl FnOnce(&mut MountProc)) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 4usize << 20;
    let (mut want, img, srv) = served_image(dir.path(), 31, size);
    let remote = format!("{}/", srv.uri);
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    let mut m = mount_proc_with(&remote, &cache, &mnt, extra);
    // Every chunk local: with the remote stopped, only the flush needs it.
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "first read differs"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    let d = random(32, 4096);
    f.write_all_at(&d, 1 << 20).unwrap();
    want[1 << 20..(1 << 20) + 4096].copy_from_slice(&d);
    let map = memsync_sys::Mapping::shared_fd(f.as_fd(), size, 0).unwrap();
    let d = random(33, 4096);
    map.write_at(3 << 20, &d);
    want[3 << 20..(3 << 20) + 4096].copy_from_slice(&d);

    let peer = srv.child.id().to_string();
    run_ok("kill", &["-STOP", &peer]);
    run_ok("kill", &["-TERM", &m.child.id().to_string()]);
    stop(&mut m);
    // Bounded here, not by the mount: without a way out it waits for the remote for minutes.
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(60) {
            run_ok("kill", &["-CONT", &peer]);
            panic!("the mount did not give up its final flush");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    while let Ok(l) = m.stderr.recv_timeout(std::time::Duration::from_secs(2)) {
        err.push_str(&l);
        err.push('\n');
    }
    // Read while the remote is still stopped: it may yet write what it had received without
    // acknowledging it.
    assert!(
        std::fs::read(&img).unwrap() != want,
        "the remote has the writes already (the test would prove nothing)"
    );
    run_ok("kill", &["-CONT", &peer]);
    assert!(
        !status.success(),
        "gave up, yet exited with {status}:\n{err}"
    );
    // The two written chunks (64 KiB each), by their byte ranges.
    assert!(
        err.contains("2 chunks (131072 bytes) were NOT pushed to")
            && err.contains("bytes 1048576..1114112, 3145728..3211264;"),
        "{err}"
    );
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "the mount point is still mounted:\n{err}"
    );
    drop(map);
    drop(f);
    drop(m);

    let mut m = mount_proc(&remote, &cache, &mnt);
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "the mount lost a write"
    );
    stop_mount(&mut m);
    drop(m);
    assert_same(
        "the remote after a clean stop of the next mount",
        &std::fs::read(&img).unwrap(),
        &want,
    );
}

#[test]
fn unmount_gives_up_the_flush_to_a_stopped_remote_at_a_second_sigterm() {
    unmount_with_a_stopped_remote(&[], |m| {
        // The second signal once the flush waits for the remote (the mapped page is then in
        // the cache).
        let t = std::time::Instant::now();
        loop {
            let l = m
                .stderr
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the mount announced its push to the remote");
            if l.contains("dirty chunks to the remote") {
                assert!(l.contains("pushing 2 dirty chunks"), "{l}");
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(30));
        }
        run_ok("kill", &["-TERM", &m.child.id().to_string()]);
    });
}

#[test]
fn unmount_gives_up_the_flush_to_a_stopped_remote_after_its_timeout() {
    // Long enough for the write-back and unmount before it on a loaded machine.
    unmount_with_a_stopped_remote(&["--unmount-timeout", "10s"], |_| {});
}

/// The next JSON line a mount printed on stdout (a --sync-json report).
fn next_json(m: &MountProc) -> serde_json::Value {
    let l = m
        .stdout
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the mount printed a sync report");
    serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
}

/// For the `--sync-to` tests: `size` random bytes in `dir/remote.img`, served over NBD, and an
/// equal second copy `dir/copy.img` (so a first sync sends nothing).
fn remote_and_copy(
    dir: &std::path::Path,
    seed: u64,
    size: usize,
) -> (Vec<u8>, std::path::PathBuf, std::path::PathBuf, Serve) {
    let (want, img, srv) = served_image(dir, seed, size);
    let copy = dir.join("copy.img");
    std::fs::write(&copy, &want).unwrap();
    (want, img, copy, srv)
}

/// `size` random bytes in `dir/remote.img`, served over NBD on loopback by `memsync serve`.
fn served_image(
    dir: &std::path::Path,
    seed: u64,
    size: usize,
) -> (Vec<u8>, std::path::PathBuf, Serve) {
    let want = random(seed, size);
    let img = dir.join("remote.img");
    std::fs::write(&img, &want).unwrap();
    let srv = serve(&[
        &format!("file:{}", img.display()),
        "--listen",
        "nbd://127.0.0.1:0",
    ]);
    (want, img, srv)
}

/// Issue 13, continuous push of a mount: `mount --sync-to PEER` tracks the writes made through
/// the FUSE file and pushes only them, in a round per SIGUSR1 (and per --sync-every) and a last
/// round after the unmount's flush; the peer's copy then equals the remote byte for byte.
#[test]
fn mount_sync_to_a_peer_pushes_only_what_was_written() {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let size = 8usize << 20;
    let (mut want, img, copy, srv) = remote_and_copy(dir.path(), 61, size);
    let (_peer, addr) = sync_peer(&[], &["127.0.0.1:0", &format!("file:{}", copy.display())]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let to = format!("memsync://{addr}");
    let mut m = mount_proc_with(
        &format!("{}/", srv.uri),
        &dir.path().join("cache"),
        &mnt,
        &["--sync-to", &to, "--sync-every", "1h", "--sync-json"],
    );
    let first = next_json(&m);
    assert_eq!(
        (
            &first["size"],
            &first["updated_chunks"],
            &first["data_bytes"]
        ),
        (&size.into(), &0.into(), &0.into()),
        "{first}"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(62);
    let mut write_pages = |f: &std::fs::File, want: &mut Vec<u8>, n: usize| {
        use rand::seq::index::sample;
        for p in sample(&mut rng, size / PAGE, n) {
            let d = random(rng.next_u64(), PAGE);
            f.write_all_at(&d, (p * PAGE) as u64).unwrap();
            want[p * PAGE..(p + 1) * PAGE].copy_from_slice(&d);
        }
    };
    let usr1 = |m: &MountProc| run_ok("kill", &["-USR1", &m.child.id().to_string()]);
    // Rounds on demand: each sends exactly the pages written (and flushed) before it.
    for (round, pages) in [(1, 20), (2, 1), (3, 50)] {
        write_pages(&f, &mut want, pages);
        f.sync_all().unwrap();
        usr1(&m);
        let r = next_json(&m);
        assert_eq!(r["round"], round, "{r}");
        assert_eq!(r["data_bytes"], pages * PAGE, "round {round}: {r}");
        // Digests of the written chunks and the pages' own digests, not the whole store.
        let wire = r["wire_sent"].as_u64().unwrap();
        assert!(
            wire >= (pages * PAGE) as u64 && wire < (pages * PAGE + pages * 8192 + 4096) as u64,
            "round {round} sent {wire} B on the wire for {pages} pages: {r}"
        );
    }
    // A round with nothing written sends nothing.
    usr1(&m);
    let r = next_json(&m);
    assert_eq!((&r["round"], &r["chunks"]), (&4.into(), &0.into()), "{r}");
    // Rounds while a writer keeps writing through a mapping-free pwrite loop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let f = f.try_clone().unwrap();
        let mut want = want.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(63);
            let mut pages = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = (rng.next_u64() as usize) % (size / PAGE);
                let d = random(rng.next_u64(), PAGE);
                f.write_all_at(&d, (p * PAGE) as u64).unwrap();
                want[p * PAGE..(p + 1) * PAGE].copy_from_slice(&d);
                pages += 1;
                if pages.is_multiple_of(16) {
                    f.sync_data().unwrap();
                }
            }
            (want, pages)
        })
    };
    let mut busy_rounds = 0;
    let mut sent = 0u64;
    for round in 5..10 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        usr1(&m);
        let r = next_json(&m);
        assert_eq!(r["round"], round, "{r}");
        busy_rounds += (r["updated_chunks"].as_u64().unwrap() > 0) as u32;
        sent += r["data_bytes"].as_u64().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (want, pages) = writer.join().unwrap();
    drop(f);
    assert!(
        busy_rounds >= 3,
        "{busy_rounds} of 5 rounds saw the writer's pages"
    );
    // The last round runs after the unmount's flush (no fsync of the last writes here).
    let err = stop_mount(&mut m);
    let last = next_json(&m);
    assert_eq!(last["round"], 10, "{last}");
    sent += last["data_bytes"].as_u64().unwrap();
    assert!(
        sent > 0 && sent <= pages * PAGE as u64,
        "the rounds during the writer sent {sent} B for {pages} pages written"
    );
    assert!(err.contains("memsync: stopped"), "{err}");
    drop(srv);
    assert_same(
        "the remote after the unmount",
        &std::fs::read(&img).unwrap(),
        &want,
    );
    assert_same("the --sync-to copy", &std::fs::read(&copy).unwrap(), &want);
    let sum = |p: &std::path::Path| {
        hash_of(
            &memsync(&["checksum", &format!("file:{}", p.display())]),
            "checksum",
        )
    };
    assert_eq!(
        sum(&copy),
        sum(&img),
        "checksums of the copy and the remote"
    );
}

/// `mount --sync-to` to a local `file:` copy, and with `--sync-compress` to a peer: a round
/// sends the pages written (compressed on the wire when they compress), and after the unmount
/// the copy equals the remote.
#[test]
fn mount_sync_to_a_file_and_compressed_to_a_peer() {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let size = 4usize << 20;
    for compressed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (mut want, img, copy, srv) = remote_and_copy(dir.path(), 71, size);
        let (peer, to) = if compressed {
            let (p, addr) = sync_peer(&[], &["127.0.0.1:0", &format!("file:{}", copy.display())]);
            (Some(p), format!("memsync://{addr}"))
        } else {
            (None, format!("file:{}", copy.display()))
        };
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut extra = vec!["--sync-to", &to, "--sync-every", "1h", "--sync-json"];
        if compressed {
            extra.push("--sync-compress");
        }
        let mut m = mount_proc_with(
            &format!("{}/", srv.uri),
            &dir.path().join("cache"),
            &mnt,
            &extra,
        );
        let first = next_json(&m);
        assert_eq!(first["updated_chunks"], 0, "{first}");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.file)
            .unwrap();
        // Text-like pages (they compress) at scattered offsets.
        let pages = [3usize, 17, 18, 200, 1000];
        for (k, p) in pages.iter().enumerate() {
            let line = format!("page {p} of round one, written through the mount #{k}\n");
            let d: Vec<u8> = line.bytes().cycle().take(PAGE).collect();
            f.write_all_at(&d, (p * PAGE) as u64).unwrap();
            want[p * PAGE..(p + 1) * PAGE].copy_from_slice(&d);
        }
        f.sync_all().unwrap();
        drop(f);
        run_ok("kill", &["-USR1", &m.child.id().to_string()]);
        let r = next_json(&m);
        assert_eq!(r["round"], 1, "{r}");
        assert_eq!(r["data_bytes"], pages.len() * PAGE, "{r}");
        if compressed {
            let wire = r["wire_sent"].as_u64().unwrap();
            assert!(
                wire < (pages.len() * PAGE / 4) as u64,
                "{wire} B on the wire for {} B of text: {r}",
                pages.len() * PAGE
            );
        }
        let err = stop_mount(&mut m);
        assert!(err.contains("memsync: stopped"), "{err}");
        drop(srv);
        drop(peer);
        assert_same("the remote", &std::fs::read(&img).unwrap(), &want);
        assert_same(
            &format!("the --sync-to copy (compressed {compressed})"),
            &std::fs::read(&copy).unwrap(),
            &want,
        );
    }
}

/// Issue 10, item 1: a write to a chunk the cache's map already records as present and clean,
/// then SIGKILL before the next checkpoint. After a remount, fsync and a clean stop, the remote
/// must hold the write (the map said "clean", so nothing pushed it before the fix).
fn write_to_a_clean_chunk_then_sigkill(write: impl FnOnce(&std::path::Path, &mut Vec<u8>)) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4usize << 20;
    let (mut want, img, srv) = served_image(dir.path(), 21, size);
    let remote = format!("{}/", srv.uri);
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    let mut m = mount_proc(&remote, &cache, &mnt);
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "first read differs"
    );
    // Wait for the checkpoint that records every chunk present and clean (the end of the pull
    // makes one): polled, not timed.
    let t = std::time::Instant::now();
    while std::fs::read(cache.join("map")).unwrap() != vec![1u8; size / 65536] {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "no checkpoint recorded the chunks as present and clean"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    write(&m.file, &mut want);
    m.child.kill().unwrap(); // SIGKILL: no flush, no checkpoint after the write
    let _ = m.child.wait();
    drop(m);
    assert!(
        std::fs::read(&img).unwrap() != want,
        "the remote has the write already (the test would prove nothing)"
    );

    let mut m = mount_proc(&remote, &cache, &mnt);
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "the mount lost the write"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap()
        .sync_all()
        .unwrap();
    let pid = m.child.id().to_string();
    run_ok("kill", &["-TERM", &pid]);
    let status = m.child.wait().unwrap();
    assert!(status.success(), "mount exited with {status}");
    drop(m);
    assert!(
        std::fs::read(&img).unwrap() == want,
        "after remount, fsync and stop the remote lacks the write made before SIGKILL"
    );
}

#[test]
fn mount_pwrite_to_a_clean_chunk_survives_sigkill() {
    use std::os::unix::fs::FileExt;
    write_to_a_clean_chunk_then_sigkill(|file, want| {
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        let d = random(22, 4096);
        f.write_all_at(&d, 1 << 20).unwrap(); // reaches the cache before pwrite returns
        want[1 << 20..(1 << 20) + 4096].copy_from_slice(&d);
    });
}

#[test]
fn mount_mmap_write_to_a_clean_chunk_survives_sigkill() {
    use std::os::fd::AsFd;
    write_to_a_clean_chunk_then_sigkill(|file, want| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .unwrap();
        let map = memsync_sys::Mapping::shared_fd(f.as_fd(), want.len(), 0).unwrap();
        let d = random(23, 4096);
        map.write_at(3 << 20, &d);
        want[3 << 20..(3 << 20) + 4096].copy_from_slice(&d);
        drop(map);
        // close(2) writes the dirty pages back to the cache (FUSE flush), without an fsync.
        drop(f);
    });
}

/// Issue 10, item 4: a cache directory made for one remote is refused for another of the same
/// size (before: it served the first one's bytes under the second's URL), and `--cache-reinit`
/// starts it over.
#[test]
fn a_cache_directory_is_refused_for_another_remote() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2usize << 20;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, random(31, size)).unwrap();
    std::fs::write(&b, random(32, size)).unwrap();
    let (ua, ub) = (
        format!("file:{}", a.display()),
        format!("file:{}", b.display()),
    );
    let cache = dir.path().join("cache");
    let map = |url: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_memsync"))
            .args(["map", url, "--cache-chunk", "64K", "--cache"])
            .arg(&cache)
            .args(extra)
            .output()
            .expect("run memsync map")
    };
    let o = map(&ua, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hash_of(&o, "map a"),
        hash_of(&memsync(&["checksum", &ua]), "checksum")
    );
    let o = map(&ub, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("file:{}", a.display())) && e.contains("--cache-reinit"),
        "{e}"
    );
    let o = map(&ub, &["--cache-reinit"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hash_of(&o, "map b"),
        hash_of(&memsync(&["checksum", &ub]), "checksum")
    );
}

/// The line of `memsync map --cache` output with the cache's statistics.
fn cache_line(o: &Output) -> String {
    stdout(o)
        .lines()
        .find(|l| l.starts_with("cache "))
        .unwrap_or_else(|| panic!("no cache statistics:\n{}", stdout(o)))
        .to_owned()
}

/// `map --shared`: the region maps the pages of a file: store on tmpfs, and of a cache whose
/// directory is on tmpfs (filled from an NBD remote served by `memsync serve`), without
/// copying them: the hashes match the remote and the region installed nothing by copy.
#[test]
fn map_shared_maps_a_tmpfs_file_and_a_tmpfs_cache() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("remote.img");
    std::fs::write(&img, random(17, (5 << 20) + 4096 * 3)).unwrap();
    let want = hash_of(
        &memsync(&["checksum", &format!("file:{}", img.display())]),
        "checksum",
    );
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let local = shm.path().join("local.img");
    std::fs::copy(&img, &local).unwrap();
    let o = memsync(&["map", &format!("file:{}", local.display()), "--shared"]);
    assert!(o.status.success(), "map --shared: {}", stderr(&o));
    assert_eq!(hash_of(&o, "map --shared"), want);
    assert!(
        stdout(&o).contains("installs: 0 move, 0 copy"),
        "{}",
        stdout(&o)
    );

    let sock = dir.path().join("s.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let _srv = serve(&[&format!("file:{}", img.display()), "--listen", &url]);
    let o = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["map", &url, "--shared", "--cache"])
        .arg(shm.path().join("cache"))
        .output()
        .expect("run memsync map");
    assert!(o.status.success(), "map --shared --cache: {}", stderr(&o));
    assert_eq!(hash_of(&o, "map --shared --cache"), want);
    // Off tmpfs there is nothing to map: a clear error, not a copy behind the user's back.
    let o = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["map", &url, "--shared", "--cache"])
        .arg(dir.path().join("cache"))
        .output()
        .expect("run memsync map");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("shared memory"), "{}", stderr(&o));
}

/// `map --small-pages`: the region copies each chunk in (no move of a huge page), through a
/// cache of an NBD remote too, and reads the remote's bytes.
#[test]
fn map_small_pages_copies_every_chunk_in() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("remote.img");
    std::fs::write(&img, random(23, (6 << 20) + 4096 * 5)).unwrap();
    let file = format!("file:{}", img.display());
    let want = hash_of(&memsync(&["checksum", &file]), "checksum");
    let o = memsync(&["map", &file, "--small-pages", "--no-prefetch"]);
    assert!(o.status.success(), "map --small-pages: {}", stderr(&o));
    assert_eq!(hash_of(&o, "map --small-pages"), want);
    assert!(
        stdout(&o).contains("installs: 0 move, 4 copy"),
        "{}",
        stdout(&o)
    );

    let sock = dir.path().join("s.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let _srv = serve(&[&file, "--listen", &url]);
    let cache = dir.path().join("cache");
    let o = memsync(&[
        "map",
        &url,
        "--small-pages",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "map --small-pages --cache: {}",
        stderr(&o)
    );
    assert_eq!(hash_of(&o, "map --small-pages --cache"), want);
    assert!(stdout(&o).contains("installs: 0 move,"), "{}", stdout(&o));
}

#[test]
fn map_through_a_cache_then_reuse_it_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("remote.img");
    std::fs::write(&img, random(7, 6 << 20)).unwrap();
    let sock = dir.path().join("s.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let _srv = serve(&[&format!("file:{}", img.display()), "--listen", &url]);
    let want = hash_of(
        &memsync(&["checksum", &format!("file:{}", img.display())]),
        "checksum",
    );
    let cache = dir.path().join("cache");
    let map = || {
        let o = Command::new(env!("CARGO_BIN_EXE_memsync"))
            .args(["map", &url, "--cache"])
            .arg(&cache)
            .output()
            .expect("run memsync map");
        assert!(o.status.success(), "map --cache failed: {}", stderr(&o));
        o
    };

    let first = map();
    assert_eq!(hash_of(&first, "map --cache"), want, "first map differs");
    let line = cache_line(&first);
    assert!(line.contains("local 6/6 chunks (0 dirty)"), "{line}");
    assert!(
        !line.contains("pulled 0 B"),
        "nothing pulled the first time: {line}"
    );

    // The same directory again: the same bytes, all from the cache, nothing from the remote.
    let second = map();
    assert_eq!(
        hash_of(&second, "map --cache again"),
        want,
        "second map differs"
    );
    assert!(
        stderr(&second).contains("6/6 chunks local"),
        "{}",
        stderr(&second)
    );
    let line = cache_line(&second);
    assert!(
        line.contains("pulled 0 B (demand 0 B) in 0 reads"),
        "refetched with a reused cache: {line}"
    );
}

#[test]
fn map_cache_errors_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache = cache.to_str().unwrap();
    let missing = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    );
    let one_line = |o: &Output| {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
        let e = stderr(o);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.starts_with("memsync: error: "), "{e}");
        e
    };
    // A bad chunk size is refused before the store is opened, and says why.
    for (chunk, why) in [
        ("3000", "power of two from 4 KiB to 4 MiB"),
        ("8M", "power of two from 4 KiB to 4 MiB"),
        ("1Q", "unknown unit"),
    ] {
        let e = one_line(&memsync(&[
            "map",
            &missing,
            "--cache",
            cache,
            "--cache-chunk",
            chunk,
        ]));
        assert!(e.contains("--cache-chunk") && e.contains(why), "{e}");
    }
    // A store that cannot be opened is named.
    let e = one_line(&memsync(&["map", &missing, "--cache", cache]));
    assert!(e.contains(&format!("cannot open {missing}")), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Remote stores (Redis, S3) through every frontend: a lazy region (`memsync map`), a FUSE mount
// of the cache layer (`memsync mount --fuse`) and an NBD export (`memsync serve` + nbdcopy), on
// real servers started by memsync-testkit. Every byte is compared: directly, or by BLAKE3 of
// the whole store.
// ---------------------------------------------------------------------------------------------

fn hash_of(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", stderr(o));
    stdout(o)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{what} printed nothing"))
        .to_owned()
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut d);
    d
}

/// The whole store, read directly (not through any frontend), into a file; returns its bytes.
fn read_store(url: &str, size: usize, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join("readback.img");
    let _ = std::fs::remove_file(&out);
    std::fs::File::create(&out)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let o = memsync(&["copy", url, &format!("file:{}", out.display())]);
    assert!(o.status.success(), "copy {url} out: {}", stderr(&o));
    std::fs::read(&out).unwrap()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// `url` names an empty remote store of `size` bytes. Fill it, then go through every frontend.
fn remote_store_through_every_frontend(url: &str, size: usize) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();

    // Random data into the store (memsync copy from a file).
    let mut want = random(1, size);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &want).unwrap();
    let o = memsync(&["copy", &format!("file:{}", src.display()), url]);
    assert!(o.status.success(), "copy into {url}: {}", stderr(&o));
    assert_same(
        "store after copy",
        &read_store(url, size, dir.path()),
        &want,
    );

    // (a) Lazy region: every byte read through page faults (64 KiB per fault, no prefetch).
    let h = hash_of(
        &memsync(&["map", url, "--chunk", "64K", "--no-prefetch"]),
        "map",
    );
    assert_eq!(
        h,
        blake3::hash(&want).to_hex().to_string(),
        "lazy region differs"
    );

    // (b) Cache layer + FUSE: read all, pwrite and mmap writes, fsync, then the remote itself.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut m = mount_proc(url, &dir.path().join("cache"), &mnt);
    assert_same("FUSE read", &std::fs::read(&m.file).unwrap(), &want);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    for (i, off) in [0usize, 70_001, size / 2 - 3, size - 100_000]
        .into_iter()
        .enumerate()
    {
        let d = random(10 + i as u64, 100_000);
        f.write_all_at(&d, off as u64).unwrap();
        want[off..off + d.len()].copy_from_slice(&d);
    }
    let map = memsync_sys::Mapping::shared_fd(f.as_fd(), size, 0).unwrap();
    for (i, off) in [4096usize, 1 << 20, size - 8192].into_iter().enumerate() {
        let d = random(20 + i as u64, 5000);
        map.write_at(off, &d);
        want[off..off + d.len()].copy_from_slice(&d);
    }
    f.sync_all().unwrap(); // writes back the mapping, then flushes the cache to the remote
    assert_same(
        "remote after FUSE writes + fsync",
        &read_store(url, size, dir.path()),
        &want,
    );
    drop(map);
    drop(f);
    m.child.kill().unwrap();
    let _ = m.child.wait();
    drop(m);

    // (c) NBD export: nbdcopy reads it all, then writes new data; the remote gets every byte.
    let srv = serve(&[url, "--listen", "nbd://127.0.0.1:0"]);
    let nbd = format!("{}/", srv.uri);
    let out = dir.path().join("nbd-out.img");
    run_ok("nbdcopy", &[&nbd, out.to_str().unwrap()]);
    assert_same("nbdcopy read", &std::fs::read(&out).unwrap(), &want);
    let want = random(2, size);
    std::fs::write(&src, &want).unwrap();
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &nbd]);
    drop(srv);
    assert_same(
        "remote after nbdcopy write",
        &read_store(url, size, dir.path()),
        &want,
    );
}

#[test]
fn redis_store_through_every_frontend() {
    let Some(srv) = memsync_testkit::servers::RedisServer::start() else {
        return;
    };
    let size = 8 << 20;
    let url = format!(
        "redis://127.0.0.1:{}?size={size}&chunk=64K&prefix=e2e",
        srv.port()
    );
    remote_store_through_every_frontend(&url, size);
}

#[test]
fn s3_store_through_every_frontend() {
    use memsync_testkit::servers::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};
    let Some(srv) = S3Server::start() else { return };
    let size = 8 << 20;
    let url = format!(
        "s3://e2e/vm?size={size}&chunk=1M&create&endpoint={}&access_key={S3_ACCESS_KEY}&secret_key={S3_SECRET_KEY}",
        srv.endpoint()
    );
    remote_store_through_every_frontend(&url, size);
}

#[test]
fn redis_cluster_store_through_every_frontend() {
    let Some(c) = memsync_testkit::servers::RedisCluster::start(3) else {
        return;
    };
    let size = 8 << 20;
    let url = format!(
        "redis+cluster://{}?size={size}&chunk=64K&prefix=e2e",
        c.hosts()
    );
    remote_store_through_every_frontend(&url, size);
}

/// `memsync info URL | head -0`: a reader that goes away is not a crash.
#[test]
fn closed_stdout_is_not_a_panic() {
    for args in [&["info", "mem:1G"][..], &["stores"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the command writes.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

// ---- memsync sync (issue 13) ----

fn sync_json(args: &[&str]) -> serde_json::Value {
    let o = memsync(&[&["sync", "--json"][..], args].concat());
    assert!(o.status.success(), "sync {args:?}: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).expect("one JSON report")
}

/// Change every kind of thing the issue lists in a copy of `v`.
fn changed(v: &[u8], seed: u64) -> Vec<u8> {
    let mut w = v.to_vec();
    let r = random(seed, 64 << 10);
    w[100] ^= 1; // a single byte
    w[3 << 20..(3 << 20) + 4096].copy_from_slice(&r[..4096]); // a page
    w[5 << 20..(5 << 20) + (64 << 10)].copy_from_slice(&r); // a whole chunk
    let n = w.len();
    w[n - 10000..].fill(0); // zeros at the end
    w
}

#[test]
fn sync_file_to_file_then_an_unchanged_resync_hashes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let old = random(31, 8 << 20);
    std::fs::write(&dst, &old).unwrap();
    let new = changed(&old, 32);
    std::fs::write(&src, &new).unwrap();
    let (s, d) = (
        format!("file:{}", src.display()),
        format!("file:{}", dst.display()),
    );
    let r = sync_json(&[&s, &d]);
    assert_same("after sync", &std::fs::read(&dst).unwrap(), &new);
    // One page + one chunk + the single byte's page + the zeroed tail (sent as zeros).
    assert_eq!(r["updated_chunks"], 4, "{r}");
    assert_eq!(r["data_bytes"], 3 * 4096 + (64 << 10), "{r}");
    std::thread::sleep(std::time::Duration::from_millis(30));
    let r = sync_json(&[&s, &d]);
    let r = if r["src_index"] == "used" {
        r
    } else {
        sync_json(&[&s, &d])
    };
    assert_eq!(
        (
            &r["src_hashed"],
            &r["dst_hashed"],
            &r["src_index"],
            &r["dst_index_used"]
        ),
        (&0.into(), &0.into(), &"used".into(), &true.into()),
        "{r}"
    );
    // A text report by default.
    let o = memsync(&["sync", &s, &d]);
    assert!(
        stdout(&o).contains("0 of 128 chunks differed"),
        "{}",
        stdout(&o)
    );
    // Sizes must match; the error says so.
    let o = memsync(&["sync", &s, "mem:1M"]);
    assert!(
        !o.status.success() && stderr(&o).contains("equal sizes"),
        "{}",
        stderr(&o)
    );
}

use memsync_testkit::netns::Netns;

/// A `memsync sync --listen` peer started with `prefix` (e.g. `ip netns exec B`); returns it and
/// the address it printed.
fn sync_peer(prefix: &[&str], args: &[&str]) -> (Serve, String) {
    use std::io::BufRead;
    let exe = env!("CARGO_BIN_EXE_memsync");
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(["sync", "--listen"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sync peer");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.rsplit(' ').next().unwrap().trim().to_owned();
    assert!(addr.contains(':'), "peer printed {line:?}");
    (
        Serve {
            child,
            uri: addr.clone(),
        },
        addr,
    )
}

#[test]
fn sync_pulls_from_a_peer_source_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let (peer_file, dst) = (dir.path().join("peer.img"), dir.path().join("b.img"));
    let old = random(41, 8 << 20);
    std::fs::write(&dst, &old).unwrap();
    let new = changed(&old, 42);
    std::fs::write(&peer_file, &new).unwrap();
    let (_peer, addr) = sync_peer(
        &[],
        &["127.0.0.1:0", &format!("file:{}", peer_file.display())],
    );
    let (p, d) = (
        format!("memsync://{addr}"),
        format!("file:{}", dst.display()),
    );
    let r = sync_json(&["--compress", &p, &d]);
    assert_same("after pull", &std::fs::read(&dst).unwrap(), &new);
    assert_eq!(r["updated_chunks"], 4, "{r}");
    assert_eq!(r["data_bytes"], 3 * 4096 + (64 << 10), "{r}");
    // The peer's store was not written: a pull never patches the source.
    assert_same("peer file", &std::fs::read(&peer_file).unwrap(), &new);
    let r = sync_json(&[&p, &d]);
    assert_eq!(r["differing_chunks"], 0, "{r}");
}

fn make_certs(dir: &std::path::Path, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

#[test]
fn sync_between_network_namespaces_over_tcp_and_tls() {
    let Some(ns) = Netns::create("sync_between_network_namespaces_over_tcp_and_tls", 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), "peer.test");
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let old = random(41, 8 << 20);
    std::fs::write(&dst, &old).unwrap();
    let dst_url = format!("file:{}", dst.display());
    let src_url = format!("file:{}", src.display());
    let in_a = ["ip", "netns", "exec", ns.a.as_str()];
    let in_b = ["ip", "netns", "exec", ns.b.as_str()];
    let client = |peer: &str| {
        let o = Command::new(in_a[0])
            .args(&in_a[1..])
            .arg(env!("CARGO_BIN_EXE_memsync"))
            .args(["sync", "--json", &src_url, peer])
            .output()
            .unwrap();
        assert!(o.status.success(), "sync to {peer}: {}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).unwrap()
    };
    // TCP.
    let (p, addr) = sync_peer(&in_b, &[&format!("{}:0", ns.b_addr), &dst_url]);
    let new = changed(&old, 42);
    std::fs::write(&src, &new).unwrap();
    let r = client(&format!("memsync://{addr}"));
    assert!(r["wire_sent"].as_u64().unwrap() > 0, "{r}");
    assert_same("over TCP", &std::fs::read(&dst).unwrap(), &new);
    drop(p);
    // TLS, the certificate names the peer; the client resolves nothing (tls-hostname).
    let d = dir.path();
    let (p, addr) = sync_peer(
        &in_b,
        &[
            &format!("{}:0", ns.b_addr),
            &dst_url,
            "--tls-cert",
            &d.join("cert.pem").display().to_string(),
            "--tls-key",
            &d.join("key.pem").display().to_string(),
        ],
    );
    let newer = changed(&new, 43);
    std::fs::write(&src, &newer).unwrap();
    let url = format!(
        "memsyncs://{addr}?tls-ca={}&tls-hostname=peer.test",
        d.join("ca.pem").display()
    );
    let r = client(&url);
    assert!(r["updated_chunks"].as_u64().unwrap() > 0, "{r}");
    assert_same("over TLS", &std::fs::read(&dst).unwrap(), &newer);
    // A client that does not trust the peer's certificate gets an error, not data.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path(), "peer.test");
    let o = Command::new(in_a[0])
        .args(&in_a[1..])
        .arg(env!("CARGO_BIN_EXE_memsync"))
        .args(["sync", &src_url])
        .arg(format!(
            "memsyncs://{addr}?tls-ca={}&tls-hostname=peer.test",
            other.path().join("ca.pem").display()
        ))
        .output()
        .unwrap();
    assert!(!o.status.success(), "an untrusted peer was accepted");
    drop(p);
}

#[test]
fn sync_cut_by_killing_the_proxy_leaves_chunks_old_or_new_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let size = 16 << 20;
    let old = random(51, size);
    let new = random(52, size);
    std::fs::write(&dst, &old).unwrap();
    std::fs::write(&src, &new).unwrap();
    let (_peer, addr) = sync_peer(&[], &["127.0.0.1:0", &format!("file:{}", dst.display())]);
    // 32 Mbit/s: the 16 MiB take about 4 s, the cut comes after 1.
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["proxy", "--to", &addr, "--bandwidth", "32M"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let paddr = line.split_whitespace().nth(2).unwrap().to_owned();
    let src_url = format!("file:{}", src.display());
    let client = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["sync", "--json", &src_url, &format!("memsync://{paddr}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cut once the peer has written some chunks (not at a fixed time: the machine is shared).
    let c = 64 << 10;
    let some_new = || {
        let got = std::fs::read(&dst).unwrap();
        (0..size / c).any(|i| got[i * c..(i + 1) * c] == new[i * c..(i + 1) * c])
    };
    while !some_new() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    let o = client.wait_with_output().unwrap();
    assert!(!o.status.success(), "the cut must fail the sync");
    assert!(stderr(&o).contains("run it again"), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let in_list = |key: &str, i: u64| {
        r[key]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| match x.as_array() {
                Some(p) => p[0].as_u64().unwrap() <= i && i < p[1].as_u64().unwrap(),
                None => x.as_u64() == Some(i),
            })
    };
    // Give the peer a moment to finish what arrived whole.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let got = std::fs::read(&dst).unwrap();
    let (mut n_old, mut n_new) = (0, 0);
    for i in 0..(size / c) as u64 {
        let s = i as usize * c;
        let (is_old, is_new) = (
            got[s..s + c] == old[s..s + c],
            got[s..s + c] == new[s..s + c],
        );
        assert!(is_old || is_new, "chunk {i} is neither old nor new");
        if !in_list("pending_chunks", i) {
            assert!(is_new, "chunk {i} reported updated but is not new");
        } else if !in_list("uncertain_chunks", i) {
            assert!(is_old, "chunk {i} reported pending but is not old");
        }
        n_old += is_old as u32;
        n_new += is_new as u32;
    }
    assert!(
        n_old > 0 && n_new > 0,
        "old {n_old}, new {n_new}: the cut missed the transfer"
    );
    // The rerun, directly to the peer, sends the rest.
    let r = sync_json(&[&src_url, &format!("memsync://{addr}")]);
    assert_eq!(r["updated_chunks"], n_old, "{r}");
    assert_same("after the rerun", &std::fs::read(&dst).unwrap(), &new);
}

// ---------------------------------------------------------------- NBD peers and listeners

/// `memsync checksum` of an NBD export whose server answers reads with no data (or too little,
/// or overlapping chunks) fails instead of hashing whatever the buffer held.
#[test]
fn checksum_fails_on_nbd_servers_that_send_no_data() {
    use memsync_testkit::nbd::{Bad, BrokenNbd};
    let srv = BrokenNbd::start().unwrap();
    let o = memsync(&["checksum", &srv.url(Bad::Good)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for bad in [
        Bad::NoData,
        Bad::HalfData,
        Bad::Overlap,
        Bad::SimpleToRead,
        Bad::BlockStatusToRead,
    ] {
        let o = memsync(&["checksum", &srv.url(bad)]);
        assert!(
            !o.status.success(),
            "checksum of {bad:?} succeeded: {}",
            stdout(&o)
        );
        assert!(stderr(&o).starts_with("memsync: error:"), "{}", stderr(&o));
    }
}

/// Runs `memsync ARGS` until it prints its first line on stdout (then it is left running, in
/// the returned guard) or exits (then its stderr is the error).
fn start_or_exit(args: &[&str]) -> Result<Serve, String> {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run memsync");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(line) => Ok(Serve { child, uri: line }),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let mut e = String::new();
            child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            let status = child.wait().unwrap();
            assert!(!status.success(), "memsync {args:?} printed nothing: {e}");
            Err(e)
        }
        Err(_) => {
            let _ = child.kill();
            panic!("memsync {args:?} neither printed nor exited");
        }
    }
}

/// `serve --listen` and `mount --nbd` on a unix socket path: a regular file there is refused
/// and kept, so is a socket somebody listens on; a stale socket is replaced.
#[test]
fn nbd_unix_listeners_replace_only_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let cmds: [(&str, Vec<String>); 2] = [
        (
            "serve",
            vec!["serve".into(), "mem:1M".into(), "--listen".into()],
        ),
        (
            "mount",
            vec![
                "mount".into(),
                "mem:1M".into(),
                "--cache".into(),
                dir.path().join("cache").display().to_string(),
                "--nbd".into(),
            ],
        ),
    ];
    for (name, prefix) in &cmds {
        let run = |path: &std::path::Path| {
            let url = format!("nbd+unix:///?socket={}", path.display());
            let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
            args.push(&url);
            start_or_exit(&args)
        };
        let file = dir.path().join(format!("{name}-file"));
        std::fs::write(&file, b"precious").unwrap();
        let e = run(&file).err().expect("a regular file must be refused");
        assert!(e.contains("not a socket"), "{name}: {e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious", "{name}");

        let live = dir.path().join(format!("{name}-live.sock"));
        let l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = run(&live).err().expect("a live socket must be refused");
        assert!(e.contains("a server is listening"), "{name}: {e}");
        let c = std::os::unix::net::UnixStream::connect(&live).unwrap();
        l.accept().unwrap();
        drop(c);

        let stale = dir.path().join(format!("{name}-stale.sock"));
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let s = run(&stale).unwrap_or_else(|e| panic!("{name}: stale socket: {e}"));
        assert!(s.uri.contains("nbd+unix://"), "{name}: {}", s.uri);
        run_ok(
            "nbdinfo",
            &[&format!("nbd+unix:///?socket={}", stale.display())],
        );
    }
}

/// `mount --nbd nbd://HOST` without a port listens on 10809, like `serve` (an address of its
/// own on loopback, so that nothing else here is on that port).
#[test]
fn mount_nbd_without_a_port_listens_on_10809() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let s = start_or_exit(&[
        "mount",
        "mem:1M",
        "--cache",
        cache.to_str().unwrap(),
        "--nbd",
        "nbd://127.0.0.3",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.uri, "memsync: serving nbd://127.0.0.3:10809");
    run_ok("nbdinfo", &["nbd://127.0.0.3:10809"]);
}

/// A process that writes random 4 KiB pages into `file` until killed (one thread, so SIGSTOP
/// stops every write). Started with `prefix` (e.g. `ip netns exec A`).
struct PageWriter(std::process::Child);

impl PageWriter {
    fn start(prefix: &[&str], file: &std::path::Path) -> PageWriter {
        let script = "import os, random, sys, time\n\
            fd = os.open(sys.argv[1], os.O_WRONLY)\n\
            pages = os.fstat(fd).st_size // 4096\n\
            r = random.Random(5)\n\
            print('ready', flush=True)\n\
            while True:\n\
            \x20   os.pwrite(fd, os.urandom(4096), r.randrange(pages) * 4096)\n\
            \x20   time.sleep(0.0002)\n";
        Self::spawn(prefix, script, file)
    }

    /// One that writes through a shared mapping of `file` instead (the pages reach the file's
    /// store only when the kernel writes them back).
    fn start_mapped(file: &std::path::Path) -> PageWriter {
        let script = "import mmap, os, random, sys, time\n\
            fd = os.open(sys.argv[1], os.O_RDWR)\n\
            size = os.fstat(fd).st_size\n\
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n\
            r = random.Random(6)\n\
            print('ready', flush=True)\n\
            while True:\n\
            \x20   o = r.randrange(size // 4096) * 4096\n\
            \x20   m[o:o + 4096] = os.urandom(4096)\n\
            \x20   time.sleep(0.0002)\n";
        Self::spawn(&[], script, file)
    }

    fn spawn(prefix: &[&str], script: &str, file: &std::path::Path) -> PageWriter {
        use std::io::BufRead;
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg("python3");
                c
            }
            None => Command::new("python3"),
        };
        let mut child = cmd
            .args(["-c", script])
            .arg(file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        PageWriter(child)
    }

    fn state(&self) -> char {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        s.rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .chars()
            .next()
            .unwrap()
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `memsync migrate --listen` destination started with `prefix`; returns it and its address.
fn migrate_dest(prefix: &[&str], args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let exe = env!("CARGO_BIN_EXE_memsync");
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(["migrate", "--json", "--listen"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the migration destination");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.rsplit(' ').next().unwrap().trim().to_owned();
    assert!(addr.contains(':'), "destination printed {line:?}");
    // Keep the rest of stdout for the report.
    child.stdout = None;
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    (child, addr)
}

/// Migrate a file that another process keeps writing (suspended by SIGSTOP at the switch-over),
/// in every mode; the destination file ends equal to the source's at the stop. `src_prefix`
/// and `dst_prefix` run each side (e.g. in a network namespace); `listen` is the destination's
/// address.
fn migrate_a_written_file(src_prefix: &[&str], dst_prefix: &[&str], listen: &str) {
    let dir = tempfile::tempdir().unwrap();
    // The mode, a --verify choice, and what the report must say: post-copy or not, and how
    // changes were verified (the CLI finds them by hashing).
    for (mode, verify, postcopy, verified) in [
        ("precopy", None, false, Some("suspended")),
        ("precopy", Some("after-resume"), true, Some("after-resume")),
        ("postcopy", None, true, None),
        ("hybrid", None, true, Some("after-resume")),
    ] {
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        std::fs::write(&src, random(61, 8 << 20)).unwrap();
        std::fs::write(&dst, vec![0x55u8; 8 << 20]).unwrap();
        let writer = PageWriter::start(src_prefix, &src);
        let (mut dest, addr) =
            migrate_dest(dst_prefix, &[listen, &format!("file:{}", dst.display())]);
        let o = Command::new(
            src_prefix
                .first()
                .copied()
                .unwrap_or(env!("CARGO_BIN_EXE_memsync")),
        )
        .args(if src_prefix.is_empty() {
            &[][..]
        } else {
            &src_prefix[1..]
        })
        .args(if src_prefix.is_empty() {
            vec![]
        } else {
            vec![env!("CARGO_BIN_EXE_memsync")]
        })
        .args([
            "migrate",
            "--json",
            "--mode",
            mode,
            "--max-downtime",
            "50ms",
        ])
        .args(verify.map(|v| ["--verify", v]).iter().flatten())
        .arg("--pid")
        .arg(writer.0.id().to_string())
        .arg(format!("file:{}", src.display()))
        .arg(format!("migrate://{addr}"))
        .output()
        .unwrap();
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(r["mode"], mode, "{r}");
        // Pre-copy verifies while the application is stopped and ends with a stop-and-copy
        // (the destination is on its own at the resume); after-resume verification is
        // post-copy (SAME or the chunk again).
        assert_eq!(r["postcopy"], postcopy, "{mode} {verify:?}: {r}");
        assert_eq!(r["verify"].as_str(), verified, "{mode} {verify:?}: {r}");
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
        let st = dest.wait().unwrap();
        assert!(st.success(), "{mode}: destination {st}");
        // Stopped at the switch-over, and still stopped: its file is what was migrated.
        assert_eq!(writer.state(), 'T', "{mode}");
        assert_same(
            mode,
            &std::fs::read(&dst).unwrap(),
            &std::fs::read(&src).unwrap(),
        );
    }
}

/// Issue 12, kind (b): the file of a managed mount that another program maps, migrated live
/// in every mode by the mount itself (`mount --migrate-to`, started by SIGUSR2), with the
/// mount's own write tracking (nothing hashed). The program writes through a shared mapping
/// until it is suspended for the switch-over; the destination then holds exactly what it wrote,
/// including pages still dirty in the kernel's page cache when the migration began.
#[test]
fn mount_migrate_to_moves_a_mapped_file_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8usize << 20;
    for mode in ["precopy", "postcopy", "hybrid"] {
        let d = dir.path().join(mode);
        let mnt = d.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let (img, dst, pidfile) = (d.join("remote.img"), d.join("dst.img"), d.join("app.pid"));
        let initial = random(71, size);
        std::fs::write(&img, &initial).unwrap();
        std::fs::write(&dst, vec![0x55u8; size]).unwrap();
        let (mut dest, addr) =
            migrate_dest(&[], &["127.0.0.1:0", &format!("file:{}", dst.display())]);
        let suspend = format!("kill -STOP $(cat {})", pidfile.display());
        let resume = format!("kill -CONT $(cat {})", pidfile.display());
        let mut m = mount_proc_with(
            &format!("file:{}", img.display()),
            &d.join("cache"),
            &mnt,
            &[
                "--migrate-to",
                &format!("migrate://{addr}"),
                "--migrate-mode",
                mode,
                "--migrate-suspend",
                &suspend,
                "--migrate-resume",
                &resume,
                "--migrate-max-downtime",
                "50ms",
                "--migrate-json",
            ],
        );
        let writer = PageWriter::start_mapped(&m.file);
        std::fs::write(&pidfile, writer.0.id().to_string()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        run_ok("kill", &["-USR2", &m.child.id().to_string()]);
        let r = next_json(&m);
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["postcopy"], mode != "precopy", "{r}");
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
        let st = dest.wait().unwrap();
        assert!(st.success(), "{mode}: destination {st}");
        // Suspended at the switch-over and still suspended: the mount's file is what it wrote.
        assert_eq!(writer.state(), 'T', "{mode}");
        let wrote = std::fs::read(&m.file).unwrap();
        assert_ne!(wrote, initial, "{mode}: the program wrote nothing");
        assert_same(mode, &std::fs::read(&dst).unwrap(), &wrote);
        // The program lets go of its mapping before the mount stops.
        drop(writer);
        let err = stop_mount(&mut m);
        assert!(err.contains("memsync: migrated"), "{mode}: {err}");
    }
}

#[test]
fn migrate_a_file_another_process_writes() {
    migrate_a_written_file(&[], &[], "127.0.0.1:0");
}

#[test]
fn migrate_between_network_namespaces() {
    let Some(ns) = Netns::create("migrate_between_network_namespaces", 1) else {
        return;
    };
    let listen = format!("{}:0", ns.b_addr);
    migrate_a_written_file(&Netns::exec_in(&ns.a), &Netns::exec_in(&ns.b), &listen);
}

/// An abort before the switch-over (the destination refuses: another size) leaves the
/// application running and its file unchanged by memsync.
#[test]
fn migrate_abort_leaves_the_application_running() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    std::fs::write(&src, random(62, 4 << 20)).unwrap();
    std::fs::write(&dst, vec![0u8; 2 << 20]).unwrap();
    let writer = PageWriter::start(&[], &src);
    let (mut dest, addr) = migrate_dest(&[], &["127.0.0.1:0", &format!("file:{}", dst.display())]);
    let o = memsync(&[
        "migrate",
        "--pid",
        &writer.0.id().to_string(),
        &format!("file:{}", src.display()),
        &format!("migrate://{addr}"),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("aborted") && e.contains("equal sizes"), "{e}");
    assert!(!dest.wait().unwrap().success());
    assert_ne!(writer.state(), 'T');
    // Still writing.
    let before = std::fs::read(&src).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_ne!(before, std::fs::read(&src).unwrap());
}

/// Post-copy through the CLI: the destination exports the migrating store over NBD when it
/// takes over, and a reader (nbdcopy) there gets the source's bytes, waiting for missing
/// chunks instead of reading stale ones.
#[test]
fn migrate_postcopy_to_an_nbd_export() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, out) = (
        dir.path().join("src.img"),
        dir.path().join("dst.img"),
        dir.path().join("out.img"),
    );
    std::fs::write(&src, random(63, 16 << 20)).unwrap();
    std::fs::write(&dst, vec![0x55u8; 16 << 20]).unwrap();
    let writer = PageWriter::start(&[], &src);
    let mut dest = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["migrate", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
        .arg(format!("file:{}", dst.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(dest.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.rsplit(' ').next().unwrap().to_owned();
    let src_url = format!("file:{}", src.display());
    let pid = writer.0.id().to_string();
    let source = std::thread::spawn(move || {
        memsync(&[
            "migrate",
            "--json",
            "--mode",
            "postcopy",
            "--pid",
            &pid,
            &src_url,
            &format!("migrate://{addr}"),
        ])
    });
    let nbd = loop {
        let l = lines.next().expect("the destination's output").unwrap();
        if let Some(a) = l.strip_prefix("memsync: NBD export on ") {
            break a.to_owned();
        }
    };
    let o = Command::new("nbdcopy")
        .arg(format!("nbd://{nbd}"))
        .arg(&out)
        .output()
        .expect("nbdcopy");
    assert!(o.status.success(), "nbdcopy: {}", stderr(&o));
    let o = source.join().unwrap();
    assert!(o.status.success(), "source: {}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["postcopy"], true, "{r}");
    assert_eq!(writer.state(), 'T');
    let want = std::fs::read(&src).unwrap();
    assert_same("read over NBD", &std::fs::read(&out).unwrap(), &want);
    // The destination keeps exporting until told to stop; its file is complete.
    let _ = Command::new("kill").arg(dest.id().to_string()).status();
    let st = dest.wait().unwrap();
    assert!(st.success(), "destination: {st}");
    assert_same("destination file", &std::fs::read(&dst).unwrap(), &want);
}

/// `memsync dsm`: two nodes add to one counter in the shared region; both print the exact sum,
/// and both stop cleanly on SIGTERM.
#[test]
fn dsm_two_nodes_count_exactly() {
    use std::io::BufRead;
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let mut kids: Vec<_> = (0..2)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_memsync"))
                .args(["dsm", "--id", &i.to_string(), "--peers", &peers])
                .args(["--manager", "fixed", "--size", "64K", "--counter", "1000"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for k in &mut kids {
        let out = std::io::BufReader::new(k.stdout.take().unwrap());
        let line = out
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("counter "))
            .expect("no counter line");
        assert_eq!(line, "counter 2000");
    }
    for k in &mut kids {
        let st = Command::new("kill")
            .args(["-TERM", &k.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    for k in &mut kids {
        let st = k.wait().unwrap();
        assert!(st.success(), "{st:?}");
    }
}
