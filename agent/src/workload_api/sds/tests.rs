//! SDS on the service itself: names, validators, the xDS exchange (paused time), bad input; and
//! once over a real socket, as Envoy reaches it.

use std::time::Duration;

use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message as _;
use sigil::proto::admin as apb;
use sigil::proto::node as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::sync::cache::Cache;
use crate::sync::worker::testing::TestState;
use crate::workload_api::identities::tests::{entry, now_unix, selectors};
use crate::workload_api::jwt::NodeLink;
use crate::workload_attestor::ProcessPin;

/// A self-signed CA certificate (DER) standing in for a trust domain's root.
fn ca_der(cn: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.self_signed(&key).unwrap().der().to_vec()
}

/// The roots of our trust domain and of `other.org`, made once per test process.
fn roots() -> &'static (Vec<u8>, Vec<u8>) {
    static ROOTS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| (ca_der("example.org root"), ca_der("other.org root")))
}

fn pem(der: &[u8]) -> Vec<u8> {
    sigil::x509::to_pem_certs(&[der.to_vec()]).into_bytes()
}

/// An entry (`w/<id>`, `created_at` orders the default) for `unix:uid:7`.
fn uid7(id: &str, created_at: i64, federates_with: &[&str]) -> apb::Entry {
    let mut e = entry(id, created_at, &["unix:uid:7"], "");
    e.federates_with = federates_with.iter().map(|s| s.to_string()).collect();
    e
}

/// A synced cache with `entries`, our bundle and `other.org`'s, and SVIDs (leaf bytes
/// `<id>-1`) for `minted`.
fn cache(entries: Vec<apb::Entry>, minted: &[&str]) -> Cache {
    let (own, other) = roots();
    let mut c = Cache::new();
    c.apply_sync(pb::SyncResponse {
        upserted: entries,
        full: true,
        snapshot_complete: true,
        revision: 1,
        bundle: Some(pb::Bundle {
            trust_domain: "example.org".into(),
            x509_roots: own.clone(),
            jwks_json: r#"{"keys":[]}"#.into(),
            sequence_number: 1,
            ..Default::default()
        }),
        federated_bundles: vec![pb::Bundle {
            trust_domain: "other.org".into(),
            x509_roots: other.clone(),
            sequence_number: 1,
            ..Default::default()
        }],
        federated_bundles_set: true,
        ..Default::default()
    })
    .unwrap();
    for id in minted {
        mint(&mut c, id, &format!("{id}-1"));
    }
    c
}

/// A new SVID for entry `id` whose leaf is the bytes of `leaf`.
fn mint(c: &mut Cache, id: &str, leaf: &str) {
    let now = now_unix();
    let p = c.make_csrs(&[id.to_string()]).unwrap().pop().unwrap();
    assert!(c.store_svid(p, vec![leaf.as_bytes().to_vec()], now + 3600, now));
}

fn state_with(cache: Cache) -> TestState {
    TestState::new(cache)
}

async fn sds_with(
    state: &Arc<AgentState>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    config: SdsConfig,
) -> SecretDiscovery {
    let roots = state.identity.read().await.chain_der.clone();
    let api = WorkloadApi::new(
        state.clone(),
        Arc::new(WorkloadAttestor::new()),
        // Never dialled: SDS makes no JWT calls.
        NodeLink::new(
            Arc::new(crate::sync::servers::Servers::new(vec![
                "127.0.0.1:1".into()
            ])),
            state.trust_domain.clone(),
            Arc::new(sigil::tls::IdentityStore::empty()),
            Arc::new(sigil::tls::TrustStore::new(&roots).unwrap()),
        ),
        shutdown,
    );
    SecretDiscovery::new(api, config)
}

/// A caller with `selectors`, pinned to this test process (alive throughout).
fn caller(sel: &[&str]) -> Caller {
    let pid = std::process::id() as i32;
    Caller {
        pid,
        selectors: Arc::new(selectors(sel)),
        pin: Arc::new(ProcessPin::pin(pid).unwrap()),
        uid: 0,
        gid: 0,
        exe_hash_skipped: false,
    }
}

/// A stream for `caller` and the sender of its requests.
async fn open(
    sds: &SecretDiscovery,
    caller: Caller,
) -> Result<(SdsStream, mpsc::UnboundedSender<DiscoveryRequest>), Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let requests = Box::pin(UnboundedReceiverStream::new(rx).map(Ok));
    sds.open(caller, requests).await.map(|s| (s, tx))
}

