//! `memsync proxy`: a TCP delay proxy (RTT emulation without netem) until SIGINT/SIGTERM.

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_cache::proxy::{Proxy, ProxyConfig};
use memsync_core::size::{parse_duration, parse_size};

use crate::cmd::Context;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Where to listen, HOST:PORT (port 0 picks one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Where to forward, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Added round-trip time (half each way), e.g. 10ms, 0.5s.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub rtt: std::time::Duration,
    /// Bandwidth cap per direction, in bits per second with K/M/G suffixes (e.g. 1G = 1 Gbit/s).
    #[arg(long)]
    pub bandwidth: Option<String>,
}

/// Parse a bit rate like `1G` (10^9 bit/s... binary suffixes as elsewhere) into bytes/s.
fn parse_rate(s: &str) -> Result<u64> {
    let bits = parse_size(s.trim_end_matches("bit").trim_end_matches("bps"))
        .with_context(|| format!("--bandwidth {s}"))?;
    Ok((bits / 8).max(1))
}

pub fn proxy(ctx: &Context, a: ProxyArgs) -> Result<()> {
    let cfg = ProxyConfig {
        rtt: a.rtt,
        bandwidth: a.bandwidth.as_deref().map(parse_rate).transpose()?,
        ..ProxyConfig::default()
    };
    ctx.rt.block_on(async move {
        let p = Proxy::start(&a.listen, &a.to, cfg)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        outln!(
            "memsync: proxy {} -> {} (rtt {:?})",
            p.local_addr(),
            a.to,
            a.rtt
        );
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let s = p.stats();
        eprintln!(
            "memsync: proxy stopped: {} B up, {} B down, {} connections",
            s.up_bytes, s.down_bytes, s.accepted
        );
        anyhow::Ok(())
    })
}
