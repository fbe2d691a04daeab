//! The library API in one process: this process plays the VMM (its own memory registered with
//! a userfaultfd, sent over a socket pair) and a `Handler` serves it from a `mem:` store.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memsync_core::layers::{Inject, OpKind, OpSet};
use memsync_core::{Bytes, Caps, DynStore, Extent, ExtentKind, Store};
use memsync_sys::{Advice, Features, MapOptions, Mapping, OpenFlags, RegisterMode, Uffd, send_fds};
use memsync_vmm::firecracker::{self, Exit, Handler, HandlerConfig};
use rand::{RngCore, SeedableRng};

const SIZE: usize = 4 << 20;

fn store(data: &[u8]) -> DynStore {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut reg = memsync_core::Registry::new();
    memsync_local::register(&mut reg);
    let s = rt
        .block_on(reg.open(&format!("mem:{}", data.len())))
        .unwrap();
    rt.block_on(s.write(0, Bytes::copy_from_slice(data)))
        .unwrap();
    s
}

#[test]
fn handler_serves_this_process_and_zeros_removed_pages() {
    let mut data = vec![0u8; SIZE];
    rand::rngs::SmallRng::seed_from_u64(3).fill_bytes(&mut data);
    let map = Mapping::anonymous_with(
        SIZE,
        MapOptions {
            align: 2 << 20,
            ..MapOptions::default()
        },
    )
    .unwrap();
    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    })
    .unwrap();
    uffd.api(Features::EVENT_REMOVE).unwrap();
    uffd.register(&map, RegisterMode::MISSING).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{SIZE},"offset":0,"page_size_kib":4096}}]"#,
        map.addr()
    );
    send_fds(&a, json.as_bytes(), &[uffd.as_fd()]).unwrap();
    let hs = firecracker::receive_handshake(&b, Duration::from_secs(5)).unwrap();
    assert_eq!(hs.peer.pid, i32::try_from(std::process::id()).unwrap());
    assert_eq!(hs.memory_size(), SIZE as u64);
    let mut h = Handler::start(
        hs,
        store(&data),
        HandlerConfig {
            chunk_size: 16 << 10,
            hint: Some(format!("{}\n", SIZE - 4096)),
            ..HandlerConfig::default()
        },
    )
    .unwrap();
    assert_eq!(h.chunk_size(), 16 << 10);
    let mut got = vec![0u8; SIZE];
    map.read_at(0, &mut got);
    assert!(got == data, "memory differs from the store");
    assert!(h.region().wait_pull(Duration::from_secs(60)));
    assert!(h.region().is_complete());
    // A partial-chunk removal: those pages read zeros, their chunk neighbours keep their data.
    map.advise(8192, 4096, Advice::DontNeed).unwrap();
    let mut chunk = vec![0u8; 16 << 10];
    map.read_at(0, &mut chunk);
    assert_eq!(chunk[..8192], data[..8192]);
    assert!(chunk[8192..12288].iter().all(|&x| x == 0));
    assert_eq!(chunk[12288..], data[12288..16384]);
    assert!(h.source().is_removed(8192) && !h.source().is_removed(4096));
    // A second message is refused and counted; the stop flag ends `run`.
    send_fds(&a, b"[]", &[uffd.as_fd()]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        s2.store(true, std::sync::atomic::Ordering::Release);
    });
    assert_eq!(h.run(Some(&b), &stop), Exit::Stopped);
    t.join().unwrap();
    assert_eq!(h.second_messages(), 1);
    assert!(h.errors().is_empty(), "{:?}", h.errors());
}

/// A store that logs every read (offset, length) before passing it on; `extents: false` hides
/// the inner store's extents (a store that cannot report them).
#[derive(Debug)]
struct ReadLog {
    inner: DynStore,
    extents: bool,
    reads: Mutex<Vec<(u64, u64)>>,
}

impl ReadLog {
    fn new(inner: DynStore, extents: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            extents,
            reads: Mutex::new(Vec::new()),
        })
    }

    fn reads(&self) -> Vec<(u64, u64)> {
        self.reads.lock().unwrap().clone()
    }
}

#[memsync_core::async_trait]
impl Store for ReadLog {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn caps(&self) -> Caps {
        let mut caps = self.inner.caps();
        caps.extents &= self.extents;
        caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> memsync_core::Result<()> {
        self.reads.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> memsync_core::Result<()> {
        self.inner.write(offset, data).await
    }

    async fn flush(&self) -> memsync_core::Result<()> {
        self.inner.flush().await
    }

    async fn extents(&self, offset: u64, len: u64) -> memsync_core::Result<Vec<Extent>> {
        if self.extents {
            self.inner.extents(offset, len).await
        } else {
            Ok(vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }])
        }
    }
}

const PIECE: usize = 64 << 10;
const CHUNK: usize = 16 << 10;

