//! The admin API service (`sigil.admin.v1.Admin`) on the server's local Unix socket.
//!
//! Access control is the socket's file permissions (directory 0700). Each request is measured
//! ([`Metrics::observe_admin`]); each mutation is written to the audit log as a structured
//! `tracing` event with target `sigil::audit`: the caller's uid from the socket's peer
//! credentials, the action, the object it acted on (field `object`: `target` is tracing's own
//! key, which JSON lines already carry) and the result. Values from the caller are echoed
//! truncated ([`sigil::text::echo`]), in audit events as in error messages.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use sigil::bundle::{Bundle, BundleError};
use sigil::entry::{selectors_from_proto, RegistrationEntry};
use sigil::proto::admin as pb;
use sigil::proto::admin::admin_server::Admin;
use sigil::selector::{unknown_type_warning, Registrable};
use sigil::{SpiffeId, TrustDomain};
use tokio::sync::RwLock;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status};

use crate::datastore::{
    AttestedAgent, Datastore, DatastoreError, EntryFilter, JoinToken, SelectorMatch, StoredBundle,
};
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

/// Default page size for list calls.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Largest page size a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 10_000;
/// Largest batch in one BatchCreateEntries call.
pub const MAX_BATCH: usize = 10_000;
/// Default join-token lifetime (seconds).
pub const DEFAULT_JOIN_TOKEN_TTL: i64 = 600;
/// Longest error message returned or audited: messages that echo a caller's value bound it with
/// [`sigil::text::echo`]; this catches any that does not.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// State the admin API shares with the rest of the server.
pub struct AdminState {
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// Registration data.
    pub datastore: Arc<dyn Datastore>,
    /// The current trust bundle (with its stored sequence number).
    pub bundle: RwLock<Bundle>,
    /// Metrics.
    pub metrics: Metrics,
    /// Change notifications for the agents' sync streams: published after every successful
    /// entry or federated-bundle mutation.
    pub events: SyncEvents,
    /// NotAfter of the CA, Unix seconds: after it the server is not ready.
    pub ca_not_after: i64,
}

/// The admin gRPC service.
pub struct AdminService {
    state: Arc<AdminState>,
}

impl AdminService {
    /// Wraps shared state.
    pub fn new(state: Arc<AdminState>) -> Self {
        Self { state }
    }

    /// Runs a handler, recording its latency and status code.
    async fn measured<T>(
        &self,
        method: &'static str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let result = f.await.map_err(bound_message);
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.state
            .metrics
            .observe_admin(method, code, start.elapsed());
        result.map(Response::new)
    }

    /// [`Self::measured`] for a mutation whose audited object is known up front: runs `f`,
    /// writes the audit event with its outcome, and records the metrics.
    async fn audited<T>(
        &self,
        method: &'static str,
        action: &str,
        uid: Option<u32>,
        object: &str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        self.measured(method, async {
            let result = f.await;
            audit(uid, action, object, &result);
            result
        })
        .await
    }

    fn td(&self) -> &TrustDomain {
        &self.state.trust_domain
    }

    /// Validates an entry from the API: well-formed, in our trust domain, not reserved.
    fn validate_entry(&self, e: &pb::Entry) -> Result<RegistrationEntry, Status> {
        let entry = RegistrationEntry::from_proto(e)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for (field, id) in [
            ("spiffe_id", &entry.spiffe_id),
            ("parent_id", &entry.parent_id),
        ] {
            if !id.is_member_of(self.td()) {
                return Err(Status::invalid_argument(format!(
                    "invalid {field}: {id} is not in this server's trust domain {}",
                    self.td()
                )));
            }
        }
        if crate::api::is_reserved(&entry.spiffe_id) {
            return Err(Status::invalid_argument(format!(
                "invalid spiffe_id: paths under {} are reserved for Sigil's server and agents",
                crate::api::RESERVED_PREFIX
            )));
        }
        Ok(entry)
    }

    /// [`Self::validate_entry`] for a new entry: its TTLs must also meet the floors.
    fn validate_new_entry(&self, e: &pb::Entry) -> Result<RegistrationEntry, Status> {
        let entry = self.validate_entry(e)?;
        entry
            .check_x509_svid_ttl_floor()
            .and_then(|()| entry.check_jwt_svid_ttl_floor())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(entry)
    }

