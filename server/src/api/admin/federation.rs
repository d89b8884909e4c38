//! Federation relationships (create, update, get, list, delete) and RefreshBundle.
//!
//! The rules of a relationship are `federation::relationship`'s; an error names the field.
//! Relationships of the config file are shown (source `config`) but not changed here: create,
//! update and delete refuse their trust domains with FailedPrecondition. A relationship may come
//! with the foreign trust domain's bundle to start from; `https_spiffe` needs a bundle of the
//! endpoint SPIFFE ID's trust domain (given, or stored) before the first fetch can be
//! authenticated. After each change the refresher is told ([`Federation::relationships_changed`]):
//! a new or changed relationship is fetched at once.
//!
//! [`Federation::relationships_changed`]: crate::federation::refresher::Federation::relationships_changed

use sigil::bundle::Bundle;
use sigil::proto::admin as pb;
use sigil::TrustDomain;
use tonic::Status;

use super::bundles::federated_to_proto;
use super::layer::Outcome;
use super::{ds_status, AdminState};
use crate::datastore::{FederationRelationship, StoredBundle};
use crate::federation::refresher::{RefreshError, RefreshStatus};
use crate::federation::relationship::{self, BundleFormat, RelationshipError, Source};
use crate::federation::EndpointProfile;

fn invalid(e: RelationshipError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The trust domain a request names, by the relationship rules.
fn trust_domain(state: &AdminState, s: &str) -> Result<TrustDomain, Status> {
    relationship::parse_trust_domain(&state.trust_domain, s).map_err(invalid)
}

/// Refuses to change a relationship the config file defines.
fn refuse_configured(state: &AdminState, td: &TrustDomain) -> Result<(), Status> {
    if state.federation.configured(td).is_some() {
        return Err(Status::failed_precondition(format!(
            "the federation relationship with {td} is defined in the server's config file \
             ([federation.federates_with.\"{td}\"]); change it there and restart the server"
        )));
    }
    Ok(())
}

/// The relationship of a create or update request.
fn relationship_from_request(
    state: &AdminState,
    r: Option<pb::FederationRelationship>,
) -> Result<FederationRelationship, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("relationship is required"))?;
    relationship::relationship(
        &state.trust_domain,
        &r.trust_domain,
        &r.bundle_endpoint_url,
        &r.bundle_endpoint_profile,
        Some(&r.endpoint_spiffe_id),
    )
    .map_err(invalid)
}

/// The initial bundle a request carries, if any.
fn bundle_from_request(
    td: &TrustDomain,
    pem: Option<String>,
    spiffe: Option<String>,
) -> Result<Option<Bundle>, Status> {
    let (format, content) = match (pem, spiffe) {
        (Some(p), _) => (BundleFormat::Pem, p),
        (None, Some(s)) => (BundleFormat::Spiffe, s),
        (None, None) => return Ok(None),
    };
    relationship::parse_bundle(td, format, &content)
        .map(Some)
        .map_err(invalid)
}

/// `https_spiffe`: a bundle of the endpoint SPIFFE ID's trust domain must be there to
/// authenticate the first fetch (our own, the one given, or a stored one).
async fn check_endpoint_trust(
    state: &AdminState,
    r: &FederationRelationship,
    initial: Option<&Bundle>,
) -> Result<(), Status> {
    let EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } = &r.profile else {
        return Ok(());
    };
    let etd = endpoint_spiffe_id.trust_domain();
    if etd == &state.trust_domain || (etd == &r.trust_domain && initial.is_some()) {
        return Ok(());
    }
    if state
        .datastore
        .get_federated_bundle(etd)
        .await
        .map_err(ds_status)?
        .is_some()
    {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "no bundle of trust domain {etd} is stored to authenticate the https_spiffe endpoint \
         ({endpoint_spiffe_id}) with: give the bundle with the request (--trust-domain-bundle-path) \
         or set it first with `sigil-server bundle set --id {etd}`"
    )))
}

/// Stores a request's initial bundle and announces it to the agents.
async fn store_bundle(state: &AdminState, b: &Bundle) -> Result<(), Status> {
    state
        .datastore
        .set_federated_bundle(StoredBundle {
            trust_domain: b.trust_domain.clone(),
            x509_roots: b.x509_authorities.clone(),
            jwt_keys_json: b.jwt_keys_json(),
            sequence: 0,
        })
        .await
        .map_err(ds_status)?;
    state.events.federated_bundles_changed();
    Ok(())
}

