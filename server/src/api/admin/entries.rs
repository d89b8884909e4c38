//! Registration entries: create (one or a batch), get, list, count, update, delete. Entries are
//! validated here (trust domain, reserved paths, TTL floors, registrable selectors); every
//! durable change is published to the sync streams.

use sigil::entry::{selectors_from_proto, RegistrationEntry};
use sigil::proto::admin as pb;
use sigil::selector::{unknown_type_warning, Registrable};
use tonic::{Code, Status};

use super::layer::{bound_message, Outcome};
use super::{ds_status, page_size, page_token, parse_id, AdminState, MAX_BATCH};
use crate::datastore::{EntryFilter, SelectorMatch};

/// Validates an entry from the API: well-formed, in our trust domain, not reserved.
fn validate_entry(state: &AdminState, e: &pb::Entry) -> Result<RegistrationEntry, Status> {
    let td = &state.trust_domain;
    let entry =
        RegistrationEntry::from_proto(e).map_err(|e| Status::invalid_argument(e.to_string()))?;
    for (field, id) in [
        ("spiffe_id", &entry.spiffe_id),
        ("parent_id", &entry.parent_id),
    ] {
        if !id.is_member_of(td) {
            return Err(Status::invalid_argument(format!(
                "invalid {field}: {id} is not in this server's trust domain {td}"
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

/// [`validate_entry`] for a new entry: its TTLs must also meet the floors.
fn validate_new_entry(state: &AdminState, e: &pb::Entry) -> Result<RegistrationEntry, Status> {
    let entry = validate_entry(state, e)?;
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

/// The datastore filter of a list or count request; none matches every entry.
fn filter(f: Option<pb::EntryFilter>) -> Result<EntryFilter, Status> {
    let Some(f) = f else {
        return Ok(EntryFilter::default());
    };
    let spiffe_id = (!f.spiffe_id.is_empty())
        .then(|| parse_id("filter.spiffe_id", &f.spiffe_id))
        .transpose()?;
    let parent_id = (!f.parent_id.is_empty())
        .then(|| parse_id("filter.parent_id", &f.parent_id))
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

/// The NotFound of an entry ID, echoed truncated.
fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "entry {} not found",
        sigil::text::quote_for_display(id)
    ))
}

/// CreateEntry; audited as `<id> (<spiffe_id>)` once created, else as the requested SPIFFE ID.
pub(super) async fn create(
    state: &AdminState,
    req: pb::CreateEntryRequest,
) -> Outcome<pb::CreateEntryResponse> {
    let mut object = req
        .entry
        .as_ref()
        .map(|e| e.spiffe_id.clone())
        .unwrap_or_default();
    let result = async {
        let e = req
            .entry
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let entry = validate_new_entry(state, e)?;
        check_selectors(&entry)?;
        let mut results = state
            .datastore
            .create_entries(vec![entry])
            .await
            .map_err(ds_status)?;
        let created = results
            .pop()
            .ok_or_else(|| Status::internal("datastore returned no result"))?
            .map_err(ds_status)?;
        state.events.entries_changed();
        object = format!("{} ({})", created.id, created.spiffe_id);
        Ok(pb::CreateEntryResponse {
            entry: Some(created.to_proto()),
        })
    }
    .await;
    Outcome::new(result, object)
}

/// BatchCreateEntries: one result per entry, in request order, each audited as a single create
/// would be; the call is audited as a whole only when it fails as a whole.
pub(super) async fn batch_create(
    state: &AdminState,
    req: pb::BatchCreateEntriesRequest,
) -> Outcome<pb::BatchCreateEntriesResponse> {
    let whole = format!("{} entries", req.entries.len());
    if req.entries.len() > MAX_BATCH {
        let r = Err(Status::invalid_argument(format!(
            "batch of {} entries is larger than the maximum of {MAX_BATCH}; split it",
            req.entries.len()
        )));
        return Outcome::new(r, whole);
    }
    // Validate everything first; only valid entries reach the datastore, in one
    // transaction, and results are reassembled in request order.
    let mut results: Vec<Option<pb::EntryResult>> = vec![None; req.entries.len()];
    let mut valid = Vec::new();
    let mut valid_idx = Vec::new();
    for (i, e) in req.entries.iter().enumerate() {
        match validate_new_entry(state, e).and_then(|entry| check_selectors(&entry).map(|()| entry))
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
        match state.datastore.create_entries(valid).await {
            Ok(r) => r,
            Err(e) => return Outcome::new(Err(ds_status(e)), whole),
        }
    };
    if stored.iter().any(Result::is_ok) {
        state.events.entries_changed();
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
    let items = results
        .iter()
        .map(|r| {
            let object = match r.entry.as_ref() {
                Some(e) if r.code == 0 => format!("{} ({})", e.id, e.spiffe_id),
                Some(e) => e.spiffe_id.clone(),
                None => String::new(),
            };
            let outcome = if r.code == 0 {
                Ok(())
            } else {
                Err(Status::new(Code::from(r.code), r.message.clone()))
            };
            (object, outcome)
        })
        .collect();
    Outcome {
        items,
        ..Outcome::new(Ok(pb::BatchCreateEntriesResponse { results }), whole)
    }
}

/// GetEntry.
pub(super) async fn get(
    state: &AdminState,
    req: pb::GetEntryRequest,
) -> Result<pb::GetEntryResponse, Status> {
    let entry = state
        .datastore
        .get_entry(&req.id)
        .await
        .map_err(ds_status)?
        .ok_or_else(|| not_found(&req.id))?;
    Ok(pb::GetEntryResponse {
        entry: Some(entry.to_proto()),
    })
}

/// ListEntries: one page.
pub(super) async fn list(
    state: &AdminState,
    req: pb::ListEntriesRequest,
) -> Result<pb::ListEntriesResponse, Status> {
    let filter = filter(req.filter)?;
    let page = state
        .datastore
        .list_entries(
            &filter,
            page_size(req.page_size),
            page_token(&req.page_token),
        )
        .await
        .map_err(ds_status)?;
    Ok(pb::ListEntriesResponse {
        entries: page.items.iter().map(RegistrationEntry::to_proto).collect(),
        next_page_token: page.next_token.unwrap_or_default(),
    })
}

/// CountEntries.
pub(super) async fn count(
    state: &AdminState,
    req: pb::CountEntriesRequest,
) -> Result<pb::CountEntriesResponse, Status> {
    let filter = filter(req.filter)?;
    let count = state
        .datastore
        .count_entries(&filter)
        .await
        .map_err(ds_status)?;
    Ok(pb::CountEntriesResponse { count })
}

/// UpdateEntry: the fields the mask names replace the stored ones; audited as the entry ID.
pub(super) async fn update(
    state: &AdminState,
    req: pb::UpdateEntryRequest,
) -> Outcome<pb::UpdateEntryResponse> {
    let object = req.entry.as_ref().map(|e| e.id.clone()).unwrap_or_default();
    Outcome::new(update_masked(state, req).await, object)
}

async fn update_masked(
    state: &AdminState,
    req: pb::UpdateEntryRequest,
) -> Result<pb::UpdateEntryResponse, Status> {
    let new = req
        .entry
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("entry is required"))?;
    let mask = req.mask.unwrap_or_default();
    let current = state
        .datastore
        .get_entry(&new.id)
        .await
        .map_err(ds_status)?
        .ok_or_else(|| not_found(&new.id))?;
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
    let entry = validate_entry(state, &merged)?;
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
        check_selectors(&entry)?;
    }
    let updated = state
        .datastore
        .update_entry(entry)
        .await
        .map_err(ds_status)?;
    state.events.entries_changed();
    Ok(pb::UpdateEntryResponse {
        entry: Some(updated.to_proto()),
    })
}

/// DeleteEntry; audited as the entry ID.
pub(super) async fn delete(
    state: &AdminState,
    req: pb::DeleteEntryRequest,
) -> Outcome<pb::DeleteEntryResponse> {
    let result = state
        .datastore
        .delete_entry(&req.id)
        .await
        .map(|_| {
            state.events.entries_changed();
            pb::DeleteEntryResponse {}
        })
        .map_err(ds_status);
    Outcome::new(result, req.id)
}
