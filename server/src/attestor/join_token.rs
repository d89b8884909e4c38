//! `join_token` node attestation: the payload is a single-use token made by
//! `sigil-server token generate`.
//!
//! The token is consumed atomically (a second use is refused even if two agents race), and the
//! agent ID is `spiffe://<td>/sigil/agent/join_token/<token>` (SPIRE's convention): once used,
//! the token is no longer a credential, only a unique name. Join tokens yield no node selectors.
//! A token made with `--spiffe-id ID` asks for the node alias `ID` (see [`AttestedNode`]).
//!
//! Tokens are never logged whole: refused attempts log an 8-character prefix at most.

use std::sync::Arc;

use async_trait::async_trait;
use sigil::{SelectorSet, TrustDomain};

use super::{AttestError, AttestedNode, Challenger, NodeAttestor, AGENT_PATH_PREFIX};
use crate::datastore::{Datastore, DatastoreError};

/// The attestation type (and agent ID path segment).
pub const TYPE: &str = "join_token";
/// Longest token accepted (the server makes 36-character UUIDs).
pub const MAX_TOKEN_LEN: usize = 256;

/// The message for an unknown, malformed or already used token (one message for all three, so
/// a caller learns nothing about which tokens exist).
pub const INVALID_OR_USED: &str =
    "join token is invalid or already used; generate a new one with `sigil-server token generate`";
/// The message for an expired token.
pub const EXPIRED: &str =
    "join token has expired; generate a new one with `sigil-server token generate [--ttl D]`";

/// Attests agents by join token.
pub struct JoinTokenAttestor {
    datastore: Arc<dyn Datastore>,
    trust_domain: TrustDomain,
}

impl JoinTokenAttestor {
    /// An attestor consuming tokens from `datastore`, naming agents in `trust_domain`.
    pub fn new(datastore: Arc<dyn Datastore>, trust_domain: TrustDomain) -> Self {
        Self {
            datastore,
            trust_domain,
        }
    }
}

/// At most the first 8 characters of a token, for logs.
pub fn token_prefix(token: &str) -> &str {
    let end = token.char_indices().nth(8).map_or(token.len(), |(i, _)| i);
    &token[..end]
}

use sigil::clock::now_unix;

