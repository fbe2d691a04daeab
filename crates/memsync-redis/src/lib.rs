//! memsync store over Redis: single node or Redis Cluster, plain TCP or TLS, with its own
//! pipelined RESP client (no `redis` crate: fewer dependencies, and full control over pipelining,
//! TCP_NODELAY and retries).
//!
//! URLs (see [`register`]):
//!
//! ```text
//! redis://HOST[:PORT][/DB]?size=1G[&chunk=64K&prefix=memsync&conns=4&pipeline=32&timeout=10s]
//! rediss://HOST[:PORT][/DB]?size=1G[&ca=PEM&cert=PEM&key=PEM&tls_name=NAME]    (TLS)
//! redis+cluster://HOST:PORT[,HOST:PORT...]?size=1G...     (Redis Cluster; or ?cluster=true)
//! rediss+cluster://...                                     (Redis Cluster over TLS)
//! ```
//!
//! Chunk `i` lives in the string key `PREFIX:i`; see [`RedisStore`] for the command mapping. The
//! key `PREFIX:meta` records the size, chunk size and identity ([`memsync_core::StoreMeta`]):
//! written when the store is created, checked on every open (`size=` may then be left out), and
//! rewritten only with `init=force` (`init=adopt` records it for chunks written without one).
//! `user=`/`password=` (or the environment variable `MEMSYNC_REDIS_PASSWORD`) authenticate.

pub mod client;
pub mod conn;
pub mod resp;
pub mod slot;
mod store;

use std::sync::Arc;
use std::time::Duration;

use memsync_core::{DynStore, MetaInit, Registry, Result, StoreError, StoreUrl};

pub use client::{Client, ClientOpts};
pub use conn::{ConnOpts, Tls};
pub use store::RedisStore;

/// Default chunk (value) size.
pub const DEFAULT_CHUNK: u64 = 64 << 10;
/// Largest chunk: Redis' default `proto-max-bulk-len` is 512 MiB.
pub const MAX_CHUNK: u64 = 512 << 20;
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "memsync";

const PARAMS: &[&str] = &[
    "size", "chunk", "prefix", "conns", "pipeline", "timeout", "user", "password", "cluster", "ca",
    "cert", "key", "tls_name", "init",
];

/// Register `redis`, `rediss`, `redis+cluster` and `rediss+cluster`.
pub fn register(reg: &mut Registry) {
    let help = "redis://HOST[:PORT][/DB]?size=1G[&chunk=64K&prefix=memsync&conns=4&timeout=10s]  \
                one Redis key per chunk (rediss:// for TLS; redis+cluster://H:P,H:P or \
                &cluster=true for Redis Cluster); PREFIX:meta records size and chunk \
                (init=auto|adopt|force)";
    reg.register(
        "redis",
        help,
        |u: StoreUrl| async move { open_dyn(u).await },
    );
    reg.register(
        "rediss",
        "rediss://...  Redis over TLS (params as redis://, plus ca=, cert=, key=, tls_name=)",
        |u: StoreUrl| async move { open_dyn(u).await },
    );
    reg.register(
        "redis+cluster",
        "redis+cluster://HOST:PORT[,HOST:PORT...]?size=1G...  Redis Cluster",
        |u: StoreUrl| async move { open_dyn(u).await },
    );
    reg.register(
        "rediss+cluster",
        "rediss+cluster://HOST:PORT[,...]?size=1G...  Redis Cluster over TLS",
        |u: StoreUrl| async move { open_dyn(u).await },
    );
}

async fn open_dyn(u: StoreUrl) -> Result<DynStore> {
    Ok(Arc::new(open(&u).await?))
}

/// Everything a Redis URL says, validated.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub seeds: Vec<String>,
    pub cluster: bool,
    pub tls: bool,
    pub db: u32,
    /// `None`: the recorded size.
    pub size: Option<u64>,
    /// `None`: the recorded chunk size, or [`DEFAULT_CHUNK`] for a new store.
    pub chunk: Option<u64>,
    pub prefix: String,
    pub init: MetaInit,
    pub conns: usize,
    pub pipeline: usize,
    pub timeout: Duration,
    pub user: Option<String>,
    pub password: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub tls_name: Option<String>,
}

