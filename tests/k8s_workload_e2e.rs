//! End-to-end test of the `k8s` workload attestor: a real `sigil-server` and `sigil-agent`
//! (`--workload-attestor k8s`), a fake kubelet over HTTPS on loopback (test CA, bearer token
//! required, a kubelet-shaped pod list), and a workload process placed in a real pod cgroup
//! (`/sys/fs/cgroup/pids/kubepods/besteffort/pod<uid>/<container id>`, cgroup v1, cgroupfs
//! driver layout). The workload fetches its X509-SVID with the `spiffe` crate and gets the entry
//! registered on `k8s:ns`, `k8s:sa`, `k8s:pod-label` and `k8s:container-name`, not the one on
//! another label; `sigil-agent explain` shows the same selectors.
//!
//! Needs root and a writable cgroup v1 hierarchy; without them the test fails saying so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sigil_testkit::fake_kubelet::FakeKubelet;
use sigil_testkit::{create_entry, join_token, tempdir, Agent, Server};

/// The ignored helper test that runs as the workload.
const HELPER: &str = "k8s_workload_helper_fetches_its_svid";
/// Set for the workload child: the agent's Workload API socket.
const SOCKET_ENV: &str = "SIGIL_TEST_K8S_SOCKET";
/// Set for the workload child: it waits for this file before calling the agent.
const GO_ENV: &str = "SIGIL_TEST_K8S_GO";
/// Set for the workload child: where it writes the SPIFFE IDs it got, one a line.
const OUT_ENV: &str = "SIGIL_TEST_K8S_OUT";

/// The cgroup v1 hierarchy the workload is moved in.
const HIERARCHY: &str = "/sys/fs/cgroup/pids";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.sigil-agent-e2e.sig";
const WORKLOAD: &str = "spiffe://example.org/ns/shop/sa/web";
const DECOY: &str = "spiffe://example.org/ns/shop/sa/other";

// ---------------------------------------------------------------------------------------------
// The workload (a child process running this test binary's helper).
// ---------------------------------------------------------------------------------------------

