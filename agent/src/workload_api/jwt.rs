//! JWT-SVIDs: minted by the server on demand, cached per (entry, audience set).
//!
//! A token is re-used until half its lifetime has passed (so a client never receives one about to
//! expire), which turns a workload asking on every request into one server call per
//! half-lifetime. The cache is bounded: expired tokens are swept when it fills, and past the
//! bound the oldest tokens are dropped.

use std::collections::HashMap;
use std::sync::Arc;

use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, TrustStore};
use sigil::TrustDomain;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::sync::client::{self, ClientError};
use crate::sync::servers::Servers;

/// Most tokens cached.
pub const MAX_CACHED_TOKENS: usize = 10_000;

/// Why the audiences of a FetchJWTSVID request are refused (InvalidArgument).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    /// No audience, or only empty ones.
    #[error("audience must be specified")]
    Missing,
    /// More distinct audiences than one token may carry.
    #[error("too many audiences: {count} distinct, at most {max} per JWT-SVID; fetch one token per smaller set of audiences")]
    TooMany {
        /// Distinct non-empty audiences requested.
        count: usize,
        /// [`sigil::jwt::MAX_AUDIENCES`].
        max: usize,
    },
    /// The audiences together are too long for a token.
    #[error("the audiences take {bytes} bytes together, at most {max} per JWT-SVID; use shorter audience names or fewer of them")]
    TooLong {
        /// Bytes of the distinct non-empty audiences.
        bytes: usize,
        /// [`sigil::jwt::MAX_AUDIENCE_BYTES`].
        max: usize,
    },
}

/// The audiences of a FetchJWTSVID request as the server is asked for them: empty ones and
/// repeats left out (the first of each kept, in order), at most [`sigil::jwt::MAX_AUDIENCES`]
/// taking at most [`sigil::jwt::MAX_AUDIENCE_BYTES`] together. Checked before the server is
/// asked, so a request over the bounds gets InvalidArgument saying which, not the server's
/// refusal as a failed mint.
pub fn requested_audiences(requested: &[String]) -> Result<Vec<String>, AudienceError> {
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&String> = requested
        .iter()
        .filter(|a| !a.is_empty() && seen.insert(a.as_str()))
        .collect();
    if distinct.is_empty() {
        return Err(AudienceError::Missing);
    }
    if distinct.len() > sigil::jwt::MAX_AUDIENCES {
        return Err(AudienceError::TooMany {
            count: distinct.len(),
            max: sigil::jwt::MAX_AUDIENCES,
        });
    }
    let bytes: usize = distinct.iter().map(|a| a.len()).sum();
    if bytes > sigil::jwt::MAX_AUDIENCE_BYTES {
        return Err(AudienceError::TooLong {
            bytes,
            max: sigil::jwt::MAX_AUDIENCE_BYTES,
        });
    }
    Ok(distinct.into_iter().cloned().collect())
}

/// (entry id, entry revision, sorted audiences).
type TokenKey = (String, i64, Vec<String>);

#[derive(Debug, Clone)]
struct CachedToken {
    token: String,
    /// The `kid` that signed it: a tainted one is not re-used.
    kid: String,
    issued_at: i64,
    expires_at: i64,
}

/// Server connection for minting, re-made when the agent SVID rotates (the server refuses a
/// connection authenticated with a superseded agent certificate).
pub struct NodeLink {
    servers: Arc<Servers>,
    trust_domain: TrustDomain,
    tls_identity: Arc<IdentityStore>,
    trust: Arc<TrustStore>,
    /// The client, with the serial and server address it was made for.
    client: Mutex<Option<(String, String, NodeClient<Channel>)>>,
}

impl NodeLink {
    /// A link to the current one of `servers` (the worker moves it on when a server fails),
    /// authenticating with the agent's rotating identity.
    pub fn new(
        servers: Arc<Servers>,
        trust_domain: TrustDomain,
        tls_identity: Arc<IdentityStore>,
        trust: Arc<TrustStore>,
    ) -> Self {
        Self {
            servers,
            trust_domain,
            tls_identity,
            trust,
            client: Mutex::new(None),
        }
    }

    /// A client whose connection presents the agent SVID with serial `serial`.
    async fn client(&self, serial: &str) -> Result<NodeClient<Channel>, ClientError> {
        let mut guard = self.client.lock().await;
        let server = self.servers.current();
        if let Some((s, a, c)) = guard.as_ref() {
            if s == serial && *a == server {
                return Ok(c.clone());
            }
        }
        let c = client::channel(
            &server,
            client::verify_server(self.trust.clone(), &self.trust_domain),
            Some(self.tls_identity.clone()),
        )?;
        *guard = Some((serial.to_string(), server, c.clone()));
        Ok(c)
    }
}

