//! S3 object operations (GET/ranged GET into a buffer, PUT, DELETE, HEAD, create bucket),
//! path-style, signed with SigV4, retried with backoff until a deadline.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use memsync_core::{Result, StoreError};

use crate::http::{HttpError, Pool, Req, Response, Sink};
use crate::sigv4::{self, Credentials, UNSIGNED_PAYLOAD};

/// A path-style S3 client for one bucket.
pub struct S3Client {
    pool: Pool,
    bucket: String,
    region: String,
    creds: Option<Credentials>,
    deadline: Duration,
}

impl fmt::Debug for S3Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Client")
            .field("endpoint", self.pool.endpoint())
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .finish()
    }
}

/// An S3 error reply, with the parts of its XML body that say why.
#[derive(Debug)]
pub struct S3Error {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for S3Error {}

/// The text of the first `<tag>...</tag>` in `xml` (no entity decoding beyond the basic five).
pub fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let a = xml.find(&open)? + open.len();
    let b = a + xml.get(a..)?.find(&close)?;
    let raw = xml.get(a..b)?;
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn s3_error(resp: &Response) -> S3Error {
    let body = String::from_utf8_lossy(&resp.body);
    S3Error {
        status: resp.status,
        code: xml_field(&body, "Code").unwrap_or_else(|| "(no error code)".into()),
        message: xml_field(&body, "Message")
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect(),
    }
}

/// Outcome of one attempt.
enum Attempt<T> {
    Done(T),
    Retry(String),
}

impl S3Client {
    pub fn new(
        pool: Pool,
        bucket: String,
        region: String,
        creds: Option<Credentials>,
        deadline: Duration,
    ) -> S3Client {
        S3Client {
            pool,
            bucket,
            region,
            creds,
            deadline,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn path(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!(
                "/{}/{}",
                sigv4::uri_encode(&self.bucket, false),
                sigv4::uri_encode(k, true)
            ),
            None => format!("/{}", sigv4::uri_encode(&self.bucket, false)),
        }
    }

    fn headers(&self, method: &str, path: &str, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let date = sigv4::amz_date(now);
        let mut h: Vec<(String, String)> = vec![
            ("x-amz-date".into(), date.clone()),
            ("x-amz-content-sha256".into(), UNSIGNED_PAYLOAD.into()),
        ];
        for (k, v) in extra {
            h.push(((*k).to_owned(), v.clone()));
        }
        if let Some(c) = &self.creds {
            if let Some(t) = &c.session_token {
                h.push(("x-amz-security-token".into(), t.clone()));
            }
            let host = self.pool.endpoint().host_header();
            let mut to_sign: Vec<(&str, &str)> = vec![("host", host.as_str())];
            to_sign.extend(h.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let r = sigv4::Request {
                method,
                path,
                query: &[],
                headers: &to_sign,
                payload_hash: UNSIGNED_PAYLOAD,
            };
            let (_, auth) = sigv4::sign(&r, c, &date, &self.region, "s3");
            h.push(("authorization".into(), auth));
        }
        h
    }

    /// Run `attempt` until it is done, retrying transport errors and 5xx replies with backoff
    /// until the deadline.
    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Attempt<T>>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            match attempt().await? {
                Attempt::Done(t) => return Ok(t),
                Attempt::Retry(why) => self.wait(what, start, &mut backoff, why).await?,
            }
        }
    }

    /// Send a request whose reply body is collected, retrying transport errors and 5xx replies
    /// until the deadline; `done` turns every other reply into the result or an error.
    async fn request<T>(
        &self,
        method: &'static str,
        path: &str,
        body: Bytes,
        what: &str,
        done: impl Fn(Response) -> Result<T>,
    ) -> Result<T> {
        self.retry(what, || async {
            let headers = self.headers(method, path, &[]);
            let req = Req {
                method,
                target: path,
                headers: &headers,
                body: body.clone(),
            };
            match self.pool.send(&req, Sink::Collect).await {
                Err(e) => Ok(Attempt::Retry(e.0)),
                Ok(resp) if resp.status >= 500 => Ok(Attempt::Retry(s3_error(&resp).to_string())),
                Ok(resp) => done(resp).map(Attempt::Done),
            }
        })
        .await
    }