    /// Checks an entry's selectors against what Sigil's attestors produce (see
    /// [`sigil::Selector::check_registrable`]): a known type's unknown key or impossible value is
    /// refused; a type no Sigil attestor produces is logged as a warning (the CLI prints the
    /// same warning to the operator).
    fn check_selectors(entry: &RegistrationEntry) -> Result<(), Status> {
        for s in &entry.selectors {
            match s.check_registrable() {
                Ok(Registrable::Known) => {}
                Ok(Registrable::UnknownType) => {
                    tracing::warn!(spiffe_id = %entry.spiffe_id, selector = %s, "{}", unknown_type_warning(s));
                }
                Err(e) => return Err(Status::invalid_argument(format!("invalid selectors: {e}"))),
            }
        }
        Ok(())
    }

    fn parse_id(&self, field: &str, s: &str) -> Result<SpiffeId, Status> {
        SpiffeId::parse(s).map_err(|e| Status::invalid_argument(format!("invalid {field}: {e}")))
    }

    fn filter(&self, f: Option<pb::EntryFilter>) -> Result<EntryFilter, Status> {
        let Some(f) = f else {
            return Ok(EntryFilter::default());
        };
        let spiffe_id = (!f.spiffe_id.is_empty())
            .then(|| self.parse_id("filter.spiffe_id", &f.spiffe_id))
            .transpose()?;
        let parent_id = (!f.parent_id.is_empty())
            .then(|| self.parse_id("filter.parent_id", &f.parent_id))
            .transpose()?;
        let selectors = if f.selectors.is_empty() {
            None
        } else {
            let set = selectors_from_proto(&f.selectors)
                .map_err(|e| Status::invalid_argument(format!("invalid filter.selectors: {e}")))?;
            let how = match pb::SelectorMatch::try_from(f.selector_match) {
                Ok(pb::SelectorMatch::Exact) => SelectorMatch::Exact,
                Ok(pb::SelectorMatch::Subset) => SelectorMatch::Subset,
                Ok(pb::SelectorMatch::Superset) => SelectorMatch::Superset,
                Ok(pb::SelectorMatch::Any) => SelectorMatch::Any,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "invalid filter.selector_match {}",
                        f.selector_match
                    )))
                }
            };
            Some((set, how))
        };
        Ok(EntryFilter {
            spiffe_id,
            parent_id,
            selectors,
        })
    }

    /// The foreign trust domain a federated-bundle request names: a bare name or its ID
    /// `spiffe://name` (without a path), and never this server's own.
    fn federated_td(&self, s: &str) -> Result<TrustDomain, Status> {
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
        if td == *self.td() {
            return Err(Status::invalid_argument(format!(
                "trust_domain {td} is this server's own trust domain: its bundle comes from the \
                 server's CA (see `bundle show`); federated bundles are for other trust domains"
            )));
        }
        Ok(td)
    }

    async fn refresh_entry_gauge(&self) {
        if let Ok(n) = self
            .state
            .datastore
            .count_entries(&EntryFilter::default())
            .await
        {
            self.state.metrics.entries.set(n as i64);
        }
    }
}

/// The caller's uid from the Unix socket's peer credentials, if known.
fn caller_uid<T>(req: &Request<T>) -> Option<u32> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

/// Writes one audit event; `object` (what the action was applied to, as the caller named it)
/// is truncated, so is the error message.
fn audit<T>(uid: Option<u32>, action: &str, object: &str, result: &Result<T, Status>) {
    let outcome = match result {
        Ok(_) => "ok".to_string(),
        Err(s) => format!(
            "{:?}: {}",
            s.code(),
            sigil::text::truncate_for_display(s.message(), MAX_MESSAGE_CHARS)
        ),
    };
    let object = sigil::text::echo(object);
    match uid {
        Some(uid) => {
            tracing::info!(target: "sigil::audit", caller_uid = uid, action, object = %object, result = %outcome, "admin action")
        }
        None => {
            tracing::info!(target: "sigil::audit", caller_uid = "unknown", action, object = %object, result = %outcome, "admin action")
        }
    }
}

/// Truncates an error message longer than [`MAX_MESSAGE_CHARS`] (one that echoes a long value
/// without bounding it), keeping its code.
fn bound_message(s: Status) -> Status {
    match sigil::text::truncate_for_display(s.message(), MAX_MESSAGE_CHARS) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(short) => Status::new(s.code(), short),
    }
}

