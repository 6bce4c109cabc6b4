//! HTTP requests the host makes for a plugin (ABI 1.1 `http-fetch`, and the
//! key-set fetches of [`super::key_sets`]), under what the operator allows
//! that plugin (`http`, `key_sets`, `private_networks` and the `http_*`
//! limits in the node's grants file).
//!
//! The rules, each a known way for a plugin host to be turned against the
//! network it stands in:
//! - **Only listed origins.** A URL is absolute (nothing is resolved against
//!   an inbound `Host`, the mistake of Spin's CVE-2024-32980) and its exact
//!   scheme, host and port are on the list; a key set's URL is listed whole.
//!   A plugin that builds a URL from token content can reach nothing the
//!   operator did not list (the SSRF of Centrifugo's CVE-2026-32301).
//! - **No private addresses by name.** A listed host *name* that resolves to
//!   a loopback, private, link-local (cloud metadata), shared or unspecified
//!   address is refused, unless the address lies in `private_networks`: DNS
//!   cannot point a public name at the inside. An address written in the
//!   list itself (`http://10.0.0.5:8080`) was listed, and is allowed.
//! - **Redirects stay on the list** (at most three), checked like the first URL.
//! - **Bounded**: a timeout (the plugin's, never above the operator's
//!   maximum), a response-size cap (cut, not buffered), a number of requests
//!   in flight per plugin, and a circuit breaker per host that stops asking
//!   a host that keeps failing.
//! - No proxy from the environment, no cookies.
//!
//! Successful responses can be cached under a key the plugin chooses, for a
//! time it chooses (bounded), so an introspection call is made once per token
//! and not once per connect.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use reqwest::Url;

use crate::stats::Stats;

/// The operator's HTTP grant for one plugin, as written in the grants file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EgressGrant {
    /// Origins (`scheme://host[:port]`) `http-fetch` may reach.
    pub http: Vec<String>,
    /// JWKS URLs `key-set-key` may use, whole.
    pub key_sets: Vec<String>,
    /// Private ranges listed host names may resolve to.
    pub private_networks: Vec<IpNet>,
    pub timeout: Option<Duration>,
    pub max_response_bytes: Option<usize>,
    pub concurrency: Option<usize>,
}

/// Defaults and hard ceilings of the operator's limits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Longest a response may be cached, whatever the plugin asks.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Cached responses per plugin, and their bytes together.
const CACHE_ENTRIES: usize = 4096;
const CACHE_BYTES: usize = 16 << 20;
/// Failures in a row that open a host's circuit, and for how long.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_OPEN: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: usize = 3;
const MAX_REQUEST_BODY: usize = 1 << 20;
const MAX_URL_LEN: usize = 4096;
const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// Headers a plugin may not set: the host decides framing and routing.
const FORBIDDEN_HEADERS: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "keep-alive",
];

/// An HTTP request, in the host's types.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Zero: the operator's default.
    pub timeout: Duration,
    pub cache: Option<(String, Duration)>,
}

