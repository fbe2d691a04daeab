//! `memsync uffd-handler` against a process that plays Firecracker exactly: anonymous guest
//! memory in two regions, a userfaultfd with EVENT_REMOVE (non-blocking, not user-mode-only,
//! MISSING mode), one message with the JSON regions and the descriptor, the socket kept open.
//! The Firecracker side runs as a child of this test binary so that it can exit under the
//! handler (as a VMM does), and compares what it reads with the snapshot file.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use memsync_sys::{Advice, Features, MapOptions, Mapping, OpenFlags, RegisterMode, Uffd, send_fds};
use memsync_testkit::child::{is_child, run_test_binary};
use rand::{Rng, SeedableRng};

const CHILD: &str = "MEMSYNC_VMM_CHILD";
const REGION: usize = 8 << 20;

/// The handler as a child process, its output collected.
struct HandlerProc {
    child: Child,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

impl HandlerProc {
    fn start(socket: &Path, store: &str, extra: &[&str]) -> Self {
        // A socket file left by an earlier handler would look like this one listening.
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new(env!("CARGO_BIN_EXE_memsync"))
            .arg("uffd-handler")
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .arg(store)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run memsync uffd-handler");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("the handler exited before listening: {st}: {}", {
                    let e = err.join().unwrap_or_default();
                    String::from_utf8_lossy(&e).into_owned()
                });
            }
            assert!(Instant::now() < deadline, "the handler did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, out, err }
    }

    /// Waits for the handler to exit by itself: (success, stdout, stderr).
    fn wait(mut self) -> (bool, String, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let e = self.err.join().unwrap_or_default();
                panic!("the handler did not stop: {}", String::from_utf8_lossy(&e));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let o = self.out.join().unwrap_or_default();
        let e = self.err.join().unwrap_or_default();
        (
            st.success(),
            String::from_utf8_lossy(&o).into_owned(),
            String::from_utf8_lossy(&e).into_owned(),
        )
    }
}

/// A Firecracker-made userfaultfd: EVENT_REMOVE, non-blocking, not user-mode-only.
fn vmm_uffd() -> Uffd {
    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    })
    .expect("a full userfaultfd (Firecracker's kind: run as root or with /dev/userfaultfd access)");
    uffd.api(Features::EVENT_REMOVE).unwrap();
    uffd
}

fn region_json(maps: &[&Mapping], page: usize) -> String {
    let mut off = 0;
    let items: Vec<String> = maps
        .iter()
        .map(|m| {
            let s = format!(
                r#"{{"base_host_virt_addr":{},"size":{},"offset":{off},"page_size":{page},"page_size_kib":{page}}}"#,
                m.addr(),
                m.len()
            );
            off += m.len();
            s
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn connect(socket: &Path, json: &str, uffd: &Uffd) -> UnixStream {
    // The socket file exists from the handler's bind(2), a moment before its listen(2): a
    // connect in between is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connecting to {}: {e}", socket.display()),
        }
    };
    send_fds(&s, json.as_bytes(), &[uffd.as_fd()]).unwrap();
    s
}

/// The Firecracker side: `mode` is "full" (threads, BLAKE3 of everything, balloon, a second
/// message), "exit" (leave after the first faults) or "huge" (2 MiB hugetlb pages).
fn firecracker(socket: &Path, snapshot: &Path, mode: &str) {
    let snap = std::fs::read(snapshot).unwrap();
    let huge = mode == "huge";
    let page = if huge { 2 << 20 } else { 4096 };
    let opts = MapOptions {
        hugetlb: huge,
        align: 2 << 20,
        ..MapOptions::default()
    };
    let a = Mapping::anonymous_with(REGION, opts).unwrap();
    let b = Mapping::anonymous_with(REGION, opts).unwrap();
    let uffd = vmm_uffd();
    uffd.register(&a, RegisterMode::MISSING).unwrap();
    uffd.register(&b, RegisterMode::MISSING).unwrap();
    let sock = connect(socket, &region_json(&[&a, &b], page), &uffd);
    let regions = [(&a, 0usize), (&b, REGION)];
    if mode == "sigbus" {
        // The store is gone: after the handler's deadline the page is poisoned and this
        // access raises SIGBUS (the parent checks that this process died of it).
        let mut buf = vec![0u8; 4096];
        b.read_at(4096, &mut buf);
        panic!("read a page the store could not deliver: {:?}", &buf[..8]);
    }
    if mode == "exit" {
        let mut buf = vec![0u8; 4096];
        a.read_at(0, &mut buf);
        assert_eq!(buf, snap[..4096]);
        // The VMM dies with the handler still pulling: it must stop cleanly.
        std::process::exit(0);
    }
    // Several vCPUs touch random pages at once.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let snap = &snap;
            let regions = &regions;
            s.spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                let mut buf = vec![0u8; 4096];
                for _ in 0..200 {
                    let (m, base) = regions[rng.random_range(0..2)];
                    let off = rng.random_range(0..REGION / 4096) * 4096;
                    m.read_at(off, &mut buf);
                    assert_eq!(
                        buf,
                        snap[base + off..base + off + 4096],
                        "page at {}",
                        base + off
                    );
                }
            });
        }
    });
    let mut all = vec![0u8; 2 * REGION];
    a.read_at(0, &mut all[..REGION]);
    b.read_at(0, &mut all[REGION..]);
    assert_eq!(
        blake3::hash(&all),
        blake3::hash(&snap),
        "guest memory differs from the snapshot"
    );
    if huge {
        return;
    }
    // Balloon: the VMM drops a range from another thread (its own madvise, which waits for
    // the handler to read the REMOVE event); the guest then reads zeros there, and only there.
    let (off, len) = (REGION / 2 + 4096, 20 * 4096);
    std::thread::scope(|s| {
        s.spawn(|| b.advise(off, len, Advice::DontNeed).unwrap());
    });
    let mut got = vec![0u8; len + 2 * 4096];
    b.read_at(off - 4096, &mut got);
    assert_eq!(
        got[..4096],
        snap[REGION + off - 4096..REGION + off],
        "before"
    );
    assert!(
        got[4096..4096 + len].iter().all(|&x| x == 0),
        "removed pages must read zeros"
    );
    assert_eq!(
        got[4096 + len..],
        snap[REGION + off + len..REGION + off + len + 4096],
        "after"
    );
    // A second message on the handshake socket is refused; serving goes on.
    send_fds(&sock, b"[]", &[uffd.as_fd()]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut x = vec![0u8; 4096];
    b.read_at(REGION - 4096, &mut x);
    assert_eq!(x, snap[2 * REGION - 4096..]);
    drop(sock);
}

