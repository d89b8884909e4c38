//! Several servers on one shared datastore (PostgreSQL): what keeps them in step.
//!
//! - **One trust bundle for all.** Each server has a CA of its own, so the stored bundle of the
//!   trust domain holds every server's roots and JWT keys: at start a server adds its own to
//!   it ([`publish_own_bundle`]) with a read, union, compare-and-set loop on the bundle's
//!   sequence, so two servers starting together keep each other's. An agent SVID from any
//!   server's CA is then valid on every server, and agents and workloads trust them all. On a
//!   datastore only one server uses (SQLite) the CA's bundle simply replaces what is stored.
//! - **Every write reaches every agent.** [`follow`] reads the datastore's change feed and
//!   announces each change on this server's [`crate::sync::SyncEvents`] as a local admin write
//!   does, so the agents connected here learn of entries, bans, evictions and bundles written
//!   through another server. A bundle change is read back from the datastore first and
//!   installed as the server's bundle (admin API, bundle publisher) and as the node API's trust
//!   store (which accepts agent SVIDs from every server's root). A [`Change::Resync`] (the feed
//!   was down) announces everything.

use std::sync::Arc;
use std::time::Duration;

use sigil::bundle::{Bundle, BundleError};
use sigil::tls::TrustStore;
use tokio::sync::watch;

use crate::api::admin::AdminState;
use crate::datastore::{BundleSwap, Change, ChangeFeed, Datastore, DatastoreError, StoredBundle};

/// How often a swap lost to another server is tried again before giving up.
const MAX_SWAP_ATTEMPTS: usize = 50;
/// Delay before reading the bundle again after a failed read.
const BUNDLE_RETRY: Duration = Duration::from_secs(1);

/// Why the server's bundle could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// The stored bundle cannot be read as a bundle.
    #[error("the stored trust bundle is unusable: {0}")]
    Bundle(#[from] BundleError),
    /// Other servers kept changing the bundle.
    #[error(
        "the stored trust bundle kept changing under {MAX_SWAP_ATTEMPTS} attempts to add this \
         server's roots; start the server again"
    )]
    Contended,
}

/// A stored bundle as the server shows it.
pub fn stored_to_bundle(b: &StoredBundle) -> Result<Bundle, BundleError> {
    Ok(Bundle {
        x509_authorities: b.x509_roots.clone(),
        jwt_authorities: Bundle::jwt_authorities_from_json(&b.jwt_keys_json)?,
        sequence_number: b.sequence,
        ..Bundle::new(b.trust_domain.clone())
    })
}

/// `stored` with what of `own` it lacks added (roots by DER, JWT keys by key ID), in order:
/// what was stored first.
/// `stored` with this server's `own` authorities added and those of `retired` (authorities it
/// published before and no longer has: expired or revoked) removed; other servers' stay.
fn union(stored: &Bundle, own: &Bundle, retired: &Bundle) -> Bundle {
    let mut merged = stored.clone();
    merged
        .x509_authorities
        .retain(|r| own.x509_authorities.contains(r) || !retired.x509_authorities.contains(r));
    merged
        .jwt_authorities
        .retain(|k| own.jwt_authority(&k.kid).is_some() || retired.jwt_authority(&k.kid).is_none());
    for root in &own.x509_authorities {
        if !merged.x509_authorities.contains(root) {
            merged.x509_authorities.push(root.clone());
        }
    }
    for key in &own.jwt_authorities {
        if merged.jwt_authority(&key.kid).is_none() {
            merged.jwt_authorities.push(key.clone());
        }
    }
    merged
}

fn to_stored(b: &Bundle) -> StoredBundle {
    StoredBundle {
        trust_domain: b.trust_domain.clone(),
        x509_roots: b.x509_authorities.clone(),
        jwt_keys_json: b.jwt_keys_json(),
        sequence: 0,
    }
}

