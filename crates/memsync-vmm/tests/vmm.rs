//! The library API in one process: this process plays the VMM (its own memory registered with
//! a userfaultfd, sent over a socket pair) and a `Handler` serves it from a `mem:` store.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use memsync_core::{Bytes, DynStore, Store};
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
