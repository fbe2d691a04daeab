//! `memsync proxy`: a TCP delay proxy (RTT emulation without netem) until SIGINT/SIGTERM.

use anyhow::{Context as _, Result};
use clap::Args;
use memsync_cache::proxy::{Proxy, ProxyConfig};
use memsync_core::size::parse_duration;

use crate::context::Context;

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
    /// Bandwidth cap per direction, in bits per second with decimal suffixes K/M/G/T (powers of
    /// 1000, as for link speeds: 1G = 1 Gbit/s = 125,000,000 bytes/s); `bit`, `bps` or `bit/s`
    /// may follow (e.g. 100Mbit, 2.5Gbps).
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
}

/// Parse a bit rate with decimal suffixes (`1G` = 10^9 bit/s) into bytes per second. Binary
/// (`Gi`) and byte (`GB`) forms are refused rather than guessed.
pub fn parse_rate(s: &str) -> Result<u64> {
    let bad = |why: &str| anyhow::anyhow!("--bandwidth {s:?}: {why} (e.g. 1G = 1 Gbit/s, 100Mbit)");
    let t = s.trim();
    let t = ["bit/s", "bps", "bit"]
        .iter()
        .find_map(|u| t.strip_suffix(u))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1_000,
                'M' => 1_000_000,
                'G' => 1_000_000_000,
                'T' => 1_000_000_000_000,
                'I' | 'B' => return Err(bad("bits per second with decimal suffixes only")),
                _ => return Err(bad("unknown suffix")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
    {
        return Err(bad("not a number"));
    }
    // Exact decimal arithmetic: 2.5G is 2,500,000,000 bit/s, not a rounded float.
    let scale = 10u128.pow(frac.len() as u32);
    let mantissa: u128 = format!("{int}{frac}")
        .parse()
        .map_err(|_| bad("not a number"))?;
    let bits = mantissa
        .checked_mul(u128::from(mult))
        .map(|b| b / scale)
        .filter(|b| *b <= u128::from(u64::MAX))
        .ok_or_else(|| bad("too large"))?;
    if bits < 8 {
        return Err(bad("below 8 bit/s (one byte per second)"));
    }
    Ok((bits / 8) as u64)
}

pub fn proxy(ctx: &Context, a: ProxyArgs) -> Result<()> {
    let cfg = ProxyConfig {
        rtt: a.rtt,
        bandwidth: a.bandwidth,
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

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn bandwidth_is_decimal_bits_per_second() {
        assert_eq!(parse_rate("1G").unwrap(), 125_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("1gbps").unwrap(), 125_000_000);
        assert_eq!(parse_rate("2.5G").unwrap(), 312_500_000);
        assert_eq!(parse_rate("100Mbit/s").unwrap(), 12_500_000);
        assert_eq!(parse_rate("32M").unwrap(), 4_000_000);
        assert_eq!(parse_rate("64K").unwrap(), 8_000);
        assert_eq!(parse_rate("8").unwrap(), 1);
        for bad in [
            "", "G", "1GiB", "1Gi", "1GB", "1X", "-1G", "1.2.3M", "0", "7", "1e9",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }
}
