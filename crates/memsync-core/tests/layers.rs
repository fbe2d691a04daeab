//! The store contract suite over the layers, alone and stacked, and error propagation through
//! a stack. (The crate's one integration test binary.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memsync_core::layers::{Chunked, Inject, InjectError, OpKind, OpSet, Stats};
use memsync_core::{
    Bytes, Caps, DynStore, Extent, Result, Store, StoreError, StoreExt, async_trait, check_range,
};
use memsync_local::{DirOptions, DirStore, MemStore};
use memsync_testkit::contract::{self, ContractOpts};
use memsync_testkit::{assert_error_chain, assert_root_err};

/// Quick enough for CI on two cores, thorough enough to cross many chunk boundaries.
fn opts() -> ContractOpts {
    ContractOpts::default().random_ops(200).max_len(200 << 10)
}

/// A store over `MemStore` that only accepts requests aligned to `block` (except a short tail
/// ending at the store's size, like the short last file of a chunk directory), and counts the
/// misaligned requests it rejects.
#[derive(Debug)]
struct Strict {
    inner: MemStore,
    block: u64,
    misaligned: AtomicU64,
}

impl Strict {
    fn new(size: u64, block: u64) -> Arc<Self> {
        Arc::new(Strict {
            inner: MemStore::new(size),
            block,
            misaligned: AtomicU64::new(0),
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.inner.size();
        check_range(size, 1, offset, len)?;
        if !offset.is_multiple_of(self.block)
            || (!len.is_multiple_of(self.block) && offset + len != size)
        {
            self.misaligned.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Misaligned {
                offset,
                len,
                align: self.block,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for Strict {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        let mut caps = self.inner.caps();
        caps.block_size = self.block;
        caps.preferred_io = self.block;
        caps.max_io = self.block;
        caps
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        self.inner.extents(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_over_dir_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = DirStore::open(
        tmp.path().join("d"),
        DirOptions::with_size(8 << 20).chunk_size(64 << 10),
    )
    .unwrap();
    contract::run(Chunked::new(dir, 64 << 10).unwrap(), opts()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_over_small_dir_chunks() {
    // Chunked's chunks span four of the directory's chunk files.
    let tmp = tempfile::tempdir().unwrap();
    let dir = DirStore::open(
        tmp.path().join("d"),
        DirOptions::with_size(4 << 20).chunk_size(4096),
    )
    .unwrap();
    contract::run(
        Chunked::new(dir, 16 << 10).unwrap().with_max_concurrency(4),
        opts(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_over_strict_store_with_short_last_chunk() {
    // 5 MiB + 12 345 bytes in chunks of 96 000 (not a power of two): the last chunk is short.
    let strict = Strict::new((5 << 20) + 12_345, 96_000);
    contract::run(Chunked::new(strict.clone(), 96_000).unwrap(), opts()).await;
    assert_eq!(
        strict.misaligned.load(Ordering::Relaxed),
        0,
        "Chunked sent a misaligned request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_over_mem_store() {
    let stats = Stats::new(MemStore::new(8 << 20));
    let handle = stats.handle();
    contract::run(stats, opts()).await;
    let snap = handle.snapshot();
    assert!(
        snap[OpKind::Read].ops > 100 && snap[OpKind::Write].ops > 100,
        "{snap}"
    );
    assert_eq!(snap[OpKind::Read].in_flight, 0);
    let text = handle.render_prometheus("memsync_store", "");
    assert!(
        text.contains("memsync_store_latency_seconds_count{op=\"read\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_without_faults_over_mem_store() {
    let fault = Inject::new(MemStore::new(8 << 20));
    let control = fault.control();
    contract::run(fault, opts()).await;
    assert_eq!(control.injected(), 0);
    assert!(control.calls(OpKind::Write) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_chunked_fault_stack() {
    // Stats(Chunked(Inject(DirStore))), with small random delays to shuffle the concurrency.
    let tmp = tempfile::tempdir().unwrap();
    let dir = DirStore::open(
        tmp.path().join("d"),
        DirOptions::with_size(4 << 20).chunk_size(32 << 10),
    )
    .unwrap();
    let fault = Inject::new(dir);
    let control = fault.control();
    control.set_jitter(OpSet::READ | OpSet::WRITE, Duration::from_micros(200));
    let stack = Stats::new(Chunked::new(fault, 32 << 10).unwrap());
    let handle = stack.handle();
    contract::run(stack, opts().random_ops(100)).await;
    assert_eq!(control.injected(), 0);
    let snap = handle.snapshot();
    // The only errors are the contract's deliberate out-of-range and read-only probes.
    assert!(snap.total_ops() > 500 && snap.total_errors() < 20, "{snap}");
    assert!(snap.iter().all(|s| s.in_flight == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_over_dyn_store() {
    // Layers over a type-erased store, and a type-erased stack.
    let inner: DynStore = Arc::new(MemStore::new(4 << 20));
    let stack: DynStore = Arc::new(Stats::new(Chunked::new(Inject::new(inner), 8192).unwrap()));
    contract::run(stack, opts().random_ops(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_propagate_with_context() {
    // An inner store that takes whole 64 KiB chunks only, so Chunked must read-modify-write.
    let fault = Inject::new(Strict::new(1 << 20, 64 << 10));
    let control = fault.control();
    let stack = Stats::new(Chunked::new(fault, 64 << 10).unwrap());

    // An errno failure in chunk 12 of a read crossing chunks 11..=13.
    control.set_default_error(InjectError::EIO);
    let rule = control.fail_range(OpSet::READ, 786_432..786_433);
    let e = assert_root_err(
        stack.read_bytes(700_000, 200_000).await,
        "an I/O error",
        |e| matches!(e, StoreError::Io { op: "read", .. }),
    );
    assert_error_chain(
        &e,
        &[
            "read 700000+200000",
            "read of chunk 12 (offset 786432)",
            "fault layer: read 786432+65536",
        ],
    );
    assert_eq!(e.errno(), 5);
    control.remove_rule(rule);

    // An injected failure in the read half of a read-modify-write.
    control.set_default_error(InjectError::Injected);
    control.fail_next(OpSet::READ, 1);
    let e = assert_root_err(
        stack.write(65_536 + 10, Bytes::from_static(b"x")).await,
        "an injected fault",
        |e| matches!(e, StoreError::Injected { op: "read" }),
    );
    assert_error_chain(
        &e,
        &[
            "write 65546+1",
            "write (read-modify-write) of chunk 1 (offset 65536)",
            "injected fault in read",
        ],
    );

    // ETIMEDOUT from a flush keeps its errno through both layers.
    control.add_rule(
        memsync_core::layers::InjectRule::fail(OpKind::Flush)
            .error(InjectError::ETIMEDOUT)
            .times(1),
    );
    let e = stack.flush().await.unwrap_err();
    assert_eq!(e.errno(), 110);
    assert_error_chain(
        &e,
        &["flush", "flush of chunked store", "fault layer: flush"],
    );

    // Request errors come back without context, from the top layer.
    assert!(matches!(
        stack.read_bytes(1 << 20, 1).await,
        Err(StoreError::OutOfRange { .. })
    ));

    let snap = stack.snapshot();
    assert_eq!(
        (
            snap[OpKind::Read].errors,
            snap[OpKind::Write].errors,
            snap[OpKind::Flush].errors
        ),
        (2, 1, 1)
    );
    assert_eq!(control.injected(), 3);

    // With the faults gone the stack works again.
    stack
        .write(65_536 + 10, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(&stack.read_bytes(65_546, 1).await.unwrap()[..], b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_on_a_stalled_chunk_releases_its_lock() {
    let fault = Inject::new(Strict::new(1 << 20, 4096));
    let control = fault.control();
    let stack = Arc::new(Chunked::new(fault, 4096).unwrap());
    control.stall(OpSet::READ, None);
    // A partial write's read-modify-write stalls while holding chunk 3's lock; its caller gives up.
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        stack.write(3 * 4096 + 1, Bytes::from_static(b"abc")),
    )
    .await;
    assert!(r.is_err(), "the stalled write must hit the deadline");
    assert_eq!(control.stalled(), 0);
    control.release_stalls();
    // The abandoned call released the lock: the chunk is writable and readable again.
    tokio::time::timeout(
        Duration::from_secs(10),
        stack.write(3 * 4096 + 1, Bytes::from_static(b"def")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        &stack.read_bytes(3 * 4096 + 1, 3).await.unwrap()[..],
        b"def"
    );
}
