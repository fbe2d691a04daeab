//! [`NbdStore`]: connections opened and negotiated, requests spread over them, the `Store`
//! operations split into requests.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::future::try_join_all;
use memsync_core::{
    Caps, Extent, ExtentKind, Result, Store, StoreError, async_trait, check_range, check_write,
};

use tokio::net::{TcpStream, UnixStream};

use super::conn::{Conn, Done};
use super::handshake::{greet, negotiate, rep_error, simple_option};
use super::{ClientConfig, ExportInfo, NbdAddr, io_err, nbd_err};
use crate::proto::*;
use crate::transport::Transport;

/// A store backed by an NBD export.
pub struct NbdStore {
    conns: Vec<Conn>,
    next: AtomicUsize,
    info: ExportInfo,
    desc: String,
}

impl std::fmt::Debug for NbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NbdStore({}, {} connections)",
            self.desc,
            self.conns.len()
        )
    }
}

async fn open_conn<S: Transport>(mut s: S, cfg: &ClientConfig) -> Result<(Conn, ExportInfo)> {
    let no_zeroes = greet(&mut s).await?;
    if let Some(tls) = &cfg.tls {
        if let Some((h, d)) = simple_option(&mut s, Opt::StartTls).await? {
            return Err(rep_error("STARTTLS", &h, &d));
        }
        let host = cfg.tls_hostname.clone().unwrap_or_else(|| match &cfg.addr {
            NbdAddr::Tcp { host, .. } => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            NbdAddr::Unix(_) => "localhost".to_owned(),
        });
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| nbd_err(format!("nbd: TLS server name {host:?}: {e}")))?;
        let mut t = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, s)
            .await
            .map_err(|e| io_err("TLS handshake", e))?;
        let info = negotiate(&mut t, cfg, no_zeroes).await?;
        Ok((start_conn(t, info), info))
    } else {
        let info = negotiate(&mut s, cfg, no_zeroes).await?;
        Ok((start_conn(s, info), info))
    }
}

fn start_conn<S: Transport>(s: S, info: ExportInfo) -> Conn {
    let (r, w) = s.halves();
    Conn::new(Box::new(r), Box::new(w), &info)
}

async fn connect_one(cfg: &ClientConfig) -> Result<(Conn, ExportInfo)> {
    match &cfg.addr {
        NbdAddr::Tcp { host, port } => {
            let s = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), *port))
                .await
                .map_err(|e| io_err(&format!("connecting to {host}:{port}"), e))?;
            let _ = s.set_nodelay(true);
            open_conn(s, cfg).await
        }
        NbdAddr::Unix(p) => {
            let s = UnixStream::connect(p)
                .await
                .map_err(|e| io_err(&format!("connecting to {}", p.display()), e))?;
            open_conn(s, cfg).await
        }
    }
}

impl NbdStore {
    /// Connect, negotiate, and open more connections if the server allows multi-conn.
    pub async fn connect(cfg: ClientConfig) -> Result<Self> {
        let t = cfg.timeout;
        let desc = match &cfg.addr {
            NbdAddr::Tcp { host, port } => format!("nbd://{host}:{port}/{}", cfg.export),
            NbdAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", cfg.export, p.display()),
        };
        let timed = move |cfg: ClientConfig| async move {
            tokio::time::timeout(t, connect_one(&cfg))
                .await
                .map_err(|_| StoreError::Timeout {
                    op: "nbd connect",
                    after_ms: t.as_millis() as u64,
                })?
        };
        // The extra connections negotiate while the first one does: over a long link each
        // handshake is several round trips, and doing them one after the other doubles the
        // time to open. They are kept only if the server allows multi-conn; otherwise they are
        // dropped unused (a server that serves one client at a time never gets to them):
        // dropping the set aborts whatever is still negotiating.
        let mut extras = tokio::task::JoinSet::new();
        for _ in 1..cfg.connections.max(1) {
            extras.spawn(timed(cfg.clone()));
        }
        let (first, info) = timed(cfg.clone()).await?;
        let mut conns = vec![first];
        if info.flags & TF_CAN_MULTI_CONN != 0 {
            while let Some(r) = extras.join_next().await {
                match r {
                    Ok(Ok((c, _))) => conns.push(c),
                    Ok(Err(e)) => {
                        tracing::warn!("nbd: {desc}: an extra connection failed: {}", e.chain())
                    }
                    Err(e) => tracing::warn!("nbd: {desc}: an extra connection failed: {e}"),
                }
            }
        }
        Ok(NbdStore {
            conns,
            next: AtomicUsize::new(0),
            info,
            desc,
        })
    }

    fn conn(&self) -> &Conn {
        let n = self.conns.len();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let c = &self.conns[i];
        if c.dead.load(Ordering::Relaxed) {
            self.conns
                .iter()
                .find(|c| !c.dead.load(Ordering::Relaxed))
                .unwrap_or(c)
        } else {
            c
        }
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether extended headers / structured replies / base:allocation were negotiated.
    pub fn negotiated(&self) -> (bool, bool, bool) {
        (
            self.info.extended,
            self.info.structured,
            self.info.meta.is_some(),
        )
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    fn max_req(&self) -> u64 {
        let m = u64::from(self.info.max).clamp(4096, 32 << 20);
        let b = u64::from(self.info.min).max(1);
        (m / b * b).max(b)
    }

    /// Split `offset..offset+len` into requests of at most `step` bytes.
    fn pieces(offset: u64, len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            (o, (end - o).min(step))
        })
    }

