//! `k8s_psat` node attestation: the agent sends the projected service-account token the kubelet
//! mounted into its pod; the server checks it and that the pod really runs on the node it claims.
//!
//! Payload: JSON `{"cluster": "<name>", "token": "<JWT>"}`; the cluster must be configured in
//! `[node_attestor.k8s_psat.clusters.<name>]` ([`ClusterConfig`]). The token is verified one of
//! three ways, per cluster:
//! - `jwks_file`: signature against the cluster's service-account issuer keys in a JWKS file
//!   (`kubectl get --raw /openid/v1/jwks`), re-read after [`token::KEYS_MAX_AGE`] or on an
//!   unknown `kid`;
//! - `oidc_discovery_url`: the same against keys found by OIDC discovery (the issuer's
//!   `/.well-known/openid-configuration`, then its `jwks_uri`), cached, re-fetched on an unknown
//!   `kid` at most every [`token::MIN_REFETCH`]; the token's `iss` must be that issuer;
//! - `use_token_review = true`: the API server's TokenReview, with the audience.
//!
//! Locally verified tokens must also be unexpired (`exp`, `nbf`, [`CLOCK_SKEW`] of leeway),
//! carry the configured `audience` (default `sigil-server`) and be bound to a pod (the
//! `kubernetes.io` claims). Then, for every method: the service account must be in
//! `service_account_allow_list`, and the API server must confirm the pod — it exists, its UID
//! is the token's, and its `spec.nodeName` is the node the token names (when it names one) —
//! and the node, whose UID (checked against the token's, when present) names the agent.
//!
//! Agent ID: `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>`, so a new agent pod on
//! the same node (a restart, a DaemonSet roll-out) is the same agent: re-attestation is allowed.
//! Node selectors (SPIRE's names): `k8s_psat:cluster:<c>`, `k8s_psat:agent_ns:<ns>`,
//! `k8s_psat:agent_sa:<sa>`, `k8s_psat:agent_pod_name:<p>`, `k8s_psat:agent_pod_uid:<u>`,
//! `k8s_psat:agent_pod_label:<k>:<v>`, `k8s_psat:agent_node_name:<n>`,
//! `k8s_psat:agent_node_uid:<u>`, `k8s_psat:agent_node_label:<k>:<v>`.
//!
//! The token is never logged. Refusals are [`AttestError::Denied`] with the reason; a payload
//! that is not `{cluster, token}` with a JWT-shaped token is [`AttestError::InvalidPayload`]; an
//! API server that cannot be reached is [`AttestError::Unavailable`].

pub mod token;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use sigil::config::ConfigError;
use sigil::https::{HttpsClient, HttpsError};
use sigil::{Selector, SelectorSet, TrustDomain};

use self::token::{Fetcher, KeySource, PodIdentity, VerifyError};
use super::{AttestError, AttestedNode, Challenger, NodeAttestor, AGENT_PATH_PREFIX};

/// The attestation type (and agent ID path segment, and selector type).
pub const TYPE: &str = "k8s_psat";
/// Default audience the token must carry.
pub const DEFAULT_AUDIENCE: &str = "sigil-server";
pub use crate::kube::{in_cluster_api_server_url, IN_CLUSTER_CA_FILE, IN_CLUSTER_TOKEN_FILE};
/// Leeway for `exp` and `nbf`, seconds.
pub const CLOCK_SKEW: i64 = 30;
/// Deadline of each API server / OIDC request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest payload accepted.
pub const MAX_PAYLOAD_LEN: usize = 32 * 1024;

/// `[node_attestor.k8s_psat]` as written in the server's TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8sPsat {
    /// `[node_attestor.k8s_psat.clusters.<name>]`.
    #[serde(default)]
    pub clusters: BTreeMap<String, FileCluster>,
}

/// `[node_attestor.k8s_psat.clusters.<name>]` as written (or given by `--k8s-psat-*` flags).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// Service accounts allowed to attest, `namespace:name`.
    pub service_account_allow_list: Option<Vec<String>>,
    /// Audience the token must carry [default: `sigil-server`].
    pub audience: Option<String>,
    /// Verify signatures with this JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// Verify signatures with keys found by OIDC discovery from this issuer URL.
    pub oidc_discovery_url: Option<String>,
    /// PEM roots for the OIDC discovery and JWKS URLs [default: `api_ca_file`].
    pub ca_file: Option<PathBuf>,
    /// Verify tokens with the API server's TokenReview.
    pub use_token_review: Option<bool>,
    /// API server URL [default in a pod: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`].
    pub api_server_url: Option<String>,
    /// Bearer token file for the API server [default: the pod's service-account token].
    pub api_token_file: Option<PathBuf>,
    /// PEM CA of the API server [default: the pod's service-account `ca.crt`].
    pub api_ca_file: Option<PathBuf>,
}

