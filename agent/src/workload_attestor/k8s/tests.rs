//! The `k8s` attestor against a fake kubelet: real HTTPS on loopback (a test CA signs its
//! certificate), a bearer token required, pod lists shaped like a real kubelet's
//! (`testdata/pods_*.json`: containerd and CRI-O, several containers, init and ephemeral
//! containers, a static pod, a pod whose container is still being created).

use super::*;
use crate::workload_attestor::{ProcessPin, WorkloadAttestor};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::Path;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil::selector::SelectorSet;

const CONTAINERD: &str = include_str!("../testdata/pods_containerd.json");
const CRIO: &str = include_str!("../testdata/pods_crio.json");
const STARTING: &str = include_str!("../testdata/pods_starting.json");
const STARTED: &str = include_str!("../testdata/pods_started.json");

const WEB_POD: &str = "dd1bf9d1-241d-47f5-8e25-12de83135812";
const WEB_APP: &str = "a7a1d1b1b26d8785d3cae7a3b8b137b8f08991a2412713846e58baaba5683a4c";
const WEB_ENVOY: &str = "e17eb1b6c235111f12bf4d25b4dfc53c6f518f08f07b3343ef1c60c5f81864f4";
const WEB_MIGRATE: &str = "d5a312b7b5832f62ebb4542c04f4cbc17362d745a8c7163b6cceb8afd5da9c03";
const WEB_DEBUG: &str = "e7be0f2da59625a3be93e6cf6fff5e288d09dfeace611e1b46dcd0ae31dc4293";
const ETCD_POD: &str = "187bff14cccb94f179e943eacce55bb3";
const ETCD: &str = "c38cbd92fce41312f3fbdce60510013b7f0d4004a03b45c8e762f98f1ed4006c";
const LEDGER_POD: &str = "2c48913c-b29f-11e7-9350-020968147796";
const LEDGER: &str = "fe14010b4fe83303852f0467c919ef9a7ca089b91e96e3aad7d426dd87079297";
const API_POD: &str = "87a18a64-b74a-454a-b10b-a4a36059d0a3";
const API: &str = "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.agent-token-1.sig";

// ---------------------------------------------------------------------------------------------
// The fake kubelet.
// ---------------------------------------------------------------------------------------------

/// What the fake kubelet serves and what it saw.
#[derive(Default)]
struct State {
    /// Pod list bodies, served in order; the last one is served again and again.
    bodies: VecDeque<String>,
    /// The bearer token it accepts (`None`: no authentication, like the read-only port).
    token: Option<String>,
    /// Answer every request with this status instead.
    status: Option<u16>,
    /// Wait this long before answering.
    delay: Duration,
    /// The Authorization header of each request, in order.
    seen: Vec<Option<String>>,
}

struct Kubelet {
    /// `https://127.0.0.1:<port>` (or `http://` for the plain one).
    url: String,
    port: u16,
    /// The CA that signed its serving certificate.
    ca_pem: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA, and a certificate it signs for `127.0.0.1` (chain, key).
fn ca_and_server_cert() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "node-1-ca@1715678400");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "node-1".into()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "node-1@1715678400");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        vec![
            CertificateDer::from(cert.der().to_vec()),
            CertificateDer::from(ca_cert.der().to_vec()),
        ],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

impl Kubelet {
    /// An HTTPS kubelet requiring [`TOKEN`] and serving `bodies`.
    async fn start(bodies: &[&str]) -> Kubelet {
        Self::start_with(bodies, true).await
    }

