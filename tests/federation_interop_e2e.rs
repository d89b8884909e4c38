//! End-to-end federation between a real Sigil trust domain (`example.org`: `sigil-server`,
//! `sigil-agent`) and a real SPIRE one (`spire.test`: `spire-server`, `spire-agent`, built by
//! `tests/spire/build.sh`), each fetching the other's bundle from its bundle endpoint:
//!
//! - over `https_spiffe` (each endpoint presents its server's SVID): a workload of each domain
//!   federating with the other gets the other's bundle in its Workload API X.509 context, and an
//!   mTLS handshake between the two (each presenting its SVID, verifying the peer with the
//!   federated bundle and checking its SPIFFE ID) succeeds both ways; then both CAs rotate
//!   (prepare, refresh on the other side, activate, taint the old authority so that the agents
//!   re-mint) and the handshake works again with the new SVIDs;
//! - over `https_web` (each endpoint presents a certificate of a test CA that the fetching
//!   server trusts through `SSL_CERT_FILE`), both ways;
//! - bad endpoints (down, garbage, another trust domain's bundle, the wrong SPIFFE ID) never
//!   replace the last good bundle: `federation show` and the server's log name the failure,
//!   `bundle list` and the workload keep the bundle.
//!
//! Each wait is bounded and every process is stopped on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sigil::spiffe_id::SpiffeId;
use sigil::tls::{IdentityStore, PeerSvid, ServerVerification, TrustStore};
use sigil_testkit::spire::{SpireAgent, SpireServer, SpireServerConfig};
use sigil_testkit::{agent_with_workload_entry, free_port, subdir, tempdir, Server};
use spiffe::WorkloadApiClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SIGIL_TD: &str = "example.org";
const SPIRE_TD: &str = "spire.test";
const SIGIL_WORKLOAD: &str = "spiffe://example.org/interop/sigil";
const SPIRE_WORKLOAD: &str = "spiffe://spire.test/interop/spire";
const SIGIL_SERVER_ID: &str = "spiffe://example.org/sigil/server";
const SPIRE_SERVER_ID: &str = "spiffe://spire.test/spire/server";

fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid().as_raw())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The authority key ID (hex) of a certificate: which CA signed it.
fn issuer_key_id(der: &[u8]) -> String {
    use x509_parser::extensions::ParsedExtension;
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| {
            c.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(k) => {
                        k.key_identifier.as_ref().map(|k| hex(k.0))
                    }
                    _ => None,
                })
        })
        .unwrap_or_default()
}

/// Polls `f` every 250 ms until it returns `Some`; fails with `what` (and `detail()`) after
/// `secs`.
fn wait_some<T>(
    secs: u64,
    what: &str,
    detail: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}\n{}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What one workload holds: its SVID and the bundles of its X.509 context, by trust domain.
#[derive(Debug, Clone)]
struct View {
    id: String,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    bundles: BTreeMap<String, Vec<Vec<u8>>>,
}

impl View {
    fn roots(&self, td: &str) -> Vec<Vec<u8>> {
        self.bundles.get(td).cloned().unwrap_or_default()
    }

    fn issuer(&self) -> String {
        self.chain
            .first()
            .map(|c| issuer_key_id(c))
            .unwrap_or_default()
    }
}

/// One Workload API X.509 context from `socket`, as the workload `id` sees it (`None` until the
/// agent answers with an SVID for `id`).
fn view(rt: &tokio::runtime::Runtime, socket: &Path, id: &str) -> Option<View> {
    let endpoint = format!("unix://{}", socket.display());
    let ctx = rt.block_on(async {
        let client = WorkloadApiClient::connect_to(&endpoint).await.ok()?;
        tokio::time::timeout(Duration::from_secs(5), client.fetch_x509_context())
            .await
            .ok()?
            .ok()
    })?;
    let svid = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == id)?;
    let bundles = ctx
        .bundle_set()
        .iter()
        .map(|(td, b)| {
            (
                td.to_string(),
                b.authorities()
                    .iter()
                    .map(|c| c.as_bytes().to_vec())
                    .collect(),
            )
        })
        .collect();
    Some(View {
        id: id.to_string(),
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        key: svid.private_key().as_bytes().to_vec(),
        bundles,
    })
}

