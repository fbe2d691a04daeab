//! N nodes as N regions in one process, over loopback TCP, and as N processes in network
//! namespaces, for every manager scheme.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use memsync_dsm::{DsmConfig, Node, Scheme};

/// Aborts the process if a test hangs (a protocol deadlock must fail, not stall CI).
fn watchdog(what: &'static str, secs: u64) -> Arc<std::sync::atomic::AtomicBool> {
    watchdog_with(what, secs, Arc::default())
}

/// As [`watchdog`], and before it aborts it prints the thread stacks of every process in
/// `kids` (the node processes of a network-namespace test; a hang is usually there) and
/// kills them, so that they do not outlive the test.
fn watchdog_with(
    what: &'static str,
    secs: u64,
    kids: Arc<std::sync::Mutex<Vec<u32>>>,
) -> Arc<std::sync::atomic::AtomicBool> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&done);
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if d.load(SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what}: no progress after {secs} s (deadlock?)");
        let pids = kids.lock().unwrap().clone();
        for pid in &pids {
            dump_stacks(*pid);
        }
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::process::abort();
    });
    done
}

/// Every thread's stack of process `pid` on stderr: gdb's backtraces if gdb is installed,
/// else the kernel's view (`/proc/PID/task/*/stack`: where each thread waits). gdb writes
/// straight to this process's stderr: when `pid` is this process, a pipe read by one of its
/// threads, which gdb stops, fills up and both wait forever.
fn dump_stacks(pid: u32) {
    eprintln!("==== process {pid}: threads");
    let gdb = std::process::Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status();
    if gdb.is_ok_and(|s| s.success()) {
        return;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        eprintln!("(gone)");
        return;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
        eprintln!(
            "-- {} {}{stack}",
            t.file_name().to_string_lossy(),
            name.trim()
        );
    }
}

/// `n` listeners on loopback ports of their own, and their addresses (the nodes' peer list).
fn local_listeners(n: usize) -> (Vec<std::net::TcpListener>, Vec<String>) {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, peers)
}

fn cluster(n: usize, scheme: Scheme, size: u64) -> Vec<Node> {
    cluster_with(n, scheme, size, |_| {})
}

fn cluster_with(n: usize, scheme: Scheme, size: u64, tweak: impl Fn(&mut DsmConfig)) -> Vec<Node> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (listeners, peers) = local_listeners(n);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = DsmConfig::new(i as u16, peers.clone(), scheme, size);
            cfg.connect_timeout = Duration::from_secs(20);
            cfg.fault_deadline = Duration::from_secs(20);
            tweak(&mut cfg);
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn counter(n: usize, scheme: Scheme) {
    const THREADS: usize = 2;
    const ADDS: u64 = 2000;
    let done = watchdog("counter", 120);
    let nodes = cluster(n, scheme, 16 * 4096);
    let barrier = Barrier::new(n * THREADS);
    std::thread::scope(|s| {
        for node in &nodes {
            for t in 0..THREADS {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..ADDS {
                        node.atomic_u64(0).fetch_add(1, SeqCst);
                        // A second counter on another page, touched from another word.
                        node.atomic_u64(4096 * 3 + 8 * t).fetch_add(2, SeqCst);
                        // Interleave the nodes, so the pages move back and forth.
                        std::thread::yield_now();
                    }
                });
            }
        }
    });
    let want = (n * THREADS) as u64 * ADDS;
    for node in &nodes {
        assert_eq!(
            node.atomic_u64(0).load(SeqCst),
            want,
            "node {} {scheme}",
            node.id()
        );
        let two: u64 = (0..THREADS)
            .map(|t| node.atomic_u64(4096 * 3 + 8 * t).load(SeqCst))
            .sum();
        assert_eq!(two, 2 * want, "node {} {scheme}", node.id());
    }
    let writes: u64 = nodes
        .iter()
        .map(|n| n.stats().write_faults.load(SeqCst))
        .sum();
    eprintln!("{scheme} N={n}: {writes} write faults");
    drop(nodes);
    done.store(true, SeqCst);
}

#[test]
fn counter_centralized() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Centralized);
    }
}

#[test]
fn counter_fixed() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Fixed);
    }
}

#[test]
fn counter_dynamic() {
    for n in [2, 3, 4] {
        counter(n, Scheme::Dynamic);
    }
}

const CONS_THREADS: usize = 2;
const CONS_OPS: usize = 1500;
const CONS_PAGES: usize = 4;
/// The region of the consistency workload: its pages, then one page whose word counts the
/// nodes that finished.
const CONS_SIZE: u64 = 8 * 4096;
const CONS_DONE: usize = 6 * 4096;

/// One thread of the consistency workload (thread `t` of its node): random reads and writes
/// of word 8 of a few pages; per page, the values it saw (its own writes included), in order.
fn consistency_ops(node: &Node, t: usize, start: &Barrier) -> Vec<Vec<u64>> {
    use rand::{Rng, SeedableRng};
    let me = u64::from(node.id()) * CONS_THREADS as u64 + t as u64 + 1;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(me * 7919);
    let mut seq = 0u64;
    let mut log = vec![Vec::new(); CONS_PAGES];
    start.wait();
    for _ in 0..CONS_OPS {
        let p = rng.random_range(0..CONS_PAGES);
        // Word 8 of the page: not at its start.
        let w = node.atomic_u64(p * 4096 + 64);
        if rng.random_bool(0.3) {
            seq += 1;
            let v = (me << 32) | seq;
            w.store(v, SeqCst);
            log[p].push(v);
        } else {
            log[p].push(w.load(SeqCst));
        }
        if rng.random_bool(0.2) {
            std::thread::yield_now();
        }
    }
    log
}