/// A request for `names`, answering the response with `nonce` and `version` ("" for none).
fn request(names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    }
}

/// The acknowledgement of `r` for `names`.
fn ack(r: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    request(names, &r.nonce, &r.version_info)
}

/// The rejection of `r` (the last version applied being `applied`).
fn nack(r: &DiscoveryResponse, names: &[&str], applied: &str, why: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: why.into(),
            details: Vec::new(),
        }),
        ..request(names, &r.nonce, applied)
    }
}

async fn next(s: &mut SdsStream) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("a response")
        .expect("the stream goes on")
        .expect("a response, not an error")
}

/// Nothing is sent for a minute (paused time: at once).
async fn quiet(s: &mut SdsStream, why: &str) {
    let r = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
    assert!(r.is_err(), "{why}: got {r:?}");
}

fn secrets(r: &DiscoveryResponse) -> Vec<tls_v3::Secret> {
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            tls_v3::Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    secrets(r).into_iter().map(|s| s.name).collect()
}

fn inline_bytes(d: &Option<core_v3::DataSource>) -> Vec<u8> {
    match d.as_ref().and_then(|d| d.specifier.clone()) {
        Some(core_v3::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// A TLS certificate secret's PEM chain.
fn chain(s: &tls_v3::Secret) -> Vec<u8> {
    match &s.r#type {
        Some(tls_v3::secret::Type::TlsCertificate(t)) => {
            let key = inline_bytes(&t.private_key);
            assert!(key.starts_with(b"-----BEGIN PRIVATE KEY-----"));
            inline_bytes(&t.certificate_chain)
        }
        other => panic!("{}: not a TLS certificate: {other:?}", s.name),
    }
}

/// What a validation context trusts: `(trust domain, PEM roots)` of its SPIFFE validator, or
/// `("", PEM)` for `trusted_ca`.
fn trusted(s: &tls_v3::Secret) -> Vec<(String, Vec<u8>)> {
    let Some(tls_v3::secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{}: not a validation context", s.name);
    };
    if let Some(c) = &v.custom_validator_config {
        assert!(v.trusted_ca.is_none());
        assert_eq!(c.name, SPIFFE_VALIDATOR);
        let any = c.typed_config.as_ref().unwrap();
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
        );
        let cfg = tls_v3::SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
        return cfg
            .trust_domains
            .iter()
            .map(|t| (t.name.clone(), inline_bytes(&t.trust_bundle)))
            .collect();
    }
    vec![(String::new(), inline_bytes(&v.trusted_ca))]
}

fn view_of(c: &Cache, sel: &[&str]) -> View {
    match sds_view(c, &selectors(sel)) {
        Watch::Send(v) => v,
        _ => panic!("no view"),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn resolved(view: &View, names: &[&str], v: Validator) -> (Vec<tls_v3::Secret>, Vec<String>) {
    let r = resolve(view, &set(names), &SdsConfig::default(), v);
    let secrets = r
        .secrets
        .iter()
        .map(|a| tls_v3::Secret::decode(a.value.as_slice()).unwrap())
        .collect();
    (secrets, r.unknown)
}

#[test]
fn names_resolve_as_spire_names_them() {
    let (own, other) = roots();
    // `a` (the default: oldest) federates with other.org; `b` does not.
    let c = cache(
        vec![uid7("b", 2, &[]), uid7("a", 1, &["other.org"])],
        &["a", "b"],
    );
    let view = view_of(&c, &["unix:uid:7"]);
    let (a, b) = ("spiffe://example.org/w/a", "spiffe://example.org/w/b");

    // No names: every trust domain's context and every TLS certificate, by their IDs.
    let (all, unknown) = resolved(&view, &[], Validator::Spiffe);
    assert!(unknown.is_empty());
    let got: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(got, ["spiffe://example.org", "spiffe://other.org", a, b]);
    assert_eq!(trusted(&all[0]), [("example.org".into(), pem(own))]);
    assert_eq!(trusted(&all[1]), [("other.org".into(), pem(other))]);
    assert_eq!(chain(&all[2]), pem(b"a-1"));
    assert_eq!(chain(&all[3]), pem(b"b-1"));

    // The default names, a SPIFFE ID, a trust domain, and names the caller has nothing for.
    let (got, unknown) = resolved(
        &view,
        &[
            "default",
            "ROOTCA",
            "ALL",
            b,
            "spiffe://other.org",
            "spiffe://example.org/w/c",
            "spiffe://third.org",
            "nope",
        ],
        Validator::Spiffe,
    );
    let by_name = |n: &str| got.iter().find(|s| s.name == n).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(chain(by_name("default")), pem(b"a-1"), "the default SVID");
    assert_eq!(chain(by_name(b)), pem(b"b-1"));
    assert_eq!(
        trusted(by_name("ROOTCA")),
        [("example.org".into(), pem(own))]
    );
    assert_eq!(
        trusted(by_name("ALL")),
        [
            ("example.org".into(), pem(own)),
            ("other.org".into(), pem(other))
        ],
        "one context, every trust domain, sorted"
    );
    assert_eq!(
        trusted(by_name("spiffe://other.org")),
        [("other.org".into(), pem(other))]
    );
    assert_eq!(
        unknown,
        ["nope", "spiffe://example.org/w/c", "spiffe://third.org"]
    );

    // trusted_ca contexts when the SPIFFE validator is off; ALL keeps it (it has no other form).
    let (got, _) = resolved(
        &view,
        &["ROOTCA", "spiffe://other.org", "ALL"],
        Validator::TrustedCa,
    );
    let by_name = |n: &str| got.iter().find(|s| s.name == n).unwrap();
    assert_eq!(trusted(by_name("ROOTCA")), [(String::new(), pem(own))]);
    assert_eq!(
        trusted(by_name("spiffe://other.org")),
        [(String::new(), pem(other))]
    );
    assert_eq!(trusted(by_name("ALL")).len(), 2);

    // A caller whose entries federate with nobody may use our trust domain only.
    let c = cache(vec![uid7("b", 2, &[])], &["b"]);
    let view = view_of(&c, &["unix:uid:7"]);
    let (got, unknown) = resolved(&view, &["ALL", "spiffe://other.org"], Validator::Spiffe);
    assert_eq!(trusted(&got[0]), [("example.org".into(), pem(own))]);
    assert_eq!(unknown, ["spiffe://other.org"]);
}

#[test]
fn the_validator_follows_config_node_metadata_and_envoy_version() {
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let node = |meta: Option<Kind>, version: Option<(u32, u32)>| core_v3::Node {
        metadata: meta.map(|k| Struct {
            fields: [(
                DISABLE_SPIFFE_CERT_VALIDATION_KEY.to_string(),
                Value { kind: Some(k) },
            )]
            .into(),
        }),
        user_agent_version_type: version.map(|(major_number, minor_number)| {
            core_v3::node::UserAgentVersionType::UserAgentBuildVersion(core_v3::BuildVersion {
                version: Some(SemanticVersion {
                    major_number,
                    minor_number,
                    patch: 0,
                }),
                metadata: None,
            })
        }),
        ..Default::default()
    };
    use Validator::{Spiffe, TrustedCa};
    let s = |v: &str| Some(Kind::StringValue(v.into()));
    for (n, config, want) in [
        (node(None, None), false, Spiffe),
        (node(None, Some((1, 40))), false, Spiffe),
        (node(None, Some((1, 17))), false, TrustedCa),
        (node(None, Some((1, 40))), true, TrustedCa),
        (node(Some(Kind::BoolValue(true)), None), false, TrustedCa),
        (node(s("true"), None), false, TrustedCa),
        (node(s("1"), None), false, TrustedCa),
        (node(Some(Kind::BoolValue(false)), None), true, Spiffe),
        (node(s("False"), None), true, Spiffe),
        // Values that are not booleans are ignored.
        (node(s("test"), None), false, Spiffe),
        (node(s("test"), None), true, TrustedCa),
        (node(Some(Kind::NumberValue(5.0)), None), true, TrustedCa),
    ] {
        assert_eq!(validator_for(&n, config), want, "{n:?} config {config}");
    }
}

#[test]
fn bad_requests_are_invalid_arguments() {
    let ok = request(&["default"], "", "");
    assert!(check_request(&ok).is_ok());
    assert!(
        check_request(&DiscoveryRequest {
            type_url: String::new(),
            ..ok.clone()
        })
        .is_ok(),
        "no type: the Secret type"
    );
    let many: Vec<String> = (0..=MAX_RESOURCE_NAMES).map(|i| format!("n{i}")).collect();
    let long = "x".repeat(MAX_RESOURCE_NAME_BYTES + 1);
    let big: Vec<String> = (0..40)
        .map(|i| format!("{i}{}", "y".repeat(2000)))
        .collect();
    for (req, want) in [
        (
            DiscoveryRequest {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                ..ok.clone()
            },
            "unsupported type_url \"type.googleapis.com/envoy.config.cluster.v3.Cluster\"",
        ),
        (
            DiscoveryRequest {
                resource_names: many,
                ..ok.clone()
            },
            "1025 resource names requested; at most 1024",
        ),
        (
            DiscoveryRequest {
                resource_names: vec![long],
                ..ok.clone()
            },
            "longer than 2048 bytes",
        ),
        (
            DiscoveryRequest {
                resource_names: big,
                ..ok.clone()
            },
            "at most 65536 may be",
        ),
    ] {
        let err = check_request(&req).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(want), "{want}: {}", err.message());
        assert!(err.message().len() < 400, "bounded: {}", err.message());
    }
}

#[tokio::test(start_paused = true)]
async fn responses_carry_version_and_nonce_acks_are_quiet_and_rotation_is_pushed() {
    let state = state_with(cache(
        vec![uid7("a", 1, &[]), uid7("b", 2, &[])],
        &["a", "b"],
    ));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    assert_eq!(state.metrics.workload_streams.get(), 1);

    // Nothing before the first request.
    quiet(&mut s, "no request yet").await;
    tx.send(request(&["default"], "", "")).unwrap();
    let r1 = next(&mut s).await;
    assert_eq!(names(&r1), ["default"]);
    assert_eq!(chain(&secrets(&r1)[0]), pem(b"a-1"));
    assert_eq!(r1.nonce, "1");
    assert_eq!(r1.version_info.len(), 16, "{r1:?}");

    // ACK: nothing is sent again.
    tx.send(ack(&r1, &["default"])).unwrap();
    quiet(&mut s, "an acknowledged version is not re-sent").await;
    // A change that leaves these names' secrets as they were: nothing.
    state.notify_changed();
    quiet(&mut s, "unchanged secrets are not re-sent").await;
    // The SVID of `b`, which this stream did not ask for, rotates: nothing.
    mint(&mut *state.cache.write().await, "b", "b-2");
    state.publish();
    quiet(&mut s, "b is not subscribed").await;

    // The default SVID rotates: pushed with a new version and nonce.
    mint(&mut *state.cache.write().await, "a", "a-2");
    state.publish();
    let r2 = next(&mut s).await;
    assert_eq!(chain(&secrets(&r2)[0]), pem(b"a-2"));
    assert_eq!(r2.nonce, "2");
    assert_ne!(r2.version_info, r1.version_info);
    tx.send(ack(&r2, &["default"])).unwrap();
    quiet(&mut s, "acknowledged").await;

    // Envoy closes its side: the stream ends.
    drop(tx);
    assert!(s.next().await.is_none());
    drop(s);
    assert_eq!(state.metrics.workload_streams.get(), 0);
}

/// Log lines written while it is installed (this thread).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn install(&self) -> (tracing::subscriber::DefaultGuard, tracing::Dispatch) {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // With one registered dispatcher, a callsite's interest is fixed by whichever thread
        // hits it first (a parallel test without a subscriber would switch it off): a second
        // dispatcher makes tracing ask each one.
        let second = tracing::Dispatch::new(tracing_subscriber::registry());
        tracing::callsite::rebuild_interest_cache();
        (guard, second)
    }

    fn count(&self, what: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn a_rejected_version_is_logged_once_and_never_resent() {
    let logs = Logs::default();
    let _guard = logs.install();
    let state = state_with(cache(vec![uid7("a", 1, &[])], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    let names = ["default"];
    tx.send(request(&names, "", "")).unwrap();
    let r1 = next(&mut s).await;

    // Envoy rejects it (it has applied nothing yet): logged, not re-sent.
    tx.send(nack(&r1, &names, "", "bad PEM, say")).unwrap();
    quiet(&mut s, "a rejected version is not re-sent").await;
    assert_eq!(logs.count("rejected the secrets"), 1);
    assert_eq!(logs.count("bad PEM, say"), 1);
    // It asks again with the same nonce, and the cache wakes the stream: still nothing, and no
    // second log line for the same version.
    tx.send(nack(&r1, &names, "", "bad PEM, say")).unwrap();
    state.notify_changed();
    quiet(&mut s, "no resend loop").await;
    assert_eq!(logs.count("rejected the secrets"), 1);

    // The next change is sent, and its rejection logged in turn.
    mint(&mut *state.cache.write().await, "a", "a-2");
    state.publish();
    let r2 = next(&mut s).await;
    assert_ne!(r2.version_info, r1.version_info);
    assert_eq!(r2.nonce, "2");
    tx.send(nack(&r2, &names, "", "unknown key type")).unwrap();
    quiet(&mut s, "not re-sent").await;
    assert_eq!(logs.count("rejected the secrets"), 2);
    assert_eq!(logs.count("unknown key type"), 1);
}

#[tokio::test(start_paused = true)]
async fn stale_nonces_are_ignored_and_new_names_get_a_fresh_response() {
    let state = state_with(cache(vec![uid7("a", 1, &["other.org"])], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    tx.send(request(&["default"], "", "")).unwrap();
    let r1 = next(&mut s).await;

    // Other names, but with a nonce that is not the last one sent: ignored.
    tx.send(request(&["ROOTCA"], "0", &r1.version_info))
        .unwrap();
    tx.send(request(&["ROOTCA"], "", "")).unwrap();
    quiet(&mut s, "stale requests are ignored").await;

    // With the last nonce: answered at once, with the new names only.
    tx.send(request(&["ROOTCA", "ALL"], &r1.nonce, &r1.version_info))
        .unwrap();
    let r2 = next(&mut s).await;
    assert_eq!(names(&r2), ["ALL", "ROOTCA"]);
    assert_eq!(r2.nonce, "2");
    // The same names in another order (and repeated) are no change.
    tx.send(request(
        &["ALL", "ROOTCA", "ALL"],
        &r2.nonce,
        &r2.version_info,
    ))
    .unwrap();
    quiet(&mut s, "the same set of names").await;

    // A federated bundle changes: pushed (ALL holds it).
    {
        let mut c = state.cache.write().await;
        c.apply_sync(pb::SyncResponse {
            federated_bundles: vec![pb::Bundle {
                trust_domain: "other.org".into(),
                x509_roots: ca_der("other.org root 2"),
                sequence_number: 2,
                ..Default::default()
            }],
            federated_bundles_set: true,
            revision: 2,
            ..Default::default()
        })
        .unwrap();
    }
    state.publish();
    let r3 = next(&mut s).await;
    assert_eq!(names(&r3), ["ALL", "ROOTCA"]);
    assert_ne!(r3.version_info, r2.version_info);
}

#[tokio::test(start_paused = true)]
async fn names_the_caller_lacks_wait_until_it_has_them() {
    let state = state_with(cache(vec![uid7("a", 1, &[])], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    let c = "spiffe://example.org/w/c";
    tx.send(request(&[c], "", "")).unwrap();
    quiet(
        &mut s,
        "no secret at all: nothing is sent (Envoy would reject it)",
    )
    .await;

    // The entry arrives, then its SVID: sent then.
    {
        let mut cache = state.cache.write().await;
        cache
            .apply_sync(pb::SyncResponse {
                upserted: vec![uid7("c", 3, &[])],
                revision: 2,
                ..Default::default()
            })
            .unwrap();
    }
    state.publish();
    quiet(&mut s, "not minted yet").await;
    mint(&mut *state.cache.write().await, "c", "c-1");
    state.publish();
    let r = next(&mut s).await;
    assert_eq!(names(&r), [c]);
    assert_eq!(chain(&secrets(&r)[0]), pem(b"c-1"));

    // Asking for one more unknown name: the known one is answered again, the other left out.
    tx.send(request(
        &[c, "spiffe://example.org/w/d"],
        &r.nonce,
        &r.version_info,
    ))
    .unwrap();
    let r2 = next(&mut s).await;
    assert_eq!(names(&r2), [c]);
    assert_eq!(
        r2.version_info, r.version_info,
        "same secrets, same version"
    );
    assert_ne!(r2.nonce, r.nonce);
}

#[tokio::test(start_paused = true)]
async fn bad_requests_and_lost_identities_end_the_stream() {
    let state = state_with(cache(vec![uid7("a", 1, &[])], &["a"]));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;

    // No identity: PermissionDenied before any request.
    let err = open(&sds, caller(&["unix:uid:9"])).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), NO_IDENTITY);

    // Another resource type: InvalidArgument ends the stream; the service goes on.
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    tx.send(DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        ..request(&[], "", "")
    })
    .unwrap();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(s.next().await.is_none());

    // The identity goes: PermissionDenied ends the stream.
    let (mut s, tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    tx.send(request(&[], "", "")).unwrap();
    let r = next(&mut s).await;
    assert_eq!(
        names(&r),
        ["spiffe://example.org", "spiffe://example.org/w/a",],
        "no names: every SVID and our bundle (no federation here)"
    );
    *state.cache.write().await = cache(vec![entry("z", 1, &["unix:uid:8"], "")], &["z"]);
    state.notify_changed();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(s.next().await.is_none());

    // Shutdown ends open streams quietly.
    *state.cache.write().await = cache(vec![uid7("a", 1, &[])], &["a"]);
    state.notify_changed();
    let (mut s, _tx) = open(&sds, caller(&["unix:uid:7"])).await.unwrap();
    stop.send(true).unwrap();
    assert!(s.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn every_response_waits_for_the_connecting_process_to_be_there() {
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let mut pin = ProcessPin::pin(pid).unwrap();
    pin.creds = Some(me);
    let caller = Caller {
        pid,
        selectors: Arc::new(selectors(&["unix:uid:7"])),
        pin: Arc::new(pin),
        uid: me.0,
        gid: me.1,
        exe_hash_skipped: false,
    };
    let state = state_with(cache(vec![uid7("a", 1, &[])], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let (mut s, tx) = open(&sds, caller).await.unwrap();
    tx.send(request(&["default"], "", "")).unwrap();
    let r = next(&mut s).await;
    tx.send(ack(&r, &["default"])).unwrap();

    // It exits; the next rotation is not given to whoever holds its connection now.
    child.kill().unwrap();
    child.wait().unwrap();
    mint(&mut *state.cache.write().await, "a", "a-2");
    state.publish();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(&format!("pid {pid}")), "{err:?}");
    assert!(s.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn fetch_answers_once_and_refuses_names_the_caller_lacks() {
    let state = state_with(cache(vec![uid7("a", 1, &[])], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown, SdsConfig::default()).await;
    let r = sds
        .fetch(
            &caller(&["unix:uid:7"]),
            request(&["default", "ROOTCA"], "", ""),
        )
        .await
        .unwrap();
    assert_eq!(names(&r), ["ROOTCA", "default"]);
    assert!(r.nonce.is_empty(), "no nonce outside a stream");
    assert_eq!(r.version_info.len(), 16);

    let err = sds
        .fetch(
            &caller(&["unix:uid:7"]),
            request(&["default", "spiffe://example.org/w/b"], "", ""),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("\"spiffe://example.org/w/b\""),
        "{}",
        err.message()
    );
    let err = sds
        .fetch(&caller(&["unix:uid:9"]), request(&[], "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

/// Envoy's way in: the Workload API socket, no `workload.spiffe.io` header, the caller attested
/// from its connection (this test process).
#[tokio::test]
async fn served_on_the_workload_api_socket_without_the_security_header() {
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let state = state_with(cache(vec![entry("a", 1, &[&uid], "")], &["a"]));
    let (stop, mut shutdown) = tokio::sync::watch::channel(false);
    let sds = sds_with(&state, shutdown.clone(), SdsConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let (listener, _file) = crate::workload_api::bind(&path).await.unwrap();
    let server = tokio::spawn(crate::workload_api::serve(
        listener,
        sds.api.clone(),
        SdsConfig::default(),
        crate::workload_api::ConnectionLimits {
            per_uid: 10,
            total: 10,
        },
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
        },
    ));
    let mut client = SecretDiscoveryServiceClient::new(sigil::uds::connect(&path).await.unwrap());

    let r = client
        .fetch_secrets(request(&["default"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&r), ["default"]);

    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(request(&["spiffe://example.org/w/a"], "", ""))
        .unwrap();
    let mut responses = client
        .stream_secrets(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = responses.message().await.unwrap().unwrap();
    assert_eq!(names(&r), ["spiffe://example.org/w/a"]);

    let err = client
        .delta_secrets(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("api_type to GRPC"), "{err:?}");

    // A request over the size limit is refused; the agent goes on serving.
    let huge = request(&[&"x".repeat(MAX_REQUEST_BYTES)], "", "");
    let err = client.fetch_secrets(huge).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let r = client
        .fetch_secrets(request(&["ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&r), ["ROOTCA"]);

    stop.send(true).unwrap();
    drop((tx, responses, client));
    server.await.unwrap().unwrap();
}