/// Waits (`secs`) until the workload `id` at `socket` holds a context for which `pred` holds.
fn wait_view(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    id: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> View {
    let last = std::cell::RefCell::new(None::<View>);
    wait_some(
        secs,
        what,
        || {
            format!(
                "last context: {:?}",
                last.borrow().as_ref().map(|v| (
                    v.issuer(),
                    v.bundles
                        .iter()
                        .map(|(td, r)| (td.clone(), r.len()))
                        .collect::<Vec<_>>()
                ))
            )
        },
        || {
            let v = view(rt, socket, id)?;
            let ok = pred(&v);
            *last.borrow_mut() = Some(v.clone());
            ok.then_some(v)
        },
    )
}

/// One mTLS connection from `client` to `server`: each presents its SVID and verifies the
/// other's with the bundle of the peer's trust domain from its own X.509 context, and checks
/// the peer's SPIFFE ID; a byte goes there and back.
async fn handshake(server: &View, client: &View) -> Result<(), String> {
    let td = |id: &str| {
        SpiffeId::parse(id)
            .map(|i| i.trust_domain().to_string())
            .map_err(|e| format!("{id}: {e}"))
    };
    let (server_td, client_td) = (td(&server.id)?, td(&client.id)?);
    let store = |v: &View| {
        IdentityStore::new(v.chain.clone(), v.key.clone())
            .map(Arc::new)
            .map_err(|e| format!("{}'s SVID: {e}", v.id))
    };
    let trust = |v: &View, peer_td: &str| {
        TrustStore::new(&v.roots(peer_td))
            .map(Arc::new)
            .map_err(|e| format!("{}'s bundle of {peer_td}: {e}", v.id))
    };
    let server_config = sigil::tls::server_config(store(server)?, trust(server, &client_td)?)
        .map_err(|e| e.to_string())?;
    let client_config = sigil::tls::client_config(
        ServerVerification::Spiffe {
            trust: trust(client, &server_td)?,
            expected_id: SpiffeId::parse(&server.id).map_err(|e| e.to_string())?,
        },
        Some(store(client)?),
    )
    .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let expected_client = client.id.clone();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server side: {e}"))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("server side: no client certificate")?;
        let peer = PeerSvid::from_leaf_der(peer).map_err(|e| format!("server side: {e}"))?;
        if peer.spiffe_id.to_string() != expected_client {
            return Err(format!(
                "server side: the client is {}, not {expected_client}",
                peer.spiffe_id
            ));
        }
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| format!("server side: {e}"))?;
        tls.write_all(&byte)
            .await
            .map_err(|e| format!("server side: {e}"))?;
        tls.shutdown()
            .await
            .map_err(|e| format!("server side: {e}"))
    });
    let client_side = async {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let name = rustls_pki_types::ServerName::try_from("workload").map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client side: {e}"))?;
        tls.write_all(b"x")
            .await
            .map_err(|e| format!("client side: {e}"))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| format!("client side: {e}"))?;
        Ok::<(), String>(())
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .map_err(|_| "client side: no answer in 10 s".to_string())?;
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .map_err(|_| "server side: no answer in 10 s".to_string())?
        .map_err(|e| format!("server task: {e}"))?;
    // The server's reason first: a client only sees that the server hung up.
    server_result.and(client_result)
}

/// The handshake both ways between the two workloads, asserted.
fn assert_mtls_both_ways(rt: &tokio::runtime::Runtime, sigil: &View, spire: &View, when: &str) {
    for (server, client) in [(sigil, spire), (spire, sigil)] {
        if let Err(e) = rt.block_on(handshake(server, client)) {
            panic!(
                "{when}: mTLS from {} to {} failed: {e}",
                client.id, server.id
            );
        }
    }
}

