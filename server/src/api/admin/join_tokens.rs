//! Join tokens: single-use credentials for `join_token` node attestation.

use sigil::clock::now_unix;
use sigil::proto::admin as pb;
use tonic::Status;

use super::layer::Outcome;
use super::{ds_status, parse_id, AdminState, DEFAULT_JOIN_TOKEN_TTL};
use crate::datastore::JoinToken;

/// CreateJoinToken; audited as a short prefix of the token (it is a credential), or with no
/// object if none was created.
pub(super) async fn create(
    state: &AdminState,
    req: pb::CreateJoinTokenRequest,
) -> Outcome<pb::CreateJoinTokenResponse> {
    let mut object = String::new();
    let result = async {
        let td = &state.trust_domain;
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
            let id = parse_id("spiffe_id", &req.spiffe_id)?;
            if !id.is_member_of(td) || crate::api::is_reserved(&id) || id.path().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "invalid spiffe_id: {id} must be in trust domain {td} with a path outside {}",
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
        state
            .datastore
            .create_join_token(token.clone())
            .await
            .map_err(ds_status)?;
        // A UUID's first 8 characters: enough to tell tokens apart, useless to attest.
        object = format!("token {}…", token.token.get(..8).unwrap_or_default());
        Ok(pb::CreateJoinTokenResponse {
            expires_at: token.expires_at,
            spiffe_id: token.spiffe_id.map(|i| i.to_string()).unwrap_or_default(),
            token: token.token,
        })
    }
    .await;
    Outcome::new(result, object)
}
