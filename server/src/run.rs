//! `sigil-server run`: wires the datastore, CA and APIs together and serves until a signal.
//!
//! Start-up order: datastore (migrations) → CA (load or create keys) → publish the bundle to the
//! datastore (merged with other servers' roots on a shared one, `cluster`) → admin socket → the bundle publisher (a Kubernetes ConfigMap, when configured; in
//! the background, retrying) → the server's own SVID and the node API (mTLS on `bind_address`) →
//! the federation bundle endpoint (when configured: the admin state's bundle, read at each
//! request, over the server SVID or a certificate from files) → health endpoint → one "ready"
//! log line. SIGTERM/SIGINT stop new connections, let in-flight
//! requests finish, remove the socket (if it is still ours), and exit 0. SIGHUP is logged and
//! changes nothing.
//!
//! One server per data directory: it holds an exclusive lock on `<data_dir>/sigil-server.lock`
//! for its whole life, and a second one refuses to start (before touching the admin socket).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use sigil::proto::admin::admin_server::AdminServer;
use sigil::proto::node::node_server::NodeServer;
use tokio::sync::{watch, RwLock};

use crate::api::admin::{AdminService, AdminState};
use crate::api::node::{NodeService, NodeState};
use crate::attestor::join_token::JoinTokenAttestor;
use crate::attestor::k8s_psat::K8sPsatAttestor;
use crate::attestor::x509pop::X509PopAttestor;
use crate::attestor::Attestors;
use crate::ca::rotation::PublishError;
use crate::ca::Ca;
use crate::config::{DatastoreConfig, ServerConfig};
use crate::datastore::postgres::PostgresDatastore;
use crate::datastore::sqlite::{Expect, SqliteDatastore};
use crate::datastore::{Datastore, EntryFilter};
use crate::identity::ServerIdentity;
use crate::metrics::Metrics;

/// The lock file in the data directory that keeps a second server off it.
pub const LOCK_FILE: &str = "sigil-server.lock";

/// How long a shutdown waits for in-flight node API requests.
const NODE_API_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Readiness as the health endpoint sees it.
struct Readiness {
    /// Its `started` flag is the one start-up readiness both `/ready` and `healthcheck` read.
    admin: Arc<AdminState>,
    datastore: Arc<dyn Datastore>,
    /// The CA: an expired active authority issues nothing.
    ca: Arc<Ca>,
}