/// The address of Sigil's bundle endpoint, from the server's log.
fn endpoint_address(server: &Server) -> String {
    wait_some(
        10,
        "the bundle endpoint's address in the log",
        || server.log_text(),
        || {
            server
                .log_text()
                .lines()
                .filter(|l| l.contains("federation bundle endpoint listening"))
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                })
                .map(str::to_string)
        },
    )
}

/// Writes `text` to `dir/name` and returns the path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_str().expect("UTF-8 path").to_string()
}

/// `spire-server localauthority x509 show -output json`.
fn spire_authorities(spire: &SpireServer) -> serde_json::Value {
    let out = spire.cli_ok(&["localauthority", "x509", "show"], &["-output", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn authority_id(state: &serde_json::Value, slot: &str) -> String {
    state[slot]["authority_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no {slot} authority in {state}"))
        .to_string()
}

/// A Sigil trust domain with a workload federating with `spire.test`, and a SPIRE one with a
/// workload federating with `example.org`; the relationships are the caller's.
struct Domains {
    rt: tokio::runtime::Runtime,
    sigil: Server,
    sigil_agent: sigil_testkit::WorkloadAgent,
    spire: SpireServer,
    spire_agent: SpireAgent,
}

impl Domains {
    fn sigil_view(&self, secs: u64, what: &str, pred: impl Fn(&View) -> bool) -> View {
        let socket = self.sigil_agent.agent.socket_path();
        wait_view(&self.rt, &socket, SIGIL_WORKLOAD, secs, what, pred)
    }

    fn spire_view(&self, secs: u64, what: &str, pred: impl Fn(&View) -> bool) -> View {
        wait_view(
            &self.rt,
            &self.spire_agent.socket,
            SPIRE_WORKLOAD,
            secs,
            what,
            pred,
        )
    }

    /// `sigil-server federation refresh --id spire.test`, which must succeed.
    fn sigil_refresh(&self) -> serde_json::Value {
        self.sigil
            .cli_json(&["federation", "refresh", "--id", SPIRE_TD])
    }

    /// `federation refresh` until `federation show --id spire.test` satisfies `pred` (fails after
    /// `secs`); returns that `show`.
    fn sigil_refresh_until(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_some(
            secs,
            what,
            || self.sigil.cli_ok(&["federation", "show", "--id", SPIRE_TD]),
            || {
                let shown = self.sigil_refresh()["relationship"].clone();
                pred(&shown).then_some(shown)
            },
        )
    }

    /// `spire-server federation refresh -id example.org`, which must succeed.
    fn spire_refresh(&self) {
        self.spire
            .cli_ok(&["federation", "refresh"], &["-id", SIGIL_TD]);
    }
}

/// Starts both trust domains: Sigil (with `sigil_flags`) first, then SPIRE with `spire_hcl`
/// made from Sigil's bundle endpoint address; then the agents, each with one workload entry for
/// this process's uid federating with the other domain (SPIRE's after `before_entries` has
/// given it Sigil's bundle).
fn start_domains(
    dir: &Path,
    sigil_flags: &[&str],
    spire_hcl: impl FnOnce(&str) -> String,
    before_entries: impl FnOnce(&Server, &SpireServer),
) -> Domains {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sigil = Server::start(&dir.join("sigil"), sigil_flags);
    let sigil_endpoint = endpoint_address(&sigil);
    let spire = SpireServer::start_with(
        &subdir(dir, "spire"),
        SPIRE_TD,
        &SpireServerConfig {
            server_hcl: spire_hcl(&sigil_endpoint),
            ..SpireServerConfig::default()
        },
    );
    before_entries(&sigil, &spire);

    let sel = uid_selector();
    let sigil_agent = agent_with_workload_entry(
        &sigil,
        &subdir(dir, "sigil-agent"),
        SIGIL_WORKLOAD,
        &[sel.as_str()],
        &["--federates-with", SPIRE_TD],
    );
    let token = spire.token_generate(None);
    let spire_agent = SpireAgent::start(&spire, &subdir(dir, "spire-agent"), &token);
    spire.entry_create(&[
        "-parentID",
        &spire_agent.agent_id,
        "-spiffeID",
        SPIRE_WORKLOAD,
        "-selector",
        &sel,
        "-federatesWith",
        &format!("spiffe://{SIGIL_TD}"),
    ]);
    Domains {
        rt,
        sigil,
        sigil_agent,
        spire,
        spire_agent,
    }
}

/// SPIRE's `federation { ... }` block: its bundle endpoint on `port` (profile HCL
/// `endpoint_profile`, empty for SPIRE's default https_spiffe) and, when `federates_with` is
/// given, the relationship with example.org.
fn spire_federation_hcl(port: u16, endpoint_profile: &str, federates_with: &str) -> String {
    format!(
        r#"
    federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {port}
            refresh_hint = "1m"
            {endpoint_profile}
        }}
        {federates_with}
    }}