#[async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn attestation_type(&self) -> &'static str {
        TYPE
    }

    async fn attest(
        &self,
        payload: &[u8],
        _challenger: &mut dyn Challenger,
    ) -> Result<AttestedNode, AttestError> {
        let token = std::str::from_utf8(payload)
            .map_err(|_| AttestError::InvalidPayload("the join token is not UTF-8".into()))?;
        if token.is_empty() {
            return Err(AttestError::InvalidPayload(
                "the join token is empty; pass the token printed by `sigil-server token generate`"
                    .into(),
            ));
        }
        // Anything the server could not have made is refused without touching the datastore;
        // the agent ID must be a valid SPIFFE ID too.
        let well_formed = token.len() <= MAX_TOKEN_LEN
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        let agent_id = well_formed
            .then(|| {
                self.trust_domain
                    .id(&format!("{AGENT_PATH_PREFIX}{TYPE}/{token}"))
                    .ok()
            })
            .flatten();
        let Some(agent_id) = agent_id else {
            tracing::info!(
                token_prefix = token_prefix(token),
                "malformed join token refused"
            );
            return Err(AttestError::Denied(INVALID_OR_USED.into()));
        };
        let stored = match self.datastore.consume_join_token(token, now_unix()).await {
            Ok(t) => t,
            Err(DatastoreError::NotFound(_)) => {
                tracing::info!(
                    token_prefix = token_prefix(token),
                    "unknown or already used join token refused"
                );
                return Err(AttestError::Denied(INVALID_OR_USED.into()));
            }
            Err(DatastoreError::Expired) => {
                tracing::info!(
                    token_prefix = token_prefix(token),
                    "expired join token refused"
                );
                return Err(AttestError::Denied(EXPIRED.into()));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(AttestedNode {
            agent_id,
            selectors: SelectorSet::new(),
            node_alias: stored.spiffe_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::sqlite::SqliteDatastore;
    use crate::datastore::JoinToken;
    use sigil::SpiffeId;

    struct NoChallenges;

    #[async_trait]
    impl Challenger for NoChallenges {
        async fn challenge(&mut self, _c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
            Err(AttestError::Challenge(
                "join_token sends no challenges".into(),
            ))
        }
    }

    async fn setup() -> (tempfile::TempDir, Arc<dyn Datastore>, JoinTokenAttestor) {
        let dir = tempfile::tempdir().unwrap();
        let ds: Arc<dyn Datastore> = Arc::new(
            SqliteDatastore::open(&dir.path().join("ds.sqlite3"))
                .await
                .unwrap(),
        );
        let td = TrustDomain::new("example.org").unwrap();
        let attestor = JoinTokenAttestor::new(ds.clone(), td);
        (dir, ds, attestor)
    }

    async fn add(ds: &Arc<dyn Datastore>, token: &str, ttl: i64, alias: Option<&str>) {
        ds.create_join_token(JoinToken {
            token: token.into(),
            expires_at: now_unix() + ttl,
            spiffe_id: alias.map(|a| SpiffeId::parse(a).unwrap()),
        })
        .await
        .unwrap();
    }

    fn denied(r: Result<AttestedNode, AttestError>) -> String {
        match r {
            Err(AttestError::Denied(m)) => m,
            other => panic!("expected Denied, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn token_is_single_use_and_names_the_agent() {
        let (_dir, ds, a) = setup().await;
        let token = "5b0f3c1e-2a47-4b7e-9a0d-1c2b3d4e5f60";
        add(&ds, token, 600, Some("spiffe://example.org/node/n1")).await;
        let node = a.attest(token.as_bytes(), &mut NoChallenges).await.unwrap();
        assert_eq!(
            node.agent_id.to_string(),
            format!("spiffe://example.org/sigil/agent/join_token/{token}")
        );
        assert!(node.selectors.is_empty());
        assert_eq!(
            node.node_alias.map(|i| i.to_string()).as_deref(),
            Some("spiffe://example.org/node/n1")
        );
        let again = denied(a.attest(token.as_bytes(), &mut NoChallenges).await);
        assert!(
            again.starts_with("join token is invalid or already used"),
            "{again}"
        );
    }

    #[tokio::test]
    async fn expired_unknown_and_malformed_tokens_are_refused() {
        let (_dir, ds, a) = setup().await;
        add(&ds, "old-token", -5, None).await;
        let m = denied(a.attest(b"old-token", &mut NoChallenges).await);
        assert!(m.starts_with("join token has expired"), "{m}");
        // Expired tokens are gone afterwards.
        let m = denied(a.attest(b"old-token", &mut NoChallenges).await);
        assert!(
            m.starts_with("join token is invalid or already used"),
            "{m}"
        );
        for bad in [
            &b"never-issued"[..],
            b"..",
            b"a/b",
            b"has space",
            &[b'x'; 300],
        ] {
            let m = denied(a.attest(bad, &mut NoChallenges).await);
            assert!(
                m.starts_with("join token is invalid or already used"),
                "{m}"
            );
        }
        assert!(matches!(
            a.attest(b"", &mut NoChallenges).await,
            Err(AttestError::InvalidPayload(_))
        ));
        assert!(matches!(
            a.attest(&[0xff, 0xfe], &mut NoChallenges).await,
            Err(AttestError::InvalidPayload(_))
        ));
    }

    #[test]
    fn prefix_is_short_and_char_safe() {
        assert_eq!(token_prefix("5b0f3c1e-2a47"), "5b0f3c1e");
        assert_eq!(token_prefix("abc"), "abc");
        assert_eq!(token_prefix("ééééééééé"), "éééééééé");
    }
}
