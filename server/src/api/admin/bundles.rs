//! Bundles: the server's own trust bundle (read only: it comes from the CA) and the federated
//! bundles of other trust domains (set, list, delete), which agents serve to their workloads.

use sigil::bundle::{Bundle, BundleError};
use sigil::proto::admin as pb;
use sigil::{SpiffeId, TrustDomain};
use tonic::Status;

use super::layer::Outcome;
use super::{ds_status, AdminState};
use crate::datastore::StoredBundle;

/// The foreign trust domain a federated-bundle request names: a bare name or its ID
/// `spiffe://name` (without a path), and never this server's own.
fn federated_td(state: &AdminState, s: &str) -> Result<TrustDomain, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument(
            "trust_domain is required (e.g. other.org or spiffe://other.org)",
        ));
    }
    // TrustDomain::new would quietly drop a path; a workload ID here is a mistake.
    if let Ok(id) = SpiffeId::parse(s) {
        if !id.path().is_empty() {
            return Err(Status::invalid_argument(format!(
                "invalid trust_domain {:?}: a trust domain has no path; use {}",
                sigil::text::echo(s),
                id.trust_domain().id_string()
            )));
        }
    }
    let td = TrustDomain::new(s).map_err(|e| {
        Status::invalid_argument(format!(
            "invalid trust_domain {:?}: {e}",
            sigil::text::echo(s)
        ))
    })?;
    if td == state.trust_domain {
        return Err(Status::invalid_argument(format!(
            "trust_domain {td} is this server's own trust domain: its bundle comes from the \
             server's CA (see `bundle show`); federated bundles are for other trust domains"
        )));
    }
    Ok(td)
}

/// Reads the bundle of a SetFederatedBundle request for `td`, refusing what agents could not use.
fn federated_bundle_from_request(
    td: &TrustDomain,
    bundle: Option<pb::set_federated_bundle_request::Bundle>,
) -> Result<StoredBundle, Status> {
    use pb::set_federated_bundle_request::Bundle as Input;
    let parsed = match bundle {
        None => {
            return Err(Status::invalid_argument(
                "bundle is required: give x509_pem (PEM roots) or spiffe_bundle_json",
            ))
        }
        Some(Input::X509Pem(pem)) => {
            let roots = sigil::x509::parse_pem_certs(&pem)
                .map_err(|e| Status::invalid_argument(format!("invalid x509_pem: {e}")))?;
            Bundle {
                x509_authorities: roots,
                ..Bundle::new(td.clone())
            }
        }
        Some(Input::SpiffeBundleJson(json)) => Bundle::from_spiffe_json(td.clone(), &json)
            .map_err(|e| Status::invalid_argument(format!("invalid spiffe_bundle_json: {e}")))?,
    };
    if parsed.x509_authorities.is_empty() && parsed.jwt_authorities.is_empty() {
        return Err(Status::invalid_argument(format!(
            "the bundle for {td} has no X.509 roots and no JWT keys; a federated bundle must \
             hold at least one"
        )));
    }
    // What cannot be shown as a SPIFFE bundle cannot be served to workloads either.
    parsed
        .to_spiffe_json()
        .map_err(|e| Status::invalid_argument(format!("unusable bundle for {td}: {e}")))?;
    Ok(StoredBundle {
        trust_domain: td.clone(),
        x509_roots: parsed.x509_authorities.clone(),
        jwt_keys_json: parsed.jwt_keys_json(),
        sequence: 0,
    })
}

/// A stored bundle in the formats the admin API shows.
fn stored_to_bundle(b: &StoredBundle) -> Result<Bundle, BundleError> {
    Ok(Bundle {
        x509_authorities: b.x509_roots.clone(),
        jwt_authorities: Bundle::jwt_authorities_from_json(&b.jwt_keys_json)?,
        sequence_number: b.sequence,
        ..Bundle::new(b.trust_domain.clone())
    })
}

pub(super) fn federated_to_proto(b: &StoredBundle) -> Result<pb::FederatedBundle, Status> {
    let bundle = stored_to_bundle(b)
        .and_then(|bundle| Ok((bundle.to_pem(), bundle.to_spiffe_json()?)))
        .map_err(|e| {
            tracing::error!(trust_domain = %b.trust_domain, error = %e, "stored federated bundle is unusable");
            Status::internal(format!(
                "stored federated bundle of {} is unusable: {e}; set it again",
                b.trust_domain
            ))
        })?;
    Ok(pb::FederatedBundle {
        trust_domain: b.trust_domain.to_string(),
        x509_pem: bundle.0,
        spiffe_bundle_json: bundle.1,
        sequence_number: b.sequence,
    })
}

/// GetBundle: the server's own bundle.
pub(super) async fn get(
    state: &AdminState,
    _req: pb::GetBundleRequest,
) -> Result<pb::GetBundleResponse, Status> {
    let bundle = state.bundle.read().await;
    let spiffe_bundle_json = bundle
        .to_spiffe_json()
        .map_err(|e| Status::internal(format!("encoding the SPIFFE bundle: {e}")))?;
    Ok(pb::GetBundleResponse {
        trust_domain: bundle.trust_domain.to_string(),
        x509_pem: bundle.to_pem(),
        spiffe_bundle_json,
        sequence_number: bundle.sequence_number,
    })
}

/// SetFederatedBundle; audited as the trust domain given.
pub(super) async fn set_federated(
    state: &AdminState,
    req: pb::SetFederatedBundleRequest,
) -> Outcome<pb::SetFederatedBundleResponse> {
    let result = async {
        let td = federated_td(state, &req.trust_domain)?;
        let bundle = federated_bundle_from_request(&td, req.bundle)?;
        let stored = state
            .datastore
            .set_federated_bundle(bundle)
            .await
            .map_err(ds_status)?;
        state.events.federated_bundles_changed();
        Ok(pb::SetFederatedBundleResponse {
            bundle: Some(federated_to_proto(&stored)?),
        })
    }
    .await;
    Outcome::new(result, req.trust_domain)
}

/// ListFederatedBundles.
pub(super) async fn list_federated(
    state: &AdminState,
    _req: pb::ListFederatedBundlesRequest,
) -> Result<pb::ListFederatedBundlesResponse, Status> {
    let stored = state
        .datastore
        .list_federated_bundles()
        .await
        .map_err(ds_status)?;
    let bundles = stored
        .iter()
        .map(federated_to_proto)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pb::ListFederatedBundlesResponse { bundles })
}

/// DeleteFederatedBundle; audited as the trust domain given.
pub(super) async fn delete_federated(
    state: &AdminState,
    req: pb::DeleteFederatedBundleRequest,
) -> Outcome<pb::DeleteFederatedBundleResponse> {
    let result = async {
        let td = federated_td(state, &req.trust_domain)?;
        state
            .datastore
            .delete_federated_bundle(&td)
            .await
            .map_err(ds_status)?;
        state.events.federated_bundles_changed();
        Ok(pb::DeleteFederatedBundleResponse {})
    }
    .await;
    Outcome::new(result, req.trust_domain)
}