"#
    )
}

/// Both trust domains federating over https_spiffe, each side's first bundle of the other
/// given by hand; both have fetched once.
fn spiffe_domains(dir: &Path) -> Domains {
    let spire_port = free_port();
    let spire_url = format!("https://127.0.0.1:{spire_port}");
    let d = start_domains(
        dir,
        &[
            "--federation-bundle-endpoint-address",
            "127.0.0.1:0",
            "--federation-bundle-endpoint-refresh-hint",
            "10s",
        ],
        |sigil_endpoint| {
            spire_federation_hcl(
                spire_port,
                "",
                &format!(
                    r#"federates_with "{SIGIL_TD}" {{
            bundle_endpoint_url = "https://{sigil_endpoint}"
            bundle_endpoint_profile "https_spiffe" {{
                endpoint_spiffe_id = "{SIGIL_SERVER_ID}"
            }}
        }}"#
                ),
            )
        },
        |sigil, spire| {
            let sigil_bundle = write(
                &spire.dir,
                "sigil-bundle.json",
                &sigil.cli_ok(&["bundle", "show", "--format", "spiffe"]),
            );
            spire.cli_ok(
                &["bundle", "set"],
                &[
                    "-format",
                    "spiffe",
                    "-id",
                    &format!("spiffe://{SIGIL_TD}"),
                    "-path",
                    &sigil_bundle,
                ],
            );
            let spire_bundle = write(
                &sigil.dir,
                "spire-bundle.json",
                &spire.cli_ok(&["bundle", "show"], &["-format", "spiffe"]),
            );
            let created = sigil.cli_json(&[
                "federation",
                "create",
                "--trust-domain",
                SPIRE_TD,
                "--bundle-endpoint-url",
                &spire_url,
                "--bundle-endpoint-profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                SPIRE_SERVER_ID,
                "--trust-domain-bundle-path",
                &spire_bundle,
                "--trust-domain-bundle-format",
                "spiffe",
            ]);
            assert_eq!(created["bundle"]["x509_roots"], 1, "{created}");
        },
    );
    // Both fetch from the other's endpoint, authenticated with the bundle given by hand.
    let refreshed = d.sigil_refresh();
    assert!(
        refreshed["relationship"]["status"]["last_success_at"].as_u64() > Some(0),
        "{refreshed}"
    );
    d.spire_refresh();
    d
}

fn spire_roots(s: &SpireServer) -> Vec<Vec<u8>> {
    sigil::x509::parse_pem_certs(&s.bundle_pem()).expect("SPIRE's bundle is PEM")
}

fn sigil_roots(s: &Server) -> Vec<Vec<u8>> {
    sigil::x509::parse_pem_certs(&s.cli_ok(&["bundle", "show"])).expect("PEM bundle")
}

