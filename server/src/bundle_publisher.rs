//! Publishes the server's trust bundle where agents read it at start: a Kubernetes ConfigMap
//! (SPIRE's `k8sbundle` notifier), so nobody has to copy `sigil-server bundle show` into the
//! cluster by hand.
//!
//! Configured by `[bundle_publisher.k8s_configmap]` (off unless present): the ConfigMap
//! `namespace` (default: the pod's own, else `sigil`), `name` (`sigil-bundle`) and `key`
//! (`bundle.pem`), and the API server (`api_server_url`, `api_token_file`, `api_ca_file`, with
//! the same in-cluster defaults as k8s_psat: [`crate::kube`]).
//!
//! [`ConfigMapPublisher::run`] writes the PEM roots ([`Bundle::to_pem`], exactly what
//! `bundle show` prints) into `data[key]` at start and whenever the bundle changes — a change is
//! announced on [`SyncEvents`](crate::sync::SyncEvents) (`bundle_sequence`) after the new bundle
//! is in place in its [`BundleSource`] — and re-checks it every [`RESYNC_EVERY`], so a ConfigMap
//! deleted or edited by hand is put back. Each write ([`ConfigMapPublisher::publish`]) GETs the
//! ConfigMap; if it is missing it is POSTed (created); if its `data[key]` differs it is PATCHed
//! with a JSON merge patch carrying the `resourceVersion` read (other keys and labels are left
//! alone; a concurrent change answers 409 Conflict and the write starts over from the GET).
//!
//! Failures (the API server not reachable yet at pod start, RBAC, a bad token) are retried with
//! exponential back-off ([`RETRY_FIRST`] up to [`RETRY_MAX`]) and logged at warn with what to
//! check; they are never fatal. Each successful publication of new content is logged once at
//! info (namespace, name, key, number of roots). RBAC needed in the ConfigMap's namespace:
//! `get`, `patch` (these two can be limited to the ConfigMap's name) and `create` (which cannot).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use sigil::bundle::Bundle;
use sigil::config::ConfigError;
use sigil::https::{HttpsClient, HttpsError, CONTENT_TYPE_JSON, CONTENT_TYPE_MERGE_PATCH};
use tokio::sync::{watch, RwLock};
use tokio::time::Instant;

use crate::kube::{ApiServerAccess, InCluster};
use crate::sync::SyncSubscriber;

/// Namespace of the ConfigMap outside a pod (in a pod: the pod's namespace).
pub const DEFAULT_NAMESPACE: &str = "sigil";
/// Default ConfigMap name (what the agent DaemonSet mounts).
pub const DEFAULT_NAME: &str = "sigil-bundle";
/// Default key in the ConfigMap's `data` (the file name in the mounted volume).
pub const DEFAULT_KEY: &str = "bundle.pem";
/// Deadline of each API server request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failed write; doubled after each further failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a published bundle is checked again (and rewritten if the ConfigMap drifted).
pub const RESYNC_EVERY: Duration = Duration::from_secs(600);
/// Conflicts (409) in a row within one write before it counts as failed.
pub const CONFLICT_RETRIES: usize = 5;
/// The config section, for messages.
pub const SECTION: &str = "bundle_publisher.k8s_configmap";
/// Label put on a ConfigMap the publisher creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "sigil-server");

/// `[bundle_publisher]` as written in the server's TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundlePublisher {
    /// `[bundle_publisher.k8s_configmap]`: unset means the bundle is not published there.
    pub k8s_configmap: Option<FileK8sConfigMap>,
}

/// `[bundle_publisher.k8s_configmap]` as written (or given by `--bundle-publisher-k8s-configmap-*`
/// flags).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8sConfigMap {
    /// Namespace of the ConfigMap [default: the pod's namespace, else `sigil`].
    pub namespace: Option<String>,
    /// ConfigMap name [default: `sigil-bundle`].
    pub name: Option<String>,
    /// Key in the ConfigMap's `data` [default: `bundle.pem`].
    pub key: Option<String>,
    /// API server URL [default in a pod: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`].
    pub api_server_url: Option<String>,
    /// Bearer token file for the API server [default: the pod's service-account token].
    pub api_token_file: Option<PathBuf>,
    /// PEM CA of the API server [default: the pod's service-account `ca.crt`].
    pub api_ca_file: Option<PathBuf>,
}

impl FileK8sConfigMap {
    /// `self` with every key `over` sets replaced (flag > file).
    pub fn overridden_by(self, over: FileK8sConfigMap) -> FileK8sConfigMap {
        FileK8sConfigMap {
            namespace: over.namespace.or(self.namespace),
            name: over.name.or(self.name),
            key: over.key.or(self.key),
            api_server_url: over.api_server_url.or(self.api_server_url),
            api_token_file: over.api_token_file.or(self.api_token_file),
            api_ca_file: over.api_ca_file.or(self.api_ca_file),
        }
    }
}

