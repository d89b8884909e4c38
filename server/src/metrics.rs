//! Prometheus metrics of the server, exposed on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The server's metric handles; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    admin_requests: Family<Labels, Counter>,
    admin_latency: Family<Labels, Histogram>,
    bundle_endpoint_requests: Family<Labels, Counter>,
    /// X509-SVIDs signed (all callers).
    pub x509_svids_signed: Counter,
    /// Registration entries, refreshed on health checks and admin changes.
    pub entries: Gauge,
    /// NotAfter of the CA, Unix seconds.
    pub ca_expiry: Gauge,
    federation_refreshes: Family<Labels, Counter>,
    federation_last_success: Family<Labels, Gauge>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sigil_server");
        let admin_requests = Family::<Labels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests by method and gRPC status code",
            admin_requests.clone(),
        );
        let admin_latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 10))
        });
        registry.register(
            "admin_request_duration_seconds",
            "Admin API request latency by method",
            admin_latency.clone(),
        );
        let bundle_endpoint_requests = Family::<Labels, Counter>::default();
        registry.register(
            "federation_bundle_endpoint_requests",
            "Federation bundle endpoint requests by outcome (ok, not_found, method_not_allowed, \
             error, timeout, busy)",
            bundle_endpoint_requests.clone(),
        );
        let x509_svids_signed = Counter::default();
        registry.register(
            "x509_svids_signed",
            "X509-SVIDs signed",
            x509_svids_signed.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "registration_entries",
            "Registration entries stored",
            entries.clone(),
        );
        let ca_expiry = Gauge::default();
        registry.register(
            "ca_expiry_seconds",
            "NotAfter of the CA certificate that signs SVIDs (Unix seconds); SVIDs are capped at it",
            ca_expiry.clone(),
        );
        let federation_refreshes = Family::<Labels, Counter>::default();
        registry.register(
            "federation_bundle_refreshes",
            "Federated bundle fetches by foreign trust domain and outcome (changed, unchanged, error)",
            federation_refreshes.clone(),
        );
        let federation_last_success = Family::<Labels, Gauge>::default();
        registry.register(
            "federation_bundle_last_success_seconds",
            "Time of the last successful federated bundle fetch by foreign trust domain (Unix seconds)",
            federation_last_success.clone(),
        );
        let build = Gauge::<i64>::default();
        build.set(1);
        registry.register(
            "build_info",
            concat!("Build information; version ", env!("CARGO_PKG_VERSION")),
            build,
        );
        Self {
            registry: Arc::new(registry),
            admin_requests,
            admin_latency,
            bundle_endpoint_requests,
            x509_svids_signed,
            entries,
            ca_expiry,
            federation_refreshes,
            federation_last_success,
        }
    }

    /// The registry to serve on `/metrics`.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Records one admin request.
    pub fn observe_admin(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.admin_requests
            .get_or_create(&vec![
                ("method".into(), method.into()),
                ("code".into(), format!("{code:?}")),
            ])
            .inc();
        self.admin_latency
            .get_or_create(&vec![("method".into(), method.into())])
            .observe(elapsed.as_secs_f64());
    }

    /// Records one bundle endpoint request (or refused connection) by outcome.
    pub fn observe_bundle_endpoint(&self, outcome: &str) {
        self.bundle_endpoint_requests
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }
}

impl Metrics {
    /// Records one federated bundle fetch of `trust_domain`: `outcome` is `changed`,
    /// `unchanged` or `error`; `success_at` (Unix seconds) is set when it succeeded.
    pub fn observe_federation_refresh(
        &self,
        trust_domain: &str,
        outcome: &str,
        success_at: Option<i64>,
    ) {
        self.federation_refreshes
            .get_or_create(&vec![
                ("trust_domain".into(), trust_domain.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
        if let Some(t) = success_at {
            self.federation_last_success
                .get_or_create(&vec![("trust_domain".into(), trust_domain.into())])
                .set(t);
        }
    }

    /// Forgets the series of a trust domain no longer federated with.
    pub fn forget_federation(&self, trust_domain: &str) {
        for outcome in ["changed", "unchanged", "error"] {
            self.federation_refreshes.remove(&vec![
                ("trust_domain".into(), trust_domain.into()),
                ("outcome".into(), outcome.into()),
            ]);
        }
        self.federation_last_success
            .remove(&vec![("trust_domain".into(), trust_domain.into())]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