#[test]
fn sigil_and_spire_federate_over_https_spiffe_through_ca_rotations() {
    let dir = tempdir();
    let d = spiffe_domains(dir.path());
    let sigil_view = d.sigil_view(60, "the Sigil workload holding spire.test's bundle", |v| {
        v.roots(SPIRE_TD) == spire_roots(&d.spire)
    });
    let spire_view = d.spire_view(60, "the SPIRE workload holding example.org's bundle", |v| {
        v.roots(SIGIL_TD) == sigil_roots(&d.sigil)
    });
    assert_mtls_both_ways(&d.rt, &sigil_view, &spire_view, "before the rotations");
    // The federated bundle is what makes it work: the own domain's roots alone do not.
    let mut alone = spire_view.clone();
    alone.bundles.remove(SIGIL_TD);
    let e =
        d.rt.block_on(handshake(&sigil_view, &alone))
            .expect_err("no bundle of example.org, no handshake");
    assert!(e.contains("example.org"), "{e}");

    // SPIRE's CA rotates: the prepared root reaches Sigil's workload before it signs anything.
    let before = spire_authorities(&d.spire);
    let old_spire = authority_id(&before, "active");
    d.spire.cli_ok(&["localauthority", "x509", "prepare"], &[]);
    let prepared = authority_id(&spire_authorities(&d.spire), "prepared");
    // SPIRE's endpoint serves its bundle from a cache: refreshed until the root shows.
    let shown = d.sigil_refresh_until(30, "SPIRE's prepared root fetched", |s| {
        s["bundle"]["x509_roots"] == 2
    });
    assert_eq!(shown["status"]["consecutive_failures"], 0, "{shown}");
    d.sigil_view(
        30,
        "the Sigil workload holding SPIRE's prepared root",
        |v| v.roots(SPIRE_TD).len() == 2,
    );
    d.spire.cli_ok(
        &["localauthority", "x509", "activate"],
        &["-authorityID", &prepared],
    );
    d.spire.cli_ok(
        &["localauthority", "x509", "taint"],
        &["-authorityID", &old_spire],
    );

    // Sigil's CA rotates the same way.
    let old_sigil = d.sigil.cli_json(&["localauthority", "x509", "show"])["active"]["authority_id"]
        .as_str()
        .expect("an active authority")
        .to_string();
    d.sigil.cli_ok(&["localauthority", "x509", "prepare"]);
    let sigil_prepared = d.sigil.cli_json(&["localauthority", "x509", "show"])["prepared"]
        ["authority_id"]
        .as_str()
        .expect("a prepared authority")
        .to_string();
    d.spire_refresh();
    d.spire_view(
        30,
        "the SPIRE workload holding Sigil's prepared root",
        |v| v.roots(SIGIL_TD).len() == 2,
    );
    d.sigil.cli_ok(&[
        "localauthority",
        "x509",
        "activate",
        "--authority-id",
        &sigil_prepared,
    ]);
    d.sigil.cli_ok(&[
        "localauthority",
        "x509",
        "taint",
        "--authority-id",
        &old_sigil,
    ]);

    // Both workloads get SVIDs of the new authorities; the bundles refreshed once more.
    let sigil_view = d.sigil_view(60, "a Sigil SVID of the new authority", |v| {
        v.issuer() == sigil_prepared && v.roots(SPIRE_TD).len() == 2
    });
    let spire_view = d.spire_view(90, "a SPIRE SVID of the new authority", |v| {
        v.issuer() == prepared && v.roots(SIGIL_TD).len() == 2
    });
    assert_ne!(spire_view.issuer(), old_spire);
    d.sigil_refresh();
    d.spire_refresh();
    assert_mtls_both_ways(&d.rt, &sigil_view, &spire_view, "after both CAs rotated");

    // The relationships stay healthy: each side's fetch is authenticated with what it fetched.
    let shown = d.sigil.cli_json(&["federation", "show", "--id", SPIRE_TD]);
    assert_eq!(shown["status"]["consecutive_failures"], 0, "{shown}");
    assert_eq!(shown["bundle"]["x509_roots"], 2, "{shown}");
}

