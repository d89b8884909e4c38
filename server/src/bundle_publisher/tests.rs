//! Bundle publisher tests against the fake Kubernetes API server over real HTTPS on loopback
//! (`sigil_testkit::fake_k8s`: ConfigMaps in memory, bearer-checked).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil::TrustDomain;
use tracing::instrument::WithSubscriber as _;

use super::fake_k8s::FakeK8s;
use super::*;
use crate::sync::SyncEvents;

const NS: &str = "sigil";

/// A fake cluster and the publisher's config pointing at it.
struct Env {
    fake: FakeK8s,
    dir: tempfile::TempDir,
    cfg: K8sConfigMapConfig,
}

impl Env {
    fn new() -> Env {
        let fake = FakeK8s::start();
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, token_file) = fake.write_credentials(dir.path());
        let cfg = K8sConfigMapConfig {
            namespace: NS.into(),
            name: DEFAULT_NAME.into(),
            key: DEFAULT_KEY.into(),
            api: ApiServerAccess {
                url: fake.url.clone(),
                token_file,
                ca_file,
            },
        };
        Env { fake, dir, cfg }
    }

    fn publisher(&self) -> ConfigMapPublisher {
        ConfigMapPublisher::new(self.cfg.clone()).with_timing(fast())
    }

    fn stored(&self) -> Option<String> {
        self.fake.configmap_data(NS, DEFAULT_NAME, DEFAULT_KEY)
    }
}

fn fast() -> Timing {
    Timing {
        retry_first: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        resync: Duration::from_secs(60),
        http_timeout: Duration::from_secs(5),
    }
}

/// A bundle of `n` fresh self-signed roots.
fn bundle(n: usize, sequence: u64) -> Bundle {
    let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
    for i in 0..n {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("root {i}"));
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        b.x509_authorities
            .push(p.self_signed(&key).unwrap().der().to_vec());
    }
    b.sequence_number = sequence;
    b
}

/// Polls `f` until it holds (fails the test after 10 s).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines written through a test subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running [`ConfigMapPublisher::run`] with its bundle, change hub and log.
struct Running {
    source: Arc<RwLock<Bundle>>,
    events: SyncEvents,
    logs: Logs,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(publisher: ConfigMapPublisher, first: Bundle) -> Running {
        let source = Arc::new(RwLock::new(first));
        let events = SyncEvents::new();
        let logs = Logs::default();
        let (stop, stop_rx) = watch::channel(false);
        let run = publisher.run(source.clone(), events.subscribe(), stop_rx);
        let task = tokio::spawn(run.with_subscriber(logs.subscriber()));
        Running {
            source,
            events,
            logs,
            stop,
            task,
        }
    }

    /// Replaces the bundle and announces it, as the server does.
    async fn change_bundle(&self, b: Bundle) {
        let seq = b.sequence_number;
        *self.source.write().await = b;
        self.events.bundle_changed(seq);
    }

    async fn shut_down(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the publisher stops on shutdown")
            .unwrap();
    }
}