#[test]
fn vmm_child_firecracker() {
    for mode in ["full", "exit", "huge", "sigbus"] {
        if is_child(CHILD, mode) {
            let socket = PathBuf::from(std::env::var("VMM_SOCKET").unwrap());
            let snap = PathBuf::from(std::env::var("VMM_SNAPSHOT").unwrap());
            firecracker(&socket, &snap, mode);
        }
    }
}

fn snapshot(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = super::super::random(1717, 2 * REGION);
    // Some zero pages, as guest memory has.
    data[REGION..REGION + (1 << 20)].fill(0);
    let p = dir.join("mem.snap");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn run_vmm(mode: &str, socket: &Path, snap: &Path) {
    let out = run_test_binary(
        &std::env::current_exe().unwrap(),
        "vmm::firecracker::vmm_child_firecracker",
        Duration::from_secs(120),
        |c| {
            c.env(CHILD, mode)
                .env("VMM_SOCKET", socket)
                .env("VMM_SNAPSHOT", snap);
        },
    );
    assert!(
        out.status.success(),
        "the Firecracker side failed: {}",
        memsync_testkit::child::describe(&out)
    );
}

fn serve_and_check(store: &str, extra: &[&str], dir: &Path, snap: &Path, mode: &str) -> String {
    let socket = dir.join(format!("fc-{mode}.sock"));
    let h = HandlerProc::start(&socket, store, extra);
    run_vmm(mode, &socket, snap);
    let (ok, out, err) = h.wait();
    assert!(ok, "the handler failed: {out}{err}");
    assert!(out.contains("the VMM exited"), "{out}{err}");
    out
}

#[test]
fn uffd_handler_serves_firecracker_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    let out = serve_and_check(
        &format!("file:{}", snap.display()),
        &[],
        tmp.path(),
        &snap,
        "full",
    );
    assert!(out.contains("1 refused messages"), "{out}");
    assert!(!out.contains(" 0 REMOVE events"), "{out}");
    assert!(out.contains(" 0 chunk errors"), "{out}");
}

