//! Federation relationships through the admin API: validation naming the field, AlreadyExists
//! and NotFound, the config file's relationships read only, initial bundles, RefreshBundle and
//! audit events.

use super::*;
use crate::federation::refresher::Refresher;
use crate::federation::relationship::ConfiguredRelationship;

fn rel(td: &str, url: &str, profile: &str, id: &str) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: td.into(),
        bundle_endpoint_url: url.into(),
        bundle_endpoint_profile: profile.into(),
        endpoint_spiffe_id: id.into(),
        ..Default::default()
    }
}

fn create_req(
    r: pb::FederationRelationship,
    pem: Option<&str>,
) -> Request<pb::CreateFederationRelationshipRequest> {
    Request::new(pb::CreateFederationRelationshipRequest {
        relationship: Some(r),
        trust_domain_bundle: pem.map(|p| {
            pb::create_federation_relationship_request::TrustDomainBundle::X509Pem(p.into())
        }),
    })
}

fn update_req(
    r: pb::FederationRelationship,
    pem: Option<&str>,
) -> Request<pb::UpdateFederationRelationshipRequest> {
    Request::new(pb::UpdateFederationRelationshipRequest {
        relationship: Some(r),
        trust_domain_bundle: pem.map(|p| {
            pb::update_federation_relationship_request::TrustDomainBundle::X509Pem(p.into())
        }),
    })
}

fn get_req(td: &str) -> Request<pb::GetFederationRelationshipRequest> {
    Request::new(pb::GetFederationRelationshipRequest {
        trust_domain: td.into(),
    })
}

fn delete_req(td: &str) -> Request<pb::DeleteFederationRelationshipRequest> {
    Request::new(pb::DeleteFederationRelationshipRequest {
        trust_domain: td.into(),
    })
}

async fn list_all(svc: &AdminService) -> TestResult<Vec<pb::FederationRelationship>> {
    Ok(svc
        .list_federation_relationships(Request::new(pb::ListFederationRelationshipsRequest {}))
        .await?
        .into_inner()
        .relationships)
}

const WEB: &str = "https_web";
const SPIFFE: &str = "https_spiffe";

#[tokio::test]
async fn relationships_are_created_shown_updated_and_deleted() -> TestResult {
    let (_dir, svc, state) = service().await?;
    let created = svc
        .create_federation_relationship(create_req(
            rel("spiffe://other.org", "https://other.org:8443/b", WEB, ""),
            None,
        ))
        .await?
        .into_inner()
        .relationship
        .ok_or("no relationship")?;
    assert_eq!(created.trust_domain, "other.org");
    assert_eq!(created.bundle_endpoint_profile, WEB);
    assert_eq!(created.source, "datastore");
    assert!(created.created_at > 0 && created.bundle.is_none() && created.status.is_none());

    let err = svc
        .create_federation_relationship(create_req(
            rel("other.org", "https://elsewhere.org", WEB, ""),
            None,
        ))
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("other.org"), "{err:?}");

    let got = svc
        .get_federation_relationship(get_req("other.org"))
        .await?;
    assert_eq!(got.into_inner().relationship, Some(created.clone()));
    assert_eq!(list_all(&svc).await?, vec![created.clone()]);

    // To https_spiffe: the endpoint's trust domain needs a bundle, given here.
    let spiffe = rel(
        "other.org",
        "https://other.org:8443/b",
        SPIFFE,
        "spiffe://other.org/spire/server",
    );
    let err = svc
        .update_federation_relationship(update_req(spiffe.clone(), None))
        .await
        .expect_err("no bundle to authenticate the endpoint");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("bundle set --id other.org"),
        "{err:?}"
    );
    let before = state.events.current().federated_changes;
    let (root_pem, root_der) = ca_pem()?;
    let updated = svc
        .update_federation_relationship(update_req(spiffe, Some(&root_pem)))
        .await?
        .into_inner()
        .relationship
        .ok_or("no relationship")?;
    assert_eq!(
        updated.endpoint_spiffe_id,
        "spiffe://other.org/spire/server"
    );
    assert_eq!(updated.created_at, created.created_at);
    let bundle = updated.bundle.ok_or("the initial bundle is shown")?;
    assert_eq!(
        sigil::x509::parse_pem_certs(&bundle.x509_pem)?,
        vec![root_der]
    );
    assert_eq!(state.events.current().federated_changes, before + 1);

    let err = svc
        .update_federation_relationship(update_req(rel("none.org", "https://n.org", WEB, ""), None))
        .await
        .expect_err("absent");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    svc.delete_federation_relationship(delete_req("other.org"))
        .await?;
    for err in [
        svc.delete_federation_relationship(delete_req("other.org"))
            .await
            .expect_err("deleted"),
        svc.get_federation_relationship(get_req("other.org"))
            .await
            .expect_err("deleted"),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    assert!(list_all(&svc).await?.is_empty());
    // The bundle stays.
    assert_eq!(list(&svc).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn invalid_relationships_are_refused_naming_the_field() -> TestResult {
    let (_dir, svc, _state) = service().await?;
    let id = "spiffe://other.org/s";
    let cases = [
        (
            rel("example.org", "https://o.org", WEB, ""),
            "own trust domain",
        ),
        (
            rel("Not A Domain", "https://o.org", WEB, ""),
            "invalid trust_domain",
        ),
        (
            rel("other.org", "http://o.org", WEB, ""),
            "bundle_endpoint_url",
        ),
        (
            rel("other.org", "https:///x", WEB, ""),
            "bundle_endpoint_url",
        ),
        (
            rel("other.org", "https://o.org", "web", ""),
            "bundle_endpoint_profile",
        ),
        (
            rel("other.org", "https://o.org", SPIFFE, ""),
            "endpoint_spiffe_id is required",
        ),
        (
            rel("other.org", "https://o.org", WEB, id),
            "only for bundle_endpoint_profile",
        ),
        (
            rel("other.org", "https://o.org", SPIFFE, "not-an-id"),
            "invalid endpoint_spiffe_id",
        ),
    ];
    for (r, says) in cases {
        let err = svc
            .create_federation_relationship(create_req(r.clone(), None))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{r:?}: {err:?}");
        assert!(err.message().contains(says), "{r:?}: {err:?}");
    }
    let err = svc
        .create_federation_relationship(Request::new(
            pb::CreateFederationRelationshipRequest::default(),
        ))
        .await
        .expect_err("no relationship");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = svc
        .create_federation_relationship(create_req(
            rel("other.org", "https://o.org", SPIFFE, id),
            Some("not a PEM"),
        ))
        .await
        .expect_err("bad bundle");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(list_all(&svc).await?.is_empty(), "nothing stored");
    assert!(list(&svc).await?.is_empty(), "no bundle stored");

    // An endpoint in a third trust domain needs that trust domain's bundle stored.
    let err = svc
        .create_federation_relationship(create_req(
            rel("other.org", "https://o.org", SPIFFE, "spiffe://third.org/s"),
            Some(&ca_pem()?.0),
        ))
        .await
        .expect_err("no bundle of third.org");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("third.org"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn config_file_relationships_are_shown_but_not_changed() -> TestResult {
    let (_dir, _svc, state) = service().await?;
    let configured = ConfiguredRelationship {
        relationship: crate::federation::relationship::relationship(
            &state.trust_domain,
            "other.org",
            "https://other.org",
            WEB,
            None,
        )?,
        initial_bundle: None,
    };
    let state = Arc::new(AdminState {
        trust_domain: state.trust_domain.clone(),
        datastore: state.datastore.clone(),
        bundle: RwLock::new(Bundle::new(state.trust_domain.clone())),
        metrics: Metrics::new(),
        events: SyncEvents::new(),
        ca_not_after: AtomicI64::new(i64::MAX),
        ca: None,
        federation: Arc::new(Federation::new(state.trust_domain.clone(), &[configured])),
        started: std::sync::atomic::AtomicBool::new(true),
    });
    let svc = AdminService::new(state);
    let all = list_all(&svc).await?;
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].trust_domain.as_str(), all[0].source.as_str()),
        ("other.org", "config")
    );
    svc.get_federation_relationship(get_req("other.org"))
        .await?;
    let refusals = [
        svc.create_federation_relationship(create_req(
            rel("other.org", "https://x.org", WEB, ""),
            None,
        ))
        .await
        .expect_err("config"),
        svc.update_federation_relationship(update_req(
            rel("other.org", "https://x.org", WEB, ""),
            None,
        ))
        .await
        .expect_err("config"),
        svc.delete_federation_relationship(delete_req("other.org"))
            .await
            .expect_err("config"),
    ];
    for err in refusals {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("config file"), "{err:?}");
    }
    Ok(())
}