/// Cached JWT-SVIDs.
#[derive(Default)]
pub struct JwtSvidCache {
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

impl JwtSvidCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A JWT-SVID for revision `entry_revision` of entry `entry_id` and `audience`: cached if
    /// still in its first half-life and not signed by a key in `tainted_kids`, else minted by
    /// the server through `link`. `serial` is the agent SVID's current serial.
    pub async fn get(
        &self,
        link: &NodeLink,
        serial: &str,
        (entry_id, entry_revision): (&str, i64),
        audience: &[String],
        tainted_kids: &[String],
        now: i64,
    ) -> Result<String, ClientError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        // The revision is part of the key: a changed entry may carry another SPIFFE ID.
        let key = (entry_id.to_string(), entry_revision, aud);
        if let Some(t) = self.tokens.lock().await.get(&key) {
            if now < t.issued_at + (t.expires_at - t.issued_at) / 2
                && !tainted_kids.contains(&t.kid)
            {
                return Ok(t.token.clone());
            }
        }
        let mut c = link.client(serial).await?;
        let resp = c
            .mint_jwt_svid(pb::JwtSvidRequest {
                entry_id: entry_id.to_string(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(ClientError::rpc("JWT-SVID minting"))?
            .into_inner();
        let token = resp.token.clone();
        let mut tokens = self.tokens.lock().await;
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.retain(|_, t| t.expires_at > now);
            if tokens.len() >= MAX_CACHED_TOKENS {
                // Still full of live tokens: drop the half closest to expiry.
                let mut exp: Vec<i64> = tokens.values().map(|t| t.expires_at).collect();
                exp.sort_unstable();
                let cut = exp[exp.len() / 2];
                tokens.retain(|_, t| t.expires_at > cut);
            }
        }
        tokens.insert(
            key,
            CachedToken {
                kid: sigil::jose::Jws::parse(&resp.token, resp.token.len())
                    .ok()
                    .and_then(|j| j.kid().map(str::to_string))
                    .unwrap_or_default(),
                token: resp.token,
                issued_at: now,
                expires_at: resp.expires_at,
            },
        );
        Ok(token)
    }

    /// Drops every token of entries not in `live` (removed entries).
    pub async fn retain_entries(&self, live: &std::collections::HashSet<String>) {
        self.tokens
            .lock()
            .await
            .retain(|(entry, _, _), _| live.contains(entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn audiences_are_deduplicated_and_bounded() {
        // Empty ones and repeats left out, order kept.
        assert_eq!(
            requested_audiences(&strings(&["b", "", "a", "b", "a"])),
            Ok(strings(&["b", "a"]))
        );
        assert_eq!(requested_audiences(&[]), Err(AudienceError::Missing));
        assert_eq!(
            requested_audiences(&strings(&["", ""])),
            Err(AudienceError::Missing)
        );

        // As many as a token may carry; one more is refused, however it is counted.
        let max: Vec<String> = (0..sigil::jwt::MAX_AUDIENCES)
            .map(|i| format!("aud-{i}"))
            .collect();
        assert_eq!(requested_audiences(&max).as_ref(), Ok(&max));
        let many: Vec<String> = (0..10_000).map(|i| format!("aud-{i}")).collect();
        let err = requested_audiences(&many).unwrap_err();
        assert_eq!(
            err,
            AudienceError::TooMany {
                count: 10_000,
                max: sigil::jwt::MAX_AUDIENCES
            }
        );
        assert!(err.to_string().contains("at most 32"), "{err}");
        // 10,000 copies of one audience are one audience.
        assert_eq!(
            requested_audiences(&vec!["db".to_string(); 10_000]),
            Ok(strings(&["db"]))
        );

        // Few, but long.
        let long = vec![
            "x".repeat(sigil::jwt::MAX_AUDIENCE_BYTES / 2 + 1),
            "y".into(),
            "z".repeat(sigil::jwt::MAX_AUDIENCE_BYTES / 2),
        ];
        assert!(matches!(
            requested_audiences(&long),
            Err(AudienceError::TooLong { .. })
        ));
        let fits = vec!["x".repeat(sigil::jwt::MAX_AUDIENCE_BYTES)];
        assert_eq!(requested_audiences(&fits).as_ref(), Ok(&fits));
    }
}
