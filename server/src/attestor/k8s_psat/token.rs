//! Kubernetes service-account tokens for `k8s_psat` on [`sigil::jose`]: the keys of a JWKS,
//! the signature, the time and audience checks, the `kubernetes.io` claims, and where the keys
//! come from ([`KeySource`]: a JWKS file, or OIDC discovery).
//!
//! Service-account issuers sign with RS256 (the default) or ES256; RS384/RS512 and ES384 are
//! accepted too. `none`, HMAC and anything else are refused. The JWT-SVID validator
//! (`sigil::jwt`) is not reused: it requires a SPIFFE ID subject and a trust bundle, neither of
//! which a service-account token has; both build on the same JOSE code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Map, Value};
use sigil::https::{HttpsClient, HttpsError};
use sigil::jose::{self, Algorithm, JwkError, JwkPublicKey, JwsError, SignatureError, TimeError};

pub use sigil::jose::Jws;

/// Longest token accepted, in bytes (real ones are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Keys are fetched again when older than this, even if every `kid` is known (so a removed key
/// stops being trusted).
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(300);
/// An unknown `kid` triggers a new fetch at most this often (a stream of bogus tokens must not
/// become a stream of fetches).
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// The algorithms service-account issuers sign with.
const ACCEPTED_ALGS: [Algorithm; 5] = [
    Algorithm::Rs256,
    Algorithm::Rs384,
    Algorithm::Rs512,
    Algorithm::Es256,
    Algorithm::Es384,
];

/// One usable key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`, if the key has one.
    pub kid: Option<String>,
    /// The key.
    pub key: JwkPublicKey,
}

/// Why a JWK Set is unusable.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON without a `keys` array.
    #[error("not a JWK Set: no \"keys\" array")]
    NoKeys,
    /// A member of `keys` is not an object.
    #[error("key #{0} is not a JSON object")]
    NotObject(usize),
    /// A `kid` that is not a string.
    #[error("key #{0}: \"kid\" is not a string")]
    KidNotString(usize),
    /// An RSA or EC key with bad parameters.
    #[error("key #{index}: {source}")]
    BadKey {
        /// Position in `keys` (0-based).
        index: usize,
        /// What is wrong with it.
        #[source]
        source: JwkError,
    },
    /// Nothing left to verify with.
    #[error("the JWK Set holds no RSA or EC P-256/P-384 signature key")]
    NoUsableKey,
}

/// Parses a JWK Set (`{"keys": [...]}`), keeping the RSA and EC P-256/P-384 signature keys.
/// Keys with `"use"` other than `sig`, or of other types or curves, are skipped; a key of a
/// supported type with bad parameters is an error, and so is a set with no usable key.
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<Jwk>, JwksError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(JwksError::NotJson)?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeys)?;
    let mut out = Vec::new();
    for (index, k) in keys.iter().enumerate() {
        let m = k.as_object().ok_or(JwksError::NotObject(index))?;
        if m.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            continue;
        }
        // Service-account issuers use RSA and EC keys only; skip the rest unread.
        if !matches!(m.get("kty").and_then(Value::as_str), Some("RSA" | "EC")) {
            continue;
        }
        let kid = match m.get("kid") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(JwksError::KidNotString(index)),
        };
        let key = match JwkPublicKey::from_jwk(m) {
            Ok(Some(key)) => key,
            Ok(None) => continue,
            Err(source) => return Err(JwksError::BadKey { index, source }),
        };
        out.push(Jwk { kid, key });
    }
    if out.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(out)
}

/// Splits a JWS compact serialization (`header.claims.signature`); nothing is verified yet.
pub fn parse(token: &str) -> Result<Jws<'_>, JwsError> {
    Jws::parse(token, MAX_TOKEN_LEN)
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `alg` is not RS256/384/512 or ES256/384.
    #[error("token algorithm {0:?} is not accepted (service-account tokens are RS256 or ES256)")]
    UnsupportedAlg(String),
    /// The header has `crit`.
    #[error("token header has critical extensions (\"crit\"), which are not supported")]
    Critical,
    /// No key with the token's `kid`.
    #[error("token key ID {0:?} is not among the cluster's service-account issuer keys")]
    UnknownKid(String),
    /// The key named by `kid` is of another type than `alg` needs.
    #[error("token signature does not verify: its algorithm {alg} does not match the type of key {kid:?} ({kind})")]
    AlgKeyMismatch {
        /// Header `alg`.
        alg: Algorithm,
        /// Header `kid`.
        kid: String,
        /// The type of the key, as [`JwkPublicKey::kind`] names it.
        kind: &'static str,
    },
    /// No key verifies the signature.
    #[error("token signature does not verify with the cluster's service-account issuer keys")]
    BadSignature,
}

