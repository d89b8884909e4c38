//! The Kubernetes manifests in `deploy/k8s/`: every kustomization renders (`kubectl kustomize`),
//! every rendered object validates offline against the Kubernetes API schemas in strict mode
//! (`kubernetes-validate --strict`, for the Kubernetes version of the `kubectl` on the machine),
//! and the settings that decide what the deployment may do are what they should be: the agent's
//! host access (hostPID, the socket hostPath, its projected token), nothing privileged, nothing
//! escalating, probes and limits everywhere, the server non-root, and the config files, flags,
//! ports and paths agreeing with each other.
//!
//! The config files the manifests and the systemd units ship (ConfigMaps from server.toml and
//! agent.toml, `deploy/systemd/*.toml`) are also handed to the real binaries with the arguments
//! the manifests and units give them: `sigil-server` must get ready with its file (only in-pod
//! paths — data dir, sockets, the service-account files — are pointed at a temp dir), and
//! `sigil-agent` must accept its file and flags (it logs "sigil-agent starting" only after the
//! whole configuration resolved; attesting is not tried here: there is no cluster).
//!
//! The server runs as in a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` name a fake API server
//! (`sigil_testkit::fake_k8s`) whose CA and token stand in for the service-account files, so the
//! bundle publisher of the rendered server.toml must put `bundle show`'s PEM into the very
//! ConfigMap and key the agent DaemonSet mounts and agent.toml reads.
//!
//! Needs `kubectl` and `kubernetes-validate` (PyPI). `.ci/run` installs the latter into
//! `target/ci-venv` and puts it on PATH; this test also looks there. Without it the test fails:
//! it is not skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

/// The Workload API socket directory on every node.
const SOCKET_DIR: &str = "/run/sigil/sockets";
/// What workloads are told (`SPIFFE_ENDPOINT_SOCKET`).
const SOCKET_URL: &str = "unix:///run/sigil/sockets/api.sock";
/// The audience of the agent's projected token: only sigil-server accepts it.
const TOKEN_AUDIENCE: &str = "sigil-server";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize <dir>` (relative to the repository), as text.
fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("running `kubectl kustomize` (kubectl must be on PATH)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubernetes-validate`: on PATH, else in the virtualenv `.ci/run` makes.
fn kubernetes_validate() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("kubernetes-validate"))
        .find(|p| p.is_file());
    let venv = repo().join("target/ci-venv/bin/kubernetes-validate");
    match on_path {
        Some(p) => p,
        None if venv.is_file() => venv,
        None => panic!(
            "kubernetes-validate is not installed (not on PATH, not in {}): run .ci/run, which \
             installs it into target/ci-venv, or `pip install kubernetes-validate`",
            venv.display()
        ),
    }
}

/// `MAJOR.MINOR` of the kubectl on this machine: the schemas to validate against.
fn kubectl_version() -> String {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .expect("running `kubectl version` (kubectl must be on PATH)");
    assert!(out.status.success(), "kubectl version failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("kubectl version JSON");
    let part = |k: &str| -> String {
        v["clientVersion"][k]
            .as_str()
            .expect("clientVersion.major/minor")
            .trim_end_matches('+')
            .to_string()
    };
    format!("{}.{}", part("major"), part("minor"))
}

/// Validates every object of `yaml` in strict mode (unknown fields are errors). An object whose
/// kind has no schema only gets a warning from the tool: that fails here too.
fn validate(what: &str, yaml: &str, count: usize) {
    let version = kubectl_version();
    let tool = kubernetes_validate();
    let mut child = Command::new(&tool)
        .args(["--strict", "--kubernetes-version", &version, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kubernetes-validate");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(yaml.as_bytes())
            .expect("writing to kubernetes-validate");
    }
    let out = child.wait_with_output().expect("kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{what}: kubernetes-validate --strict -k {version} failed:\n{report}"
    );
    let bad: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("INFO ")).collect();
    assert!(bad.is_empty(), "{what}: kubernetes-validate:\n{report}");
    let passed = stdout
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed, count,
        "{what}: {count} objects rendered, {passed} validated:\n{report}"
    );
    println!("{what}: {passed} objects valid against Kubernetes {version} (strict)");
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

/// The one object of this kind and name.
fn object<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == k && name(d) == n)
        .collect();
    assert_eq!(found.len(), 1, "expected one {k}/{n}");
    found[0]
}

/// The pod spec of a workload object, if it has one.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match kind(doc) {
        "Pod" => Some(&doc["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Every container of a pod spec (init and ephemeral ones too).
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(move |k| array(&spec[k]).iter())
}

fn container<'a>(spec: &'a Value, n: &str) -> &'a Value {
    containers(spec)
        .find(|c| c["name"] == n)
        .unwrap_or_else(|| panic!("no container {n}"))
}

/// The pod volume `n`; null for a StatefulSet's volumeClaimTemplates (not pod volumes).
fn volume<'a>(spec: &'a Value, n: &str) -> &'a Value {
    static NONE: Value = Value::Null;
    array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == n)
        .unwrap_or(&NONE)
}

/// A container's setting, else the pod's (container wins, as in Kubernetes).
fn effective<'a>(pod: &'a Value, c: &'a Value, key: &str) -> &'a Value {
    match &c["securityContext"][key] {
        Value::Null => &pod["securityContext"][key],
        v => v,
    }
}

