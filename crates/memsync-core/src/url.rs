//! Store URLs, parsed in one place, and the registry that opens them.
//!
//! Grammar: `SCHEME:[//AUTHORITY]PATH[?KEY=VALUE&...]`. Examples: `mem:1G`, `file:/tmp/disk.img`,
//! `file:///tmp/disk.img?size=1G`, `dir:/var/cache/x?size=1G&chunk=64K`,
//! `nbd://127.0.0.1:10809/export`. `%XX` escapes are decoded in the path and in query values.
//! Errors name the part of the URL that is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::error::{Result, StoreError};
use crate::size::parse_size;
use crate::store::DynStore;

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 4096;
/// Most query parameters accepted.
pub const MAX_PARAMS: usize = 32;

/// A parsed store URL.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    original: String,
    /// Lower-case scheme, e.g. `file`.
    pub scheme: String,
    /// `host[:port]` after `//`, if the URL has one (may be empty, as in `file:///x`).
    pub authority: Option<String>,
    /// The decoded path (or opaque part, such as `1G` in `mem:1G`).
    pub path: String,
    /// Decoded query parameters in order.
    pub params: Vec<(String, String)>,
}

/// Shown in place of a secret.
pub const REDACTED: &str = "***";

// Both print the URL with its secrets redacted (see [`redact`]): a URL ends up in logs, error
// messages and metrics labels.
impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({:?})", redact(&self.original))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.original))
    }
}

/// Whether a query parameter named `name` carries a secret (`password=`, `secret_key=`,
/// `session_token=`, `key=`, ...). Errs on the side of hiding.
pub fn is_secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "pass",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// `user:password@host` with the password replaced (and a lone `user@` kept).
fn redact_authority(a: &str) -> String {
    match a.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => a.to_owned(),
        },
        None => a.to_owned(),
    }
}

/// A URL with the password of its userinfo (`scheme://user:PASSWORD@host`) replaced, and the
/// values of secret query parameters ([`is_secret_param`]) replaced, also in a URL nested in a
/// parameter (`endpoint=http://user:pw@host`). Works on any string, parseable or not, and
/// never panics (every cut is at an ASCII delimiter). Use it wherever a URL is shown or logged.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match head.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            out.push_str(scheme);
            out.push_str("://");
            out.push_str(&redact_authority(auth));
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(q) = query {
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, v)) => {
                    let name = percent_decode_lossy(k);
                    out.push_str(k);
                    out.push('=');
                    if is_secret_param(&name) {
                        out.push_str(REDACTED);
                    } else if v.contains("://") {
                        out.push_str(&redact(v));
                    } else if percent_decode_lossy(v).contains("://") {
                        // An escaped nested URL: shown decoded, so that its password can go.
                        out.push_str(&redact(&percent_decode_lossy(v)));
                    } else {
                        out.push_str(v);
                    }
                }
                None => out.push_str(pair),
            }
        }
    }
    out
}