/// Verifies the signature of `jws` with `keys`: the key named by `kid` (every key of the right
/// type when the header has no `kid`).
pub fn verify(jws: &Jws<'_>, keys: &[Jwk]) -> Result<(), VerifyError> {
    if jws.has_critical_header() {
        return Err(VerifyError::Critical);
    }
    let alg = Algorithm::from_name(jws.alg())
        .filter(|a| ACCEPTED_ALGS.contains(a))
        .ok_or_else(|| VerifyError::UnsupportedAlg(jws.alg().to_string()))?;
    let kid = jws.kid();
    let candidates: Vec<&Jwk> = match kid {
        Some(kid) => keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect(),
        None => keys.iter().collect(),
    };
    if let (Some(kid), true) = (kid, candidates.is_empty()) {
        return Err(VerifyError::UnknownKid(kid.to_string()));
    }
    let mut fitting = false;
    for k in &candidates {
        match jws.verify(alg, &k.key) {
            Ok(()) => return Ok(()),
            Err(SignatureError::Invalid) => fitting = true,
            Err(SignatureError::KeyMismatch) => {}
        }
    }
    match (kid, candidates.first()) {
        // The key the token names is of another type: say so rather than "does not verify".
        (Some(kid), Some(k)) if !fitting => Err(VerifyError::AlgKeyMismatch {
            alg,
            kid: kid.to_string(),
            kind: k.key.kind(),
        }),
        _ => Err(VerifyError::BadSignature),
    }
}

/// Why a token's claims are not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// No `exp`: a legacy, never-expiring token.
    #[error("the token has no \"exp\" claim: only projected (expiring, audience-bound) service-account tokens are accepted")]
    NoExpiry,
    /// `exp` or `nbf` is not an integer.
    #[error("the token's \"{0}\" claim is not a number")]
    NotANumber(&'static str),
    /// `exp` has passed (beyond the leeway).
    #[error("the token expired at {exp} (now {now}, unix seconds); the kubelet rotates projected tokens — read the token file again")]
    Expired {
        /// The `exp` claim.
        exp: i64,
        /// The time of the check.
        now: i64,
    },
    /// `nbf` is still ahead (beyond the leeway).
    #[error("the token is not valid before {nbf} (now {now}, unix seconds); check the clocks")]
    NotYetValid {
        /// The `nbf` claim.
        nbf: i64,
        /// The time of the check.
        now: i64,
    },
    /// `aud` is neither a string nor a list of strings.
    #[error("the token's \"aud\" claim is not a string or a list of strings")]
    BadAudience,
    /// `aud` lacks the configured audience.
    #[error("the token's audience {got:?} does not include {expected:?}; project the token with `audience: {expected}`")]
    AudienceMismatch {
        /// The token's audiences.
        got: Vec<String>,
        /// The configured audience.
        expected: String,
    },
    /// No `kubernetes.io` object.
    #[error(
        "the token has no \"kubernetes.io\" claims: it is not a Kubernetes service-account token"
    )]
    NotServiceAccountToken,
    /// A `kubernetes.io` claim is missing or empty.
    #[error("the token's \"kubernetes.io\" claims have no {0}")]
    MissingKubernetesClaim(&'static str),
    /// No `kubernetes.io.pod`.
    #[error("the token is not bound to a pod (no \"kubernetes.io\".pod claim): use a projected service-account token")]
    NotPodBound,
    /// `sub` disagrees with the `kubernetes.io` claims.
    #[error("the token's subject {sub} does not match its kubernetes.io claims ({want})")]
    SubjectMismatch {
        /// `sub` as JSON.
        sub: String,
        /// The subject the claims imply.
        want: String,
    },
}

