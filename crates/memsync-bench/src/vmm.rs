//! The `vmm` suite: memsync's Firecracker UFFD handler against a minimal handler of the
//! upstream example's design (the memory file in local memory, one `UFFDIO_COPY` of one page
//! per fault), both serving the same local file in the same run; then memsync from a remote
//! store (an NBD export of the file over loopback TCP); then the time until the whole guest
//! memory is resident with the background pull against faults only.
//!
//! This process plays the VMM as Firecracker does (anonymous memory registered with a
//! userfaultfd with EVENT_REMOVE, the JSON regions and the descriptor sent over a Unix
//! socket) and touches random 4 KiB pages from one thread, timing each first touch; the
//! handlers serve from their own threads.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use memsync_core::DynStore;
use memsync_sys::{
    CopyMode, Event, Features, Install, MapOptions, Mapping, OpenFlags, RegisterMode, Uffd,
    recv_fds, send_fds,
};
use memsync_vmm::firecracker::{self, HandlerConfig};
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};

use crate::{Bench, Env, Proc, Subject, free_port, median, wait_tcp};

const PAGE: usize = 4096;

/// The VMM's side: guest memory registered with a Firecracker-made userfaultfd, sent over a
/// socket pair whose other end is returned.
fn vmm(size: usize) -> Result<(Mapping, Uffd, UnixStream, UnixStream)> {
    let map = Mapping::anonymous_with(
        size,
        MapOptions {
            align: 2 << 20,
            ..MapOptions::default()
        },
    )?;
    let uffd = Uffd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    })?;
    uffd.api(Features::EVENT_REMOVE)?;
    uffd.register(&map, RegisterMode::MISSING)?;
    let (a, b) = UnixStream::pair()?;
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{size},"offset":0,"page_size":4096,"page_size_kib":4096}}]"#,
        map.addr()
    );
    send_fds(&a, json.as_bytes(), &[uffd.as_fd()])?;
    Ok((map, uffd, a, b))
}

/// First touch of page 0 (µs since the handshake was sent), then `pages` random first touches:
/// `[first, p50, p99]` in µs.
fn touch(map: &Mapping, t0: Instant, pages: &[usize]) -> Vec<f64> {
    let mut b = [0u8; 8];
    map.read_at(0, &mut b);
    let first = t0.elapsed().as_secs_f64() * 1e6;
    let mut lat: Vec<f64> = pages
        .iter()
        .map(|&p| {
            let t = Instant::now();
            map.read_at(p * PAGE, &mut b);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    vec![first, median(&lat), p99]
}

fn memsync_run(env: &Env<'_>, store: &DynStore, size: usize, pages: &[usize]) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    let (map, _uffd, _a, b) = vmm(size)?;
    let hs = firecracker::receive_handshake(&b, Duration::from_secs(5))?;
    let h = firecracker::Handler::start(
        hs,
        store.clone(),
        HandlerConfig {
            chunk_size: PAGE,
            pull: false,
            runtime: Some(env.rt.handle().clone()),
            ..HandlerConfig::default()
        },
    )?;
    let v = touch(&map, t0, pages);
    anyhow::ensure!(h.errors().is_empty(), "chunk errors: {:?}", h.errors());
    Ok(v)
}

/// The upstream example's design: the memory file in memory, one thread reading events and
/// copying one page per fault (EAGAIN: retry after reading the events; EEXIST: wake).
fn minimal_run(file: &Arc<Vec<u8>>, size: usize, pages: &[usize]) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    let (map, _uffd, _a, b) = vmm(size)?;
    let mut buf = vec![0u8; 1024];
    let (n, fds) = recv_fds(&b, &mut buf, 1)?;
    let regions = firecracker::parse_regions(&buf[..n])?;
    let uffd = Uffd::from_fd(fds.into_iter().next().context("no uffd")?)?;
    let base = regions[0].base_host_virt_addr as usize;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (file, stop, uffd) = (file, &stop, &uffd);
        s.spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Ok(Some(ev)) = uffd.next_event(Some(Duration::from_millis(10))) else {
                    continue;
                };
                if let Event::PageFault { addr, .. } = ev {
                    let page = addr & !(PAGE - 1);
                    let off = page - base;
                    loop {
                        match uffd.copy(page, &file[off..off + PAGE], CopyMode::empty()) {
                            Ok(Install::Exists) => {
                                let _ = uffd.wake(page, PAGE);
                                break;
                            }
                            Ok(Install::Again { .. }) => {
                                let _ = uffd.read_event();
                            }
                            _ => break,
                        }
                    }
                }
            }
        });
        let v = touch(&map, t0, pages);
        stop.store(true, Ordering::Release);
        Ok(v)
    })
}