/// Random reads and writes of a few pages from every node: per page, the union of every
/// thread's observation order (reads and its own writes) and each writer's program order must
/// be acyclic (one order of writes that every reader agrees with), every value read must have
/// been written, and at the end every node reads the same value.
fn consistency(n: usize, scheme: Scheme) {
    let done = watchdog("consistency", 120);
    let nodes = cluster(n, scheme, CONS_SIZE);
    let barrier = Barrier::new(n * CONS_THREADS);
    let logs: Vec<Vec<Vec<u64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .flat_map(|node| (0..CONS_THREADS).map(move |t| (node, t)))
            .map(|(node, t)| {
                let barrier = &barrier;
                s.spawn(move || consistency_ops(node, t, barrier))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let finals: Vec<Vec<u64>> = nodes.iter().map(consistency_finals).collect();
    check_consistency(&format!("{scheme} N={n}"), &logs, &finals);
    drop(nodes);
    done.store(true, SeqCst);
}

/// Word 8 of each page of the consistency workload, as `node` reads it now.
fn consistency_finals(node: &Node) -> Vec<u64> {
    (0..CONS_PAGES)
        .map(|p| node.atomic_u64(p * 4096 + 64).load(SeqCst))
        .collect()
}

/// The checks of [`consistency`] over every thread's log (`logs[thread][page]`) and every
/// node's final values (`finals[node][page]`).
fn check_consistency(label: &str, logs: &[Vec<Vec<u64>>], finals: &[Vec<u64>]) {
    for p in 0..CONS_PAGES {
        let mut edges: std::collections::HashMap<u64, std::collections::HashSet<u64>> =
            std::collections::HashMap::new();
        let mut written = std::collections::HashSet::from([0u64]);
        for log in logs {
            for &v in &log[p] {
                if v >> 32 != 0 {
                    written.insert(v);
                }
            }
        }
        for log in logs {
            for w in log[p].windows(2) {
                assert!(
                    written.contains(&w[1]),
                    "{label} page {p}: read {:#x}, never written",
                    w[1]
                );
                if w[0] != w[1] {
                    edges.entry(w[0]).or_default().insert(w[1]);
                }
            }
        }
        // Each writer's writes to this page, in its program order, after the initial zero.
        let mut mine: Vec<u64> = written.iter().copied().filter(|&v| v != 0).collect();
        mine.sort_unstable();
        for w in mine.windows(2) {
            if w[0] >> 32 == w[1] >> 32 {
                edges.entry(w[0]).or_default().insert(w[1]);
            }
        }
        for &v in &mine {
            edges.entry(0).or_default().insert(v);
        }
        for (ti, log) in logs.iter().enumerate() {
            let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            for (k, &v) in log[p].iter().enumerate() {
                let (w, q) = (v >> 32, v & 0xffff_ffff);
                if let Some(&prev) = last.get(&w) {
                    assert!(
                        q >= prev,
                        "{label} page {p}: thread {ti} saw writer {w}'s write {q} after {prev} (op {k}): {:x?}",
                        &log[p][k.saturating_sub(6)..(k + 2).min(log[p].len())]
                    );
                }
                last.insert(w, q);
            }
        }
        // Kahn: every value must come out, or the orders disagree (a cycle).
        let mut indeg: std::collections::HashMap<u64, usize> =
            written.iter().map(|&v| (v, 0)).collect();
        for tos in edges.values() {
            for t in tos {
                *indeg.entry(*t).or_default() += 1;
            }
        }
        let mut ready: Vec<u64> = indeg
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(v, _)| *v)
            .collect();
        let mut seen = 0;
        while let Some(v) = ready.pop() {
            seen += 1;
            for t in edges.get(&v).into_iter().flatten() {
                let d = indeg.get_mut(t).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.push(*t);
                }
            }
        }
        if seen != indeg.len() {
            // Show one offending pair: a thread that saw b after a while another saw a after b.
            for (ti, log) in logs.iter().enumerate() {
                for w in log[p].windows(2) {
                    if w[0] == w[1] {
                        continue;
                    }
                    for (tj, log2) in logs.iter().enumerate() {
                        for w2 in log2[p].windows(2) {
                            if w2[0] == w[1] && w2[1] == w[0] {
                                eprintln!(
                                    "thread {ti}: {:x} -> {:x}; thread {tj}: {:x} -> {:x}",
                                    w[0], w[1], w2[0], w2[1]
                                );
                            }
                        }
                    }
                }
            }
            eprintln!(
                "left over: {:x?}",
                indeg
                    .iter()
                    .filter(|(_, d)| **d > 0)
                    .take(10)
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(
            seen,
            indeg.len(),
            "{label} page {p}: the nodes saw the writes in different orders"
        );
        let finals: Vec<u64> = finals.iter().map(|f| f[p]).collect();
        assert!(
            finals.iter().all(|&v| v == finals[0]),
            "{label} page {p}: final values differ: {finals:x?}"
        );
    }
}

#[test]
fn consistency_centralized() {
    for n in [2, 3, 4] {
        consistency(n, Scheme::Centralized);
    }
}

#[test]
fn consistency_fixed() {
    for n in [2, 3, 4] {
        consistency(n, Scheme::Fixed);
    }
}

#[test]
fn consistency_dynamic() {
    for n in [2, 3, 4] {
        consistency(n, Scheme::Dynamic);
    }
}

const GRID: usize = 64;
const ITERS: usize = 12;

fn jacobi_step(src: &[f64], dst: &mut [f64], rows: std::ops::Range<usize>) {
    for i in rows {
        for j in 1..GRID - 1 {
            dst[i * GRID + j] = 0.25
                * (src[(i - 1) * GRID + j]
                    + src[(i + 1) * GRID + j]
                    + src[i * GRID + j - 1]
                    + src[i * GRID + j + 1]);
        }
    }
}

fn jacobi_init() -> Vec<f64> {
    let mut g = vec![0.0; GRID * GRID];
    for j in 0..GRID {
        g[j] = 100.0 + j as f64;
        g[(GRID - 1) * GRID + j] = -50.0;
    }
    for i in 0..GRID {
        g[i * GRID] = (i as f64).sin() * 10.0;
        g[i * GRID + GRID - 1] = 7.0;
    }
    g
}

fn to_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// Jacobi iterations on a grid in the shared region, rows split across the nodes, a barrier
/// (an atomic counter in the region) between iterations: the result is bit for bit one
/// node's.
fn jacobi(n: usize, scheme: Scheme) {
    let done = watchdog("jacobi", 120);
    let nodes = cluster(n, scheme, JACOBI_SIZE);
    let init = jacobi_init();
    nodes[0].write(0, &to_bytes(&init)).unwrap();
    nodes[0].write(GRID_BYTES, &to_bytes(&init)).unwrap();
    std::thread::scope(|s| {
        for (k, node) in nodes.iter().enumerate() {
            s.spawn(move || jacobi_rows(node, k, n));
        }
    });
    let (want, at) = jacobi_one_node();
    for node in &nodes {
        let mut got = vec![0u8; GRID_BYTES];
        node.read(at, &mut got).unwrap();
        assert!(
            from_bytes(&got) == want,
            "{scheme} N={n}: node {} differs from the one-node result",
            node.id()
        );
    }
    drop(nodes);
    done.store(true, SeqCst);
}

const GRID_BYTES: usize = GRID * GRID * 8;
/// Two grids, then one page for the barrier counter.
const JACOBI_SIZE: u64 = (2 * GRID_BYTES + 4096) as u64;
const JACOBI_BARRIER: usize = 2 * GRID_BYTES;

/// Node `k` of `n`'s share of the Jacobi iterations: its rows, then the barrier. After the
/// last barrier, every node's rows of the final grid are in.
fn jacobi_rows(node: &Node, k: usize, n: usize) {
    let interior = GRID - 2;
    let rows = 1 + k * interior / n..1 + (k + 1) * interior / n;
    for it in 0..ITERS {
        let (src, dst) = if it % 2 == 0 {
            (0, GRID_BYTES)
        } else {
            (GRID_BYTES, 0)
        };
        let mut a = vec![0u8; GRID_BYTES];
        node.read(src, &mut a).unwrap();
        let a = from_bytes(&a);
        let mut b = vec![0u8; GRID_BYTES];
        node.read(dst, &mut b).unwrap();
        let mut b = from_bytes(&b);
        jacobi_step(&a, &mut b, rows.clone());
        let row0 = rows.start * GRID;
        let row1 = rows.end * GRID;
        node.write(dst + row0 * 8, &to_bytes(&b[row0..row1]))
            .unwrap();
        node.atomic_u64(JACOBI_BARRIER).fetch_add(1, SeqCst);
        let target = (n * (it + 1)) as u64;
        while node.atomic_u64(JACOBI_BARRIER).load(SeqCst) < target {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// The grid one process computes, and the offset of the region where the nodes' result is.
fn jacobi_one_node() -> (Vec<f64>, usize) {
    let mut a = jacobi_init();
    let mut b = a.clone();
    for it in 0..ITERS {
        if it % 2 == 0 {
            jacobi_step(&a, &mut b, 1..GRID - 1);
        } else {
            jacobi_step(&b, &mut a, 1..GRID - 1);
        }
    }
    if ITERS.is_multiple_of(2) {
        (a, 0)
    } else {
        (b, GRID_BYTES)
    }
}

#[test]
fn jacobi_all_schemes() {
    for scheme in Scheme::ALL {
        for n in [2, 3, 4] {
            jacobi(n, scheme);
        }
    }
}

/// A node of the network-namespace tests, run as a child process: it runs its share of the
/// workload `DSM_WORK` (`counter`, `consistency` or `jacobi`), prints what the parent checks
/// (`RESULT ...` lines), and keeps serving until its stdin closes (the parent closes it once
/// every node has printed).
#[test]
fn child_node() {
    if !memsync_testkit::child::is_child("DSM_CHILD", "node") {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let id: u16 = var("DSM_ID").parse().unwrap();
    let peers: Vec<String> = var("DSM_PEERS").split(',').map(str::to_owned).collect();
    let scheme: Scheme = var("DSM_SCHEME").parse().unwrap();
    let work = var("DSM_WORK");
    let n = peers.len();
    let size = match work.as_str() {
        "counter" => 4 * 4096,
        "consistency" => CONS_SIZE,
        "jacobi" => JACOBI_SIZE,
        w => panic!("unknown DSM_WORK {w}"),
    };
    let mut cfg = DsmConfig::new(id, peers, scheme, size);
    cfg.connect_timeout = Duration::from_secs(30);
    let node = Node::bind_and_start(cfg).unwrap();
    // Every node's part is in once this word (on a page of its own) reaches `n`.
    let all_done = |word: usize| {
        node.atomic_u64(word).fetch_add(1, SeqCst);
        while node.atomic_u64(word).load(SeqCst) < n as u64 {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    match work.as_str() {
        "counter" => {
            let adds: u64 = var("DSM_ADDS").parse().unwrap();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..adds {
                            node.atomic_u64(0).fetch_add(1, SeqCst);
                            std::thread::yield_now();
                        }
                    });
                }
            });
            while node.atomic_u64(0).load(SeqCst) < 2 * adds * n as u64 {
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("RESULT {}", node.atomic_u64(0).load(SeqCst));
        }
        "consistency" => {
            let start = Barrier::new(CONS_THREADS);
            let logs: Vec<Vec<Vec<u64>>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..CONS_THREADS)
                    .map(|t| {
                        let (node, start) = (&node, &start);
                        s.spawn(move || consistency_ops(node, t, start))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            all_done(CONS_DONE);
            let hex = |v: &[u64]| v.iter().map(|x| format!("{x:x}")).collect::<Vec<_>>();
            for log in &logs {
                let pages: Vec<String> = log.iter().map(|p| hex(p).join(",")).collect();
                println!("RESULT log {}", pages.join(";"));
            }
            println!("RESULT final {}", hex(&consistency_finals(&node)).join(","));
        }
        "jacobi" => {
            if id == 0 {
                let init = jacobi_init();
                node.write(0, &to_bytes(&init)).unwrap();
                node.write(GRID_BYTES, &to_bytes(&init)).unwrap();
            }
            // The grids are written before anyone starts: a start barrier of its own.
            all_done(JACOBI_BARRIER + 8);
            jacobi_rows(&node, usize::from(id), n);
            let (_, at) = jacobi_one_node();
            let mut got = vec![0u8; GRID_BYTES];
            node.read(at, &mut got).unwrap();
            let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
            println!("RESULT grid {hex}");
        }
        _ => unreachable!(),
    }
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    drop(node);
}

/// Starts `n` node processes (the test `child`, with `DSM_CHILD=tag`), node `i` in namespace
/// `a` where `in_a(i)`, else in `b`; every node gets its id, the peers, the scheme and `env`.
fn spawn_nodes(
    ns: &memsync_testkit::netns::Netns,
    n: usize,
    in_a: &dyn Fn(usize) -> bool,
    child: &str,
    tag: &str,
    scheme: Scheme,
    env: &[(&str, String)],
) -> Vec<std::process::Child> {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().unwrap();
    let place = |i: usize| {
        if in_a(i) {
            (&ns.a, &ns.a_addr)
        } else {
            (&ns.b, &ns.b_addr)
        }
    };
    let peers: Vec<String> = (0..n)
        .map(|i| format!("{}:{}", place(i).1, 17000 + i))
        .collect();
    (0..n)
        .map(|i| {
            Command::new("ip")
                .args(["netns", "exec", place(i).0])
                .arg(&exe)
                .args(["--exact", child, "--nocapture", "--test-threads=1"])
                .env("DSM_CHILD", tag)
                .env("DSM_ID", i.to_string())
                .env("DSM_PEERS", peers.join(","))
                .env("DSM_SCHEME", scheme.to_string())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Runs `n` nodes of `work` as `n` processes in the two namespaces of `ns` (joined by a veth
/// pair; the nodes alternate between them) and returns each node's `RESULT` lines, once every
/// node printed them and exited successfully.
fn netns_run(
    ns: &memsync_testkit::netns::Netns,
    scheme: Scheme,
    n: usize,
    work: &str,
    lines_per_node: usize,
    env: &[(&str, String)],
) -> Vec<Vec<String>> {
    use std::io::BufRead;
    let alternate = |i: usize| i.is_multiple_of(2);
    let mut env = env.to_vec();
    env.push(("DSM_WORK", work.to_owned()));
    let mut kids = spawn_nodes(ns, n, &alternate, "child_node", "node", scheme, &env);
    // Each child's stdout is read to its end (a closed pipe would fail the child).
    let readers: Vec<_> = kids
        .iter_mut()
        .map(|k| {
            let out = std::io::BufReader::new(k.stdout.take().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    // libtest prints the test's name on the same line.
                    if let Some((_, v)) = l.split_once("RESULT ") {
                        let _ = tx.send(v.trim().to_owned());
                    }
                }
            });
            rx
        })
        .collect();
    let results: Vec<Vec<String>> = readers
        .iter()
        .enumerate()
        .map(|(i, rx)| {
            (0..lines_per_node)
                .map(|_| {
                    rx.recv().unwrap_or_else(|_| {
                        panic!("{work} {scheme} N={n}: node {i} printed too little")
                    })
                })
                .collect()
        })
        .collect();
    for k in &mut kids {
        drop(k.stdin.take());
    }
    for k in &mut kids {
        assert!(
            k.wait().unwrap().success(),
            "{work} {scheme} N={n}: a node failed"
        );
    }
    results
}

/// N = 2, 3, 4 nodes as processes in two network namespaces, for each scheme: the counter
/// ends at exactly the sum on every node.
#[test]
fn netns_counter() {
    let Some(ns) = memsync_testkit::netns::Netns::create("netns_counter", 16) else {
        return;
    };
    let done = watchdog("netns_counter", 240);
    const ADDS: u64 = 500;
    for scheme in Scheme::ALL {
        for n in [2usize, 3, 4] {
            let results = netns_run(
                &ns,
                scheme,
                n,
                "counter",
                1,
                &[("DSM_ADDS", ADDS.to_string())],
            );
            let want = (2 * ADDS * n as u64).to_string();
            assert!(
                results.iter().all(|r| r[0] == want),
                "{scheme} N={n}: {results:?}, expected {want}"
            );
        }
    }
    done.store(true, SeqCst);
}

/// The consistency workload between N = 2, 3, 4 processes in two network namespaces, for
/// each scheme: every thread's log and every node's final values pass [`check_consistency`].
#[test]
fn netns_consistency() {
    let Some(ns) = memsync_testkit::netns::Netns::create("netns_consistency", 17) else {
        return;
    };
    let done = watchdog("netns_consistency", 300);
    let parse = |s: &str| -> Vec<u64> {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| u64::from_str_radix(x, 16).unwrap())
            .collect()
    };
    for scheme in Scheme::ALL {
        for n in [2usize, 3, 4] {
            let results = netns_run(&ns, scheme, n, "consistency", CONS_THREADS + 1, &[]);
            let mut logs = Vec::new();
            let mut finals = Vec::new();
            for r in &results {
                for line in r {
                    if let Some(l) = line.strip_prefix("log ") {
                        let pages: Vec<Vec<u64>> = l.split(';').map(parse).collect();
                        assert_eq!(pages.len(), CONS_PAGES, "{line}");
                        logs.push(pages);
                    } else if let Some(f) = line.strip_prefix("final ") {
                        finals.push(parse(f));
                    }
                }
            }
            assert_eq!(logs.len(), n * CONS_THREADS);
            assert_eq!(finals.len(), n);
            check_consistency(&format!("netns {scheme} N={n}"), &logs, &finals);
        }
    }
    done.store(true, SeqCst);
}

/// Jacobi split across N = 2, 3, 4 processes in two network namespaces, for each scheme:
/// every node reads the grid one process computes, bit for bit.
#[test]
fn netns_jacobi() {
    let Some(ns) = memsync_testkit::netns::Netns::create("netns_jacobi", 18) else {
        return;
    };
    let done = watchdog("netns_jacobi", 300);
    let (want, _) = jacobi_one_node();
    let want: String = to_bytes(&want).iter().map(|b| format!("{b:02x}")).collect();
    for scheme in Scheme::ALL {
        for n in [2usize, 3, 4] {
            let results = netns_run(&ns, scheme, n, "jacobi", 1, &[]);
            for (i, r) in results.iter().enumerate() {
                let got = r[0].strip_prefix("grid ").unwrap();
                assert!(
                    got == want,
                    "{scheme} N={n}: node {i} differs from the one-node result"
                );
            }
        }
    }
    done.store(true, SeqCst);
}

/// Kill one node of three mid-run: the others keep incrementing a counter on a page they can
/// reach (its final value is exactly their sum), and the pages whose only copy was on the dead
/// node are reported lost by the API, or, with a backing store, reloaded from what the dead
/// node flushed last.
fn node_loss(scheme: Scheme, backing: bool) {
    const ADDS: u64 = 1500;
    let done = watchdog("node_loss", 120);
    let size = 8 * 4096u64;
    let store: Option<memsync_core::DynStore> =
        backing.then(|| Arc::new(memsync_local::MemStore::new(size)) as _);
    let mut nodes = cluster_with(3, scheme, size, |cfg| {
        cfg.fault_deadline = Duration::from_secs(2);
        cfg.backing = store.clone();
    });
    // Node 2 becomes the only holder of pages 3 and 4 (managed by nodes 0 and 1).
    nodes[2].write(3 * 4096, &[0xab; 4096]).unwrap();
    nodes[2].write(4 * 4096, &[0xab; 4096]).unwrap();
    if backing {
        nodes[2].flush().unwrap();
        // Not flushed: lost with the node.
        nodes[2].write(4 * 4096 + 100, &[0xcd; 8]).unwrap();
    }
    let mut copy = [0u8; 8];
    nodes[2].read(0, &mut copy).unwrap();
    let barrier = Barrier::new(3);
    let dead = nodes.pop().unwrap();
    std::thread::scope(|s| {
        for node in &nodes {
            let barrier = &barrier;
            s.spawn(move || {
                for k in 0..ADDS {
                    if k == ADDS / 3 {
                        barrier.wait();
                    }
                    node.atomic_u64(0).fetch_add(1, SeqCst);
                    std::thread::yield_now();
                }
            });
        }
        barrier.wait();
        drop(dead);
    });
    for node in &nodes {
        while node.is_up(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(node.atomic_u64(0).load(SeqCst), 2 * ADDS, "{scheme}");
        for page in [3usize, 4] {
            let mut buf = vec![0u8; 4096];
            let r = node.read(page * 4096, &mut buf);
            if backing {
                r.unwrap_or_else(|e| panic!("{scheme}: page {page} at node {}: {e}", node.id()));
                assert!(buf.iter().all(|&b| b == 0xab), "{scheme}: page {page}");
            } else {
                let e = r.expect_err("a lost page must be an error");
                assert!(e.to_string().contains("page"), "{e}");
            }
        }
    }
    drop(nodes);
    done.store(true, SeqCst);
}

#[test]
fn node_loss_reported() {
    for scheme in Scheme::ALL {
        node_loss(scheme, false);
    }
}

#[test]
fn node_loss_reloaded_from_backing() {
    for scheme in Scheme::ALL {
        node_loss(scheme, true);
    }
}

/// Dynamic scheme, four nodes: ownership moves through several nodes so that probable-owner
/// chains pass through node `dead`, which then dies. The survivors still reach every page
/// that has a live owner or a live copy (the heir finds the owner, or makes the holder of a
/// copy the owner), keep two counters on such pages exact, and get an error for the pages
/// whose only copy died.
fn dynamic_chain(dead: usize) {
    const ADDS: u64 = 600;
    let done = watchdog("node_loss_dynamic_chain", 150);
    let mut nodes = cluster_with(4, Scheme::Dynamic, 8 * 4096, |cfg| {
        cfg.fault_deadline = Duration::from_secs(2);
    });
    let live: Vec<usize> = (0..4).filter(|&i| i != dead).collect();
    let (l0, l1, l2) = (live[0], live[1], live[2]);
    let mark = |i: usize, page: usize| 0x1000 * (i as u64 + 1) + page as u64;
    let w = |i: usize, page: usize| {
        nodes[i]
            .atomic_u64(page * 4096)
            .store(mark(i, page), SeqCst)
    };
    // Page 1: owned by l0, dead, l1, then l2 (l0 points at the dead node, which points on).
    for i in [l0, dead, l1, l2] {
        w(i, 1);
    }
    // Page 2: last owned by the dead node, no copies: lost.
    for i in [l0, l1, dead] {
        w(i, 2);
    }
    // Page 3: last owned by the dead node, read copies at l1 and l2: a copy holder takes over.
    for i in [l0, dead] {
        w(i, 3);
    }
    for i in [l1, l2] {
        assert_eq!(nodes[i].atomic_u64(3 * 4096).load(SeqCst), mark(dead, 3));
    }
    // Page 2, and the untouched pages the dead node owned at first (`p mod 4`): lost.
    let lost: Vec<usize> = (0..8)
        .filter(|&p| p == 2 || (p % 4 == dead && p != 1 && p != 3))
        .collect();
    drop(nodes.remove(dead));
    let nodes: Vec<Node> = nodes;
    for node in &nodes {
        while node.is_up(dead as u16) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let at = |i: usize| nodes.iter().find(|n| usize::from(n.id()) == i).unwrap();
    // Through the chain l0 -> dead: the heir (l0, the lowest live node) finds l2.
    assert_eq!(at(l0).atomic_u64(4096).load(SeqCst), mark(l2, 1));
    assert_eq!(at(l0).atomic_u64(3 * 4096).load(SeqCst), mark(dead, 3));
    assert!(
        at(l0).stats().recoveries.load(SeqCst) >= 2,
        "the heir recovered"
    );
    for i in [l1, l2] {
        assert_eq!(
            at(i).stats().recoveries.load(SeqCst),
            0,
            "node {i} is no heir"
        );
    }
    let barrier = Barrier::new(nodes.len() * 2);
    std::thread::scope(|s| {
        for node in &nodes {
            for t in 0..2 {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..ADDS {
                        node.atomic_u64(4096 + 8 + 8 * t).fetch_add(1, SeqCst);
                        node.atomic_u64(3 * 4096 + 8 + 8 * t).fetch_add(1, SeqCst);
                        std::thread::yield_now();
                    }
                });
            }
        }
    });
    let want = nodes.len() as u64 * ADDS;
    for node in &nodes {
        for page in [1, 3] {
            let got: u64 = (0..2)
                .map(|t| node.atomic_u64(page * 4096 + 8 + 8 * t).load(SeqCst))
                .sum();
            assert_eq!(
                got,
                2 * want,
                "dead {dead}: page {page} at node {}",
                node.id()
            );
        }
        assert_eq!(node.atomic_u64(4096).load(SeqCst), mark(l2, 1));
        assert_eq!(node.atomic_u64(3 * 4096).load(SeqCst), mark(dead, 3));
        // Every other page is reachable (the untouched ones read as zeros).
        for page in (0..8).filter(|p| ![1, 3].contains(p) && !lost.contains(p)) {
            let mut buf = vec![1u8; 4096];
            node.read(page * 4096, &mut buf)
                .unwrap_or_else(|e| panic!("dead {dead}: page {page} at node {}: {e}", node.id()));
            assert!(buf.iter().all(|&b| b == 0), "dead {dead}: page {page}");
        }
        for &page in &lost {
            let mut buf = vec![0u8; 4096];
            let e = node
                .read(page * 4096, &mut buf)
                .expect_err("a lost page must be an error");
            assert!(e.to_string().contains("page"), "{e}");
            let e = node
                .write(page * 4096, &[1])
                .expect_err("a lost page must be an error");
            assert!(e.to_string().contains("page"), "{e}");
        }
    }
    drop(nodes);
    done.store(true, SeqCst);
}

/// Dynamic scheme, four nodes: every node, node 3 included, writes its own word of pages 1
/// and 2 in turn (through the API), counting up; node 3 is dropped mid-run, whatever it holds.
/// For each page the survivors then either all find it lost (an error), or find every
/// survivor's word exactly at its last count: never older data.
#[test]
fn node_loss_dynamic_mid_run() {
    const WRITES: u64 = 400;
    let done = watchdog("node_loss_dynamic_mid_run", 150);
    let mut nodes = cluster_with(4, Scheme::Dynamic, 4 * 4096, |cfg| {
        cfg.fault_deadline = Duration::from_secs(2);
    });
    let victim = nodes.pop().unwrap();
    let barrier = &Barrier::new(4);
    let counts: Vec<[u64; 2]> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|node| {
                s.spawn(move || {
                    let word = 8 * usize::from(node.id());
                    let mut last = [0u64; 2];
                    for k in 1..=WRITES {
                        if k == WRITES / 3 {
                            barrier.wait();
                        }
                        for (i, page) in [1usize, 2].into_iter().enumerate() {
                            if last[i] == k - 1
                                && node.write(page * 4096 + word, &k.to_le_bytes()).is_ok()
                            {
                                last[i] = k;
                            }
                        }
                        std::thread::yield_now();
                    }
                    last
                })
            })
            .collect();
        s.spawn(move || {
            for k in 1..=WRITES {
                if k == WRITES / 3 {
                    barrier.wait();
                    drop(victim);
                    return;
                }
                for page in [1usize, 2] {
                    let _ = victim.write(page * 4096 + 24, &k.to_le_bytes());
                }
                std::thread::yield_now();
            }
        });
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for node in &nodes {
        while node.is_up(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for (i, page) in [1usize, 2].into_iter().enumerate() {
        let seen: Vec<Option<Vec<u64>>> = nodes
            .iter()
            .map(|node| {
                let mut buf = vec![0u8; 24];
                node.read(page * 4096, &mut buf).ok().map(|_| {
                    buf.chunks(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .collect()
                })
            })
            .collect();
        let want: Vec<u64> = counts.iter().map(|c| c[i]).collect();
        eprintln!("page {page}: wrote {want:?}, read {seen:?}");
        if seen.iter().all(Option::is_none) {
            continue;
        }
        for (n, s) in seen.iter().enumerate() {
            assert_eq!(s.as_ref(), Some(&want), "page {page} at node {n}");
        }
    }
    drop(nodes);
    done.store(true, SeqCst);
}

#[test]
fn node_loss_dynamic_chain() {
    // The heir is node 0, then node 1 (node 0 died).
    for dead in [2, 0] {
        dynamic_chain(dead);
    }
}

/// The node of [`netns_node_killed`], a child process: node 2 (the victim) becomes the only
/// holder of page 2, says `READY`, then reads the counter page until it is killed; the others
/// add to a counter on page 0 (saying `HALF` a third of the way), wait until the victim is
/// down, and print the counter and whether page 2 is reported lost.
#[test]
fn child_node_loss() {
    if !memsync_testkit::child::is_child("DSM_CHILD", "loss") {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let id: u16 = var("DSM_ID").parse().unwrap();
    let peers: Vec<String> = var("DSM_PEERS").split(',').map(str::to_owned).collect();
    let scheme: Scheme = var("DSM_SCHEME").parse().unwrap();
    let adds: u64 = var("DSM_ADDS").parse().unwrap();
    let secs = |k: &str, default: u64| {
        Duration::from_secs(std::env::var(k).map_or(default, |v| v.parse().unwrap()))
    };
    // Warnings on stderr by default: a fault that fails until its deadline says so before
    // its SIGBUS, which ends the process without a word.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let mut cfg = DsmConfig::new(id, peers, scheme, 4 * 4096);
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.fault_deadline = secs("DSM_DEADLINE", 3);
    cfg.dead_after = secs("DSM_DEAD_AFTER", 10);
    let node = Node::bind_and_start(cfg).unwrap();
    if id == 2 {
        node.write(2 * 4096, &[0x5a; 4096]).unwrap();
        println!("READY");
        loop {
            let _ = node.atomic_u64(0).load(SeqCst);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    std::thread::scope(|s| {
        for t in 0..2 {
            let node = &node;
            s.spawn(move || {
                for k in 0..adds {
                    if t == 0 && k == adds / 3 {
                        println!("HALF");
                    }
                    node.atomic_u64(0).fetch_add(1, SeqCst);
                    std::thread::yield_now();
                }
            });
        }
    });
    // Far longer than a run takes: say what this node sees and fail, instead of leaving
    // the parent to its watchdog (a survivor that waits here forever has nothing to fault
    // on, so its stacks alone do not tell why).
    let since = std::time::Instant::now();
    let stuck = |what: &str| {
        if since.elapsed() > Duration::from_secs(150) {
            eprintln!("node {id}: still waiting for {what}");
            dump_node(&node);
            dump_stacks(std::process::id());
            std::process::exit(3);
        }
    };
    while node.is_up(2) {
        stuck("node 2 to be down");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The other survivor's increments.
    while node.atomic_u64(0).load(SeqCst) < 2 * adds * 2 {
        stuck("the other survivor's increments");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut buf = vec![0u8; 4096];
    let lost = node.read(2 * 4096, &mut buf).is_err();
    println!("RESULT {} {lost}", node.atomic_u64(0).load(SeqCst));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    drop(node);
}

/// Child processes killed when the test fails: a survivor left behind would run on after
/// the test (it waits for the dead node's part, or on its stdin).
struct KillOnDrop(Vec<std::process::Child>);

impl std::ops::Deref for KillOnDrop {
    type Target = Vec<std::process::Child>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for k in &mut self.0 {
            if matches!(k.try_wait(), Ok(None)) {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
    }
}

/// A node's view on stderr: who is up, the counter, each page's state here, the counters.
fn dump_node(node: &Node) {
    let up: Vec<bool> = (0..node.nodes() as u16).map(|n| node.is_up(n)).collect();
    let pages: Vec<_> = (0..4).map(|p| node.page_state(p)).collect();
    eprintln!(
        "node {}: up {up:?}, counter {}, pages (owner, access) {pages:?}\n{:?}",
        node.id(),
        node.atomic_u64(0).load(SeqCst),
        node.stats()
    );
}

/// Three node processes in two network namespaces, for each scheme: node 2 is SIGKILLed
/// while the other two add to a counter (node 2 holds read copies of its page); they carry
/// on, the counter ends at exactly their sum, and the page whose only copy was on node 2 is
/// reported lost.
#[test]
fn netns_node_killed() {
    node_loss_in_netns("netns_node_killed", 19, false);
}

/// As [`netns_node_killed`], but node 2's host goes silent instead of its process dying: node
/// 2, alone in its namespace, is stopped (SIGSTOP) and the link to it cut, so no FIN or RST
/// ever comes. The others notice the silence within `dead_after` (TCP keepalive and
/// `TCP_USER_TIMEOUT`), then carry on as when the process died.
#[test]
fn netns_host_silent() {
    node_loss_in_netns("netns_host_silent", 20, true);
}

fn node_loss_in_netns(test: &'static str, tag: u8, silent: bool) {
    use std::io::BufRead;
    let Some(ns) = memsync_testkit::netns::Netns::create(test, tag) else {
        return;
    };
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = watchdog_with(test, 300, Arc::clone(&pids));
    const ADDS: u64 = 1500;
    for scheme in Scheme::ALL {
        let n = 3usize;
        // Silent: node 2 alone behind the link that is cut; else the nodes alternate.
        let in_a = |i: usize| if silent { i != 2 } else { i.is_multiple_of(2) };
        let mut env = vec![("DSM_ADDS", ADDS.to_string())];
        if silent {
            env.push(("DSM_DEAD_AFTER", "2".to_owned()));
            env.push(("DSM_DEADLINE", "10".to_owned()));
        }
        let mut kids = KillOnDrop(spawn_nodes(
            &ns,
            n,
            &in_a,
            "child_node_loss",
            "loss",
            scheme,
            &env,
        ));
        *pids.lock().unwrap() = kids.iter().map(std::process::Child::id).collect();
        // Every line of every child, tagged with the child's index.
        let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
        for (i, k) in kids.iter_mut().enumerate() {
            let out = std::io::BufReader::new(k.stdout.take().unwrap());
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    let _ = tx.send((i, l));
                }
            });
        }
        drop(tx);
        let (mut ready, mut half) = (false, 0);
        let mut results = Vec::new();
        let mut killed = false;
        while results.len() < n - 1 {
            // A node that exits (a survivor's SIGBUS, a panic) fails the run at once: the
            // other survivor would wait for its increments forever.
            let (i, l) = loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(x) => break x,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        panic!("{scheme}: every node ended early")
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                for (i, k) in kids.iter_mut().enumerate() {
                    if i == 2 && killed {
                        continue;
                    }
                    if let Some(status) = k.try_wait().unwrap() {
                        panic!("{scheme}: node {i} exited before the end: {status}");
                    }
                }
            };
            if l.contains("READY") {
                ready = true;
            } else if l.contains("HALF") {
                half += 1;
            } else if let Some((_, v)) = l.split_once("RESULT ") {
                let (count, lost) = v.trim().split_once(' ').unwrap();
                results.push((i, count.parse::<u64>().unwrap(), lost == "true"));
            }
            if ready && half > 0 && !killed {
                if silent {
                    let pid = kids[2].id().to_string();
                    let stopped = std::process::Command::new("kill")
                        .args(["-STOP", &pid])
                        .status()
                        .unwrap();
                    assert!(stopped.success(), "kill -STOP {pid}");
                    assert!(ns.link(false), "cutting the link");
                } else {
                    kids[2].kill().unwrap();
                }
                killed = true;
            }
        }
        assert!(
            killed,
            "{scheme}: node 2 was not stopped before the results"
        );
        if silent {
            let _ = kids[2].kill();
            assert!(ns.link(true), "restoring the link");
        }
        let _ = kids[2].wait();
        for k in &mut kids[..2] {
            drop(k.stdin.take());
        }
        for k in &mut kids[..2] {
            assert!(k.wait().unwrap().success(), "{scheme}: a node failed");
        }
        let want = 2 * ADDS * 2;
        for (i, count, lost) in results {
            assert_eq!(count, want, "{scheme}: node {i}");
            assert!(lost, "{scheme}: node {i} read page 2, whose only copy died");
        }
    }
    done.store(true, SeqCst);
}

fn make_certs(dir: &std::path::Path, name: &str, tag: &str) {
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
    std::fs::write(dir.join(format!("ca{tag}.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("cert{tag}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("key{tag}.pem")), key.serialize_pem()).unwrap();
}

/// Nodes over TLS keep the counter exact; a node whose certificate another CA signed is not
/// let in (the cluster does not start).
#[test]
fn tls_between_nodes() {
    let done = watchdog("tls", 120);
    let dir = memsync_testkit::child::TempDir::new("dsm-tls");
    let d = dir.0.clone();
    make_certs(&d, "dsm.test", "");
    make_certs(&d, "dsm.test", "-other");
    let tls = |tag: &str| {
        memsync_dsm::DsmTls::from_files(
            &d.join(format!("cert{tag}.pem")),
            &d.join(format!("key{tag}.pem")),
            &d.join(format!("ca{tag}.pem")),
            "dsm.test",
        )
        .unwrap()
    };
    let nodes = cluster_with(2, Scheme::Fixed, 4 * 4096, |cfg| cfg.tls = Some(tls("")));
    std::thread::scope(|s| {
        for node in &nodes {
            s.spawn(move || {
                for _ in 0..500 {
                    node.atomic_u64(8).fetch_add(1, SeqCst);
                    std::thread::yield_now();
                }
            });
        }
    });
    for node in &nodes {
        assert_eq!(node.atomic_u64(8).load(SeqCst), 1000);
    }
    drop(nodes);
    // Node 1 trusts another CA: its handshake with node 0 fails.
    let (listeners, peers) = local_listeners(2);
    let hs: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = DsmConfig::new(i as u16, peers.clone(), Scheme::Fixed, 4 * 4096);
            cfg.connect_timeout = Duration::from_secs(3);
            cfg.tls = Some(tls(if i == 0 { "" } else { "-other" }));
            std::thread::spawn(move || Node::start(cfg, l))
        })
        .collect();
    let started: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap().is_ok()).collect();
    assert_eq!(started, [false, false], "nodes of different CAs connected");
    done.store(true, SeqCst);
}

/// A backing store whose reads report that they started, then wait until the gate opens.
#[derive(Debug)]
struct Gated {
    inner: memsync_local::MemStore,
    open: tokio::sync::watch::Receiver<bool>,
    entered: std::sync::mpsc::Sender<()>,
}

#[memsync_core::async_trait]
impl memsync_core::Store for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> memsync_core::Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
        let _ = self.entered.send(());
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: memsync_core::Bytes) -> memsync_core::Result<()> {
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> memsync_core::Result<()> {
        self.inner.flush().await
    }
}

/// Invalidations never wait behind faults: node 0's only fault-handler thread is busy with a
/// read fault whose data (node 0's backing store) does not come until the test says so;
/// meanwhile node 1 writes a page node 0 holds a copy of, and that write (its invalidation
/// at node 0) completes before the busy fault does. It used to wait for the fault: dropping
/// the copy waited until a handler thread had read the drop's `REMOVE` event.
#[test]
fn invalidation_not_behind_busy_handlers() {
    use memsync_core::Store as _;
    let done = watchdog("invalidation_not_behind_busy_handlers", 120);
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let size = 4 * 4096u64;
    let gated: memsync_core::DynStore = Arc::new(Gated {
        inner: memsync_local::MemStore::new(size),
        open: open_rx,
        entered: entered_tx,
    });
    assert_eq!(gated.size(), size);
    let nodes = cluster_with(2, Scheme::Fixed, size, |cfg| {
        cfg.handler_threads = 1;
        // Longer than the wait below: the busy fault must not fail first.
        cfg.fault_deadline = Duration::from_secs(90);
        if cfg.id == 0 {
            cfg.backing = Some(Arc::clone(&gated));
        }
    });
    // Node 0 takes a read copy of page 1 (owned by node 1).
    assert_eq!(nodes[0].atomic_u64(4096).load(SeqCst), 0);
    let (wrote_tx, wrote_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        // Node 0's handler fills page 0 (node 0's own) from the gated store.
        let busy = s.spawn(|| nodes[0].atomic_u64(0).load(SeqCst));
        entered_rx.recv().unwrap();
        s.spawn(|| {
            nodes[1].atomic_u64(4096).store(7, SeqCst);
            let _ = wrote_tx.send(());
        });
        let wrote = wrote_rx.recv_timeout(Duration::from_secs(30));
        // Open the gate either way, so that the test ends.
        open_tx.send_replace(true);
        assert!(
            wrote.is_ok(),
            "node 1's write waited for node 0's busy fault handler"
        );
        assert_eq!(busy.join().unwrap(), 0);
    });
    assert_eq!(nodes[0].atomic_u64(4096).load(SeqCst), 7);
    drop(nodes);
    done.store(true, SeqCst);
}

/// One frame from a raw connection (the fake node's side of the wire).
fn read_frame(s: &mut std::net::TcpStream) -> memsync_dsm::proto::Msg {
    use std::io::Read;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    memsync_dsm::proto::Msg::decode(body.into()).unwrap()
}

/// A request from a node that dies while the request waits for the manager's page lock (the
/// page is busy with the same node's earlier request) is never answered, and nobody confirms
/// it: the manager must not hold the page for it. Node 2 is a fake node speaking the protocol
/// on raw sockets, so the race is exact: its second REQUEST is queued behind its first until
/// its connection ends. Node 1 must then still read and write the page within its deadline.
#[test]
fn manager_drops_request_of_dead_node() {
    use memsync_dsm::proto::{Msg, Want};
    use std::io::Write;
    let done = watchdog("manager_drops_request_of_dead_node", 120);
    for scheme in [Scheme::Centralized, Scheme::Fixed] {
        let size = 4 * 4096u64;
        let (listeners, peers) = local_listeners(3);
        let starts: Vec<_> = listeners
            .into_iter()
            .take(2)
            .enumerate()
            .map(|(i, l)| {
                let mut cfg = DsmConfig::new(i as u16, peers.clone(), scheme, size);
                cfg.connect_timeout = Duration::from_secs(20);
                cfg.fault_deadline = Duration::from_secs(2);
                std::thread::spawn(move || Node::start(cfg, l))
            })
            .collect();
        let hello = Msg::Hello {
            node: 2,
            nodes: 3,
            scheme: scheme.to_u8(),
            page_size: 4096,
            pages: size / 4096,
        };
        let mut conns: Vec<std::net::TcpStream> = peers[..2]
            .iter()
            .map(|addr| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&hello.encode()).unwrap();
                assert!(matches!(read_frame(&mut s), Msg::Hello { .. }));
                s
            })
            .collect();
        let nodes: Vec<Node> = starts
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        // Page 0: managed and owned by node 0 in both schemes.
        for req in [1, 2] {
            let m = Msg::Request {
                want: Want::Read,
                req,
                page: 0,
                from: 2,
            };
            conns[0].write_all(&m.encode()).unwrap();
        }
        // One request is served (and holds the page until its CONFIRM, which never comes);
        // the other waits behind it.
        loop {
            if let Msg::Page { .. } = read_frame(&mut conns[0]) {
                break;
            }
        }
        conns.clear();
        for node in &nodes {
            while node.is_up(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut buf = [0u8; 8];
        nodes[1]
            .read(0, &mut buf)
            .unwrap_or_else(|e| panic!("{scheme}: read after node 2 died: {e}"));
        nodes[1]
            .write(0, &[7; 8])
            .unwrap_or_else(|e| panic!("{scheme}: write after node 2 died: {e}"));
        nodes[0].read(0, &mut buf).unwrap();
        assert_eq!(buf, [7; 8], "{scheme}");
    }
    done.store(true, SeqCst);
}