    async fn start_with(bodies: &[&str], tls: bool) -> Kubelet {
        let (ca_pem, chain, key) = ca_and_server_cert();
        let acceptor = tls.then(|| {
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let state = Arc::new(Mutex::new(State {
            bodies: bodies.iter().map(|b| b.to_string()).collect(),
            token: tls.then(|| TOKEN.to_string()),
            ..State::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(serve(listener, acceptor, state.clone()));
        let scheme = if tls { "https" } else { "http" };
        Kubelet {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            ca_pem,
            state,
            task,
        }
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }

    fn seen(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().seen.clone()
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = http.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

async fn answer<B>(state: &Mutex<State>, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (status, body, delay) = {
        let mut s = state.lock().unwrap();
        s.seen.push(auth.clone());
        let body = if s.bodies.len() > 1 {
            s.bodies.pop_front().unwrap_or_default()
        } else {
            s.bodies.front().cloned().unwrap_or_default()
        };
        let authorized = match &s.token {
            None => true,
            Some(t) => auth.as_deref() == Some(format!("Bearer {t}").as_str()),
        };
        let status = match s.status {
            Some(st) => st,
            None if req.uri().path() != "/pods" => 404,
            None if !authorized => 401,
            None => 200,
        };
        let body = match status {
            200 => body,
            401 => "Unauthorized".to_string(),
            403 => "Forbidden (user=system:serviceaccount:sigil:sigil-agent, verb=get, resource=nodes, subresource(s)=[proxy])".to_string(),
            _ => "404 page not found".to_string(),
        };
        (status, body, s.delay)
    };
    tokio::time::sleep(delay).await;
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// The CA and token files for `kubelet` in a temp dir, and a config using them.
fn setup(kubelet: &Kubelet) -> (tempfile::TempDir, KubeletConfig) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &kubelet.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let cfg = KubeletConfig {
        ca_path: dir.path().join("ca.crt"),
        token_path: dir.path().join("token"),
        node_name: Some("node-1".into()),
        container_wait: Duration::ZERO,
        poll_interval: Duration::from_millis(20),
        cache_ttl: Duration::from_secs(60),
        ..KubeletConfig::new(kubelet.url.clone())
    };
    (dir, cfg)
}

fn strings(selectors: &[Selector]) -> Vec<String> {
    let mut v: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

async fn found(client: &KubeletClient, pod: &str, container: &str) -> Vec<String> {
    let got = client.lookup(pod, container).await;
    strings(&got.unwrap().expect("the container is in the pod list"))
}

fn request_error(e: KubeletError) -> (String, String) {
    match &e {
        KubeletError::Request { error, hint, .. } => (error.clone(), hint.clone()),
        other => panic!("expected a request error, got {other:?}"),
    }
}

const WEB_POD_SELECTORS: &[&str] = &[
    "k8s:ns:shop",
    "k8s:sa:web",
    "k8s:pod-name:web-7d4b9c8f6d-x2kqp",
    "k8s:pod-uid:dd1bf9d1-241d-47f5-8e25-12de83135812",
    "k8s:node-name:node-1",
    "k8s:pod-image-count:2",
    "k8s:pod-init-image-count:1",
    "k8s:pod-label:app:web",
    "k8s:pod-label:app.kubernetes.io/part-of:shop",
    "k8s:pod-label:pod-template-hash:7d4b9c8f6d",
    "k8s:pod-owner:ReplicaSet:web-7d4b9c8f6d",
    "k8s:pod-owner-uid:ReplicaSet:5e1f5a0c-2a6b-4a8e-9d0e-3c1b2a4f6e7d",
    "k8s:pod-image:ghcr.io/example/shop-web:1.4.2",
    "k8s:pod-image:ghcr.io/example/shop-web@sha256:61fd6766cebfd37d7cb53d10866191d75b655450922d3c20155d7fdbb75553ef",
    "k8s:pod-image:envoyproxy/envoy:v1.30.1",
    "k8s:pod-image:docker.io/envoyproxy/envoy:v1.30.1",
    "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:d6ce613d9eda3316f05f96f2089275ed7c5ae63e952f6e4719e585eef90491ec",
    "k8s:pod-init-image:ghcr.io/example/shop-migrate:1.4.2",
    "k8s:pod-init-image:ghcr.io/example/shop-migrate@sha256:a654fac89d538273b5f8f96089c32ef85c1f73894b07f74f712bb6d05b39e744",
];

fn web_with(container: &[&str]) -> Vec<String> {
    let mut all: Vec<&str> = WEB_POD_SELECTORS.to_vec();
    all.extend(container);
    sorted(&all)
}

// ---------------------------------------------------------------------------------------------
// Lookups.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn selectors_of_containerd_containers() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, cfg) = setup(&kubelet);
    let client = KubeletClient::new(cfg);

    assert_eq!(
        found(&client, WEB_POD, WEB_APP).await,
        web_with(&[
            "k8s:container-name:app",
            "k8s:container-image:ghcr.io/example/shop-web:1.4.2",
            "k8s:container-image:ghcr.io/example/shop-web@sha256:61fd6766cebfd37d7cb53d10866191d75b655450922d3c20155d7fdbb75553ef",
        ])
    );
    // The sidecar: same pod, its own name, and its image as written in the spec and as the
    // runtime normalised it.
    assert_eq!(
        found(&client, WEB_POD, WEB_ENVOY).await,
        web_with(&[
            "k8s:container-name:envoy",
            "k8s:container-image:envoyproxy/envoy:v1.30.1",
            "k8s:container-image:docker.io/envoyproxy/envoy:v1.30.1",
            "k8s:container-image:docker.io/envoyproxy/envoy@sha256:d6ce613d9eda3316f05f96f2089275ed7c5ae63e952f6e4719e585eef90491ec",
        ])
    );
    // A static pod: 32-hex UID, owned by the Node.
    let etcd = found(&client, ETCD_POD, ETCD).await;
    for want in [
        "k8s:ns:kube-system",
        "k8s:pod-name:etcd-node-1",
        "k8s:pod-uid:187bff14cccb94f179e943eacce55bb3",
        "k8s:pod-owner:Node:node-1",
        "k8s:container-name:etcd",
        "k8s:container-image:registry.k8s.io/etcd:3.5.12-0",
        "k8s:pod-label:component:etcd",
    ] {
        assert!(etcd.contains(&want.to_string()), "{want} in {etcd:?}");
    }
    // No service account in the spec: no `k8s:sa`.
    assert!(!etcd.iter().any(|s| s.starts_with("k8s:sa:")), "{etcd:?}");
    // One pod list served all three.
    assert_eq!(kubelet.seen().len(), 1);
    assert_eq!(
        kubelet.seen()[0].as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn init_and_ephemeral_containers_are_found() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, cfg) = setup(&kubelet);
    let client = KubeletClient::new(cfg);
    assert_eq!(
        found(&client, WEB_POD, WEB_MIGRATE).await,
        web_with(&[
            "k8s:container-name:migrate",
            "k8s:container-image:ghcr.io/example/shop-migrate:1.4.2",
            "k8s:container-image:ghcr.io/example/shop-migrate@sha256:a654fac89d538273b5f8f96089c32ef85c1f73894b07f74f712bb6d05b39e744",
        ])
    );
    assert_eq!(
        found(&client, WEB_POD, WEB_DEBUG).await,
        web_with(&[
            "k8s:container-name:debugger-6x8rt",
            "k8s:container-image:busybox:1.36",
            "k8s:container-image:docker.io/library/busybox:1.36",
            "k8s:container-image:docker.io/library/busybox@sha256:07ace99f2de5139e9f401fecd52cdcb33ab78a61ba0b7978870493f7ce96cc03",
        ])
    );
}

#[tokio::test]
async fn cri_o_container_ids_match() {
    let kubelet = Kubelet::start(&[CRIO]).await;
    let (_dir, cfg) = setup(&kubelet);
    let client = KubeletClient::new(cfg);
    let got = found(&client, LEDGER_POD, LEDGER).await;
    for want in [
        "k8s:ns:payments",
        "k8s:sa:ledger",
        "k8s:pod-name:ledger-0",
        "k8s:pod-owner:StatefulSet:ledger",
        "k8s:pod-owner-uid:StatefulSet:9b2d3c4e-5f60-4718-8293-a4b5c6d7e8f9",
        "k8s:pod-label:statefulset.kubernetes.io/pod-name:ledger-0",
        "k8s:container-name:ledger",
        "k8s:container-image:quay.io/example/ledger:2.0.3",
        "k8s:pod-init-image:registry.access.redhat.com/ubi9/ubi-minimal:9.4",
    ] {
        assert!(got.contains(&want.to_string()), "{want} in {got:?}");
    }
    // The ID must match exactly: a prefix, another pod's UID or an unknown ID find nothing.
    assert!(client
        .lookup(LEDGER_POD, &LEDGER[..63])
        .await
        .unwrap()
        .is_none());
    assert!(client.lookup(WEB_POD, LEDGER).await.unwrap().is_none());
}

#[tokio::test]
async fn a_just_started_container_is_found_on_the_third_poll() {
    // Twice the pod has the container still waiting (no containerID), then it is running.
    let kubelet = Kubelet::start(&[STARTING, STARTING, STARTED]).await;
    let (_dir, mut cfg) = setup(&kubelet);
    cfg.container_wait = Duration::from_secs(10);
    cfg.poll_interval = Duration::from_millis(30);
    // A long TTL: polling must fetch a fresh list anyway.
    cfg.cache_ttl = Duration::from_secs(60);
    let client = KubeletClient::new(cfg);
    let started = Instant::now();
    let got = found(&client, API_POD, API).await;
    assert!(
        got.contains(&"k8s:container-name:api".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"k8s:pod-label:app:api".to_string()),
        "{got:?}"
    );
    assert_eq!(kubelet.seen().len(), 3, "one request per poll");
    assert!(started.elapsed() >= Duration::from_millis(60));
    // Found: the next attestation uses the cached list.
    found(&client, API_POD, API).await;
    assert_eq!(kubelet.seen().len(), 3);
}

#[tokio::test]
async fn unknown_pod_or_container_gives_up_after_the_wait() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, mut cfg) = setup(&kubelet);
    // A wait long enough for a second poll even when one HTTPS request to the fake kubelet
    // takes hundreds of milliseconds on a loaded machine.
    cfg.container_wait = Duration::from_millis(1000);
    cfg.poll_interval = Duration::from_millis(100);
    let client = KubeletClient::new(cfg);
    let unknown_pod = "0f8e2a56-9c41-4d7b-a3e0-5b6c7d8e9f01";
    assert!(client.lookup(unknown_pod, WEB_APP).await.unwrap().is_none());
    let polls = kubelet.seen().len();
    // Polled again within the wait, and no more often than the poll interval allows.
    assert!((2..=11).contains(&polls), "{polls} requests");
    // Known pod, unknown container.
    assert!(client
        .lookup(WEB_POD, &"0".repeat(64))
        .await
        .unwrap()
        .is_none());
    // The never-failing entry point: no selectors, and why.
    assert!(client.selectors(unknown_pod, WEB_APP).await.is_empty());
    let why = client.last_problem().unwrap();
    assert!(
        why.contains(unknown_pod) && why.contains("--kubelet-container-wait"),
        "{why}"
    );
}

#[tokio::test]
async fn pod_list_is_cached_and_fetched_once_at_a_time() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    kubelet.set(|s| s.delay = Duration::from_millis(200));
    let (_dir, cfg) = setup(&kubelet);
    let client = Arc::new(KubeletClient::new(cfg));
    // Eight concurrent attestations with nothing cached: one request, the rest wait for it.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = client.clone();
        set.spawn(async move { c.lookup(WEB_POD, WEB_APP).await.unwrap().is_some() });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap());
    }
    assert_eq!(kubelet.seen().len(), 1);
    assert_eq!(client.requests(), 1);
    // Two more within the TTL: still one request.
    found(&client, WEB_POD, WEB_APP).await;
    found(&client, WEB_POD, WEB_ENVOY).await;
    assert_eq!(kubelet.seen().len(), 1);
}

#[tokio::test]
async fn cache_expires_after_the_ttl() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, mut cfg) = setup(&kubelet);
    cfg.cache_ttl = Duration::from_millis(100);
    let client = KubeletClient::new(cfg);
    found(&client, WEB_POD, WEB_APP).await;
    found(&client, WEB_POD, WEB_APP).await;
    assert_eq!(kubelet.seen().len(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    found(&client, WEB_POD, WEB_APP).await;
    assert_eq!(kubelet.seen().len(), 2);
}

#[tokio::test]
async fn token_is_re_read_when_it_rotates() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (dir, mut cfg) = setup(&kubelet);
    cfg.cache_ttl = Duration::ZERO;
    let client = KubeletClient::new(cfg);
    found(&client, WEB_POD, WEB_APP).await;

    // The kubelet now wants the rotated token; the file still has the old one.
    const ROTATED: &str = "eyJhbGciOiJSUzI1NiJ9.agent-token-2.sig";
    kubelet.set(|s| s.token = Some(ROTATED.into()));
    let (error, hint) = request_error(client.lookup(WEB_POD, WEB_APP).await.unwrap_err());
    assert!(error.contains("401"), "{error}");
    assert!(
        hint.contains("bearer token")
            && hint.contains(&dir.path().join("token").display().to_string()),
        "{hint}"
    );
    // The kubelet (projected volume) writes the new token: the next request uses it.
    std::fs::write(dir.path().join("token"), ROTATED).unwrap();
    found(&client, WEB_POD, WEB_APP).await;
    let seen = kubelet.seen();
    assert_eq!(
        seen.iter()
            .map(|a| a.as_deref().unwrap_or(""))
            .collect::<Vec<_>>(),
        [
            format!("Bearer {TOKEN}"),
            format!("Bearer {TOKEN}"),
            format!("Bearer {ROTATED}")
        ]
    );

    // No token file: said so, no request sent.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let e = client.lookup(WEB_POD, WEB_APP).await.unwrap_err();
    assert!(matches!(e, KubeletError::Token { .. }), "{e:?}");
    assert!(e.to_string().contains("--kubelet-token-path"), "{e}");
    assert_eq!(kubelet.seen().len(), 3);
}

#[tokio::test]
async fn wrong_ca_is_refused_with_a_hint() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (dir, mut cfg) = setup(&kubelet);
    cfg.cache_ttl = Duration::ZERO;
    // Another cluster's CA.
    let (other_ca, _, _) = ca_and_server_cert();
    std::fs::write(dir.path().join("ca.crt"), other_ca).unwrap();
    let client = KubeletClient::new(cfg);
    let e = client.lookup(WEB_POD, WEB_APP).await.unwrap_err();
    let msg = e.to_string();
    let (error, hint) = request_error(e);
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(hint.contains("--kubelet-ca-path"), "{hint}");
    assert!(msg.contains("/pods"), "{msg}");
    // No request reached the kubelet's HTTP layer (so no token was shown to it).
    assert!(kubelet.seen().is_empty());