/// Stores the CA's bundle `own` and returns the trust domain's bundle as now stored (its
/// sequence set). `shared`: other servers use this datastore, so `own` is added to what they
/// stored, and what this server published before (`previous`) but no longer has is taken out;
/// otherwise `own` replaces what is stored.
pub async fn publish_own_bundle(
    ds: &dyn Datastore,
    own: &Bundle,
    previous: Option<&Bundle>,
    shared: bool,
) -> Result<Bundle, ClusterError> {
    let empty = Bundle {
        trust_domain: own.trust_domain.clone(),
        x509_authorities: Vec::new(),
        jwt_authorities: Vec::new(),
        sequence_number: 0,
        refresh_hint: None,
    };
    let retired = previous.unwrap_or(&empty);
    if !shared {
        return Ok(stored_to_bundle(&ds.set_bundle(to_stored(own)).await?)?);
    }
    for _ in 0..MAX_SWAP_ATTEMPTS {
        let stored = ds.get_bundle(&own.trust_domain).await?;
        let (expected, merged) = match &stored {
            Some(s) => (s.sequence, union(&stored_to_bundle(s)?, own, retired)),
            None => (0, own.clone()),
        };
        match ds
            .compare_and_set_bundle(to_stored(&merged), expected)
            .await?
        {
            BundleSwap::Stored(s) => {
                let bundle = stored_to_bundle(&s)?;
                tracing::info!(
                    sequence = s.sequence,
                    roots = bundle.x509_authorities.len(),
                    jwt_keys = bundle.jwt_authorities.len(),
                    "this server's roots are in the shared trust bundle"
                );
                return Ok(bundle);
            }
            BundleSwap::Changed(_) => {
                tracing::debug!("the trust bundle changed meanwhile; merging again");
                tokio::task::yield_now().await;
            }
        }
    }
    Err(ClusterError::Contended)
}

/// The roots the node API accepts agent SVIDs from: the stored bundle's, and this server's own
/// (so its agents are never locked out by a bundle another server wrote without them).
pub fn trusted_roots(bundle: &Bundle, own_roots: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut roots = bundle.x509_authorities.clone();
    for r in own_roots {
        if !roots.contains(r) {
            roots.push(r.clone());
        }
    }
    roots
}

/// Forwards `feed` to `state.events` until `shutdown` (see the module docs). `trust` is the
/// node API's trust store, `own_roots` this server's CA roots.
pub async fn follow(
    mut feed: ChangeFeed,
    state: Arc<AdminState>,
    trust: Arc<TrustStore>,
    own_roots: Vec<Vec<u8>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // A bundle read that failed is retried until it succeeds.
    let mut bundle_due = false;
    loop {
        let change = tokio::select! {
            change = feed.next() => change,
            _ = tokio::time::sleep(BUNDLE_RETRY), if bundle_due => Some(Change::Bundle(state.trust_domain.name().to_string())),
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(change) = change else {
            tracing::error!("the datastore's change feed stopped; writes through other servers reach this server's agents only at their next reconcile");
            return;
        };
        tracing::debug!(change = ?change, "datastore change");
        match change {
            Change::Entries | Change::Agent(_) => state.events.entries_changed(),
            Change::JoinTokens => {}
            Change::Federation => state.federation.relationships_changed(),
            Change::Federated => state.events.federated_bundles_changed(),
            Change::Bundle(td) => {
                if td == state.trust_domain.name() {
                    bundle_due = !refresh_bundle(&state, &trust, &own_roots).await;
                }
            }
            Change::Resync => {
                state.events.entries_changed();
                state.events.federated_bundles_changed();
                state.federation.relationships_changed();
                bundle_due = !refresh_bundle(&state, &trust, &own_roots).await;
            }
        }
    }
}

/// Reads the stored bundle and, if it is newer than the server's, installs it: trust store,
/// the server's bundle, then the announcement. False if it could not be read (retry).
async fn refresh_bundle(state: &AdminState, trust: &TrustStore, own_roots: &[Vec<u8>]) -> bool {
    let stored = match state.datastore.get_bundle(&state.trust_domain).await {
        Ok(Some(s)) => s,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(error = %e, "reading the trust bundle another server changed; retrying");
            return false;
        }
    };
    if stored.sequence <= state.bundle.read().await.sequence_number {
        return true;
    }
    let bundle = match stored_to_bundle(&stored) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, sequence = stored.sequence, "the stored trust bundle is unusable; keeping the current one");
            return true;
        }
    };
    if let Err(e) = trust.set(&trusted_roots(&bundle, own_roots)) {
        tracing::error!(error = %e, sequence = stored.sequence, "the stored trust bundle has unusable roots; keeping the current ones");
        return true;
    }
    let roots = bundle.x509_authorities.len();
    *state.bundle.write().await = bundle;
    state.events.bundle_changed(stored.sequence);
    tracing::info!(
        sequence = stored.sequence,
        roots,
        "trust bundle changed by another server; installed"
    );
    true
}

#[cfg(test)]
mod tests;