/// Maps datastore errors to gRPC statuses; backend failures are logged and hidden.
pub fn ds_status(e: DatastoreError) -> Status {
    match e {
        DatastoreError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        DatastoreError::NotFound(_) => Status::not_found(e.to_string()),
        DatastoreError::InvalidPageToken(_) => Status::invalid_argument(e.to_string()),
        DatastoreError::Expired => Status::permission_denied(e.to_string()),
        DatastoreError::Busy(_) => {
            tracing::warn!(error = %e, "datastore busy");
            Status::unavailable(format!("datastore busy: {e}"))
        }
        DatastoreError::Postgres(ref pg) if pg.is_transient() => {
            tracing::warn!(error = %e, "datastore unavailable");
            Status::unavailable(format!("datastore unavailable: {e}"))
        }
        DatastoreError::Corrupt(_)
        | DatastoreError::Sqlite(_)
        | DatastoreError::Open { .. }
        | DatastoreError::Io { .. }
        | DatastoreError::NoWal { .. }
        | DatastoreError::NewerSchema { .. }
        | DatastoreError::Migration { .. }
        | DatastoreError::Task(_)
        | DatastoreError::Json(_)
        | DatastoreError::JoinTokenCollision
        | DatastoreError::Postgres(_) => {
            tracing::error!(error = %e, "datastore failure");
            Status::internal(format!("datastore failure: {e}"))
        }
    }
}

fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

