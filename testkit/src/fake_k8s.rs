//! A fake Kubernetes API server and service-account token issuer for `k8s_psat` tests.
//!
//! [`FakeK8s`] serves real HTTPS on loopback (a fresh rcgen CA signs a `localhost`/`127.0.0.1`
//! certificate; rustls), from its own thread and runtime so sync and async tests can both use
//! it: `GET /api/v1/namespaces/{ns}/pods/{name}`, `GET /api/v1/nodes/{name}`,
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`, ConfigMaps (`GET`, `PUT`, `PATCH` with a
//! JSON merge patch `/api/v1/namespaces/{ns}/configmaps/{name}`, `POST
//! /api/v1/namespaces/{ns}/configmaps`, kept in memory with a `resourceVersion` that must match
//! when a write carries one) (all these need `Authorization: Bearer` [`API_TOKEN`], as the real
//! one needs the server's service-account token), and, unauthenticated,
//! `GET /.well-known/openid-configuration` and `GET /openid/v1/jwks`. Answers are shaped like
//! the real API server's (trimmed).
//!
//! [`TestIssuer`] mints projected service-account tokens (RS256 or ES256 with ring) and gives
//! its JWK; [`PodClaims`] builds the claims.
//!
//! Used by the server's unit tests (`k8s_psat`, the bundle publisher) and the end-to-end tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{json, Value};
use tokio_rustls::rustls;

/// The bearer token the fake API server requires for pods, nodes and TokenReview.
pub const API_TOKEN: &str = "fake-api-server-token";

/// One token the fake TokenReview endpoint knows.
#[derive(Debug, Clone)]
pub struct Review {
    /// `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    /// `status.user.extra` (`authentication.kubernetes.io/pod-name`, ...).
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token was issued for.
    pub audiences: Vec<String>,
}

