//! Who may speak to an agent's gRPC port: member authentication for every member-to-member
//! RPC, and the caller identity the admin API authorizes on.
//!
//! Two ways to be a member:
//! - **mutual TLS** (`[tls]`): the handshake already requires a client certificate signed by
//!   the cluster CA; for a member-only RPC the certificate must also name a member (a DNS
//!   name that is a member's name).
//! - **cluster secret** (`[security] cluster_secret_file` / `cluster_secret_env`): every
//!   request proves the secret without sending it, with an HMAC-SHA256 in metadata over the
//!   gRPC method path, the sender's and the target's member names, a timestamp
//!   (ms since the Unix epoch), a random nonce, the forwarding headers and the SHA-256 of the
//!   request body (the gRPC-framed message). (The cluster name is not in it: the handlers
//!   check it and name both clusters when they differ.) The server refuses a timestamp more than
//!   [`CLOCK_WINDOW_MS`] off its own clock (member clocks must be NTP-synced within that) and
//!   a nonce it has already seen within that window (a bounded cache).
//!
//! [`AuthLayer`] sits in front of every gRPC service, so no handler runs for a refused
//! request: `Raft/*` and `Agent/*` need a member; `Admin/*` passes with the [`Caller`] in the
//! request's extensions and the admin handlers decide (token, certificate or member).
//! [`SignedChannel`] is the client side: a channel that signs every request it sends.
//! Refusals are `Unauthenticated` with a reason that reveals nothing secret-derived, and are
//! logged at WARN at most once per peer address per [`WARN_EVERY`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::Channel;

use crate::raft::network::MAX_RAFT_MESSAGE_BYTES;

/// Sender's member name.
pub const HDR_MEMBER: &str = "x-meridian-member";
/// Send time, ms since the Unix epoch.
pub const HDR_TS_MS: &str = "x-meridian-ts-ms";
/// 16 random bytes, hex.
pub const HDR_NONCE: &str = "x-meridian-nonce";
/// HMAC-SHA256, hex.
pub const HDR_MAC: &str = "x-meridian-mac";
/// Set by a member that forwards an admin request to its leader (see `agent::admin`).
pub const HDR_FORWARDED: &str = "x-meridian-forwarded";
/// How the first hop authorized a forwarded admin request (`token`, `certificate`, `member`,
/// `insecure`).
pub const HDR_AUTHORIZED_BY: &str = "x-meridian-authorized-by";

/// Shortest cluster secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;
/// A request whose timestamp is further than this from the receiver's clock is refused.
pub const CLOCK_WINDOW_MS: u64 = 60_000;
/// Most nonces remembered; beyond it requests are refused until old ones expire.
const NONCE_CACHE_MAX: usize = 200_000;
/// One WARN line per peer address per this.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// Most peer addresses the WARN limiter remembers.
const WARN_PEERS_MAX: usize = 1024;
/// Largest request body the layer buffers (a Raft message plus gRPC framing).
const MAX_BODY_BYTES: usize = MAX_RAFT_MESSAGE_BYTES + 1024;
/// Domain separation: a MAC made for something else never verifies here.
const MAC_CONTEXT: &str = "meridian-member-auth-v1";

