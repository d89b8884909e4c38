//! Local authorities (SPIRE's `localauthority` API): show the X.509 authorities or JWT keys
//! (active, prepared, old), prepare one now, activate the prepared one, taint an old one, revoke
//! a tainted one. Mutations are audited as `authority.<verb>` with object `x509:<id>` or
//! `jwt:<id>`; the rotation task publishes the resulting bundle ([`crate::ca::Ca::changed`]).
//! A refusal (unknown ID, the active authority, not tainted...) changes nothing.

use std::sync::Arc;

use sigil::clock::now_unix;
use sigil::proto::admin as pb;
use tonic::Status;

use super::layer::Outcome;
use super::AdminState;
use crate::ca::{AuthorityInfo, Ca, CaError, Kind, Slot};

fn kind(k: i32) -> Result<Kind, Status> {
    match pb::AuthorityKind::try_from(k) {
        Ok(pb::AuthorityKind::X509) => Ok(Kind::X509),
        Ok(pb::AuthorityKind::Jwt) => Ok(Kind::Jwt),
        _ => Err(Status::invalid_argument(
            "kind is required: AUTHORITY_KIND_X509 or AUTHORITY_KIND_JWT",
        )),
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::X509 => "x509",
        Kind::Jwt => "jwt",
    }
}

fn ca(state: &AdminState) -> Result<Arc<Ca>, Status> {
    state
        .ca
        .clone()
        .ok_or_else(|| Status::unavailable("this server has no CA attached to its admin API"))
}

/// Maps the CA's refusals to statuses callers can act on; failures are logged.
fn ca_status(e: CaError) -> Status {
    match e {
        CaError::UnknownAuthority { .. } => Status::not_found(e.to_string()),
        CaError::AuthorityNotAllowed { .. }
        | CaError::NoPreparedAuthority(_)
        | CaError::UpstreamManaged => Status::failed_precondition(e.to_string()),
        other => {
            tracing::error!(error = %other, "local authority operation failed");
            Status::internal(format!("local authority operation failed: {other}"))
        }
    }
}

fn to_proto(a: &AuthorityInfo) -> pb::LocalAuthority {
    pb::LocalAuthority {
        authority_id: a.id.clone(),
        slot: a.slot.as_str().to_string(),
        not_before: a.not_before,
        not_after: a.not_after,
        tainted: a.tainted,
    }
}

fn find(ca: &Ca, kind: Kind, pred: impl Fn(&AuthorityInfo) -> bool) -> Option<pb::LocalAuthority> {
    ca.list(kind).iter().find(|a| pred(a)).map(to_proto)
}

/// Runs a transition on the blocking pool (key generation, fsyncs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CaError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("local authority task failed: {e}")))?
        .map_err(ca_status)
}

/// The object of an audit event: `x509:<id>` or `jwt:<id>`.
fn object(k: i32, id: &str) -> String {
    let name = kind(k).map_or("unknown", kind_name);
    format!("{name}:{id}")
}

/// GetLocalAuthorityState.
pub(super) async fn show(
    state: &AdminState,
    req: pb::GetLocalAuthorityStateRequest,
) -> Result<pb::GetLocalAuthorityStateResponse, Status> {
    let kind = kind(req.kind)?;
    let ca = ca(state)?;
    let all = ca.list(kind);
    let pick = |slot: Slot| all.iter().filter(move |a| a.slot == slot).map(to_proto);
    let mut old: Vec<pb::LocalAuthority> = pick(Slot::Old).collect();
    old.sort_by_key(|a| std::cmp::Reverse(a.not_after));
    Ok(pb::GetLocalAuthorityStateResponse {
        active: pick(Slot::Active).next(),
        prepared: pick(Slot::Prepared).next(),
        old,
    })
}

/// PrepareLocalAuthority; audited as the new authority.
pub(super) async fn prepare(
    state: &AdminState,
    req: pb::PrepareLocalAuthorityRequest,
) -> Outcome<pb::PrepareLocalAuthorityResponse> {
    let mut audited = object(req.kind, "");
    let result = async {
        let kind = kind(req.kind)?;
        let ca = ca(state)?;
        let c = ca.clone();
        blocking(move || c.prepare(kind, now_unix())).await?;
        let prepared = find(&ca, kind, |a| a.slot == Slot::Prepared);
        if let Some(p) = &prepared {
            audited = object(req.kind, &p.authority_id);
        }
        Ok(pb::PrepareLocalAuthorityResponse { prepared })
    }
    .await;
    Outcome::new(result, audited)
}

/// ActivateLocalAuthority; audited as the ID given (or the prepared one's).
pub(super) async fn activate(
    state: &AdminState,
    req: pb::ActivateLocalAuthorityRequest,
) -> Outcome<pb::ActivateLocalAuthorityResponse> {
    let mut audited = object(req.kind, &req.authority_id);
    let result = async {
        let kind = kind(req.kind)?;
        let ca = ca(state)?;
        let c = ca.clone();
        let id = req.authority_id.clone();
        blocking(move || c.activate(kind, Some(id.as_str()).filter(|s| !s.is_empty()))).await?;
        let active = find(&ca, kind, |a| a.slot == Slot::Active);
        if let Some(a) = &active {
            audited = object(req.kind, &a.authority_id);
        }
        Ok(pb::ActivateLocalAuthorityResponse { active })
    }
    .await;
    Outcome::new(result, audited)
}

fn required_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "authority_id is required (`localauthority ... show` lists them)",
        ));
    }
    Ok(())
}

/// TaintLocalAuthority; audited as the ID given.
pub(super) async fn taint(
    state: &AdminState,
    req: pb::TaintLocalAuthorityRequest,
) -> Outcome<pb::TaintLocalAuthorityResponse> {
    let result = async {
        let kind = kind(req.kind)?;
        required_id(&req.authority_id)?;
        let ca = ca(state)?;
        let c = ca.clone();
        let id = req.authority_id.clone();
        blocking(move || c.taint(kind, &id)).await?;
        Ok(pb::TaintLocalAuthorityResponse {
            tainted: find(&ca, kind, |a| a.id == req.authority_id),
        })
    }
    .await;
    Outcome::new(result, object(req.kind, &req.authority_id))
}

/// RevokeLocalAuthority; audited as the ID given.
pub(super) async fn revoke(
    state: &AdminState,
    req: pb::RevokeLocalAuthorityRequest,
) -> Outcome<pb::RevokeLocalAuthorityResponse> {
    let result = async {
        let kind = kind(req.kind)?;
        required_id(&req.authority_id)?;
        let ca = ca(state)?;
        let revoked = find(&ca, kind, |a| a.id == req.authority_id);
        let c = ca.clone();
        let id = req.authority_id.clone();
        blocking(move || c.revoke(kind, &id)).await?;
        Ok(pb::RevokeLocalAuthorityResponse { revoked })
    }
    .await;
    Outcome::new(result, object(req.kind, &req.authority_id))
}