#[tokio::test]
async fn refresh_reports_the_fetch_outcome_and_mutations_are_audited() -> TestResult {
    let (_dir, svc, state) = service().await?;
    let log = LogBuffer::default();
    let _guard = log.install();
    svc.create_federation_relationship(create_req(
        rel("other.org", "https://o.org", WEB, ""),
        None,
    ))
    .await?;
    let refresh = |td: &str| {
        svc.refresh_bundle(Request::new(pb::RefreshBundleRequest {
            trust_domain: td.into(),
        }))
    };
    // No refresher running yet.
    let err = refresh("other.org").await.expect_err("not running");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(
        Refresher {
            federation: state.federation.clone(),
            datastore: state.datastore.clone(),
            fetcher: None,
            events: state.events.clone(),
            metrics: state.metrics.clone(),
            clock: sigil::clock::Clock::system(),
        }
        .run(shutdown),
    );
    let err = refresh("other.org").await.expect_err("no fetcher");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("https://o.org") && err.message().contains("bundle set"),
        "{err:?}"
    );
    let err = refresh("none.org").await.expect_err("no relationship");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // The failure shows in the relationship's status.
    let shown = svc
        .get_federation_relationship(get_req("other.org"))
        .await?
        .into_inner()
        .relationship
        .ok_or("no relationship")?;
    let status = shown.status.ok_or("a status")?;
    assert!(status.last_error.contains("bundle set") && status.consecutive_failures >= 1);
    assert!(status.next_attempt_at > status.last_attempt_at);
    let _ = stop.send(true);
    task.await?;

    svc.delete_federation_relationship(delete_req("other.org"))
        .await?;
    let lines = log.audit_lines();
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    let actions: Vec<(&str, &str, bool)> = parsed
        .iter()
        .map(|v| {
            (
                v["action"].as_str().unwrap_or(""),
                v["object"].as_str().unwrap_or(""),
                v["result"] == "ok",
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("federation.create", "other.org", true),
            ("federation.refresh", "other.org", false),
            ("federation.refresh", "other.org", false),
            ("federation.refresh", "none.org", false),
            ("federation.delete", "other.org", true),
        ]
    );
    Ok(())
}