#[test]
fn resolve_defaults_overrides_and_errors() -> anyhow::Result<()> {
    let outside = InCluster::default();
    let in_pod = InCluster {
        api_server_url: Some("https://10.96.0.1:443".into()),
        namespace: Some("spire-system".into()),
    };
    assert_eq!(
        resolve_k8s_configmap(None, &in_pod)?,
        None,
        "off by default"
    );

    let c = resolve_k8s_configmap(Some(FileK8sConfigMap::default()), &in_pod)?.unwrap();
    assert_eq!(c.namespace, "spire-system", "the pod's namespace");
    assert_eq!(c.name, "sigil-bundle");
    assert_eq!(c.key, "bundle.pem");
    assert_eq!(c.api.url, "https://10.96.0.1:443");
    assert_eq!(
        c.api.token_file,
        PathBuf::from(crate::kube::IN_CLUSTER_TOKEN_FILE)
    );
    assert_eq!(
        c.api.ca_file,
        PathBuf::from(crate::kube::IN_CLUSTER_CA_FILE)
    );

    let file = FileK8sConfigMap {
        api_server_url: Some("https://api.example:6443/".into()),
        ..Default::default()
    };
    let c = resolve_k8s_configmap(Some(file.clone()), &outside)?.unwrap();
    assert_eq!(c.namespace, "sigil", "outside a pod");
    assert_eq!(c.api.url, "https://api.example:6443");

    let over = file.overridden_by(FileK8sConfigMap {
        namespace: Some("other".into()),
        name: Some("trust.bundle".into()),
        key: Some("ca_bundle.pem".into()),
        api_ca_file: Some("/ca.pem".into()),
        ..Default::default()
    });
    let c = resolve_k8s_configmap(Some(over), &in_pod)?.unwrap();
    assert_eq!(
        (c.namespace.as_str(), c.name.as_str(), c.key.as_str()),
        ("other", "trust.bundle", "ca_bundle.pem")
    );
    assert_eq!(c.api.url, "https://api.example:6443", "kept from the file");
    assert_eq!(c.api.ca_file, PathBuf::from("/ca.pem"));

    let err = resolve_k8s_configmap(Some(FileK8sConfigMap::default()), &outside)
        .expect_err("no API server outside a pod");
    assert!(
        err.to_string()
            .contains("bundle_publisher.k8s_configmap.api_server_url is required"),
        "{err}"
    );
    for (f, key) in [
        (
            FileK8sConfigMap {
                namespace: Some("Sigil".into()),
                ..Default::default()
            },
            "namespace",
        ),
        (
            FileK8sConfigMap {
                name: Some("sigil/bundle".into()),
                ..Default::default()
            },
            "name",
        ),
        (
            FileK8sConfigMap {
                key: Some("a/b.pem".into()),
                ..Default::default()
            },
            "key",
        ),
        (
            FileK8sConfigMap {
                key: Some("..".into()),
                ..Default::default()
            },
            "key",
        ),
        (
            FileK8sConfigMap {
                api_server_url: Some("http://api".into()),
                ..Default::default()
            },
            "api_server_url",
        ),
    ] {
        let err = resolve_k8s_configmap(Some(f), &in_pod).expect_err(key);
        assert!(
            err.to_string()
                .contains(&format!("bundle_publisher.k8s_configmap.{key}")),
            "{key}: {err}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn creates_the_configmap_when_missing_then_leaves_it_alone() {
    let env = Env::new();
    let p = env.publisher();
    let pem = bundle(1, 1).to_pem();
    assert_eq!(p.publish(&pem).await.unwrap(), Outcome::Created);
    assert_eq!(env.stored().as_deref(), Some(pem.as_str()));
    let cm = env.fake.configmap(NS, DEFAULT_NAME).unwrap();
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sigil-server"
    );
    assert_eq!(
        env.fake.count("POST /api/v1/namespaces/sigil/configmaps"),
        1
    );

    // The same bundle again: read, not written.
    assert_eq!(p.publish(&pem).await.unwrap(), Outcome::Unchanged);
    assert_eq!(env.fake.count("POST "), 1);
    assert_eq!(env.fake.count("PATCH "), 0);
}

#[tokio::test]
async fn updates_only_its_key_of_an_existing_configmap() {
    let env = Env::new();
    env.fake.set_configmap(
        NS,
        DEFAULT_NAME,
        &[(DEFAULT_KEY, "stale"), ("other.txt", "keep me")],
    );
    let pem = bundle(2, 3).to_pem();
    assert_eq!(
        env.publisher().publish(&pem).await.unwrap(),
        Outcome::Updated
    );
    assert_eq!(env.stored().as_deref(), Some(pem.as_str()));
    assert_eq!(
        env.fake
            .configmap_data(NS, DEFAULT_NAME, "other.txt")
            .as_deref(),
        Some("keep me")
    );
    assert_eq!(
        env.fake
            .count("PATCH /api/v1/namespaces/sigil/configmaps/sigil-bundle"),
        1
    );
    assert_eq!(env.fake.count("POST "), 0);
}

#[tokio::test]
async fn a_conflict_starts_the_write_over() {
    let env = Env::new();
    env.fake
        .set_configmap(NS, DEFAULT_NAME, &[(DEFAULT_KEY, "stale")]);
    env.fake.conflict_configmap_writes(2);
    let pem = bundle(1, 1).to_pem();
    assert_eq!(
        env.publisher().publish(&pem).await.unwrap(),
        Outcome::Updated
    );
    assert_eq!(env.stored().as_deref(), Some(pem.as_str()));
    assert_eq!(
        env.fake.count("GET /api/v1/namespaces/sigil/configmaps/"),
        3
    );

    // Conflicts without end: the write fails (and run() retries it later).
    env.fake.conflict_configmap_writes(usize::MAX);
    let err = env
        .publisher()
        .publish(&bundle(1, 2).to_pem())
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Conflicts(_)), "{err}");
}