/// The environment variable `n` of a container.
fn env<'a>(c: &'a Value, n: &str) -> &'a Value {
    array(&c["env"])
        .iter()
        .find(|e| e["name"] == n)
        .unwrap_or_else(|| panic!("container {} has no env {n}", c["name"]))
}

/// The TOML file `key` of the ConfigMap that has it.
fn config_file(docs: &[Value], key: &str) -> toml::Table {
    let found: Vec<&str> = docs
        .iter()
        .filter(|d| kind(d) == "ConfigMap")
        .filter_map(|d| d["data"][key].as_str())
        .collect();
    assert_eq!(found.len(), 1, "expected one ConfigMap with {key}");
    found[0]
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not valid TOML: {e}"))
}

/// Where the rendered server.toml publishes the trust bundle: `(namespace, name, key)`, with the
/// defaults a pod of the sigil-server StatefulSet gets (its namespace); `None`: not published.
fn bundle_configmap(docs: &[Value]) -> Option<(String, String, String)> {
    let server_toml = config_file(docs, "server.toml");
    let publisher = server_toml
        .get("bundle_publisher")?
        .get("k8s_configmap")?
        .as_table()
        .expect("[bundle_publisher.k8s_configmap] is a table")
        .clone();
    let server = object(docs, "StatefulSet", "sigil-server");
    let key = |k: &str, default: &str| {
        publisher
            .get(k)
            .map(|v| v.as_str().expect("a string").to_string())
            .unwrap_or_else(|| default.to_string())
    };
    let pod_ns = server["metadata"]["namespace"]
        .as_str()
        .expect("StatefulSet namespace");
    Some((
        key("namespace", pod_ns),
        key("name", "sigil-bundle"),
        key("key", "bundle.pem"),
    ))
}

/// The port number of `HOST:PORT`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not HOST:PORT"))
}

