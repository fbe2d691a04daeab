//! memsync-nbd against real peers: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh (libnbd), nbdkit
//! and qemu-nbd. Each test starts its own in-process server on a free port and a unix socket in
//! a temp dir; every child process is killed when its guard drops, and every wait has a limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use memsync_core::{Bytes, DynStore, Store, StoreExt};
use memsync_local::MemStore;
use memsync_nbd::proto::*;
use memsync_nbd::{ClientConfig, Export, NbdAddr, NbdStore, Server, ServerConfig, TlsMode};
use memsync_testkit::contract::{self, ContractOpts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

struct TestServer {
    server: Server,
    port: u16,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn tcp(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
    fn unix(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

async fn start(cfg: ServerConfig) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = Server::new(cfg).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    server.listen_tcp(l);
    server.listen_unix(tokio::net::UnixListener::bind(&sock).unwrap());
    TestServer {
        server,
        port,
        sock,
        _dir: dir,
    }
}

fn mem(size: u64) -> DynStore {
    Arc::new(MemStore::new(size))
}

async fn start_mem(size: u64) -> (TestServer, DynStore) {
    let store = mem(size);
    let s = start(ServerConfig::new(vec![Export::new("", store.clone())])).await;
    (s, store)
}

/// Run a command to completion (killed after [`LIMIT`]); returns (success, stdout, stderr).
async fn run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(prog);
    if prog == "nbdsh" {
        // nbdsh runs `python3` from PATH; the nbd module is Debian's, for /usr/bin/python3.
        cmd.env(
            "PATH",
            format!(
                "/usr/bin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{prog} must be installed (scripts/setup.sh): {e}"));
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{prog} {args:?} timed out"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ok(prog: &str, args: &[&str]) -> String {
    let (success, out, err) = run(prog, args).await;
    assert!(success, "{prog} {args:?} failed:\n{out}\n{err}");
    out
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    memsync_testkit::random_bytes(seed, len).to_vec()
}

/// A child process killed on drop (nbdkit, qemu-nbd).
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn wait_for_socket(p: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(p).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {}", p.display());
}

fn spawn(prog: &str, args: &[&str]) -> Child {
    Child(
        Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{prog} must be installed (scripts/setup.sh): {e}")),
    )
}

// ---------------------------------------------------------------- qemu

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_over_tcp_and_unix() {
    let (s, store) = start_mem(64 << 20).await;
    for (i, uri) in [s.tcp(""), s.unix("")].iter().enumerate() {
        let p = format!("{:#x}", 0xab + i);
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                uri,
                "-c",
                &format!("write -P {p} 0 1M"),
                "-c",
                &format!("read -P {p} 0 1M"),
                "-c",
                "write -P 0x11 1000 3001",
                "-c",
                "read -P 0x11 1000 3001",
                "-c",
                "write -z 8M 1M",
                "-c",
                "read -P 0 8M 1M",
                "-c",
                "aio_write -P 0x22 16M 64k",
                "-c",
                "aio_write -P 0x23 17M 64k",
                "-c",
                "aio_flush",
                "-c",
                "read -P 0x22 16M 64k",
                "-c",
                "read -P 0x23 17M 64k",
                "-c",
                "discard 32M 1M",
                "-c",
                "flush",
            ],
        )
        .await;
    }
    let b = store.read_bytes(1000, 3001).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    // Out of range: qemu-io refuses or the server answers with an error; never a hang.
    let (success, out, err) = run("qemu-io", &["-f", "raw", &s.tcp(""), "-c", "read 64M 4k"]).await;
    assert!(
        !success || out.contains("error") || err.contains("rror") || out.contains("Input/output"),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_compare() {
    let (s, _store) = start_mem(32 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut data = random(7, 32 << 20);
    data[4 << 20..12 << 20].fill(0); // a zero range
    std::fs::write(&src, &data).unwrap();
    let info = ok("qemu-img", &["info", "--output=json", &s.tcp("")]).await;
    assert!(info.contains("33554432"), "{info}");
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &s.tcp(""),
        ],
    )
    .await;
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &s.tcp(""),
        ],
    )
    .await;
    let back = dir.path().join("back.img");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.unix(""),
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data differs after the round trip"
    );
    // A changed byte is noticed.
    data[100] ^= 1;
    std::fs::write(&src, &data).unwrap();
    let (same, _, _) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &s.tcp(""),
        ],
    )
    .await;
    assert!(!same);
}