impl FileCluster {
    /// `self` with every key `over` sets replaced (flag > file). A verification method in
    /// `over` replaces the file's method, whichever it was.
    pub fn overridden_by(mut self, over: FileCluster) -> FileCluster {
        if over.jwks_file.is_some()
            || over.oidc_discovery_url.is_some()
            || over.use_token_review == Some(true)
        {
            self.jwks_file = None;
            self.oidc_discovery_url = None;
            self.use_token_review = None;
        }
        FileCluster {
            service_account_allow_list: over
                .service_account_allow_list
                .or(self.service_account_allow_list),
            audience: over.audience.or(self.audience),
            jwks_file: over.jwks_file.or(self.jwks_file),
            oidc_discovery_url: over.oidc_discovery_url.or(self.oidc_discovery_url),
            ca_file: over.ca_file.or(self.ca_file),
            use_token_review: over.use_token_review.or(self.use_token_review),
            api_server_url: over.api_server_url.or(self.api_server_url),
            api_token_file: over.api_token_file.or(self.api_token_file),
            api_ca_file: over.api_ca_file.or(self.api_ca_file),
        }
    }
}

/// How a cluster's tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Signature against a JWKS file.
    JwksFile(PathBuf),
    /// Signature against keys from OIDC discovery of `url`, fetched over TLS trusting `ca_file`.
    OidcDiscovery {
        /// The issuer URL.
        url: String,
        /// PEM roots for the discovery and JWKS URLs.
        ca_file: PathBuf,
    },
    /// The API server's TokenReview.
    TokenReview,
}

/// One cluster's resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster name (agent ID segment, `k8s_psat:cluster` selector).
    pub name: String,
    /// `(namespace, name)` of the service accounts allowed to attest.
    pub service_account_allow_list: Vec<(String, String)>,
    /// The audience tokens must carry.
    pub audience: String,
    /// How tokens are verified.
    pub verification: Verification,
    /// API server base URL.
    pub api_server_url: String,
    /// API server bearer token file (read for every call: it rotates).
    pub api_token_file: PathBuf,
    /// API server CA (PEM).
    pub api_ca_file: PathBuf,
}

/// A cluster name usable as a SPIFFE ID path segment and in selectors.
fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Resolves the `[node_attestor.k8s_psat.clusters.*]` tables: required keys, exactly one
/// verification method, defaults (`in_cluster_url` is [`in_cluster_api_server_url`], passed in
/// so tests do not depend on the environment). Errors name the key.
pub fn resolve_clusters(
    clusters: BTreeMap<String, FileCluster>,
    in_cluster_url: Option<&str>,
) -> Result<BTreeMap<String, ClusterConfig>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, c) in clusters {
        if !valid_cluster_name(&name) {
            return Err(ConfigError::invalid(
                "node_attestor.k8s_psat cluster name",
                name,
                "use letters, digits, '-', '_' and '.'",
            ));
        }
        let key = |k: &str| format!("node_attestor.k8s_psat.clusters.{name}.{k}");
        let allow = c.service_account_allow_list.unwrap_or_default();
        if allow.is_empty() {
            return Err(ConfigError::missing(
                key("service_account_allow_list"),
                "the service accounts allowed to attest, e.g. [\"sigil:sigil-agent\"]",
            ));
        }
        let mut service_account_allow_list = Vec::new();
        for sa in allow {
            match sa.split_once(':') {
                Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains(':') => {
                    service_account_allow_list.push((ns.to_string(), n.to_string()));
                }
                _ => {
                    return Err(ConfigError::invalid(
                        format!("{} entry", key("service_account_allow_list")),
                        sa,
                        "expected NAMESPACE:SERVICE_ACCOUNT, e.g. sigil:sigil-agent",
                    ))
                }
            }
        }
        let audience = c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.into());
        if audience.is_empty() {
            return Err(ConfigError::rule(key("audience"), "the audience is empty"));
        }
        let api = crate::kube::resolve_api_server(
            &format!("node_attestor.k8s_psat.clusters.{name}"),
            c.api_server_url.as_deref(),
            c.api_token_file,
            c.api_ca_file,
            in_cluster_url,
            "the server checks that the agent's pod runs on the node it claims",
        )?;
        let (api_server_url, api_token_file, api_ca_file) = (api.url, api.token_file, api.ca_file);
        let methods = [
            c.jwks_file.is_some(),
            c.oidc_discovery_url.is_some(),
            c.use_token_review == Some(true),
        ]
        .iter()
        .filter(|m| **m)
        .count();
        if methods != 1 {
            return Err(ConfigError::conflict(format!(
                "node_attestor.k8s_psat.clusters.{name}: set exactly one of jwks_file, oidc_discovery_url or use_token_review = true (found {methods})"
            )));
        }
        if c.ca_file.is_some() && c.oidc_discovery_url.is_none() {
            return Err(ConfigError::conflict(format!(
                "{} is only used with oidc_discovery_url (the API server's CA is api_ca_file)",
                key("ca_file")
            )));
        }
        let verification = if let Some(f) = c.jwks_file {
            if f.as_os_str().is_empty() {
                return Err(ConfigError::rule(key("jwks_file"), "the path is empty"));
            }
            Verification::JwksFile(f)
        } else if let Some(u) = c.oidc_discovery_url {
            Verification::OidcDiscovery {
                url: crate::kube::https_url(&key("oidc_discovery_url"), &u)?,
                ca_file: c.ca_file.unwrap_or_else(|| api_ca_file.clone()),
            }
        } else {
            Verification::TokenReview
        };
        out.insert(
            name.clone(),
            ClusterConfig {
                name,
                service_account_allow_list,
                audience,
                verification,
                api_server_url,
                api_token_file,
                api_ca_file,
            },
        );
    }
    Ok(out)
}