#[tokio::test]
async fn bad_credentials_and_rbac_errors_come_with_a_hint() {
    let env = Env::new();
    let p = env.publisher();
    let pem = bundle(1, 1).to_pem();

    env.fake.fail_api_with(Some(403));
    let err = p.publish(&pem).await.unwrap_err();
    assert!(
        matches!(&err, PublishError::Api(e) if e.status().map(|s| s.as_u16()) == Some(403)),
        "{err}"
    );
    let hint = p.hint(&err).unwrap();
    assert!(
        hint.contains("RBAC") && hint.contains("get, create and patch on configmaps"),
        "{hint}"
    );
    assert!(hint.contains("namespace sigil"), "{hint}");
    env.fake.fail_api_with(None);

    // A token the API server does not know.
    std::fs::write(&env.cfg.api.token_file, "wrong-token\n").unwrap();
    let err = p.publish(&pem).await.unwrap_err();
    assert!(p.hint(&err).unwrap().contains("api_token_file"), "{err}");

    // A missing CA file is reported with its key, not a panic.
    let mut cfg = env.cfg.clone();
    cfg.api.ca_file = env.dir.path().join("missing-ca.pem");
    let p = ConfigMapPublisher::new(cfg);
    let err = p.publish(&pem).await.unwrap_err();
    assert!(err.to_string().contains("api_ca_file"), "{err}");

    // Nothing listening: reachability.
    let mut cfg = env.cfg.clone();
    cfg.api.url = "https://127.0.0.1:1".into();
    let p = ConfigMapPublisher::new(cfg);
    let err = p.publish(&pem).await.unwrap_err();
    assert!(p.hint(&err).unwrap().contains("reachable"), "{err}");
    assert!(env.stored().is_none());
}

#[tokio::test]
async fn run_retries_after_server_errors_then_publishes() {
    let env = Env::new();
    env.fake.fail_api_with(Some(500));
    let first = bundle(1, 1);
    let pem = first.to_pem();
    let running = Running::start(env.publisher(), first);
    let gets = || {
        env.fake
            .count("GET /api/v1/namespaces/sigil/configmaps/sigil-bundle")
    };
    eventually("three failed attempts", || gets() >= 3).await;
    assert!(env.stored().is_none());
    env.fake.fail_api_with(None);
    eventually("the ConfigMap", || {
        env.stored().as_deref() == Some(pem.as_str())
    })
    .await;
    let logs = running.logs.text();
    assert!(
        logs.contains("publishing the trust bundle to the ConfigMap failed; will retry")
            && logs.contains("HTTP 500"),
        "{logs}"
    );
    eventually("the info line", || {
        running
            .logs
            .text()
            .contains("trust bundle published to the ConfigMap")
    })
    .await;
    let logs = running.logs.text();
    let published: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("trust bundle published to the ConfigMap"))
        .collect();
    assert_eq!(published.len(), 1, "{logs}");
    assert!(
        published[0].contains("INFO")
            && published[0].contains("namespace=sigil")
            && published[0].contains("configmap=sigil-bundle")
            && published[0].contains("key=bundle.pem")
            && published[0].contains("roots=1")
            && published[0].contains("outcome=created"),
        "{}",
        published[0]
    );
    running.shut_down().await;
}

#[tokio::test]
async fn run_logs_forbidden_with_the_rbac_hint_and_never_gives_up() {
    let env = Env::new();
    env.fake.fail_api_with(Some(403));
    let first = bundle(1, 1);
    let pem = first.to_pem();
    let running = Running::start(env.publisher(), first);
    eventually("the RBAC hint in the log", || {
        let logs = running.logs.text();
        logs.contains("WARN") && logs.contains("HTTP 403") && logs.contains("RBAC")
    })
    .await;
    let logs = running.logs.text();
    assert!(
        logs.contains("get, create and patch on configmaps in namespace sigil")
            && logs.contains("resourceNames [\"sigil-bundle\"]"),
        "{logs}"
    );
    // Once the Role is there, it goes through.
    env.fake.fail_api_with(None);
    eventually("the ConfigMap", || {
        env.stored().as_deref() == Some(pem.as_str())
    })
    .await;
    running.shut_down().await;
}

#[tokio::test]
async fn run_republishes_when_the_bundle_changes_and_repairs_drift() {
    let env = Env::new();
    let publisher = env.publisher().with_timing(Timing {
        resync: Duration::from_millis(300),
        ..fast()
    });
    let first = bundle(1, 1);
    let running = Running::start(publisher, first.clone());
    eventually("the first bundle", || {
        env.stored().as_deref() == Some(first.to_pem().as_str())
    })
    .await;

    // Entry changes wake the publisher but are not bundle changes: nothing is written.
    let patches = env.fake.count("PATCH ");
    running.events.entries_changed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.fake.count("PATCH "), patches);

    // A new bundle (a second root, as in a CA rotation): published right away.
    let second = bundle(2, 2);
    running.change_bundle(second.clone()).await;
    eventually("the second bundle", || {
        env.stored().as_deref() == Some(second.to_pem().as_str())
    })
    .await;
    eventually("two info lines", || {
        running
            .logs
            .text()
            .matches("trust bundle published to the ConfigMap")
            .count()
            == 2
    })
    .await;
    assert!(running.logs.text().contains("roots=2"));

    // Deleted by hand: put back at the next resync.
    env.fake.state.lock().unwrap().configmaps.clear();
    eventually("the ConfigMap re-created", || {
        env.stored().as_deref() == Some(second.to_pem().as_str())
    })
    .await;
    running.shut_down().await;
}