// ---------------------------------------------------------------- libnbd tools

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_map_json() {
    let a = mem(16 << 20);
    let b = mem(8 << 20);
    let mut eb = Export::new("beta", b.clone());
    eb.read_only = true;
    eb.description = "the second export".into();
    let s = start(ServerConfig::new(vec![Export::new("alpha", a.clone()), eb])).await;
    a.write(1 << 20, Bytes::from(vec![7u8; 2 << 20]))
        .await
        .unwrap();
    let list = ok("nbdinfo", &["--list", &s.tcp("")]).await;
    assert!(
        list.contains("export=\"alpha\"") && list.contains("export=\"beta\""),
        "{list}"
    );
    assert!(list.contains("the second export"), "{list}");
    let json = ok("nbdinfo", &["--json", &s.unix("beta")]).await;
    assert!(
        json.contains("\"is_read_only\": true") && json.contains("8388608"),
        "{json}"
    );
    let json = ok("nbdinfo", &["--json", &s.tcp("alpha")]).await;
    assert!(
        json.contains("\"can_multi_conn\": true") && json.contains("base:allocation"),
        "{json}"
    );
    let map = ok("nbdinfo", &["--map", &s.tcp("alpha")]).await;
    let lines: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l[0] == "1048576" && l[1] == "2097152" && l[2] == "0"),
        "{map}"
    );
    assert!(lines.iter().any(|l| l[0] == "0" && l[2] == "3"), "{map}");
    // Unknown export: a clear failure.
    let (success, _, err) = run("nbdinfo", &[&s.tcp("nope")]).await;
    assert!(!success && err.contains("nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_both_directions() {
    let (s, _store) = start_mem(48 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut data = random(9, 48 << 20);
    data[20 << 20..30 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &s.tcp("")]).await;
    let back = dir.path().join("back.img");
    ok("nbdcopy", &[&s.unix(""), back.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    ok(
        "nbdcopy",
        &[
            "--request-size=4096",
            "-C",
            "1",
            "-R",
            "1",
            &s.tcp(""),
            "null:",
        ],
    )
    .await;
    // Many requests in flight on several connections.
    ok(
        "nbdcopy",
        &[
            "-C",
            "4",
            "-R",
            "64",
            "--request-size=65536",
            &s.tcp(""),
            "null:",
        ],
    )
    .await;
}

const NBDSH_EDGES: &str = r#"
import nbd, errno, sys
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.can_multi_conn()
size = h.get_size()
h.pwrite(b"x" * 1, 0)
h.pwrite(b"abc", 4095)
assert h.pread(5, 4093) == b"\0\0abc"
assert h.pread(0, 0) == b""
h.pwrite(b"", 100)
for off, n in [(size - 1, 2), (size, 1), (2**63, 1)]:
    try:
        h.pread(n, off)
        raise AssertionError("read past end succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"zz", size - 1)
    raise AssertionError("write past end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.block_status(0, 0, lambda *a: 0)
    raise AssertionError("zero-length block status succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
# flush visibility across connections (multi-conn)
h2 = nbd.NBD()
h2.connect_uri(uri)
h.pwrite(b"M" * 4096, 8192)
h.flush()
assert h2.pread(4096, 8192) == b"M" * 4096
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h2.pread(4096, 8192) == b"\0" * 4096
h.pread(65536, 0, nbd.CMD_FLAG_DF)
h.cache(4096, 0)
h.trim(4096, 65536)
h.shutdown()
h2.shutdown()
print("edges ok")
"#;

const NBDSH_READONLY: &str = r#"
import nbd, errno, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
for f in [lambda: h.pwrite(b"x", 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)]:
    try:
        f()
        raise AssertionError("write to read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
assert h.pread(4, 0) == b"\0\0\0\0"
print("readonly ok")
"#;

const NBDSH_UNKNOWN: &str = r#"
import nbd, sys
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    raise AssertionError("unknown export opened")
except nbd.Error as e:
    print("unknown export refused:", e)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_edge_cases() {
    let mut ro = Export::new("ro", mem(1 << 20));
    ro.read_only = true;
    let s = start(ServerConfig::new(vec![Export::new("", mem(16 << 20)), ro])).await;
    let dir = tempfile::tempdir().unwrap();
    for (name, script, uri, want) in [
        ("edges.py", NBDSH_EDGES, s.tcp(""), "edges ok"),
        ("ro.py", NBDSH_READONLY, s.unix("ro"), "readonly ok"),
        (
            "unknown.py",
            NBDSH_UNKNOWN,
            s.tcp("no-such-export"),
            "unknown export refused",
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, script).unwrap();
        // nbdsh runs /usr/bin/python3 with the Debian nbd module; the script gets its argv.
        let code = format!(
            "import sys; sys.argv = ['x', {uri:?}]; exec(open({:?}).read())",
            p.to_str().unwrap()
        );
        let out = ok("nbdsh", &["-c", &code]).await;
        assert!(out.contains(want), "{name}: {out}");
    }
}

// ---------------------------------------------------------------- TLS

fn make_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "memsync test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_and_optional() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let d = certs.path();
    let tls = memsync_nbd::server_tls_config(&d.join("server-cert.pem"), &d.join("server-key.pem"))
        .unwrap();
    let mut cfg = ServerConfig::new(vec![Export::new("", mem(8 << 20))]);
    cfg.tls_mode = TlsMode::Required;
    cfg.tls = Some(tls.clone());
    let s = start(cfg).await;
    let dirs = d.to_str().unwrap();
    let tls_uri = format!("nbds://127.0.0.1:{}/?tls-certificates={dirs}", s.port);
    let out = ok("nbdinfo", &[&tls_uri]).await;
    assert!(
        out.contains("using TLS") || out.contains("with TLS"),
        "{out}"
    );
    let (plain_ok, _, err) = run("nbdinfo", &[&s.tcp("")]).await;
    assert!(!plain_ok, "a plain client must be refused: {err}");
    // qemu with x509 credentials.
    let obj = format!("tls-creds-x509,id=tls0,dir={dirs},endpoint=client");
    let img = format!("driver=nbd,host=127.0.0.1,port={},tls-creds=tls0", s.port);
    ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &img,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    )
    .await;
    // The memsync client over TLS, by URL.
    let mut reg = memsync_core::Registry::new();
    memsync_nbd::register(&mut reg);
    let st = reg
        .open(&format!(
            "nbds://localhost:{}/?tls-certificates={dirs}",
            s.port
        ))
        .await
        .unwrap();
    assert_eq!(&st.read_bytes(0, 4).await.unwrap()[..], &[0x5a; 4]);
    assert!(
        reg.open(&s.tcp("")).await.is_err(),
        "plain memsync client must be refused"
    );
    // Optional mode: both work.
    let mut cfg = ServerConfig::new(vec![Export::new("", mem(8 << 20))]);
    cfg.tls_mode = TlsMode::Optional;
    cfg.tls = Some(tls);
    let s2 = start(cfg).await;
    ok("nbdinfo", &[&s2.tcp("")]).await;
    ok(
        "nbdinfo",
        &[&format!(
            "nbds+unix:///?socket={}&tls-certificates={dirs}",
            s2.sock.display()
        )],
    )
    .await;
}

// ---------------------------------------------------------------- the memsync client

async fn client(uri: &str) -> DynStore {
    let mut reg = memsync_core::Registry::new();
    memsync_nbd::register(&mut reg);
    tokio::time::timeout(LIMIT, reg.open(uri))
        .await
        .expect("connect timed out")
        .unwrap()
}

fn opts() -> ContractOpts {
    ContractOpts::default()
        .window(16 << 20)
        .check_timeout(LIMIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_contract_against_memsync_server() {
    let (s, _) = start_mem(32 << 20).await;
    let st = client(&format!("{}?connections=3", s.tcp(""))).await;
    contract::run(st, opts()).await;
    // Without extended headers, and without structured replies at all.
    let mut cfg = ClientConfig::new(NbdAddr::Unix(s.sock.clone()), "");
    cfg.extended_headers = false;
    let c = NbdStore::connect(cfg.clone()).await.unwrap();
    assert_eq!(c.negotiated(), (false, true, true));
    contract::run(c, opts().expect_zero_initialised(false)).await;
    cfg.structured = false;
    let c = NbdStore::connect(cfg).await.unwrap();
    assert_eq!(c.negotiated(), (false, false, false));
    contract::run(c, opts().expect_zero_initialised(false)).await;
    let c = NbdStore::connect(ClientConfig::new(NbdAddr::Unix(s.sock.clone()), ""))
        .await
        .unwrap();
    assert_eq!(c.negotiated(), (true, true, true));
    assert!(c.connections() > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_contract_against_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("mem.sock");
    let _mem = spawn(
        "nbdkit",
        &["-f", "-U", m.to_str().unwrap(), "memory", "32M"],
    );
    let img = dir.path().join("file.img");
    std::fs::write(&img, vec![0u8; 32 << 20]).unwrap();
    let f = dir.path().join("file.sock");
    let _file = spawn(
        "nbdkit",
        &[
            "-f",
            "-U",
            f.to_str().unwrap(),
            "file",
            img.to_str().unwrap(),
        ],
    );
    // sparse-random behind nbdkit's blocksize filter: the plugin alone is not a store (an
    // unaligned read sees other bytes than an aligned one, see
    // `nbdkit_sparse_random_alone_is_not_a_store`); minblock=4096 makes the plugin see whole
    // blocks only. A fixed seed and dense, short runs put data inside the contract's window.
    let r = dir.path().join("sr.sock");
    let _sr = spawn(
        "nbdkit",
        &[
            "-f",
            "-r",
            "-U",
            r.to_str().unwrap(),
            "--filter=blocksize",
            "sparse-random",
            "64M",
            "seed=4711",
            "percent=50",
            "runlength=262144",
            "minblock=4096",
        ],
    );
    for p in [&m, &f, &r] {
        wait_for_socket(p).await;
    }
    let st = client(&format!("nbd+unix:///?socket={}", m.display())).await;
    contract::run(st, opts()).await;
    let st = client(&format!("nbd+unix:///?socket={}", f.display())).await;
    contract::run(st, opts()).await;
    let sr_uri = format!("nbd+unix:///?socket={}", r.display());
    let st = client(&sr_uri).await;
    assert!(st.caps().read_only);
    let mut window = vec![0u8; 16 << 20];
    st.read(0, &mut window).await.unwrap();
    assert!(
        window.iter().any(|&b| b != 0) && window.chunks(4096).any(|c| c.iter().all(|&b| b == 0)),
        "the window must hold both data and holes"
    );
    contract::run(st.clone(), opts().expect_zero_initialised(false)).await;
    // The client's bytes equal nbdcopy's view of the same export.
    let out = dir.path().join("sr.img");
    ok("nbdcopy", &[&sr_uri, out.to_str().unwrap()]).await;
    let want = std::fs::read(&out).unwrap();
    let mut got = vec![0xffu8; want.len()];
    st.read(0, &mut got).await.unwrap();
    assert!(
        got == want,
        "memsync client and nbdcopy disagree on sparse-random"
    );
}

/// Reads land in the caller's buffer whatever it held before: OFFSET_HOLE chunks (the server
/// answers reads of 64 KiB and more over sparse ranges with them) must zero their part, data
/// chunks go to `chunk offset - request offset`, and reads larger than the maximum block size
/// are split. Checked with extended headers, structured replies and simple replies, at aligned
/// and unaligned offsets, with buffers pre-filled with 0xff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_overwrite_the_whole_buffer_across_holes() {
    let size = 8u64 << 20;
    let store = mem(size);
    let mut model = vec![0u8; size as usize];
    for (i, off) in [4096u64, 300_000, 1 << 20, (3 << 20) + 17, size - 5000]
        .into_iter()
        .enumerate()
    {
        let d = random(i as u64, 3000 + i * 70_000);
        let end = (off as usize + d.len()).min(size as usize);
        model[off as usize..end].copy_from_slice(&d[..end - off as usize]);
        store
            .write(off, Bytes::copy_from_slice(&d[..end - off as usize]))
            .await
            .unwrap();
    }
    let mut cfg = ServerConfig::new(vec![Export::new("", store)]);
    cfg.max_payload = 1 << 20; // a 4 MiB read needs several requests
    let s = start(cfg).await;
    for (extended, structured) in [(true, true), (false, true), (false, false)] {
        let mut c = ClientConfig::new(NbdAddr::Unix(s.sock.clone()), "");
        c.extended_headers = extended;
        c.structured = structured;
        c.connections = 2;
        let c = NbdStore::connect(c).await.unwrap();
        assert_eq!(c.negotiated().0, extended);
        for (off, len) in [
            (0u64, 1usize << 20),
            (1, 700_000),
            (65_537, 4 << 20),
            (0, size as usize),
            (size - 70_000, 70_000),
            (2 << 20, 4096),
        ] {
            let mut buf = vec![0xffu8; len];
            c.read(off, &mut buf).await.unwrap();
            let want = &model[off as usize..off as usize + len];
            if let Some(i) = (0..len).find(|&i| buf[i] != want[i]) {
                panic!(
                    "extended={extended} structured={structured}: read of {len} at {off}: \
                     byte {} is {:#x}, want {:#x}",
                    off + i as u64,
                    buf[i],
                    want[i]
                );
            }
        }
    }
}

/// Requests share each connection's socket (the request whose data is next reads it), so a
/// read dropped half-way must not disturb the others: drop reads at random points while
/// others run, then check every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_leave_the_connection_usable() {
    let size = 16usize << 20;
    let store = mem(size as u64);
    let data = random(9, size);
    store.write(0, Bytes::from(data.clone())).await.unwrap();
    let mut cfg = ServerConfig::new(vec![Export::new("", store)]);
    cfg.max_payload = 1 << 20;
    let s = start(cfg).await;
    for (extended, structured) in [(true, true), (false, true), (false, false)] {
        let mut c = ClientConfig::new(
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: s.port,
            },
            "",
        );
        c.extended_headers = extended;
        c.structured = structured;
        c.connections = 2;
        let c = Arc::new(NbdStore::connect(c).await.unwrap());
        let data = Arc::new(data.clone());
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let (c, data) = (c.clone(), data.clone());
                tokio::spawn(async move {
                    for i in 0..40u64 {
                        let x = (t * 7919 + i * 104_729) % (size as u64 - (3 << 20));
                        let len = 1 + ((t * 31 + i * 977) % (3 << 20)) as usize;
                        let mut buf = vec![0u8; len];
                        let r = c.read(x, &mut buf);
                        if (t + i) % 3 == 0 {
                            let us = (t * 13 + i * 37) % 400;
                            let _ = tokio::time::timeout(Duration::from_micros(us), r).await;
                        } else {
                            r.await.unwrap();
                            assert!(
                                buf == data[x as usize..x as usize + len],
                                "read of {len} at {x}"
                            );
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(LIMIT, t).await.expect("hung").unwrap();
        }
        let mut all = vec![0u8; size];
        c.read(0, &mut all).await.unwrap();
        assert!(all == *data, "extended={extended} structured={structured}");
    }
}

/// nbdkit 1.32's sparse-random plugin seeds a block's random byte with the request offset when
/// a read starts inside a block (its unaligned head calls `read_block(blknum, offset, ..)` with
/// the unaligned offset), so byte N read on its own differs from byte N read as part of an
/// aligned block. libnbd (nbdsh) sees exactly what the memsync client sees, so this is the
/// plugin, not the client; behind `--filter=blocksize minblock=4096` the two reads agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_sparse_random_alone_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.sock");
    let filtered = dir.path().join("filtered.sock");
    let args = ["sparse-random", "1M", "seed=1", "percent=100"];
    let _raw = spawn(
        "nbdkit",
        &[&["-f", "-r", "-U", raw.to_str().unwrap()][..], &args[..]].concat(),
    );
    let _filtered = spawn(
        "nbdkit",
        &[
            &[
                "-f",
                "-r",
                "-U",
                filtered.to_str().unwrap(),
                "--filter=blocksize",
            ][..],
            &args[..],
            &["minblock=4096"][..],
        ]
        .concat(),
    );
    wait_for_socket(&raw).await;
    wait_for_socket(&filtered).await;
    // (aligned block 0, then bytes 1..4 read on their own) through one client.
    async fn views(st: &DynStore) -> (Vec<u8>, Vec<u8>) {
        let mut block = vec![0u8; 4096];
        st.read(0, &mut block).await.unwrap();
        let mut unaligned = vec![0u8; 3];
        st.read(1, &mut unaligned).await.unwrap();
        (block[1..4].to_vec(), unaligned)
    }
    let raw_uri = format!("nbd+unix:///?socket={}", raw.display());
    let (aligned, unaligned) = views(&client(&raw_uri).await).await;
    assert!(aligned.iter().all(|&b| b != 0), "percent=100: all data");
    assert_ne!(
        aligned, unaligned,
        "sparse-random now reads consistently: run the plain plugin in the contract"
    );
    // libnbd agrees with the memsync client, byte for byte.
    let code = format!(
        "h.connect_uri({raw_uri:?}); print(list(h.pread(4096, 0)[1:4]), list(h.pread(3, 1)))"
    );
    let out = ok("nbdsh", &["-c", &code]).await;
    assert_eq!(
        out.trim(),
        format!("{aligned:?} {unaligned:?}"),
        "libnbd and the memsync client disagree"
    );
    let filtered_uri = format!("nbd+unix:///?socket={}", filtered.display());
    let (a, u) = views(&client(&filtered_uri).await).await;
    assert_eq!(a, aligned);
    assert_eq!(u, aligned, "the blocksize filter makes reads consistent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_contract_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.img");
    std::fs::write(&img, vec![0u8; 32 << 20]).unwrap();
    let sock = dir.path().join("q.sock");
    let _q = spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "-t",
            "-e",
            "8",
            "--cache=writeback",
            img.to_str().unwrap(),
        ],
    );
    wait_for_socket(&sock).await;
    let st = client(&format!("nbd+unix:///?socket={}", sock.display())).await;
    contract::run(st, opts()).await;
}

// ---------------------------------------------------------------- bad input and limits

async fn raw_handshake(port: u16, export: &str, structured: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    let mut b = BytesMut::new();
    if structured {
        encode_opt(&mut b, &Opt::StructuredReply);
    }
    encode_opt(&mut b, &Opt::ExportName(export.to_owned()));
    s.write_all(&b).await.unwrap();
    if structured {
        let mut r = [0u8; OPT_REPLY_HEADER_LEN];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(parse_opt_reply_header(&r).unwrap().reply, REP_ACK);
    }
    let mut e = [0u8; 10];
    s.read_exact(&mut e).await.unwrap();
    s
}

async fn raw_request(
    s: &mut TcpStream,
    typ: u16,
    flags: u16,
    offset: u64,
    len: u64,
    data: &[u8],
) -> ReplyHeader {
    let mut b = BytesMut::new();
    encode_request(
        &mut b,
        &Request {
            flags,
            typ,
            cookie: 42,
            offset,
            len,
        },
        false,
    );
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    let mut h = [0u8; 32];
    tokio::time::timeout(LIMIT, s.read_exact(&mut h[..4]))
        .await
        .unwrap()
        .unwrap();
    let n = reply_header_len(u32::from_be_bytes([h[0], h[1], h[2], h[3]])).expect("reply magic");
    s.read_exact(&mut h[4..n]).await.unwrap();
    parse_reply_header(&h[..n]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_bad_magic_closes_one_connection() {
    let (s, _) = start_mem(1 << 20).await;
    let mut a = raw_handshake(s.port, "", false).await;
    let mut other = raw_handshake(s.port, "", false).await;
    for (typ, flags, off, len, want) in [
        (99, 0, 0, 0, EINVAL),                  // unknown command
        (CMD_READ, 1 << 9, 0, 16, EINVAL),      // unknown flag
        (CMD_READ, CMD_FLAG_DF, 0, 16, EINVAL), // DF without structured replies
        (CMD_READ, 0, 1 << 20, 1, EINVAL),      // past the end
        (CMD_READ, 0, u64::MAX, 1, EINVAL),     // overflow
        (CMD_READ, 0, 0, 64 << 20, EOVERFLOW),  // too large
        (CMD_BLOCK_STATUS, 0, 0, 4096, EINVAL), // no meta context
        (CMD_TRIM, 0, 1 << 20, 4096, ENOSPC),
    ] {
        let r = raw_request(&mut a, typ, flags, off, len, &[]).await;
        assert_eq!(
            r,
            ReplyHeader::Simple {
                error: want,
                cookie: 42
            },
            "cmd {typ} flags {flags:#x}"
        );
    }
    let r = raw_request(&mut a, CMD_WRITE, 0, (1 << 20) - 2, 4, b"abcd").await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: ENOSPC,
            cookie: 42
        }
    );
    // Still alive.
    let r = raw_request(&mut a, CMD_WRITE, 0, 0, 4, b"abcd").await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: 0,
            cookie: 42
        }
    );
    // Garbage: this connection closes, the other lives on.
    a.write_all(&[0xde; 28]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(LIMIT, a.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "connection should close after a bad magic");
    // A truncated header followed by EOF.
    let mut t = raw_handshake(s.port, "", false).await;
    t.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    t.shutdown().await.unwrap();
    let r = raw_request(&mut other, CMD_READ, 0, 0, 4, &[]).await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: 0,
            cookie: 42
        }
    );
    let mut d = [0u8; 4];
    other.read_exact(&mut d).await.unwrap();
    assert_eq!(&d, b"abcd");
    // Structured: errors come as error chunks with a message.
    let mut st = raw_handshake(s.port, "", true).await;
    let r = raw_request(&mut st, CMD_READ, 0, 1 << 20, 1, &[]).await;
    assert!(
        matches!(
            r,
            ReplyHeader::Chunk {
                typ: REPLY_TYPE_ERROR,
                flags: REPLY_FLAG_DONE,
                ..
            }
        ),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_graceful_shutdown() {
    let store = mem(8 << 20);
    let mut cfg = ServerConfig::new(vec![Export::new("", store.clone())]);
    cfg.max_connections = 2;
    cfg.max_in_flight = 4;
    let s = start(cfg).await;
    let c1 = client(&format!("{}?connections=1", s.tcp(""))).await;
    let c2 = client(&format!("{}?connections=1", s.tcp(""))).await;
    // A third connection is refused.
    let mut reg = memsync_core::Registry::new();
    memsync_nbd::register(&mut reg);
    assert!(
        reg.open(&format!("{}?connections=1", s.tcp("")))
            .await
            .is_err(),
        "third connection must be refused"
    );
    // Many requests in flight with a small per-connection limit still complete.
    let futs = (0..64u64).map(|i| {
        let c = c1.clone();
        async move { c.write(i * 4096, Bytes::from(vec![i as u8; 4096])).await }
    });
    for r in futures_util::future::join_all(futs).await {
        r.unwrap();
    }
    assert_eq!(c2.read_bytes(63 * 4096, 4096).await.unwrap()[0], 63);
    // Shutdown lets in-flight requests finish and flushes.
    let w = {
        let c = c1.clone();
        tokio::spawn(async move { c.write(0, Bytes::from(vec![9u8; 1 << 20])).await })
    };
    tokio::time::timeout(LIMIT, s.server.shutdown())
        .await
        .unwrap()
        .unwrap();
    let _ = w.await;
    assert!(
        TcpStream::connect(("127.0.0.1", s.port)).await.is_err(),
        "still accepting after shutdown"
    );
}

/// The server remembers where the store last reported data, to skip the extents query on
/// sequential reads. Only data is remembered: a range trimmed since must read as zeros, and a
/// hole written since (through the store directly, as another connection would) must read as
/// the new data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_trims_and_writes_after_cached_extents() {
    let size = 32u64 << 20;
    let (s, store) = start_mem(size).await;
    let data = random(11, 16 << 20);
    store.write(0, Bytes::from(data.clone())).await.unwrap();
    let mut c = ClientConfig::new(NbdAddr::Unix(s.sock.clone()), "");
    c.connections = 1;
    let c = NbdStore::connect(c).await.unwrap();
    let mut buf = vec![0xffu8; 256 << 10];
    // Data: remembered.
    c.read(0, &mut buf).await.unwrap();
    assert!(buf[..] == data[..256 << 10]);
    // Trim inside the remembered range, on the store itself.
    store.trim(64 << 10, 64 << 10).await.unwrap();
    c.read(0, &mut buf).await.unwrap();
    assert!(buf[..64 << 10] == data[..64 << 10]);
    assert!(buf[64 << 10..128 << 10].iter().all(|&b| b == 0));
    assert!(buf[128 << 10..] == data[128 << 10..256 << 10]);
    // A hole, then data written into it.
    let at = 20u64 << 20;
    c.read(at, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    store
        .write(at + 4096, Bytes::from(data[..128 << 10].to_vec()))
        .await
        .unwrap();
    buf.fill(0xff);
    c.read(at, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..4096 + (128 << 10)] == data[..128 << 10]);
    assert!(buf[4096 + (128 << 10)..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------- peers that misbehave

/// Every malformed reply from a server is an error, never data: a read answered with too
/// little (or nothing), overlapping or out-of-range chunks, a wrong cookie, a bad error chunk,
/// a chunk type or header kind that was not negotiated. The server is a raw-socket one that
/// does a real handshake and then answers every read with the reply the export name picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_malformed_read_replies() {
    use memsync_testkit::nbd::{Bad, BrokenNbd, byte_at};
    let srv = BrokenNbd::start().unwrap();
    let (off, len) = (8192u64, 64 * 1024usize);
    // Every case runs, and the failures are reported together.
    let mut wrong = Vec::new();
    for &bad in Bad::ALL {
        let mut cfg = ClientConfig::new(
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: srv.port(),
            },
            bad.name(),
        );
        cfg.connections = 1;
        cfg.extended_headers = false;
        let c = NbdStore::connect(cfg).await.unwrap();
        assert_eq!(c.negotiated(), (false, true, false), "{bad:?}");
        // What the buffer held before must never come back as the export's bytes.
        let mut buf = vec![0xee; len];
        let Ok(r) = tokio::time::timeout(Duration::from_secs(30), c.read(off, &mut buf)).await
        else {
            wrong.push(format!("{bad:?}: the read hung"));
            continue;
        };
        match (bad, r) {
            (Bad::Good, Ok(())) => {
                let want: Vec<u8> = (off..off + len as u64).map(byte_at).collect();
                if buf != want {
                    wrong.push("Good: wrong bytes".into());
                }
            }
            (Bad::Good, Err(e)) => wrong.push(format!("Good: {}", e.chain())),
            (_, Ok(())) => wrong.push(format!("{bad:?} was accepted")),
            (Bad::NoData | Bad::HalfData, Err(e)) => {
                // The connection is fine; the reply was short: EIO for this request.
                let chain = e.chain().to_string();
                if e.errno() != 5 || !chain.contains("covered") {
                    wrong.push(format!("{bad:?}: {chain}"));
                }
            }
            (_, Err(_)) => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A store that holds every write until the gate opens, and counts the writes waiting.
#[derive(Debug)]
struct GatedWrites {
    inner: DynStore,
    gate: tokio::sync::watch::Receiver<bool>,
}

#[memsync_core::async_trait]
impl Store for GatedWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> memsync_core::Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
        let mut g = self.gate.clone();
        let _ = g.wait_for(|open| *open).await;
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> memsync_core::Result<()> {
        self.inner.flush().await
    }
}

fn one_conn(port: u16) -> ClientConfig {
    let mut cfg = ClientConfig::new(
        NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        "",
    );
    cfg.connections = 1;
    cfg
}

/// The client's handshake on a stream the caller connected (as a kernel NBD device driver
/// uses it): with structured replies and extended headers off it returns the export's size,
/// flags and block sizes and leaves the stream in transmission with simple replies; with
/// them on (over a unix socket) it negotiates both and `base:allocation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_handshake_works_on_any_connected_stream() {
    let store = mem(3 << 20);
    let mut ro = Export::new("ro", store.clone());
    ro.read_only = true;
    let ts = start(ServerConfig::new(vec![ro])).await;
    let data = random(11, 4096);
    store.write(8192, Bytes::from(data.clone())).await.unwrap();

    let mut cfg = one_conn(ts.port);
    cfg.export = "ro".into();
    cfg.structured = false;
    cfg.extended_headers = false;
    let mut s = TcpStream::connect(("127.0.0.1", ts.port)).await.unwrap();
    let info = memsync_nbd::client::handshake(&mut s, &cfg).await.unwrap();
    assert_eq!(info.size, 3 << 20);
    assert_ne!(info.flags & TF_HAS_FLAGS, 0);
    assert_ne!(info.flags & TF_READ_ONLY, 0);
    assert!(!info.structured && !info.extended && info.meta.is_none());
    assert!(info.min >= 1 && info.min <= info.preferred && info.preferred <= info.max);
    let h = raw_request(&mut s, CMD_READ, 0, 8192, 4096, &[]).await;
    assert!(matches!(h, ReplyHeader::Simple { error: 0, .. }), "{h:?}");
    let mut got = vec![0u8; 4096];
    s.read_exact(&mut got).await.unwrap();
    assert!(
        got == data,
        "the read after the handshake returned other bytes"
    );

    let mut cfg = one_conn(ts.port);
    cfg.export = "ro".into();
    let mut u = tokio::net::UnixStream::connect(&ts.sock).await.unwrap();
    let info = memsync_nbd::client::handshake(&mut u, &cfg).await.unwrap();
    assert_eq!(info.size, 3 << 20);
    assert!(info.structured && info.extended && info.meta.is_some());

    cfg.export = "missing".into();
    let mut s = TcpStream::connect(("127.0.0.1", ts.port)).await.unwrap();
    let e = memsync_nbd::client::handshake(&mut s, &cfg)
        .await
        .unwrap_err();
    assert!(e.chain().contains("unknown export"), "{}", e.chain());
}

/// WRITE payloads take their share of a global byte budget before they are read: however many
/// writes several connections send while the store is stuck, the payload bytes the server
/// holds never exceed the budget, and every byte lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_payloads_stay_within_the_global_budget() {
    const PIECE: usize = 256 * 1024;
    const BUDGET: usize = 4 * PIECE;
    let mem = mem(32 << 20);
    let (open, gate) = tokio::sync::watch::channel(false);
    let store: DynStore = Arc::new(GatedWrites {
        inner: mem.clone(),
        gate,
    });
    let mut cfg = ServerConfig::new(vec![Export::new("", store)]);
    cfg.max_payload = PIECE as u32;
    cfg.payload_budget = BUDGET;
    cfg.max_in_flight = 64;
    let s = start(cfg).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(NbdStore::connect(one_conn(s.port)).await.unwrap()));
    }
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let c = c.clone();
            tokio::spawn(async move {
                let ws = (0..16).map(|i| {
                    let n = ci * 16 + i;
                    let c = c.clone();
                    async move {
                        c.write((n * PIECE) as u64, random(n as u64, PIECE).into())
                            .await
                    }
                });
                futures_util::future::try_join_all(ws).await.map(|_| ())
            })
        })
        .collect();
    // The store holds the first writes; wait until the budget is used up, then give the
    // clients time to push more at the server.
    for i in 0.. {
        if s.server.stats().payload_bytes >= BUDGET {
            break;
        }
        assert!(
            i < 10_000,
            "the budget never filled: {:?}",
            s.server.stats()
        );
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a writer ended early"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = s.server.stats();
    assert!(held.payload_peak <= BUDGET, "{held:?}");
    open.send(true).unwrap();
    for w in writers {
        tokio::time::timeout(LIMIT, w)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let st = s.server.stats();
    assert!(st.payload_peak <= BUDGET, "{st:?}");
    assert_eq!(st.payload_peak, BUDGET, "the budget was never full: {st:?}");
    assert_eq!(st.payload_bytes, 0, "{st:?}");
    for n in 0..64 {
        let got = mem.read_bytes((n * PIECE) as u64, PIECE).await.unwrap();
        assert!(got[..] == random(n as u64, PIECE)[..], "piece {n} differs");
    }
}

/// A WRITE beyond the advertised maximum payload: up to the protocol's 32 MiB it is skipped
/// and fails with EINVAL (the connection lives on); beyond that the connection is closed
/// before anything is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_writes_fail_or_disconnect() {
    let store = mem(1 << 20);
    let mut cfg = ServerConfig::new(vec![Export::new("", store.clone())]);
    cfg.max_payload = 64 * 1024;
    let s = start(cfg).await;
    let mut a = raw_handshake(s.port, "", false).await;
    let big = vec![7u8; 128 * 1024];
    let r = raw_request(&mut a, CMD_WRITE, 0, 0, big.len() as u64, &big).await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: EINVAL,
            cookie: 42
        }
    );
    assert_eq!(store.read_bytes(0, 4).await.unwrap()[..], [0; 4]);
    let r = raw_request(&mut a, CMD_WRITE, 0, 0, 4, b"abcd").await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: 0,
            cookie: 42
        }
    );
    // 64 MiB announced: the server hangs up instead of reading it.
    let mut b = BytesMut::new();
    encode_request(
        &mut b,
        &Request {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 43,
            offset: 0,
            len: 64 << 20,
        },
        false,
    );
    a.write_all(&b).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(LIMIT, a.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection should close");
}