/// The agent's attestation payload.
#[derive(Debug, Deserialize)]
struct Payload {
    cluster: String,
    token: String,
}

/// The Kubernetes API server of one cluster.
#[derive(Debug)]
struct ApiServer {
    url: String,
    client: HttpsClient,
    token_file: PathBuf,
}

fn api_error(e: HttpsError) -> AttestError {
    let hint = match &e {
        HttpsError::Status { status, .. } if status.as_u16() == 401 => {
            " (check api_token_file: the API server does not accept that token)"
        }
        HttpsError::Status { status, .. } if status.as_u16() == 403 => {
            " (the server's service account needs RBAC to get pods and nodes and to create tokenreviews)"
        }
        _ => "",
    };
    AttestError::Unavailable(format!("Kubernetes API server: {e}{hint}"))
}

impl ApiServer {
    fn bearer(&self) -> Result<String, AttestError> {
        let t = std::fs::read_to_string(&self.token_file).map_err(|e| {
            AttestError::Unavailable(format!(
                "reading api_token_file {}: {e}",
                self.token_file.display()
            ))
        })?;
        Ok(t.trim().to_string())
    }

    /// GETs `path`; `None` for 404.
    async fn get(&self, path: &str) -> Result<Option<Value>, AttestError> {
        let bearer = self.bearer()?;
        match self
            .client
            .get_json(&format!("{}{path}", self.url), Some(&bearer))
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(HttpsError::Status { status, .. }) if status.as_u16() == 404 => Ok(None),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, AttestError> {
        let bearer = self.bearer()?;
        self.client
            .post_json(&format!("{}{path}", self.url), Some(&bearer), body)
            .await
            .map_err(api_error)
    }
}

/// One configured cluster, ready to attest.
#[derive(Debug)]
struct Cluster {
    cfg: ClusterConfig,
    allow: BTreeSet<(String, String)>,
    /// `None`: TokenReview.
    keys: Option<KeySource>,
    api: ApiServer,
}

/// Attests agents by projected service-account token.
#[derive(Debug)]
pub struct K8sPsatAttestor {
    trust_domain: TrustDomain,
    clusters: BTreeMap<String, Cluster>,
}

/// Why the k8s_psat attestor could not be set up from its (valid) configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No `[node_attestor.k8s_psat.clusters.*]` table.
    #[error("k8s_psat: no cluster is configured")]
    NoCluster,
    /// A configured file could not be read.
    #[error("reading {key} {}: {source}", .path.display())]
    Read {
        /// The config key that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file holds no usable certificates.
    #[error("{key} {}: {source}", .path.display())]
    Roots {
        /// The config key that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: HttpsError,
    },
    /// A JWKS file is not a usable key set.
    #[error("{key} {}: {source}", .path.display())]
    Jwks {
        /// The config key that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: token::JwksError,
    },
}

fn read_file(key: String, path: &Path) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|source| SetupError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn read_roots(key: String, path: &Path) -> Result<HttpsClient, SetupError> {
    let pem = read_file(key.clone(), path)?;
    HttpsClient::from_pem(&String::from_utf8_lossy(&pem), HTTP_TIMEOUT).map_err(|source| {
        SetupError::Roots {
            key,
            path: path.to_path_buf(),
            source,
        }
    })
}

impl K8sPsatAttestor {
    /// An attestor for `clusters`, naming agents in `trust_domain`. Reads the CA files, checks
    /// the API token file and a JWKS file now, so a wrong path fails the server's start-up;
    /// OIDC keys are fetched on first use.
    pub fn new(
        trust_domain: TrustDomain,
        clusters: &BTreeMap<String, ClusterConfig>,
    ) -> Result<Self, SetupError> {
        if clusters.is_empty() {
            return Err(SetupError::NoCluster);
        }
        let mut out = BTreeMap::new();
        for (name, cfg) in clusters {
            let key = |k: &str| format!("node_attestor.k8s_psat.clusters.{name}.{k}");
            let client = read_roots(key("api_ca_file"), &cfg.api_ca_file)?;
            std::fs::metadata(&cfg.api_token_file).map_err(|source| SetupError::Read {
                key: key("api_token_file"),
                path: cfg.api_token_file.clone(),
                source,
            })?;
            let api_origin = token::origin(&cfg.api_server_url);
            let keys = match &cfg.verification {
                Verification::JwksFile(path) => {
                    let bytes = read_file(key("jwks_file"), path)?;
                    token::parse_jwks(&bytes).map_err(|source| SetupError::Jwks {
                        key: key("jwks_file"),
                        path: path.clone(),
                        source,
                    })?;
                    Some(KeySource::new(Fetcher::File(path.clone())))
                }
                Verification::OidcDiscovery { url, ca_file } => {
                    Some(KeySource::new(Fetcher::Oidc {
                        issuer_url: url.clone(),
                        client: read_roots(key("ca_file"), ca_file)?,
                        api_origin,
                        api_token_file: cfg.api_token_file.clone(),
                    }))
                }
                Verification::TokenReview => None,
            };
            out.insert(
                name.clone(),
                Cluster {
                    allow: cfg.service_account_allow_list.iter().cloned().collect(),
                    keys,
                    api: ApiServer {
                        url: cfg.api_server_url.clone(),
                        client,
                        token_file: cfg.api_token_file.clone(),
                    },
                    cfg: cfg.clone(),
                },
            );
        }
        Ok(Self {
            trust_domain,
            clusters: out,
        })
    }