    /// The size of the requests a read of `len` bytes is split into: at most the maximum
    /// block size, and small enough to keep every connection busy, but not below 1 MiB.
    fn read_step(&self, len: u64) -> u64 {
        let max = self.max_req();
        let bs = u64::from(self.info.min).max(1);
        let per_conn = len.div_ceil(self.conns.len() as u64 * 2).max(1 << 20);
        (per_conn.div_ceil(bs) * bs).min(max)
    }

    fn has(&self, f: u16) -> bool {
        self.info.flags & f != 0
    }
}

#[async_trait]
impl Store for NbdStore {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.read_only = self.has(TF_READ_ONLY);
        c.block_size = u64::from(self.info.min).max(1);
        c.max_io = self.max_req();
        c.preferred_io = u64::from(self.info.preferred).clamp(c.block_size, c.max_io);
        // NBD_CMD_TRIM is only a hint (contents are undefined afterwards), but a store's trim
        // must read back zeros: trim is sent as WRITE_ZEROES without NO_HOLE, which lets the
        // server deallocate and guarantees zeros.
        c.trim = self.has(TF_SEND_WRITE_ZEROES) && !c.read_only;
        c.fast_zero = self.has(TF_SEND_WRITE_ZEROES) && !c.read_only;
        c.extents = self.info.meta.is_some();
        c.flush = self.has(TF_SEND_FLUSH);
        c.multi_conn = self.has(TF_CAN_MULTI_CONN);
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(
            self.info.size,
            self.caps().block_size,
            offset,
            buf.len() as u64,
        )?;
        if buf.is_empty() {
            return Ok(());
        }
        let step = self.read_step(buf.len() as u64) as usize;
        if buf.len() <= step {
            let len = buf.len() as u64;
            self.conn()
                .request(CMD_READ, 0, offset, len, None, Some(buf))
                .await?;
            return Ok(());
        }
        // Several requests in flight (spread over the connections), each reading straight
        // into its own part of `buf`.
        try_join_all(buf.chunks_mut(step).enumerate().map(|(i, part)| {
            let o = offset + (i * step) as u64;
            let n = part.len() as u64;
            self.conn().request(CMD_READ, 0, o, n, None, Some(part))
        }))
        .await?;
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.info.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let step = self.max_req();
        let reqs = Self::pieces(offset, data.len() as u64, step).map(|(o, n)| {
            let s = (o - offset) as usize;
            let p = data.slice(s..s + n as usize);
            async move {
                self.conn()
                    .request(CMD_WRITE, 0, o, n, Some(p), None)
                    .await
                    .map(|_| ())
            }
        });
        try_join_all(reqs).await.map(|_| ())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(TF_SEND_FLUSH) {
            return Ok(());
        }
        if self.has(TF_CAN_MULTI_CONN) {
            return self
                .conn()
                .request(CMD_FLUSH, 0, 0, 0, None, None)
                .await
                .map(|_| ());
        }
        try_join_all(
            self.conns
                .iter()
                .map(|c| c.request(CMD_FLUSH, 0, 0, 0, None, None)),
        )
        .await
        .map(|_| ())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if !self.has(TF_SEND_WRITE_ZEROES) {
            return Err(StoreError::Unsupported { op: "trim" });
        }
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.info.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.has(TF_SEND_WRITE_ZEROES) {
            let step = self.zero_step();
            for (o, n) in Self::pieces(offset, len, step) {
                self.conn()
                    .request(CMD_WRITE_ZEROES, 0, o, n, None, None)
                    .await?;
            }
            return Ok(());
        }
        let step = self.max_req().min(1 << 20);
        let zeros = Bytes::from(vec![0u8; step as usize]);
        for (o, n) in Self::pieces(offset, len, step) {
            self.write(o, zeros.slice(..n as usize)).await?;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.info.size, 1, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.info.meta.is_none() {
            return Ok(vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]);
        }
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let bs = u64::from(self.info.min).max(1);
        while pos < end {
            // Block status ranges honour the minimum block size; widen to it and clip back.
            let qoff = pos / bs * bs;
            let qend = end.div_ceil(bs).saturating_mul(bs).min(self.info.size);
            let qlen = (qend - qoff).min(if self.info.extended { 1 << 40 } else { 1 << 31 });
            let d = match self
                .conn()
                .request(CMD_BLOCK_STATUS, 0, qoff, qlen, None, None)
                .await?
            {
                Done::Extents(d) => d,
                _ => return Err(nbd_err("nbd: block status returned no extents")),
            };
            let mut p = qoff;
            for x in d {
                let kind = if x.flags & STATE_ZERO != 0 {
                    if x.flags & STATE_HOLE != 0 {
                        ExtentKind::Hole
                    } else {
                        ExtentKind::Zero
                    }
                } else {
                    ExtentKind::Data
                };
                let (s, e) = (p.max(pos), (p + x.len).min(end));
                p += x.len;
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some(l) if l.kind == kind && l.end() == s => l.len += e - s,
                    _ => out.push(Extent {
                        offset: s,
                        len: e - s,
                        kind,
                    }),
                }
                if p >= end {
                    break;
                }
            }
            let new_pos = out.last().map_or(pos, |l| l.end());
            if new_pos <= pos {
                return Err(nbd_err("nbd: block status made no progress"));
            }
            pos = new_pos;
        }
        Ok(out)
    }
}

impl NbdStore {
    fn zero_step(&self) -> u64 {
        let bs = u64::from(self.info.min).max(1);
        let m: u64 = if self.info.extended { 1 << 40 } else { 1 << 31 };
        (m / bs * bs).max(bs)
    }
}