fn status_to_proto(s: RefreshStatus) -> pb::FederationRefreshStatus {
    pb::FederationRefreshStatus {
        last_attempt_at: s.last_attempt_at.unwrap_or(0),
        last_success_at: s.last_success_at.unwrap_or(0),
        last_error: s.last_error.unwrap_or_default(),
        next_attempt_at: s.next_attempt_at.unwrap_or(0),
        consecutive_failures: s.consecutive_failures,
    }
}

/// A relationship as the API shows it: with its source, refresh status and stored bundle.
async fn to_proto(
    state: &AdminState,
    r: FederationRelationship,
    source: Source,
) -> Result<pb::FederationRelationship, Status> {
    let (profile, endpoint_spiffe_id) = relationship::profile_fields(&r.profile);
    let bundle = state
        .datastore
        .get_federated_bundle(&r.trust_domain)
        .await
        .map_err(ds_status)?
        .as_ref()
        .map(federated_to_proto)
        .transpose()?;
    Ok(pb::FederationRelationship {
        status: state
            .federation
            .status(&r.trust_domain)
            .map(status_to_proto),
        trust_domain: r.trust_domain.to_string(),
        bundle_endpoint_url: r.bundle_endpoint_url,
        bundle_endpoint_profile: profile.to_string(),
        endpoint_spiffe_id,
        source: source.as_str().to_string(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        bundle,
    })
}

/// The relationship with `td` the server follows: the config file's, else the datastore's.
async fn find(
    state: &AdminState,
    td: &TrustDomain,
) -> Result<(FederationRelationship, Source), Status> {
    if let Some(r) = state.federation.configured(td) {
        return Ok((r.clone(), Source::Config));
    }
    state
        .datastore
        .get_federation_relationship(td)
        .await
        .map_err(ds_status)?
        .map(|r| (r, Source::Datastore))
        .ok_or_else(|| {
            Status::not_found(format!("no federation relationship with trust domain {td}"))
        })
}

/// The trust domain a create/update request names, for its audit event.
fn object(r: &Option<pb::FederationRelationship>) -> String {
    r.as_ref()
        .map(|r| r.trust_domain.clone())
        .unwrap_or_default()
}

/// CreateFederationRelationship; audited as the trust domain given.
pub(super) async fn create(
    state: &AdminState,
    req: pb::CreateFederationRelationshipRequest,
) -> Outcome<pb::CreateFederationRelationshipResponse> {
    use pb::create_federation_relationship_request::TrustDomainBundle as B;
    let object = object(&req.relationship);
    let result = async {
        let r = relationship_from_request(state, req.relationship)?;
        refuse_configured(state, &r.trust_domain)?;
        let (pem, spiffe) = match req.trust_domain_bundle {
            Some(B::X509Pem(p)) => (Some(p), None),
            Some(B::SpiffeBundleJson(s)) => (None, Some(s)),
            None => (None, None),
        };
        let initial = bundle_from_request(&r.trust_domain, pem, spiffe)?;
        check_endpoint_trust(state, &r, initial.as_ref()).await?;
        // Checked before the bundle is stored, so a refused duplicate changes nothing.
        if state
            .datastore
            .get_federation_relationship(&r.trust_domain)
            .await
            .map_err(ds_status)?
            .is_some()
        {
            return Err(ds_status(
                crate::datastore::DatastoreError::RelationshipExists(r.trust_domain),
            ));
        }
        let write = state.datastore.create_federation_relationship(r);
        Ok(pb::CreateFederationRelationshipResponse {
            relationship: Some(store_and_write(state, initial.as_ref(), write).await?),
        })
    }
    .await;
    Outcome::new(result, object)
}

/// The end of a create or update: stores the starting bundle, if given, then `write` (the
/// relationship's datastore write, not started before), tells the refresher and answers with
/// the stored relationship.
async fn store_and_write(
    state: &AdminState,
    initial: Option<&Bundle>,
    write: impl std::future::Future<
        Output = Result<FederationRelationship, crate::datastore::DatastoreError>,
    >,
) -> Result<pb::FederationRelationship, Status> {
    if let Some(b) = initial {
        store_bundle(state, b).await?;
    }
    let stored = write.await.map_err(ds_status)?;
    state.federation.relationships_changed();
    to_proto(state, stored, Source::Datastore).await
}

/// UpdateFederationRelationship; audited as the trust domain given.
pub(super) async fn update(
    state: &AdminState,
    req: pb::UpdateFederationRelationshipRequest,
) -> Outcome<pb::UpdateFederationRelationshipResponse> {
    use pb::update_federation_relationship_request::TrustDomainBundle as B;
    let object = object(&req.relationship);
    let result = async {
        let r = relationship_from_request(state, req.relationship)?;
        refuse_configured(state, &r.trust_domain)?;
        let (pem, spiffe) = match req.trust_domain_bundle {
            Some(B::X509Pem(p)) => (Some(p), None),
            Some(B::SpiffeBundleJson(s)) => (None, Some(s)),
            None => (None, None),
        };
        let initial = bundle_from_request(&r.trust_domain, pem, spiffe)?;
        if state
            .datastore
            .get_federation_relationship(&r.trust_domain)
            .await
            .map_err(ds_status)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "no federation relationship with trust domain {}; create it with `sigil-server \
                 federation create`",
                r.trust_domain
            )));
        }
        check_endpoint_trust(state, &r, initial.as_ref()).await?;
        let write = state.datastore.update_federation_relationship(r);
        Ok(pb::UpdateFederationRelationshipResponse {
            relationship: Some(store_and_write(state, initial.as_ref(), write).await?),
        })
    }
    .await;
    Outcome::new(result, object)
}

