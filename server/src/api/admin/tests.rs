//! Tests of the admin API through its gRPC trait: validation, audit events, bounded messages.

use super::*;
use crate::datastore::sqlite::SqliteDatastore;
use crate::federation::refresher::Federation;
use rcgen::PublicKeyData as _;
use sigil::bundle::JwtAuthority;
use sigil::clock::now_unix;
use sigil::entry::RegistrationEntry;
use tonic::Code;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

async fn service() -> TestResult<(tempfile::TempDir, AdminService, Arc<AdminState>)> {
    let dir = tempfile::tempdir()?;
    let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?;
    let td = TrustDomain::new("example.org")?;
    let state = Arc::new(AdminState {
        trust_domain: td.clone(),
        datastore: Arc::new(ds),
        bundle: RwLock::new(Bundle::new(td.clone())),
        metrics: Metrics::new(),
        events: SyncEvents::new(),
        ca_not_after: AtomicI64::new(i64::MAX),
        ca: None,
        federation: Arc::new(Federation::new(td, &[])),
        started: std::sync::atomic::AtomicBool::new(true),
    });
    Ok((dir, AdminService::new(state.clone()), state))
}

fn ca_pem() -> TestResult<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), cert.der().to_vec()))
}

fn set_req(
    td: &str,
    bundle: Option<pb::set_federated_bundle_request::Bundle>,
) -> Request<pb::SetFederatedBundleRequest> {
    Request::new(pb::SetFederatedBundleRequest {
        trust_domain: td.into(),
        bundle,
    })
}

fn pem(s: &str) -> Option<pb::set_federated_bundle_request::Bundle> {
    Some(pb::set_federated_bundle_request::Bundle::X509Pem(s.into()))
}

fn spiffe(s: &str) -> Option<pb::set_federated_bundle_request::Bundle> {
    Some(pb::set_federated_bundle_request::Bundle::SpiffeBundleJson(
        s.into(),
    ))
}

async fn list(svc: &AdminService) -> TestResult<Vec<pb::FederatedBundle>> {
    Ok(svc
        .list_federated_bundles(Request::new(pb::ListFederatedBundlesRequest {}))
        .await?
        .into_inner()
        .bundles)
}