/// A sparse snapshot in a `mem:` store (64 KiB store chunks): every third 64 KiB piece was never
/// written (a hole, four handler chunks), the others are random data whose first 16 KiB are
/// zeros written as data (a data extent: read, not zero-filled). Returns the store, its bytes
/// and which handler chunks are holes.
fn sparse_snapshot() -> (DynStore, Vec<u8>, Vec<bool>) {
    let mut data = vec![0u8; SIZE];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut holes = vec![false; SIZE / CHUNK];
    for (k, piece) in data.chunks_mut(PIECE).enumerate() {
        if k % 3 == 1 {
            holes[k * PIECE / CHUNK..(k + 1) * PIECE / CHUNK].fill(true);
        } else {
            rng.fill_bytes(&mut piece[CHUNK..]);
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut reg = memsync_core::Registry::new();
    memsync_local::register(&mut reg);
    let s = rt.block_on(reg.open(&format!("mem:{SIZE}"))).unwrap();
    for (k, piece) in data.chunks(PIECE).enumerate() {
        if k % 3 != 1 {
            rt.block_on(s.write((k * PIECE) as u64, Bytes::copy_from_slice(piece)))
                .unwrap();
        }
    }
    (s, data, holes)
}

/// This process as the VMM: `SIZE` bytes of anonymous memory registered with a userfaultfd
/// (Firecracker's kind), handed over a socket pair to a handler started on `store`.
fn serve_this_process(store: DynStore, cfg: HandlerConfig) -> (Mapping, Uffd, Handler) {
    let map = Mapping::anonymous_with(
        SIZE,
        MapOptions {
            align: 2 << 20,
            ..MapOptions::default()
        },
    )
    .unwrap();
    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    })
    .unwrap();
    uffd.api(Features::EVENT_REMOVE).unwrap();
    uffd.register(&map, RegisterMode::MISSING).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{SIZE},"offset":0,"page_size":4096}}]"#,
        map.addr()
    );
    send_fds(&a, json.as_bytes(), &[uffd.as_fd()]).unwrap();
    let hs = firecracker::receive_handshake(&b, Duration::from_secs(5)).unwrap();
    let h = Handler::start(hs, store, cfg).unwrap();
    assert_eq!(h.chunk_size(), CHUNK);
    (map, uffd, h)
}

/// Reads all of the memory (faults), waits for the pull, and checks it against `data`: every
/// chunk by BLAKE3, and the hole chunks are zeros.
fn check_memory(map: &Mapping, h: &Handler, data: &[u8], holes: &[bool]) {
    let mut got = vec![0u8; SIZE];
    map.read_at(0, &mut got);
    assert!(h.region().wait_pull(Duration::from_secs(60)));
    assert!(h.region().is_complete());
    for (i, (g, d)) in got.chunks(CHUNK).zip(data.chunks(CHUNK)).enumerate() {
        assert_eq!(blake3::hash(g), blake3::hash(d), "chunk {i}");
        if holes[i] {
            assert!(g.iter().all(|&x| x == 0), "hole chunk {i} is not zeros");
        }
    }
    assert!(h.errors().is_empty(), "{:?}", h.errors());
}

/// The chunks the store's reads touched.
fn chunks_read(log: &ReadLog) -> Vec<bool> {
    let mut read = vec![false; SIZE / CHUNK];
    for (off, len) in log.reads() {
        let (first, end) = (off as usize / CHUNK, ((off + len) as usize).div_ceil(CHUNK));
        read[first..end].fill(true);
    }
    read
}

/// A sparse snapshot: the chunks the store's extents show to be holes are installed as zero
/// pages without a read (by faults and by the pull), counted in `chunks_zero`; the others are
/// read once each.
#[test]
fn handler_zero_fills_the_holes_of_a_sparse_snapshot_without_reading_them() {
    let (inner, data, holes) = sparse_snapshot();
    let log = ReadLog::new(inner, true);
    let (map, _uffd, h) = serve_this_process(
        Arc::clone(&log) as DynStore,
        HandlerConfig {
            chunk_size: CHUNK,
            ..HandlerConfig::default()
        },
    );
    check_memory(&map, &h, &data, &holes);
    let n_holes = holes.iter().filter(|&&x| x).count();
    assert!(n_holes > 0 && n_holes < holes.len());
    let s = h.stats().snapshot();
    assert_eq!(s.chunks_zero, n_holes as u64, "{s}");
    let read = chunks_read(&log);
    for (i, (&r, &hole)) in read.iter().zip(&holes).enumerate() {
        assert_eq!(r, !hole, "chunk {i}: read {r}, hole {hole}");
    }
    let bytes: u64 = log.reads().iter().map(|r| r.1).sum();
    assert_eq!(bytes, ((holes.len() - n_holes) * CHUNK) as u64);
    assert_eq!(s.bytes_fetched, bytes, "{s}");
    drop(h);
}

/// A store whose extents fail, stall past the handler's limit, or are not reported: the handler
/// goes on without them and reads every chunk, holes included; the memory is still right.
#[test]
fn handler_reads_every_chunk_when_the_extents_fail_or_stall() {
    for case in ["fail", "stall", "unsupported"] {
        let (inner, data, holes) = sparse_snapshot();
        let log = ReadLog::new(inner, case != "unsupported");
        let inject = Inject::new(Arc::clone(&log));
        let control = inject.control();
        match case {
            "fail" => {
                control.fail_always(OpSet::EXTENTS);
            }
            "stall" => {
                control.stall(OpSet::EXTENTS, None);
            }
            _ => {}
        }
        let (map, _uffd, h) = serve_this_process(
            Arc::new(inject) as DynStore,
            HandlerConfig {
                chunk_size: CHUNK,
                extents_within: Duration::from_millis(200),
                ..HandlerConfig::default()
            },
        );
        let asked = control.calls(OpKind::Extents);
        if case == "unsupported" {
            assert_eq!(asked, 0, "{case}");
        } else {
            assert_eq!(asked, 1, "{case}: the extents are asked once");
        }
        // The stalled query was given up (dropped), not left hanging.
        assert_eq!(control.stalled(), 0, "{case}");
        check_memory(&map, &h, &data, &holes);
        let s = h.stats().snapshot();
        assert_eq!(s.chunks_zero, 0, "{case}: {s}");
        assert!(
            chunks_read(&log).iter().all(|&r| r),
            "{case}: a chunk was not read"
        );
        assert_eq!(s.bytes_fetched, SIZE as u64, "{case}: {s}");
        drop(h);
    }
}
