//! Integration tests of the local stores: the shared contract suite against every store (directly
//! and through store URLs), plus store-specific behaviour.

use std::path::Path;

use memsync_core::{Bytes, ExtentKind, Registry, Store, StoreError, StoreExt};
use memsync_local::{DirOptions, DirStore, FileOptions, FileStore, MemStore, register};
use memsync_testkit::contract::{self, ContractOpts};
use memsync_testkit::{assert_error_chain, assert_root_err, random_bytes};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn registry() -> Registry {
    let mut r = Registry::new();
    register(&mut r);
    r
}

fn opts() -> ContractOpts {
    ContractOpts::default()
}

// ---- the contract suite -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_mem() {
    let store = MemStore::new(32 * MIB);
    let report = contract::run(store, opts().atomic_unit(MemStore::DEFAULT_CHUNK_SIZE)).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_mem_small_odd_chunks() {
    // A size that is not a multiple of the chunk size, and a chunk size that is not a power of two.
    let store = MemStore::with_chunk_size(8 * MIB + 1234, 3000).unwrap();
    let report = contract::run(store, opts().atomic_unit(3000)).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_mem_terabyte_url() {
    let store = registry().open("mem:?size=1T&chunk=16K").await.unwrap();
    assert_eq!(store.size(), 1 << 40);
    let report = contract::run(store, opts().window(16 * MIB)).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(
        tmp.path().join("disk.img"),
        FileOptions::with_size(32 * MIB),
    )
    .unwrap();
    // Buffered pwrite holds the inode lock for the whole call, so each write is atomic.
    let report = contract::run(store, opts().atomic_unit(4 * KIB)).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_file_url() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!(
        "file://{}?size=16M&create",
        tmp.path().join("u.img").display()
    );
    let store = registry().open(&url).await.unwrap();
    let report = contract::run(store, opts()).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_file_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ro.img");
    std::fs::write(&path, random_bytes(9, (4 * MIB) as usize)).unwrap();
    let store = registry()
        .open(&format!("file:{}?readonly", path.display()))
        .await
        .unwrap();
    assert!(store.caps().read_only && !store.caps().trim);
    let report = contract::run(store, opts().expect_zero_initialised(false)).await;
    eprintln!("{report}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        random_bytes(9, (4 * MIB) as usize)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::open(tmp.path(), DirOptions::with_size(32 * MIB)).unwrap();
    assert_eq!(
        (store.caps().block_size, store.caps().preferred_io),
        (1, 64 * KIB)
    );
    let report = contract::run(store, opts()).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_dir_url() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!(
        "dir:{}?size=16M&chunk=16K&max_open=8",
        tmp.path().join("d").display()
    );
    let store = registry().open(&url).await.unwrap();
    assert_eq!(
        store.caps().block_size,
        1,
        "dir: stores take any byte range: {store:?}"
    );
    let report = contract::run(store, opts()).await;
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_dir_short_last_chunk() {
    // A size that is not a chunk multiple: the last chunk file is shorter.
    let tmp = tempfile::tempdir().unwrap();
    let size = 8 * MIB + 12_345;
    let url = format!(
        "dir:{}?size={size}&chunk=64K",
        tmp.path().join("d").display()
    );
    let store = registry().open(&url).await.unwrap();
    assert_eq!(store.size(), size);
    store
        .write(size - 100, Bytes::from(vec![7u8; 100]))
        .await
        .unwrap();
    assert_eq!(
        &store.read_bytes(size - 100, 100).await.unwrap()[..],
        &[7u8; 100][..]
    );
    store.write_zeroes(size - 100, 100).await.unwrap();
    assert_eq!(
        &store.read_bytes(size - 100, 100).await.unwrap()[..],
        &[0u8; 100][..]
    );
    let report = contract::run(store, opts()).await;
    eprintln!("{report}");
}

// ---- mem ------------------------------------------------------------------------------------

#[tokio::test]
async fn mem_writing_zeros_frees_memory() {
    let cs = MemStore::DEFAULT_CHUNK_SIZE;
    let s = MemStore::new(1 << 40);
    assert_eq!(s.stored_chunks(), 0);
    s.write(0, random_bytes(1, (4 * cs) as usize))
        .await
        .unwrap();
    s.write(1 << 39, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(s.stored_chunks(), 5);
    assert_eq!(s.stored_bytes(), 5 * cs);
    // Zeros over a whole chunk free it; over part of one, only once the chunk is all zero.
    s.write(0, Bytes::from(vec![0u8; cs as usize]))
        .await
        .unwrap();
    assert_eq!(s.stored_chunks(), 4);
    s.write(cs, Bytes::from(vec![0u8; (cs / 2) as usize]))
        .await
        .unwrap();
    assert_eq!(s.stored_chunks(), 4);
    s.write(cs + cs / 2, Bytes::from(vec![0u8; (cs / 2) as usize]))
        .await
        .unwrap();
    assert_eq!(s.stored_chunks(), 3);
    s.trim(2 * cs, cs).await.unwrap();
    s.write_zeroes(3 * cs, cs).await.unwrap();
    s.write_zeroes((1 << 39) - 10, 20).await.unwrap();
    assert_eq!(s.stored_chunks(), 0);
    assert_eq!(s.stored_bytes(), 0);
    let ex = s.extents(0, 1 << 40).await.unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].kind, ExtentKind::Hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_concurrent_partial_writes_to_one_chunk_keep_every_update() {
    let s = std::sync::Arc::new(MemStore::new(MIB));
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                for round in 0..50u8 {
                    let v = Bytes::from(vec![round.wrapping_add(1); 100]);
                    s.write(i * 1000 + 7, v).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let all = s.read_bytes(0, 64_000 + 7).await.unwrap();
    for i in 0..64usize {
        assert!(
            all[i * 1000 + 7..i * 1000 + 107].iter().all(|&b| b == 50),
            "task {i} lost an update"
        );
    }
}

// ---- file -----------------------------------------------------------------------------------

#[tokio::test]
async fn file_extents_after_punch_hole() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("holes.img");
    let s = FileStore::open(&path, FileOptions::with_size(4 * MIB)).unwrap();
    assert!(s.caps().trim && s.caps().extents && s.caps().flush);
    // A fresh file is one hole.
    let ex = s.extents(0, 4 * MIB).await.unwrap();
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert_eq!(ex[0].kind, ExtentKind::Hole);

    s.write(0, random_bytes(2, (2 * MIB) as usize))
        .await
        .unwrap();
    s.flush().await.unwrap();
    s.trim(512 * KIB, 512 * KIB).await.unwrap();
    let ex = s.extents(0, 4 * MIB).await.unwrap();
    let kinds: Vec<_> = ex.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, 512 * KIB, ExtentKind::Data),
            (512 * KIB, 512 * KIB, ExtentKind::Hole),
            (MIB, MIB, ExtentKind::Data),
            (2 * MIB, 2 * MIB, ExtentKind::Hole),
        ]
    );
    assert!(
        s.read_bytes(512 * KIB, (512 * KIB) as usize)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    // Unaligned trims zero exactly the requested bytes.
    s.trim(MIB + 10, 100).await.unwrap();
    let back = s.read_bytes(MIB, 200).await.unwrap();
    let orig = random_bytes(2, (2 * MIB) as usize);
    assert_eq!(&back[..10], &orig[MIB as usize..MIB as usize + 10]);
    assert!(back[10..110].iter().all(|&b| b == 0));
    assert_eq!(&back[110..], &orig[MIB as usize + 110..MIB as usize + 200]);
    // write_zeroes reads back as zeros too.
    s.write_zeroes(1536 * KIB + 1, 4000).await.unwrap();
    assert!(
        s.read_bytes(1536 * KIB + 1, 4000)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    // The file keeps its size.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
}

/// A directory on tmpfs, where `SEEK_HOLE` walks the page cache to the next hole (the case the
/// remembered data runs are for); elsewhere if there is none.
fn tmpfs_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

fn kinds(ex: &[memsync_core::Extent]) -> Vec<(u64, u64, ExtentKind)> {
    ex.iter().map(|e| (e.offset, e.len, e.kind)).collect()
}

/// Sequential reads through the NBD server ask 8 MiB of extents ahead per request: a dense file
/// must cost one `SEEK_DATA` and one `SEEK_HOLE` in all, not two per query (on tmpfs each
/// `SEEK_HOLE` walked to the end of the file), also for a second store on the same file; a trim
/// or a write through either is seen by both.
#[tokio::test]
async fn file_extents_look_each_data_run_up_once() {
    use ExtentKind::{Data, Hole};
    let tmp = tmpfs_dir();
    let path = tmp.path().join("dense.img");
    let size = 64 * MIB;
    let s = FileStore::open(&path, FileOptions::with_size(size)).unwrap();
    s.write(0, random_bytes(5, size as usize)).await.unwrap();
    for off in (0..size).step_by(MIB as usize) {
        let len = (8 * MIB).min(size - off);
        let ex = s.extents(off, len).await.unwrap();
        assert_eq!(kinds(&ex), vec![(off, len, Data)]);
    }
    assert_eq!(s.lseeks(), 2, "lseek calls for 64 queries of one data run");

    let t = FileStore::open(&path, FileOptions::default()).unwrap();
    assert_eq!(
        kinds(&t.extents(0, size).await.unwrap()),
        vec![(0, size, Data)]
    );
    assert_eq!(
        t.lseeks(),
        0,
        "a second store on the file looked the run up again"
    );

    t.trim(16 * MIB, 4 * MIB).await.unwrap();
    let want = vec![
        (0, 16 * MIB, Data),
        (16 * MIB, 4 * MIB, Hole),
        (20 * MIB, 44 * MIB, Data),
    ];
    assert_eq!(kinds(&s.extents(0, size).await.unwrap()), want);
    s.write(17 * MIB, random_bytes(6, 4096)).await.unwrap();
    let want = vec![
        (0, 16 * MIB, Data),
        (16 * MIB, MIB, Hole),
        (17 * MIB, 4 * KIB, Data),
        (17 * MIB + 4 * KIB, 3 * MIB - 4 * KIB, Hole),
        (20 * MIB, 44 * MIB, Data),
    ];
    assert_eq!(kinds(&t.extents(0, size).await.unwrap()), want);
    assert_eq!(kinds(&s.extents(0, size).await.unwrap()), want);
    s.write_zeroes(40 * MIB, 8 * MIB).await.unwrap();
    let ex = t.extents(0, size).await.unwrap();
    assert!(
        ex.iter()
            .any(|e| e.kind == Hole && e.offset <= 40 * MIB && e.end() >= 48 * MIB),
        "zeroed range still reported as data: {ex:?}"
    );
}

#[tokio::test]
async fn file_open_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f.img");
    // Missing file without size: a clear error naming the path.
    let e = FileStore::open(&path, FileOptions::default()).unwrap_err();
    assert_error_chain(&e, &[path.to_str().unwrap(), "size="]);
    let e = FileStore::open(&path, FileOptions::read_only()).unwrap_err();
    assert_error_chain(
        &e,
        &[path.to_str().unwrap(), "does not exist", "No such file"],
    );
    let mut no_create = FileOptions::with_size(MIB);
    no_create.create = Some(false);
    assert!(FileStore::open(&path, no_create).is_err());
    // Created, then extended, never truncated.
    let s = FileStore::open(&path, FileOptions::with_size(MIB)).unwrap();
    s.write(10, Bytes::from_static(b"keep")).await.unwrap();
    drop(s);
    let s = FileStore::open(&path, FileOptions::with_size(2 * MIB)).unwrap();
    assert_eq!(s.size(), 2 * MIB);
    assert_eq!(&s.read_bytes(10, 4).await.unwrap()[..], b"keep");
    drop(s);
    let e = FileStore::open(&path, FileOptions::with_size(MIB)).unwrap_err();
    assert!(e.to_string().contains("never truncated"), "{e}");
    let s = FileStore::open(&path, FileOptions::default()).unwrap();
    assert_eq!(s.size(), 2 * MIB);
    // Read-only stores reject writes.
    let ro = FileStore::open(&path, FileOptions::read_only()).unwrap();
    assert_root_err(
        ro.write(0, Bytes::from_static(b"x")).await,
        "ReadOnly",
        |e| matches!(e, StoreError::ReadOnly),
    );
    assert_eq!(&ro.read_bytes(10, 4).await.unwrap()[..], b"keep");
    // Directories are not files.
    let e = FileStore::open(tmp.path(), FileOptions::default()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[tokio::test]
async fn file_io_errors_carry_path_and_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("short.img");
    let s = FileStore::open(&path, FileOptions::with_size(MIB)).unwrap();
    // Shrink the file behind the store's back: reads past the new end fail with the cause.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let e = s.read_bytes(8192, 100).await.unwrap_err();
    assert_error_chain(
        &e,
        &[path.to_str().unwrap(), "100 bytes at 8192", "pread failed"],
    );
    assert!(
        matches!(e.root(), StoreError::Io { op: "pread", .. }),
        "{e:?}"
    );
}

// ---- dir ------------------------------------------------------------------------------------

#[tokio::test]
async fn dir_reopen_checks_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("store");
    let s = DirStore::open(&d, DirOptions::with_size(MIB).chunk_size(64 * KIB)).unwrap();
    s.write(64 * KIB, random_bytes(3, (64 * KIB) as usize))
        .await
        .unwrap();
    s.flush().await.unwrap();
    drop(s);
    let e = DirStore::open(&d, DirOptions::with_size(MIB).chunk_size(128 * KIB)).unwrap_err();
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert_error_chain(
        &e,
        &[
            d.to_str().unwrap(),
            "chunk=65536 (64.0 KiB)",
            "not chunk=131072",
        ],
    );
    let e = DirStore::open(&d, DirOptions::with_size(2 * MIB)).unwrap_err();
    assert!(e.to_string().contains("size=1048576"), "{e}");
    // Without size or chunk, the metadata decides.
    let s = DirStore::open(&d, DirOptions::default()).unwrap();
    assert_eq!((s.size(), s.chunk_size()), (MIB, 64 * KIB));
    assert_eq!(
        s.read_bytes(64 * KIB, (64 * KIB) as usize).await.unwrap(),
        random_bytes(3, (64 * KIB) as usize)
    );
    // Through a URL, a mismatch names the parameter.
    let url = format!("dir:{}?chunk=4K", d.display());
    let e = registry().open(&url).await.unwrap_err();
    assert!(e.to_string().contains("not chunk=4096"), "{e}");
    // A directory with chunk files but no metadata is not silently adopted.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("0000000000000000"), b"x").unwrap();
    let e = DirStore::open(&other, DirOptions::with_size(MIB)).unwrap_err();
    assert!(
        e.to_string().contains("no store metadata") && e.to_string().contains("init=adopt"),
        "{e}"
    );
    // ... unless adopted: then it gets a record, and the chunk reads back.
    let s = DirStore::open(
        &other,
        DirOptions::with_size(MIB).init(memsync_core::MetaInit::Adopt),
    )
    .unwrap();
    assert_eq!(s.read_bytes(0, 1).await.unwrap()[..], b"x"[..]);
    assert!(s.id().is_some());
    drop(s);
    // init=force rewrites the record (a new identity) with the URL's geometry.
    let before = DirStore::open(&d, DirOptions::default()).unwrap().id();
    let url = format!("dir:{}?chunk=4K&init=force", d.display());
    let s = registry().open(&url).await.unwrap();
    assert_eq!(s.caps().preferred_io, 4096);
    drop(s);
    let after = DirStore::open(&d, DirOptions::default()).unwrap();
    assert_eq!(after.chunk_size(), 4096);
    assert!(after.id().is_some() && after.id() != before);
    // The identity shows through the layers the URL opener and the CLI add.
    let s = registry()
        .open(&format!("dir:{}", d.display()))
        .await
        .unwrap();
    let s = memsync_core::layers::Stats::new(s);
    assert_eq!(s.identity(), after.id());
    assert_eq!(registry().open("mem:1M").await.unwrap().identity(), None);
    // A new store needs a size.
    let e = DirStore::open(tmp.path().join("new"), DirOptions::default()).unwrap_err();
    assert!(e.to_string().contains("give size="), "{e}");
}

#[tokio::test]
async fn dir_chunk_files_come_and_go() {
    let tmp = tempfile::tempdir().unwrap();
    let cs = 4 * KIB;
    let s = DirStore::open(tmp.path(), DirOptions::with_size(64 * cs).chunk_size(cs)).unwrap();
    let f = |i: u64| tmp.path().join(format!("{i:016x}"));
    s.write(3 * cs, random_bytes(4, (2 * cs) as usize))
        .await
        .unwrap();
    assert!(f(3).exists() && f(4).exists() && !f(5).exists());
    assert_eq!(std::fs::metadata(f(3)).unwrap().len(), cs);
    let ex = s.extents(0, 64 * cs).await.unwrap();
    let kinds: Vec<_> = ex
        .iter()
        .map(|e| (e.offset / cs, e.len / cs, e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 3, ExtentKind::Hole),
            (3, 2, ExtentKind::Data),
            (5, 59, ExtentKind::Hole)
        ]
    );
    // An all-zero chunk write removes the file; trim removes files.
    s.write(3 * cs, Bytes::from(vec![0u8; cs as usize]))
        .await
        .unwrap();
    assert!(!f(3).exists());
    s.trim(4 * cs, cs).await.unwrap();
    assert!(!f(4).exists());
    s.flush().await.unwrap();
    // Unaligned requests need no read-modify-write: a partial write lands in place, and zeros
    // written into a chunk without a file create none.
    s.write(7 * cs - 3, Bytes::from_static(b"abcdef"))
        .await
        .unwrap();
    assert!(f(6).exists() && f(7).exists());
    assert_eq!(
        std::fs::metadata(f(7)).unwrap().len(),
        3,
        "only the written bytes"
    );
    assert_eq!(
        &s.read_bytes(7 * cs - 4, 8).await.unwrap()[..],
        b"\0abcdef\0"
    );
    s.write(9 * cs + 5, Bytes::from(vec![0u8; 100]))
        .await
        .unwrap();
    assert!(!f(9).exists());
    s.write_zeroes(7 * cs - 1, 2).await.unwrap();
    assert_eq!(
        &s.read_bytes(7 * cs - 4, 8).await.unwrap()[..],
        b"\0ab\0\0ef\0"
    );
    assert_root_err(s.read_bytes(64 * cs - 1, 2).await, "OutOfRange", |e| {
        matches!(e, StoreError::OutOfRange { .. })
    });
}

/// Descriptors of this process that point into `dir`.
fn fds_into(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .count()
}

#[tokio::test]
async fn dir_open_files_stay_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let cs = 4 * KIB;
    let url = format!("dir:{}?size=4M&chunk=4K&max_open=16", dir.display());
    let s = registry().open(&url).await.unwrap();
    let mut max_seen = 0;
    for i in 0..1000u64 {
        s.write(i * cs, random_bytes(i, cs as usize)).await.unwrap();
        if i % 50 == 0 {
            max_seen = max_seen.max(fds_into(&dir));
        }
    }
    for i in (0..1000u64).rev() {
        let got = s.read_bytes(i * cs, cs as usize).await.unwrap();
        assert_eq!(got, random_bytes(i, cs as usize), "chunk {i}");
        if i % 50 == 0 {
            max_seen = max_seen.max(fds_into(&dir));
        }
    }
    s.flush().await.unwrap();
    max_seen = max_seen.max(fds_into(&dir));
    assert!(
        max_seen <= 16,
        "{max_seen} descriptors open into the store directory (max_open=16)"
    );
    assert!(
        max_seen >= 8,
        "the cache should hold descriptors ({max_seen})"
    );
    drop(s);
    assert_eq!(fds_into(&dir), 0);
}