fn entry_with(selectors: &[&str]) -> pb::Entry {
    pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/node".into(),
        selectors: selectors
            .iter()
            .map(|s| {
                let (t, v) = s.split_once(':').unwrap_or((s, ""));
                pb::Selector {
                    r#type: t.into(),
                    value: v.into(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn selectors_no_attestor_produces_are_refused_on_create_batch_and_update() -> TestResult {
    let (_dir, svc, _state) = service().await?;
    let bad = [
        "unix:uid:abc",
        "unix:uid:-1",
        "unix:uid:",
        "unix:path:relative",
        "unix:nosuchkey:1",
        "unix:sha256:abc",
        "docker:id:abc",
        "systemd:id:nginx",
        "x509pop:ca:fingerprint:zz",
    ];
    for sel in bad {
        let err = svc
            .create_entry(Request::new(pb::CreateEntryRequest {
                entry: Some(entry_with(&[sel])),
            }))
            .await
            .expect_err(sel);
        assert_eq!(err.code(), Code::InvalidArgument, "{sel}: {err:?}");
        assert!(
            err.message().starts_with("invalid selectors: selector"),
            "{sel}: {err:?}"
        );
    }
    // A batch refuses the bad ones, creates the rest (unknown types included).
    let mut entries: Vec<pb::Entry> = bad.iter().map(|s| entry_with(&[s])).collect();
    entries.push(entry_with(&["unix:uid:1000"]));
    entries.push(entry_with(&["nosuchtype:x"]));
    let results = svc
        .batch_create_entries(Request::new(pb::BatchCreateEntriesRequest { entries }))
        .await?
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let invalid = Code::InvalidArgument as i32;
    let mut want = vec![invalid; bad.len()];
    want.extend([0, 0]);
    assert_eq!(codes, want, "{results:?}");

    // Update: new selectors are checked; other fields of an entry can still be changed.
    let id = results[bad.len()]
        .entry
        .as_ref()
        .ok_or("created")?
        .id
        .clone();
    let update = |selectors: &[&str], mask: pb::EntryMask| {
        let mut e = entry_with(selectors);
        e.id = id.clone();
        e.hint = "h".into();
        svc.update_entry(Request::new(pb::UpdateEntryRequest {
            entry: Some(e),
            mask: Some(mask),
        }))
    };
    let err = update(
        &["unix:uid:abc"],
        pb::EntryMask {
            selectors: true,
            ..Default::default()
        },
    )
    .await
    .expect_err("bad selector in update");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("uid must be a decimal number"),
        "{err:?}"
    );
    update(
        &[],
        pb::EntryMask {
            hint: true,
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn federated_bundles_set_list_delete() -> TestResult {
    let (_dir, svc, state) = service().await?;
    let (root_pem, root_der) = ca_pem()?;
    let before = state.events.current().federated_changes;

    // PEM, named by its trust domain ID.
    let set = svc
        .set_federated_bundle(set_req("spiffe://other.org", pem(&root_pem)))
        .await?
        .into_inner()
        .bundle
        .ok_or("no bundle")?;
    assert_eq!(set.trust_domain, "other.org");
    assert_eq!(set.sequence_number, 1);
    assert_eq!(sigil::x509::parse_pem_certs(&set.x509_pem)?, vec![root_der]);
    assert_eq!(state.events.current().federated_changes, before + 1);

    // SPIFFE bundle JSON with an X.509 root and a JWT key, named by bare name.
    let jwt = rcgen::KeyPair::generate()?;
    let doc = Bundle {
        x509_authorities: sigil::x509::parse_pem_certs(&ca_pem()?.0)?,
        jwt_authorities: vec![JwtAuthority::from_spki_der(
            "k1",
            &jwt.subject_public_key_info(),
        )?],
        ..Bundle::new(TrustDomain::new("aaa.org")?)
    };
    svc.set_federated_bundle(set_req("aaa.org", spiffe(&doc.to_spiffe_json()?)))
        .await?;
    let all = list(&svc).await?;
    let names: Vec<&str> = all.iter().map(|b| b.trust_domain.as_str()).collect();
    assert_eq!(names, ["aaa.org", "other.org"]);
    let back = Bundle::from_spiffe_json(TrustDomain::new("aaa.org")?, &all[0].spiffe_bundle_json)?;
    assert_eq!(back.x509_authorities, doc.x509_authorities);
    assert_eq!(back.jwt_authorities, doc.jwt_authorities);

    // Same content again: same sequence; the server's own bundle is not listed.
    let again = svc
        .set_federated_bundle(set_req("other.org", pem(&root_pem)))
        .await?
        .into_inner()
        .bundle
        .ok_or("no bundle")?;
    assert_eq!(again.sequence_number, 1);

    svc.delete_federated_bundle(Request::new(pb::DeleteFederatedBundleRequest {
        trust_domain: "spiffe://other.org".into(),
    }))
    .await?;
    assert_eq!(list(&svc).await?.len(), 1);
    let gone = svc
        .delete_federated_bundle(Request::new(pb::DeleteFederatedBundleRequest {
            trust_domain: "other.org".into(),
        }))
        .await
        .expect_err("second delete");
    assert_eq!(gone.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn own_trust_domain_is_refused() -> TestResult {
    let (_dir, svc, state) = service().await?;
    let (root_pem, _) = ca_pem()?;
    for td in ["example.org", "spiffe://example.org"] {
        let err = svc
            .set_federated_bundle(set_req(td, pem(&root_pem)))
            .await
            .expect_err("own trust domain");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("own trust domain"),
            "{}",
            err.message()
        );
        let err = svc
            .delete_federated_bundle(Request::new(pb::DeleteFederatedBundleRequest {
                trust_domain: td.into(),
            }))
            .await
            .expect_err("own trust domain");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert!(list(&svc).await?.is_empty());
    assert_eq!(state.events.current().federated_changes, 0);
    Ok(())
}

/// A shared buffer the test's log subscriber writes JSON lines into.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// Installs a JSON subscriber (as `--log-format json` does) for this thread; keep the
    /// result alive while logging.
    fn install(&self) -> (tracing::subscriber::DefaultGuard, tracing::Dispatch) {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // With a single registered dispatcher, tracing computes a callsite's interest from
        // the default of whichever thread hits it first: a parallel test without a
        // subscriber would switch the audit callsite off for good. A second one makes it
        // ask every registered dispatcher; the rebuild repairs callsites already cached.
        let second = tracing::Dispatch::new(tracing_subscriber::registry());
        tracing::callsite::rebuild_interest_cache();
        (guard, second)
    }

    /// The audit lines written so far, raw.
    fn audit_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains("sigil::audit"))
            .map(str::to_string)
            .collect()
    }
}

fn entry(spiffe_id: &str, parent_id: &str, selector: (&str, &str)) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: vec![pb::Selector {
            r#type: selector.0.into(),
            value: selector.1.into(),
        }],
        ..Default::default()
    }
}

const PARENT: &str = "spiffe://example.org/sigil/agent/join_token/t";

#[tokio::test]
async fn audit_events_name_the_object_in_their_own_field_truncated() -> TestResult {
    let (_dir, svc, _state) = service().await?;
    let log = LogBuffer::default();
    let _guard = log.install();

    let created = svc
        .create_entry(Request::new(pb::CreateEntryRequest {
            entry: Some(entry("spiffe://example.org/web", PARENT, ("unix", "uid:1"))),
        }))
        .await?
        .into_inner()
        .entry
        .ok_or("no entry")?;
    // A megabyte where the SPIFFE ID belongs: refused, and audited with its start only.
    let huge = format!("spiffe://example.org/{}", "x".repeat(1 << 20));
    let err = svc
        .create_entry(Request::new(pb::CreateEntryRequest {
            entry: Some(entry(&huge, PARENT, ("unix", "uid:1"))),
        }))
        .await
        .expect_err("1 MB SPIFFE ID");
    assert_eq!(err.code(), Code::InvalidArgument);
    let long_id = "y".repeat(3000);
    svc.delete_entry(Request::new(pb::DeleteEntryRequest {
        id: long_id.clone(),
    }))
    .await
    .expect_err("no such entry");

    let lines = log.audit_lines();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    for (line, v) in lines.iter().zip(&parsed) {
        // One `target` key (tracing's); the audited object has a key of its own.
        assert_eq!(line.matches("\"target\":").count(), 1, "{line}");
        assert_eq!(v["target"], "sigil::audit", "{line}");
        assert!(line.len() < 2048, "audit line of {} bytes", line.len());
    }
    assert_eq!(parsed[0]["action"], "entry.create");
    assert_eq!(
        parsed[0]["object"],
        format!("{} (spiffe://example.org/web)", created.id)
    );
    assert_eq!(parsed[0]["result"], "ok");
    assert_eq!(
        parsed[1]["object"],
        sigil::text::echo(&huge).as_ref(),
        "{}",
        lines[1]
    );
    let marker = format!("… ({} bytes)", huge.len());
    assert!(lines[1].contains(&marker), "{}", lines[1]);
    assert_eq!(parsed[2]["action"], "entry.delete");
    assert_eq!(parsed[2]["object"], sigil::text::echo(&long_id).as_ref());
    assert!(
        parsed[2]["result"]
            .as_str()
            .is_some_and(|r| r.starts_with("NotFound") && r.contains("(3000 bytes)")),
        "{}",
        lines[2]
    );
    Ok(())
}

/// No error message repeats more than [`sigil::text::MAX_ECHO_CHARS`] characters of a
/// 3,000-character input, and a truncated echo says so.
fn assert_bounded(what: &str, status: &Status) {
    let m = status.message();
    let run = "z".repeat(sigil::text::MAX_ECHO_CHARS + 1);
    assert!(!m.contains(&run), "{what}: {} chars: {m}", m.len());
    assert!(m.len() < 1024, "{what}: {} chars: {m}", m.len());
}

#[tokio::test]
async fn errors_echo_long_inputs_truncated() -> TestResult {
    let (_dir, svc, _state) = service().await?;
    let long = "z".repeat(3000);
    let ok = || entry("spiffe://example.org/web", PARENT, ("unix", "uid:1"));
    let mut cases: Vec<(&str, pb::Entry)> = vec![
        ("spiffe_id", entry(&long, PARENT, ("unix", "uid:1"))),
        (
            "spiffe_id path",
            entry(
                &format!("spiffe://example.org/{long}"),
                PARENT,
                ("unix", "uid:1"),
            ),
        ),
        (
            "parent_id",
            entry("spiffe://example.org/web", &long, ("unix", "uid:1")),
        ),
        (
            "selector type",
            entry("spiffe://example.org/web", PARENT, (&long, "v")),
        ),
        (
            "selector value",
            entry("spiffe://example.org/web", PARENT, ("unix", &long)),
        ),
        (
            "selector value with a control character",
            entry(
                "spiffe://example.org/web",
                PARENT,
                ("unix", &format!("\n{long}")),
            ),
        ),
        (
            "selector type with a bad character",
            entry(
                "spiffe://example.org/web",
                PARENT,
                (&format!("!{}", &long[..60]), "v"),
            ),
        ),
    ];
    let mut e = ok();
    e.dns_names = vec![long.clone()];
    cases.push(("dns name", e));
    let mut e = ok();
    e.federates_with = vec![long.clone()];
    cases.push(("federates_with", e));
    let mut e = ok();
    e.hint = long.clone();
    cases.push(("hint", e));
    for (what, e) in cases {
        let err = svc
            .create_entry(Request::new(pb::CreateEntryRequest {
                entry: Some(e.clone()),
            }))
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_bounded(what, &err);
        let batch = svc
            .batch_create_entries(Request::new(pb::BatchCreateEntriesRequest {
                entries: vec![e],
            }))
            .await?
            .into_inner();
        assert_ne!(batch.results[0].code, 0, "{what}");
        assert_bounded(
            what,
            &Status::new(
                Code::from(batch.results[0].code),
                batch.results[0].message.clone(),
            ),
        );
    }

    let err = svc
        .get_entry(Request::new(pb::GetEntryRequest { id: long.clone() }))
        .await
        .expect_err("get");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("(3000 bytes)"), "{err:?}");
    assert_bounded("get_entry", &err);
    let mut upd = ok();
    upd.id = long.clone();
    let err = svc
        .update_entry(Request::new(pb::UpdateEntryRequest {
            entry: Some(upd),
            mask: None,
        }))
        .await
        .expect_err("update");
    assert_bounded("update_entry", &err);
    let err = svc
        .delete_entry(Request::new(pb::DeleteEntryRequest { id: long.clone() }))
        .await
        .expect_err("delete");
    assert_bounded("delete_entry", &err);
    let filter = pb::EntryFilter {
        selectors: vec![pb::Selector {
            r#type: long.clone(),
            value: "v".into(),
        }],
        ..Default::default()
    };
    let err = svc
        .list_entries(Request::new(pb::ListEntriesRequest {
            filter: Some(filter),
            ..Default::default()
        }))
        .await
        .expect_err("filter");
    assert_bounded("filter", &err);
    for td in [long.clone(), format!("spiffe://other.org/{long}")] {
        let err = svc
            .set_federated_bundle(set_req(&td, pem("x")))
            .await
            .expect_err("trust domain");
        assert_bounded("set_federated_bundle", &err);
    }
    for id in [long.clone(), format!("spiffe://example.org/{long}")] {
        let err = svc
            .evict_agent(Request::new(pb::EvictAgentRequest {
                spiffe_id: id.clone(),
            }))
            .await
            .expect_err("evict");
        assert_bounded("evict_agent", &err);
        let err = svc
            .create_join_token(Request::new(pb::CreateJoinTokenRequest {
                spiffe_id: id,
                ttl: 0,
            }))
            .await
            .expect_err("token");
        assert_bounded("create_join_token", &err);
    }
    Ok(())
}

#[tokio::test]
async fn invalid_federated_input_is_invalid_argument() -> TestResult {
    let (_dir, svc, _state) = service().await?;
    let (root_pem, _) = ca_pem()?;
    let cases: Vec<(&str, Option<pb::set_federated_bundle_request::Bundle>, &str)> = vec![
        ("", pem(&root_pem), "trust_domain is required"),
        ("Other.Org", pem(&root_pem), "invalid trust_domain"),
        ("spiffe://other.org/workload", pem(&root_pem), "has no path"),
        ("other.org", None, "bundle is required"),
        ("other.org", pem("not pem"), "invalid x509_pem"),
        (
            "other.org",
            pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "invalid x509_pem",
        ),
        ("other.org", spiffe("{"), "invalid spiffe_bundle_json"),
        ("other.org", spiffe(r#"{"keys":[]}"#), "no X.509 roots"),
        ("other.org", spiffe(&root_pem), "invalid spiffe_bundle_json"),
    ];
    for (td, bundle, want) in cases {
        let err = svc
            .set_federated_bundle(set_req(td, bundle))
            .await
            .expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{td:?}: {err:?}");
        assert!(err.message().contains(want), "{td:?}: {}", err.message());
    }
    assert!(list(&svc).await?.is_empty(), "nothing stored");
    Ok(())
}

fn web_entry(x509_ttl: i64, jwt_ttl: i64) -> pb::Entry {
    pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/node".into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        x509_svid_ttl: x509_ttl,
        jwt_svid_ttl: jwt_ttl,
        ..Default::default()
    }
}

#[tokio::test]
async fn ttls_below_the_floors_are_refused() -> TestResult {
    let (_dir, svc, state) = service().await?;
    for (x509, jwt, field) in [(20, 0, "x509_svid_ttl"), (0, 5, "jwt_svid_ttl")] {
        let err = svc
            .create_entry(Request::new(pb::CreateEntryRequest {
                entry: Some(web_entry(x509, jwt)),
            }))
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("invalid {field}:"))
                && err.message().contains("shorter than the minimum"),
            "{}",
            err.message()
        );
        let batch = svc
            .batch_create_entries(Request::new(pb::BatchCreateEntriesRequest {
                entries: vec![web_entry(x509, jwt)],
            }))
            .await?
            .into_inner();
        assert_eq!(batch.results[0].code, Code::InvalidArgument as i32);
    }
    // At the floors: accepted.
    let created = svc
        .create_entry(Request::new(pb::CreateEntryRequest {
            entry: Some(web_entry(60, 30)),
        }))
        .await?
        .into_inner()
        .entry
        .ok_or("entry")?;
    let update = |x509: i64, mask: pb::EntryMask| {
        let mut e = web_entry(x509, 0);
        e.id = created.id.clone();
        e.hint = "h".into();
        Request::new(pb::UpdateEntryRequest {
            entry: Some(e),
            mask: Some(mask),
        })
    };
    let err = svc
        .update_entry(update(
            2,
            pb::EntryMask {
                x509_svid_ttl: true,
                ..Default::default()
            },
        ))
        .await
        .expect_err("update below the floor");
    assert_eq!(err.code(), Code::InvalidArgument);
    // An entry stored before the floor existed: other fields can still change.
    let mut legacy = RegistrationEntry::from_proto(&web_entry(2, 0))?;
    legacy.spiffe_id = SpiffeId::parse("spiffe://example.org/legacy")?;
    let legacy = state
        .datastore
        .create_entries(vec![legacy])
        .await?
        .pop()
        .ok_or("result")??;
    let mut e = legacy.to_proto();
    e.hint = "still editable".into();
    let updated = svc
        .update_entry(Request::new(pb::UpdateEntryRequest {
            entry: Some(e),
            mask: Some(pb::EntryMask {
                hint: true,
                ..Default::default()
            }),
        }))
        .await?
        .into_inner()
        .entry
        .ok_or("entry")?;
    assert_eq!(updated.hint, "still editable");
    Ok(())
}

#[tokio::test]
async fn health_is_not_ready_once_the_ca_expired() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ds: Arc<dyn Datastore> =
        Arc::new(SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?);
    let td = TrustDomain::new("example.org")?;
    let svc = |ca_not_after| {
        AdminService::new(Arc::new(AdminState {
            trust_domain: td.clone(),
            datastore: ds.clone(),
            bundle: RwLock::new(Bundle::new(td.clone())),
            metrics: Metrics::new(),
            events: SyncEvents::new(),
            ca_not_after: AtomicI64::new(ca_not_after),
            ca: None,
            federation: Arc::new(Federation::new(td.clone(), &[])),
            started: std::sync::atomic::AtomicBool::new(true),
        }))
    };
    let now = now_unix();
    let h = svc(now + 3600)
        .health(Request::new(pb::HealthRequest {}))
        .await?
        .into_inner();
    assert!(h.ready && h.not_ready_reason.is_empty());
    assert_eq!(h.ca_not_after, now + 3600);
    let h = svc(now - 1)
        .health(Request::new(pb::HealthRequest {}))
        .await?
        .into_inner();
    assert!(!h.ready);
    assert!(
        h.not_ready_reason.contains("CA authority expired"),
        "{}",
        h.not_ready_reason
    );
    Ok(())
}

#[tokio::test]
async fn health_is_not_ready_until_start_up_completes() -> TestResult {
    // The admin API serves before the rest of the server (node API, bundle endpoint, the
    // config file's federated bundles): `healthcheck` must not say ready before `/ready`.
    let (_dir, svc, state) = service().await?;
    state
        .started
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let h = svc
        .health(Request::new(pb::HealthRequest {}))
        .await?
        .into_inner();
    assert!(!h.ready);
    assert!(
        h.not_ready_reason.contains("still starting"),
        "{}",
        h.not_ready_reason
    );
    state
        .started
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let h = svc
        .health(Request::new(pb::HealthRequest {}))
        .await?
        .into_inner();
    assert!(h.ready, "{}", h.not_ready_reason);
    Ok(())
}

#[tokio::test]
async fn local_authorities_show_prepare_activate_taint_revoke() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?;
    let td = TrustDomain::new("example.org")?;
    let ca = Arc::new(crate::ca::Ca::load_or_create(&crate::ca::CaConfig::new(
        td.clone(),
        dir.path().join("ca"),
    ))?);
    let svc = AdminService::new(Arc::new(AdminState {
        trust_domain: td.clone(),
        datastore: Arc::new(ds),
        bundle: RwLock::new(Bundle::new(td.clone())),
        metrics: Metrics::new(),
        events: SyncEvents::new(),
        ca_not_after: AtomicI64::new(i64::MAX),
        ca: Some(ca.clone()),
        federation: Arc::new(Federation::new(td, &[])),
        started: std::sync::atomic::AtomicBool::new(true),
    }));
    for kind in [
        pb::AuthorityKind::X509 as i32,
        pb::AuthorityKind::Jwt as i32,
    ] {
        let show = || Request::new(pb::GetLocalAuthorityStateRequest { kind });
        let s = svc.get_local_authority_state(show()).await?.into_inner();
        let first = s.active.ok_or("no active")?;
        assert!(s.prepared.is_none() && s.old.is_empty());
        assert!(!first.authority_id.is_empty() && !first.tainted);

        let taint = |id: &str| {
            Request::new(pb::TaintLocalAuthorityRequest {
                kind,
                authority_id: id.to_string(),
            })
        };
        let revoke = |id: &str| {
            Request::new(pb::RevokeLocalAuthorityRequest {
                kind,
                authority_id: id.to_string(),
            })
        };
        // Refusals: the active one, unknown and empty IDs; nothing prepared to activate.
        let e = svc
            .taint_local_authority(taint(&first.authority_id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("active authority"), "{e:?}");
        let e = svc
            .revoke_local_authority(revoke(&first.authority_id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = svc.taint_local_authority(taint("beef")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("beef"), "{e:?}");
        let e = svc.revoke_local_authority(revoke("")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let activate = |id: &str| {
            Request::new(pb::ActivateLocalAuthorityRequest {
                kind,
                authority_id: id.to_string(),
            })
        };
        let e = svc
            .activate_local_authority(activate(""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

        let prepared = svc
            .prepare_local_authority(Request::new(pb::PrepareLocalAuthorityRequest { kind }))
            .await?
            .into_inner()
            .prepared
            .ok_or("no prepared")?;
        assert_eq!(prepared.slot, "prepared");
        let e = svc
            .activate_local_authority(activate(&first.authority_id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let active = svc
            .activate_local_authority(activate(&prepared.authority_id))
            .await?
            .into_inner()
            .active
            .ok_or("no active")?;
        assert_eq!(active.authority_id, prepared.authority_id);
        let s = svc.get_local_authority_state(show()).await?.into_inner();
        assert_eq!(s.old.len(), 1);
        assert_eq!(s.old[0].authority_id, first.authority_id);
        let e = svc
            .revoke_local_authority(revoke(&first.authority_id))
            .await
            .unwrap_err();
        assert!(e.message().contains("not tainted"), "{e:?}");
        let t = svc
            .taint_local_authority(taint(&first.authority_id))
            .await?
            .into_inner()
            .tainted
            .ok_or("none")?;
        assert!(t.tainted);
        svc.revoke_local_authority(revoke(&first.authority_id))
            .await?;
        let s = svc.get_local_authority_state(show()).await?.into_inner();
        assert!(s.old.is_empty());
    }
    assert_eq!(ca.x509_authorities().len(), 1);
    assert_eq!(ca.bundle().jwt_authorities.len(), 1);
    // No kind given.
    let e = svc
        .get_local_authority_state(Request::new(pb::GetLocalAuthorityStateRequest { kind: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    Ok(())
}

mod federation;