/// A reply the server has batched is sent before it waits for the payload of an oversized
/// WRITE it skips: a client that sends a READ and that WRITE's header, and the payload only
/// once the READ is answered, gets both replies (the server used to sit in the skip with the
/// READ's reply unsent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_reply_is_sent_before_an_oversized_payload_is_awaited() {
    let store = mem(1 << 20);
    store
        .write(0, Bytes::from_static(b"0123456789abcdef"))
        .await
        .unwrap();
    let mut cfg = ServerConfig::new(vec![Export::new("", store)]);
    cfg.max_payload = 64 * 1024;
    let s = start(cfg).await;
    let mut a = raw_handshake(s.port, "", false).await;
    let mut b = BytesMut::new();
    for (typ, cookie, len) in [(CMD_READ, 1, 16), (CMD_WRITE, 2, 128 * 1024)] {
        let req = Request {
            flags: 0,
            typ,
            cookie,
            offset: 0,
            len,
        };
        encode_request(&mut b, &req, false);
    }
    a.write_all(&b).await.unwrap();
    let mut h = [0u8; SIMPLE_REPLY_LEN + 16];
    tokio::time::timeout(Duration::from_secs(10), a.read_exact(&mut h))
        .await
        .expect("the READ's reply held back while the server waits for the WRITE's payload")
        .unwrap();
    assert_eq!(
        parse_reply_header(&h[..SIMPLE_REPLY_LEN]).unwrap(),
        ReplyHeader::Simple {
            error: 0,
            cookie: 1
        }
    );
    assert_eq!(&h[SIMPLE_REPLY_LEN..], b"0123456789abcdef");
    a.write_all(&vec![7u8; 128 * 1024]).await.unwrap();
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    tokio::time::timeout(LIMIT, a.read_exact(&mut h))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        parse_reply_header(&h).unwrap(),
        ReplyHeader::Simple {
            error: EINVAL,
            cookie: 2
        }
    );
}