impl Request {
    pub fn get(url: &str) -> Request {
        Request {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::ZERO,
            cache: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub cached: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn bytes(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// Why a request was not answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EgressError {
    /// Never sent: the rules say no.
    #[error("refused: {0}")]
    Refused(String),
    /// Sent (or tried), and failed.
    #[error("failed: {0}")]
    Failed(String),
}

/// Consecutive failures of one host.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// A plugin's cached responses by its keys, with their bytes together, kept
/// within [`CACHE_ENTRIES`] and [`CACHE_BYTES`].
#[derive(Default)]
struct ResponseCache {
    entries: HashMap<String, (Instant, Response)>,
    bytes: usize,
}

impl ResponseCache {
    fn get(&mut self, key: &str, now: Instant) -> Option<Response> {
        match self.entries.get(key) {
            Some((expires, response)) if now < *expires => Some(response.clone()),
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, gone)) = self.entries.remove(key) {
            self.bytes -= gone.bytes();
        }
    }

    fn insert(&mut self, key: String, ttl: Duration, response: Response, now: Instant) {
        self.remove(&key);
        let size = response.bytes();
        let full =
            |cache: &Self| cache.entries.len() >= CACHE_ENTRIES || cache.bytes + size > CACHE_BYTES;
        if full(self) {
            let expired: Vec<String> = self
                .entries
                .iter()
                .filter(|(_, (expires, _))| *expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for gone in expired {
                self.remove(&gone);
            }
        }
        // Still full: drop the entries closest to expiry.
        while full(self) {
            let Some(first) = self
                .entries
                .iter()
                .min_by_key(|(_, (expires, _))| *expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&first);
        }
        self.bytes += size;
        self.entries.insert(key, (now + ttl, response));
    }
}

/// One plugin's way out: its rules, its client, its cache and breakers.
pub struct Egress {
    plugin: String,
    /// What it was made from (a changed grant makes a new one).
    grant: EgressGrant,
    origins: Vec<String>,
    key_sets: Vec<String>,
    timeout: Duration,
    max_timeout: Duration,
    max_response_bytes: usize,
    in_flight: tokio::sync::Semaphore,
    concurrency: usize,
    client: reqwest::Client,
    cache: Mutex<ResponseCache>,
    breakers: Mutex<HashMap<String, Breaker>>,
    stats: Arc<Stats>,
}

/// `scheme://host:port` of a URL, the port always written.
pub fn origin(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!(
        "{}://{}:{port}",
        url.scheme(),
        host.to_ascii_lowercase()
    ))
}

/// An operator's list entry, normalised like [`origin`].
fn listed_origin(entry: &str) -> Result<String, String> {
    let url = Url::parse(entry).map_err(|e| format!("`{entry}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{entry}`: only http and https"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(format!(
            "`{entry}`: list an origin (scheme://host[:port]), not a path"
        ));
    }
    origin(&url).ok_or_else(|| format!("`{entry}` has no host"))
}

/// Checks the URLs and networks of a grant as the grants file is read.
///
/// # Errors
/// The first entry that is not a usable origin or key-set URL.
pub fn validate(http: &[String], key_sets: &[String]) -> Result<(), String> {
    for entry in http {
        listed_origin(entry)?;
    }
    for entry in key_sets {
        let url = Url::parse(entry).map_err(|e| format!("key set `{entry}`: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("key set `{entry}`: an absolute http(s) URL"));
        }
    }
    Ok(())
}

/// Addresses a host name may not resolve to unless the operator lists them.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                // Shared address space (RFC 6598), benchmarking (RFC 2544).
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || (first == 0x64 && v6.segments()[1] == 0xff9b) // NAT64
        }
    }
}

/// Resolves names, keeping only addresses the grant allows.
struct GuardedResolver {
    private_networks: Vec<IpNet>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = self.private_networks.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| !is_internal(a.ip()) || allowed.iter().any(|n| n.contains(&a.ip())))
                .collect();
            if kept.is_empty() {
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves only to internal addresses ({}) that private_networks does not list",
                    shown.join(", ")
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

impl Egress {
    pub fn new(plugin: &str, grant: &EgressGrant, stats: Arc<Stats>) -> Egress {
        let origins: Vec<String> = grant
            .http
            .iter()
            .filter_map(|e| listed_origin(e).ok())
            .collect();
        // Redirects may go to any listed origin, and to a key set's own.
        let mut reachable = origins.clone();
        reachable.extend(
            grant
                .key_sets
                .iter()
                .filter_map(|u| Url::parse(u).ok().as_ref().and_then(origin)),
        );
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match origin(attempt.url()) {
                Some(o) if reachable.contains(&o) => attempt.follow(),
                _ => {
                    let to = attempt.url().to_string();
                    attempt.error(format!("redirect to {to}, which is not on the list"))
                }
            }
        });
        let max_timeout = grant.timeout.unwrap_or(DEFAULT_TIMEOUT).min(MAX_TIMEOUT);
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(redirects)
            .dns_resolver(Arc::new(GuardedResolver {
                private_networks: grant.private_networks.clone(),
            }))
            .user_agent(concat!("imhost/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(max_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|err| {
                tracing::error!(cause = %err, "HTTP client not built; plugins get a default one");
                reqwest::Client::new()
            });
        let concurrency = grant.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
        Egress {
            plugin: plugin.to_owned(),
            grant: grant.clone(),
            origins,
            key_sets: grant.key_sets.clone(),
            timeout: max_timeout,
            max_timeout,
            max_response_bytes: grant
                .max_response_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
                .min(MAX_RESPONSE_BYTES),
            in_flight: tokio::sync::Semaphore::new(concurrency),
            concurrency,
            client,
            cache: Mutex::default(),
            breakers: Mutex::default(),
            stats,
        }
    }

    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Whether the operator lists this key set for the plugin.
    pub fn allows_key_set(&self, url: &str) -> bool {
        self.key_sets.iter().any(|k| k == url)
    }

    fn refuse(&self, why: String) -> EgressError {
        Stats::incr(&self.stats.plugin_http_refused);
        tracing::warn!(plugin = %self.plugin, cause = %why, "plugin HTTP request refused");
        EgressError::Refused(why)
    }