type HmacSha256 = Hmac<Sha256>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The cluster secret. `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterKey(Arc<[u8]>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// Refuses a secret shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8]) -> Result<ClusterKey, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the cluster secret has {} bytes; at least {MIN_SECRET_BYTES} are needed \
                 (make one with: head -c 32 /dev/urandom | base64)",
                secret.len()
            ));
        }
        Ok(ClusterKey(secret.into()))
    }

    fn mac(&self, p: &MacInput<'_>) -> HmacSha256 {
        // Every field is on its own line; none can contain a newline (names, paths, hex).
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("any key length");
        for part in [
            MAC_CONTEXT,
            p.path,
            p.from,
            p.to,
            &p.ts_ms.to_string(),
            p.nonce,
            p.forwarded,
            p.authorized_by,
            &hex(&p.body_sha256),
        ] {
            m.update(part.as_bytes());
            m.update(b"\n");
        }
        m
    }
}

/// What a MAC covers.
struct MacInput<'a> {
    path: &'a str,
    from: &'a str,
    to: &'a str,
    ts_ms: u64,
    nonce: &'a str,
    forwarded: &'a str,
    authorized_by: &'a str,
    body_sha256: [u8; 32],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Milliseconds since the Unix epoch on this host's clock.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Signs requests as member `from`.
#[derive(Clone, Debug)]
pub struct Signer {
    key: ClusterKey,
    from: String,
}

impl Signer {
    pub fn new(key: ClusterKey, from: impl Into<String>) -> Self {
        Signer {
            key,
            from: from.into(),
        }
    }

    /// Adds the authentication headers for a request to member `to` at `path` whose body
    /// is `body`, sent at `ts_ms` with `nonce` (hex).
    pub fn sign_with(
        &self,
        headers: &mut http::HeaderMap,
        path: &str,
        to: &str,
        body: &[u8],
        ts_ms: u64,
        nonce: &str,
    ) {
        let mac = self.key.mac(&MacInput {
            path,
            from: &self.from,
            to,
            ts_ms,
            nonce,
            forwarded: header(headers, HDR_FORWARDED),
            authorized_by: header(headers, HDR_AUTHORIZED_BY),
            body_sha256: Sha256::digest(body).into(),
        });
        let tag = hex(&mac.finalize().into_bytes());
        for (name, value) in [
            (HDR_MEMBER, self.from.clone()),
            (HDR_TS_MS, ts_ms.to_string()),
            (HDR_NONCE, nonce.to_string()),
            (HDR_MAC, tag),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
    }

    /// [`Signer::sign_with`] now, with a fresh random nonce.
    pub fn sign(&self, headers: &mut http::HeaderMap, path: &str, to: &str, body: &[u8]) {
        let nonce = hex(&rand::random::<[u8; 16]>());
        self.sign_with(headers, path, to, body, unix_now_ms(), &nonce);
    }
}

/// Why a member-authenticated request was refused. The messages name what was wrong,
/// never anything derived from the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this RPC is for cluster members only: the request carries no member authentication (cluster secret HMAC or a member's TLS certificate)")]
    NotAMember,
    #[error("malformed member authentication header {0}")]
    Malformed(&'static str),
    #[error("the request's timestamp is {skew_ms} ms off this member's clock; member clocks must agree within {CLOCK_WINDOW_MS} ms (run NTP)")]
    Stale { skew_ms: u64 },
    #[error("the request's HMAC does not verify: the sender does not hold this cluster's secret, or the request was altered")]
    BadMac,
    #[error("the request was already received once (replay)")]
    Replay,
    #[error("too many recent requests to remember their nonces; retry shortly")]
    NonceCacheFull,
    #[error("the request body is larger than {MAX_BODY_BYTES} bytes")]
    Body,
    #[error("the request body was not received completely (the sender gave up)")]
    BodyAborted,
    #[error("this member has no cluster secret to check the request's HMAC with")]
    NoSecret,
}

/// Nonces seen within the clock window, bounded.
#[derive(Default)]
struct NonceCache {
    seen: HashSet<String>,
    /// (forget after, ms since the epoch; nonce), oldest first.
    order: VecDeque<(u64, String)>,
}

impl NonceCache {
    /// Remembers `nonce` until `until_ms`; false if it is already known.
    fn insert(&mut self, nonce: &str, until_ms: u64, now_ms: u64) -> Result<(), AuthError> {
        while let Some((until, _)) = self.order.front() {
            if *until >= now_ms {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.seen.remove(&n);
            }
        }
        if self.seen.contains(nonce) {
            return Err(AuthError::Replay);
        }
        if self.seen.len() >= NONCE_CACHE_MAX {
            return Err(AuthError::NonceCacheFull);
        }
        self.seen.insert(nonce.to_string());
        // Entries are not strictly ordered by `until` (timestamps vary within the window);
        // a late one stays a little longer, which is safe.
        self.order.push_back((until_ms, nonce.to_string()));
        Ok(())
    }
}

/// Checks HMAC-authenticated requests addressed to member `me`.
pub struct Verifier {
    key: ClusterKey,
    me: String,
    nonces: Mutex<NonceCache>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(key: ClusterKey, me: impl Into<String>) -> Self {
        Verifier {
            key,
            me: me.into(),
            nonces: Mutex::default(),
        }
    }

    /// Whether `headers` carry member authentication at all.
    pub fn present(headers: &http::HeaderMap) -> bool {
        headers.contains_key(HDR_MAC)
    }

    /// Verifies one request received at `now_ms`; returns the sender's member name.
    pub fn verify(
        &self,
        headers: &http::HeaderMap,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<String, AuthError> {
        let from = header(headers, HDR_MEMBER);
        if from.is_empty() {
            return Err(AuthError::Malformed(HDR_MEMBER));
        }
        let ts_ms: u64 = header(headers, HDR_TS_MS)
            .parse()
            .map_err(|_| AuthError::Malformed(HDR_TS_MS))?;
        let nonce = header(headers, HDR_NONCE);
        if nonce.len() != 32 || unhex(nonce).is_none() {
            return Err(AuthError::Malformed(HDR_NONCE));
        }
        let tag = unhex(header(headers, HDR_MAC)).ok_or(AuthError::Malformed(HDR_MAC))?;
        let skew_ms = now_ms.abs_diff(ts_ms);
        if skew_ms > CLOCK_WINDOW_MS {
            return Err(AuthError::Stale { skew_ms });
        }
        let mac = self.key.mac(&MacInput {
            path,
            from,
            to: &self.me,
            ts_ms,
            nonce,
            forwarded: header(headers, HDR_FORWARDED),
            authorized_by: header(headers, HDR_AUTHORIZED_BY),
            body_sha256: Sha256::digest(body).into(),
        });
        // Constant time.
        mac.verify_slice(&tag).map_err(|_| AuthError::BadMac)?;
        self.nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nonce, ts_ms.saturating_add(CLOCK_WINDOW_MS), now_ms)?;
        Ok(from.to_string())
    }
}

/// Who sent a request, as [`AuthLayer`] established it; in every request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Proved membership (HMAC with the cluster secret, or a TLS certificate naming a member).
    Member(String),
    /// A TLS client certificate signed by the cluster CA that names no member (an operator).
    Certified,
    /// Nothing proven.
    Anonymous,
}

/// The member names this agent knows (address book, Raft membership, intent): the names a
/// member's TLS certificate may carry.
pub type MemberNames = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Whether the RPC at `path` is for members only (everything but the admin API).
pub fn member_only(path: &str) -> bool {
    !path.starts_with("/meridian.v1.Admin/")
}

/// The member a TLS client certificate names (any of its DNS names that is a member), or
/// `None`.
pub fn cert_member(
    certs: &[rustls_pki_types::CertificateDer<'static>],
    members: &[String],
) -> Option<String> {
    let leaf = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    members
        .iter()
        .find(|n| {
            rustls_pki_types::ServerName::try_from(n.as_str())
                .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
        })
        .cloned()
}

/// One WARN line per peer address per [`WARN_EVERY`], over a bounded map.
#[derive(Default)]
struct WarnLimiter {
    last: Mutex<HashMap<IpAddr, Instant>>,
}

impl WarnLimiter {
    fn allow(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = last.get(&peer) {
            if now.duration_since(*at) < WARN_EVERY {
                return false;
            }
        }
        if last.len() >= WARN_PEERS_MAX {
            last.retain(|_, at| now.duration_since(*at) < WARN_EVERY);
            if last.len() >= WARN_PEERS_MAX {
                last.clear();
            }
        }
        last.insert(peer, now);
        true
    }
}

/// The tower layer in front of all gRPC services; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    /// Checks HMACs; `None` without a cluster secret.
    verifier: Option<Arc<Verifier>>,
    /// `[security] insecure = true`: member-only RPCs are not checked.
    insecure: bool,
    names: MemberNames,
    warn: Arc<WarnLimiter>,
}

impl AuthLayer {
    pub fn new(verifier: Option<Arc<Verifier>>, insecure: bool, names: MemberNames) -> Self {
        AuthLayer {
            verifier,
            insecure,
            names,
            warn: Arc::default(),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

fn peer_of(
    req: &http::Request<Body>,
) -> (
    Option<std::net::SocketAddr>,
    Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
) {
    if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        let certs = tls.peer_certs().map(|c| c.as_ref().clone());
        return (tls.get_ref().remote_addr(), certs);
    }
    let addr = req
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr());
    (addr, None)
}

fn refuse(e: &AuthError) -> http::Response<Body> {
    let code = match e {
        AuthError::NonceCacheFull => tonic::Code::Unavailable,
        AuthError::BodyAborted => tonic::Code::Cancelled,
        _ => tonic::Code::Unauthenticated,
    };
    tonic::Status::new(code, e.to_string()).into_http::<Body>()
}

impl<S> tower_service::Service<http::Request<Body>> for AuthService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let (addr, certs) = peer_of(&req);
            let policy = &layer;
            let outcome: Result<Caller, AuthError> = async {
                if Verifier::present(req.headers()) {
                    let Some(verifier) = &policy.verifier else {
                        return if policy.insecure {
                            Ok(Caller::Anonymous)
                        } else {
                            Err(AuthError::NoSecret)
                        };
                    };
                    let (parts, body) = std::mem::take(&mut req).into_parts();
                    let bytes: Bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
                        Ok(c) => c.to_bytes(),
                        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                            return Err(AuthError::Body)
                        }
                        // The sender gave up (its deadline passed) while the body was on
                        // its way: nothing to authenticate, nothing to warn about.
                        Err(_) => return Err(AuthError::BodyAborted),
                    };
                    let result = verifier.verify(&parts.headers, &path, &bytes, unix_now_ms());
                    req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
                    return result.map(Caller::Member);
                }
                if let Some(certs) = &certs {
                    let names = (layer.names)();
                    return Ok(match cert_member(certs, &names) {
                        Some(m) => Caller::Member(m),
                        None => Caller::Certified,
                    });
                }
                Ok(Caller::Anonymous)
            }
            .await;
            let outcome = outcome.and_then(|caller| {
                if member_only(&path) && !policy.insecure && !matches!(caller, Caller::Member(_)) {
                    Err(AuthError::NotAMember)
                } else {
                    Ok(caller)
                }
            });
            match outcome {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(AuthError::BodyAborted) => {
                    tracing::debug!(rpc = %path, "a request was abandoned by its sender before its body arrived");
                    Ok(refuse(&AuthError::BodyAborted))
                }
                Err(e) => {
                    let ip = addr.map(|a| a.ip());
                    if ip.is_none_or(|ip| policy.warn.allow(ip)) {
                        let peer = addr
                            .map(|a| a.to_string())
                            .unwrap_or_else(|| "unknown".into());
                        tracing::warn!(peer = %peer, rpc = %path, "refused an unauthenticated request: {e}");
                    }
                    Ok(refuse(&e))
                }
            }
        })
    }
}

/// A channel to member `to` that signs every request with the cluster secret (when there is
/// one; otherwise it sends as is, relying on TLS or `insecure`).
#[derive(Clone, Debug)]
pub struct SignedChannel {
    inner: Channel,
    signer: Option<Signer>,
    to: Arc<str>,
}

impl SignedChannel {
    pub fn new(inner: Channel, signer: Option<Signer>, to: &str) -> Self {
        SignedChannel {
            inner,
            signer,
            to: to.into(),
        }
    }
}

impl tower_service::Service<http::Request<Body>> for SignedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(signer) = self.signer.clone() else {
            return Box::pin(async move { inner.call(req).await.map_err(Into::into) });
        };
        let to = self.to.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| -> BoxError { format!("reading the request to sign it: {e}").into() })?
                .to_bytes();
            let path = parts.uri.path().to_string();
            signer.sign(&mut parts.headers, &path, &to, &bytes);
            let req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            inner.call(req).await.map_err(Into::into)
        })
    }
}

/// The token of an `Authorization` header value in the bearer scheme (scheme name matched
/// case-insensitively, as RFC 7235 says), or `None`.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares a presented token with the configured one in constant time.
pub fn token_matches(expected: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Hash first so that the comparison does not depend on the lengths either.
    let a: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    bool::from(a.ct_eq(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", ""));
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn pair() -> (Signer, Verifier) {
        let key = ClusterKey::new(SECRET).unwrap();
        (
            Signer::new(key.clone(), "east-1"),
            Verifier::new(key, "west-1"),
        )
    }

    const PATH: &str = "/meridian.v1.Raft/AppendEntries";

    #[test]
    fn short_secret_is_refused() {
        let e = ClusterKey::new(b"short").unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
    }

    #[test]
    fn a_signed_request_verifies_once() {
        let (s, v) = pair();
        let mut h = http::HeaderMap::new();
        s.sign(&mut h, PATH, "west-1", b"body");
        assert_eq!(
            v.verify(&h, PATH, b"body", unix_now_ms()),
            Ok("east-1".into())
        );
        // The same request again is a replay.
        assert_eq!(
            v.verify(&h, PATH, b"body", unix_now_ms()),
            Err(AuthError::Replay)
        );
    }

    #[test]
    fn wrong_secret_is_refused() {
        let (_, v) = pair();
        let other = Signer::new(
            ClusterKey::new(b"ffffffffffffffffffffffffffffffff").unwrap(),
            "east-1",
        );
        let mut h = http::HeaderMap::new();
        other.sign(&mut h, PATH, "west-1", b"body");
        assert_eq!(
            v.verify(&h, PATH, b"body", unix_now_ms()),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let (s, v) = pair();
        let now = unix_now_ms();
        let sign = |nonce: &str| {
            let mut h = http::HeaderMap::new();
            s.sign_with(&mut h, PATH, "west-1", b"body", now, nonce);
            h
        };
        // Body changed.
        let h = sign("00000000000000000000000000000001");
        assert_eq!(v.verify(&h, PATH, b"bodY", now), Err(AuthError::BadMac));
        // Another RPC.
        let h = sign("00000000000000000000000000000002");
        assert_eq!(
            v.verify(&h, "/meridian.v1.Raft/Vote", b"body", now),
            Err(AuthError::BadMac)
        );
        // Another sender claimed.
        let mut h = sign("00000000000000000000000000000003");
        h.insert(HDR_MEMBER, http::HeaderValue::from_static("east-2"));
        assert_eq!(v.verify(&h, PATH, b"body", now), Err(AuthError::BadMac));
        // Meant for another member.
        let mut h = http::HeaderMap::new();
        s.sign_with(
            &mut h,
            PATH,
            "west-2",
            b"body",
            now,
            "00000000000000000000000000000004",
        );
        assert_eq!(v.verify(&h, PATH, b"body", now), Err(AuthError::BadMac));
        // Forwarding header added afterwards.
        let mut h = sign("00000000000000000000000000000005");
        h.insert(HDR_FORWARDED, http::HeaderValue::from_static("1"));
        assert_eq!(v.verify(&h, PATH, b"body", now), Err(AuthError::BadMac));
        // Timestamp changed.
        let mut h = sign("00000000000000000000000000000006");
        h.insert(
            HDR_TS_MS,
            http::HeaderValue::from_str(&(now + 1).to_string()).unwrap(),
        );
        assert_eq!(v.verify(&h, PATH, b"body", now), Err(AuthError::BadMac));
        // Untouched, it verifies.
        let h = sign("00000000000000000000000000000008");
        assert!(v.verify(&h, PATH, b"body", now).is_ok());
    }

    #[test]
    fn stale_or_future_timestamps_are_refused() {
        let (s, v) = pair();
        let now = unix_now_ms();
        for (ts, nonce) in [
            (
                now - CLOCK_WINDOW_MS - 1,
                "0000000000000000000000000000000a",
            ),
            (
                now + CLOCK_WINDOW_MS + 1,
                "0000000000000000000000000000000b",
            ),
        ] {
            let mut h = http::HeaderMap::new();
            s.sign_with(&mut h, PATH, "west-1", b"", ts, nonce);
            assert!(matches!(
                v.verify(&h, PATH, b"", now),
                Err(AuthError::Stale { .. })
            ));
        }
        let mut h = http::HeaderMap::new();
        s.sign_with(
            &mut h,
            PATH,
            "west-1",
            b"",
            now - CLOCK_WINDOW_MS + 1000,
            "0000000000000000000000000000000c",
        );
        assert!(v.verify(&h, PATH, b"", now).is_ok());
    }

    #[test]
    fn missing_or_malformed_headers_are_refused() {
        let (s, v) = pair();
        let now = unix_now_ms();
        assert_eq!(
            v.verify(&http::HeaderMap::new(), PATH, b"", now),
            Err(AuthError::Malformed(HDR_MEMBER))
        );
        let mut h = http::HeaderMap::new();
        s.sign(&mut h, PATH, "west-1", b"");
        h.insert(HDR_MAC, http::HeaderValue::from_static("zz"));
        assert_eq!(
            v.verify(&h, PATH, b"", now),
            Err(AuthError::Malformed(HDR_MAC))
        );
    }

    #[test]
    fn nonces_expire_with_the_window() {
        let mut c = NonceCache::default();
        c.insert("a", 100, 0).unwrap();
        assert_eq!(c.insert("a", 100, 50), Err(AuthError::Replay));
        // Past its window, the nonce is forgotten (a replay would be stale by then).
        c.insert("a", 300, 150).unwrap();
        assert_eq!(c.seen.len(), 1);
    }

    #[test]
    fn warnings_are_rate_limited_per_peer() {
        let w = WarnLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(w.allow(a));
        assert!(!w.allow(a));
        assert!(w.allow(b));
    }

    #[test]
    fn only_the_admin_api_is_open_to_non_members() {
        assert!(member_only("/meridian.v1.Raft/Vote"));
        assert!(member_only("/meridian.v1.Agent/RenewLease"));
        assert!(member_only("/meridian.v1.Unknown/X"));
        assert!(!member_only("/meridian.v1.Admin/Status"));
    }
}