/// A client that connects and then says nothing is disconnected when the handshake time is
/// up, and its connection slot goes to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_disconnected_and_free_their_slot() {
    let mut cfg = ServerConfig::new(vec![Export::new("", mem(1 << 20))]);
    cfg.max_connections = 1;
    cfg.handshake_timeout = Duration::from_millis(200);
    let s = start(cfg).await;
    for stage in ["after connecting", "after the client flags"] {
        let mut silent = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        let mut g = [0u8; 18];
        silent.read_exact(&mut g).await.unwrap();
        if stage == "after the client flags" {
            silent
                .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
                .await
                .unwrap();
        }
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(LIMIT, silent.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("silent client {stage} still connected"))
            .unwrap_or(0);
        assert_eq!(n, 0, "{stage}");
        wait_no_connections(&s.server).await;
        // The one slot is free: a real client gets in and works.
        let c = NbdStore::connect(one_conn(s.port)).await.unwrap();
        c.write(0, Bytes::from_static(b"xy")).await.unwrap();
        drop(c);
        wait_no_connections(&s.server).await;
    }
}

async fn wait_no_connections(server: &Server) {
    for _ in 0..10_000 {
        if server.stats().connections == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("connections never ended: {:?}", server.stats());
}

/// Dropping a server without `shutdown` stops its listeners: the port refuses connections
/// and the unix socket it bound is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_stops_its_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let server = Server::new(ServerConfig::new(vec![Export::new("", mem(1 << 20))])).unwrap();
    let url = server
        .listen(&memsync_nbd::ListenAddr::parse("nbd://127.0.0.1:0").unwrap())
        .await
        .unwrap();
    let port: u16 = url.rsplit_once(':').unwrap().1.parse().unwrap();
    server
        .listen(&memsync_nbd::ListenAddr::Unix(sock.clone()))
        .await
        .unwrap();
    let _c = NbdStore::connect(one_conn(port)).await.unwrap();
    drop(server);
    let mut refused = false;
    for _ in 0..2000 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        refused,
        "still accepting on port {port} after the server was dropped"
    );
    assert!(!sock.exists(), "the unix socket is left behind");
}

