//! Prometheus metrics of the agent, exposed on `/metrics`.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The agent's metric handles; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    /// Registration entries held.
    pub entries: Gauge,
    /// X509-SVIDs cached.
    pub svids: Gauge,
    /// X509-SVIDs minted (signed by the server for keys made here).
    pub svids_minted: Counter,
    /// Failed signings of entries' X509-SVIDs (refused by the server, or the call failed), one
    /// per entry and attempt.
    pub svid_sign_failures: Counter,
    /// Entries whose X509-SVID signing is backing off after failures.
    pub svid_sign_backoff_entries: Gauge,
    /// Failed renewals of the agent's own SVID (other than a refusal of the agent).
    pub agent_svid_renewal_failures: Counter,
    /// Failed sync sessions (server unreachable, stream broken...).
    pub sync_failures: Counter,
    /// Sync messages applied.
    pub sync_messages: Counter,
    /// Expiry of the agent's own SVID, Unix seconds.
    pub agent_svid_expiry: Gauge,
    /// Earliest expiry of the trust bundle's roots, Unix seconds: when the CA (or an upstream
    /// root) stops being valid, every SVID stops verifying.
    pub bundle_expiry: Gauge,
    /// Open Workload API streams.
    pub workload_streams: Gauge,
    /// Workload API callers that could not be attested (gone, unreadable).
    pub workload_attest_failures: Counter,
    /// Open Workload API connections.
    pub workload_connections: Gauge,
    /// Workload API connections closed at accept: over the per-uid or the total limit.
    pub workload_connections_refused: Counter,
    /// Failed accepts on the Workload API socket (out of descriptors, memory).
    pub workload_accept_errors: Counter,
}

impl AgentMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("sigil_agent");
        let entries = Gauge::default();
        r.register(
            "registration_entries",
            "Registration entries held",
            entries.clone(),
        );
        let svids = Gauge::default();
        r.register("x509_svids_cached", "X509-SVIDs cached", svids.clone());
        let svids_minted = Counter::default();
        r.register(
            "x509_svids_minted",
            "X509-SVIDs minted",
            svids_minted.clone(),
        );
        let svid_sign_failures = Counter::default();
        r.register(
            "x509_svid_sign_failures",
            "Failed X509-SVID signings for entries (refused by sigil-server or the call failed), per entry and attempt",
            svid_sign_failures.clone(),
        );
        let svid_sign_backoff_entries = Gauge::default();
        r.register(
            "x509_svid_sign_backoff_entries",
            "Entries whose X509-SVID signing is backing off after failures",
            svid_sign_backoff_entries.clone(),
        );
        let agent_svid_renewal_failures = Counter::default();
        r.register(
            "agent_svid_renewal_failures",
            "Failed renewals of the agent SVID (other than a refusal of the agent)",
            agent_svid_renewal_failures.clone(),
        );
        let sync_failures = Counter::default();
        r.register(
            "sync_failures",
            "Failed sync sessions with sigil-server",
            sync_failures.clone(),
        );
        let sync_messages = Counter::default();
        r.register(
            "sync_messages",
            "Sync messages applied",
            sync_messages.clone(),
        );
        let agent_svid_expiry = Gauge::default();
        r.register(
            "agent_svid_expiry_seconds",
            "Expiry of the agent SVID (Unix seconds)",
            agent_svid_expiry.clone(),
        );
        let bundle_expiry = Gauge::default();
        r.register(
            "bundle_expiry_seconds",
            "Earliest expiry of the trust bundle's X.509 roots (Unix seconds)",
            bundle_expiry.clone(),
        );
        let workload_streams = Gauge::default();
        r.register(
            "workload_api_streams",
            "Open Workload API streams",
            workload_streams.clone(),
        );
        let workload_attest_failures = Counter::default();
        r.register(
            "workload_api_attestation_failures",
            "Workload API callers that could not be attested",
            workload_attest_failures.clone(),
        );
        let workload_connections = Gauge::default();
        r.register(
            "workload_api_connections",
            "Open Workload API connections",
            workload_connections.clone(),
        );
        let workload_connections_refused = Counter::default();
        r.register(
            "workload_api_connections_refused",
            "Workload API connections closed at accept: over the per-uid or the total limit",
            workload_connections_refused.clone(),
        );
        let workload_accept_errors = Counter::default();
        r.register(
            "workload_api_accept_errors",
            "Failed accepts on the Workload API socket (out of file descriptors or memory)",
            workload_accept_errors.clone(),
        );
        Self {
            registry: Arc::new(r),
            workload_streams,
            workload_attest_failures,
            workload_connections,
            workload_connections_refused,
            workload_accept_errors,
            entries,
            svids,
            svids_minted,
            svid_sign_failures,
            svid_sign_backoff_entries,
            agent_svid_renewal_failures,
            sync_failures,
            sync_messages,
            agent_svid_expiry,
            bundle_expiry,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}