    // The right CA is picked up without a restart.
    std::fs::write(dir.path().join("ca.crt"), &kubelet.ca_pem).unwrap();
    found(&client, WEB_POD, WEB_APP).await;

    // Not a CA at all.
    std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
    let e = client.lookup(WEB_POD, WEB_APP).await.unwrap_err();
    assert!(matches!(e, KubeletError::Ca { .. }), "{e:?}");
    assert!(e.to_string().contains("--kubelet-ca-path"), "{e}");
}

#[tokio::test]
async fn refusals_and_garbage_name_what_to_check() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, mut cfg) = setup(&kubelet);
    cfg.cache_ttl = Duration::ZERO;
    let client = KubeletClient::new(cfg);

    kubelet.set(|s| s.status = Some(403));
    let (error, hint) = request_error(client.lookup(WEB_POD, WEB_APP).await.unwrap_err());
    assert!(error.contains("403"), "{error}");
    assert!(
        hint.contains("RBAC") && hint.contains("nodes/proxy"),
        "{hint}"
    );

    kubelet.set(|s| {
        s.status = None;
        s.bodies = VecDeque::from(["<html>hello</html>".to_string()]);
    });
    let (_, hint) = request_error(client.lookup(WEB_POD, WEB_APP).await.unwrap_err());
    assert!(hint.contains("not a pod list"), "{hint}");

    // null where lists and maps are expected is fine.
    kubelet.set(|s| {
        s.bodies = VecDeque::from([
            r#"{"kind":"PodList","items":[{"metadata":{"uid":"u1","labels":null,"ownerReferences":null},"spec":null,"status":{"containerStatuses":null}}]}"#.to_string(),
        ]);
    });
    assert!(client.lookup("u1", WEB_APP).await.unwrap().is_none());
}