impl Review {
    /// A review for a pod-bound token of `ns:sa`, pod `pod`/`pod_uid`, optionally on a node.
    pub fn pod(
        ns: &str,
        sa: &str,
        pod: &str,
        pod_uid: &str,
        node: Option<(&str, &str)>,
        audiences: &[&str],
    ) -> Self {
        let mut extra = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            extra.insert(
                format!("authentication.kubernetes.io/{k}"),
                vec![v.to_string()],
            );
        };
        put("pod-name", pod);
        put("pod-uid", pod_uid);
        if let Some((name, uid)) = node {
            put("node-name", name);
            put("node-uid", uid);
        }
        Self {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            extra,
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// What the fake API server holds (tests change it while it runs).
#[derive(Debug, Default)]
pub struct State {
    /// Pods by `ns/name`.
    pub pods: HashMap<String, Value>,
    /// Nodes by name.
    pub nodes: HashMap<String, Value>,
    /// The JWKS served at `/openid/v1/jwks`.
    pub jwks: Value,
    /// The `issuer` of the discovery document (default: the server's URL).
    pub issuer: Option<String>,
    /// Tokens TokenReview authenticates.
    pub reviews: HashMap<String, Review>,
    /// Every request, as `METHOD /path`.
    pub requests: Vec<String>,
    /// Answer every authenticated API call with this status (an outage, RBAC trouble).
    pub fail_api_with: Option<u16>,
    /// ConfigMaps by `ns/name`.
    pub configmaps: HashMap<String, Value>,
    /// The last `metadata.resourceVersion` given out.
    pub resource_version: u64,
    /// Answer this many ConfigMap writes (POST, PUT, PATCH) with 409 Conflict, as if someone
    /// else had just changed the object.
    pub configmap_conflicts: usize,
}

/// A running fake API server; stopped on drop.
pub struct FakeK8s {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The CA that issued the server certificate (PEM): the `api_ca_file`.
    pub ca_pem: String,
    /// The served state.
    pub state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeK8s {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tls_config() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "fake kubernetes CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    p.distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let cert = p.signed_by(&key, &issuer).expect("server cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server TLS config");
    (Arc::new(config), ca_cert.pem())
}

impl FakeK8s {
    /// Starts serving on a free loopback port.
    pub fn start() -> FakeK8s {
        let (tls, ca_pem) = tls_config();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding fake API");
        listener.set_nonblocking(true).expect("non-blocking");
        let url = format!("https://{}", listener.local_addr().expect("address"));
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let base = url.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fake API runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let accept_loop = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        let state = served.clone();
                        let base = base.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                let base = base.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(
                                        handle(&state, &base, req).await,
                                    )
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept_loop => {}
                    _ = stop_rx => {}
                }
            });
        });
        FakeK8s {
            url,
            ca_pem,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("fake API state"))
    }

    /// Adds or replaces pod `ns/name` with `uid`, scheduled on `node`.
    pub fn set_pod(&self, ns: &str, name: &str, uid: &str, node: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": uid,
                "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "sigil-agent"}]
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "sigil-agent",
                "containers": [{"name": "sigil-agent", "image": "sigil:dev"}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        });
        self.with(|s| s.pods.insert(format!("{ns}/{name}"), pod));
    }

    /// Removes pod `ns/name`.
    pub fn remove_pod(&self, ns: &str, name: &str) {
        self.with(|s| s.pods.remove(&format!("{ns}/{name}")));
    }

    /// Adds or replaces node `name` with `uid` and `labels`.
    pub fn set_node(&self, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": uid, "labels": labels},
            "spec": {"podCIDR": "10.0.0.0/24"},
            "status": {"nodeInfo": {"kubeletVersion": "v1.31.0"}}
        });
        self.with(|s| s.nodes.insert(name.to_string(), node));
    }

    /// Sets the served JWKS.
    pub fn set_jwks(&self, jwks: Value) {
        self.with(|s| s.jwks = jwks);
    }

    /// Sets the discovery document's issuer (default: [`FakeK8s::url`]).
    pub fn set_issuer(&self, issuer: &str) {
        self.with(|s| s.issuer = Some(issuer.to_string()));
    }

    /// Makes TokenReview authenticate `token` as `review`.
    pub fn set_review(&self, token: &str, review: Review) {
        self.with(|s| s.reviews.insert(token.to_string(), review));
    }

    /// Makes every authenticated API call answer `status` (or `None` to serve again).
    pub fn fail_api_with(&self, status: Option<u16>) {
        self.with(|s| s.fail_api_with = status);
    }

    /// ConfigMap `ns/name`, as the API server would return it.
    pub fn configmap(&self, ns: &str, name: &str) -> Option<Value> {
        self.with(|s| s.configmaps.get(&format!("{ns}/{name}")).cloned())
    }

    /// `data[key]` of ConfigMap `ns/name`.
    pub fn configmap_data(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        self.configmap(ns, name)
            .and_then(|cm| cm["data"][key].as_str().map(str::to_string))
    }

    /// Creates or replaces ConfigMap `ns/name` with `data`.
    pub fn set_configmap(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns},
            "data": data
        });
        self.with(|s| store_configmap(s, ns, name, cm));
    }

    /// Makes the next `n` ConfigMap writes answer 409 Conflict.
    pub fn conflict_configmap_writes(&self, n: usize) {
        self.with(|s| s.configmap_conflicts = n);
    }

    /// How many requests so far started with `prefix` (e.g. `GET /openid/v1/jwks`).
    pub fn count(&self, prefix: &str) -> usize {
        self.with(|s| s.requests.iter().filter(|r| r.starts_with(prefix)).count())
    }

    /// Writes the CA (PEM) and the API bearer token to `dir` and returns their paths.
    pub fn write_credentials(
        &self,
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let ca = dir.join("fake-k8s-ca.pem");
        let token = dir.join("fake-k8s-api-token");
        std::fs::write(&ca, &self.ca_pem).expect("writing the fake API CA");
        std::fs::write(&token, format!("{API_TOKEN}\n")).expect("writing the fake API token");
        (ca, token)
    }

    /// The TOML lines that point a config table at this API server (`api_server_url`,
    /// `api_ca_file`, `api_token_file`), with the credentials written to `dir`.
    pub fn api_settings_toml(&self, dir: &std::path::Path) -> String {
        let (ca, token) = self.write_credentials(dir);
        format!(
            "api_server_url = {url:?}\napi_ca_file = {ca:?}\napi_token_file = {token:?}\n",
            url = self.url,
            ca = ca.to_str().expect("utf-8 path"),
            token = token.to_str().expect("utf-8 path"),
        )
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The API server's `Status` object for an error.
fn status_object(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

async fn handle(
    state: &Mutex<State>,
    base: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut s = state.lock().expect("fake API state");
    s.requests.push(format!("{method} {path}"));
    match (&method, path.as_str()) {
        (&Method::GET, "/.well-known/openid-configuration") => {
            let issuer = s.issuer.clone().unwrap_or_else(|| base.to_string());
            return reply(
                StatusCode::OK,
                json!({
                    "issuer": issuer,
                    "jwks_uri": format!("{base}/openid/v1/jwks"),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"]
                }),
            );
        }
        (&Method::GET, "/openid/v1/jwks") => return reply(StatusCode::OK, s.jwks.clone()),
        _ => {}
    }
    if bearer.as_deref() != Some(API_TOKEN) {
        return status_object(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if let Some(code) = s.fail_api_with {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return status_object(
            code,
            "InternalError",
            "the fake API server was told to fail",
        );
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match s.pods.get(&format!("{ns}/{name}")) {
                Some(p) => reply(StatusCode::OK, p.clone()),
                None => status_object(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            }
        }
        (&Method::GET, ["api", "v1", "nodes", name]) => match s.nodes.get(*name) {
            Some(n) => reply(StatusCode::OK, n.clone()),
            None => status_object(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            ),
        },
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match s.configmaps.get(&format!("{ns}/{name}")) {
                Some(cm) => reply(StatusCode::OK, cm.clone()),
                None => status_object(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("configmaps \"{name}\" not found"),
                ),
            }
        }
        (
            &Method::POST | &Method::PUT | &Method::PATCH,
            ["api", "v1", "namespaces", ns, "configmaps", rest @ ..],
        ) => write_configmap(&mut s, &method, ns, rest, &content_type, &body),
        (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let Ok(review) = serde_json::from_slice::<Value>(&body) else {
                return status_object(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let wanted: Vec<String> = review["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let status = match s.reviews.get(token) {
                None => {
                    json!({"authenticated": false, "error": "invalid bearer token, token lookup failed"})
                }
                Some(r) => {
                    let both: Vec<&String> = r
                        .audiences
                        .iter()
                        .filter(|a| wanted.is_empty() || wanted.contains(a))
                        .collect();
                    if both.is_empty() {
                        json!({"authenticated": false, "error": "invalid bearer token, token audiences [\"api\"] is invalid for the target audiences"})
                    } else {
                        json!({
                            "authenticated": true,
                            "user": {
                                "username": r.username,
                                "uid": "sa-uid-1",
                                "groups": ["system:serviceaccounts"],
                                "extra": r.extra
                            },
                            "audiences": both
                        })
                    }
                }
            };
            reply(
                StatusCode::CREATED,
                json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"creationTimestamp": null},
                    "spec": review["spec"],
                    "status": status
                }),
            )
        }
        _ => status_object(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// Stores ConfigMap `ns/name` with a new `resourceVersion` (and a `uid` the first time).
fn store_configmap(s: &mut State, ns: &str, name: &str, mut cm: Value) -> Value {
    s.resource_version += 1;
    let key = format!("{ns}/{name}");
    let uid = s
        .configmaps
        .get(&key)
        .and_then(|old| old["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("configmap-uid-{}", s.resource_version));
    cm["metadata"]["name"] = Value::from(name);
    cm["metadata"]["namespace"] = Value::from(ns);
    cm["metadata"]["uid"] = Value::from(uid);
    cm["metadata"]["resourceVersion"] = Value::from(s.resource_version.to_string());
    s.configmaps.insert(key, cm.clone());
    cm
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// POST `…/configmaps` (create), PUT and PATCH `…/configmaps/{name}`.
fn write_configmap(
    s: &mut State,
    method: &Method,
    ns: &str,
    rest: &[&str],
    content_type: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return status_object(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let conflict = |name: &str| {
        status_object(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        )
    };
    let name = match (method, rest) {
        (&Method::POST, []) => doc["metadata"]["name"].as_str().unwrap_or_default(),
        (&Method::PUT | &Method::PATCH, [name]) => *name,
        _ => {
            return status_object(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        }
    }
    .to_string();
    if s.configmap_conflicts > 0 {
        s.configmap_conflicts -= 1;
        return conflict(&name);
    }
    let existing = s.configmaps.get(&format!("{ns}/{name}")).cloned();
    let stale = |cm: &Value, sent: &Value| {
        sent.as_str()
            .is_some_and(|rv| Some(rv) != cm["metadata"]["resourceVersion"].as_str())
    };
    match (method, existing) {
        (&Method::POST, Some(_)) => status_object(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("configmaps \"{name}\" already exists"),
        ),
        (&Method::POST, None) => {
            if name.is_empty() || doc["kind"] != "ConfigMap" {
                return status_object(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "not a named ConfigMap",
                );
            }
            reply(StatusCode::CREATED, store_configmap(s, ns, &name, doc))
        }
        (_, None) => status_object(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("configmaps \"{name}\" not found"),
        ),
        (&Method::PUT, Some(cm)) => {
            if stale(&cm, &doc["metadata"]["resourceVersion"]) {
                return conflict(&name);
            }
            reply(StatusCode::OK, store_configmap(s, ns, &name, doc))
        }
        (_, Some(mut cm)) => {
            if content_type != "application/merge-patch+json" {
                return status_object(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json (got {content_type:?})"),
                );
            }
            if stale(&cm, &doc["metadata"]["resourceVersion"]) {
                return conflict(&name);
            }
            merge_patch(&mut cm, &doc);
            reply(StatusCode::OK, store_configmap(s, ns, &name, cm))
        }
    }
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

enum IssuerKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A service-account token issuer: a signing key with its `kid`.
pub struct TestIssuer {
    /// The key ID in token headers and the JWK.
    pub kid: String,
    key: IssuerKey,
}

impl TestIssuer {
    /// An ES256 issuer with a fresh P-256 key.
    pub fn es256(kid: &str) -> TestIssuer {
        let rng = SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key");
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("P-256 key");
        TestIssuer {
            kid: kid.to_string(),
            key: IssuerKey::Ec(key),
        }
    }

    /// An RS256 issuer with the RSA key `pkcs8_der` (ring cannot generate RSA keys).
    pub fn rs256(kid: &str, pkcs8_der: &[u8]) -> TestIssuer {
        TestIssuer {
            kid: kid.to_string(),
            key: IssuerKey::Rsa(RsaKeyPair::from_pkcs8(pkcs8_der).expect("RSA PKCS#8 key")),
        }
    }

    /// The `alg` this issuer signs with.
    pub fn alg(&self) -> &'static str {
        match self.key {
            IssuerKey::Rsa(_) => "RS256",
            IssuerKey::Ec(_) => "ES256",
        }
    }

    /// The public JWK, as the API server's `/openid/v1/jwks` lists it.
    pub fn jwk(&self) -> Value {
        match &self.key {
            IssuerKey::Rsa(k) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256", "n": b64url(&c.n), "e": b64url(&c.e)})
            }
            IssuerKey::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"use": "sig", "kty": "EC", "kid": self.kid, "alg": "ES256", "crv": "P-256", "x": b64url(&p[1..33]), "y": b64url(&p[33..])})
            }
        }
    }

    /// A JWK Set of `issuers`' keys.
    pub fn jwks(issuers: &[&TestIssuer]) -> Value {
        json!({"keys": issuers.iter().map(|i| i.jwk()).collect::<Vec<_>>()})
    }

    /// Signs `claims` with the header `{"alg", "kid"}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({"alg": self.alg(), "kid": self.kid}), claims)
    }

    /// Signs `claims` under an arbitrary header.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match &self.key {
            IssuerKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .expect("RSA signing");
                sig
            }
            IssuerKey::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", b64url(&sig))
    }
}

/// The claims of a projected service-account token (what the kubelet mounts).
#[derive(Debug, Clone)]
pub struct PodClaims {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Node name and UID (Kubernetes 1.30+ puts them in the token).
    pub node: Option<(String, String)>,
    /// `iat`/`nbf`, relative to now (seconds).
    pub issued: i64,
    /// `exp`, relative to now (seconds).
    pub expires: i64,
}

impl PodClaims {
    /// Claims for pod `ns/pod` (`pod_uid`) of service account `sa`, on `node` (name, UID),
    /// audience `sigil-server`, issued 10 s ago, valid for an hour.
    pub fn new(ns: &str, sa: &str, pod: &str, pod_uid: &str, node: Option<(&str, &str)>) -> Self {
        Self {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            audience: vec!["sigil-server".into()],
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: pod.into(),
            pod_uid: pod_uid.into(),
            node: node.map(|(n, u)| (n.to_string(), u.to_string())),
            issued: -10,
            expires: 3600,
        }
    }

    /// The JSON claims.
    pub fn to_json(&self) -> Value {
        let now = sigil::clock::now_unix();
        let mut k8s = json!({
            "namespace": self.namespace,
            "pod": {"name": self.pod_name, "uid": self.pod_uid},
            "serviceaccount": {"name": self.service_account, "uid": "sa-uid-1"}
        });
        if let Some((name, uid)) = &self.node {
            k8s["node"] = json!({"name": name, "uid": uid});
        }
        json!({
            "aud": self.audience,
            "exp": now + self.expires,
            "iat": now + self.issued,
            "nbf": now + self.issued,
            "iss": self.issuer,
            "jti": format!("jti-{}-{}", self.pod_uid, now),
            "kubernetes.io": k8s,
            "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
        })
    }
}