/// What must hold for any rendering that contains Sigil (the base, every overlay).
fn check_sigil(docs: &[Value]) {
    // Namespace, server and agent are all there.
    object(docs, "Namespace", "sigil");
    let server = object(docs, "StatefulSet", "sigil-server");
    let agent = object(docs, "DaemonSet", "sigil-agent");

    check_every_pod(docs);
    check_rbac(docs);

    // --- server: one replica on SQLite, or several sharing PostgreSQL; PVCs; non-root.
    let server_toml = config_file(docs, "server.toml");
    let pod = &server["spec"]["template"]["spec"];
    let c = container(pod, "sigil-server");
    let replicas = server["spec"]["replicas"].as_u64().unwrap_or(1);
    let datastore = server_toml
        .get("datastore")
        .and_then(|d| d.get("type"))
        .and_then(toml::Value::as_str)
        .unwrap_or("sqlite");
    match datastore {
        "sqlite" => assert_eq!(replicas, 1, "sigil-server: exactly 1 replica on SQLite"),
        "postgres" => {
            assert!(replicas >= 2, "sigil-server on PostgreSQL: replicated");
            assert!(
                server_toml["datastore"].get("connection_string").is_none(),
                "server.toml: no connection string (it may hold a password): from the Secret"
            );
            let conn = env(c, "SIGIL_DATASTORE_CONNECTION_STRING");
            let secret = &conn["valueFrom"]["secretKeyRef"];
            assert!(
                secret["name"].is_string() && secret["key"].is_string(),
                "SIGIL_DATASTORE_CONNECTION_STRING from a Secret: {conn}"
            );
            assert_ne!(secret["optional"], true, "the Secret is required");
            // A disruption budget keeps all but one replica up.
            let pdb = docs
                .iter()
                .find(|d| kind(d) == "PodDisruptionBudget")
                .expect("a PodDisruptionBudget for the replicas");
            let labels = &server["spec"]["template"]["metadata"]["labels"];
            for (k, v) in pdb["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("PDB matchLabels")
            {
                assert_eq!(&labels[k], v, "PDB selects the server pods ({k})");
            }
        }
        other => panic!("server.toml: unknown datastore type {other}"),
    }
    let claims = array(&server["spec"]["volumeClaimTemplates"]);
    assert_eq!(claims.len(), 1, "sigil-server: one volumeClaimTemplate");
    let claim = claims[0]["metadata"]["name"].as_str().expect("claim name");
    let data_mount = array(&c["volumeMounts"])
        .iter()
        .find(|m| m["name"] == claim)
        .expect("sigil-server mounts its PVC")["mountPath"]
        .as_str()
        .expect("mountPath");
    assert_eq!(
        effective(pod, c, "runAsNonRoot"),
        true,
        "sigil-server: runAsNonRoot"
    );
    assert_eq!(
        effective(pod, c, "runAsUser"),
        65532,
        "sigil-server: uid 65532"
    );
    assert_eq!(
        pod["securityContext"]["fsGroup"], 65532,
        "sigil-server: PVC writable"
    );
    let data_dir = server_toml["data_dir"]
        .as_str()
        .expect("server.toml data_dir");
    assert!(
        data_dir.starts_with(&format!("{data_mount}/")),
        "server.toml data_dir {data_dir} must be inside the PVC ({data_mount}) and not be it (the \
         server makes it 0700, which it may only do to a directory it owns)"
    );
    check_admin_socket_dir(
        pod,
        c,
        server_toml["admin_socket"]
            .as_str()
            .expect("server.toml admin_socket"),
        "sigil-server",
    );
    let health = server_toml["health_address"]
        .as_str()
        .expect("server.toml health_address");
    check_probe_port(c, health, "sigil-server");
    let node_port = port_of(server_toml["bind_address"].as_str().expect("bind_address"));
    assert!(
        array(&c["ports"])
            .iter()
            .any(|p| p["containerPort"] == node_port),
        "sigil-server: containerPort {node_port} (bind_address)"
    );

    // The Service the agents use.
    let svc = object(docs, "Service", "sigil-server");
    let svc_ns = svc["metadata"]["namespace"]
        .as_str()
        .expect("Service namespace");
    let node_api = array(&svc["spec"]["ports"])
        .iter()
        .find(|p| p["name"] == "node-api")
        .expect("Service sigil-server has port node-api");
    assert_eq!(node_api["port"], 8081, "node API on 8081");

    // --- agent: host PID namespace, socket directory, projected token, node name.
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "sigil-agent: hostPID");
    assert_ne!(pod["hostNetwork"], true, "sigil-agent: no hostNetwork");
    let c = container(pod, "sigil-agent");
    let sockets = array(&pod["volumes"])
        .iter()
        .find(|v| v["hostPath"]["path"] == SOCKET_DIR)
        .expect("sigil-agent: hostPath volume for the socket directory");
    assert_eq!(
        sockets["hostPath"]["type"], "DirectoryOrCreate",
        "sigil-agent: socket hostPath type"
    );
    let mount = array(&c["volumeMounts"])
        .iter()
        .find(|m| m["name"] == sockets["name"])
        .expect("sigil-agent mounts the socket directory");
    assert_eq!(mount["mountPath"], SOCKET_DIR);
    assert_ne!(
        mount["readOnly"], true,
        "sigil-agent creates its socket: read-write"
    );

    // The projected service-account token for k8s_psat.
    let projected: Vec<(&Value, &Value)> = array(&pod["volumes"])
        .iter()
        .flat_map(|v| {
            array(&v["projected"]["sources"])
                .iter()
                .filter(|s| !s["serviceAccountToken"].is_null())
                .map(move |s| (v, &s["serviceAccountToken"]))
        })
        .collect();
    assert_eq!(
        projected.len(),
        1,
        "sigil-agent: one projected service-account token"
    );
    let (token_volume, token) = projected[0];
    assert_eq!(
        token["audience"], TOKEN_AUDIENCE,
        "projected token audience"
    );
    let expiry = token["expirationSeconds"]
        .as_u64()
        .expect("expirationSeconds");
    assert!(
        (600..=7200).contains(&expiry),
        "projected token lifetime {expiry}s: short-lived, at most 2h"
    );
    let token_mount = array(&c["volumeMounts"])
        .iter()
        .find(|m| m["name"] == token_volume["name"])
        .expect("sigil-agent mounts its projected token");
    assert_eq!(token_mount["mountPath"], "/var/run/secrets/tokens");
    assert_eq!(token_mount["readOnly"], true, "token mounted read-only");
    let token_file = format!(
        "{}/{}",
        token_mount["mountPath"].as_str().expect("mountPath"),
        token["path"].as_str().expect("token path")
    );
    let node_name = env(c, "NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "NODE_NAME from the downward API"
    );

    // The agent's config agrees with the manifests.
    let agent_toml = config_file(docs, "agent.toml");
    assert_eq!(
        agent_toml["k8s_psat_token_path"].as_str(),
        Some(token_file.as_str()),
        "agent.toml k8s_psat_token_path: the projected token"
    );
    assert_eq!(
        agent_toml["workload_attestors"],
        toml::Value::Array(vec!["k8s".into()]),
        "agent.toml: the k8s workload attestor is on"
    );
    assert_eq!(
        agent_toml["trust_domain"], server_toml["trust_domain"],
        "agent.toml and server.toml: same trust domain"
    );
    assert_eq!(
        agent_toml["socket_path"].as_str(),
        SOCKET_URL.strip_prefix("unix://"),
        "agent.toml socket_path: in the socket hostPath, as workloads are told"
    );
    check_admin_socket_dir(
        pod,
        c,
        agent_toml["admin_socket"]
            .as_str()
            .expect("agent.toml admin_socket"),
        "sigil-agent",
    );
    match &agent_toml["server_address"] {
        toml::Value::String(a) => assert_eq!(
            *a,
            format!("sigil-server.{svc_ns}.svc:{}", node_api["port"]),
            "agent.toml server_address: the sigil-server Service"
        ),
        // Replicas: each by its stable name under the StatefulSet's headless Service.
        toml::Value::Array(list) => {
            let headless = server["spec"]["serviceName"]
                .as_str()
                .expect("StatefulSet serviceName");
            let svc = object(docs, "Service", headless);
            assert_eq!(svc["spec"]["clusterIP"], "None", "{headless}: headless");
            let want: Vec<toml::Value> = (0..replicas)
                .map(|i| {
                    format!(
                        "{}-{i}.{headless}.{svc_ns}.svc:{}",
                        name(server),
                        node_api["port"]
                    )
                    .into()
                })
                .collect();
            assert_eq!(
                *list, want,
                "agent.toml server_address: every replica, by its stable name"
            );
        }
        other => panic!("agent.toml server_address: {other}"),
    }
    check_probe_port(
        c,
        agent_toml["health_address"]
            .as_str()
            .expect("agent health_address"),
        "sigil-agent",
    );
    // The agents' trust bundle: the server publishes it into the ConfigMap and key the agent
    // mounts and reads, in the agent's namespace, and may write that ConfigMap.
    let (cm_ns, cm_name, cm_key) = bundle_configmap(docs)
        .expect("server.toml: [bundle_publisher.k8s_configmap] (the agents' trust bundle)");
    assert_eq!(
        agent["metadata"]["namespace"].as_str(),
        Some(cm_ns.as_str()),
        "the bundle ConfigMap is in the agent's namespace"
    );
    let bundle_volume = array(&pod["volumes"])
        .iter()
        .find(|v| v["configMap"]["name"] == cm_name.as_str())
        .unwrap_or_else(|| panic!("sigil-agent: no volume from ConfigMap {cm_name}"));
    assert_ne!(
        bundle_volume["configMap"]["optional"], true,
        "sigil-agent: the bundle volume is required (the pod waits for the server to publish it)"
    );
    assert!(
        bundle_volume["configMap"]["items"].is_null(),
        "sigil-agent: the bundle volume maps no items (the key is the file name)"
    );
    let bundle_mount = array(&c["volumeMounts"])
        .iter()
        .find(|m| m["name"] == bundle_volume["name"])
        .expect("sigil-agent mounts the bundle ConfigMap");
    assert_eq!(bundle_mount["readOnly"], true, "bundle mounted read-only");
    assert_eq!(
        agent_toml["trust_bundle"].as_str(),
        Some(
            format!(
                "{}/{cm_key}",
                bundle_mount["mountPath"].as_str().expect("mountPath")
            )
            .as_str()
        ),
        "agent.toml trust_bundle: the published key in the mounted ConfigMap"
    );
    check_bundle_rbac(docs, &cm_ns, &cm_name);

    // The agent's cluster is one the server has a k8s_psat section for.
    let cluster = agent_toml["k8s_psat_cluster"]
        .as_str()
        .expect("agent.toml k8s_psat_cluster");
    let clusters = server_toml
        .get("node_attestor")
        .and_then(|n| n.get("k8s_psat"))
        .and_then(|n| n.get("clusters"))
        .and_then(toml::Value::as_table)
        .expect("server.toml: [node_attestor.k8s_psat.clusters.<name>]");
    assert!(
        clusters.contains_key(cluster),
        "agent cluster {cluster:?} has no [node_attestor.k8s_psat.clusters.{cluster}] in \
         server.toml (has {:?})",
        clusters.keys().collect::<Vec<_>>()
    );
}