#[tokio::test]
async fn pod_on_another_node_is_not_trusted() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, mut cfg) = setup(&kubelet);
    cfg.node_name = Some("node-2".into());
    let client = KubeletClient::new(cfg);
    let e = client.lookup(WEB_POD, WEB_APP).await.unwrap_err();
    assert!(matches!(e, KubeletError::WrongNode { .. }), "{e:?}");
    assert!(e.to_string().contains("--kubelet-url"), "{e}");
    assert!(client.selectors(WEB_POD, WEB_APP).await.is_empty());
}

#[tokio::test]
async fn read_only_port_is_plain_http_without_a_token() {
    let kubelet = Kubelet::start_with(&[CONTAINERD], false).await;
    let mut cfg = KubeletConfig::resolve(
        Some("https://127.0.0.1:10250".into()),
        Some(kubelet.port),
        Some("/nonexistent/ca.crt".into()),
        Some("/nonexistent/token".into()),
        Some("0"),
        None,
    )
    .unwrap();
    assert_eq!(cfg.url, kubelet.url);
    assert!(cfg.is_read_only());
    cfg.cache_ttl = Duration::ZERO;
    let client = KubeletClient::new(cfg);
    found(&client, WEB_POD, WEB_APP).await;
    assert_eq!(
        kubelet.seen(),
        [None],
        "no Authorization header over plain HTTP"
    );
}