impl RedisConfig {
    /// Parse and check a `redis*://` URL; errors name the bad part.
    pub fn from_url(u: &StoreUrl) -> Result<Self> {
        u.ensure_params(PARAMS)?;
        let (tls, mut cluster) = match u.scheme.as_str() {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+cluster" => (false, true),
            "rediss+cluster" => (true, true),
            s => return Err(u.error("scheme", format!("{s:?} is not a Redis scheme"))),
        };
        if let Some(c) = u.bool_param("cluster")? {
            cluster |= c;
        }
        let auth = u.authority.as_deref().unwrap_or("");
        if auth.is_empty() {
            return Err(u.error("host", "missing (e.g. redis://127.0.0.1:6379?size=1G)"));
        }
        let mut seeds = Vec::new();
        for h in auth.split(',') {
            let h = h.trim();
            if h.is_empty() {
                return Err(u.error("host", "empty entry in the host list"));
            }
            let addr = if h.starts_with('[') {
                if h.contains("]:") {
                    h.to_owned()
                } else {
                    format!("{h}:6379")
                }
            } else {
                match h.rsplit_once(':') {
                    Some((host, port)) => {
                        if host.is_empty() {
                            return Err(u.error("host", format!("{h:?} has no host name")));
                        }
                        if port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
                            return Err(u.error("port", format!("{port:?} is not a TCP port")));
                        }
                        h.to_owned()
                    }
                    None => format!("{h}:6379"),
                }
            };
            seeds.push(addr);
        }
        if seeds.len() > 1 && !cluster {
            return Err(u.error(
                "host",
                "several hosts need Redis Cluster (redis+cluster:// or cluster=true)",
            ));
        }
        let db = match u.path.trim_start_matches('/') {
            "" => 0,
            d => d
                .parse::<u32>()
                .map_err(|_| u.error("path", format!("{d:?} is not a database number")))?,
        };
        if cluster && db != 0 {
            return Err(u.error("path", "Redis Cluster has only database 0"));
        }
        let size = u.size_param("size")?;
        let chunk = u.size_param("chunk")?;
        if let Some(chunk) = chunk
            && (chunk == 0 || chunk > MAX_CHUNK)
        {
            return Err(u.error(
                "query parameter \"chunk\"",
                format!("{chunk} must be between 1 and {MAX_CHUNK} bytes"),
            ));
        }
        let prefix = u.param("prefix").unwrap_or(DEFAULT_PREFIX).to_owned();
        if prefix.is_empty() || prefix.len() > 256 {
            return Err(u.error("query parameter \"prefix\"", "must be 1 to 256 characters"));
        }
        let num = |k: &str, d: usize, max: usize| u.count_param(k, d, max);
        let conns = num("conns", 4, 256)?;
        let pipeline = num("pipeline", 32, 4096)?;
        let timeout = u
            .duration_param("timeout")?
            .unwrap_or(Duration::from_secs(10));
        let opt = |k: &str| u.param(k).map(str::to_owned);
        for k in ["ca", "cert", "key", "tls_name"] {
            if !tls && u.param(k).is_some() {
                return Err(u.error(
                    &format!("query parameter {k:?}"),
                    "only for TLS (rediss://)",
                ));
            }
        }
        if opt("cert").is_some() != opt("key").is_some() {
            return Err(u.error("query parameter \"cert\"", "cert= and key= go together"));
        }
        let password = opt("password").or_else(|| std::env::var("MEMSYNC_REDIS_PASSWORD").ok());
        Ok(RedisConfig {
            seeds,
            cluster,
            tls,
            db,
            size,
            chunk,
            prefix,
            init: MetaInit::from_url(u)?,
            conns,
            pipeline,
            timeout,
            user: opt("user"),
            password,
            ca: opt("ca"),
            cert: opt("cert"),
            key: opt("key"),
            tls_name: opt("tls_name"),
        })
    }
}

