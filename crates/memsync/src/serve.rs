//! `memsync serve`: export stores over NBD until SIGINT/SIGTERM, then shut down cleanly.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use memsync_nbd::{Export, ListenAddr, Server, ServerConfig, TlsMode};

use crate::context::Context;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The store to export (the default export, named by --export NAME). May be omitted when
    /// every export is given as --export NAME=URL.
    pub store: Option<String>,
    /// Where to listen: nbd://HOST[:PORT] or nbd+unix:///?socket=PATH (repeatable). The port
    /// defaults to 10809 and port 0 picks a free one; the address served is printed on stdout.
    /// An existing file at PATH is replaced only if it is a socket nobody listens on.
    #[arg(long, default_value = "nbd://127.0.0.1:10809")]
    pub listen: Vec<String>,
    /// NAME: the export name of STORE (default: empty, the default export). NAME=URL: one more
    /// export (repeatable).
    #[arg(long)]
    pub export: Vec<String>,
    /// Serve every export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Description shown by `nbdinfo --list`.
    #[arg(long, default_value = "")]
    pub description: String,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS mode: off, optional or required (default: optional with a certificate, else off).
    #[arg(long)]
    pub tls: Option<TlsMode>,
    /// Connections served at once.
    #[arg(long, default_value_t = 128)]
    pub max_connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
}

pub fn serve(ctx: &Context, a: ServeArgs) -> Result<()> {
    let mut exports = Vec::new();
    let mut default_name = String::new();
    let mut extra = Vec::new();
    for e in &a.export {
        match e.split_once('=') {
            Some((n, url)) => extra.push((n.to_owned(), url.to_owned())),
            None => default_name = e.clone(),
        }
    }
    if let Some(url) = &a.store {
        let mut ex = Export::new(default_name.clone(), ctx.open(url)?);
        ex.read_only = a.read_only;
        ex.description = a.description.clone();
        exports.push(ex);
    }
    for (n, url) in extra {
        let mut ex = Export::new(n, ctx.open(&url)?);
        ex.read_only = a.read_only;
        ex.description = a.description.clone();
        exports.push(ex);
    }
    if exports.is_empty() {
        bail!("nothing to serve: give a STORE_URL or --export NAME=URL");
    }
    let mut cfg = ServerConfig::new(exports);
    cfg.max_connections = a.max_connections.max(1);
    cfg.max_in_flight = a.max_in_flight.max(1);
    cfg.tls_mode = a.tls.unwrap_or(if a.tls_cert.is_some() {
        TlsMode::Optional
    } else {
        TlsMode::Off
    });
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        cfg.tls = Some(memsync_nbd::server_tls_config(c, k)?);
    }
    if cfg.tls_mode != TlsMode::Off && cfg.tls.is_none() {
        bail!("--tls {:?} needs --tls-cert and --tls-key", cfg.tls_mode);
    }
    let listens = a
        .listen
        .iter()
        .map(|s| ListenAddr::parse(s).with_context(|| format!("--listen {s}")))
        .collect::<Result<Vec<_>>>()?;
    ctx.rt.block_on(async move {
        let server = Server::new(cfg)?;
        for l in &listens {
            let url = server.listen(l).await?;
            outln!("memsync: serving {url}");
        }
        let _ = std::io::stdout().flush();
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("memsync: shutting down: finishing requests in flight and flushing");
        server
            .shutdown()
            .await
            .context("flushing the exported stores")?;
        eprintln!("memsync: stopped");
        anyhow::Ok(())
    })
}