fn percent_decode_lossy(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn prefix_of(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

fn url_err(url: &str, part: &str, why: impl fmt::Display) -> StoreError {
    StoreError::Config(format!("bad store URL {:?}: {part}: {why}", redact(url)))
}

fn percent_decode(url: &str, part: &str, s: &str) -> Result<String> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or_else(|| url_err(url, part, "truncated %-escape"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| url_err(url, part, "bad %-escape"))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| url_err(url, part, "bad %-escape"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| url_err(url, part, "escape decodes to invalid UTF-8"))
}

impl StoreUrl {
    /// Parse a store URL. Never panics; errors name the bad part.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() > MAX_URL_LEN {
            return Err(url_err(
                &format!("{}...", prefix_of(s, 64)),
                "length",
                format!("longer than {MAX_URL_LEN} bytes"),
            ));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(url_err(
                s,
                "characters",
                "control characters are not allowed",
            ));
        }
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| url_err(s, "scheme", "missing (e.g. file:, mem:)"))?;
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(url_err(
                s,
                "scheme",
                format!("{scheme:?} is not a valid scheme"),
            ));
        }
        if rest.contains('#') {
            return Err(url_err(s, "fragment", "'#' fragments are not allowed"));
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = if let Some(after) = hier.strip_prefix("//") {
            match after.find('/') {
                Some(i) => (Some(after[..i].to_owned()), &after[i..]),
                None => (Some(after.to_owned()), ""),
            }
        } else {
            (None, hier)
        };
        if let Some(a) = &authority
            && a.contains(|c: char| c.is_whitespace() || c == '@')
        {
            return Err(url_err(
                s,
                "host",
                format!(
                    "{:?} is not a valid host[:port] (put credentials in parameters)",
                    redact_authority(a)
                ),
            ));
        }
        let path = percent_decode(s, "path", path)?;
        let mut params = Vec::new();
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                if params.len() == MAX_PARAMS {
                    return Err(url_err(
                        s,
                        "query",
                        format!("more than {MAX_PARAMS} parameters"),
                    ));
                }
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k.is_empty() {
                    return Err(url_err(
                        s,
                        "query",
                        format!("parameter {pair:?} has no name"),
                    ));
                }
                let k = percent_decode(s, "query", k)?;
                let v = percent_decode(s, &format!("query parameter {k:?}"), v)?;
                params.push((k, v));
            }
        }
        Ok(StoreUrl {
            original: s.to_owned(),
            scheme: scheme.to_ascii_lowercase(),
            authority,
            path,
            params,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The last value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter parsed as a size (`64K`, `1G`).
    pub fn size_param(&self, key: &str) -> Result<Option<u64>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => parse_size(v)
                .map(Some)
                .map_err(|e| self.error(&format!("query parameter {key:?}"), e)),
        }
    }

    /// A query parameter parsed as a duration (`10s`, `500ms`; a plain number is seconds).
    pub fn duration_param(&self, key: &str) -> Result<Option<std::time::Duration>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => crate::size::parse_duration(v)
                .map(Some)
                .map_err(|e| self.error(&format!("query parameter {key:?}"), e)),
        }
    }

    /// A query parameter parsed as a count from 1 to `max`; `default` when absent.
    pub fn count_param(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        match self.param(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    self.error(
                        &format!("query parameter {key:?}"),
                        format!("{v:?} must be a number from 1 to {max}"),
                    )
                }),
        }
    }

    /// A query parameter parsed as a boolean (`true/false/1/0/yes/no`, empty = true).
    pub fn bool_param(&self, key: &str) -> Result<Option<bool>> {
        match self.param(key) {
            None => Ok(None),
            Some("" | "1" | "true" | "yes" | "on") => Ok(Some(true)),
            Some("0" | "false" | "no" | "off") => Ok(Some(false)),
            Some(v) => Err(self.error(
                &format!("query parameter {key:?}"),
                format!("{v:?} is not a boolean"),
            )),
        }
    }

    /// Fail if the URL has a query parameter not in `known` (catches typos like `chunck=`).
    pub fn ensure_params(&self, known: &[&str]) -> Result<()> {
        for (k, _) in &self.params {
            if !known.contains(&k.as_str()) {
                let hint = if known.is_empty() {
                    "this store takes no parameters".to_owned()
                } else {
                    format!("known parameters: {}", known.join(", "))
                };
                return Err(self.error(
                    &format!("query parameter {k:?}"),
                    format!("unknown; {hint}"),
                ));
            }
        }
        Ok(())
    }

    /// An error about `part` of this URL.
    pub fn error(&self, part: &str, why: impl fmt::Display) -> StoreError {
        url_err(&self.original, part, why)
    }
}

type Opener = Arc<dyn Fn(StoreUrl) -> BoxFuture<'static, Result<DynStore>> + Send + Sync>;

struct Scheme {
    help: &'static str,
    open: Opener,
}