#[tokio::test]
async fn kubelet_down_is_an_error_with_a_hint_and_warns_rate_limited() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = ca_and_server_cert();
    std::fs::write(dir.path().join("ca.crt"), ca).unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let cfg = KubeletConfig {
        ca_path: dir.path().join("ca.crt"),
        token_path: dir.path().join("token"),
        cache_ttl: Duration::ZERO,
        ..KubeletConfig::new(format!("https://127.0.0.1:{port}"))
    };
    let client = KubeletClient::new(cfg);
    let (error, hint) = request_error(client.lookup(WEB_POD, WEB_APP).await.unwrap_err());
    assert!(error.contains("connect"), "{error}");
    assert!(hint.contains("is the kubelet running"), "{hint}");

    assert!(client.selectors(WEB_POD, WEB_APP).await.is_empty());
    assert!(client.selectors(WEB_POD, WEB_APP).await.is_empty());
    let why = client.last_problem().unwrap();
    assert!(
        why.contains("unix and cgroup selectors still apply") && why.contains("--kubelet-url"),
        "{why}"
    );
    // The first warned, the second was within WARN_EVERY.
    assert!(client.warned_at.lock().unwrap().is_some());
    assert_eq!(client.suppressed.load(Ordering::Relaxed), 1);
}

// ---------------------------------------------------------------------------------------------
// Through the workload attestor: cgroup → kubelet.
// ---------------------------------------------------------------------------------------------