// ---- URLs -----------------------------------------------------------------------------------

#[tokio::test]
async fn registry_schemes_and_help() {
    let r = registry();
    let schemes: Vec<_> = r.schemes().map(|(s, _)| s).collect();
    assert_eq!(schemes, vec!["dir", "file", "mem"]);
    for (scheme, help) in r.schemes() {
        assert!(help.starts_with(scheme) && !help.contains('\n'), "{help}");
    }
    let s = r.open("mem:64K").await.unwrap();
    assert_eq!(s.size(), 64 * KIB);
    let s = r.open("mem:?size=1M&chunk=4K").await.unwrap();
    assert_eq!((s.size(), s.caps().preferred_io), (MIB, 4 * KIB));
    assert_eq!(r.open("mem:1M?size=1M").await.unwrap().size(), MIB);
}

#[tokio::test]
async fn bad_urls_name_the_bad_part() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().display();
    let r = registry();
    let cases = [
        ("mem:".to_owned(), "size"),
        ("mem:12Q".to_owned(), "size"),
        ("mem:1G?size=2G".to_owned(), "given twice"),
        ("mem:1G?chunck=4K".to_owned(), "\"chunck\""),
        ("mem:1G?chunk=0".to_owned(), "\"chunk\""),
        ("mem:1G?chunk=x".to_owned(), "\"chunk\""),
        ("mem://host/1G".to_owned(), "host"),
        ("file:".to_owned(), "path"),
        ("file://example.org/x.img".to_owned(), "host"),
        (format!("file:{t}/missing.img"), "size="),
        (format!("file:{t}/x.img?size=abc"), "\"size\""),
        (
            format!("file:{t}/x.img?size=1M&readonly=maybe"),
            "\"readonly\"",
        ),
        (
            format!("file:{t}/x.img?size=1M&create&readonly"),
            "readonly and create",
        ),
        (format!("file:{t}?size=1M"), "is a directory"),
        (format!("file:{t}/x.img?sise=1M"), "\"sise\""),
        (format!("dir:{t}/d?size=1M&max_open=0"), "\"max_open\""),
        (format!("dir:{t}/d?size=1M&max_open=many"), "\"max_open\""),
        (format!("dir:{t}/d?size=1M&chunk=1.5.5K"), "\"chunk\""),
        (format!("dir:{t}/d2"), "give size="),
        ("dir:".to_owned(), "path"),
    ];
    for (url, part) in cases {
        let e = match r.open(&url).await {
            Ok(s) => panic!("{url} opened: {s:?}"),
            Err(e) => e,
        };
        assert!(
            e.chain().contains(part),
            "{url}: error {:?} does not mention {part:?}",
            e.chain()
        );
    }
}