/// The health endpoint the config listens on is reachable from the kubelet and is the port the
/// liveness and readiness probes use.
/// An admin socket lives on a writable volume (the root filesystem is read-only), and in an
/// emptyDir only in a directory below the volume's own: that one is world-writable (sticky on
/// tmpfs), which the binaries refuse as a socket's directory (README "Security").
fn check_admin_socket_dir(pod: &Value, c: &Value, socket: &str, what: &str) {
    let dir = Path::new(socket).parent().expect("the socket's directory");
    let mount = array(&c["volumeMounts"])
        .iter()
        .filter(|m| m["readOnly"] != true)
        .find(|m| dir.starts_with(m["mountPath"].as_str().expect("mountPath")))
        .unwrap_or_else(|| panic!("{what}: {socket} is on no writable volume"));
    let mount_path = mount["mountPath"].as_str().expect("mountPath");
    let vol = volume(pod, mount["name"].as_str().expect("volume name"));
    if !vol["emptyDir"].is_null() {
        assert_ne!(
            dir,
            Path::new(mount_path),
            "{what}: {socket} directly in the emptyDir {mount_path} (world-writable): put it in a \
             directory below it, which the binary creates 0700"
        );
    }
}

fn check_probe_port(c: &Value, health_address: &str, what: &str) {
    assert!(
        health_address.starts_with("0.0.0.0:") || health_address.starts_with("[::]:"),
        "{what}: health_address {health_address} must listen beyond loopback for the kubelet's \
         probes"
    );
    let port = port_of(health_address);
    let named = array(&c["ports"])
        .iter()
        .find(|p| p["containerPort"] == port)
        .unwrap_or_else(|| panic!("{what}: no containerPort {port} (health_address)"));
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe} path");
        assert!(
            get["port"] == named["name"] || get["port"] == port,
            "{what}: {probe} port {} is not the health port {port}",
            get["port"]
        );
    }
}