const PID: i32 = 4242;

/// A fake procfs with one process in `cgroup`, its executable at `<tmp>/bin/app`.
fn fake_proc(cgroup: &str) -> (tempfile::TempDir, Arc<ProcessPin>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(PID.to_string());
    std::fs::create_dir_all(&p).unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::write(
        p.join("stat"),
        format!("{PID} (app) S 1 {PID} {PID} 0 -1 4194560 1234 0 0 0 5 3 0 0 20 0 1 0 777 12345678 456 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"),
    )
    .unwrap();
    std::fs::write(
        p.join("status"),
        "Name:\tapp\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t\n",
    )
    .unwrap();
    std::fs::write(p.join("cgroup"), cgroup).unwrap();
    std::fs::write(dir.path().join("bin").join("app"), b"\x7fELF app").unwrap();
    std::os::unix::fs::symlink(dir.path().join("bin").join("app"), p.join("exe")).unwrap();
    let pin = Arc::new(ProcessPin::pin_in(dir.path(), PID).unwrap());
    (dir, pin)
}

fn attestor(root: &Path, client: KubeletClient) -> Arc<WorkloadAttestor> {
    Arc::new(WorkloadAttestor::with_proc_root(root.to_path_buf()).with_kubelet(client))
}

fn set_strings(s: &SelectorSet) -> Vec<String> {
    s.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn attest_async_adds_kubelet_selectors_for_cgroup_v1_and_v2() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, cfg) = setup(&kubelet);
    let crio = Kubelet::start(&[CRIO]).await;
    let (_crio_dir, crio_cfg) = setup(&crio);
    let underscored = |uid: &str| uid.replace('-', "_");
    for (name, cgroup, cfg, pod, container) in [
        (
            "containerd, cgroup v2, systemd driver",
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{WEB_APP}.scope\n",
                underscored(WEB_POD)
            ),
            cfg.clone(),
            WEB_POD,
            "app",
        ),
        (
            "containerd, cgroup v1, cgroupfs driver, static pod",
            format!(
                "12:pids:/kubepods/burstable/pod{ETCD_POD}/{ETCD}\n4:memory:/kubepods/burstable/pod{ETCD_POD}/{ETCD}\n1:name=systemd:/kubepods/burstable/pod{ETCD_POD}/{ETCD}\n"
            ),
            cfg.clone(),
            ETCD_POD,
            "etcd",
        ),
        (
            "CRI-O, cgroup v1, systemd driver",
            format!(
                "11:cpu,cpuacct:/kubepods.slice/kubepods-pod{pod}.slice/crio-{LEDGER}.scope\n10:memory:/kubepods.slice/kubepods-pod{pod}.slice/crio-{LEDGER}.scope\n1:name=systemd:/kubepods.slice/kubepods-pod{pod}.slice/crio-{LEDGER}.scope\n",
                pod = underscored(LEDGER_POD)
            ),
            crio_cfg.clone(),
            LEDGER_POD,
            "ledger",
        ),
        (
            "CRI-O, cgroup v2, crun's container sub-cgroup",
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{LEDGER}.scope/container\n",
                underscored(LEDGER_POD)
            ),
            crio_cfg.clone(),
            LEDGER_POD,
            "ledger",
        ),
    ] {
        let (proc_dir, pin) = fake_proc(&cgroup);
        let a = attestor(proc_dir.path(), KubeletClient::new(cfg));
        let got = set_strings(&a.attest_async(pin.clone(), 1000, 1000).await.unwrap().selectors);
        for want in [
            "unix:uid:1000".to_string(),
            format!("k8s:pod-uid:{pod}"),
            format!("k8s:container-name:{container}"),
            "k8s:node-name:node-1".to_string(),
        ] {
            assert!(got.contains(&want), "{name}: {want} in {got:?}");
        }
        assert!(got.iter().any(|s| s.starts_with("k8s:ns:")), "{name}: {got:?}");
        assert!(got.iter().any(|s| s.starts_with("k8s:container-id:")), "{name}");
        // The blocking part alone gives exactly the non-kubelet selectors.
        let plain = set_strings(&a.attest(&pin, 1000, 1000).unwrap().selectors);
        assert!(plain.iter().all(|s| got.contains(s)), "{name}");
        assert!(!plain.iter().any(|s| s.starts_with("k8s:ns:")), "{name}");
    }
}

