//! The admin API service (`sigil.admin.v1.Admin`) on the server's local Unix socket.
//!
//! Access control is the socket's file permissions (directory 0700). Every RPC passes through
//! one layer (`layer.rs`): it takes the caller's uid from the socket's peer credentials, runs the
//! handler, writes the audit event of a mutation, refreshes the entry gauge after an entry
//! change, bounds the error message and records the metrics ([`Metrics::observe_admin`]). Audit
//! events are structured `tracing` events with target `sigil::audit`: the caller's uid, the
//! action, the object it acted on (field `object`: `target` is tracing's own key, which JSON
//! lines already carry) and the result. Values from the caller are echoed truncated
//! ([`sigil::text::echo`]), in audit events as in error messages.
//!
//! Layout: this file holds the service, its state, the trait implementation (one line per RPC:
//! how the layer treats it, and its handler) and what the handlers share; the handlers live by
//! resource in `entries.rs`, `agents.rs`, `bundles.rs` (the server's bundle and federated
//! bundles), `federation.rs` (federation relationships, RefreshBundle), `join_tokens.rs`, `localauthority.rs` (the CA's authorities: show, prepare,
//! activate, taint, revoke) and `health.rs`.

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;

use sigil::bundle::Bundle;
use sigil::proto::admin as pb;
use sigil::proto::admin::admin_server::Admin;
use sigil::{SpiffeId, TrustDomain};
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

use crate::ca::Ca;
use crate::datastore::{Datastore, DatastoreError};
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

mod agents;
mod bundles;
mod entries;
mod federation;
mod health;
mod join_tokens;
mod layer;
mod localauthority;
#[cfg(test)]
mod tests;

use layer::Rpc;

pub use crate::datastore::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
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
    /// NotAfter of the active X.509 authority, Unix seconds: after it the server is not ready
    /// (updated at each activation).
    pub ca_not_after: AtomicI64,
    /// The CA, for the local authority RPCs (None in tests of other resources).
    pub ca: Option<Arc<Ca>>,
    /// Federation: the config file's relationships, refresh statuses, the refresher's inbox.
    pub federation: Arc<crate::federation::refresher::Federation>,
    /// True once start-up is complete (node API, bundle endpoint, the config file's federated
    /// bundles stored) and until shutdown begins: the admin API answers before that, and
    /// `healthcheck` must not say ready earlier than `/ready` does.
    pub started: AtomicBool,
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
}

/// Parses a SPIFFE ID the caller passed in `field`.
fn parse_id(field: &str, s: &str) -> Result<SpiffeId, Status> {
    SpiffeId::parse(s).map_err(|e| Status::invalid_argument(format!("invalid {field}: {e}")))
}