// ---- MemStore against a model, random operation sequences ------------------------------------

mod model {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Write {
            off: u64,
            len: u64,
            seed: u64,
            zeros: bool,
        },
        Trim {
            off: u64,
            len: u64,
        },
        WriteZeroes {
            off: u64,
            len: u64,
        },
        Read {
            off: u64,
            len: u64,
        },
    }

    fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
        let range = (0..=size).prop_flat_map(move |off| (Just(off), 0..=(size - off).min(5000)));
        let op = prop_oneof![
            3 => (range.clone(), any::<u64>(), prop::bool::weighted(0.25))
                .prop_map(|((off, len), seed, zeros)| Op::Write { off, len, seed, zeros }),
            1 => range.clone().prop_map(|(off, len)| Op::Trim { off, len }),
            1 => range.clone().prop_map(|(off, len)| Op::WriteZeroes { off, len }),
            1 => range.prop_map(|(off, len)| Op::Read { off, len }),
        ];
        vec(op, 1..40)
    }

    fn case() -> impl Strategy<Value = (u64, u64, Vec<Op>)> {
        (1u64..3000, 1u64..30_000)
            .prop_flat_map(|(chunk, size)| (Just(chunk), Just(size), ops(size)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn mem_store_matches_model((chunk, size, ops) in case()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async move {
                let s = MemStore::with_chunk_size(size, chunk).unwrap();
                let mut m = vec![0u8; size as usize];
                for op in &ops {
                    match *op {
                        Op::Write { off, len, seed, zeros } => {
                            let data = if zeros { Bytes::from(vec![0u8; len as usize]) } else { random_bytes(seed, len as usize) };
                            m[off as usize..(off + len) as usize].copy_from_slice(&data);
                            s.write(off, data).await.unwrap();
                        }
                        Op::Trim { off, len } => {
                            s.trim(off, len).await.unwrap();
                            m[off as usize..(off + len) as usize].fill(0);
                        }
                        Op::WriteZeroes { off, len } => {
                            s.write_zeroes(off, len).await.unwrap();
                            m[off as usize..(off + len) as usize].fill(0);
                        }
                        Op::Read { off, len } => {
                            let got = s.read_bytes(off, len as usize).await.unwrap();
                            prop_assert_eq!(&got[..], &m[off as usize..(off + len) as usize]);
                        }
                    }
                    // Exactly the chunks holding a non-zero byte take memory, and extents say so.
                    let data_chunks: Vec<u64> = m
                        .chunks(chunk as usize)
                        .enumerate()
                        .filter(|(_, c)| c.iter().any(|&b| b != 0))
                        .map(|(i, _)| i as u64)
                        .collect();
                    prop_assert_eq!(s.stored_chunks(), data_chunks.len(), "after {:?}", op);
                    let ex = s.extents(0, size).await.unwrap();
                    let mut pos = 0;
                    for e in &ex {
                        prop_assert_eq!(e.offset, pos);
                        for i in e.offset / chunk..e.end().div_ceil(chunk) {
                            let want = if data_chunks.binary_search(&i).is_ok() { ExtentKind::Data } else { ExtentKind::Hole };
                            prop_assert_eq!(e.kind, want, "chunk {} in {:?}", i, ex);
                        }
                        pos = e.end();
                    }
                    prop_assert_eq!(pos, size);
                }
                let all = s.read_bytes(0, size as usize).await.unwrap();
                prop_assert_eq!(&all[..], &m[..]);
                Ok(())
            })?;
        }
    }
}

