//! `memsync ch-restore` against this process playing Cloud Hypervisor's receiving side of an
//! on-demand restore (`receive-migration ...,memory_mode=postcopy`, protocol version 0): the
//! main connection's requests are checked and answered, then the guest memory is registered
//! with a userfaultfd whose faults are turned into `PageFault` requests on the fault connection,
//! resolved with `UFFDIO_CONTINUE` on the shared memfds or `UFFDIO_COPY` of the inline page, as
//! Cloud Hypervisor's `vmm/src/uffd.rs` does. Several threads then read the guest memory and
//! compare it with the snapshot.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use memsync_sys::{
    ContinueMode, CopyMode, Event, Features, Install, MapOptions, Mapping, OpenFlags, RegisterMode,
    Uffd, recv_fds,
};
use memsync_vmm::ch::{command, frame, parse_frame};
use rand::{Rng, SeedableRng};

const SLOT: usize = 4 << 20;
const HIGH_GPA: u64 = 1 << 32;

fn read_req(s: &mut UnixStream) -> (u16, [u8; 6], u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    parse_frame(&b)
}

fn ok(s: &mut UnixStream) {
    s.write_all(&frame(1, [0; 6], 0)).unwrap();
}

fn payload(s: &mut UnixStream, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut v).unwrap();
    v
}

/// Guest memory of one slot here: the received memfd mapped shared, or anonymous memory.
struct GuestSlot {
    gpa: u64,
    map: Mapping,
}

