//! `memsync proxy`: a TCP delay proxy (RTT emulation without netem) until SIGINT/SIGTERM.

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_cache::proxy::{Proxy, ProxyConfig};
use memsync_core::size::parse_size;

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

/// Parse `10ms`, `2s`, `1.5s`, `500us`, `1m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10ms, 5s)"))?;
    let secs = match unit {
        "ns" => v / 1e9,
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" | "" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
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
        println!(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("10ms").unwrap(),
            std::time::Duration::from_millis(10)
        );
        assert_eq!(
            parse_duration("1.5s").unwrap(),
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("5").unwrap(),
            std::time::Duration::from_secs(5)
        );
        assert!(parse_duration("x").is_err());
    }
}