/// Binding a unix socket replaces only a stale socket: a regular file or a socket somebody
/// listens on is refused and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_replace_only_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"precious").unwrap();
    let e = memsync_nbd::bind_unix(&file).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let live = dir.path().join("live.sock");
    let l = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let e = memsync_nbd::bind_unix(&live).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let c = std::os::unix::net::UnixStream::connect(&live).unwrap();
    l.accept().unwrap();
    drop(c);

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let l = memsync_nbd::bind_unix(&stale).unwrap();
    let c = tokio::net::UnixStream::connect(&stale).await.unwrap();
    l.accept().await.unwrap();
    drop(c);
}

/// A store that counts how reads reach it, and can fail `read_shared`.
#[derive(Debug)]
struct Lending {
    inner: DynStore,
    reads: std::sync::atomic::AtomicU64,
    shared: std::sync::atomic::AtomicU64,
    fail_shared: std::sync::atomic::AtomicBool,
}

impl Lending {
    fn new(inner: DynStore) -> Arc<Self> {
        Arc::new(Lending {
            inner,
            reads: 0.into(),
            shared: 0.into(),
            fail_shared: false.into(),
        })
    }
    fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.reads.load(Relaxed), self.shared.load(Relaxed))
    }
}

#[memsync_core::async_trait]
impl Store for Lending {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> memsync_core::Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read(offset, buf).await
    }
    async fn read_shared(&self, offset: u64, len: u64) -> Option<memsync_core::Result<Vec<Bytes>>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared.fetch_add(1, Relaxed);
        if self.fail_shared.load(Relaxed) {
            return Some(Err(memsync_core::StoreError::Io {
                op: "read",
                source: std::io::Error::from_raw_os_error(5),
            }));
        }
        self.inner.read_shared(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> memsync_core::Result<()> {
        self.inner.flush().await
    }
    async fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> memsync_core::Result<Vec<memsync_core::Extent>> {
        self.inner.extents(offset, len).await
    }
}