#[async_trait]
impl sigil::health::Probe for Readiness {
    async fn ready(&self) -> Result<(), sigil::health::NotReady> {
        if !self.admin.started.load(Ordering::SeqCst) {
            return Err(NotReady::StartingUp.into());
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        crate::ca::expiry::check_not_expired(self.ca.ca_not_after(), now)
            .map_err(NotReady::from)?;
        self.datastore
            .count_agents()
            .await
            .map(|_| ())
            .map_err(|e| NotReady::Datastore(e).into())
    }
}

/// Why the server is not ready.
#[derive(Debug, thiserror::Error)]
enum NotReady {
    #[error("starting up")]
    StartingUp,
    #[error(transparent)]
    CaExpired(#[from] crate::ca::expiry::CaExpired),
    #[error("datastore: {0}")]
    Datastore(#[source] crate::datastore::DatastoreError),
}

/// Publishes the CA's changes: the bundle to the datastore (and through [`SyncEvents`] to the
/// agents' sync streams), the admin API's bundle, the node API's trust store; the server SVID.
///
/// [`SyncEvents`]: crate::sync::SyncEvents
struct CaPublisher {
    datastore: Arc<dyn Datastore>,
    state: Arc<AdminState>,
    trust: Arc<sigil::tls::TrustStore>,
    identity: Arc<ServerIdentity>,
    metrics: Metrics,
    /// Other servers share the datastore (PostgreSQL): the bundle is merged, not replaced.
    shared: bool,
    /// This server's own bundle as last published: what it retires next time leaves the
    /// shared bundle.
    published: tokio::sync::Mutex<sigil::bundle::Bundle>,
}

#[async_trait]
impl crate::ca::rotation::Publish for CaPublisher {
    async fn bundle(&self, signer: Arc<crate::ca::Signer>) -> Result<(), PublishError> {
        let bundle = signer.bundle();
        let (tainted_x509, tainted_jwt) = signer.tainted();
        // Sent with the bundle: agents re-mint what a tainted authority signed.
        self.state.events.set_taint(crate::sync::Taint {
            x509: tainted_x509.to_vec(),
            jwt: tainted_jwt.to_vec(),
        });
        // On a shared datastore the own roots are added to the other servers' (compare-and-set
        // on the sequence); alone, they replace what is stored.
        let own_roots = bundle.x509_authorities.clone();
        let previous = self.published.lock().await.clone();
        let stored = crate::cluster::publish_own_bundle(
            self.datastore.as_ref(),
            &bundle,
            Some(&previous),
            self.shared,
        )
        .await
        .map_err(|e| PublishError {
            what: "storing the trust bundle",
            source: Box::new(e),
        })?;
        // Agents' SVIDs from every published authority (every server's) verify on the node API.
        self.trust
            .set(&crate::cluster::trusted_roots(&stored, &own_roots))
            .map_err(|e| PublishError {
                what: "updating the node API's trust bundle",
                source: Box::new(e),
            })?;
        *self.published.lock().await = bundle;
        let (roots, sequence) = (stored.x509_authorities.len(), stored.sequence_number);
        *self.state.bundle.write().await = stored;
        self.state
            .ca_not_after
            .store(signer.ca_not_after(), Ordering::SeqCst);
        self.metrics.ca_expiry.set(signer.ca_not_after());
        self.state.events.bundle_changed(sequence);
        tracing::info!(
            sequence,
            roots,
            tainted_x509 = tainted_x509.len(),
            tainted_jwt = tainted_jwt.len(),
            "trust bundle published"
        );
        Ok(())
    }

    async fn x509_activated(&self, signer: Arc<crate::ca::Signer>) -> Result<(), PublishError> {
        self.state
            .ca_not_after
            .store(signer.ca_not_after(), Ordering::SeqCst);
        self.metrics.ca_expiry.set(signer.ca_not_after());
        self.identity.rotate().map_err(|e| PublishError {
            what: "re-issuing the server SVID",
            source: Box::new(e),
        })
    }
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    tracing::info!(
        trust_domain = %cfg.trust_domain,
        data_dir = %cfg.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "sigil-server starting"
    );
    sigil::signals::keep_running_on_sighup("sigil-server").context("installing SIGHUP handler")?;
    sigil::limits::raise_open_files_limit_logged();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    restrict_dir(&cfg.data_dir)?;
    let _lock = sigil::fs::lock_dir(&cfg.data_dir, LOCK_FILE, "sigil-server")?;

    let datastore: Arc<dyn Datastore> = match &cfg.datastore {
        DatastoreConfig::Sqlite { path } => {
            // The datastore is opened before the CA: CA keys already on disk mean this server
            // has run here before, so its database must hold data (an empty file means it was
            // lost).
            let expect = if ca_keys_exist(&cfg.ca.dir) {
                Expect::Data
            } else {
                Expect::Any
            };
            Arc::new(
                SqliteDatastore::open_with(path, expect)
                    .await
                    .with_context(|| format!("opening datastore {}", path.display()))?,
            )
        }
        // Its errors name the server (without the password) and what to check.
        DatastoreConfig::Postgres(options) => Arc::new(
            PostgresDatastore::open_with(options.as_ref().clone())
                .await
                .context("opening the PostgreSQL datastore")?,
        ),
    };
    let ca = Arc::new(Ca::load_or_create(&cfg.ca).context("loading the CA")?);

    // Publish the CA's bundle (on a shared datastore: added to the other servers' roots); the
    // datastore assigns the sequence number.
    let shared = matches!(cfg.datastore, DatastoreConfig::Postgres(_));
    let own_bundle = ca.bundle();
    let bundle = crate::cluster::publish_own_bundle(datastore.as_ref(), &own_bundle, None, shared)
        .await
        .context("storing the trust bundle")?;
    let bundle_sequence = bundle.sequence_number;
    // Agent SVIDs verify against every server's root (the stored bundle) and our own.
    let trusted = crate::cluster::trusted_roots(&bundle, &ca.x509_authorities());

    let metrics = Metrics::new();
    metrics.ca_expiry.set(ca.ca_not_after());
    if let Ok(n) = datastore.count_entries(&EntryFilter::default()).await {
        metrics.entries.set(n as i64);
    }
    // One change hub for the admin API (publisher) and the agents' sync streams.
    let events = crate::sync::SyncEvents::new();
    events.bundle_changed(bundle_sequence);
    let federation = Arc::new(crate::federation::refresher::Federation::new(
        cfg.trust_domain.clone(),
        &cfg.federates_with,
    ));
    let state = Arc::new(AdminState {
        federation: federation.clone(),
        trust_domain: cfg.trust_domain.clone(),
        datastore: datastore.clone(),
        bundle: RwLock::new(bundle),
        metrics: metrics.clone(),
        events: events.clone(),
        ca_not_after: AtomicI64::new(ca.ca_not_after()),
        ca: Some(ca.clone()),
        started: AtomicBool::new(false),
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let wait_shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // Admin API on the Unix socket: directory 0700, socket 0600 (owner only).
    let (listener, admin_socket_file) = sigil::uds::bind(&cfg.admin_socket, 0o700, 0o600)
        .await
        .with_context(|| format!("binding admin socket {}", cfg.admin_socket.display()))?;
    let admin = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(state.clone())))
        .serve_with_incoming_shutdown(
            sigil::h2_authority::incoming(listener),
            wait_shutdown(shutdown_rx.clone()),
        );
    let admin_task = tokio::spawn(admin);

    // The trust bundle into a ConfigMap for the agents: now, and again on every bundle change
    // (announced on `events` after `state.bundle` is updated). Never fatal: it retries.
    let publisher_task = cfg.bundle_publisher.k8s_configmap.clone().map(|c| {
        let publisher = crate::bundle_publisher::ConfigMapPublisher::new(c);
        tokio::spawn(publisher.run(state.clone(), events.subscribe(), shutdown_rx.clone()))
    });

    // Node API: mTLS with the server's own SVID; agents' SVIDs verify against the CA's roots.
    let server_identity = Arc::new(
        ServerIdentity::issue(ca.clone(), metrics.clone()).context("issuing the server SVID")?,
    );
    let trust = Arc::new(
        sigil::tls::TrustStore::new(&trusted)
            .context("loading the trust bundle for the node API")?,
    );
    let tls = Arc::new(
        sigil::tls::server_config(server_identity.store(), trust.clone())
            .context("building the node API TLS configuration")?,
    );
    // Writes through other servers sharing the datastore reach our agents as our own do.
    let feed_task = datastore.change_feed().map(|feed| {
        tokio::spawn(crate::cluster::follow(
            feed,
            state.clone(),
            trust.clone(),
            ca.x509_authorities().to_vec(),
            shutdown_rx.clone(),
        ))
    });
    let node_listener = tokio::net::TcpListener::bind(cfg.bind_address)
        .await
        .with_context(|| format!("binding node API address {}", cfg.bind_address))?;
    let node_address = node_listener.local_addr()?;
    let mut attestors = Attestors::new().with(Arc::new(JoinTokenAttestor::new(
        datastore.clone(),
        cfg.trust_domain.clone(),
    )));
    if let Some(path) = &cfg.x509pop_ca_bundle {
        attestors = attestors.with(Arc::new(X509PopAttestor::from_pem_file(
            cfg.trust_domain.clone(),
            path,
        )?));
        tracing::info!(ca_bundle = %path.display(), "x509pop node attestation enabled");
    }
    if !cfg.k8s_psat.is_empty() {
        let k8s = K8sPsatAttestor::new(cfg.trust_domain.clone(), &cfg.k8s_psat)
            .context("configuring k8s_psat node attestation")?;
        tracing::info!(clusters = %k8s.cluster_names().join(", "), "k8s_psat node attestation enabled");
        attestors = attestors.with(Arc::new(k8s));
    }
    let node_state = Arc::new(NodeState {
        trust_domain: cfg.trust_domain.clone(),
        datastore: datastore.clone(),
        ca: ca.clone(),
        attestors,
        metrics: metrics.clone(),
        events: events.clone(),
        reconcile_every: crate::sync::DEFAULT_RECONCILE_EVERY,
        shutdown: shutdown_rx.clone(),
    });
    let node = tonic::transport::Server::builder()
        // Notice dead agents on long-lived sync streams.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(NodeServer::new(NodeService::new(node_state)))
        .serve_with_incoming_shutdown(
            sigil::tls::incoming(node_listener, tls),
            wait_shutdown(shutdown_rx.clone()),
        );
    let node_task = tokio::spawn(node);
    tracing::info!(address = %node_address, spiffe_id = %server_identity.spiffe_id(), "node API listening (mTLS)");
    // The bundle other trust domains fetch: `state.bundle`, which the CA's rotation and the
    // change-feed follower keep current, read at each request.
    let bundle_endpoint_task = match &cfg.bundle_endpoint {
        Some(c) => {
            let endpoint = crate::federation::endpoint::BundleEndpoint::from_config(
                c,
                server_identity.store(),
                state.clone(),
                metrics.clone(),
            )
            .context("setting up the federation bundle endpoint")?;
            let l = tokio::net::TcpListener::bind(c.address)
                .await
                .with_context(|| {
                    format!(
                        "binding the federation bundle endpoint address {} \
                         ([federation.bundle_endpoint] address)",
                        c.address
                    )
                })?;
            tracing::info!(
                address = %l.local_addr()?,
                profile = c.profile.name(),
                refresh_hint_secs = c.refresh_hint.as_secs(),
                "federation bundle endpoint listening (GET /)"
            );
            Some(tokio::spawn(endpoint.serve(l, shutdown_rx.clone())))
        }
        None => None,
    };
    let rotation_task = tokio::spawn(server_identity.clone().run_rotation(shutdown_rx.clone()));
    // The CA's schedule: every bundle change to the datastore (and on to the agents), the admin
    // API's bundle, and the node API's trust; the server SVID from each new active authority.
    let ca_rotation_task = tokio::spawn(crate::ca::rotation::run(
        ca.clone(),
        sigil::clock::Clock::system(),
        Arc::new(CaPublisher {
            datastore: datastore.clone(),
            state: state.clone(),
            trust: trust.clone(),
            identity: server_identity.clone(),
            metrics: metrics.clone(),
            shared,
            published: tokio::sync::Mutex::new(own_bundle),
        }),
        shutdown_rx.clone(),
    ));

    // Federation: the config file's initial bundles stored, then every relationship's bundle
    // kept fresh from its endpoint (relationship changes arrive through `federation`).
    let refresher = crate::federation::refresher::Refresher {
        federation,
        datastore: datastore.clone(),
        fetcher: bundle_fetcher(),
        events: events.clone(),
        metrics: metrics.clone(),
        clock: sigil::clock::Clock::system(),
    };
    refresher
        .store_initial_bundles(&cfg.federates_with)
        .await
        .context("storing the initial bundles of [federation.federates_with]")?;
    let refresher_task = tokio::spawn(refresher.run(shutdown_rx.clone()));

    let readiness = Arc::new(Readiness {
        admin: state.clone(),
        datastore: datastore.clone(),
        ca: ca.clone(),
    });
    // Should rotation fail, the active authority's expiry must be loud: warnings from 1/6 of
    // its life left.
    let ca_monitor = tokio::spawn(crate::ca::expiry::monitor(ca.clone(), shutdown_rx.clone()));
    let health_task = match cfg.health_address {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding health address {addr}"))?;
            let actual = l.local_addr()?;
            tracing::info!(address = %actual, "health endpoint listening (/live, /ready, /metrics)");
            Some(tokio::spawn(sigil::health::serve(
                l,
                readiness.clone(),
                metrics.registry(),
                wait_shutdown(shutdown_rx.clone()),
            )))
        }
        None => None,
    };

    // Prune expired join tokens every minute, and the entry history past its retention
    // (`ENTRY_HISTORY_RETENTION`) every hour.
    let pruner = {
        let ds = datastore.clone();
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            let mut ticks: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = time::OffsetDateTime::now_utc().unix_timestamp();
                        match ds.prune_join_tokens(now).await {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(pruned = n, "expired join tokens removed"),
                            Err(e) => tracing::warn!(error = %e, "pruning join tokens failed"),
                        }
                        if ticks % 60 == 0 {
                            let retention = crate::datastore::ENTRY_HISTORY_RETENTION.as_secs();
                            let before = now.saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
                            match ds.prune_entry_history(before).await {
                                Ok(0) => {}
                                Ok(n) => tracing::debug!(pruned = n, "entry tombstones and moves past their retention removed"),
                                Err(e) => tracing::warn!(error = %e, "pruning the entry history failed"),
                            }
                        }
                        ticks = ticks.wrapping_add(1);
                    }
                    _ = async { let _ = rx.wait_for(|s| *s).await; } => return,
                }
            }
        })
    };

    // Handlers in place before anyone can see the server ready, so a SIGTERM sent as soon as
    // it answers stops it gracefully rather than killing it.
    let signal = shutdown_signal()?;
    state.started.store(true, Ordering::SeqCst);
    tracing::info!(
        trust_domain = %cfg.trust_domain,
        admin_socket = %cfg.admin_socket.display(),
        node_address = %node_address,
        health_address = %cfg
            .health_address
            .map_or_else(|| "disabled".to_string(), |a| a.to_string()),
        bundle_sequence,
        "sigil-server ready"
    );

    let signal = signal.await;
    tracing::info!(signal, "shutting down");
    state.started.store(false, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    match admin_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "admin API stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "admin API task failed"),
    }
    // Sync streams end on the shutdown signal; anything else gets a bounded grace period.
    match tokio::time::timeout(NODE_API_GRACE, node_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "node API stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "node API task failed"),
        Err(_) => tracing::warn!(
            grace_secs = NODE_API_GRACE.as_secs(),
            "node API requests still running after the grace period; closing them"
        ),
    }
    let _ = rotation_task.await;
    let _ = ca_rotation_task.await;
    let _ = ca_monitor.await;
    if let Some(t) = health_task {
        let _ = t.await;
    }
    let _ = pruner.await;
    let _ = refresher_task.await;
    if let Some(t) = publisher_task {
        let _ = t.await;
    }
    if let Some(t) = feed_task {
        let _ = t.await;
    }
    if let Some(t) = bundle_endpoint_task {
        let _ = t.await;
    }
    // Removed only if it is still the one we bound.
    drop(admin_socket_file);
    tracing::info!("sigil-server stopped");
    Ok(())
}

/// What fetches federated bundles from their bundle endpoints: HTTPS with the system's roots
/// (or `SSL_CERT_FILE`) for `https_web`, the stored bundle for `https_spiffe`.
fn bundle_fetcher() -> Option<Arc<dyn crate::federation::FetchBundle>> {
    Some(Arc::new(crate::federation::fetch::HttpsBundleFetcher::new()))
}

/// Installs the SIGTERM and SIGINT handlers now; the future names the first signal received.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// True when the CA directory holds a key the server wrote on an earlier start (the JWT key
/// exists in both CA modes, the root key with a self-signed CA, the journal once either does).
fn ca_keys_exist(ca_dir: &std::path::Path) -> bool {
    [
        crate::ca::ROOT_KEY_FILE,
        crate::ca::JWT_KEY_FILE,
        crate::ca::authority::JOURNAL_FILE,
    ]
    .iter()
    .any(|f| ca_dir.join(f).exists())
}

fn restrict_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting permissions of {}", dir.display()))
}