    /// The configured cluster names.
    pub fn cluster_names(&self) -> Vec<&str> {
        self.clusters.keys().map(String::as_str).collect()
    }
}

use sigil::clock::now_unix;

/// A token that is not a JWT at all: the payload is unusable.
fn malformed(e: sigil::jose::JwsError) -> AttestError {
    AttestError::InvalidPayload(format!("the service-account token is not a JWT: {e}"))
}

fn refused(reason: impl std::fmt::Display) -> AttestError {
    AttestError::Denied(format!("k8s_psat: service-account token refused: {reason}"))
}

impl Cluster {
    /// Verifies the token with the cluster's keys and reads who it was issued to.
    async fn verify_locally(
        &self,
        keys: &KeySource,
        jwt: &str,
    ) -> Result<PodIdentity, AttestError> {
        let jws = token::parse(jwt).map_err(malformed)?;
        let mut set = keys.current().await.map_err(|e| {
            AttestError::Unavailable(format!(
                "k8s_psat cluster {:?}: no service-account issuer keys: {e}",
                self.cfg.name
            ))
        })?;
        match token::verify(&jws, &set.keys) {
            Ok(()) => {}
            Err(VerifyError::UnknownKid(kid)) => match keys.refresh_for_unknown_kid(&set).await {
                Ok(Some(newer)) => {
                    token::verify(&jws, &newer.keys).map_err(refused)?;
                    set = newer;
                }
                Ok(None) => return Err(refused(VerifyError::UnknownKid(kid))),
                Err(e) => {
                    tracing::warn!(cluster = %self.cfg.name, error = %e, "k8s_psat: re-fetching the service-account issuer keys failed");
                    return Err(refused(format!(
                        "{} (re-fetching the keys failed: {})",
                        VerifyError::UnknownKid(kid),
                        sigil::text::error_chain(&e)
                    )));
                }
            },
            Err(e) => return Err(refused(e)),
        }
        if let Some(issuer) = &set.issuer {
            let iss = jws.claims.get("iss").and_then(Value::as_str);
            if iss != Some(issuer.as_str()) {
                return Err(refused(format!(
                    "the token's issuer {iss:?} is not the cluster's issuer {issuer:?}"
                )));
            }
        }
        token::check_validity(&jws.claims, now_unix(), CLOCK_SKEW).map_err(refused)?;
        token::check_audience(&jws.claims, &self.cfg.audience).map_err(refused)?;
        token::pod_identity(&jws.claims).map_err(refused)
    }