/// Maps URL schemes to functions that open stores. Each store crate registers its schemes;
/// the `memsync` binary builds one registry with everything compiled in.
#[derive(Default, Clone)]
pub struct Registry {
    schemes: BTreeMap<String, Arc<Scheme>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.schemes.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `scheme` (without the colon) with a one-line usage text and an opener.
    pub fn register<F, Fut>(&mut self, scheme: &str, help: &'static str, open: F)
    where
        F: Fn(StoreUrl) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<DynStore>> + Send + 'static,
    {
        let open: Opener = Arc::new(move |u| Box::pin(open(u)));
        self.schemes
            .insert(scheme.to_ascii_lowercase(), Arc::new(Scheme { help, open }));
    }

    /// Registered schemes with their usage text, sorted by scheme.
    pub fn schemes(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.schemes.iter().map(|(k, v)| (k.as_str(), v.help))
    }

    /// Parse `url` and open the store it names.
    pub async fn open(&self, url: &str) -> Result<DynStore> {
        let parsed = StoreUrl::parse(url)?;
        let scheme = self.schemes.get(&parsed.scheme).ok_or_else(|| {
            let known: Vec<_> = self.schemes.keys().map(|k| format!("{k}:")).collect();
            parsed.error(
                "scheme",
                format!(
                    "{:?} is not supported (supported: {})",
                    parsed.scheme,
                    known.join(" ")
                ),
            )
        })?;
        (scheme.open)(parsed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        let u = StoreUrl::parse("mem:1G").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.authority.as_deref(), u.path.as_str()),
            ("mem", None, "1G")
        );
        let u = StoreUrl::parse("file:///tmp/a%20b.img?size=1G&create").unwrap();
        assert_eq!(u.authority.as_deref(), Some(""));
        assert_eq!(u.path, "/tmp/a b.img");
        assert_eq!(u.size_param("size").unwrap(), Some(1 << 30));
        assert_eq!(u.bool_param("create").unwrap(), Some(true));
        let u = StoreUrl::parse("NBD://127.0.0.1:10809/exp").unwrap();
        assert_eq!(u.scheme, "nbd");
        assert_eq!(u.authority.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(u.path, "/exp");
        let u = StoreUrl::parse("dir:rel/path?chunk=64K").unwrap();
        assert_eq!(u.path, "rel/path");
    }

    #[test]
    fn errors_name_the_part() {
        let e = StoreUrl::parse("/tmp/x").unwrap_err().to_string();
        assert!(e.contains("scheme"), "{e}");
        let e = StoreUrl::parse("file:/x?size=12Q")
            .unwrap()
            .size_param("size")
            .unwrap_err();
        assert!(e.to_string().contains("\"size\""), "{e}");
        let e = StoreUrl::parse("file:/x%zz").unwrap_err().to_string();
        assert!(e.contains("path"), "{e}");
        let u = StoreUrl::parse("redis://h?conns=0&pipeline=7").unwrap();
        let e = u.count_param("conns", 4, 256).unwrap_err().to_string();
        assert!(e.contains("\"conns\"") && e.contains("1 to 256"), "{e}");
        assert_eq!(u.count_param("pipeline", 32, 4096).unwrap(), 7);
        assert_eq!(u.count_param("absent", 32, 4096).unwrap(), 32);
        let big = StoreUrl::parse("x:y?n=99999999999999999999999").unwrap();
        assert!(big.count_param("n", 1, 9).is_err());
        let e = StoreUrl::parse("dir:/x?chunck=4K")
            .unwrap()
            .ensure_params(&["chunk"])
            .unwrap_err();
        assert!(e.to_string().contains("chunck"), "{e}");
        assert!(StoreUrl::parse("1ab:x").is_err());
        assert!(StoreUrl::parse("file:/x#frag").is_err());
        assert!(StoreUrl::parse(&"a:".repeat(3000)).is_err());
    }

    #[test]
    fn overlong_url_cut_inside_a_character_is_an_error() {
        // The error quotes the first 64 bytes; here byte 64 falls inside 'é'.
        for pad in [62, 63, 64] {
            let s = format!("dir:{}é{}", "a".repeat(pad - 4), "b".repeat(MAX_URL_LEN));
            let e = StoreUrl::parse(&s).unwrap_err().to_string();
            assert!(e.contains("length") && e.len() < 300, "{e}");
        }
        let s = format!("x:{}", "€".repeat(MAX_URL_LEN));
        assert!(StoreUrl::parse(&s).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        for (url, want) in [
            (
                "redis://h:6379?size=1M&password=hunter2&prefix=p",
                "redis://h:6379?size=1M&password=***&prefix=p",
            ),
            (
                "s3://b/p?size=1M&access_key=AK&secret_key=S%2Fx&session_token=T",
                "s3://b/p?size=1M&access_key=***&secret_key=***&session_token=***",
            ),
            ("redis://u:pw@h:1/0?x=1", "redis://u:***@h:1/0?x=1"),
            ("redis://u@h", "redis://u@h"),
            (
                "s3://b?endpoint=http://u:pw@h:9000&size=1M",
                "s3://b?endpoint=http://u:***@h:9000&size=1M",
            ),
            (
                "s3://b?endpoint=http%3A%2F%2Fu%3Apw%40h&size=1M",
                "s3://b?endpoint=http://u:***@h&size=1M",
            ),
            (
                "rediss://h?key=/k.pem&PassWord=x",
                "rediss://h?key=***&PassWord=***",
            ),
            ("mem:1G", "mem:1G"),
            ("dir:/x?size=1G&chunk=64K", "dir:/x?size=1G&chunk=64K"),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
        let u = StoreUrl::parse("redis://h?size=1M&password=hunter2").unwrap();
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        assert_eq!(u.param("password"), Some("hunter2"));
        // Errors about a URL quote it redacted.
        let e = StoreUrl::parse("redis://u:hunter2@h?password=hunter2&x=%zz").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = u.error("size", "bad").to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let long = format!("redis://h?password=hunter2&p={}", "x".repeat(MAX_URL_LEN));
        let e = StoreUrl::parse(&long).unwrap_err().to_string();
        assert!(!e.contains("hunter"), "{e}");
    }

    #[tokio::test]
    async fn unknown_scheme_lists_known() {
        let mut r = Registry::new();
        r.register("mem", "mem:SIZE", |u: StoreUrl| async move {
            Err(u.error("x", "y"))
        });
        let e = r.open("s4://bucket").await.unwrap_err().to_string();
        assert!(
            e.contains("\"s4\" is not supported") && e.contains("mem:"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = StoreUrl::parse(&s);
        }

        #[test]
        fn redact_never_panics_nor_shows_a_secret(
            s in "\\PC{0,40}",
            secret in "[A-Za-z0-9]{12}",
            name in "(password|secret_key|session_token|key)",
        ) {
            let _ = redact(&s);
            let url = format!("redis://h?{name}={secret}&{s}");
            prop_assert!(!redact(&url).contains(&secret));
        }

        #[test]
        fn parse_never_panics_urlish(s in "[a-z]{1,5}:(//[a-z0-9.:]{0,12})?[/a-z%0-9]{0,12}(\\?[a-z=&%0-9]{0,16})?") {
            if let Ok(u) = StoreUrl::parse(&s) {
                let _ = u.size_param("size");
                let _ = u.bool_param("create");
            }
        }
    }
}