/// A CA and a certificate for `127.0.0.1` it signed, as files.
struct WebPki {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The test web PKI, made once per test run in `<target>/tmp` (a run removes those of runs that
/// are over); `SSL_CERT_FILE`, which both servers' https_web fetchers read (Go's crypto/x509,
/// rustls-native-certs), points at its CA from then on. The variable is process-wide because
/// the processes inherit the test's environment.
fn web_pki() -> &'static WebPki {
    static PKI: OnceLock<WebPki> = OnceLock::new();
    PKI.get_or_init(|| {
        const PREFIX: &str = "federation-interop-pki-";
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX) {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(old.path());
                }
            }
        }
        let dir = subdir(tmp, &format!("{PREFIX}{}", std::process::id()));
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "federation interop test web CA");
        let ca_cert = ca.self_signed(&ca_key).expect("self-signing the CA");
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("server name");
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
                127, 0, 0, 1,
            ])));
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = rcgen::Issuer::new(ca.clone(), &ca_key);
        let cert = leaf
            .signed_by(&key, &issuer)
            .expect("signing the server cert");
        let pki = WebPki {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_file, ca_cert.pem()).expect("writing the CA");
        std::fs::write(&pki.cert_file, cert.pem()).expect("writing the server cert");
        std::fs::write(&pki.key_file, key.serialize_pem()).expect("writing the server key");
        std::env::set_var("SSL_CERT_FILE", &pki.ca_file);
        pki
    })
}