fn restore(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = super::super::random(77, 2 * SLOT);
    let snap = tmp.path().join("memory-ranges");
    std::fs::write(&snap, &data).unwrap();
    // Slot 1 lies below slot 0 in guest memory: the store holds them by ascending gpa.
    let config = format!(
        r#"{{"vm_config":{{}},"memory_manager_data":{{"memory_ranges":{{"data":[]}},"guest_ram_mappings":[
            {{"slot":0,"gpa":{HIGH_GPA},"size":{SLOT},"file_offset":0}},
            {{"slot":1,"gpa":0,"size":{SLOT},"file_offset":0,"virtio_mem":false}}]}}}}"#
    );
    let state = br#"{"snapshots":{}}"#;
    std::fs::write(tmp.path().join("config.json"), &config).unwrap();
    std::fs::write(tmp.path().join("state.json"), state).unwrap();
    let sock = tmp.path().join("ch.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut args = vec![
        "ch-restore".to_string(),
        "--socket".into(),
        sock.display().to_string(),
        "--config".into(),
        tmp.path().join("config.json").display().to_string(),
        "--state".into(),
        tmp.path().join("state.json").display().to_string(),
        "--resume".into(),
        format!("file:{}", snap.display()),
    ];
    if shared {
        args.push("--shared".into());
    }
    let child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let (mut main, _) = listener.accept().unwrap();
    let (cmd, hdr, len) = read_req(&mut main);
    assert_eq!((cmd, len), (command::START, 0));
    assert_eq!(
        u16::from_le_bytes([hdr[0], hdr[1]]),
        0,
        "protocol version 0"
    );
    ok(&mut main);
    let mut memfds: Vec<(u32, OwnedFd)> = Vec::new();
    let mut next = read_req(&mut main);
    while next.0 == command::MEMORY_FD {
        assert_eq!(next.2, 4);
        let mut b = [0u8; 4];
        let (n, fds) = recv_fds(&main, &mut b, 1).unwrap();
        assert_eq!(
            (n, fds.len()),
            (4, 1),
            "MemoryFd carries a slot and one memfd"
        );
        memfds.push((u32::from_le_bytes(b), fds.into_iter().next().unwrap()));
        ok(&mut main);
        next = read_req(&mut main);
    }
    assert_eq!(memfds.len(), if shared { 2 } else { 0 });
    assert_eq!(next.0, command::CONFIG);
    assert_eq!(payload(&mut main, next.2), config.as_bytes());
    ok(&mut main);
    let (mut fault, _) = listener.accept().unwrap();
    let mut role = [0u8; 2];
    fault.read_exact(&mut role).unwrap();
    assert_eq!(u16::from_le_bytes(role), 2, "the Fault role");
    let (cmd, _, len) = read_req(&mut main);
    assert_eq!(cmd, command::STATE);
    assert_eq!(payload(&mut main, len), state);
    ok(&mut main);

    // Guest memory, registered before the vCPUs run (MINOR on shared memfds).
    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    })
    .unwrap();
    uffd.api(if shared {
        Features::MISSING_SHMEM | Features::MINOR_SHMEM
    } else {
        Features::empty()
    })
    .unwrap();
    let slots: Vec<GuestSlot> = [(0u32, HIGH_GPA), (1, 0)]
        .into_iter()
        .map(|(slot, gpa)| {
            let map = if shared {
                let fd = &memfds.iter().find(|(s, _)| *s == slot).unwrap().1;
                Mapping::shared_fd(fd.as_fd(), SLOT, 0).unwrap()
            } else {
                Mapping::anonymous_with(
                    SLOT,
                    MapOptions {
                        align: 2 << 20,
                        ..MapOptions::default()
                    },
                )
                .unwrap()
            };
            let mode = if shared {
                RegisterMode::MISSING | RegisterMode::MINOR
            } else {
                RegisterMode::MISSING
            };
            uffd.register(&map, mode).unwrap();
            GuestSlot { gpa, map }
        })
        .collect();
    let (cmd, _, _) = read_req(&mut main);
    assert_eq!(cmd, command::COMPLETE, "--resume sends Complete");
    ok(&mut main);

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (slots, uffd, stop) = (&slots, &uffd, &stop);
        // The fault thread: each fault becomes one PageFault of one page.
        s.spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Acquire) {
                let Ok(Some(ev)) = uffd.next_event(Some(Duration::from_millis(20))) else {
                    continue;
                };
                let Event::PageFault { addr, .. } = ev else {
                    continue;
                };
                let page = addr & !4095;
                let sl = slots.iter().find(|g| g.map.contains(page)).unwrap();
                let gpa = sl.gpa + (page - sl.map.addr()) as u64;
                fault
                    .write_all(&frame(command::PAGE_FAULT, [0; 6], 16))
                    .unwrap();
                let mut r = [0u8; 16];
                r[..8].copy_from_slice(&gpa.to_le_bytes());
                r[8..].copy_from_slice(&4096u64.to_le_bytes());
                fault.write_all(&r).unwrap();
                let (status, _, len) = read_req(&mut fault);
                assert_eq!(status, 1, "PageFault at {gpa:#x} refused");
                let res = if shared {
                    assert_eq!(len, 0, "shared memory: no inline page");
                    uffd.continue_range(page, 4096, ContinueMode::empty())
                } else {
                    assert_eq!(len, 4096, "private memory: one inline page");
                    fault.read_exact(&mut buf).unwrap();
                    uffd.copy(page, &buf, CopyMode::empty())
                };
                if matches!(res, Ok(Install::Exists)) {
                    uffd.wake(page, 4096).unwrap();
                }
                let _ = res.unwrap();
            }
            // Cloud Hypervisor closes the fault connection when done.
            drop(fault);
        });
        std::thread::scope(|v| {
            for t in 0..3u64 {
                let data = &data;
                v.spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                    let mut page = vec![0u8; 4096];
                    for _ in 0..100 {
                        let k = rng.random_range(0..2);
                        let off = rng.random_range(0..SLOT / 4096) * 4096;
                        slots[k].map.read_at(off, &mut page);
                        // Store order is ascending gpa: slot 1 (gpa 0) first.
                        let base = if slots[k].gpa == 0 { 0 } else { SLOT };
                        assert_eq!(page, data[base + off..base + off + 4096], "slot {k} +{off}");
                    }
                });
            }
        });
        stop.store(true, Ordering::Release);
    });
    let out = child.wait_with_output().unwrap();
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{o}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        o.contains("page faults served") && o.contains(" 0 failed"),
        "{o}"
    );
}

#[test]
fn ch_restore_serves_shared_memory_on_demand() {
    restore(true);
}

#[test]
fn ch_restore_serves_private_memory_inline() {
    restore(false);
}

/// A Cloud Hypervisor that refuses the configuration ends the restore with a clear error.
#[test]
fn ch_restore_reports_a_refused_step() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("ch.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let config = r#"{"memory_manager_data":{"guest_ram_mappings":[{"slot":0,"gpa":0,"size":4096,"file_offset":0}]}}"#;
    std::fs::write(tmp.path().join("c.json"), config).unwrap();
    std::fs::write(tmp.path().join("s.json"), "{}").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_memsync"))
        .args(["ch-restore", "--socket"])
        .arg(&sock)
        .arg("--config")
        .arg(tmp.path().join("c.json"))
        .arg("--state")
        .arg(tmp.path().join("s.json"))
        .arg("mem:4K")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut main, _) = listener.accept().unwrap();
    let _ = read_req(&mut main);
    ok(&mut main);
    let (cmd, _, len) = read_req(&mut main);
    assert_eq!(cmd, command::CONFIG);
    let _ = payload(&mut main, len);
    main.write_all(&frame(2, [0; 6], 0)).unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("refused Config"), "{e}");
}