// ---- FileStore's extents against the file's own, random operation sequences ----------------

mod file_model {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const PAGE: u64 = 4096;

    #[derive(Clone, Debug)]
    enum Op {
        Write { off: u64, len: u64, seed: u64 },
        Trim { off: u64, len: u64 },
        WriteZeroes { off: u64, len: u64 },
        Extents { off: u64, len: u64 },
    }

    /// Mostly whole pages (holes are pages on tmpfs), some unaligned ranges.
    fn range(size: u64) -> impl Strategy<Value = (u64, u64)> {
        let pages = size / PAGE;
        prop_oneof![
            3 => (0..pages).prop_flat_map(move |p| (Just(p * PAGE), (1..=(pages - p).min(64)).prop_map(|n| n * PAGE))),
            1 => (0..size).prop_flat_map(move |off| (Just(off), 1..=(size - off).min(3 * PAGE))),
        ]
    }

    fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            3 => (range(size), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
            2 => range(size).prop_map(|(off, len)| Op::Trim { off, len }),
            1 => range(size).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
            3 => range(size).prop_map(|(off, len)| Op::Extents { off, len }),
        ];
        vec(op, 1..40)
    }

    /// The file's extents from its own `SEEK_DATA`/`SEEK_HOLE`, through another descriptor.
    fn truth(path: &Path, size: u64) -> Vec<(u64, u64, ExtentKind)> {
        use rustix::fs::SeekFrom;
        let f = std::fs::File::open(path).unwrap();
        let seek = |w| match rustix::fs::seek(&f, w) {
            Ok(o) => o.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => panic!("lseek: {e}"),
        };
        let mut out: Vec<(u64, u64, ExtentKind)> = Vec::new();
        let mut push = |a: u64, b: u64, k| {
            if b > a {
                out.push((a, b - a, k));
            }
        };
        let mut pos = 0;
        while pos < size {
            let d = seek(SeekFrom::Data(pos));
            push(pos, d, ExtentKind::Hole);
            if d >= size {
                break;
            }
            let h = seek(SeekFrom::Hole(d));
            push(d, h, ExtentKind::Data);
            pos = h;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// After every operation the store's extents, which remember data runs (also those
        /// looked up by a second store on the file), equal the file's own, and every hole
        /// reads as zeros in the model.
        #[test]
        fn file_store_extents_match_the_file((pages, ops) in (16u64..256).prop_flat_map(|p| (Just(p), ops(p * PAGE)))) {
            let size = pages * PAGE;
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async move {
                let tmp = tmpfs_dir();
                let path = tmp.path().join("model.img");
                let s = FileStore::open(&path, FileOptions::with_size(size)).unwrap();
                let other = FileStore::open(&path, FileOptions::default()).unwrap();
                let mut m = vec![0u8; size as usize];
                for (i, op) in ops.iter().enumerate() {
                    // Both stores act, in turn.
                    let st = if i % 2 == 0 { &s } else { &other };
                    match *op {
                        Op::Write { off, len, seed } => {
                            let data = random_bytes(seed, len as usize);
                            m[off as usize..(off + len) as usize].copy_from_slice(&data);
                            st.write(off, data).await.unwrap();
                        }
                        Op::Trim { off, len } => {
                            st.trim(off, len).await.unwrap();
                            m[off as usize..(off + len) as usize].fill(0);
                        }
                        Op::WriteZeroes { off, len } => {
                            st.write_zeroes(off, len).await.unwrap();
                            m[off as usize..(off + len) as usize].fill(0);
                        }
                        Op::Extents { off, len } => {
                            let t = truth(&path, size);
                            let got = kinds(&st.extents(off, len).await.unwrap());
                            // The truth cut to the query.
                            let want: Vec<_> = t
                                .iter()
                                .filter(|&&(a, l, _)| a + l > off && a < off + len)
                                .map(|&(a, l, k)| (a.max(off), (a + l).min(off + len) - a.max(off), k))
                                .collect();
                            prop_assert_eq!(got, want, "after {:?}", &ops[..i]);
                        }
                    }
                    let t = truth(&path, size);
                    for st in [&s, &other] {
                        let got = kinds(&st.extents(0, size).await.unwrap());
                        prop_assert_eq!(&got, &t, "after {:?}", &ops[..=i]);
                    }
                    for &(a, l, k) in &t {
                        if k == ExtentKind::Hole {
                            prop_assert!(m[a as usize..(a + l) as usize].iter().all(|&b| b == 0), "hole {}+{} over data", a, l);
                        }
                    }
                }
                let all = s.read_bytes(0, size as usize).await.unwrap();
                prop_assert_eq!(&all[..], &m[..]);
                Ok(())
            })?;
        }
    }
}