/// What must hold for every pod and container rendered, Sigil's or an example's.
fn check_every_pod(docs: &[Value]) {
    let mut seen = 0;
    for doc in docs {
        let Some(pod) = pod_spec(doc) else { continue };
        let owner = format!("{}/{}", kind(doc), name(doc));
        let is_agent = kind(doc) == "DaemonSet" && name(doc) == "sigil-agent";
        if !is_agent {
            assert_ne!(
                pod["hostPID"], true,
                "{owner}: hostPID is for the agent only"
            );
        }
        assert_ne!(pod["hostNetwork"], true, "{owner}: no hostNetwork");
        assert_ne!(pod["hostIPC"], true, "{owner}: no hostIPC");
        for c in containers(pod) {
            seen += 1;
            let who = format!("{owner} container {}", c["name"]);
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"], true, "{who}: privileged");
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{who}: allowPrivilegeEscalation must be set to false"
            );
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{who}: readOnlyRootFilesystem"
            );
            assert!(
                array(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")),
                "{who}: capabilities.drop [ALL]"
            );
            assert!(
                array(&sc["capabilities"]["add"]).is_empty(),
                "{who}: adds capabilities {}",
                sc["capabilities"]["add"]
            );
            assert!(c["livenessProbe"].is_object(), "{who}: livenessProbe");
            assert!(c["readinessProbe"].is_object(), "{who}: readinessProbe");
            for k in ["cpu", "memory"] {
                assert!(
                    !c["resources"]["limits"][k].is_null(),
                    "{who}: resources.limits.{k}"
                );
                assert!(
                    !c["resources"]["requests"][k].is_null(),
                    "{who}: resources.requests.{k}"
                );
            }
            // Root is for the agent only (it reads other processes' /proc); everyone else is
            // non-root by setting, not just by the image's default user.
            if !is_agent {
                assert_eq!(
                    effective(pod, c, "runAsNonRoot"),
                    true,
                    "{who}: runAsNonRoot"
                );
                assert_ne!(effective(pod, c, "runAsUser"), 0, "{who}: runAsUser 0");
            }
            // Anyone but the agent sees host directories read-only.
            for m in array(&c["volumeMounts"]) {
                let v = volume(pod, m["name"].as_str().expect("mount name"));
                if !v["hostPath"].is_null() && !is_agent {
                    assert_eq!(
                        m["readOnly"], true,
                        "{who}: hostPath {} must be mounted readOnly",
                        v["hostPath"]["path"]
                    );
                }
            }
        }
    }
    assert!(seen > 0, "no containers rendered");
}

/// RBAC for the bundle publisher: a Role in the ConfigMap's namespace, bound to the server's
/// service account, with exactly `get` and `patch` on that one ConfigMap (resourceNames) and
/// `create` (which resourceNames cannot limit: a rule with them never matches a create); no
/// other verb, and no ClusterRole granting ConfigMaps.
fn check_bundle_rbac(docs: &[Value], ns: &str, cm_name: &str) {
    let grants_configmaps = |doc: &Value| {
        array(&doc["rules"])
            .iter()
            .any(|r| array(&r["resources"]).contains(&Value::from("configmaps")))
    };
    for doc in docs.iter().filter(|d| kind(d) == "ClusterRole") {
        assert!(
            !grants_configmaps(doc),
            "ClusterRole/{}: ConfigMaps cluster-wide",
            name(doc)
        );
    }
    let bindings: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == "RoleBinding" && d["metadata"]["namespace"] == ns)
        .filter(|d| {
            array(&d["subjects"]).iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == "sigil-server" && s["namespace"] == ns
            })
        })
        .collect();
    let mut verbs = Vec::new();
    for b in bindings {
        assert_eq!(b["roleRef"]["kind"], "Role", "RoleBinding/{}", name(b));
        let role = object(
            docs,
            "Role",
            b["roleRef"]["name"].as_str().expect("roleRef"),
        );
        assert_eq!(role["metadata"]["namespace"], ns, "Role/{}", name(role));
        for rule in array(&role["rules"]) {
            if !array(&rule["resources"]).contains(&Value::from("configmaps")) {
                continue;
            }
            assert_eq!(rule["apiGroups"], serde_json::json!([""]));
            assert_eq!(rule["resources"], serde_json::json!(["configmaps"]));
            for verb in array(&rule["verbs"]) {
                let verb = verb.as_str().expect("verb");
                match verb {
                    "get" | "patch" => assert_eq!(
                        rule["resourceNames"],
                        serde_json::json!([cm_name]),
                        "Role/{}: {verb} configmaps only on {cm_name}",
                        name(role)
                    ),
                    "create" => assert!(
                        rule["resourceNames"].is_null(),
                        "Role/{}: create with resourceNames never matches",
                        name(role)
                    ),
                    other => panic!(
                        "Role/{}: {other} configmaps is not needed by the bundle publisher",
                        name(role)
                    ),
                }
                verbs.push(verb.to_string());
            }
        }
    }
    verbs.sort();
    verbs.dedup();
    assert_eq!(
        verbs,
        ["create", "get", "patch"],
        "the server's service account may get, create and patch ConfigMap {ns}/{cm_name}"
    );
}

/// RBAC: what the server and the agent need, nothing with wildcards.
fn check_rbac(docs: &[Value]) {
    for doc in docs
        .iter()
        .filter(|d| kind(d) == "ClusterRole" || kind(d) == "Role")
    {
        for rule in array(&doc["rules"]) {
            for k in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !array(&rule[k]).contains(&Value::from("*")),
                    "{}/{}: wildcard {k}",
                    kind(doc),
                    name(doc)
                );
            }
        }
    }
    let allows = |role: &str, group: &str, resource: &str, verb: &str| {
        array(&object(docs, "ClusterRole", role)["rules"])
            .iter()
            .any(|r| {
                array(&r["apiGroups"]).contains(&Value::from(group))
                    && array(&r["resources"]).contains(&Value::from(resource))
                    && array(&r["verbs"]).contains(&Value::from(verb))
            })
    };
    assert!(allows(
        "sigil-server",
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    for (resource, verb) in [
        ("nodes", "get"),
        ("nodes", "list"),
        ("pods", "get"),
        ("pods", "list"),
    ] {
        assert!(
            allows("sigil-server", "", resource, verb),
            "server: {verb} {resource}"
        );
    }
    // The agent asks only its kubelet for pods (GET /pods = get nodes/proxy), nothing else.
    let agent_rules = array(&object(docs, "ClusterRole", "sigil-agent")["rules"]);
    assert_eq!(
        Value::from(agent_rules),
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]),
        "sigil-agent ClusterRole: exactly get nodes/proxy"
    );
    for (binding, sa) in [
        ("sigil-server", "sigil-server"),
        ("sigil-agent", "sigil-agent"),
    ] {
        let b = object(docs, "ClusterRoleBinding", binding);
        assert_eq!(b["roleRef"]["name"], binding);
        assert!(
            array(&b["subjects"])
                .iter()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa),
            "{binding} binds ServiceAccount {sa}"
        );
        object(docs, "ServiceAccount", sa);
    }
}