/// Checks `exp` (required: only expiring, projected tokens are accepted) and `nbf`, each with
/// `leeway` seconds of clock skew, at `now` (unix seconds).
pub fn check_validity(
    claims: &Map<String, Value>,
    now: i64,
    leeway: i64,
) -> Result<(), ClaimsError> {
    jose::check_time(claims, now, leeway)
        .map(|_| ())
        .map_err(|e| match e {
            TimeError::NoExpiry => ClaimsError::NoExpiry,
            TimeError::NotANumber(c) => ClaimsError::NotANumber(c),
            TimeError::Expired { exp, now } => ClaimsError::Expired { exp, now },
            TimeError::NotYetValid { nbf, now } => ClaimsError::NotYetValid { nbf, now },
        })
}

/// Checks that `aud` contains `audience`.
pub fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), ClaimsError> {
    let got = match jose::audiences(claims) {
        Some(got) => got,
        None if claims.contains_key("aud") => return Err(ClaimsError::BadAudience),
        None => Vec::new(),
    };
    if got.iter().any(|a| a == audience) {
        Ok(())
    } else {
        Err(ClaimsError::AudienceMismatch {
            got,
            expected: audience.to_string(),
        })
    }
}

/// Who a pod-bound token was issued to (the `kubernetes.io` claims, or a TokenReview's user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Namespace of the pod and its service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Node name, if the token names one (Kubernetes 1.30+).
    pub node_name: Option<String>,
    /// Node UID, if the token names one.
    pub node_uid: Option<String>,
}

/// Reads the `kubernetes.io` claims of a projected token.
pub fn pod_identity(claims: &Map<String, Value>) -> Result<PodIdentity, ClaimsError> {
    let k8s = claims
        .get("kubernetes.io")
        .and_then(Value::as_object)
        .ok_or(ClaimsError::NotServiceAccountToken)?;
    let text = |v: Option<&Value>, what: &'static str| -> Result<String, ClaimsError> {
        match v.and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(ClaimsError::MissingKubernetesClaim(what)),
        }
    };
    let namespace = text(k8s.get("namespace"), "namespace")?;
    let service_account = text(
        k8s.get("serviceaccount").and_then(|s| s.get("name")),
        "serviceaccount name",
    )?;
    let pod = k8s.get("pod").ok_or(ClaimsError::NotPodBound)?;
    let pod_name = text(pod.get("name"), "pod name")?;
    let pod_uid = text(pod.get("uid"), "pod uid")?;
    let (node_name, node_uid) = match k8s.get("node") {
        None | Some(Value::Null) => (None, None),
        Some(n) => (
            Some(text(n.get("name"), "node name")?),
            Some(text(n.get("uid"), "node uid")?),
        ),
    };
    if let Some(sub) = claims.get("sub") {
        let want = format!("system:serviceaccount:{namespace}:{service_account}");
        if sub.as_str() != Some(want.as_str()) {
            return Err(ClaimsError::SubjectMismatch {
                sub: sub.to_string(),
                want,
            });
        }
    }
    Ok(PodIdentity {
        namespace,
        service_account,
        pod_name,
        pod_uid,
        node_name,
        node_uid,
    })
}

