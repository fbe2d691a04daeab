//! memsync store over any S3-compatible object store, path-style, with a hand-written SigV4
//! signer ([`sigv4`]) and a small keep-alive HTTP/1.1 client ([`http`]; TCP_NODELAY, request
//! head and body in one vectored write, bodies read straight into the caller's buffer).
//!
//! ```text
//! s3://BUCKET[/PREFIX]?size=1G[&endpoint=http://127.0.0.1:9000&region=us-east-1&chunk=1M
//!                      &conns=32&timeout=30s&create]          one object per chunk
//! s3://BUCKET?object=KEY[&endpoint=...&chunk=8M]               one existing object, read-only
//! ```
//!
//! A chunked store keeps its size, chunk size and identity ([`memsync_core::StoreMeta`]) in the
//! object `PREFIX/.memsync-meta`: written when the store is created, checked on every open
//! (`size=` may then be left out), rewritten only with `init=force` (`init=adopt` records it for
//! chunks written without one).
//!
//! Credentials: `access_key=`/`secret_key=`/`session_token=` in the URL, else the environment
//! variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; with neither,
//! requests are sent unsigned (anonymous). Region: `region=`, else `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, else `us-east-1`. Endpoint: `endpoint=`, else
//! `https://s3.REGION.amazonaws.com`. Bodies are sent with `x-amz-content-sha256:
//! UNSIGNED-PAYLOAD` (the headers are signed, the payload is not hashed).

pub mod client;
pub mod http;
pub mod sigv4;
mod store;

use std::sync::Arc;
use std::time::Duration;

use memsync_core::layers::Chunked;
use memsync_core::meta::{MAX_META_LEN, resolve};
use memsync_core::{DynStore, MetaInit, Registry, Result, StoreError, StoreMeta, StoreUrl};

pub use client::S3Client;
pub use sigv4::Credentials;
pub use store::{S3ChunkStore, S3ObjectStore};

/// Default object (chunk) size: per-request latency dominates small objects.
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// Default ranged-GET size in single-object mode.
pub const DEFAULT_PIECE: u64 = 8 << 20;
/// Default number of connections (= requests in flight).
pub const DEFAULT_CONNS: usize = 32;

const PARAMS: &[&str] = &[
    "size",
    "chunk",
    "endpoint",
    "region",
    "conns",
    "timeout",
    "create",
    "object",
    "access_key",
    "secret_key",
    "session_token",
    "init",
];

/// Register the `s3` scheme.
pub fn register(reg: &mut Registry) {
    reg.register(
        "s3",
        "s3://BUCKET[/PREFIX]?size=1G[&endpoint=http://HOST:PORT&region=&chunk=1M&conns=32&create]  \
         one S3 object per chunk, PREFIX/.memsync-meta records size and chunk \
         (init=auto|adopt|force); s3://BUCKET?object=KEY maps one existing object read-only",
        |u: StoreUrl| async move { open(&u).await },
    );
}

/// Everything an `s3://` URL says, validated.
#[derive(Clone, Debug)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: http::Endpoint,
    pub region: String,
    pub size: Option<u64>,
    pub chunk: u64,
    pub conns: usize,
    pub timeout: Duration,
    pub create: bool,
    pub init: MetaInit,
    pub object: Option<String>,
    pub creds: Option<Credentials>,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