fn token(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn agent_to_proto(a: &AttestedAgent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        x509_svid_serial: a.x509_svid_serial.clone(),
        x509_svid_expires_at: a.x509_svid_expires_at,
        banned: a.banned,
        selectors: a
            .selectors
            .iter()
            .map(sigil::entry::selector_to_proto)
            .collect(),
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
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

fn federated_to_proto(b: &StoredBundle) -> Result<pb::FederatedBundle, Status> {
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

use sigil::clock::now_unix;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.measured("CreateEntry", async {
            let mut target = req
                .entry
                .as_ref()
                .map(|e| e.spiffe_id.clone())
                .unwrap_or_default();
            let result = async {
                let e = req
                    .entry
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("entry is required"))?;
                let entry = self.validate_new_entry(e)?;
                Self::check_selectors(&entry)?;
                let mut results = self
                    .state
                    .datastore
                    .create_entries(vec![entry])
                    .await
                    .map_err(ds_status)?;
                let created = results
                    .pop()
                    .ok_or_else(|| Status::internal("datastore returned no result"))?
                    .map_err(ds_status)?;
                self.state.events.entries_changed();
                target = format!("{} ({})", created.id, created.spiffe_id);
                Ok(pb::CreateEntryResponse {
                    entry: Some(created.to_proto()),
                })
            }
            .await;
            audit(uid, "entry.create", &target, &result);
            self.refresh_entry_gauge().await;
            result
        })
        .await
    }

    async fn batch_create_entries(
        &self,
        req: Request<pb::BatchCreateEntriesRequest>,
    ) -> Result<Response<pb::BatchCreateEntriesResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.measured("BatchCreateEntries", async {
            if req.entries.len() > MAX_BATCH {
                let r = Err(Status::invalid_argument(format!(
                    "batch of {} entries is larger than the maximum of {MAX_BATCH}; split it",
                    req.entries.len()
                )));
                audit(
                    uid,
                    "entry.batch_create",
                    &format!("{} entries", req.entries.len()),
                    &r,
                );
                return r;
            }
            // Validate everything first; only valid entries reach the datastore, in one
            // transaction, and results are reassembled in request order.
            let mut results: Vec<Option<pb::EntryResult>> = vec![None; req.entries.len()];
            let mut valid = Vec::new();
            let mut valid_idx = Vec::new();
            for (i, e) in req.entries.iter().enumerate() {
                match self
                    .validate_new_entry(e)
                    .and_then(|entry| Self::check_selectors(&entry).map(|()| entry))
                {
                    Ok(entry) => {
                        valid.push(entry);
                        valid_idx.push(i);
                    }
                    Err(s) => {
                        results[i] = Some(pb::EntryResult {
                            code: s.code() as i32,
                            message: bound_message(s).message().to_string(),
                            entry: Some(e.clone()),
                        })
                    }
                }
            }
            let stored = if valid.is_empty() {
                Vec::new()
            } else {
                match self.state.datastore.create_entries(valid).await {
                    Ok(r) => r,
                    Err(e) => {
                        let r = Err(ds_status(e));
                        audit(
                            uid,
                            "entry.batch_create",
                            &format!("{} entries", req.entries.len()),
                            &r,
                        );
                        return r;
                    }
                }
            };
            if stored.iter().any(Result::is_ok) {
                self.state.events.entries_changed();
            }
            for (i, r) in valid_idx.into_iter().zip(stored) {
                results[i] = Some(match r {
                    Ok(entry) => pb::EntryResult {
                        code: Code::Ok as i32,
                        message: String::new(),
                        entry: Some(entry.to_proto()),
                    },
                    Err(e) => {
                        let s = ds_status(e);
                        pb::EntryResult {
                            code: s.code() as i32,
                            message: s.message().to_string(),
                            entry: Some(req.entries[i].clone()),
                        }
                    }
                });
            }
            let results: Vec<pb::EntryResult> = results.into_iter().flatten().collect();
            // One audit event per entry, as for single creates.
            for r in &results {
                let e = r.entry.as_ref();
                let target = match e {
                    Some(e) if r.code == 0 => format!("{} ({})", e.id, e.spiffe_id),
                    Some(e) => e.spiffe_id.clone(),
                    None => String::new(),
                };
                let outcome: Result<(), Status> = if r.code == 0 {
                    Ok(())
                } else {
                    Err(Status::new(Code::from(r.code), r.message.clone()))
                };
                audit(uid, "entry.create", &target, &outcome);
            }
            let r = Ok(pb::BatchCreateEntriesResponse { results });
            self.refresh_entry_gauge().await;
            r
        })
        .await
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::GetEntryResponse>, Status> {
        let req = req.into_inner();
        self.measured("GetEntry", async {
            let entry = self
                .state
                .datastore
                .get_entry(&req.id)
                .await
                .map_err(ds_status)?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "entry {} not found",
                        sigil::text::quote_for_display(&req.id)
                    ))
                })?;
            Ok(pb::GetEntryResponse {
                entry: Some(entry.to_proto()),
            })
        })
        .await
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let req = req.into_inner();
        self.measured("ListEntries", async {
            let filter = self.filter(req.filter)?;
            let page = self
                .state
                .datastore
                .list_entries(&filter, page_size(req.page_size), token(&req.page_token))
                .await
                .map_err(ds_status)?;
            Ok(pb::ListEntriesResponse {
                entries: page.items.iter().map(RegistrationEntry::to_proto).collect(),
                next_page_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        let req = req.into_inner();
        self.measured("CountEntries", async {
            let filter = self.filter(req.filter)?;
            let count = self
                .state
                .datastore
                .count_entries(&filter)
                .await
                .map_err(ds_status)?;
            Ok(pb::CountEntriesResponse { count })
        })
        .await
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.measured("UpdateEntry", async {
            let target = req.entry.as_ref().map(|e| e.id.clone()).unwrap_or_default();
            let result = async {
                let new = req
                    .entry
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("entry is required"))?;
                let mask = req.mask.unwrap_or_default();
                let current = self
                    .state
                    .datastore
                    .get_entry(&new.id)
                    .await
                    .map_err(ds_status)?
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "entry {} not found",
                            sigil::text::quote_for_display(&new.id)
                        ))
                    })?;
                let mut merged = current.to_proto();
                if mask.spiffe_id {
                    merged.spiffe_id = new.spiffe_id.clone();
                }
                if mask.parent_id {
                    merged.parent_id = new.parent_id.clone();
                }
                if mask.selectors {
                    merged.selectors = new.selectors.clone();
                }
                if mask.x509_svid_ttl {
                    merged.x509_svid_ttl = new.x509_svid_ttl;
                }
                if mask.jwt_svid_ttl {
                    merged.jwt_svid_ttl = new.jwt_svid_ttl;
                }
                if mask.dns_names {
                    merged.dns_names = new.dns_names.clone();
                }
                if mask.admin {
                    merged.admin = new.admin;
                }
                if mask.downstream {
                    merged.downstream = new.downstream;
                }
                if mask.federates_with {
                    merged.federates_with = new.federates_with.clone();
                }
                if mask.hint {
                    merged.hint = new.hint.clone();
                }
                let entry = self.validate_entry(&merged)?;
                // Only TTLs this update sets must meet the floors: an entry stored before
                // they existed can still have its other fields changed.
                let floors = [
                    (mask.x509_svid_ttl, entry.check_x509_svid_ttl_floor()),
                    (mask.jwt_svid_ttl, entry.check_jwt_svid_ttl_floor()),
                ];
                for (set, check) in floors {
                    if set {
                        check.map_err(|e| Status::invalid_argument(e.to_string()))?;
                    }
                }
                // Only selectors being set now: an entry stored before these checks keeps
                // working through updates of its other fields.
                if mask.selectors {
                    Self::check_selectors(&entry)?;
                }
                let updated = self
                    .state
                    .datastore
                    .update_entry(entry)
                    .await
                    .map_err(ds_status)?;
                self.state.events.entries_changed();
                Ok(pb::UpdateEntryResponse {
                    entry: Some(updated.to_proto()),
                })
            }
            .await;
            audit(uid, "entry.update", &target, &result);
            result
        })
        .await
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.audited("DeleteEntry", "entry.delete", uid, &req.id, async {
            let result = self
                .state
                .datastore
                .delete_entry(&req.id)
                .await
                .map(|_| {
                    self.state.events.entries_changed();
                    pb::DeleteEntryResponse {}
                })
                .map_err(ds_status);
            self.refresh_entry_gauge().await;
            result
        })
        .await
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = req.into_inner();
        self.measured("ListAgents", async {
            let page = self
                .state
                .datastore
                .list_agents(page_size(req.page_size), token(&req.page_token))
                .await
                .map_err(ds_status)?;
            Ok(pb::ListAgentsResponse {
                agents: page.items.iter().map(agent_to_proto).collect(),
                next_page_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let req = req.into_inner();
        self.measured("GetAgent", async {
            let id = self.parse_id("spiffe_id", &req.spiffe_id)?;
            let agent = self
                .state
                .datastore
                .get_agent(&id)
                .await
                .map_err(ds_status)?
                .ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
            Ok(pb::GetAgentResponse {
                agent: Some(agent_to_proto(&agent)),
            })
        })
        .await
    }

    async fn evict_agent(
        &self,
        req: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.audited("EvictAgent", "agent.evict", uid, &req.spiffe_id, async {
            let id = self.parse_id("spiffe_id", &req.spiffe_id)?;
            self.state
                .datastore
                .delete_agent(&id)
                .await
                .map_err(ds_status)?;
            // Open sync streams re-check their agent on every event: end this one now.
            self.state.events.entries_changed();
            Ok(pb::EvictAgentResponse {})
        })
        .await
    }

    async fn ban_agent(
        &self,
        req: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.audited("BanAgent", "agent.ban", uid, &req.spiffe_id, async {
            let id = self.parse_id("spiffe_id", &req.spiffe_id)?;
            self.state
                .datastore
                .set_agent_banned(&id, true)
                .await
                .map_err(ds_status)?;
            self.state.events.entries_changed();
            Ok(pb::BanAgentResponse {})
        })
        .await
    }

    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        self.measured("GetBundle", async {
            let bundle = self.state.bundle.read().await;
            let spiffe_bundle_json = bundle
                .to_spiffe_json()
                .map_err(|e| Status::internal(format!("encoding the SPIFFE bundle: {e}")))?;
            Ok(pb::GetBundleResponse {
                trust_domain: bundle.trust_domain.to_string(),
                x509_pem: bundle.to_pem(),
                spiffe_bundle_json,
                sequence_number: bundle.sequence_number,
            })
        })
        .await
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        let target = req.trust_domain.clone();
        self.audited("SetFederatedBundle", "bundle.set", uid, &target, async {
            let td = self.federated_td(&req.trust_domain)?;
            let bundle = federated_bundle_from_request(&td, req.bundle)?;
            let stored = self
                .state
                .datastore
                .set_federated_bundle(bundle)
                .await
                .map_err(ds_status)?;
            self.state.events.federated_bundles_changed();
            Ok(pb::SetFederatedBundleResponse {
                bundle: Some(federated_to_proto(&stored)?),
            })
        })
        .await
    }

    async fn list_federated_bundles(
        &self,
        _req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        self.measured("ListFederatedBundles", async {
            let stored = self
                .state
                .datastore
                .list_federated_bundles()
                .await
                .map_err(ds_status)?;
            let bundles = stored
                .iter()
                .map(federated_to_proto)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(pb::ListFederatedBundlesResponse { bundles })
        })
        .await
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        let target = req.trust_domain.clone();
        self.audited(
            "DeleteFederatedBundle",
            "bundle.delete",
            uid,
            &target,
            async {
                let td = self.federated_td(&req.trust_domain)?;
                self.state
                    .datastore
                    .delete_federated_bundle(&td)
                    .await
                    .map_err(ds_status)?;
                self.state.events.federated_bundles_changed();
                Ok(pb::DeleteFederatedBundleResponse {})
            },
        )
        .await
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let uid = caller_uid(&req);
        let req = req.into_inner();
        self.measured("CreateJoinToken", async {
            let mut target = String::new();
            let result = async {
                let ttl = match req.ttl {
                    0 => DEFAULT_JOIN_TOKEN_TTL,
                    t if t < 0 || t as u64 > sigil::ttl::MAX.as_secs() => {
                        return Err(Status::invalid_argument(format!(
                            "invalid ttl: {t}s must be positive and at most 366 days"
                        )))
                    }
                    t => t,
                };
                let spiffe_id = if req.spiffe_id.is_empty() {
                    None
                } else {
                    let id = self.parse_id("spiffe_id", &req.spiffe_id)?;
                    if !id.is_member_of(self.td()) || crate::api::is_reserved(&id) || id.path().is_empty() {
                        return Err(Status::invalid_argument(format!(
                            "invalid spiffe_id: {id} must be in trust domain {} with a path outside {}",
                            self.td(),
                            crate::api::RESERVED_PREFIX
                        )));
                    }
                    Some(id)
                };
                let token = JoinToken {
                    token: uuid::Uuid::new_v4().to_string(),
                    expires_at: now_unix() + ttl,
                    spiffe_id,
                };
                self.state.datastore.create_join_token(token.clone()).await.map_err(ds_status)?;
                // Audit a short prefix only: the token is a credential.
                target = format!("token {}…", &token.token[..8]);
                Ok(pb::CreateJoinTokenResponse {
                    expires_at: token.expires_at,
                    spiffe_id: token.spiffe_id.map(|i| i.to_string()).unwrap_or_default(),
                    token: token.token,
                })
            }
            .await;
            audit(uid, "token.generate", &target, &result);
            result
        })
        .await
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.measured("Health", async {
            let ds = &self.state.datastore;
            let entries = ds
                .count_entries(&EntryFilter::default())
                .await
                .map_err(ds_status)?;
            let agents = ds.count_agents().await.map_err(ds_status)?;
            self.state.metrics.entries.set(entries as i64);
            let not_ready =
                crate::ca::expiry::not_ready_reason(self.state.ca_not_after, now_unix());
            Ok(pb::HealthResponse {
                ready: not_ready.is_none(),
                not_ready_reason: not_ready.unwrap_or_default(),
                ca_not_after: self.state.ca_not_after,
                trust_domain: self.td().to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                entries,
                agents,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::sqlite::SqliteDatastore;
    use rcgen::PublicKeyData as _;
    use sigil::bundle::JwtAuthority;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    async fn service() -> TestResult<(tempfile::TempDir, AdminService, Arc<AdminState>)> {
        let dir = tempfile::tempdir()?;
        let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?;
        let td = TrustDomain::new("example.org")?;
        let state = Arc::new(AdminState {
            trust_domain: td.clone(),
            datastore: Arc::new(ds),
            bundle: RwLock::new(Bundle::new(td)),
            metrics: Metrics::new(),
            events: SyncEvents::new(),
            ca_not_after: i64::MAX,
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
        let back =
            Bundle::from_spiffe_json(TrustDomain::new("aaa.org")?, &all[0].spiffe_bundle_json)?;
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
                ca_not_after,
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
            h.not_ready_reason.contains("CA certificate expired"),
            "{}",
            h.not_ready_reason
        );
        Ok(())
    }
}