/// Where the bundle is published, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfigMapConfig {
    /// Namespace of the ConfigMap.
    pub namespace: String,
    /// ConfigMap name.
    pub name: String,
    /// Key in `data`.
    pub key: String,
    /// The API server.
    pub api: ApiServerAccess,
}

/// All bundle publishers, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundlePublisherConfig {
    /// The ConfigMap publisher; `None`: off.
    pub k8s_configmap: Option<K8sConfigMapConfig>,
}

/// A DNS-1123 label (a namespace name): lowercase letters, digits and `-`, at most 63.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (a ConfigMap name): dot-separated labels, at most 253.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// A ConfigMap key: letters, digits, `-`, `_`, `.`, at most 253, not `.` or `..`.
fn configmap_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Resolves `[bundle_publisher.k8s_configmap]` (`None`: the publisher is off): defaults from
/// `in_cluster`, names checked. Errors name the key.
pub fn resolve_k8s_configmap(
    file: Option<FileK8sConfigMap>,
    in_cluster: &InCluster,
) -> Result<Option<K8sConfigMapConfig>, ConfigError> {
    let Some(f) = file else {
        return Ok(None);
    };
    let namespace = f
        .namespace
        .or_else(|| in_cluster.namespace.clone())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    if !dns_label(&namespace) {
        return Err(ConfigError::invalid(
            format!("{SECTION}.namespace"),
            namespace,
            "a namespace name is lowercase letters, digits and '-' (at most 63)",
        ));
    }
    let name = f.name.unwrap_or_else(|| DEFAULT_NAME.into());
    if !dns_subdomain(&name) {
        return Err(ConfigError::invalid(
            format!("{SECTION}.name"),
            name,
            "a ConfigMap name is lowercase letters, digits, '-' and '.' (at most 253)",
        ));
    }
    let key = f.key.unwrap_or_else(|| DEFAULT_KEY.into());
    if !configmap_key(&key) {
        return Err(ConfigError::invalid(
            format!("{SECTION}.key"),
            key,
            "a ConfigMap key is letters, digits, '-', '_' and '.' (at most 253)",
        ));
    }
    let api = crate::kube::resolve_api_server(
        SECTION,
        f.api_server_url.as_deref(),
        f.api_token_file,
        f.api_ca_file,
        in_cluster.api_server_url.as_deref(),
        "the server writes its trust bundle into a ConfigMap through it",
    )?;
    Ok(Some(K8sConfigMapConfig {
        namespace,
        name,
        key,
        api,
    }))
}

/// Where the publisher reads the current bundle.
#[async_trait]
pub trait BundleSource: Send + Sync {
    /// The current trust bundle.
    async fn bundle(&self) -> Bundle;
}

#[async_trait]
impl BundleSource for RwLock<Bundle> {
    async fn bundle(&self) -> Bundle {
        self.read().await.clone()
    }
}

#[async_trait]
impl BundleSource for crate::api::admin::AdminState {
    async fn bundle(&self) -> Bundle {
        self.bundle.read().await.clone()
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The ConfigMap did not exist and was created.
    Created,
    /// The ConfigMap's key was changed.
    Updated,
    /// The ConfigMap already held the bundle.
    Unchanged,
}

impl Outcome {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A credentials file could not be read or used.
    #[error("{key} {path}: {reason}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The API server answered with an error, or could not be reached.
    #[error("Kubernetes API server: {0}")]
    Api(#[from] HttpsError),
    /// Every try within one write met a concurrent change.
    #[error("the ConfigMap changed concurrently {0} times in a row (409 Conflict)")]
    Conflicts(usize),
}

/// Publishes the bundle into one ConfigMap.
#[derive(Debug, Clone)]
pub struct ConfigMapPublisher {
    cfg: K8sConfigMapConfig,
    timing: Timing,
}

/// The publisher's delays (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// First retry delay after a failure ([`RETRY_FIRST`]).
    pub retry_first: Duration,
    /// Longest retry delay ([`RETRY_MAX`]).
    pub retry_max: Duration,
    /// Re-check after a success ([`RESYNC_EVERY`]).
    pub resync: Duration,
    /// Deadline of each request ([`HTTP_TIMEOUT`]).
    pub http_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            retry_first: RETRY_FIRST,
            retry_max: RETRY_MAX,
            resync: RESYNC_EVERY,
            http_timeout: HTTP_TIMEOUT,
        }
    }
}

