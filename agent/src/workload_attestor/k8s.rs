//! The `k8s` workload attestor: who a process in a Kubernetes pod is, from the kubelet.
//!
//! The cgroup gives the pod UID and the container ID ([`super::cgroup`]); the kubelet's pod list
//! (`GET <kubelet>/pods`, the pods bound to this node) turns them into the pod's namespace,
//! service account, name, labels, owners and the container's name and images. Selectors, with
//! SPIRE's names:
//!
//! | selector | from |
//! |---|---|
//! | `k8s:ns:<namespace>` | `metadata.namespace` |
//! | `k8s:sa:<service account>` | `spec.serviceAccountName` |
//! | `k8s:pod-name:<name>`, `k8s:pod-uid:<uid>` | `metadata` |
//! | `k8s:pod-label:<key>:<value>` | each `metadata.labels` entry |
//! | `k8s:pod-owner:<Kind>:<name>`, `k8s:pod-owner-uid:<Kind>:<uid>` | each `metadata.ownerReferences` |
//! | `k8s:node-name:<node>` | `spec.nodeName` |
//! | `k8s:container-name:<name>` | the process's container |
//! | `k8s:container-image:<image>` | its spec image, its status image and its status `imageID` (digest) |
//! | `k8s:pod-image:<image>`, `k8s:pod-init-image:<image>` | the same for every (init) container of the pod |
//! | `k8s:pod-image-count:<n>`, `k8s:pod-init-image-count:<n>` | how many (init) container statuses |
//!
//! The container is looked up in `status.containerStatuses`, `initContainerStatuses` and
//! `ephemeralContainerStatuses` by its runtime ID (`containerd://<id>`, `cri-o://<id>`,
//! `docker://<id>`). A container that has just started may not be in the status yet: the lookup
//! polls (fresh pod list each time) for up to [`KubeletConfig::container_wait`]. A process in a
//! pod's cgroup but in no container's (CRI-O's conmon, a pause process) gets no kubelet
//! selectors, as in SPIRE.
//!
//! The pod list is cached for [`KubeletConfig::cache_ttl`]; one request is in flight at a time
//! and concurrent attestations wait for it. Errors are cached for as long, so a kubelet that is
//! down is asked once per TTL, not once per caller.
//!
//! The cgroup names are only believed where the kubelet makes them: a process whose cgroup lies
//! in a subtree systemd delegated to a user ([`under_user_delegation`]) could have named its
//! cgroup after any pod, so it gets no kubelet selectors.
//!
//! A kubelet that is down, refuses the agent or answers garbage never fails an attestation: the
//! process keeps its unix and cgroup selectors (entries on `unix:*` still match) and a warning
//! (at most one every [`WARN_EVERY`]) names what to check: the URL, the CA, the token, RBAC.
//!
//! The kubelet is reached on its secure port (10250) with the agent's service-account token,
//! verified against the CA given (the in-cluster CA by default), or, only if the operator asks
//! for it, on the unauthenticated read-only port over plain HTTP. The token file is re-read for
//! every request (projected tokens rotate); the CA file is re-read too and the TLS client rebuilt
//! when it changed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use sigil::config::ConfigError;
use sigil::https::{HttpsClient, HttpsError};
use sigil::selector::Selector;

/// The kubelet's secure port on this node (the DaemonSet passes the node IP instead).
pub const DEFAULT_KUBELET_URL: &str = "https://127.0.0.1:10250";
/// The cluster CA mounted into every pod.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The service-account token mounted into every pod.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// How long a just-started container may take to appear in the pod status.
pub const DEFAULT_CONTAINER_WAIT: Duration = Duration::from_secs(10);
/// Between two looks for a container not in the status yet (SPIRE: 500 ms).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a pod list is re-used.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_millis(1500);
/// Deadline of one kubelet request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one kubelet warning this often (the rest go to debug).
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// Where and how to reach the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletConfig {
    /// Base URL: `https://<node>:10250`, or `http://<node>:10255` for the read-only port.
    pub url: String,
    /// PEM CA that signed the kubelet's serving certificate (unused over plain HTTP).
    pub ca_path: PathBuf,
    /// Bearer token file (unused over plain HTTP); re-read for every request.
    pub token_path: PathBuf,
    /// This node's name: pods the kubelet lists for another node are not trusted.
    pub node_name: Option<String>,
    /// How long to keep looking for a container not yet in its pod's status.
    pub container_wait: Duration,
    /// Pause between two looks.
    pub poll_interval: Duration,
    /// How long a fetched pod list (or a failure) is re-used.
    pub cache_ttl: Duration,
    /// Deadline of one request.
    pub timeout: Duration,
}

