//! [`RedisStore`]: one Redis string per chunk, byte-addressable through GETRANGE/SETRANGE.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use memsync_core::meta::resolve;
use memsync_core::range::chunk_pieces;
use memsync_core::{
    Caps, Extent, ExtentKind, MetaInit, Result, Store, StoreError, StoreId, StoreMeta, async_trait,
    check_range, check_write,
};

use crate::RedisConfig;
use crate::client::{Client, ClientError, Cmd};
use crate::resp::Value;

/// How many of the first chunk keys are probed for data written without a metadata record.
const PROBE_CHUNKS: u64 = 16;

/// Read, check, and if needed write the store's metadata record `PREFIX:meta`.
pub(crate) async fn open_meta(client: &Client, c: &RedisConfig) -> Result<StoreMeta> {
    let key = format!("{}:meta", c.prefix);
    let one = |cmd: Cmd| async move {
        let mut v = client
            .run(&[cmd])
            .await
            .map_err(|e| client_err("metadata", e))?;
        match v.pop() {
            Some(Value::Error(e)) => Err(StoreError::backend(format!(
                "redis metadata command failed: {}",
                String::from_utf8_lossy(&e)
            ))),
            Some(v) => Ok(v),
            None => Err(StoreError::backend("redis: no reply to a metadata command")),
        }
    };
    let get = || one(Cmd::keyed(&[b"GET", key.as_bytes()], key.as_bytes()));
    let parse = |v: Value| match v {
        Value::Nil => Ok(None),
        Value::Bulk(b) => StoreMeta::parse(&b).map(Some),
        other => Err(StoreError::backend(format!(
            "redis: unexpected reply {other:?} to GET of the metadata"
        ))),
    };
    let found = parse(get().await?)?;
    let has_chunks = if found.is_none() && c.init == MetaInit::Auto {
        let cmds: Vec<Cmd> = (0..PROBE_CHUNKS)
            .map(|i| {
                let k = format!("{}:{i}", c.prefix);
                Cmd::keyed(&[b"EXISTS", k.as_bytes()], k.as_bytes())
            })
            .collect();
        let vals = client
            .run(&cmds)
            .await
            .map_err(|e| client_err("metadata", e))?;
        vals.iter().any(|v| matches!(v, Value::Int(n) if *n > 0))
    } else {
        false
    };
    let r = resolve(
        found,
        has_chunks,
        c.size,
        c.chunk,
        crate::DEFAULT_CHUNK,
        c.init,
    )?;
    if r.meta.chunk_size == 0 || r.meta.chunk_size > crate::MAX_CHUNK {
        return Err(StoreError::Config(format!(
            "chunk={} must be between 1 and {} bytes",
            r.meta.chunk_size,
            crate::MAX_CHUNK
        )));
    }
    if !r.write {
        return Ok(r.meta);
    }
    let text = r.meta.encode();
    let mut args: Vec<&[u8]> = vec![b"SET", key.as_bytes(), text.as_bytes()];
    if c.init != MetaInit::Force {
        // Two openers creating the same store at once: one record wins, the other verifies it.
        args.push(b"NX");
    }
    match one(Cmd::keyed(&args, key.as_bytes())).await? {
        Value::Nil => {
            let m = parse(get().await?)?
                .ok_or_else(|| StoreError::backend("redis: the metadata vanished while created"))?;
            m.check(c.size, c.chunk)?;
            Ok(m)
        }
        _ => {
            tracing::debug!(
                key,
                size = r.meta.size,
                chunk = r.meta.chunk_size,
                "wrote redis store metadata"
            );
            Ok(r.meta)
        }
    }
}

/// A store keeping chunk `i` in the Redis string `PREFIX:i`.
///
/// - Whole chunks are read with `GET` and written with `SET`; partial chunks use `GETRANGE` and
///   `SETRANGE`, which Redis applies atomically, so no read-modify-write happens on the client
///   and the store is byte-addressable (`block_size` 1).
/// - A missing key, or the missing tail of a short value, reads as zeros.
/// - `trim` and `write_zeroes` delete whole chunks (`DEL`) and zero partial ones (`SETRANGE`).
/// - All chunk commands of one request are sent at once: grouped by cluster node, pipelined in
///   batches over several connections per node.
/// - Keys carry no `{hash tag}`: chunks spread evenly over all masters of a cluster, and a range
///   still costs one round trip per node since its commands are pipelined per node.
pub struct RedisStore {
    client: Arc<Client>,
    prefix: String,
    chunk: u64,
    size: u64,
    id: Option<StoreId>,
    desc: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.desc)
            .field("chunk", &self.chunk)
            .field("size", &self.size)
            .finish()
    }
}

fn client_err(op: &str, e: ClientError) -> StoreError {
    StoreError::backend_with(format!("redis {op} failed"), e)
}

impl RedisStore {
    pub(crate) fn new(client: Arc<Client>, prefix: String, meta: StoreMeta, desc: String) -> Self {
        RedisStore {
            client,
            prefix,
            chunk: meta.chunk_size,
            size: meta.size,
            id: meta.id,
            desc,
        }
    }

    /// The identity recorded in `PREFIX:meta` when the store was created.
    pub fn id(&self) -> Option<StoreId> {
        self.id
    }