/// Why the service-account issuer keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The JWKS file cannot be read.
    #[error("reading jwks_file {}: {source}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The JWKS file is not a usable JWK Set.
    #[error("jwks_file {}: {source}", .path.display())]
    FileJwks {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: JwksError,
    },
    /// The discovery document could not be fetched.
    #[error("OIDC discovery: {0}")]
    Discovery(#[source] HttpsError),
    /// The discovery document lacks a member.
    #[error("OIDC discovery {url}: no \"{member}\"")]
    DiscoveryMember {
        /// The discovery URL.
        url: String,
        /// `issuer` or `jwks_uri`.
        member: &'static str,
    },
    /// The discovery document names another issuer.
    #[error("OIDC discovery {url}: the document's issuer {got:?} is not the configured oidc_discovery_url {configured:?}")]
    IssuerMismatch {
        /// The discovery URL.
        url: String,
        /// The document's `issuer`.
        got: String,
        /// The configured issuer URL.
        configured: String,
    },
    /// The JWKS could not be fetched.
    #[error("fetching the JWKS: {0}")]
    FetchJwks(#[source] HttpsError),
    /// The fetched JWKS is not a usable JWK Set.
    #[error("JWKS {uri}: {source}")]
    Jwks {
        /// The `jwks_uri`.
        uri: String,
        /// What is wrong with it.
        #[source]
        source: JwksError,
    },
}

/// Keys as last fetched, with the issuer they belong to (OIDC discovery's `issuer`).
#[derive(Debug, Clone)]
pub struct KeySet {
    /// The keys.
    pub keys: Arc<Vec<Jwk>>,
    /// The issuer the tokens must name in `iss`, when known.
    pub issuer: Option<String>,
}

/// Where a cluster's service-account issuer keys come from.
#[derive(Debug)]
pub enum Fetcher {
    /// A JWKS file (re-read after [`KEYS_MAX_AGE`] or an unknown `kid`).
    File(PathBuf),
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Oidc {
        /// The issuer URL.
        issuer_url: String,
        /// TLS client for the discovery and JWKS URLs.
        client: HttpsClient,
        /// `scheme://host:port` of the API server: a URL of that origin gets the API bearer
        /// token (in-cluster discovery needs it); any other origin gets none.
        api_origin: Option<String>,
        /// The API server bearer token file.
        api_token_file: PathBuf,
    },
}

/// `scheme://host:port` of `url` (the port made explicit), or `None` if it does not parse.
pub fn origin(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some(format!(
        "{scheme}://{}:{port}",
        uri.host()?.to_ascii_lowercase()
    ))
}

impl Fetcher {
    async fn fetch(&self) -> Result<KeySet, KeysError> {
        match self {
            Fetcher::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|source| KeysError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                let keys = parse_jwks(&bytes).map_err(|source| KeysError::FileJwks {
                    path: path.clone(),
                    source,
                })?;
                Ok(KeySet {
                    keys: Arc::new(keys),
                    issuer: None,
                })
            }
            Fetcher::Oidc {
                issuer_url,
                client,
                api_origin,
                api_token_file,
            } => {
                let bearer_for = |url: &str| -> Option<String> {
                    if api_origin.is_some() && origin(url) == *api_origin {
                        std::fs::read_to_string(api_token_file)
                            .ok()
                            .map(|t| t.trim().to_string())
                            .filter(|t| !t.is_empty())
                    } else {
                        None
                    }
                };
                let discovery_url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer_url.trim_end_matches('/')
                );
                let doc: Value = client
                    .get_json(&discovery_url, bearer_for(&discovery_url).as_deref())
                    .await
                    .map_err(KeysError::Discovery)?;
                let member = |member: &'static str| {
                    doc.get(member).and_then(Value::as_str).ok_or_else(|| {
                        KeysError::DiscoveryMember {
                            url: discovery_url.clone(),
                            member,
                        }
                    })
                };
                let issuer = member("issuer")?;
                if issuer.trim_end_matches('/') != issuer_url.trim_end_matches('/') {
                    return Err(KeysError::IssuerMismatch {
                        url: discovery_url.clone(),
                        got: issuer.to_string(),
                        configured: issuer_url.clone(),
                    });
                }
                let jwks_uri = member("jwks_uri")?;
                let body = client
                    .request(
                        hyper::Method::GET,
                        jwks_uri,
                        bearer_for(jwks_uri).as_deref(),
                        None,
                    )
                    .await
                    .map_err(KeysError::FetchJwks)?;
                let keys = parse_jwks(&body).map_err(|source| KeysError::Jwks {
                    uri: jwks_uri.to_string(),
                    source,
                })?;
                Ok(KeySet {
                    keys: Arc::new(keys),
                    issuer: Some(issuer.to_string()),
                })
            }
        }
    }
}

#[derive(Debug, Default)]
struct Cached {
    current: Option<KeySet>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

/// A [`Fetcher`] with a cache: keys are fetched on first use, again after [`KEYS_MAX_AGE`], and
/// again on an unknown `kid` at most every `min_refetch`.
#[derive(Debug)]
pub struct KeySource {
    fetcher: Fetcher,
    cached: tokio::sync::Mutex<Cached>,
    /// Least time between two fetches triggered by unknown key IDs ([`MIN_REFETCH`]).
    pub min_refetch: Duration,
}

impl KeySource {
    /// A source with nothing fetched yet.
    pub fn new(fetcher: Fetcher) -> Self {
        Self {
            fetcher,
            cached: tokio::sync::Mutex::new(Cached::default()),
            min_refetch: MIN_REFETCH,
        }
    }