impl ConfigMapPublisher {
    /// A publisher for `cfg` with the default [`Timing`].
    pub fn new(cfg: K8sConfigMapConfig) -> Self {
        Self {
            cfg,
            timing: Timing::default(),
        }
    }

    /// The same with other delays.
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &K8sConfigMapConfig {
        &self.cfg
    }

    fn collection_url(&self) -> String {
        format!(
            "{}/api/v1/namespaces/{}/configmaps",
            self.cfg.api.url, self.cfg.namespace
        )
    }

    fn object_url(&self) -> String {
        format!("{}/{}", self.collection_url(), self.cfg.name)
    }

    /// A client for the API server and the bearer token, both read now: the token rotates, and
    /// so, rarely, does the CA.
    fn connect(&self) -> Result<(HttpsClient, String), PublishError> {
        let file_error = |key, path: &PathBuf, reason: String| PublishError::File {
            key,
            path: path.clone(),
            reason,
        };
        let ca = &self.cfg.api.ca_file;
        let pem = std::fs::read_to_string(ca)
            .map_err(|e| file_error("api_ca_file", ca, e.to_string()))?;
        let client = HttpsClient::from_pem(&pem, self.timing.http_timeout)
            .map_err(|e| file_error("api_ca_file", ca, e.to_string()))?;
        let tf = &self.cfg.api.token_file;
        let token = std::fs::read_to_string(tf)
            .map_err(|e| file_error("api_token_file", tf, e.to_string()))?
            .trim()
            .to_string();
        if token.is_empty() {
            return Err(file_error("api_token_file", tf, "the file is empty".into()));
        }
        Ok((client, token))
    }

