//! What every command shares: the store registry, the runtime, the stores to report metrics
//! of, a progress bar, and size arguments. A leaf: it imports nothing from the commands.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use memsync_core::layers::Stats;
use memsync_core::size::parse_size;
use memsync_core::{DynStore, Registry, redact};
use parking_lot::Mutex;

/// Everything a command needs: the store registry, a runtime, and the stores to report metrics of.
pub struct Context {
    pub registry: Registry,
    pub rt: tokio::runtime::Runtime,
    metrics: Option<PathBuf>,
    opened: Mutex<Vec<(String, Arc<Stats<DynStore>>)>>,
}

/// The registry with every store compiled into this binary.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    memsync_local::register(&mut r);
    memsync_nbd::register(&mut r);
    memsync_redis::register(&mut r);
    memsync_s3::register(&mut r);
    memsync_cql::register(&mut r);
    r
}

impl Context {
    pub fn new(metrics: Option<PathBuf>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        Context {
            registry: registry(),
            rt,
            metrics,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// End the runtime, waiting at most `wait` for its blocking tasks. After a failure one of
    /// them may wait for something that never answers (a `mount` that gave up its final flush
    /// leaves a write-back or an unmount behind), and dropping the runtime would wait for it.
    pub fn shutdown(self, wait: std::time::Duration) {
        self.rt.shutdown_timeout(wait);
    }

    /// Open a store URL. Every store is wrapped in a stats layer, reported with `--metrics`.
    pub fn open(&self, url: &str) -> Result<DynStore> {
        let store = self
            .rt
            .block_on(self.registry.open(url))
            .with_context(|| format!("cannot open {}", redact(url)))?;
        Ok(self.track(url, store))
    }

    /// Wrap a store opened some other way (e.g. a cache) in a stats layer reported with
    /// `--metrics` under the label `url`.
    pub fn track(&self, url: &str, store: DynStore) -> DynStore {
        let stats = Arc::new(Stats::new(store));
        self.opened.lock().push((url.to_owned(), stats.clone()));
        stats
    }

    /// Write Prometheus text for every opened store to the `--metrics` file.
    pub fn write_metrics(&self) -> Result<()> {
        let Some(path) = &self.metrics else {
            return Ok(());
        };
        let mut text = String::new();
        for (url, stats) in self.opened.lock().iter() {
            // A URL's password or keys must not end up in a metrics file.
            let label = format!(
                "store=\"{}\"",
                redact(url).replace('\\', "\\\\").replace('"', "\\\"")
            );
            text.push_str(&stats.render_prometheus("memsync_store", &label));
        }
        std::fs::write(path, text).with_context(|| format!("writing metrics to {}", path.display()))
    }
}

pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    // Hidden when stderr is not a terminal (indicatif does that), so logs and CI stay clean.
    pb
}

pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) if n > 256 << 20 => Err("must be at most 256M".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