/// Reads of 64 KiB and more from a store that lends its buffers (`mem:`) are sent from them,
/// with no `read` into a reply buffer, and carry the same bytes, in simple and structured
/// replies, across data and holes, and at an unaligned offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_are_sent_from_the_stores_buffers() {
    let inner = mem(8 << 20);
    let data = random(7, 3 << 20);
    inner.write(0, data.clone().into()).await.unwrap();
    // A hole at 3..5 MiB, then data again.
    inner
        .write(5 << 20, random(8, 1 << 20).into())
        .await
        .unwrap();
    let lending = Lending::new(inner.clone());
    let store: DynStore = lending.clone();
    let s = start(ServerConfig::new(vec![Export::new("", store)])).await;
    let c = NbdStore::connect(one_conn(s.port)).await.unwrap();
    for (off, len) in [
        (0, 1 << 20),
        (12345, 1 << 20),
        ((3 << 20) - 4096, (2 << 20) + 8192), // data, hole, data
        (3 << 20, 1 << 20),                   // all hole
        ((5 << 20) - 65536, 2 << 20),         // hole, data, hole
    ] {
        let got = c.read_bytes(off, len).await.unwrap();
        let want = inner.read_bytes(off, len).await.unwrap();
        assert!(got == want, "structured read {off}+{len}");
    }
    let (reads, shared) = lending.counts();
    assert_eq!(reads, 0, "no read went through a reply buffer");
    assert!(shared >= 5, "{shared}");
    // Simple replies: header and bytes.
    let mut raw = raw_handshake(s.port, "", false).await;
    let len = 1 << 20;
    let r = raw_request(&mut raw, CMD_READ, 0, 777, len, &[]).await;
    assert_eq!(
        r,
        ReplyHeader::Simple {
            error: 0,
            cookie: 42
        }
    );
    let mut got = vec![0u8; len as usize];
    raw.read_exact(&mut got).await.unwrap();
    assert!(got[..] == data[777..777 + len as usize]);
    assert_eq!(lending.counts().0, 0);
    // Small reads are still copied into the batched replies.
    assert_eq!(&c.read_bytes(100, 10).await.unwrap()[..], &data[100..110]);
    assert_eq!(lending.counts().0, 1);
}