/// Runs only as the workload started by `k8s_selectors_reach_the_workload_api`: waits until the
/// test has moved it into the pod cgroup, fetches its X509 context with the `spiffe` crate and
/// writes the SPIFFE IDs it got. Does nothing in a normal `--ignored` run.
#[test]
#[ignore = "helper: runs only as the workload started by k8s_selectors_reach_the_workload_api"]
fn k8s_workload_helper_fetches_its_svid() {
    let (Some(socket), Some(go), Some(out)) = (
        std::env::var_os(SOCKET_ENV),
        std::env::var_os(GO_ENV),
        std::env::var_os(OUT_ENV),
    ) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(&go).exists() {
        assert!(Instant::now() < deadline, "no go file within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    println!("workload cgroup:\n{cgroup}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ids = runtime.block_on(async {
        let endpoint = format!("unix://{}", PathBuf::from(socket).display());
        let client = tokio::time::timeout(
            Duration::from_secs(30),
            spiffe::WorkloadApiClient::connect_to(endpoint),
        )
        .await
        .expect("connecting within 30 s")
        .expect("connecting to the Workload API");
        let ctx = tokio::time::timeout(Duration::from_secs(60), client.fetch_x509_context())
            .await
            .expect("FetchX509SVID within 60 s")
            .expect("the workload gets an X509 context");
        ctx.svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect::<Vec<_>>()
    });
    println!("workload got {ids:?}");
    std::fs::write(out, ids.join("\n")).expect("writing the result");
}

// ---------------------------------------------------------------------------------------------
// The pod cgroup.
// ---------------------------------------------------------------------------------------------

/// A pod's container cgroup in [`HIERARCHY`]: `kubepods/besteffort/pod<uid>/<container id>`,
/// the kubelet's cgroupfs-driver layout. Removed on drop (after its processes exited).
struct PodCgroup {
    /// Directories this test created, outermost first.
    created: Vec<PathBuf>,
    leaf: PathBuf,
}

impl PodCgroup {
    fn create(pod_uid: &str, container_id: &str) -> PodCgroup {
        let root = Path::new(HIERARCHY);
        let writable = root.join("cgroup.procs").exists()
            && nix::unistd::access(root, nix::unistd::AccessFlags::W_OK).is_ok();
        assert!(
            writable,
            "this test needs root and a writable cgroup v1 hierarchy at {HIERARCHY} (to put a \
             process in a pod's cgroup, as the kubelet does); it is missing or not writable here"
        );
        let leaf = root
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{pod_uid}"))
            .join(container_id);
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in leaf
            .strip_prefix(root)
            .expect("under the root")
            .components()
        {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap_or_else(|e| {
                    panic!(
                        "cannot create cgroup {} ({e}): this test needs a writable cgroup v1 hierarchy at {HIERARCHY}",
                        dir.display()
                    )
                });
                created.push(dir.clone());
            }
        }
        PodCgroup { created, leaf }
    }

    /// Moves process `pid` (all its threads) into the container's cgroup.
    fn add(&self, pid: u32) {
        std::fs::write(self.leaf.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving pid {pid} into {}: {e}", self.leaf.display()));
    }

    /// The path as `/proc/<pid>/cgroup` shows it.
    fn relative(&self) -> String {
        format!(
            "/{}",
            self.leaf
                .strip_prefix(HIERARCHY)
                .expect("under the hierarchy")
                .display()
        )
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // A process that just exited may take a moment to leave its cgroup.
            let mut tries = 0;
            while let Err(e) = std::fs::remove_dir(dir) {
                tries += 1;
                if tries > 100 {
                    eprintln!("could not remove cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A child process, killed and reaped on drop.
struct Workload(Option<Child>);

impl Workload {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    fn wait(&mut self, secs: u64) -> std::process::Output {
        let mut child = self.0.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        while child
            .try_wait()
            .expect("waiting for the workload")
            .is_none()
        {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("workload output");
                panic!(
                    "the workload did not finish in {secs} s:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("workload output")
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the fake kubelet serves.
// ---------------------------------------------------------------------------------------------

/// A kubelet-shaped pod list with the workload's pod (and another pod on the node).
fn pod_list(pod_uid: &str, container_id: &str) -> String {
    serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [
            {
                "metadata": {
                    "name": "coredns-76f75df574-9zq2x",
                    "namespace": "kube-system",
                    "uid": "4d6f9b8e-1c2a-4f3b-9e8d-7a6b5c4d3e2f",
                    "labels": {"k8s-app": "kube-dns"},
                },
                "spec": {"serviceAccountName": "coredns", "nodeName": "node-1",
                         "containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.1"}]},
                "status": {"phase": "Running", "containerStatuses": [{
                    "name": "coredns", "ready": true, "restartCount": 0,
                    "image": "registry.k8s.io/coredns/coredns:v1.11.1",
                    "imageID": "registry.k8s.io/coredns/coredns@sha256:1eeb4c7316bacb1d4c8ead65571cd92dd21e27359f0d4917f1a5822a73b75db1",
                    "containerID": "containerd://0d5cb4b5ab10ba7f6b2d0e6a7c3b8f1e9d2c4a6b8e0f1a3c5e7d9b1f3a5c7e9d",
                    "state": {"running": {"startedAt": "2024-05-14T08:02:30Z"}}
                }]}
            },
            {
                "metadata": {
                    "name": "web-7d4b9c8f6d-x2kqp",
                    "generateName": "web-7d4b9c8f6d-",
                    "namespace": "shop",
                    "uid": pod_uid,
                    "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6d"},
                    "annotations": {"kubernetes.io/config.source": "api"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": "web-7d4b9c8f6d", "uid": "5e1f5a0c-2a6b-4a8e-9d0e-3c1b2a4f6e7d",
                        "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {
                    "serviceAccountName": "web",
                    "nodeName": "node-1",
                    "containers": [{"name": "app", "image": "ghcr.io/example/shop-web:1.4.2",
                        "volumeMounts": [{"name": "spiffe-workload-api", "readOnly": true, "mountPath": "/run/sigil/sockets"}]}],
                    "volumes": [{"name": "spiffe-workload-api", "hostPath": {"path": "/run/sigil/sockets", "type": "Directory"}}],
                },
                "status": {
                    "phase": "Running",
                    "qosClass": "BestEffort",
                    "hostIP": "10.0.0.11",
                    "podIP": "10.244.1.17",
                    "containerStatuses": [{
                        "name": "app", "ready": true, "started": true, "restartCount": 0,
                        "image": "ghcr.io/example/shop-web:1.4.2",
                        "imageID": "ghcr.io/example/shop-web@sha256:61fd6766cebfd37d7cb53d10866191d75b655450922d3c20155d7fdbb75553ef",
                        "containerID": format!("containerd://{container_id}"),
                        "state": {"running": {"startedAt": "2024-05-14T09:21:07Z"}}
                    }]
                }
            }
        ]
    })
    .to_string()
}

/// A pod UID and a container ID unique to this run.
fn ids() -> (String, String) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let pid = std::process::id();
    let pod = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (nanos >> 32) as u32,
        (nanos >> 16) as u16,
        pid & 0xfff,
        (nanos >> 4) as u16 & 0xfff,
        nanos as u64 & 0xffff_ffff_ffff
    );
    let container = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        nanos as u64,
        u64::from(pid),
        (nanos as u64).rotate_left(17) ^ 0x5a5a_5a5a_5a5a_5a5a,
        (nanos as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    (pod, container)
}

#[test]
fn k8s_selectors_reach_the_workload_api() {
    let (pod_uid, container_id) = ids();
    // First, so a machine without a writable hierarchy fails before starting anything.
    let cgroup = PodCgroup::create(&pod_uid, &container_id);

    let kubelet = FakeKubelet::start(TOKEN, &[&pod_list(&pod_uid, &container_id)]);
    let dir = tempdir();
    let (ca_path, token_path) = (dir.path().join("kubelet-ca.crt"), dir.path().join("token"));
    std::fs::write(&ca_path, &kubelet.ca_pem).expect("CA file");
    std::fs::write(&token_path, format!("{TOKEN}\n")).expect("token file");

    let server = Server::start(&dir.path().join("server"), &[]);
    let (token, agent_id) = join_token(&server);
    create_entry(
        &server,
        &agent_id,
        WORKLOAD,
        &[
            "k8s:ns:shop",
            "k8s:sa:web",
            "k8s:pod-label:app:web",
            "k8s:container-name:app",
        ],
        &[],
    );
    create_entry(
        &server,
        &agent_id,
        DECOY,
        &["k8s:ns:shop", "k8s:pod-label:app:other"],
        &[],
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let ca_arg = ca_path.display().to_string();
    let token_arg = token_path.display().to_string();
    let mut agent = Agent::start(
        &server,
        &agent_dir,
        &[
            "--join-token",
            &token,
            "--workload-attestor",
            "k8s",
            "--kubelet-url",
            &kubelet.url,
            "--kubelet-ca-path",
            &ca_arg,
            "--kubelet-token-path",
            &token_arg,
            "--node-name",
            "node-1",
            "--log-level",
            "debug",
        ],
    );
    agent.wait_svids_for(&[WORKLOAD, DECOY], 60);
    agent.wait_log(10, "the k8s attestor start-up line", |l| {
        l.contains("k8s workload attestor on")
    });

    // The workload: this test binary's helper, waiting for the go file.
    let (go, out) = (dir.path().join("go"), dir.path().join("out"));
    let exe = std::env::current_exe().expect("this test's executable");
    let mut workload = Workload(Some(
        Command::new(exe)
            .args(["--exact", HELPER, "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(SOCKET_ENV, agent.socket_path())
            .env(GO_ENV, &go)
            .env(OUT_ENV, &out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the workload"),
    ));
    cgroup.add(workload.pid());
    let seen = std::fs::read_to_string(format!("/proc/{}/cgroup", workload.pid()))
        .expect("the workload's cgroup file");
    assert!(
        seen.contains(&format!(":pids:{}", cgroup.relative())),
        "the workload is in the pod cgroup: {seen}"
    );
    assert!(
        !seen.contains("user.slice") && !seen.contains("/user@"),
        "this test must not run inside a systemd user session: the agent does not believe pod \
         cgroups next to a user-delegated one (user.slice), and the workload's other \
         hierarchies still show it:\n{seen}"
    );

    // The agent's view of the workload, as an operator would check it.
    let explain = Command::new(sigil_testkit::binary("sigil-agent"))
        .args(["explain", "--pid", &workload.pid().to_string()])
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .args(["--output", "json"])
        .output()
        .expect("running sigil-agent explain");
    assert!(
        explain.status.success(),
        "explain failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&explain.stderr),
        agent.log_text()
    );
    let x: serde_json::Value = serde_json::from_slice(&explain.stdout).expect("explain JSON");
    let selectors: Vec<&str> = x["selectors"]
        .as_array()
        .expect("selectors")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for want in [
        "k8s:ns:shop".to_string(),
        "k8s:sa:web".to_string(),
        "k8s:pod-name:web-7d4b9c8f6d-x2kqp".to_string(),
        format!("k8s:pod-uid:{pod_uid}"),
        format!("k8s:container-id:{container_id}"),
        "k8s:pod-label:app:web".to_string(),
        "k8s:pod-owner:ReplicaSet:web-7d4b9c8f6d".to_string(),
        "k8s:container-name:app".to_string(),
        "k8s:container-image:ghcr.io/example/shop-web:1.4.2".to_string(),
        "k8s:node-name:node-1".to_string(),
        "unix:uid:0".to_string(),
    ] {
        assert!(
            selectors.contains(&want.as_str()),
            "{want} in {selectors:?}\nagent log:\n{}",
            agent.log_text()
        );
    }
    let matched: Vec<&str> = x["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .filter_map(|m| m["spiffe_id"].as_str())
        .collect();
    assert_eq!(matched, [WORKLOAD], "explain: {x}");

    // Go: the workload fetches its SVIDs through the Workload API.
    std::fs::write(&go, "").expect("go file");
    let output = workload.wait(120);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the workload failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        agent.log_text()
    );
    let got = std::fs::read_to_string(&out).expect("the workload's result");
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [WORKLOAD],
        "the workload got exactly the entry its pod's selectors match"
    );

    assert!(kubelet.authorized() >= 1, "the agent asked the kubelet");
    assert_eq!(kubelet.refused(), 0, "every request had the token");
    let log = agent.log_text();
    assert!(
        !log.contains("kubelet unavailable"),
        "no kubelet warning:\n{log}"
    );
    drop(workload);
    drop(cgroup);
    agent.stop();
}