    /// Checks a request against the rules and returns its URL.
    fn admit(&self, request: &Request, key_set: bool) -> Result<Url, EgressError> {
        if request.url.len() > MAX_URL_LEN {
            return Err(self.refuse(format!("URL over {MAX_URL_LEN} bytes")));
        }
        let url = Url::parse(&request.url)
            .map_err(|e| self.refuse(format!("`{}` is not an absolute URL: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.refuse(format!("scheme `{}`: only http and https", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.refuse("credentials in the URL".into()));
        }
        let listed = if key_set {
            self.allows_key_set(&request.url)
        } else {
            origin(&url).is_some_and(|o| self.origins.contains(&o))
        };
        if !listed {
            let what = if key_set { "key_sets" } else { "http" };
            return Err(self.refuse(format!(
                "{} is not on this plugin's `{what}` list in the grants file",
                request.url
            )));
        }
        if !METHODS.contains(&request.method.as_str()) {
            return Err(self.refuse(format!("method `{}`", request.method)));
        }
        if let Some((name, _)) = request
            .headers
            .iter()
            .find(|(n, _)| FORBIDDEN_HEADERS.contains(&n.to_ascii_lowercase().as_str()))
        {
            return Err(self.refuse(format!("header `{name}` is the host's to set")));
        }
        if request
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BODY)
        {
            return Err(self.refuse(format!("request body over {MAX_REQUEST_BODY} bytes")));
        }
        Ok(url)
    }

    fn cached(&self, key: &str) -> Option<Response> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key, Instant::now()).map(|response| Response {
            cached: true,
            ..response
        })
    }

    fn keep(&self, key: String, ttl: Duration, response: &Response) {
        let ttl = ttl.min(MAX_CACHE_TTL);
        if ttl.is_zero() || response.bytes() > CACHE_BYTES / 16 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(key, ttl, response.clone(), Instant::now());
    }

    fn breaker_open(&self, host: &str) -> bool {
        let breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        breakers
            .get(host)
            .and_then(|b| b.open_until)
            .is_some_and(|until| Instant::now() < until)
    }

    fn outcome(&self, host: &str, failed: bool) {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let breaker = breakers.entry(host.to_owned()).or_default();
        if !failed {
            *breaker = Breaker::default();
            return;
        }
        breaker.failures += 1;
        if breaker.failures >= BREAKER_FAILURES {
            breaker.open_until = Some(Instant::now() + BREAKER_OPEN);
            breaker.failures = 0;
            tracing::warn!(plugin = %self.plugin, host, "plugin HTTP circuit opened: the host keeps failing");
        }
    }

    /// Makes `request` for the plugin (`key_set`: a key-set fetch, whose URL
    /// must be listed whole).
    ///
    /// # Errors
    /// Refused by the rules, or failed; an HTTP error status is a response.
    pub async fn fetch(&self, request: Request, key_set: bool) -> Result<Response, EgressError> {
        let url = self.admit(&request, key_set)?;
        if let Some((key, _)) = &request.cache
            && let Some(hit) = self.cached(key)
        {
            Stats::incr(&self.stats.plugin_http_cached);
            return Ok(hit);
        }
        let host = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        );
        if self.breaker_open(&host) {
            return Err(self.refuse(format!(
                "{host} failed {BREAKER_FAILURES} times in a row: not asked again for {BREAKER_OPEN:?}"
            )));
        }
        let timeout = if request.timeout.is_zero() {
            self.timeout
        } else {
            request.timeout.min(self.max_timeout)
        };
        let started = Instant::now();
        let Ok(Ok(_permit)) = tokio::time::timeout(timeout, self.in_flight.acquire()).await else {
            return Err(self.refuse(format!(
                "{} requests of this plugin already in flight for {timeout:?}",
                self.concurrency
            )));
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        Stats::incr(&self.stats.plugin_http_requests);
        let sent = tokio::time::timeout(remaining, self.send(&request, url, remaining)).await;
        let result = match sent {
            Ok(result) => result,
            Err(_) => Err(EgressError::Failed(format!(
                "no response within {timeout:?}"
            ))),
        };
        match &result {
            Ok(response) => {
                self.outcome(&host, response.status >= 500);
                if let Some((key, ttl)) = request.cache
                    && (200..300).contains(&response.status)
                {
                    self.keep(key, ttl, response);
                }
            }
            Err(EgressError::Failed(why)) => {
                Stats::incr(&self.stats.plugin_http_failed);
                tracing::warn!(plugin = %self.plugin, url = %request.url, cause = %why, "plugin HTTP request failed");
                self.outcome(&host, true);
            }
            Err(EgressError::Refused(_)) => {
                Stats::incr(&self.stats.plugin_http_refused);
            }
        }
        result
    }

    async fn send(
        &self,
        request: &Request,
        url: Url,
        timeout: Duration,
    ) -> Result<Response, EgressError> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| EgressError::Refused(format!("method `{}`", request.method)))?;
        let mut builder = self.client.request(method, url).timeout(timeout);
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let mut response = builder.send().await.map_err(|err| {
            let why = error_chain(&err);
            if err.is_redirect()
                || why.contains("not on the list")
                || why.contains("internal addresses")
            {
                EgressError::Refused(why)
            } else {
                EgressError::Failed(why)
            }
        })?;
        let status = response.status().as_u16();
        if response
            .content_length()
            .is_some_and(|len| len > self.max_response_bytes as u64)
        {
            return Err(EgressError::Failed(format!(
                "response of {} bytes is over the cap of {}",
                response.content_length().unwrap_or_default(),
                self.max_response_bytes
            )));
        }
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| EgressError::Failed(error_chain(&e)))?
        {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(EgressError::Failed(format!(
                    "response cut at the cap of {} bytes",
                    self.max_response_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            headers,
            body,
            cached: false,
        })
    }
}