/// GetFederationRelationship.
pub(super) async fn get(
    state: &AdminState,
    req: pb::GetFederationRelationshipRequest,
) -> Result<pb::GetFederationRelationshipResponse, Status> {
    let td = trust_domain(state, &req.trust_domain)?;
    let (r, source) = find(state, &td).await?;
    Ok(pb::GetFederationRelationshipResponse {
        relationship: Some(to_proto(state, r, source).await?),
    })
}

/// ListFederationRelationships: the config file's and the datastore's.
pub(super) async fn list(
    state: &AdminState,
    _req: pb::ListFederationRelationshipsRequest,
) -> Result<pb::ListFederationRelationshipsResponse, Status> {
    let all = state
        .federation
        .relationships(state.datastore.as_ref())
        .await
        .map_err(ds_status)?;
    let mut relationships = Vec::with_capacity(all.len());
    for (r, source) in all {
        relationships.push(to_proto(state, r, source).await?);
    }
    Ok(pb::ListFederationRelationshipsResponse { relationships })
}

/// DeleteFederationRelationship; audited as the trust domain given. The bundle stays.
pub(super) async fn delete(
    state: &AdminState,
    req: pb::DeleteFederationRelationshipRequest,
) -> Outcome<pb::DeleteFederationRelationshipResponse> {
    let result = async {
        let td = trust_domain(state, &req.trust_domain)?;
        refuse_configured(state, &td)?;
        state
            .datastore
            .delete_federation_relationship(&td)
            .await
            .map_err(ds_status)?;
        state.federation.relationships_changed();
        Ok(pb::DeleteFederationRelationshipResponse {})
    }
    .await;
    Outcome::new(result, req.trust_domain)
}

/// RefreshBundle: an immediate fetch; its failure is the call's error. Audited (it may change
/// the stored bundle).
pub(super) async fn refresh(
    state: &AdminState,
    req: pb::RefreshBundleRequest,
) -> Outcome<pb::RefreshBundleResponse> {
    let result = async {
        let td = trust_domain(state, &req.trust_domain)?;
        let (r, _) = find(state, &td).await?;
        let outcome = state
            .federation
            .refresh(&td)
            .await
            .map_err(|e| refresh_status(&r, e))?;
        let (r, source) = find(state, &td).await?;
        Ok(pb::RefreshBundleResponse {
            changed: outcome.changed,
            relationship: Some(to_proto(state, r, source).await?),
        })
    }
    .await;
    Outcome::new(result, req.trust_domain)
}

fn refresh_status(r: &FederationRelationship, e: RefreshError) -> Status {
    let message = |e: &RefreshError| {
        format!(
            "fetching from {} failed: {}; the stored bundle of {} is unchanged",
            sigil::text::echo(&r.bundle_endpoint_url),
            sigil::text::error_chain(e),
            r.trust_domain
        )
    };
    match e {
        RefreshError::Datastore(d) => ds_status(d),
        RefreshError::NoRelationship(_) => Status::not_found(e.to_string()),
        RefreshError::NotRunning => Status::unavailable(e.to_string()),
        RefreshError::Fetch(_) | RefreshError::TimedOut => Status::unavailable(message(&e)),
        RefreshError::NoTrustBundle(_)
        | RefreshError::WrongTrustDomain { .. }
        | RefreshError::EmptyBundle
        | RefreshError::NoFetcher
        | RefreshError::StoredBundle { .. } => Status::failed_precondition(message(&e)),
    }
}