#[test]
fn sigil_and_spire_federate_over_https_web_both_ways() {
    let pki = web_pki();
    let dir = tempdir();
    let spire_port = free_port();
    let spire_url = format!("https://127.0.0.1:{spire_port}");
    let d = start_domains(
        dir.path(),
        &[
            "--federation-bundle-endpoint-address",
            "127.0.0.1:0",
            "--federation-bundle-endpoint-profile",
            "https_web",
            "--federation-bundle-endpoint-cert-file",
            pki.cert_file.to_str().expect("UTF-8 path"),
            "--federation-bundle-endpoint-key-file",
            pki.key_file.to_str().expect("UTF-8 path"),
            "--federation-bundle-endpoint-refresh-hint",
            "30s",
        ],
        |sigil_endpoint| {
            spire_federation_hcl(
                spire_port,
                &format!(
                    r#"profile "https_web" {{
                serving_cert_file {{
                    cert_file_path = "{}"
                    key_file_path = "{}"
                    file_sync_interval = "1m"
                }}
            }}"#,
                    pki.cert_file.display(),
                    pki.key_file.display()
                ),
                &format!(
                    r#"federates_with "{SIGIL_TD}" {{
            bundle_endpoint_url = "https://{sigil_endpoint}"
            bundle_endpoint_profile "https_web" {{}}
        }}"#
                ),
            )
        },
        |sigil, spire| {
            // No bundle by hand: each side fetches the other's over Web PKI.
            wait_some(
                30,
                "SPIRE fetching example.org's bundle over https_web",
                || spire.log_text(),
                || {
                    spire
                        .cli(&["federation", "refresh"], &["-id", SIGIL_TD])
                        .status
                        .success()
                        .then_some(())
                },
            );
            let created = sigil.cli_json(&[
                "federation",
                "create",
                "--trust-domain",
                SPIRE_TD,
                "--bundle-endpoint-url",
                &spire_url,
                "--bundle-endpoint-profile",
                "https_web",
            ]);
            assert_eq!(created["bundle_endpoint_profile"], "https_web", "{created}");
        },
    );
    let shown = d.sigil_refresh_until(30, "spire.test's bundle fetched over https_web", |s| {
        s["bundle"]["x509_roots"] == 1
    });
    assert_eq!(shown["status"]["consecutive_failures"], 0, "{shown}");
    let listed = d.spire.cli_ok(
        &["bundle", "list"],
        &["-id", &format!("spiffe://{SIGIL_TD}")],
    );
    assert_eq!(
        sigil::x509::parse_pem_certs(&listed).expect("PEM"),
        sigil_roots(&d.sigil),
        "SPIRE's copy of example.org's bundle"
    );

    let sigil_view = d.sigil_view(60, "the Sigil workload holding spire.test's bundle", |v| {
        v.roots(SPIRE_TD) == spire_roots(&d.spire)
    });
    let spire_view = d.spire_view(60, "the SPIRE workload holding example.org's bundle", |v| {
        v.roots(SIGIL_TD) == sigil_roots(&d.sigil)
    });
    assert_mtls_both_ways(&d.rt, &sigil_view, &spire_view, "over https_web");

    // A root prepared on either side travels over https_web too, fetched by each server's own
    // refresher at the refresh hint the other serves (SPIRE's 1m; Sigil's 30s, SPIRE fetching
    // at least a minute apart), no `federation refresh` needed.
    d.spire.cli_ok(&["localauthority", "x509", "prepare"], &[]);
    d.sigil.cli_ok(&["localauthority", "x509", "prepare"]);
    wait_some(
        100,
        "Sigil's refresher fetching SPIRE's prepared root",
        || d.sigil.log_text(),
        || {
            let shown = d.sigil.cli_json(&["federation", "show", "--id", SPIRE_TD]);
            (shown["bundle"]["x509_roots"] == 2).then_some(())
        },
    );
    wait_some(
        100,
        "SPIRE's refresher fetching Sigil's prepared root",
        || d.spire.log_text(),
        || {
            let listed = d.spire.cli_ok(
                &["bundle", "list"],
                &["-id", &format!("spiffe://{SIGIL_TD}")],
            );
            (sigil::x509::parse_pem_certs(&listed).ok()?.len() == 2).then_some(())
        },
    );
    d.sigil_view(
        30,
        "the Sigil workload holding SPIRE's prepared root",
        |v| v.roots(SPIRE_TD).len() == 2,
    );
    d.spire_view(
        30,
        "the SPIRE workload holding Sigil's prepared root",
        |v| v.roots(SIGIL_TD).len() == 2,
    );
}

/// A tiny HTTPS server with the test web certificate answering every request with `body`.
fn serve_body(rt: &tokio::runtime::Runtime, body: Arc<std::sync::Mutex<String>>) -> String {
    let pki = web_pki();
    let chain = sigil::x509::parse_pem_certs(
        &std::fs::read_to_string(&pki.cert_file).expect("reading the server cert"),
    )
    .expect("PEM cert")
    .into_iter()
    .map(rustls_pki_types::CertificateDer::from)
    .collect();
    let key = rustls_pki_types::pem::PemObject::from_pem_file(&pki.key_file).expect("PEM key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("the server cert and key");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the tiny server");
    let address = listener.local_addr().expect("its address");
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let body = body
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // The request head, then one answer.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    format!("https://{address}/")
}