#[tokio::test]
async fn no_container_or_no_pod_in_the_cgroup_means_no_kubelet_request() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, cfg) = setup(&kubelet);
    for cgroup in [
        // CRI-O's conmon: in the pod's cgroup, not a container's.
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{WEB_APP}.scope\n",
            WEB_POD.replace('-', "_")
        ),
        "0::/system.slice/nginx.service\n".to_string(),
        format!("0::/system.slice/docker-{WEB_APP}.scope\n"),
    ] {
        let (proc_dir, pin) = fake_proc(&cgroup);
        let a = attestor(proc_dir.path(), KubeletClient::new(cfg.clone()));
        let got = a.attest_async(pin, 0, 0).await.unwrap();
        assert!(
            !got.selectors.iter().any(|s| s.value().starts_with("ns:")),
            "{cgroup}"
        );
    }
    assert!(kubelet.seen().is_empty());
}

#[test]
fn user_delegated_subtrees_are_recognised() {
    let pod = format!("pod{WEB_POD}/{WEB_APP}");
    for (text, want) in [
        (format!("0::/kubepods/besteffort/{pod}\n"), false),
        (
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{WEB_APP}.scope\n",
                WEB_POD.replace('-', "_")
            ),
            false,
        ),
        (
            format!("0::/system.slice/docker-{ETCD}.scope/kubelet.slice/kubelet-kubepods.slice/{pod}\n"),
            false,
        ),
        ("0::/system.slice/nginx.service\n".to_string(), false),
        (
            format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods/besteffort/{pod}\n"),
            true,
        ),
        (format!("0::/user.slice/x/kubepods/besteffort/{pod}\n"), true),
        // cgroup v1: only the name=systemd hierarchy is delegated; one line is enough.
        (
            format!("12:pids:/\n1:name=systemd:/user.slice/user-1000.slice/user@1000.service/kubepods/besteffort/{pod}\n"),
            true,
        ),
        // Seen from inside a container's cgroup namespace.
        (
            format!("0::/../../user.slice/user-1000.slice/session-4.scope/kubepods/{pod}\n"),
            true,
        ),
    ] {
        assert_eq!(under_user_delegation(&text), want, "{text}");
    }
}

#[tokio::test]
async fn pod_cgroup_in_a_user_delegated_subtree_gets_no_kubelet_selectors() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    let (_dir, cfg) = setup(&kubelet);
    // An unprivileged user made a cgroup named after the web pod's app container in its own
    // delegated subtree and moved a process there.
    let cgroup = format!(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods/besteffort/pod{WEB_POD}/{WEB_APP}\n"
    );
    let (proc_dir, pin) = fake_proc(&cgroup);
    let a = attestor(proc_dir.path(), KubeletClient::new(cfg));
    let got = set_strings(&a.attest_async(pin, 1000, 1000).await.unwrap().selectors);
    assert!(!got.iter().any(|s| s.starts_with("k8s:ns:")), "{got:?}");
    assert!(!got.iter().any(|s| s.starts_with("k8s:sa:")), "{got:?}");
    assert!(got.contains(&"unix:uid:1000".to_string()), "{got:?}");
    assert!(kubelet.seen().is_empty(), "the kubelet was not asked");
    // The cgroup parser already refuses names below a user manager (the guard in
    // attest_async is the second line of defence).
    assert!(
        !got.iter().any(|s| s.starts_with("k8s:pod-uid:")),
        "{got:?}"
    );
    assert!(
        got.contains(&"systemd:id:user@1000.service".to_string()),
        "{got:?}"
    );
}

#[tokio::test]
async fn kubelet_down_leaves_unix_and_cgroup_selectors() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cgroup = format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{WEB_APP}.scope\n",
        WEB_POD.replace('-', "_")
    );
    let (proc_dir, pin) = fake_proc(&cgroup);
    let (ca, _, _) = ca_and_server_cert();
    std::fs::write(proc_dir.path().join("ca.crt"), ca).unwrap();
    std::fs::write(proc_dir.path().join("token"), TOKEN).unwrap();
    let cfg = KubeletConfig {
        ca_path: proc_dir.path().join("ca.crt"),
        token_path: proc_dir.path().join("token"),
        cache_ttl: Duration::ZERO,
        ..KubeletConfig::new(format!("https://127.0.0.1:{port}"))
    };
    let plain = WorkloadAttestor::with_proc_root(proc_dir.path().to_path_buf())
        .attest(&pin, 1000, 1000)
        .unwrap();
    assert!(plain
        .selectors
        .iter()
        .any(|s| s.to_string() == "unix:uid:1000"));

    let a = attestor(proc_dir.path(), KubeletClient::new(cfg.clone()));
    let got = a.attest_async(pin.clone(), 1000, 1000).await.unwrap();
    assert_eq!(got.selectors, plain.selectors);
    let why = a.kubelet().unwrap().last_problem().unwrap();
    assert!(why.contains("is the kubelet running"), "{why}");

    // A missing CA file: the same, and the message names the file.
    let cfg = KubeletConfig {
        ca_path: proc_dir.path().join("missing-ca.crt"),
        ..cfg
    };
    let a = attestor(proc_dir.path(), KubeletClient::new(cfg));
    let got = a.attest_async(pin.clone(), 1000, 1000).await.unwrap();
    assert_eq!(got.selectors, plain.selectors);
    let why = a.kubelet().unwrap().last_problem().unwrap();
    assert!(
        why.contains("kubelet CA") && why.contains("missing-ca.crt"),
        "{why}"
    );
}