/// Opening a writable file store must not change the file's mtime or ctime (the punch-hole
/// probe did, so every open looked like a change to anything that compares file times).
#[test]
fn opening_a_file_store_leaves_the_file_times_alone() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.img");
    std::fs::write(&path, vec![1u8; 1 << 16]).unwrap();
    let times = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
    };
    let before = times(&path);
    // Past one tick of the clock that stamps file times.
    std::thread::sleep(std::time::Duration::from_millis(30));
    let store =
        memsync_local::FileStore::open(&path, memsync_local::FileOptions::default()).unwrap();
    assert_eq!(times(&path), before);
    assert!(memsync_core::Store::caps(&store).trim);
}

// ---- a failed fsync is final (issue 10, "fsyncgate") ----------------------------------------

/// A file system whose fsync fails on demand (`memsync_testkit::failfs`, FUSE), or `None` after
/// the skip policy ran.
fn failfs(test: &str) -> Option<(tempfile::TempDir, memsync_testkit::failfs::FailFs)> {
    let mnt = tempfile::tempdir().unwrap();
    match memsync_testkit::failfs::FailFs::mount(mnt.path()) {
        Ok(fs) => Some((mnt, fs)),
        Err(e) => {
            memsync_testkit::skip::skip(
                test,
                &format!("cannot mount FUSE (root and /dev/fuse): {e}"),
            );
            None
        }
    }
}