impl KubeletConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_path: PathBuf::from(DEFAULT_CA_PATH),
            token_path: PathBuf::from(DEFAULT_TOKEN_PATH),
            node_name: None,
            container_wait: DEFAULT_CONTAINER_WAIT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            cache_ttl: DEFAULT_CACHE_TTL,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Builds the configuration from the operator's settings (flag or file key names in the
    /// messages). `read_only_port` switches to `http://<host of url>:<port>`; `container_wait`
    /// is a duration (`10s`; `0` = look once).
    pub fn resolve(
        url: Option<String>,
        read_only_port: Option<u16>,
        ca_path: Option<PathBuf>,
        token_path: Option<PathBuf>,
        container_wait: Option<&str>,
        node_name: Option<String>,
    ) -> Result<Self, ConfigError> {
        let secure = url.unwrap_or_else(|| DEFAULT_KUBELET_URL.to_string());
        let host = https_host(&secure).map_err(|why| {
            ConfigError::invalid(
                "kubelet_url",
                secure.clone(),
                format!("{why} (expected https://<node IP or name>:10250; for the read-only port set kubelet_read_only_port)"),
            )
        })?;
        let url = match read_only_port {
            Some(0) => {
                return Err(ConfigError::rule(
                    "kubelet_read_only_port 0",
                    "expected e.g. 10255",
                ))
            }
            Some(port) => format!("http://{host}:{port}"),
            None => secure.trim_end_matches('/').to_string(),
        };
        let container_wait = match container_wait.map(str::trim) {
            None => DEFAULT_CONTAINER_WAIT,
            Some("0") => Duration::ZERO,
            Some(s) => {
                sigil::ttl::parse(s).map_err(|e| ConfigError::value("kubelet_container_wait", e))?
            }
        };
        if let Some(n) = &node_name {
            if n.is_empty() || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::invalid(
                    "node_name",
                    n.clone(),
                    "expected the Kubernetes node name (spec.nodeName)",
                ));
            }
        }
        Ok(Self {
            url,
            ca_path: ca_path.unwrap_or_else(|| PathBuf::from(DEFAULT_CA_PATH)),
            token_path: token_path.unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_PATH)),
            node_name,
            container_wait,
            ..Self::new(String::new())
        })
    }

    /// Plain HTTP to the read-only port: no CA, no token.
    pub fn is_read_only(&self) -> bool {
        self.url.starts_with("http://")
    }

    /// The pod list endpoint.
    pub fn pods_url(&self) -> String {
        format!("{}/pods", self.url.trim_end_matches('/'))
    }
}

/// The host (with brackets for IPv6) of an `https://host[:port][/]` URL.
fn https_host(url: &str) -> Result<&str, &'static str> {
    let rest = url
        .strip_prefix("https://")
        .ok_or("only https:// is allowed here")?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('@') || authority.contains('?') {
        return Err("expected no path, user or query");
    }
    let host = if authority.starts_with('[') {
        let end = authority.find(']').ok_or("unclosed [ in an IPv6 address")?;
        let (host, port) = authority.split_at(end + 1);
        if !(port.is_empty() || port.strip_prefix(':').is_some_and(is_port)) {
            return Err("bad port");
        }
        host
    } else {
        match authority.split_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return Err("bad port"),
            None => authority,
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("missing host");
    }
    Ok(host)
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Whether any line of a `/proc/<pid>/cgroup` text puts the process below `user.slice` or a
/// `user@<uid>.service`: systemd delegates those subtrees to the user, who may create cgroups
/// there named like any pod's (`.../user@1000.service/x/kubepods/besteffort/pod<uid>/<id>`,
/// with another pod's UID and container ID read from its world-readable `/proc/<pid>/cgroup`).
/// The kubelet only creates pod cgroups under its own root-owned `kubepods` tree, so a pod path
/// below a user's subtree is not believed. (Rootless Kubernetes, whose kubelet itself runs in a
/// user's subtree, therefore gets no kubelet selectors.)
pub fn under_user_delegation(cgroup_file_text: &str) -> bool {
    cgroup_file_text.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|c| {
            c == "user.slice"
                || (c.starts_with("user@") && c.ends_with(".service"))
                || (c.starts_with("user-") && c.ends_with(".slice"))
        })
    })
}