/// ms until every page is resident: with the pull (one touch, then wait), or by touching
/// every page in order.
fn resident_run(env: &Env<'_>, store: &DynStore, size: usize, pull: bool) -> Result<f64> {
    let t0 = Instant::now();
    let (map, _uffd, _a, b) = vmm(size)?;
    let hs = firecracker::receive_handshake(&b, Duration::from_secs(5))?;
    let h = firecracker::Handler::start(
        hs,
        store.clone(),
        HandlerConfig {
            pull,
            runtime: Some(env.rt.handle().clone()),
            ..HandlerConfig::default()
        },
    )?;
    let mut x = [0u8; 8];
    if pull {
        map.read_at(0, &mut x);
        anyhow::ensure!(
            h.region().wait_pull(Duration::from_secs(600)),
            "pull timed out"
        );
    } else {
        for p in 0..size / PAGE {
            map.read_at(p * PAGE, &mut x);
        }
    }
    anyhow::ensure!(h.region().is_complete(), "not all resident");
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

pub fn run(b: &mut Bench, env: &Env<'_>) -> Result<()> {
    let size: usize = if b.config.quick { 64 << 20 } else { 256 << 20 };
    let n = if b.config.quick { 500 } else { 2000 };
    let dir = tempfile::Builder::new()
        .prefix("memsync-bench-vmm")
        .tempdir_in(&b.config.scratch)?;
    let path = dir.path().join("mem.snap");
    let mut data = vec![0u8; size];
    rand::rngs::SmallRng::seed_from_u64(17).fill_bytes(&mut data);
    std::fs::write(&path, &data)?;
    let data = Arc::new(data);
    let mut pages: Vec<usize> = (1..size / PAGE).collect();
    pages.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(5));
    pages.truncate(n);
    let file_url = format!("file:{}", path.display());
    let file = env.rt.block_on(env.registry.open(&file_url))?;
    let metrics = [
        ("first-fault", "us"),
        ("fault-p50", "us"),
        ("fault-p99", "us"),
    ];
    let c = b.compare(
        "fault-4k-file",
        &metrics,
        vec![
            Subject::multi("memsync", || memsync_run(env, &file, size, &pages)),
            Subject::multi("minimal-copy", || minimal_run(&data, size, &pages)),
        ],
    )?;
    for (m, _) in metrics {
        b.ratio(&c, "memsync", "minimal-copy", m)?;
    }

    // A remote store: memsync serving the file over NBD on loopback TCP.
    let port = free_port()?;
    let _srv = Proc(
        Command::new(&env.exe)
            .args([
                "serve",
                &file_url,
                "--listen",
                &format!("nbd://127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    wait_tcp(port)?;
    let nbd = env
        .rt
        .block_on(env.registry.open(&format!("nbd://127.0.0.1:{port}/")))?;
    b.compare(
        "fault-4k-nbd",
        &metrics,
        vec![Subject::multi("memsync-nbd", || {
            memsync_run(env, &nbd, size, &pages)
        })],
    )?;

    b.pair(
        "resident",
        ("resident", "ms"),
        Subject::new("pull", || resident_run(env, &file, size, true)),
        Subject::new("fault-only", || resident_run(env, &file, size, false)),
    )?;
    Ok(())
}
