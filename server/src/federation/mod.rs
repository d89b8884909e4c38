//! Federation with other trust domains (SPIFFE Trust Domain and Bundle specification).
//!
//! - `endpoint.rs` — the bundle endpoint this server serves: its own trust bundle as a SPIFFE
//!   bundle (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), over `https_spiffe` (the
//!   server's own SVID) or `https_web` (a certificate and key from files).
//! - `fetch.rs` — the client side: fetching another trust domain's bundle from its endpoint
//!   ([`FetchBundle`]), authenticated per [`EndpointProfile`].
//! - `relationship.rs` — federation relationships (trust domain, endpoint URL, profile) from the
//!   datastore and the config file.
//! - `refresher.rs` — keeps each relationship's bundle fresh at the other side's refresh hint and
//!   stores it as a federated bundle, which reaches agents like one set by hand.

pub mod endpoint;
pub mod fetch;
pub mod refresher;
pub mod relationship;

use std::time::Duration;

use async_trait::async_trait;
use sigil::bundle::Bundle;
use sigil::spiffe_id::{SpiffeId, TrustDomain};

/// How a bundle endpoint is authenticated (the spec's endpoint profiles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// Web PKI: the endpoint's certificate chains to the system's roots (or `SSL_CERT_FILE`) and
    /// names the URL's host.
    HttpsWeb,
    /// SPIFFE authentication: the endpoint presents an X509-SVID for `endpoint_spiffe_id`,
    /// verified against the bundle of that SVID's trust domain last fetched (or configured).
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: SpiffeId,
    },
}

/// A bundle fetched from an endpoint.
#[derive(Debug, Clone)]
pub struct FetchedBundle {
    /// The bundle, for the trust domain that was asked for.
    pub bundle: Bundle,
    /// `spiffe_sequence`, when the document has one.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, when the document has one.
    pub refresh_hint: Option<Duration>,
}

/// Fetches a foreign trust domain's bundle from its bundle endpoint.
#[async_trait]
pub trait FetchBundle: Send + Sync + 'static {
    /// Fetches the bundle of `trust_domain` from `url`, authenticated per `profile`.
    /// `trust` is the bundle used to authenticate an `https_spiffe` endpoint (the last one
    /// fetched or the configured initial bundle); `https_web` ignores it.
    async fn fetch(
        &self,
        url: &str,
        trust_domain: &TrustDomain,
        profile: &EndpointProfile,
        trust: Option<&Bundle>,
    ) -> Result<FetchedBundle, fetch::FetchError>;
}