impl S3Config {
    /// Parse and check an `s3://` URL; errors name the bad part.
    pub fn from_url(u: &StoreUrl) -> Result<Self> {
        u.ensure_params(PARAMS)?;
        let bucket = u.authority.clone().unwrap_or_default();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(u.error(
                "bucket",
                format!("{bucket:?} is not a valid bucket name (3-63 of a-z 0-9 . -; e.g. s3://my-bucket/prefix)"),
            ));
        }
        let prefix = u.path.trim_matches('/').to_owned();
        let region = u
            .param("region")
            .map(str::to_owned)
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(u.error(
                "query parameter \"region\"",
                format!("{region:?} is not a region"),
            ));
        }
        let endpoint = match u.param("endpoint") {
            Some(e) => http::Endpoint::parse(e)
                .map_err(|why| u.error("query parameter \"endpoint\"", why))?,
            None => http::Endpoint::parse(&format!("https://s3.{region}.amazonaws.com"))
                .map_err(|why| u.error("query parameter \"region\"", why))?,
        };
        let object = u.param("object").map(str::to_owned);
        let size = u.size_param("size")?;
        match (&object, size) {
            (Some(o), _) if o.is_empty() => {
                return Err(u.error("query parameter \"object\"", "empty object key"));
            }
            (Some(_), Some(_)) => {
                return Err(u.error(
                    "query parameter \"size\"",
                    "not allowed with object= (the size comes from the object)",
                ));
            }
            (Some(_), None) if !prefix.is_empty() => {
                return Err(u.error("path", "give the whole key in object=, not in the path"));
            }
            _ => {}
        }
        let chunk = u.size_param("chunk")?.unwrap_or(if object.is_some() {
            DEFAULT_PIECE
        } else {
            DEFAULT_CHUNK
        });
        if chunk == 0 || chunk > 1 << 30 {
            return Err(u.error(
                "query parameter \"chunk\"",
                format!("{chunk} must be between 1 byte and 1 GiB"),
            ));
        }
        let conns = u.count_param("conns", DEFAULT_CONNS, 1024)?;
        let timeout = u
            .duration_param("timeout")?
            .unwrap_or(Duration::from_secs(30));
        let create = u.bool_param("create")?.unwrap_or(false);
        if create && object.is_some() {
            return Err(u.error(
                "query parameter \"create\"",
                "not allowed with object= (read-only)",
            ));
        }
        let access = u
            .param("access_key")
            .map(str::to_owned)
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = u
            .param("secret_key")
            .map(str::to_owned)
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let token = u
            .param("session_token")
            .map(str::to_owned)
            .or_else(|| env("AWS_SESSION_TOKEN"));
        let creds = match (access, secret) {
            (Some(a), Some(s)) => Some(Credentials {
                access_key: a,
                secret_key: s,
                session_token: token,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(u.error(
                    "credentials",
                    "an access key without a secret key (secret_key= or AWS_SECRET_ACCESS_KEY)",
                ));
            }
            (None, Some(_)) => {
                return Err(u.error(
                    "credentials",
                    "a secret key without an access key (access_key= or AWS_ACCESS_KEY_ID)",
                ));
            }
        };
        Ok(S3Config {
            bucket,
            prefix,
            endpoint,
            region,
            size,
            chunk,
            conns,
            timeout,
            create,
            init: MetaInit::from_url(u)?,
            object,
            creds,
        })
    }

    /// A client for this configuration.
    pub fn client(&self) -> Result<S3Client> {
        let tls = if self.endpoint.https {
            Some(tls_config()?)
        } else {
            None
        };
        let pool = http::Pool::new(self.endpoint.clone(), tls, self.conns, self.timeout);
        Ok(S3Client::new(
            pool,
            self.bucket.clone(),
            self.region.clone(),
            self.creds.clone(),
            self.timeout,
        ))
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = "/etc/ssl/certs/ca-certificates.crt";
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| StoreError::Config(format!("https endpoint: cannot read {path}: {e}")))?;
    for c in certs.flatten() {
        let _ = roots.add(c);
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::backend_with("TLS setup", e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Open an `s3://` URL: chunked mode gives `Chunked<S3ChunkStore>` (any byte range, up to
/// `conns` chunk requests in flight per call), `object=` gives a read-only [`S3ObjectStore`].
pub async fn open(u: &StoreUrl) -> Result<DynStore> {
    let c = S3Config::from_url(u)?;
    let client = Arc::new(c.client()?);
    if let Some(key) = &c.object {
        let size = client
            .head(key)
            .await
            .map_err(|e| e.context(format!("cannot open {u}")))?
            .ok_or_else(|| {
                u.error(
                    "query parameter \"object\"",
                    format!("object {key:?} does not exist in bucket {:?}", c.bucket),
                )
            })?;
        return Ok(Arc::new(S3ObjectStore::new(
            client,
            key.clone(),
            size,
            c.chunk,
        )));
    }
    if c.create {
        client
            .create_bucket()
            .await
            .map_err(|e| e.context(format!("cannot open {u}")))?;
    }
    let meta_key = meta_key(&c.prefix);
    let meta = open_meta(&client, &c, u.size_param("chunk")?)
        .await
        .map_err(|e| e.context(format!("s3 store {u} (object {meta_key})")))?;
    let inner = S3ChunkStore::new(client, c.prefix.clone(), meta.chunk_size, meta.size)
        .with_identity(meta.id);
    let store = Chunked::new(inner, c.chunk)
        .map_err(|e| u.error("query parameter \"chunk\"", e))?
        .with_max_concurrency(c.conns);
    Ok(Arc::new(store))
}

/// The object holding a chunked store's metadata record: `PREFIX/.memsync-meta`.
pub fn meta_key(prefix: &str) -> String {
    if prefix.is_empty() {
        ".memsync-meta".into()
    } else {
        format!("{prefix}/.memsync-meta")
    }
}

/// How many of the first chunk objects are probed for data written without a metadata record.
const PROBE_CHUNKS: u64 = 4;

/// Read, check, and if needed write the metadata record of a chunked store. S3 has no
/// create-if-absent here, so two openers creating one store at the same moment could both write
/// a record; the last one stays, and both have the same size and chunk unless their URLs
/// differ.
async fn open_meta(client: &S3Client, c: &S3Config, chunk: Option<u64>) -> Result<StoreMeta> {
    let key = meta_key(&c.prefix);
    // A ranged read of one byte over the limit: a longer record is refused by the parser (a
    // whole-object read into a short buffer would fail as a transport error and be retried).
    let mut buf = vec![0u8; MAX_META_LEN + 1];
    let range = Some((0, buf.len() as u64));
    let found = match client.get_into(&key, range, &mut buf).await? {
        Some(n) => Some(StoreMeta::parse(&buf[..n])?),
        None => None,
    };
    let has_chunks = if found.is_none() && c.init == MetaInit::Auto {
        let chunk_key = |i: u64| {
            if c.prefix.is_empty() {
                i.to_string()
            } else {
                format!("{}/{i}", c.prefix)
            }
        };
        let heads = (0..PROBE_CHUNKS).map(|i| {
            let k = chunk_key(i);
            async move { client.head(&k).await }
        });
        futures_util::future::try_join_all(heads)
            .await?
            .iter()
            .any(Option::is_some)
    } else {
        false
    };
    let r = resolve(found, has_chunks, c.size, chunk, DEFAULT_CHUNK, c.init)?;
    if r.meta.chunk_size == 0 || r.meta.chunk_size > 1 << 30 {
        return Err(StoreError::Config(format!(
            "chunk={} must be between 1 byte and 1 GiB",
            r.meta.chunk_size
        )));
    }
    if r.write {
        client
            .put(&key, bytes::Bytes::from(r.meta.encode()))
            .await?;
        tracing::debug!(
            key,
            size = r.meta.size,
            chunk = r.meta.chunk_size,
            "wrote S3 store metadata"
        );
    }
    Ok(r.meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Result<S3Config> {
        S3Config::from_url(&StoreUrl::parse(s)?)
    }

    #[test]
    fn urls() {
        let c = cfg("s3://bkt/some/prefix/?size=1G&endpoint=http://127.0.0.1:9000&access_key=a&secret_key=b").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("bkt", "some/prefix")
        );
        assert_eq!(c.endpoint.port, 9000);
        assert_eq!(c.chunk, DEFAULT_CHUNK);
        assert!(c.creds.is_some());
        let c = cfg("s3://bkt?object=disk.img&endpoint=http://h:1&region=eu-west-1").unwrap();
        assert_eq!(c.object.as_deref(), Some("disk.img"));
        assert_eq!(c.region, "eu-west-1");
    }

    #[test]
    fn bad_urls_name_the_part() {
        for (url, part) in [
            ("s3://B?size=1M", "bucket"),
            ("s3://?size=1M", "bucket"),
            ("s3://bkt?size=1M&init=yes", "init"),
            ("s3://bkt?size=1M&endpoint=ftp://x", "endpoint"),
            ("s3://bkt?size=1M&endpoint=http://x:0", "endpoint"),
            ("s3://bkt?size=1M&chunk=0", "chunk"),
            ("s3://bkt?size=1M&conns=0", "conns"),
            ("s3://bkt?size=1M&timeout=x", "timeout"),
            ("s3://bkt?object=a&size=1M", "size"),
            ("s3://bkt/p?object=a", "path"),
            ("s3://bkt?size=1M&access_key=a", "credentials"),
            ("s3://bkt?size=1M&bogus=1", "bogus"),
        ] {
            let e = cfg(url).unwrap_err().to_string();
            assert!(e.contains(part), "{url}: {e}");
        }
    }
}