/// A sparse snapshot file: the chunks wholly in its holes are zero-filled without a read (the
/// summary counts them, the store's `--metrics` show their bytes never read), a chunk a hole
/// covers only in part is read, and the guest sees the snapshot exactly.
#[test]
fn uffd_handler_zero_fills_the_holes_of_a_sparse_snapshot_file() {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let mut data = super::super::random(1717, 2 * REGION);
    // Holes: 2 MiB of region a (32 chunks), the first MiB of region b (16), and 128 KiB that
    // start a page into a chunk (one whole chunk, two partial ones).
    let holes = [
        (2 << 20, 2 << 20),
        (REGION, 1 << 20),
        (REGION + (6 << 20) + 4096, 128 << 10),
    ];
    let zero_chunks = 32 + 16 + 1;
    for &(off, len) in &holes {
        data[off..off + len].fill(0);
    }
    let snap = tmp.path().join("sparse.snap");
    let f = std::fs::File::create(&snap).unwrap();
    f.set_len(data.len() as u64).unwrap();
    let mut pos = 0;
    for &(off, len) in &holes {
        f.write_all_at(&data[pos..off], pos as u64).unwrap();
        pos = off + len;
    }
    f.write_all_at(&data[pos..], pos as u64).unwrap();
    drop(f);
    let metrics = tmp.path().join("metrics.prom");
    let out = serve_and_check(
        &format!("file:{}", snap.display()),
        &["--metrics", metrics.to_str().unwrap()],
        tmp.path(),
        &snap,
        "full",
    );
    assert!(
        out.contains(&format!("; {zero_chunks} zero-filled without a read)")),
        "{out}"
    );
    assert!(out.contains(" 0 chunk errors"), "{out}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    let read: usize = prom
        .lines()
        .find(|l| l.starts_with("memsync_store_bytes_total{") && l.contains(r#"op="read""#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bytes read in the metrics: {prom}"));
    // Every other chunk is read once, and the balloon's two partly removed chunks again.
    let data_bytes = 2 * REGION - zero_chunks * CHUNK;
    assert!(
        (data_bytes..=data_bytes + 2 * CHUNK).contains(&read),
        "{read} bytes read, {data_bytes} bytes of data chunks: {prom}"
    );
}

/// One handler process, three VMMs restored from one snapshot at once (a fleet of microVMs):
/// each gets its own handler, each reads the snapshot exactly (BLAKE3 of all its memory), and
/// the process ends when the last one exited.
#[test]
fn uffd_handler_serves_several_vmms_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    let socket = tmp.path().join("fc-many.sock");
    let h = HandlerProc::start(
        &socket,
        &format!("file:{}", snap.display()),
        &["--vmms", "3"],
    );
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| run_vmm("full", &socket, &snap));
        }
    });
    let (ok, out, err) = h.wait();
    assert!(ok, "the handler failed: {out}{err}");
    assert_eq!(out.matches("the VMM exited").count(), 3, "{out}{err}");
    assert_eq!(out.matches(" 0 chunk errors").count(), 3, "{out}{err}");
    assert!(out.contains("served 3 VMMs, 0 failed"), "{out}{err}");
    // Three different VMM processes.
    let pids: std::collections::HashSet<&str> = out
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next())
        .collect();
    assert_eq!(pids.len(), 3, "{out}");
}

/// A VMM whose handshake is bad is reported and refused; the VMMs beside it are served.
#[test]
fn uffd_handler_refuses_one_bad_vmm_and_serves_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    let socket = tmp.path().join("fc-bad.sock");
    let h = HandlerProc::start(
        &socket,
        &format!("file:{}", snap.display()),
        &["--vmms", "2"],
    );
    {
        let uffd = vmm_uffd();
        let s = connect(&socket, "[", &uffd);
        drop(s);
    }
    run_vmm("full", &socket, &snap);
    let (ok, out, err) = h.wait();
    assert!(!ok, "one VMM failed, so must the command: {out}{err}");
    assert_eq!(out.matches("the VMM exited").count(), 1, "{out}{err}");
    assert!(err.contains("could not be served"), "{err}");
    assert!(err.contains("1 of 2 VMMs could not be served"), "{err}");
}

#[test]
fn uffd_handler_stops_cleanly_when_the_vmm_exits_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    serve_and_check(
        &format!("file:{}", snap.display()),
        &["--chunk", "4K"],
        tmp.path(),
        &snap,
        "exit",
    );
}