/// A store whose `read_shared` fails: the read gets an error reply (simple and structured) and
/// the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_read_is_an_error_reply() {
    let lending = Lending::new(mem(4 << 20));
    lending
        .fail_shared
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let store: DynStore = lending.clone();
    let s = start(ServerConfig::new(vec![Export::new("", store)])).await;
    for structured in [false, true] {
        let mut raw = raw_handshake(s.port, "", structured).await;
        let r = raw_request(&mut raw, CMD_READ, 0, 0, 1 << 20, &[]).await;
        if structured {
            assert!(
                matches!(
                    r,
                    ReplyHeader::Chunk {
                        typ: REPLY_TYPE_ERROR,
                        flags: REPLY_FLAG_DONE,
                        ..
                    }
                ),
                "{r:?}"
            );
            let ReplyHeader::Chunk { len, .. } = r else {
                unreachable!()
            };
            let mut p = vec![0u8; len as usize];
            raw.read_exact(&mut p).await.unwrap();
            assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EIO);
        } else {
            assert_eq!(
                r,
                ReplyHeader::Simple {
                    error: EIO,
                    cookie: 42
                }
            );
        }
        // Still usable.
        let r = raw_request(&mut raw, CMD_WRITE, 0, 0, 4, b"abcd").await;
        assert_eq!(
            r,
            ReplyHeader::Simple {
                error: 0,
                cookie: 42
            }
        );
    }
}

/// A client that asks for many large reads and disconnects without reading the replies ends
/// only its own connection; the shared buffers held by the unsent replies do not stop later
/// writes to the same chunks, and others read what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_reply_ends_only_its_connection() {
    let inner = mem(32 << 20);
    inner.write(0, random(3, 32 << 20).into()).await.unwrap();
    let s = start(ServerConfig::new(vec![Export::new("", inner.clone())])).await;
    let mut raw = raw_handshake(s.port, "", false).await;
    let mut b = BytesMut::new();
    for i in 0..32u64 {
        encode_request(
            &mut b,
            &Request {
                flags: 0,
                typ: CMD_READ,
                cookie: i,
                offset: i << 20,
                len: 1 << 20,
            },
            false,
        );
    }
    raw.write_all(&b).await.unwrap();
    // Some of the first reply, then gone.
    let mut some = [0u8; 4096];
    raw.read_exact(&mut some).await.unwrap();
    drop(raw);
    wait_no_connections(&s.server).await;
    let new = random(4, 1 << 20);
    let c = NbdStore::connect(one_conn(s.port)).await.unwrap();
    c.write(5 << 20, new.clone().into()).await.unwrap();
    assert!(c.read_bytes(5 << 20, 1 << 20).await.unwrap() == new);
}