fn tls_config(u: &StoreUrl, c: &RedisConfig) -> Result<Tls> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let (ca_path, part) = match &c.ca {
        Some(p) => (p.clone(), "query parameter \"ca\""),
        None => (
            "/etc/ssl/certs/ca-certificates.crt".to_owned(),
            "system CA bundle",
        ),
    };
    let certs = CertificateDer::pem_file_iter(&ca_path)
        .map_err(|e| u.error(part, format!("cannot read {ca_path}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| u.error(part, format!("{ca_path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| u.error(part, format!("{ca_path}: {e}")))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::backend_with("TLS setup", e))?
        .with_root_certificates(roots);
    let config = match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<_, _>>())
                .map_err(|e| u.error("query parameter \"cert\"", format!("{cert}: {e}")))?;
            let pk = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| u.error("query parameter \"key\"", format!("{key}: {e}")))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| u.error("query parameter \"cert\"", e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Tls {
        config: Arc::new(config),
        server_name: c.tls_name.clone(),
    })
}

/// Open a Redis store from a parsed URL: connect (retrying until `timeout`), and for a cluster
/// load the slot map.
pub async fn open(u: &StoreUrl) -> Result<RedisStore> {
    let c = RedisConfig::from_url(u)?;
    let tls = if c.tls {
        Some(tls_config(u, &c)?)
    } else {
        None
    };
    let opts = ClientOpts {
        conn: ConnOpts {
            tls,
            user: c.user.clone(),
            password: c.password.clone(),
            db: c.db,
            connect_timeout: c.timeout.min(Duration::from_secs(5)),
        },
        conns: c.conns,
        pipeline: c.pipeline,
        deadline: c.timeout,
        cluster: c.cluster,
    };
    let client = Client::connect(c.seeds.clone(), opts)
        .await
        .map_err(|e| StoreError::backend_with(format!("cannot open {u}"), e))?;
    let client = Arc::new(client);
    let meta = store::open_meta(&client, &c)
        .await
        .map_err(|e| e.context(format!("redis store {u} (key {}:meta)", c.prefix)))?;
    Ok(RedisStore::new(client, c.prefix, meta, u.to_string()))
}

/// The host part of `host:port` (brackets of IPv6 literals removed).
pub(crate) fn conn_host(addr: &str) -> &str {
    let h = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    h.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Result<RedisConfig> {
        RedisConfig::from_url(&StoreUrl::parse(s)?)
    }

    #[test]
    fn urls() {
        let c = cfg("redis://127.0.0.1:7000/3?size=1G&chunk=1M&prefix=vm1").unwrap();
        assert_eq!(c.seeds, vec!["127.0.0.1:7000"]);
        assert_eq!((c.db, c.size, c.chunk), (3, Some(1 << 30), Some(1 << 20)));
        assert_eq!(c.prefix, "vm1");
        assert!(!c.cluster && !c.tls);
        let c = cfg("redis+cluster://a:1,b:2?size=1M").unwrap();
        assert!(c.cluster);
        assert_eq!(c.seeds, vec!["a:1", "b:2"]);
        let c = cfg("rediss://host?size=1M&cluster=true&timeout=500ms").unwrap();
        assert!(c.cluster && c.tls);
        assert_eq!(c.seeds, vec!["host:6379"]);
        assert_eq!(c.timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_urls_name_the_part() {
        for (url, part) in [
            ("redis://?size=1M", "host"),
            ("redis://h:0?size=1M", "port"),
            ("redis://h:99999?size=1M", "port"),
            ("redis://h/x?size=1M", "path"),
            ("redis://h?size=x", "size"),
            ("redis://h?init=maybe", "init"),
            ("redis://h?size=1M&chunk=0", "chunk"),
            ("redis://h?size=1M&chunck=1", "chunck"),
            ("redis://a:1,b:2?size=1M", "host"),
            ("redis+cluster://a:1/2?size=1M", "path"),
            ("redis://h?size=1M&conns=0", "conns"),
            ("redis://h?size=1M&timeout=5y", "timeout"),
            ("redis://h?size=1M&ca=/x", "ca"),
        ] {
            let e = cfg(url).unwrap_err().to_string();
            assert!(e.contains(part), "{url}: {e}");
        }
    }
}
