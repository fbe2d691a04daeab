//! Tour step: delta sync of a changed file, beside rsync on the same change.

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use memsync_bench::sync::stat_number;
use memsync_core::size::format_size;
use memsync_sync::{PeerAddr, PeerConfig, RemoteDest, Source, SyncOptions};
use rand::{Rng as _, RngCore as _, SeedableRng as _};

use super::{Tour, check_interrupted};

fn write_random(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut block = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        check_interrupted()?;
        let n = (size - off).min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Overwrite `pct`% of the 4 KiB pages of `path` (distinct pages) with random bytes; returns
/// the bytes changed.
fn mutate(path: &Path, size: u64, pct: f64, seed: u64) -> Result<u64> {
    let pages = size / 4096;
    let n = ((pages as f64 * pct / 100.0).round() as u64).max(1);
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut chosen = std::collections::HashSet::new();
    let mut page = [0u8; 4096];
    while (chosen.len() as u64) < n {
        let p = rng.random_range(0..pages);
        if chosen.insert(p) {
            rng.fill_bytes(&mut page);
            f.write_all_at(&page, p * 4096)?;
        }
    }
    Ok(n * 4096)
}

pub(super) fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).with_context(|| path.display().to_string())?)?;
    Ok(h.finalize())
}

/// rsync's bytes (sent, received), or `None` if rsync is not installed.
fn rsync(src: &Path, dst: &Path) -> Result<Option<(u64, u64)>> {
    let o = match Command::new("rsync")
        .args(["-B4096", "--inplace", "--no-whole-file", "--stats"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running rsync"),
    };
    if !o.status.success() {
        bail!(
            "rsync failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let out = String::from_utf8_lossy(&o.stdout);
    Ok(Some((
        stat_number(&out, "Total bytes sent:")?,
        stat_number(&out, "Total bytes received:")?,
    )))
}

pub(super) fn run(t: &mut Tour<'_>) -> Result<()> {
    let ctx = t.ctx;
    let size: u64 = if t.quick { 16 << 20 } else { 128 << 20 };
    t.step(
        "delta-sync a changed file, beside rsync",
        &format!(
            "A {} file of random data is copied twice; then 1% of its 4 KiB pages change.\n\
             memsync sync brings one copy up to date through a sync peer on loopback TCP (in\n\
             this process, as `memsync sync --listen` runs it): both sides compare BLAKE3\n\
             chunk digests, then page digests inside differing chunks, and only changed pages\n\
             move. rsync -B4096 --inplace --no-whole-file updates the other copy.",
            format_size(size)
        ),
    )?;
    let src = t.path("sync-src.img");
    let dst = t.path("sync-dst.img");
    let rdst = t.path("rsync-dst.img");
    write_random(&src, size, 2)?;
    std::fs::copy(&src, &dst)?;
    std::fs::copy(&src, &rdst)?;
    // rsync skips a file whose size and mtime match; the copy may share the source's second.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rdst)?
        .set_modified(std::time::UNIX_EPOCH)?;
    let changed = mutate(&src, size, 1.0, 3)?;
    outln!(
        "   changed {} in {} pages",
        format_size(changed),
        changed / 4096
    );

    let src_store = ctx.open(&format!("file:{}", src.display()))?;
    let dst_store = ctx.open(&format!("file:{}", dst.display()))?;
    let peer = memsync_sync::Peer::new(
        dst_store,
        PeerConfig {
            tls: None,
            index_file: None,
            no_fsync: true,
        },
    );
    let bar = crate::sync::Bar(crate::context::progress(size, "sync"));
    let report = ctx.rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = PeerAddr::parse(&format!("memsync://{}", l.local_addr()?))?;
        let serving = tokio::spawn(peer.clone().serve(l));
        let r = async {
            let dest = RemoteDest::connect(&addr, size, memsync_sync::DEFAULT_CHUNK, true).await?;
            let source = Source {
                store: src_store,
                index: None,
            };
            anyhow::Ok(memsync_sync::sync(&source, dest, SyncOptions::default(), &bar).await?)
        }
        .await;
        serving.abort();
        r
    })?;
    bar.0.finish_and_clear();
    check_interrupted()?;
    outln!(
        "   memsync: {} of {} chunks differed; {} sent, {} received on the wire ({:.2}x the changed bytes), {:.3} s",
        report.differing,
        report.chunks,
        format_size(report.wire_sent),
        format_size(report.wire_received),
        report.wire_sent as f64 / changed as f64,
        report.elapsed.as_secs_f64()
    );
    t.figure(
        "delta sync, memsync sent",
        format!(
            "{} ({:.2}x the {} changed)",
            format_size(report.wire_sent),
            report.wire_sent as f64 / changed as f64,
            format_size(changed)
        ),
    );
    let pb = indicatif::ProgressBar::new_spinner().with_message("rsync");
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let rs = rsync(&src, &rdst);
    pb.finish_and_clear();
    let want = hash_file(&src)?;
    match rs? {
        Some((sent, received)) => {
            outln!(
                "   rsync:   {} sent, {} received ({:.2}x the changed bytes)",
                format_size(sent),
                format_size(received),
                sent as f64 / changed as f64
            );
            t.figure(
                "delta sync, rsync -B4096 sent",
                format!(
                    "{} ({:.2}x)",
                    format_size(sent),
                    sent as f64 / changed as f64
                ),
            );
            if hash_file(&rdst)? != want {
                bail!("rsync's copy differs from the source");
            }
        }
        None => {
            outln!("   rsync:   not installed, no comparison (apt-get install rsync)");
            t.figure("delta sync, rsync", "missing".into());
        }
    }
    let got = hash_file(&dst)?;
    if got != want {
        bail!("after the sync the copy has blake3 {got}, the source {want}");
    }
    outln!("   files equal: blake3 {got}");
    Ok(())
}