#[test]
fn uffd_handler_serves_hugetlb_guest_memory() {
    let hp = match memsync_testkit::hugepages::HugePages::reserve(8) {
        Ok(g) => g,
        Err(e) => {
            memsync_testkit::skip::skip("uffd_handler_serves_hugetlb_guest_memory", &e);
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    serve_and_check(
        &format!("file:{}", snap.display()),
        &[],
        tmp.path(),
        &snap,
        "huge",
    );
    drop(hp);
}

#[test]
fn uffd_handler_serves_firecracker_from_redis_and_a_cache_over_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    // A managed cache whose remote is an NBD export of the snapshot.
    let sock = tmp.path().join("nbd.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let _srv = super::super::serve(&[&format!("file:{}", snap.display()), "--listen", &url]);
    let cache = tmp.path().join("cache");
    serve_and_check(
        &url,
        &["--cache", cache.to_str().unwrap()],
        tmp.path(),
        &snap,
        "full",
    );
    let Some(redis) = memsync_testkit::servers::RedisServer::start() else {
        return;
    };
    let rurl = format!(
        "redis://127.0.0.1:{}?size={}&chunk=64K",
        redis.port(),
        2 * REGION
    );
    let o = super::super::memsync(&["copy", &format!("file:{}", snap.display()), &rurl]);
    assert!(o.status.success(), "{}", super::super::stderr(&o));
    serve_and_check(&rurl, &[], tmp.path(), &snap, "full");
}

/// A store that fails until the deadline: the handler reports it and the vCPU touching the
/// chunk gets SIGBUS (UFFDIO_POISON), never other bytes.
#[test]
fn uffd_handler_poisons_what_the_store_cannot_deliver() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot(tmp.path());
    let sock = tmp.path().join("nbd.sock");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let mut srv = super::super::serve(&[&format!("file:{}", snap.display()), "--listen", &url]);
    let socket = tmp.path().join("fc-sigbus.sock");
    let h = HandlerProc::start(&socket, &url, &["--deadline", "1", "--no-pull"]);
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let out = run_test_binary(
        &std::env::current_exe().unwrap(),
        "vmm::firecracker::vmm_child_firecracker",
        Duration::from_secs(120),
        |c| {
            c.env(CHILD, "sigbus")
                .env("VMM_SOCKET", &socket)
                .env("VMM_SNAPSHOT", &snap);
        },
    );
    assert_eq!(
        out.status.signal(),
        Some(7),
        "the vCPU must get SIGBUS: {}",
        memsync_testkit::child::describe(&out)
    );
    let (ok, out, err) = h.wait();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("the VMM exited") && out.contains(" 1 chunk errors"),
        "{out}{err}"
    );
    assert!(err.contains("chunk error"), "{err}");
}

/// Bad handshakes end the handler with one clear line, never a crash; the VMM here is this
/// process.
#[test]
fn uffd_handler_refuses_bad_handshakes_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("mem:{}", 2 * REGION);
    let m = Mapping::anonymous_with(
        REGION,
        MapOptions {
            align: 2 << 20,
            ..MapOptions::default()
        },
    )
    .unwrap();
    let json_at = |addr: usize, size: usize, off: usize| {
        format!(
            r#"[{{"base_host_virt_addr":{addr},"size":{size},"offset":{off},"page_size":4096}}]"#
        )
    };
    let two_overlapping = format!(
        r#"[{{"base_host_virt_addr":{a},"size":8192,"offset":0,"page_size":4096}},{{"base_host_virt_addr":{b},"size":8192,"offset":8192,"page_size":4096}}]"#,
        a = m.addr(),
        b = m.addr() + 4096
    );
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "[{\"base_host_virt_addr\":".into(),
            &store,
            "not valid JSON",
        ),
        (two_overlapping, &store, "overlap"),
        (json_at(m.addr(), REGION, 0), "mem:1M", "the store only"),
        (
            json_at(m.addr(), REGION + 4096 * 16, 0),
            &store,
            "not mapped",
        ),
    ];
    for (k, (json, store, want)) in cases.iter().enumerate() {
        let socket = tmp.path().join(format!("bad{k}.sock"));
        let h = HandlerProc::start(&socket, store, &[]);
        let uffd = vmm_uffd();
        let _s = connect(&socket, json, &uffd);
        let (ok, out, err) = h.wait();
        assert!(!ok, "case {k} was accepted: {out}");
        assert!(err.contains(want), "case {k}: want {want:?} in: {err}");
        let errs = err.lines().filter(|l| !l.contains("listening on")).count();
        assert_eq!(errs, 1, "one line: {err}");
    }
    // No descriptor at all.
    let socket = tmp.path().join("nofd.sock");
    let h = HandlerProc::start(&socket, &store, &[]);
    let s = UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut &s, json_at(m.addr(), REGION, 0).as_bytes()).unwrap();
    let (ok, _, err) = h.wait();
    assert!(!ok && err.contains("no userfaultfd"), "{err}");
}