/// Why the kubelet's pod list could not be used. The messages say what to check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KubeletError {
    /// The CA file is unreadable or holds no usable certificate.
    #[error("cannot use the kubelet CA {path}: {reason} (set --kubelet-ca-path / kubelet_ca_path to the PEM CA that signed the kubelet's serving certificate)")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The token file is unreadable or empty.
    #[error("cannot read the kubelet bearer token {path}: {reason} (set --kubelet-token-path / kubelet_token_path; in a pod the service-account token is mounted at {DEFAULT_TOKEN_PATH})")]
    Token {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The request failed.
    #[error("GET {url} failed: {error}; {hint}")]
    Request {
        /// The pod list URL.
        url: String,
        /// The failure.
        error: String,
        /// What to check, from the kind of failure.
        hint: String,
    },
    /// The kubelet lists the pod on another node than this agent's.
    #[error("the kubelet at {url} lists pod {pod} on node {pod_node:?}, but this agent runs on node {node:?} (--node-name): does --kubelet-url point at this node's kubelet?")]
    WrongNode {
        /// The kubelet URL.
        url: String,
        /// namespace/name.
        pod: String,
        /// The pod's `spec.nodeName`.
        pod_node: String,
        /// `--node-name`.
        node: String,
    },
}

impl KubeletError {
    fn request(cfg: &KubeletConfig, e: &HttpsError) -> Self {
        let url = cfg.pods_url();
        let hint = match e {
            HttpsError::Transport { step: sigil::https::Step::TlsHandshake, .. } => format!(
                "is {} the CA that signed the kubelet's serving certificate (--kubelet-ca-path), and does that certificate name the host in --kubelet-url?",
                cfg.ca_path.display()
            ),
            HttpsError::Transport { step: sigil::https::Step::Connect, .. } => {
                "is the kubelet running, and is --kubelet-url this node's kubelet (in a DaemonSet, the node IP from status.hostIP, port 10250)?".to_string()
            }
            HttpsError::Timeout { .. } => {
                "the kubelet did not answer in time: check --kubelet-url and that the node is reachable from the agent".to_string()
            }
            HttpsError::Status { status, .. } if status.as_u16() == 401 => format!(
                "the kubelet did not accept the bearer token from {} (--kubelet-token-path): is it a current service-account token, and does the kubelet authenticate tokens (webhook authentication)?",
                cfg.token_path.display()
            ),
            HttpsError::Status { status, .. } if status.as_u16() == 403 => {
                "RBAC: the agent's service account needs `get` on `nodes/proxy` (a ClusterRole rule with resources [nodes/proxy], verbs [get])".to_string()
            }
            HttpsError::Json { .. } => {
                "the answer is not a pod list: is --kubelet-url the kubelet itself?".to_string()
            }
            _ => "check --kubelet-url, --kubelet-ca-path and --kubelet-token-path".to_string(),
        };
        Self::Request {
            url,
            error: e.to_string(),
            hint,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pod list, as much of it as the selectors need (unknown fields are ignored).
// ---------------------------------------------------------------------------------------------

/// `null` and missing both mean the default (Kubernetes omits empty fields, others send null).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `v1.PodList`.
#[derive(Debug, Default, Deserialize)]
struct PodList {
    #[serde(default, deserialize_with = "nullable")]
    items: Vec<Pod>,
}

/// `v1.Pod`.
#[derive(Debug, Default, Deserialize)]
struct Pod {
    #[serde(default, deserialize_with = "nullable")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    spec: PodSpec,
    #[serde(default, deserialize_with = "nullable")]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
struct OwnerReference {
    #[serde(default, deserialize_with = "nullable")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default, deserialize_with = "nullable")]
    service_account_name: String,
    #[serde(default, deserialize_with = "nullable")]
    node_name: String,
    #[serde(default, deserialize_with = "nullable")]
    containers: Vec<ContainerSpec>,
    #[serde(default, deserialize_with = "nullable")]
    init_containers: Vec<ContainerSpec>,
    #[serde(default, deserialize_with = "nullable")]
    ephemeral_containers: Vec<ContainerSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerSpec {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    image: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, deserialize_with = "nullable")]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "nullable")]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "nullable")]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    image: String,
    #[serde(default, rename = "imageID", deserialize_with = "nullable")]
    image_id: String,
    #[serde(default, rename = "containerID", deserialize_with = "nullable")]
    container_id: String,
}