    /// Makes the ConfigMap's `data[key]` hold `pem`: one GET, then a create or a patch when
    /// needed (starting over from the GET on a 409 Conflict, up to [`CONFLICT_RETRIES`] times).
    pub async fn publish(&self, pem: &str) -> Result<Outcome, PublishError> {
        let (client, token) = self.connect()?;
        let bearer = Some(token.as_str());
        let (url, key) = (self.object_url(), self.cfg.key.as_str());
        for _ in 0..CONFLICT_RETRIES {
            let current = match client.get_json::<Value>(&url, bearer).await {
                Ok(cm) => Some(cm),
                Err(e) if e.status().map(|s| s.as_u16()) == Some(404) => None,
                Err(e) => return Err(e.into()),
            };
            let (method, content_type, body, outcome) = match current {
                None => (
                    Method::POST,
                    CONTENT_TYPE_JSON,
                    json!({
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": self.cfg.name,
                            "namespace": self.cfg.namespace,
                            "labels": {MANAGED_BY.0: MANAGED_BY.1},
                        },
                        "data": {key: pem},
                    }),
                    Outcome::Created,
                ),
                Some(cm) => {
                    let in_binary = !cm["binaryData"][key].is_null();
                    if cm["data"][key].as_str() == Some(pem) && !in_binary {
                        return Ok(Outcome::Unchanged);
                    }
                    // A merge patch of our key only; the resourceVersion makes it conditional
                    // on the object being what was read (409 Conflict otherwise).
                    let mut patch = json!({"data": {key: pem}});
                    if let Some(rv) = cm["metadata"]["resourceVersion"].as_str() {
                        patch["metadata"] = json!({"resourceVersion": rv});
                    }
                    if in_binary {
                        // A key may not be in both data and binaryData.
                        patch["binaryData"] = json!({key: null});
                    }
                    (
                        Method::PATCH,
                        CONTENT_TYPE_MERGE_PATCH,
                        patch,
                        Outcome::Updated,
                    )
                }
            };
            let target = if method == Method::POST {
                self.collection_url()
            } else {
                url.clone()
            };
            match client
                .send_json::<_, Value>(method, &target, bearer, content_type, &body)
                .await
            {
                Ok(_) => return Ok(outcome),
                // Created or changed by someone else since the GET: read it again.
                Err(e) if e.status().map(|s| s.as_u16()) == Some(409) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(PublishError::Conflicts(CONFLICT_RETRIES))
    }

    /// What an operator should check after `e`, if there is a likely cause.
    pub fn hint(&self, e: &PublishError) -> Option<String> {
        let (ns, name) = (&self.cfg.namespace, &self.cfg.name);
        let https = match e {
            PublishError::File { key, .. } => {
                return Some(format!("{SECTION}.{key}: the file must exist and be readable (in a pod: automountServiceAccountToken)"))
            }
            PublishError::Conflicts(_) => return None,
            PublishError::Api(h) => h,
        };
        match (https, https.status().map(|s| s.as_u16())) {
            (_, Some(401)) => Some(format!(
                "{SECTION}.api_token_file {}: the API server does not accept that token",
                self.cfg.api.token_file.display()
            )),
            (_, Some(403)) => Some(format!(
                "RBAC: the server's service account needs get, create and patch on configmaps in namespace {ns} (a Role and RoleBinding there; get and patch can be limited to resourceNames [\"{name}\"], create cannot)"
            )),
            (_, Some(404)) => Some(format!(
                "does namespace {ns} exist? ({SECTION}.namespace)"
            )),
            (_, Some(422)) => Some(format!(
                "the API server refused the change: if ConfigMap {ns}/{name} is immutable, delete it and the server re-creates it"
            )),
            (HttpsError::Roots(_), _) => Some(format!(
                "{SECTION}.api_ca_file {}: it must hold the API server's CA (PEM)",
                self.cfg.api.ca_file.display()
            )),
            (HttpsError::Transport { .. } | HttpsError::Timeout { .. }, _) => Some(format!(
                "is the API server at {} reachable? (at pod start it may not be yet; {SECTION}.api_server_url; on a TLS error, {SECTION}.api_ca_file)",
                self.cfg.api.url
            )),
            _ => None,
        }
    }

    /// Publishes `source`'s bundle now, again whenever `events` announces a new bundle
    /// sequence, and every [`Timing::resync`]; retries failures with back-off. Returns when
    /// `shutdown` turns true (or its sender is gone).
    pub async fn run(
        self,
        source: Arc<dyn BundleSource>,
        events: SyncSubscriber,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (ns, name, key) = (&self.cfg.namespace, &self.cfg.name, &self.cfg.key);
        tracing::info!(
            namespace = %ns,
            configmap = %name,
            key = %key,
            api_server = %self.cfg.api.url,
            "bundle publisher: keeping the trust bundle in a Kubernetes ConfigMap"
        );
        let mut events = Some(events);
        // The PEM last confirmed in the ConfigMap, and the one last tried.
        let mut published: Option<String> = None;
        let mut tried: Option<String> = None;
        let mut seen_sequence: Option<u64> = None;
        let mut next = Instant::now();
        let mut retry = self.timing.retry_first;
        let mut failures = 0u32;
        loop {
            let sequence = events.as_mut().map(|e| e.take().bundle_sequence);
            let due = Instant::now() >= next;
            if due || sequence != seen_sequence {
                seen_sequence = sequence;
                let bundle = source.bundle().await;
                let pem = bundle.to_pem();
                if pem.is_empty() {
                    tracing::warn!(namespace = %ns, configmap = %name, "bundle publisher: the trust bundle has no X.509 roots; nothing to publish");
                    next = Instant::now() + self.timing.resync;
                } else if due || tried.as_deref() != Some(pem.as_str()) {
                    let result = tokio::select! {
                        r = self.publish(&pem) => r,
                        _ = shutdown.wait_for(|s| *s) => return,
                    };
                    match result {
                        Ok(outcome) => {
                            let roots = bundle.x509_authorities.len();
                            if published.as_deref() != Some(pem.as_str())
                                || outcome != Outcome::Unchanged
                            {
                                tracing::info!(
                                    namespace = %ns,
                                    configmap = %name,
                                    key = %key,
                                    roots,
                                    bundle_sequence = bundle.sequence_number,
                                    outcome = %outcome.as_str(),
                                    "trust bundle published to the ConfigMap"
                                );
                            } else {
                                tracing::debug!(namespace = %ns, configmap = %name, "the ConfigMap still holds the trust bundle");
                            }
                            published = Some(pem.clone());
                            retry = self.timing.retry_first;
                            failures = 0;
                            next = Instant::now() + self.timing.resync;
                        }
                        Err(e) => {
                            failures += 1;
                            let check = self.hint(&e);
                            tracing::warn!(
                                namespace = %ns,
                                configmap = %name,
                                key = %key,
                                error = %e,
                                check = check.as_ref().map(tracing::field::display),
                                failures,
                                retry_in = ?retry,
                                "publishing the trust bundle to the ConfigMap failed; will retry"
                            );
                            next = Instant::now() + retry;
                            retry = (retry * 2).min(self.timing.retry_max);
                        }
                    }
                    tried = Some(pem);
                }
            }
            tokio::select! {
                alive = async {
                    match events.as_mut() {
                        Some(e) => e.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if !alive {
                        // No more change announcements; the resync timer goes on.
                        events = None;
                    }
                }
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
use sigil_testkit::fake_k8s;

#[cfg(test)]
mod tests;