    /// The Redis key of chunk `index`.
    pub fn key(&self, index: u64) -> String {
        format!("{}:{}", self.prefix, index)
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The routing client (tests use its hooks).
    #[doc(hidden)]
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk).min(self.chunk)
    }

    async fn run(&self, op: &str, cmds: &[Cmd]) -> Result<Vec<Value>> {
        self.client.run(cmds).await.map_err(|e| client_err(op, e))
    }

    fn check_reply(&self, op: &str, index: u64, v: &Value) -> Result<()> {
        match v {
            Value::Error(_) => Err(StoreError::backend(format!(
                "redis {op} of key {} failed: {}",
                self.key(index),
                v.as_error().unwrap_or_default()
            ))),
            _ => Ok(()),
        }
    }

    async fn zero(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_write(&self.caps(), self.size, offset, len)?;
        let mut cmds = Vec::new();
        let mut idx = Vec::new();
        for p in chunk_pieces(offset, len, self.chunk) {
            let key = self.key(p.index);
            if p.within == 0 && p.len == self.chunk_len(p.index) {
                cmds.push(Cmd::keyed(&[b"DEL", key.as_bytes()], key.as_bytes()));
            } else {
                let zeros = vec![0u8; p.len as usize];
                cmds.push(Cmd::keyed(
                    &[
                        b"SETRANGE",
                        key.as_bytes(),
                        p.within.to_string().as_bytes(),
                        &zeros,
                    ],
                    key.as_bytes(),
                ));
            }
            idx.push(p.index);
        }
        let vals = self.run(op, &cmds).await?;
        for (i, v) in idx.into_iter().zip(&vals) {
            self.check_reply(op, i, v)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> Option<StoreId> {
        self.id
    }

    fn caps(&self) -> Caps {
        let mut c = Caps::basic();
        c.block_size = 1;
        c.preferred_io = self.chunk;
        c.max_io = self.chunk.saturating_mul(256).min(256 << 20);
        c.trim = true;
        c.fast_zero = true;
        c.extents = true;
        c.flush = false;
        c.multi_conn = true;
        c
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.size, 1, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let pieces: Vec<_> = chunk_pieces(offset, buf.len() as u64, self.chunk).collect();
        let cmds: Vec<Cmd> = pieces
            .iter()
            .map(|p| {
                let key = self.key(p.index);
                if p.within == 0 && p.len == self.chunk_len(p.index) {
                    Cmd::keyed(&[b"GET", key.as_bytes()], key.as_bytes())
                } else {
                    Cmd::keyed(
                        &[
                            b"GETRANGE",
                            key.as_bytes(),
                            p.within.to_string().as_bytes(),
                            (p.within + p.len - 1).to_string().as_bytes(),
                        ],
                        key.as_bytes(),
                    )
                }
            })
            .collect();
        let vals = self.run("read", &cmds).await?;
        for (p, v) in pieces.iter().zip(vals) {
            let dst = &mut buf[p.pos as usize..(p.pos + p.len) as usize];
            match v {
                Value::Nil => dst.fill(0),
                Value::Bulk(b) => {
                    let n = b.len().min(dst.len());
                    dst[..n].copy_from_slice(&b[..n]);
                    dst[n..].fill(0);
                }
                other => {
                    self.check_reply("read", p.index, &other)?;
                    return Err(StoreError::backend(format!(
                        "redis read of key {}: unexpected reply {other:?}",
                        self.key(p.index)
                    )));
                }
            }
        }
        Ok(())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        check_write(&self.caps(), self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut cmds = Vec::new();
        let mut idx = Vec::new();
        for p in chunk_pieces(offset, data.len() as u64, self.chunk) {
            let key = self.key(p.index);
            let part = &data[p.pos as usize..(p.pos + p.len) as usize];
            if p.within == 0 && p.len == self.chunk_len(p.index) {
                cmds.push(Cmd::keyed(&[b"SET", key.as_bytes(), part], key.as_bytes()));
            } else {
                cmds.push(Cmd::keyed(
                    &[
                        b"SETRANGE",
                        key.as_bytes(),
                        p.within.to_string().as_bytes(),
                        part,
                    ],
                    key.as_bytes(),
                ));
            }
            idx.push(p.index);
        }
        let vals = self.run("write", &cmds).await?;
        for (i, v) in idx.into_iter().zip(&vals) {
            self.check_reply("write", i, v)?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // Every write is applied by the server when its reply arrives; persistence is the
        // server's configuration (AOF/RDB), not something a client flush can force cheaply.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero("trim", offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero("write_zeroes", offset, len).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, 1, offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let pieces: Vec<_> = chunk_pieces(offset, len, self.chunk).collect();
        let cmds: Vec<Cmd> = pieces
            .iter()
            .map(|p| {
                let key = self.key(p.index);
                Cmd::keyed(&[b"EXISTS", key.as_bytes()], key.as_bytes())
            })
            .collect();
        let vals = self.run("extents", &cmds).await?;
        for (p, v) in pieces.iter().zip(vals) {
            let kind = match v {
                Value::Int(0) => ExtentKind::Hole,
                Value::Int(_) => ExtentKind::Data,
                other => {
                    self.check_reply("extents", p.index, &other)?;
                    ExtentKind::Data
                }
            };
            let off = offset + p.pos;
            match out.last_mut() {
                Some(last) if last.kind == kind && last.end() == off => last.len += p.len,
                _ => out.push(Extent {
                    offset: off,
                    len: p.len,
                    kind,
                }),
            }
        }
        Ok(out)
    }
}