impl ContainerStatus {
    /// The runtime's ID without its `<runtime>://` prefix.
    fn bare_id(&self) -> &str {
        self.container_id
            .split_once("://")
            .map_or(self.container_id.as_str(), |(_, id)| id)
    }
}

/// Which list a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Init,
    Ephemeral,
}

/// A fetched pod list, indexed by pod UID.
#[derive(Debug, Default)]
struct PodIndex {
    pods: HashMap<String, Pod>,
}

impl PodIndex {
    fn new(list: PodList) -> Self {
        Self {
            pods: list
                .items
                .into_iter()
                .filter(|p| !p.metadata.uid.is_empty())
                .map(|p| (p.metadata.uid.clone(), p))
                .collect(),
        }
    }
}

/// What a look at one pod list found.
enum Lookup {
    Found(Vec<Selector>),
    NoPod,
    NoContainer,
}

fn lookup(index: &PodIndex, pod_uid: &str, container_id: &str) -> Lookup {
    let Some(pod) = index.pods.get(pod_uid) else {
        return Lookup::NoPod;
    };
    let s = &pod.status;
    let found = [
        (Kind::Regular, &s.container_statuses),
        (Kind::Init, &s.init_container_statuses),
        (Kind::Ephemeral, &s.ephemeral_container_statuses),
    ]
    .into_iter()
    .find_map(|(kind, list)| {
        list.iter()
            .find(|c| !c.container_id.is_empty() && c.bare_id() == container_id)
            .map(|c| (kind, c))
    });
    match found {
        Some((kind, status)) => Lookup::Found(selectors(pod, kind, status)),
        None => Lookup::NoContainer,
    }
}

