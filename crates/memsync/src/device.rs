//! `memsync mount STORE --device /dev/nbdN`: a direct mount. The store (or a managed cache
//! of it with `--cache`) becomes a kernel block device through the kernel's NBD client, served
//! on socket pairs inside this process (`memsync_nbd::device`). `memsync info /dev/nbdN` says
//! what backs a device: the kernel's view (netlink status, sysfs) and the record this command
//! keeps under the run directory.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use memsync_cache::open_cache;
use memsync_core::size::format_size;
use memsync_core::{DynStore, redact};
use memsync_nbd::device::{Device, DeviceConfig, device_index, device_state};
use serde_json::json;

use crate::context::Context;
use crate::mount::{MountArgs, cache_config, cache_state, close_cache};

/// Where device records live: `$MEMSYNC_RUN_DIR`, or /run/memsync.
fn run_dir() -> PathBuf {
    std::env::var_os("MEMSYNC_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/memsync"))
}

fn record_path(index: u32) -> PathBuf {
    run_dir().join(format!("nbd{index}.json"))
}

/// The identifier the kernel shows in /sys/block/nbdN/backend; a reconnect must give the same.
fn backend_id(remote: &str) -> String {
    let mut s = format!("memsync {}", redact(remote));
    if s.len() > 255 {
        let mut end = 255;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn write_record(dev: &Device, a: &MountArgs, block: u64) -> Result<PathBuf> {
    let path = record_path(dev.index());
    std::fs::create_dir_all(run_dir())
        .with_context(|| format!("creating {}", run_dir().display()))?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rec = json!({
        "device": dev.path(),
        "index": dev.index(),
        "pid": std::process::id(),
        "store": redact(&a.remote),
        "cache": a.cache,
        "interface": dev.interface().to_string(),
        "connections": a.device.connections,
        "size": dev.size(),
        "block_size": block,
        "dead_timeout_s": a.device.dead_timeout.as_secs(),
        "started_unix": started,
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, format!("{rec}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Whether an `info` argument names a device rather than a store URL.
pub fn is_device(arg: &str) -> bool {
    !arg.contains(':') && device_index(Path::new(arg)).is_ok()
}

pub fn mount(ctx: &Context, a: MountArgs) -> Result<()> {
    let Some(path) = a.device.device.clone() else {
        bail!("no --device");
    };
    if a.fuse.is_some() || a.nbd.is_some() {
        bail!("--device is a mount of its own: it cannot be combined with --fuse or --nbd");
    }
    if a.migrate.migrate_to.is_some() {
        bail!("--migrate-to is not available with --device; use --fuse or --nbd");
    }
    if a.sync.sync_to.is_some() {
        bail!(
            "--sync-to is not available with --device yet; use --fuse or --nbd, or `memsync sync --every` on the device"
        );
    }
    device_index(&path)?;
    let cfg = cache_config(&a)?;
    ctx.rt.block_on(async {
        let cache = match &a.cache {
            Some(dir) => {
                let c = open_cache(&ctx.registry, &a.remote, dir, cfg).await?;
                eprintln!("memsync: {}", cache_state(&c));
                Some(c)
            }
            None => None,
        };
        let store: DynStore = match &cache {
            Some(c) => ctx.track(&a.remote, c.clone()),
            None => ctx
                .registry
                .open(&a.remote)
                .await
                .map(|s| ctx.track(&a.remote, s))
                .with_context(|| format!("cannot open {}", redact(&a.remote)))?,
        };
        let block = memsync_nbd::device::block_size(store.size(), None)?;
        let cfg = DeviceConfig {
            connections: a.device.connections,
            interface: a.device.interface,
            timeout: a.device.io_timeout,
            dead_timeout: a.device.dead_timeout,
            backend: backend_id(&a.remote),
            read_only: a.device.read_only,
            block_size: None,
        };
        let dev = if a.device.reconnect {
            Device::reattach(&path, store, &cfg).await
        } else {
            Device::attach(&path, store, &cfg).await
        }
        .with_context(|| format!("attaching {} to {}", redact(&a.remote), path.display()))?;
        let record = write_record(&dev, &a, block);
        if let Err(e) = &record {
            eprintln!("memsync: warning: no device record: {e:#}");
        }
        outln!(
            "memsync: {} {} ({}, {} connection(s), {}): {}",
            path.display(),
            if a.device.reconnect {
                "reattached"
            } else {
                "attached"
            },
            dev.interface(),
            a.device.connections,
            format_size(dev.size()),
            redact(&a.remote)
        );
        {
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let closed_by_kernel = tokio::select! {
            _ = int.recv() => false,
            _ = term.recv() => false,
            () = dev.closed() => true,
        };
        let result = if closed_by_kernel {
            eprintln!(
                "memsync: the kernel closed every connection of {} (disconnected elsewhere{})",
                path.display(),
                if a.device.reconnect {
                    ", or it took none of the new sockets"
                } else {
                    ""
                }
            );
            // The device is gone from under us: flush what the store holds.
            dev.detach_closed().await.context("flushing the store")
        } else {
            eprintln!("memsync: detaching {}: flush, disconnect", path.display());
            dev.detach().await.context("detaching the device")
        };
        if let Ok(p) = &record {
            let _ = std::fs::remove_file(p);
        }
        let summary = match &cache {
            Some(c) => close_cache(c).await?,
            None => String::new(),
        };
        result?;
        eprintln!("memsync: stopped {}{summary}", path.display());
        anyhow::Ok(())
    })
}

/// `memsync info /dev/nbdN`.
pub fn info(_ctx: &Context, arg: &str) -> Result<()> {
    let index = device_index(Path::new(arg))?;
    let st = device_state(index).context("asking the kernel (netlink NBD_CMD_STATUS)")?;
    outln!("device:       {arg}");
    outln!(
        "connected:    {}",
        match st.connected {
            Some(true) => "yes (NBD_CMD_STATUS)",
            Some(false) => "no (NBD_CMD_STATUS)",
            None => "unknown (the kernel has no nbd netlink family)",
        }
    );
    if let Some(size) = st.size {
        outln!("size:         {} ({size} bytes)", format_size(size));
    }
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    if let Some(pid) = st.pid {
        outln!(
            "started by:   pid {pid} ({})",
            if alive(pid) { "alive" } else { "gone" }
        );
    }
    if let Some(b) = &st.backend {
        outln!("backend:      {b}");
    }
    let rec_path = record_path(index);
    let rec: Option<serde_json::Value> = std::fs::read_to_string(&rec_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    match rec {
        Some(r) => {
            let pid = r["pid"].as_u64().unwrap_or(0) as u32;
            outln!(
                "served by:    memsync pid {pid} ({}), {} connection(s) by {}",
                if alive(pid) { "alive" } else { "gone" },
                r["connections"],
                r["interface"].as_str().unwrap_or("?")
            );
            outln!("store:        {}", r["store"].as_str().unwrap_or("?"));
            if let Some(c) = r["cache"].as_str() {
                outln!("cache:        {c}");
            }
            outln!("record:       {}", rec_path.display());
            if st.connected == Some(true) && !alive(pid) {
                outln!(
                    "state:        memsync is gone: I/O waits up to {} s for \
                     `memsync mount {} --device {arg} --reconnect`, then fails with EIO",
                    r["dead_timeout_s"],
                    r["store"].as_str().unwrap_or("STORE")
                );
            }
        }
        None => {
            if st.connected == Some(true) || st.pid.is_some() {
                outln!(
                    "served by:    no memsync record in {} (another program?)",
                    run_dir().display()
                );
            } else {
                outln!("served by:    nothing (free)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments() {
        assert!(is_device("/dev/nbd0"));
        assert!(is_device("/dev/nbd12"));
        assert!(!is_device("mem:1G"));
        assert!(!is_device("file:/dev/nbd0"));
        assert!(!is_device("/dev/sda"));
    }

    #[test]
    fn backend_ids_hide_secrets_and_stay_short() {
        let id = backend_id("redis://:secret@host/?size=1G");
        assert!(!id.contains("secret"), "{id}");
        assert!(id.starts_with("memsync redis://"));
        let long = format!("mem:1G?x={}", "é".repeat(300));
        assert!(backend_id(&long).len() <= 255);
    }
}