    /// Asks the API server's TokenReview who the token belongs to.
    async fn token_review(&self, jwt: &str) -> Result<PodIdentity, AttestError> {
        token::parse(jwt).map_err(malformed)?;
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": jwt, "audiences": [self.cfg.audience]}
        });
        let answer = self
            .api
            .post("/apis/authentication.k8s.io/v1/tokenreviews", &review)
            .await?;
        let status = &answer["status"];
        if status["authenticated"].as_bool() != Some(true) {
            let why = status["error"].as_str().unwrap_or("no reason given");
            return Err(refused(format!(
                "the API server's TokenReview did not authenticate it: {why}"
            )));
        }
        let confirmed = status["audiences"].as_array().is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str() == Some(self.cfg.audience.as_str()))
        });
        if !confirmed {
            return Err(refused(format!(
                "the API server's TokenReview did not confirm the audience {:?}",
                self.cfg.audience
            )));
        }
        let user = &status["user"];
        let username = user["username"].as_str().unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
            .ok_or_else(|| {
                refused(format!(
                    "it belongs to {username:?}, not to a service account"
                ))
            })?;
        let extra = |k: &str| -> Option<String> {
            user["extra"][format!("authentication.kubernetes.io/{k}")]
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let (Some(pod_name), Some(pod_uid)) = (extra("pod-name"), extra("pod-uid")) else {
            return Err(refused(
                "it is not bound to a pod (TokenReview names no pod): use a projected service-account token",
            ));
        };
        Ok(PodIdentity {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod_name,
            pod_uid,
            node_name: extra("node-name"),
            node_uid: extra("node-uid"),
        })
    }
}

/// A Kubernetes object name safe to put in a URL path (DNS subdomain characters).
fn check_name(what: &str, name: &str) -> Result<(), AttestError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(refused(format!(
            "its {what} {name:?} is not a Kubernetes name"
        )))
    }
}

fn labels(obj: &Value) -> Vec<(String, String)> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[async_trait]
impl NodeAttestor for K8sPsatAttestor {
    fn attestation_type(&self) -> &'static str {
        TYPE
    }

    async fn attest(
        &self,
        payload: &[u8],
        _challenger: &mut dyn Challenger,
    ) -> Result<AttestedNode, AttestError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(AttestError::InvalidPayload(format!(
                "the k8s_psat payload is larger than {MAX_PAYLOAD_LEN} bytes"
            )));
        }
        let p: Payload = serde_json::from_slice(payload).map_err(|e| {
            AttestError::InvalidPayload(format!(
                "the k8s_psat payload is not JSON {{\"cluster\", \"token\"}}: {e}"
            ))
        })?;
        if p.cluster.is_empty() || p.token.is_empty() {
            return Err(AttestError::InvalidPayload(
                "the k8s_psat payload needs a non-empty cluster and token".into(),
            ));
        }
        let Some(cluster) = self.clusters.get(&p.cluster) else {
            return Err(AttestError::Denied(format!(
                "k8s_psat: cluster {:?} is not configured on this server (node_attestor.k8s_psat.clusters)",
                p.cluster
            )));
        };
        let result = self.attest_in(cluster, &p.token).await;
        if let Err(e) = &result {
            tracing::info!(cluster = %p.cluster, error = %e, "k8s_psat attestation refused");
        }
        result
    }
}