/// After an fsync failed, the kernel may have dropped the writes it could not write back, and a
/// second fsync succeeds without them: the store must keep failing every flush instead of
/// reporting the lost data durable.
async fn failed_fsync_is_sticky(store: &dyn Store, fs: &memsync_testkit::failfs::FailFs) {
    store.write(0, random_bytes(1, 8192)).await.unwrap();
    store.flush().await.unwrap();
    store.write(4096, random_bytes(2, 4096)).await.unwrap();
    fs.set_fail_fsync(true);
    let e = store.flush().await.unwrap_err();
    assert_eq!(e.errno(), 5, "{}", e.chain());
    assert!(fs.failures() >= 1);
    // The file system is healthy again, and what was lost would now "sync" fine.
    fs.set_fail_fsync(false);
    let e = store
        .flush()
        .await
        .expect_err("a flush after a failed fsync reported success");
    assert!(e.chain().contains("earlier fsync failed"), "{}", e.chain());
    assert_eq!(e.errno(), 5);
    store.write(0, random_bytes(3, 100)).await.unwrap();
    assert!(store.flush().await.is_err(), "later flushes fail too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_fsync_failure_is_sticky() {
    let Some((_mnt, fs)) = failfs("file_store_fsync_failure_is_sticky") else {
        return;
    };
    let store = FileStore::open(fs.path().join("disk.img"), FileOptions::with_size(MIB)).unwrap();
    failed_fsync_is_sticky(&store, &fs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_store_fsync_failure_is_sticky() {
    let Some((_mnt, fs)) = failfs("dir_store_fsync_failure_is_sticky") else {
        return;
    };
    let store = DirStore::open(fs.path(), DirOptions::with_size(MIB).chunk_size(4096)).unwrap();
    failed_fsync_is_sticky(&store, &fs).await;
}