    /// GET `key` (optionally a byte range `start..end`) into `buf`. Returns the number of bytes
    /// written, or `None` if the object does not exist.
    pub async fn get_into(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        buf: &mut [u8],
    ) -> Result<Option<usize>> {
        let path = self.path(Some(key));
        let what = format!("GET {key}");
        let mut extra = Vec::new();
        if let Some((a, b)) = range {
            extra.push(("range", format!("bytes={a}-{}", b.saturating_sub(1))));
        }
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            let headers = self.headers("GET", &path, &extra);
            let req = Req {
                method: "GET",
                target: &path,
                headers: &headers,
                body: Bytes::new(),
            };
            let why = match self.pool.send(&req, Sink::Into(&mut *buf)).await {
                Err(e) => e.0,
                Ok(resp) if resp.status >= 500 => s3_error(&resp).to_string(),
                Ok(resp) => {
                    return match resp.status {
                        200 | 206 => Ok(Some(resp.written)),
                        404 => Ok(None),
                        416 => Ok(Some(0)),
                        _ => Err(StoreError::backend_with(
                            format!("S3 GET of {key} failed"),
                            s3_error(&resp),
                        )),
                    };
                }
            };
            self.wait(&what, start, &mut backoff, why).await?;
        }
    }

    async fn wait(
        &self,
        what: &str,
        start: Instant,
        backoff: &mut Duration,
        why: String,
    ) -> Result<()> {
        if start.elapsed() + *backoff > self.deadline {
            return Err(StoreError::backend_with(
                format!(
                    "S3 {what} at {}: gave up after {:.1} s of retries (deadline)",
                    self.pool.endpoint().host_header(),
                    start.elapsed().as_secs_f64()
                ),
                HttpError(why),
            ));
        }
        tracing::debug!("S3 {what}: {why}; retrying");
        self.pool.clear();
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }

    /// PUT `key` with `body`.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let path = self.path(Some(key));
        self.request("PUT", &path, body, &format!("PUT {key}"), |resp| {
            if (200..300).contains(&resp.status) {
                Ok(())
            } else {
                Err(StoreError::backend_with(
                    format!("S3 PUT of {key} failed"),
                    s3_error(&resp),
                ))
            }
        })
        .await
    }

    /// DELETE `key` (a missing key is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(Some(key));
        self.request(
            "DELETE",
            &path,
            Bytes::new(),
            &format!("DELETE {key}"),
            |resp| {
                if (200..300).contains(&resp.status) || resp.status == 404 {
                    Ok(())
                } else {
                    Err(StoreError::backend_with(
                        format!("S3 DELETE of {key} failed"),
                        s3_error(&resp),
                    ))
                }
            },
        )
        .await
    }

    /// HEAD `key`: its size, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(Some(key));
        self.request(
            "HEAD",
            &path,
            Bytes::new(),
            &format!("HEAD {key}"),
            |resp| match resp.status {
                200 => resp
                    .header("content-length")
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Some)
                    .ok_or_else(|| {
                        StoreError::backend(format!("S3 HEAD of {key}: no valid Content-Length"))
                    }),
                404 => Ok(None),
                s => Err(StoreError::backend(format!(
                    "S3 HEAD of {key} failed: HTTP {s}"
                ))),
            },
        )
        .await
    }

    /// Create the bucket; an existing bucket owned by us is fine.
    pub async fn create_bucket(&self) -> Result<()> {
        let path = self.path(None);
        self.request("PUT", &path, Bytes::new(), "CreateBucket", |resp| {
            if (200..300).contains(&resp.status) {
                return Ok(());
            }
            let e = s3_error(&resp);
            if matches!(
                e.code.as_str(),
                "BucketAlreadyOwnedByYou" | "BucketAlreadyExists"
            ) {
                Ok(())
            } else {
                Err(StoreError::backend_with(
                    format!("S3 CreateBucket {} failed", self.bucket),
                    e,
                ))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn xml() {
        let x = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>a &amp; b</Message></Error>";
        assert_eq!(xml_field(x, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(xml_field(x, "Message").as_deref(), Some("a & b"));
        assert_eq!(xml_field(x, "Nope"), None);
        assert_eq!(xml_field("<Code>unterminated", "Code"), None);
    }

    proptest! {
        #[test]
        fn xml_never_panics(s in "\\PC{0,80}", t in "[A-Za-z]{1,6}") {
            let _ = xml_field(&s, &t);
            let _ = xml_field(&format!("<{t}>{s}"), &t);
        }
    }
}