impl K8sPsatAttestor {
    async fn attest_in(&self, cluster: &Cluster, jwt: &str) -> Result<AttestedNode, AttestError> {
        let id = match &cluster.keys {
            Some(keys) => cluster.verify_locally(keys, jwt).await?,
            None => cluster.token_review(jwt).await?,
        };
        let c = &cluster.cfg.name;
        if !cluster
            .allow
            .contains(&(id.namespace.clone(), id.service_account.clone()))
        {
            return Err(AttestError::Denied(format!(
                "k8s_psat: service account {}:{} is not allowed to attest in cluster {c:?} (service_account_allow_list)",
                id.namespace, id.service_account
            )));
        }
        check_name("namespace", &id.namespace)?;
        check_name("pod name", &id.pod_name)?;
        if let Some(n) = &id.node_name {
            check_name("node name", n)?;
        }

        // The pod must exist with the token's UID, on the node the token names.
        let (ns, pod_name) = (&id.namespace, &id.pod_name);
        let pod = cluster
            .api
            .get(&format!("/api/v1/namespaces/{ns}/pods/{pod_name}"))
            .await?
            .ok_or_else(|| {
                AttestError::Denied(format!(
                    "k8s_psat: pod {ns}/{pod_name} named by the token does not exist in cluster {c:?} (deleted?)"
                ))
            })?;
        let pod_uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        if pod_uid != id.pod_uid {
            return Err(AttestError::Denied(format!(
                "k8s_psat: pod {ns}/{pod_name} has UID {pod_uid:?} but the token was issued for pod UID {:?} (a stale token of a deleted pod?)",
                id.pod_uid
            )));
        }
        let node_name = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        if node_name.is_empty() {
            return Err(AttestError::Denied(format!(
                "k8s_psat: pod {ns}/{pod_name} is not scheduled on a node"
            )));
        }
        if let Some(claimed) = &id.node_name {
            if claimed != node_name {
                return Err(AttestError::Denied(format!(
                    "k8s_psat: the token claims node {claimed:?} but pod {ns}/{pod_name} runs on node {node_name:?}"
                )));
            }
        }
        check_name("node name", node_name)?;
        let node = cluster
            .api
            .get(&format!("/api/v1/nodes/{node_name}"))
            .await?
            .ok_or_else(|| {
                AttestError::Denied(format!(
                    "k8s_psat: node {node_name:?} of pod {ns}/{pod_name} does not exist in cluster {c:?}"
                ))
            })?;
        let node_uid = node["metadata"]["uid"].as_str().unwrap_or_default();
        if node_uid.is_empty() {
            return Err(AttestError::Unavailable(format!(
                "Kubernetes API server: node {node_name:?} has no metadata.uid"
            )));
        }
        if let Some(claimed) = &id.node_uid {
            if claimed != node_uid {
                return Err(AttestError::Denied(format!(
                    "k8s_psat: node {node_name:?} has UID {node_uid:?} but the token claims node UID {claimed:?} (the node was re-created?)"
                )));
            }
        }

        let agent_id = self
            .trust_domain
            .id(&format!("{AGENT_PATH_PREFIX}{TYPE}/{c}/{node_uid}"))
            .map_err(|e| {
                AttestError::Denied(format!(
                    "k8s_psat: node UID {node_uid:?} cannot name an agent: {e}"
                ))
            })?;
        let mut values = vec![
            format!("cluster:{c}"),
            format!("agent_ns:{ns}"),
            format!("agent_sa:{}", id.service_account),
            format!("agent_pod_name:{pod_name}"),
            format!("agent_pod_uid:{pod_uid}"),
            format!("agent_node_name:{node_name}"),
            format!("agent_node_uid:{node_uid}"),
        ];
        values.extend(
            labels(&pod)
                .into_iter()
                .map(|(k, v)| format!("agent_pod_label:{k}:{v}")),
        );
        values.extend(
            labels(&node)
                .into_iter()
                .map(|(k, v)| format!("agent_node_label:{k}:{v}")),
        );
        let mut selectors = SelectorSet::new();
        for v in values {
            match Selector::new(TYPE, &v) {
                Ok(s) => {
                    selectors.insert(s);
                }
                Err(e) => {
                    tracing::info!(error = %e, "k8s_psat: skipping an unusable selector value")
                }
            }
        }
        Ok(AttestedNode {
            agent_id,
            selectors,
            node_alias: None,
        })
    }
}

#[cfg(test)]
use sigil_testkit::fake_k8s;

#[cfg(test)]
mod tests;