/// Maps datastore errors to gRPC statuses; backend failures are logged and hidden.
pub fn ds_status(e: DatastoreError) -> Status {
    match e {
        DatastoreError::AlreadyExists(_) | DatastoreError::RelationshipExists(_) => {
            Status::already_exists(e.to_string())
        }
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

/// The page size of a list call: the default for 0, at most [`MAX_PAGE_SIZE`].
fn page_size(requested: u32) -> usize {
    crate::datastore::paging::effective_page_size(requested as usize)
}

/// A list call's page token; empty means the first page.
fn page_token(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Each RPC: how the layer treats it (metric label, audit action, entry gauge), then its handler.
#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let rpc = Rpc::audited("CreateEntry", "entry.create").changing_entries();
        self.call(rpc, req, entries::create).await
    }

    async fn batch_create_entries(
        &self,
        req: Request<pb::BatchCreateEntriesRequest>,
    ) -> Result<Response<pb::BatchCreateEntriesResponse>, Status> {
        let rpc = Rpc::batch("BatchCreateEntries", "entry.batch_create", "entry.create")
            .changing_entries();
        self.call(rpc, req, entries::batch_create).await
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::GetEntryResponse>, Status> {
        self.call(Rpc::read("GetEntry"), req, entries::get).await
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.call(Rpc::read("ListEntries"), req, entries::list)
            .await
    }

    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        self.call(Rpc::read("CountEntries"), req, entries::count)
            .await
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
        let rpc = Rpc::audited("UpdateEntry", "entry.update");
        self.call(rpc, req, entries::update).await
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let rpc = Rpc::audited("DeleteEntry", "entry.delete").changing_entries();
        self.call(rpc, req, entries::delete).await
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.call(Rpc::read("ListAgents"), req, agents::list).await
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        self.call(Rpc::read("GetAgent"), req, agents::get).await
    }

    async fn evict_agent(
        &self,
        req: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let rpc = Rpc::audited("EvictAgent", "agent.evict");
        self.call(rpc, req, agents::evict).await
    }

    async fn ban_agent(
        &self,
        req: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        let rpc = Rpc::audited("BanAgent", "agent.ban");
        self.call(rpc, req, agents::ban).await
    }

    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        self.call(Rpc::read("GetBundle"), req, bundles::get).await
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        let rpc = Rpc::audited("SetFederatedBundle", "bundle.set");
        self.call(rpc, req, bundles::set_federated).await
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        let rpc = Rpc::read("ListFederatedBundles");
        self.call(rpc, req, bundles::list_federated).await
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        let rpc = Rpc::audited("DeleteFederatedBundle", "bundle.delete");
        self.call(rpc, req, bundles::delete_federated).await
    }

    async fn create_federation_relationship(
        &self,
        req: Request<pb::CreateFederationRelationshipRequest>,
    ) -> Result<Response<pb::CreateFederationRelationshipResponse>, Status> {
        let rpc = Rpc::audited("CreateFederationRelationship", "federation.create");
        self.call(rpc, req, federation::create).await
    }

    async fn update_federation_relationship(
        &self,
        req: Request<pb::UpdateFederationRelationshipRequest>,
    ) -> Result<Response<pb::UpdateFederationRelationshipResponse>, Status> {
        let rpc = Rpc::audited("UpdateFederationRelationship", "federation.update");
        self.call(rpc, req, federation::update).await
    }

    async fn get_federation_relationship(
        &self,
        req: Request<pb::GetFederationRelationshipRequest>,
    ) -> Result<Response<pb::GetFederationRelationshipResponse>, Status> {
        let rpc = Rpc::read("GetFederationRelationship");
        self.call(rpc, req, federation::get).await
    }

    async fn list_federation_relationships(
        &self,
        req: Request<pb::ListFederationRelationshipsRequest>,
    ) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
        let rpc = Rpc::read("ListFederationRelationships");
        self.call(rpc, req, federation::list).await
    }

    async fn delete_federation_relationship(
        &self,
        req: Request<pb::DeleteFederationRelationshipRequest>,
    ) -> Result<Response<pb::DeleteFederationRelationshipResponse>, Status> {
        let rpc = Rpc::audited("DeleteFederationRelationship", "federation.delete");
        self.call(rpc, req, federation::delete).await
    }

    async fn refresh_bundle(
        &self,
        req: Request<pb::RefreshBundleRequest>,
    ) -> Result<Response<pb::RefreshBundleResponse>, Status> {
        let rpc = Rpc::audited("RefreshBundle", "federation.refresh");
        self.call(rpc, req, federation::refresh).await
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let rpc = Rpc::audited("CreateJoinToken", "token.generate");
        self.call(rpc, req, join_tokens::create).await
    }

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.call(Rpc::read("Health"), req, health::health).await
    }

    async fn get_local_authority_state(
        &self,
        req: Request<pb::GetLocalAuthorityStateRequest>,
    ) -> Result<Response<pb::GetLocalAuthorityStateResponse>, Status> {
        let rpc = Rpc::read("GetLocalAuthorityState");
        self.call(rpc, req, localauthority::show).await
    }

    async fn prepare_local_authority(
        &self,
        req: Request<pb::PrepareLocalAuthorityRequest>,
    ) -> Result<Response<pb::PrepareLocalAuthorityResponse>, Status> {
        let rpc = Rpc::audited("PrepareLocalAuthority", "authority.prepare");
        self.call(rpc, req, localauthority::prepare).await
    }

    async fn activate_local_authority(
        &self,
        req: Request<pb::ActivateLocalAuthorityRequest>,
    ) -> Result<Response<pb::ActivateLocalAuthorityResponse>, Status> {
        let rpc = Rpc::audited("ActivateLocalAuthority", "authority.activate");
        self.call(rpc, req, localauthority::activate).await
    }

    async fn taint_local_authority(
        &self,
        req: Request<pb::TaintLocalAuthorityRequest>,
    ) -> Result<Response<pb::TaintLocalAuthorityResponse>, Status> {
        let rpc = Rpc::audited("TaintLocalAuthority", "authority.taint");
        self.call(rpc, req, localauthority::taint).await
    }

    async fn revoke_local_authority(
        &self,
        req: Request<pb::RevokeLocalAuthorityRequest>,
    ) -> Result<Response<pb::RevokeLocalAuthorityResponse>, Status> {
        let rpc = Rpc::audited("RevokeLocalAuthority", "authority.revoke");
        self.call(rpc, req, localauthority::revoke).await
    }
}