/// The example workload: reaches the agent's socket through a read-only hostPath mount and is
/// told where it is.
fn check_example_workload(docs: &[Value]) {
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            pod_spec(d).is_some_and(|p| {
                containers(p).any(|c| {
                    array(&c["env"])
                        .iter()
                        .any(|e| e["name"] == "SPIFFE_ENDPOINT_SOCKET")
                })
            })
        })
        .collect();
    assert!(
        !workloads.is_empty(),
        "no example workload with SPIFFE_ENDPOINT_SOCKET"
    );
    for doc in workloads {
        let pod = pod_spec(doc).expect("pod spec");
        for c in containers(pod) {
            let who = format!("{}/{} container {}", kind(doc), name(doc), c["name"]);
            assert_eq!(
                env(c, "SPIFFE_ENDPOINT_SOCKET")["value"],
                SOCKET_URL,
                "{who}: SPIFFE_ENDPOINT_SOCKET"
            );
            let mount = array(&c["volumeMounts"])
                .iter()
                .find(|m| {
                    volume(pod, m["name"].as_str().expect("name"))["hostPath"]["path"] == SOCKET_DIR
                })
                .unwrap_or_else(|| panic!("{who}: does not mount the socket directory"));
            assert_eq!(
                mount["readOnly"], true,
                "{who}: socket directory mounted readOnly"
            );
            let socket = SOCKET_URL.strip_prefix("unix://").expect("unix URL");
            let dir = mount["mountPath"].as_str().expect("mountPath");
            assert!(
                Path::new(socket).parent() == Some(Path::new(dir)),
                "{who}: {socket} is not in the mounted {dir}"
            );
        }
    }
}

#[test]
fn base_renders_and_validates() {
    let yaml = kustomize("deploy/k8s/base");
    let docs = documents(&yaml);
    validate("deploy/k8s/base", &yaml, docs.len());
}

#[test]
fn example_overlay_renders_and_validates() {
    let yaml = kustomize("deploy/k8s/overlays/example");
    let docs = documents(&yaml);
    validate("deploy/k8s/overlays/example", &yaml, docs.len());
}

#[test]
fn examples_render_and_validate() {
    let yaml = kustomize("deploy/k8s/examples");
    let docs = documents(&yaml);
    validate("deploy/k8s/examples", &yaml, docs.len());
    check_every_pod(&docs);
    check_example_workload(&docs);
}

#[test]
fn base_security_settings() {
    let docs = documents(&kustomize("deploy/k8s/base"));
    check_sigil(&docs);
    for doc in &docs {
        if !matches!(
            kind(doc),
            "ClusterRole" | "ClusterRoleBinding" | "Namespace"
        ) {
            assert_eq!(
                doc["metadata"]["namespace"],
                "sigil",
                "{}/{} in namespace sigil",
                kind(doc),
                name(doc)
            );
        }
    }
}

#[test]
fn example_overlay_security_settings() {
    let docs = documents(&kustomize("deploy/k8s/overlays/example"));
    check_sigil(&docs);
    check_example_workload(&docs);
    // The overlay's own values took effect.
    assert_eq!(
        config_file(&docs, "server.toml")["trust_domain"],
        "prod.example.org".into()
    );
    assert_eq!(
        config_file(&docs, "agent.toml")["k8s_psat_cluster"],
        "prod-eu1".into()
    );
    for doc in &docs {
        if let Some(pod) = pod_spec(doc) {
            for c in containers(pod) {
                assert_eq!(
                    c["image"],
                    "registry.example.com/sigil:0.1.0",
                    "{}/{}: the overlay's image",
                    kind(doc),
                    name(doc)
                );
            }
        }
    }
}