/// Each plugin's [`Egress`], kept across its versions (a swap or a tier
/// upgrade keeps its cache, breakers and connections) while its grant stays
/// the same.
pub struct EgressByPlugin {
    by_name: Mutex<HashMap<String, Arc<Egress>>>,
    stats: Arc<Stats>,
}

impl EgressByPlugin {
    pub fn new(stats: Arc<Stats>) -> EgressByPlugin {
        EgressByPlugin {
            by_name: Mutex::default(),
            stats,
        }
    }

    pub fn for_plugin(&self, name: &str, grant: &EgressGrant) -> Arc<Egress> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        match by_name.get(name) {
            Some(egress) if egress.grant == *grant => egress.clone(),
            _ => {
                let egress = Arc::new(Egress::new(name, grant, self.stats.clone()));
                by_name.insert(name.to_owned(), egress.clone());
                egress
            }
        }
    }
}

/// An error and its causes, one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn only_origins_are_listed_and_they_compare_with_their_port() {
        assert_eq!(
            listed_origin("https://IdP.example.com").as_deref(),
            Ok("https://idp.example.com:443")
        );
        assert_eq!(
            listed_origin("http://127.0.0.1:8080/").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert!(listed_origin("https://idp.example.com/introspect").is_err());
        assert!(listed_origin("ftp://idp.example.com").is_err());
        let url = Url::parse("https://idp.example.com/x?y=1").expect("url");
        assert_eq!(origin(&url).as_deref(), Some("https://idp.example.com:443"));
    }

    #[tokio::test]
    async fn requests_off_the_list_are_refused_before_anything_is_sent() {
        let grant = EgressGrant {
            http: vec!["http://127.0.0.1:9".into()],
            key_sets: vec!["http://127.0.0.1:9/jwks.json".into()],
            ..EgressGrant::default()
        };
        let stats = Arc::new(Stats::default());
        let egress = Egress::new("p", &grant, stats.clone());
        for url in [
            "http://127.0.0.1:10/x",
            "/relative",
            "file:///etc/passwd",
            "http://user:pw@127.0.0.1:9/",
            "http://localhost:9/",
        ] {
            let got = egress.fetch(Request::get(url), false).await;
            assert!(
                matches!(got, Err(EgressError::Refused(_))),
                "{url}: {got:?}"
            );
        }
        let mut host_header = Request::get("http://127.0.0.1:9/");
        host_header.headers.push(("Host".into(), "evil".into()));
        assert!(matches!(
            egress.fetch(host_header, false).await,
            Err(EgressError::Refused(_))
        ));
        // A key set is listed whole: another path on its origin is not.
        assert!(matches!(
            egress
                .fetch(Request::get("http://127.0.0.1:9/other"), true)
                .await,
            Err(EgressError::Refused(_))
        ));
        assert_eq!(
            stats
                .plugin_http_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            7
        );
        assert_eq!(
            stats
                .plugin_http_requests
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn requests_past_the_plugins_concurrency_wait_their_timeout_then_are_refused() {
        // A server that takes connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", silent.local_addr().expect("addr"));
        let grant = EgressGrant {
            http: vec![url.trim_end_matches('/').to_owned()],
            concurrency: Some(1),
            timeout: Some(Duration::from_secs(2)),
            ..EgressGrant::default()
        };
        let stats = Arc::new(Stats::default());
        let egress = Arc::new(Egress::new("p", &grant, stats.clone()));
        let first = tokio::spawn({
            let (egress, url) = (egress.clone(), url.clone());
            async move { egress.fetch(Request::get(&url), false).await }
        });
        // Wait until the first holds the one slot.
        while egress.in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let mut second = Request::get(&url);
        second.timeout = Duration::from_millis(100);
        let refused = egress.fetch(second, false).await;
        assert!(
            matches!(&refused, Err(EgressError::Refused(why)) if why.contains("in flight")),
            "{refused:?}"
        );
        let timed_out = first.await.expect("task");
        assert!(
            matches!(timed_out, Err(EgressError::Failed(_))),
            "{timed_out:?}"
        );
        assert_eq!(
            stats
                .plugin_http_failed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