#[test]
fn bad_bundle_endpoints_never_replace_the_last_good_bundle() {
    let pki = web_pki();
    assert!(pki.ca_file.exists());
    let dir = tempdir();
    let d = spiffe_domains(dir.path());
    let good_list = d.sigil.cli_json(&["bundle", "list"]);
    let good_view = d.sigil_view(60, "the Sigil workload holding spire.test's bundle", |v| {
        v.roots(SPIRE_TD) == spire_roots(&d.spire)
    });
    let good_roots = good_view.roots(SPIRE_TD);
    let spire_url = d.sigil.cli_json(&["federation", "show", "--id", SPIRE_TD])
        ["bundle_endpoint_url"]
        .as_str()
        .expect("the URL")
        .to_string();

    let body = Arc::new(std::sync::Mutex::new(String::new()));
    let tiny_url = serve_body(&d.rt, body.clone());
    let set_body = |text: &str| {
        *body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = text.to_string();
    };
    let down_url = format!("https://127.0.0.1:{}/", free_port());
    let sigil_bundle = d.sigil.cli_ok(&["bundle", "show", "--format", "spiffe"]);

    // (what, URL, profile, endpoint SPIFFE ID, the body the tiny server serves, the error says)
    let cases: [(&str, &str, &str, &str, &str, &str); 4] = [
        (
            "an endpoint that is down",
            &down_url,
            "https_spiffe",
            SPIRE_SERVER_ID,
            "",
            "check that the URL's host and port are right",
        ),
        (
            "an endpoint serving garbage",
            &tiny_url,
            "https_web",
            "",
            "<html>not a bundle</html>",
            "the answer is not JSON",
        ),
        (
            "an endpoint serving another trust domain's bundle",
            &tiny_url,
            "https_web",
            "",
            &sigil_bundle,
            "names spiffe://example.org, not trust domain spire.test",
        ),
        (
            "an endpoint presenting the wrong SPIFFE ID",
            &spire_url,
            "https_spiffe",
            "spiffe://spire.test/not-the-server",
            "",
            "presented SPIFFE ID spiffe://spire.test/spire/server, but \
             spiffe://spire.test/not-the-server was configured",
        ),
    ];
    for (what, url, profile, endpoint_id, served, says) in cases {
        set_body(served);
        let mut args = vec![
            "federation",
            "update",
            "--trust-domain",
            SPIRE_TD,
            "--bundle-endpoint-url",
            url,
            "--bundle-endpoint-profile",
            profile,
        ];
        if !endpoint_id.is_empty() {
            args.extend(["--endpoint-spiffe-id", endpoint_id]);
        }
        d.sigil.cli_ok(&args);
        let out = d.sigil.cli(&["federation", "refresh", "--id", SPIRE_TD]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the refresh succeeded");
        assert!(err.contains(says), "{what}: {err}");
        let shown = d.sigil.cli_json(&["federation", "show", "--id", SPIRE_TD]);
        let last_error = shown["status"]["last_error"].as_str().unwrap_or("");
        assert!(last_error.contains(says), "{what}: {shown}");
        assert!(
            shown["status"]["consecutive_failures"].as_u64() >= Some(1),
            "{what}: {shown}"
        );
        // The server's log names the trust domain, the URL and the error.
        let sigil = &d.sigil;
        wait_some(
            10,
            &format!("{what}: a log line naming the failure"),
            || sigil.log_text(),
            || {
                sigil
                    .log_text()
                    .lines()
                    .any(|l| l.contains(SPIRE_TD) && l.contains(url) && l.contains(says))
                    .then_some(())
            },
        );
        // The last good bundle stays, at the server and at the workload.
        assert_eq!(d.sigil.cli_json(&["bundle", "list"]), good_list, "{what}");
        let view = view(&d.rt, &d.sigil_agent.agent.socket_path(), SIGIL_WORKLOAD)
            .expect("the workload's context");
        assert_eq!(view.roots(SPIRE_TD), good_roots, "{what}");
    }

    // Back to the right endpoint: fetched again, and the failure count reset.
    d.sigil.cli_ok(&[
        "federation",
        "update",
        "--trust-domain",
        SPIRE_TD,
        "--bundle-endpoint-url",
        &spire_url,
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        SPIRE_SERVER_ID,
    ]);
    let shown = d.sigil_refresh()["relationship"].clone();
    assert_eq!(shown["status"]["consecutive_failures"], 0, "{shown}");
    assert_eq!(shown["status"]["last_error"], "", "{shown}");
}
