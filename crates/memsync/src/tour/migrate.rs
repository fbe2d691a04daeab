//! Tour step: live migration of a region under a running writer to a second process (this
//! binary again, as the hidden `memsync demo --receive`).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use memsync_core::size::format_size;
use memsync_migrate::{
    DestConfig, Dialer, Gate, Hooks as _, Listener, Mode, NoHooks, RegionTarget, SourceConfig,
    migrate_region, receive_region,
};
use memsync_region::{LazyRegion, RegionConfig, WriteTracking};

use super::{ChildGuard, Tour, check_interrupted, fill_random};
use crate::context::Context;

const CHUNK: usize = 4096;

fn region_cfg(tracking: WriteTracking) -> RegionConfig {
    RegionConfig {
        chunk_size: CHUNK,
        write_tracking: tracking,
        huge_pages: false,
        fetch_deadline: Duration::from_secs(60),
        ..RegionConfig::default()
    }
}

fn digest(r: &LazyRegion) -> Result<blake3::Hash> {
    let mut v = vec![0u8; r.len()];
    r.read_at(0, &mut v).context("reading the region")?;
    Ok(blake3::hash(&v))
}

/// The destination process: print where it listens, receive the region, print its BLAKE3 and
/// the fault figures on one line.
pub(crate) fn receive(ctx: &Context, size: u64) -> Result<()> {
    ctx.rt.block_on(async {
        let target = RegionTarget::new(size, region_cfg(WriteTracking::Off))?;
        let listener = Arc::new(Listener::bind("127.0.0.1:0", None).await?);
        outln!("{}", listener.url());
        let rep = receive_region(listener, target.clone(), &NoHooks, &DestConfig::default())
            .await
            .context("receiving the region")?;
        let r = target.region().clone();
        let d = tokio::task::spawn_blocking(move || digest(&r)).await??;
        outln!("{d} {} {}", rep.faults, rep.fault_p50.as_micros());
        anyhow::Ok(())
    })
}

pub(super) fn run(t: &mut Tour<'_>) -> Result<()> {
    let ctx = t.ctx;
    let size: u64 = if t.quick { 16 << 20 } else { 64 << 20 };
    t.step(
        "live-migrate a region under a running writer to a second process",
        &format!(
            "A {} region (filled from a mem: store, 4 KiB chunks, dirty-page tracking) is\n\
             written by a thread of this process at about 64 MB/s. This binary starts itself\n\
             again as the destination (`memsync demo --receive`, a separate process on\n\
             loopback TCP). Pre-copy sends the region while the writer runs, then the pages it\n\
             dirtied, and stops the writer (its gate) only for the last few: that is the\n\
             downtime. Both processes then hash their region; the hashes must match.",
            format_size(size)
        ),
    )?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["demo", "--receive", "--size", &size.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the destination process")?;
    let out = child.stdout.take().context("the destination's stdout")?;
    let guard = ChildGuard::register(child);
    let mut out = BufReader::new(out);
    let mut url = String::new();
    out.read_line(&mut url)?;
    check_interrupted()?;
    let url = url.trim().to_owned();
    if url.is_empty() {
        bail!("the destination process exited before it listened");
    }
    outln!("   destination: process {} listening on {url}", guard.0);

    let store = ctx.open(&format!("mem:{size}"))?;
    ctx.rt.block_on(fill_random(&*store, size, 4))?;
    let region = Arc::new(LazyRegion::new(store, region_cfg(WriteTracking::Dirty))?);
    let gate = Gate::new();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (r, g, stop, writes) = (region.clone(), gate.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let pass = g.enter();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for _ in 0..16 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 33) as usize % (r.len() / CHUNK) * CHUNK;
                    let page = [x as u8; CHUNK];
                    r.write_faulting(off, &page);
                }
                writes.fetch_add(16, Ordering::Relaxed);
                drop(pass);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let cfg = SourceConfig {
        mode: Mode::Precopy,
        chunk_size: CHUNK as u64,
        max_downtime: Duration::from_millis(30),
        ..SourceConfig::default()
    };
    let bar = crate::sync::Bar(crate::context::progress(size, "migrate"));
    let rep = ctx.rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dialer = Dialer::parse(&url)?;
        anyhow::Ok(migrate_region(region.clone(), &dialer, &*gate, &cfg, &bar).await?)
    });
    bar.0.finish_and_clear();
    // The writer is suspended at the gate once the migration committed; the application now
    // runs at the destination. Stop it for good whatever happened.
    let written = writes.load(Ordering::Relaxed);
    let here = rep.as_ref().ok().map(|_| digest(&region));
    stop.store(true, Ordering::Relaxed);
    let _ = ctx.rt.block_on(gate.resume());
    let _ = writer.join();
    let rep = rep?;
    let here = here.context("hashing the source region")??;
    let mut line = String::new();
    out.read_line(&mut line)?;
    check_interrupted()?;
    let ok = guard.wait()?;
    let mut f = line.split_whitespace();
    let (Some(there), Some(faults)) = (f.next(), f.next()) else {
        bail!("the destination process failed (exit ok: {ok}, printed {line:?})");
    };
    outln!(
        "   {}: passes {}, downtime {:.1} ms, {} sent ({:.2}x the region), writer wrote {} pages meanwhile; {faults} faults at the destination",
        rep.mode.name(),
        rep.passes.len(),
        rep.downtime.as_secs_f64() * 1e3,
        format_size(rep.wire_sent),
        rep.wire_sent as f64 / size as f64,
        written
    );
    if here.to_string() != there {
        bail!("the destination's region has blake3 {there}, the source's {here}");
    }
    outln!("   contents match: blake3 {here} in both processes");
    t.figure(
        "migration downtime (pre-copy)",
        format!("{:.1} ms", rep.downtime.as_secs_f64() * 1e3),
    );
    t.figure(
        "migration sent",
        format!(
            "{} ({:.2}x the region)",
            format_size(rep.wire_sent),
            rep.wire_sent as f64 / size as f64
        ),
    );
    Ok(())
}