    /// The keys to verify with: cached, or fetched if there are none yet or they are older than
    /// [`KEYS_MAX_AGE`] (a failed refresh keeps the old keys and logs a warning).
    pub async fn current(&self) -> Result<KeySet, KeysError> {
        let mut c = self.cached.lock().await;
        let stale = c.fetched_at.is_none_or(|t| t.elapsed() >= KEYS_MAX_AGE);
        let may_try = c
            .attempted_at
            .is_none_or(|t| t.elapsed() >= self.min_refetch);
        if let (Some(cur), false) = (&c.current, stale && may_try) {
            return Ok(cur.clone());
        }
        match self.fetch_into(&mut c).await {
            Ok(set) => Ok(set),
            Err(e) => match &c.current {
                Some(old) => {
                    tracing::warn!(error = %sigil::text::error_chain(&e), "k8s_psat: refreshing the service-account issuer keys failed; using the previous keys");
                    Ok(old.clone())
                }
                None => Err(e),
            },
        }
    }

    /// After an unknown `kid` with the keys `seen`: newer keys if another caller fetched them
    /// meanwhile, or a new fetch if the last one is at least `min_refetch` old; `Ok(None)` if
    /// neither (the token's key stays unknown for now).
    pub async fn refresh_for_unknown_kid(
        &self,
        seen: &KeySet,
    ) -> Result<Option<KeySet>, KeysError> {
        let mut c = self.cached.lock().await;
        if let Some(cur) = &c.current {
            if !Arc::ptr_eq(&cur.keys, &seen.keys) {
                return Ok(Some(cur.clone()));
            }
        }
        if c.attempted_at
            .is_some_and(|t| t.elapsed() < self.min_refetch)
        {
            return Ok(None);
        }
        self.fetch_into(&mut c).await.map(Some)
    }

    /// Tests: lets the next unknown `kid` fetch at once, as if `min_refetch` had passed.
    #[cfg(test)]
    pub(crate) async fn forget_last_attempt(&self) {
        self.cached.lock().await.attempted_at = None;
    }