/// A child process, killed on drop, whose stdout and stderr go to one log file.
struct Running {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Running {
    fn start(
        what: &str,
        bin: &str,
        args: &[String],
        envs: &[(String, String)],
        dir: &Path,
    ) -> Self {
        let log = dir.join(format!("{bin}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(sigil_testkit::binary(bin))
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: starting {bin}: {e}"));
        Running {
            child,
            log,
            what: format!("{what}: {bin} {}", args.join(" ")),
        }
    }

    /// Waits until the log has `line`; fails with the log if the process exits first.
    fn wait_for(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(line) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{}\nexited ({status}) before {line:?}:\n{text}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{}\nno {line:?} in 60 s:\n{text}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `args` with the value of `--config` (`--config X` or `--config=X`) replaced by `path`.
fn with_config(args: &[String], path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut replaced = 0;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--config" || a == "-c" {
            iter.next();
            out.push("--config".to_string());
            out.push(path.display().to_string());
            replaced += 1;
        } else if a.starts_with("--config=") {
            out.push(format!("--config={}", path.display()));
            replaced += 1;
        } else {
            out.push(a.clone());
        }
    }
    assert_eq!(replaced, 1, "expected one --config in {args:?}");
    out
}

/// A container's command-line arguments with `$(VAR)` expanded as the kubelet does, and its
/// environment; downward-API values are made up (node `test-node` at 127.0.0.1), values from
/// Secrets are taken from `secrets` (by variable name).
fn container_args_env(
    c: &Value,
    secrets: &[(String, String)],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut env = Vec::new();
    for e in array(&c["env"]) {
        let name = e["name"].as_str().expect("env name").to_string();
        let secret = secrets.iter().find(|(n, _)| *n == name);
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            _ if !e["valueFrom"]["secretKeyRef"].is_null() && secret.is_some() => {
                secret.map(|(_, v)| v.clone()).unwrap_or_default()
            }
            (_, Value::String(f)) if f == "spec.nodeName" => "test-node".into(),
            (_, Value::String(f)) if f == "status.hostIP" || f == "status.podIP" => {
                "127.0.0.1".into()
            }
            _ => panic!("env {name}: no test value for {e}"),
        };
        env.push((name, value));
    }
    let args = array(&c["args"])
        .iter()
        .map(|a| {
            let mut a = a.as_str().expect("string arg").to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            assert!(!a.contains("$("), "unexpanded variable in {a}");
            a
        })
        .collect();
    (args, env)
}

/// A `sigil-server` started by [`server_accepts`], ready, with its fake API server.
struct ServerInPod {
    fake: sigil_testkit::fake_k8s::FakeK8s,
    server: Running,
    admin_socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerInPod {
    /// `sigil-server bundle show` of this server.
    fn bundle_show(&self) -> String {
        let out = Command::new(sigil_testkit::binary("sigil-server"))
            .args(["bundle", "show", "--admin-socket"])
            .arg(&self.admin_socket)
            .output()
            .expect("sigil-server bundle show");
        assert!(
            out.status.success(),
            "{}: bundle show failed",
            self.server.what
        );
        String::from_utf8(out.stdout).expect("PEM is UTF-8")
    }
}

/// Starts `sigil-server` with `toml` and the given arguments until it is ready, as in a pod of
/// namespace `pod_ns`: the API server (`KUBERNETES_SERVICE_HOST`/`_PORT`) is a fake one, and the
/// service-account files a pod would have mounted (`api_ca_file`, `api_token_file` of each
/// k8s_psat cluster and of the bundle publisher, when not set; the publisher's namespace) are
/// its CA and token in the temp dir.
fn server_accepts(
    what: &str,
    toml_text: &str,
    args: &[String],
    pod_ns: &str,
    extra_env: &[(String, String)],
) -> ServerInPod {
    let dir = sigil_testkit::tempdir();
    let fake = sigil_testkit::fake_k8s::FakeK8s::start();
    let (ca, token) = fake.write_credentials(dir.path());
    let mut table: toml::Table = toml_text.parse().expect("server.toml");
    let in_pod_files = |t: &mut toml::Table| {
        for (k, path) in [("api_ca_file", &ca), ("api_token_file", &token)] {
            t.entry(k)
                .or_insert_with(|| path.display().to_string().into());
        }
    };
    let clusters = table
        .get_mut("node_attestor")
        .and_then(|n| n.get_mut("k8s_psat"))
        .and_then(|k| k.get_mut("clusters"))
        .and_then(toml::Value::as_table_mut);
    if let Some(clusters) = clusters {
        for (_, c) in clusters.iter_mut() {
            in_pod_files(c.as_table_mut().expect("cluster table"));
        }
    }
    let publisher = table
        .get_mut("bundle_publisher")
        .and_then(|b| b.get_mut("k8s_configmap"))
        .and_then(toml::Value::as_table_mut);
    if let Some(p) = publisher {
        in_pod_files(p);
        // The service-account namespace file of a pod.
        p.entry("namespace").or_insert_with(|| pod_ns.into());
    }
    let config = dir.path().join("server.toml");
    std::fs::write(&config, toml::to_string(&table).expect("toml")).expect("write");
    let mut args = with_config(args, &config);
    let tmp = dir.path().display().to_string();
    args.extend(
        [
            "--data-dir",
            &format!("{tmp}/data"),
            "--admin-socket",
            &format!("{tmp}/admin/admin.sock"),
            "--bind-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    // As in a pod: the API server's address (k8s_psat asks nothing of it at start; the bundle
    // publisher writes its ConfigMap).
    let port = fake.url.rsplit_once(':').expect("fake API URL").1;
    let mut env = [
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", port),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    env.extend(extra_env.iter().cloned());
    let mut server = Running::start(what, "sigil-server", &args, &env, dir.path());
    server.wait_for("sigil-server ready");
    ServerInPod {
        fake,
        server,
        admin_socket: dir.path().join("admin/admin.sock"),
        _dir: dir,
    }
}

/// Starts `sigil-agent` with `toml` and the given arguments until its configuration resolved.
fn agent_accepts(what: &str, toml_text: &str, args: &[String], env: &[(String, String)]) {
    let dir = sigil_testkit::tempdir();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml_text).expect("write");
    let mut args = with_config(args, &config);
    let tmp = dir.path().display().to_string();
    args.extend(
        [
            "--data-dir",
            &format!("{tmp}/data"),
            "--socket-path",
            &format!("{tmp}/public/api.sock"),
            "--admin-socket",
            &format!("{tmp}/private/admin.sock"),
            "--health-address",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let mut agent = Running::start(what, "sigil-agent", &args, env, dir.path());
    agent.wait_for("sigil-agent starting");
}

/// The rendered server and agent configs, with the manifests' arguments, are accepted.
fn binaries_accept(dir: &str) {
    let docs = documents(&kustomize(dir));
    let server = object(&docs, "StatefulSet", "sigil-server");
    let c = container(&server["spec"]["template"]["spec"], "sigil-server");
    // A replicated server's database: a scratch PostgreSQL database for the Secret's value.
    let shared = array(&c["env"])
        .iter()
        .any(|e| e["name"] == "SIGIL_DATASTORE_CONNECTION_STRING");
    let db = shared.then(sigil_testkit::postgres::TestDatabase::create);
    let secrets: Vec<(String, String)> = db
        .iter()
        .map(|db| {
            (
                "SIGIL_DATASTORE_CONNECTION_STRING".to_string(),
                db.url().to_string(),
            )
        })
        .collect();
    let (args, env) = container_args_env(c, &secrets);
    let text = docs
        .iter()
        .find_map(|d| d["data"]["server.toml"].as_str())
        .expect("server.toml");
    let pod_ns = server["metadata"]["namespace"]
        .as_str()
        .expect("StatefulSet namespace");
    let running = server_accepts(dir, text, &args, pod_ns, &env);
    // The agents' trust bundle, published where the DaemonSet mounts it (check_sigil).
    let (ns, name, key) = bundle_configmap(&docs).expect("the bundle publisher is on");
    let deadline = Instant::now() + Duration::from_secs(30);
    let published = loop {
        if let Some(pem) = running.fake.configmap_data(&ns, &name, &key) {
            break pem;
        }
        assert!(
            Instant::now() < deadline,
            "{dir}: no ConfigMap {ns}/{name} with {key} in 30 s:\n{}",
            std::fs::read_to_string(&running.server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        published,
        running.bundle_show(),
        "{dir}: ConfigMap {ns}/{name} {key} is `sigil-server bundle show`"
    );
    if shared {
        // A second replica on the same database: its CA's root joins the first one's.
        let second = server_accepts(dir, text, &args, pod_ns, &env);
        let bundle = second.bundle_show();
        assert_eq!(
            bundle.matches("BEGIN CERTIFICATE").count(),
            2,
            "{dir}: both replicas' roots in the bundle:\n{bundle}"
        );
    }
    drop(running);

    let agent = object(&docs, "DaemonSet", "sigil-agent");
    let c = container(&agent["spec"]["template"]["spec"], "sigil-agent");
    let (args, env) = container_args_env(c, &[]);
    let text = docs
        .iter()
        .find_map(|d| d["data"]["agent.toml"].as_str())
        .expect("agent.toml");
    agent_accepts(dir, text, &args, &env);
}

#[test]
fn ha_overlay_renders_and_validates() {
    let yaml = kustomize("deploy/k8s/overlays/ha");
    let docs = documents(&yaml);
    validate("deploy/k8s/overlays/ha", &yaml, docs.len());
}

#[test]
fn ha_overlay_security_settings() {
    let docs = documents(&kustomize("deploy/k8s/overlays/ha"));
    check_sigil(&docs);
    let server = object(&docs, "StatefulSet", "sigil-server");
    assert_eq!(server["spec"]["replicas"], 3);
    // Each replica its own CA keys: a PVC per replica, as in the base.
    assert_eq!(array(&server["spec"]["volumeClaimTemplates"]).len(), 1);
}

#[test]
fn ha_overlay_configs_are_accepted_by_the_binaries() {
    binaries_accept("deploy/k8s/overlays/ha");
}

#[test]
fn base_configs_are_accepted_by_the_binaries() {
    binaries_accept("deploy/k8s/base");
}

#[test]
fn example_overlay_configs_are_accepted_by_the_binaries() {
    binaries_accept("deploy/k8s/overlays/example");
}

/// The arguments of a unit's `ExecStart=` (after the binary).
fn exec_start_args(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(unit)).expect("unit file");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit}: no ExecStart="));
    line.split_whitespace().skip(1).map(String::from).collect()
}

#[test]
fn systemd_configs_are_accepted_by_the_binaries() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).expect("config file");
    // The node CA the example server.toml trusts for x509pop, as an operator would install it.
    let etc = sigil_testkit::tempdir();
    let node_ca = etc.path().join("node-ca.pem");
    std::fs::write(&node_ca, sigil_testkit::foreign_ca_pem("example node CA")).expect("node CA");
    let server_toml = read("deploy/systemd/server.toml").replace(
        "/etc/sigil/node-ca.pem",
        node_ca.to_str().expect("utf-8 path"),
    );
    server_accepts(
        "deploy/systemd/sigil-server.service",
        &server_toml,
        &exec_start_args("deploy/systemd/sigil-server.service"),
        "default",
        &[],
    );
    agent_accepts(
        "deploy/systemd/sigil-agent.service",
        &read("deploy/systemd/agent.toml"),
        &exec_start_args("deploy/systemd/sigil-agent.service"),
        &[],
    );
}