/// The selectors of `status`'s container in `pod`.
fn selectors(pod: &Pod, kind: Kind, status: &ContainerStatus) -> Vec<Selector> {
    let mut out = Vec::new();
    let mut add = |value: String| match Selector::new("k8s", &value) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(%e, "k8s selector skipped"),
    };
    let (meta, spec) = (&pod.metadata, &pod.spec);
    let nonempty = |prefix: &str, v: &str| (!v.is_empty()).then(|| format!("{prefix}:{v}"));
    for v in [
        nonempty("ns", &meta.namespace),
        nonempty("sa", &spec.service_account_name),
        nonempty("pod-name", &meta.name),
        nonempty("pod-uid", &meta.uid),
        nonempty("node-name", &spec.node_name),
        Some(format!(
            "pod-image-count:{}",
            pod.status.container_statuses.len()
        )),
        Some(format!(
            "pod-init-image-count:{}",
            pod.status.init_container_statuses.len()
        )),
        nonempty("container-name", &status.name),
    ]
    .into_iter()
    .flatten()
    {
        add(v);
    }
    for (k, v) in &meta.labels {
        add(format!("pod-label:{k}:{v}"));
    }
    for o in &meta.owner_references {
        if !o.kind.is_empty() && !o.name.is_empty() {
            add(format!("pod-owner:{}:{}", o.kind, o.name));
        }
        if !o.kind.is_empty() && !o.uid.is_empty() {
            add(format!("pod-owner-uid:{}:{}", o.kind, o.uid));
        }
    }
    // An image: as written in the spec, as the runtime resolved it, and its digest.
    let images = |specs: &[ContainerSpec], st: &ContainerStatus| -> Vec<String> {
        let spec_image = specs
            .iter()
            .find(|c| c.name == st.name)
            .map(|c| c.image.clone());
        let mut v: Vec<String> = [
            spec_image,
            Some(st.image.clone()),
            Some(st.image_id.clone()),
        ]
        .into_iter()
        .flatten()
        .filter(|i| !i.is_empty())
        .collect();
        v.dedup();
        v
    };
    let own_specs = match kind {
        Kind::Regular => &spec.containers,
        Kind::Init => &spec.init_containers,
        Kind::Ephemeral => &spec.ephemeral_containers,
    };
    for i in images(own_specs, status) {
        add(format!("container-image:{i}"));
    }
    for st in &pod.status.container_statuses {
        for i in images(&spec.containers, st) {
            add(format!("pod-image:{i}"));
        }
    }
    for st in &pod.status.init_container_statuses {
        for i in images(&spec.init_containers, st) {
            add(format!("pod-init-image:{i}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------------------------

/// A fetched pod list (or the failure), and when its request started.
struct Fetched {
    at: Instant,
    result: Result<Arc<PodIndex>, KubeletError>,
}

/// The kubelet client and pod-list cache behind the `k8s` workload attestor.
pub struct KubeletClient {
    cfg: KubeletConfig,
    /// Held across a fetch: one request in flight, the others wait and then use its answer.
    cache: tokio::sync::Mutex<Option<Fetched>>,
    /// The TLS client and the CA file bytes it was built from.
    tls: Mutex<Option<(Vec<u8>, HttpsClient)>>,
    requests: AtomicU64,
    warned_at: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
    last_problem: Mutex<Option<String>>,
}

impl std::fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletClient")
            .field("cfg", &self.cfg)
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// A client for `cfg`; nothing is read or contacted until the first attestation.
    pub fn new(cfg: KubeletConfig) -> Self {
        Self {
            cfg,
            cache: tokio::sync::Mutex::new(None),
            tls: Mutex::new(None),
            requests: AtomicU64::new(0),
            warned_at: Mutex::new(None),
            suppressed: AtomicU64::new(0),
            last_problem: Mutex::new(None),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &KubeletConfig {
        &self.cfg
    }

    /// How many pod-list requests were sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The last reason kubelet selectors were left out, if any.
    pub fn last_problem(&self) -> Option<String> {
        self.last_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The kubelet selectors of container `container_id` in pod `pod_uid`; empty (after a
    /// rate-limited warning) when the kubelet cannot say. Never fails: the caller keeps its
    /// other selectors.
    pub async fn selectors(&self, pod_uid: &str, container_id: &str) -> Vec<Selector> {
        match self.lookup(pod_uid, container_id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.warn(format!(
                    "container {container_id} of pod {pod_uid} is not in the pod list of the kubelet at {} after waiting {:?} (--kubelet-container-wait); k8s selectors from the kubelet are left out, unix and cgroup selectors still apply",
                    self.cfg.url, self.cfg.container_wait
                ));
                Vec::new()
            }
            Err(e) => {
                self.warn(format!(
                    "kubelet unavailable, k8s selectors from the kubelet are left out (unix and cgroup selectors still apply): {e}"
                ));
                Vec::new()
            }
        }
    }

    /// Looks the container up, polling while it is not in the pod list yet. `Ok(None)`: still
    /// not there after [`KubeletConfig::container_wait`].
    pub async fn lookup(
        &self,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<Option<Vec<Selector>>, KubeletError> {
        let deadline = Instant::now() + self.cfg.container_wait;
        let mut seen: Option<Instant> = None;
        loop {
            let (at, index) = self.pod_list(seen).await?;
            match lookup(&index, pod_uid, container_id) {
                Lookup::Found(selectors) => {
                    self.check_node(&index, pod_uid)?;
                    return Ok(Some(selectors));
                }
                Lookup::NoPod | Lookup::NoContainer => {}
            }
            if Instant::now() + self.cfg.poll_interval > deadline {
                return Ok(None);
            }
            tracing::debug!(
                pod_uid,
                container_id,
                "container not in the kubelet's pod list yet; polling again"
            );
            seen = Some(at);
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }

    fn check_node(&self, index: &PodIndex, pod_uid: &str) -> Result<(), KubeletError> {
        let (Some(node), Some(pod)) = (&self.cfg.node_name, index.pods.get(pod_uid)) else {
            return Ok(());
        };
        if pod.spec.node_name == *node {
            return Ok(());
        }
        Err(KubeletError::WrongNode {
            url: self.cfg.url.clone(),
            pod: format!("{}/{}", pod.metadata.namespace, pod.metadata.name),
            pod_node: pod.spec.node_name.clone(),
            node: node.clone(),
        })
    }

    /// The cached pod list if younger than the TTL and (when `newer_than` is given) fetched
    /// after it; otherwise a fresh one. One fetch at a time.
    async fn pod_list(
        &self,
        newer_than: Option<Instant>,
    ) -> Result<(Instant, Arc<PodIndex>), KubeletError> {
        let mut slot = self.cache.lock().await;
        if let Some(f) = slot.as_ref() {
            let fresh = f.at.elapsed() < self.cfg.cache_ttl;
            if fresh && newer_than.is_none_or(|t| f.at > t) {
                return f.result.clone().map(|index| (f.at, index));
            }
        }
        let at = Instant::now();
        let result = self.fetch().await;
        *slot = Some(Fetched {
            at,
            result: result.clone(),
        });
        result.map(|index| (at, index))
    }

    async fn fetch(&self) -> Result<Arc<PodIndex>, KubeletError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = self.cfg.pods_url();
        let (client, token) = if self.cfg.is_read_only() {
            (HttpsClient::plain_http(self.cfg.timeout), None)
        } else {
            (self.tls_client().await?, Some(self.token().await?))
        };
        let list: PodList = client
            .get_json(&url, token.as_deref())
            .await
            .map_err(|e| KubeletError::request(&self.cfg, &e))?;
        tracing::debug!(url, pods = list.items.len(), "kubelet pod list fetched");
        Ok(Arc::new(PodIndex::new(list)))
    }

    /// The TLS client for the CA file as it is now (rebuilt when the file changed).
    async fn tls_client(&self) -> Result<HttpsClient, KubeletError> {
        let path = &self.cfg.ca_path;
        let ca_error = |reason: String| KubeletError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let pem = tokio::fs::read(path)
            .await
            .map_err(|e| ca_error(e.to_string()))?;
        let mut slot = self
            .tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((bytes, client)) = slot.as_ref() {
            if *bytes == pem {
                return Ok(client.clone());
            }
        }
        let text = String::from_utf8(pem.clone()).map_err(|_| ca_error("not PEM text".into()))?;
        let client =
            HttpsClient::from_pem(&text, self.cfg.timeout).map_err(|e| ca_error(e.to_string()))?;
        *slot = Some((pem, client.clone()));
        Ok(client)
    }

    async fn token(&self) -> Result<String, KubeletError> {
        let path = &self.cfg.token_path;
        let token_error = |reason: String| KubeletError::Token {
            path: path.display().to_string(),
            reason,
        };
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| token_error(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(token_error("the file is empty".into()));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(token_error("not a single token".into()));
        }
        Ok(token.to_string())
    }

    /// Logs `msg` as a warning at most once every [`WARN_EVERY`] (debug otherwise).
    pub(crate) fn warn(&self, msg: String) {
        let now = Instant::now();
        let due = {
            let mut at = self
                .warned_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = at.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
            if due {
                *at = Some(now);
            }
            due
        };
        if due {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(suppressed, "{msg}");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{msg}");
        }
        *self
            .last_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(msg);
    }
}

#[cfg(test)]
mod tests;