    async fn fetch_into(&self, c: &mut Cached) -> Result<KeySet, KeysError> {
        c.attempted_at = Some(Instant::now());
        let set = self.fetcher.fetch().await?;
        tracing::debug!(
            keys = set.keys.len(),
            "k8s_psat: fetched the service-account issuer keys"
        );
        c.current = Some(set.clone());
        c.fetched_at = Some(Instant::now());
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;
    use sigil::jose::{EcCurve, B64URL};

    fn b64(b: &[u8]) -> String {
        B64URL.encode(b)
    }

    #[test]
    fn jwks_keeps_rsa_and_ec_signature_keys() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "r", "use": "sig", "alg": "RS256", "n": b64(&[0, 1, 2, 3]), "e": b64(&[1, 0, 1])},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[2; 66])},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": b64(&[1]), "e": b64(&[3])},
            {"kty": "oct", "kid": "hmac", "k": b64(b"secret")}
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            Jwk {
                kid: Some("r".into()),
                key: JwkPublicKey::Rsa {
                    n: vec![1, 2, 3],
                    e: vec![1, 0, 1]
                }
            }
        );
        assert!(
            matches!(&keys[1].key, JwkPublicKey::Ec { curve: EcCurve::P256, x, y } if x.len() == 32 && y.len() == 32)
        );
    }

    #[test]
    fn bad_jwks_are_refused_with_a_reason() {
        for (doc, want) in [
            ("nope", "not JSON"),
            ("{}", "no \"keys\""),
            (r#"{"keys": []}"#, "no RSA or EC"),
            (
                r#"{"keys": [{"kty": "RSA", "n": "AQAB"}]}"#,
                "key #0: \"e\"",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]}"#,
                "32 bytes",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "kid": 7, "n": "AQ", "e": "AQ"}]}"#,
                "kid",
            ),
        ] {
            let err = parse_jwks(doc.as_bytes()).expect_err(doc).to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.",
            "e30.!!.",
            "e30.e30.!!",
            "W10.e30.",
        ] {
            assert!(parse(t).is_err(), "{t:?}");
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(parse(&long).unwrap_err().to_string().contains("longer"));
        let p = parse("e30.e30.").unwrap();
        assert!(p.header.is_empty() && p.claims.is_empty());
    }

    #[test]
    fn unsupported_algorithms_and_crit_are_refused() {
        let keys = vec![Jwk {
            kid: None,
            key: JwkPublicKey::Rsa {
                n: vec![1],
                e: vec![3],
            },
        }];
        for (header, want) in [
            (
                json!({"alg": "none"}),
                VerifyError::UnsupportedAlg("none".into()),
            ),
            (
                json!({"alg": "HS256"}),
                VerifyError::UnsupportedAlg("HS256".into()),
            ),
            (json!({}), VerifyError::UnsupportedAlg(String::new())),
            (
                json!({"alg": "RS256", "crit": ["x"]}),
                VerifyError::Critical,
            ),
            (
                json!({"alg": "RS256", "kid": "other"}),
                VerifyError::UnknownKid("other".into()),
            ),
            (json!({"alg": "RS256"}), VerifyError::BadSignature),
        ] {
            let t = format!("{}.e30.AAAA", b64(header.to_string().as_bytes()));
            assert_eq!(verify(&parse(&t).unwrap(), &keys), Err(want), "{header}");
        }
    }

    #[test]
    fn a_key_of_another_type_than_the_algorithm_is_refused() {
        let rsa = Jwk {
            kid: Some("r".into()),
            key: JwkPublicKey::Rsa {
                n: vec![0xc5; 256],
                e: vec![1, 0, 1],
            },
        };
        let ec = Jwk {
            kid: Some("e".into()),
            key: JwkPublicKey::Ec {
                curve: EcCurve::P256,
                x: vec![1; 32],
                y: vec![2; 32],
            },
        };
        let keys = vec![rsa, ec];
        let token = |h: Value| format!("{}.e30.AAAA", b64(h.to_string().as_bytes()));
        for (alg, kid, kind) in [
            (Algorithm::Es256, "r", "RSA"),
            (Algorithm::Es384, "e", "EC P-256"),
            (Algorithm::Rs256, "e", "EC P-256"),
        ] {
            let t = token(json!({"alg": alg.name(), "kid": kid}));
            assert_eq!(
                verify(&parse(&t).unwrap(), &keys),
                Err(VerifyError::AlgKeyMismatch {
                    alg,
                    kid: kid.into(),
                    kind
                }),
                "{alg} with {kid}"
            );
        }
        // EdDSA is a JWT-SVID algorithm, not a service-account one.
        let t = token(json!({"alg": "EdDSA", "kid": "e"}));
        assert_eq!(
            verify(&parse(&t).unwrap(), &keys),
            Err(VerifyError::UnsupportedAlg("EdDSA".into()))
        );
        // Without a kid, keys of the wrong type are passed over: the signature does not verify.
        let t = token(json!({"alg": "ES384"}));
        assert_eq!(
            verify(&parse(&t).unwrap(), &keys),
            Err(VerifyError::BadSignature)
        );
        // An Ed25519 key in the JWKS is skipped, not used.
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[3; 32])},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])}
        ]});
        let parsed = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kid.as_deref(), Some("e"));
    }

    #[test]
    fn validity_window_and_audience() {
        let c = |v: Value| v.as_object().cloned().unwrap();
        let now = 1_700_000_000;
        assert!(check_validity(&c(json!({"exp": now + 10})), now, 0).is_ok());
        assert!(check_validity(&c(json!({"exp": now - 10})), now, 30).is_ok());
        let e = check_validity(&c(json!({"exp": now - 31})), now, 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
        let e = check_validity(&c(json!({})), now, 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"exp\""), "{e}");
        let e = check_validity(&c(json!({"exp": now + 99, "nbf": now + 31})), now, 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid before"), "{e}");
        assert!(check_validity(&c(json!({"exp": now + 99, "nbf": now + 29})), now, 30).is_ok());
        assert!(check_validity(&c(json!({"exp": "soon"})), now, 30).is_err());

        assert!(check_audience(&c(json!({"aud": "sigil-server"})), "sigil-server").is_ok());
        assert!(check_audience(&c(json!({"aud": ["a", "sigil-server"]})), "sigil-server").is_ok());
        let e = check_audience(&c(json!({"aud": ["api"]})), "sigil-server")
            .unwrap_err()
            .to_string();
        assert!(e.contains("audience") && e.contains("\"api\""), "{e}");
        assert!(check_audience(&c(json!({})), "sigil-server").is_err());
    }

    #[test]
    fn pod_identity_needs_a_pod_bound_token() {
        let c = |v: Value| v.as_object().cloned().unwrap();
        let good = json!({
            "sub": "system:serviceaccount:sigil:sigil-agent",
            "kubernetes.io": {
                "namespace": "sigil",
                "serviceaccount": {"name": "sigil-agent", "uid": "sa-uid"},
                "pod": {"name": "agent-x", "uid": "pod-uid"},
                "node": {"name": "node-1", "uid": "node-uid"}
            }
        });
        let id = pod_identity(&c(good.clone())).unwrap();
        assert_eq!(id.namespace, "sigil");
        assert_eq!(id.service_account, "sigil-agent");
        assert_eq!(id.pod_name, "agent-x");
        assert_eq!(id.pod_uid, "pod-uid");
        assert_eq!(id.node_name.as_deref(), Some("node-1"));
        assert_eq!(id.node_uid.as_deref(), Some("node-uid"));

        let mut no_node = good.clone();
        no_node["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("node");
        assert_eq!(pod_identity(&c(no_node)).unwrap().node_name, None);

        let mut no_pod = good.clone();
        no_pod["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("pod");
        assert!(pod_identity(&c(no_pod))
            .unwrap_err()
            .to_string()
            .contains("not bound to a pod"));

        let mut other_sub = good.clone();
        other_sub["sub"] = json!("system:serviceaccount:default:default");
        assert!(pod_identity(&c(other_sub))
            .unwrap_err()
            .to_string()
            .contains("subject"));

        // A legacy (secret-based) token has flat claims and no kubernetes.io object.
        let legacy = json!({"iss": "kubernetes/serviceaccount", "kubernetes.io/serviceaccount/namespace": "sigil"});
        assert!(pod_identity(&c(legacy))
            .unwrap_err()
            .to_string()
            .contains("kubernetes.io"));
    }

    #[test]
    fn origins_compare_with_explicit_ports() {
        assert_eq!(
            origin("https://Kubernetes.default.svc/.well-known/x").as_deref(),
            Some("https://kubernetes.default.svc:443")
        );
        assert_eq!(
            origin("https://10.0.0.1:6443/openid/v1/jwks").as_deref(),
            Some("https://10.0.0.1:6443")
        );
        assert_eq!(origin("not a url"), None);
    }

    // Paused time: the min_refetch window is crossed by advancing the clock, not by racing it.
    #[tokio::test(start_paused = true)]
    async fn file_source_rereads_on_unknown_kid_at_most_every_min_refetch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let jwks = |kid: &str| {
            json!({"keys": [{"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])}]})
                .to_string()
        };
        std::fs::write(&path, jwks("a")).unwrap();
        let mut src = KeySource::new(Fetcher::File(path.clone()));
        src.min_refetch = Duration::from_millis(300);
        let first = src.current().await.unwrap();
        assert_eq!(first.keys[0].kid.as_deref(), Some("a"));
        std::fs::write(&path, jwks("b")).unwrap();
        // Within min_refetch of the first read: no new read.
        assert!(src.refresh_for_unknown_kid(&first).await.unwrap().is_none());
        assert_eq!(
            src.current().await.unwrap().keys[0].kid.as_deref(),
            Some("a")
        );
        tokio::time::advance(Duration::from_millis(299)).await;
        assert!(
            src.refresh_for_unknown_kid(&first).await.unwrap().is_none(),
            "1 ms before min_refetch"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let second = src.refresh_for_unknown_kid(&first).await.unwrap().unwrap();
        assert_eq!(second.keys[0].kid.as_deref(), Some("b"));
        // A caller still holding the old set gets the new one without another read.
        std::fs::write(&path, "broken").unwrap();
        let again = src.refresh_for_unknown_kid(&first).await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&again.keys, &second.keys));
        // A missing file is an error only while nothing was ever read.
        let missing = KeySource::new(Fetcher::File(dir.path().join("missing.json")));
        assert!(missing
            .current()
            .await
            .unwrap_err()
            .to_string()
            .contains("jwks_file"));
    }
}