#[tokio::test]
async fn process_gone_during_the_kubelet_step_is_gone() {
    let kubelet = Kubelet::start(&[CONTAINERD]).await;
    kubelet.set(|s| s.delay = Duration::from_millis(300));
    let (_dir, cfg) = setup(&kubelet);
    let cgroup = format!(
        "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{WEB_APP}.scope\n",
        WEB_POD.replace('-', "_")
    );
    let (proc_dir, pin) = fake_proc(&cgroup);
    let a = attestor(proc_dir.path(), KubeletClient::new(cfg));
    let task = {
        let (a, pin) = (a.clone(), pin.clone());
        tokio::spawn(async move { a.attest_async(pin, 0, 0).await })
    };
    // While the kubelet answers, the PID is reused by another process.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stat = proc_dir.path().join(PID.to_string()).join("stat");
    let text = std::fs::read_to_string(&stat).unwrap();
    std::fs::write(&stat, text.replace(" 777 ", " 778 ")).unwrap();
    let e = task.await.unwrap().unwrap_err();
    assert!(
        matches!(e, crate::workload_attestor::AttestError::Gone { pid: PID }),
        "{e:?}"
    );
    assert_eq!(kubelet.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------------------------

#[test]
fn resolve_defaults_and_read_only_port() {
    let c = KubeletConfig::resolve(None, None, None, None, None, None).unwrap();
    assert_eq!(c.url, DEFAULT_KUBELET_URL);
    assert_eq!(c.pods_url(), "https://127.0.0.1:10250/pods");
    assert_eq!(c.ca_path, PathBuf::from(DEFAULT_CA_PATH));
    assert_eq!(c.token_path, PathBuf::from(DEFAULT_TOKEN_PATH));
    assert_eq!(c.container_wait, DEFAULT_CONTAINER_WAIT);
    assert!(!c.is_read_only());

    let c = KubeletConfig::resolve(
        Some("https://10.0.0.11:10250/".into()),
        None,
        None,
        None,
        Some("3s"),
        Some("node-1".into()),
    )
    .unwrap();
    assert_eq!(c.pods_url(), "https://10.0.0.11:10250/pods");
    assert_eq!(c.container_wait, Duration::from_secs(3));
    assert_eq!(c.node_name.as_deref(), Some("node-1"));

    for (url, port, want) in [
        (None, 10255, "http://127.0.0.1:10255"),
        (
            Some("https://10.0.0.11:10250"),
            10255,
            "http://10.0.0.11:10255",
        ),
        (
            Some("https://node-1.example"),
            10255,
            "http://node-1.example:10255",
        ),
        (
            Some("https://[fd00::11]:10250"),
            10255,
            "http://[fd00::11]:10255",
        ),
    ] {
        let c =
            KubeletConfig::resolve(url.map(Into::into), Some(port), None, None, Some("0"), None)
                .unwrap();
        assert_eq!(c.url, want);
        assert!(c.is_read_only());
        assert_eq!(c.container_wait, Duration::ZERO);
    }
}

#[test]
fn resolve_refuses_bad_settings() {
    for (url, port, wait, node, want) in [
        (
            Some("http://127.0.0.1:10255"),
            None,
            None,
            None,
            "kubelet_read_only_port",
        ),
        (Some("127.0.0.1:10250"), None, None, None, "kubelet_url"),
        (
            Some("https://127.0.0.1:10250/pods"),
            None,
            None,
            None,
            "no path",
        ),
        (Some("https://127.0.0.1:x"), None, None, None, "bad port"),
        (Some("https://"), None, None, None, "missing host"),
        (None, Some(0), None, None, "kubelet_read_only_port"),
        (None, None, Some("soon"), None, "kubelet_container_wait"),
        (None, None, None, Some("node 1"), "node_name"),
    ] {
        let e = KubeletConfig::resolve(
            url.map(Into::into),
            port,
            None,
            None,
            wait,
            node.map(Into::into),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains(want), "{url:?} {port:?}: {e:#}");
    }
}
