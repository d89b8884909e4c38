//! `sigil-agent run`: establish the agent's identity, then keep the cache in step with the server.
//!
//! Start-up: a stored, unexpired agent SVID is re-used (no second attestation: join tokens are
//! single-use); otherwise the agent attests (join token, x509pop or k8s_psat) over
//! server-authenticated TLS, retrying with back-off and jitter while the server is unreachable
//! (a refusal — bad token, untrusted node — ends the agent with the server's reason).
//! Then the worker runs the sync loop, the health endpoint serves `/live`, `/ready` (see
//! [`crate::health`]) and `/metrics`, and SIGTERM/SIGINT stop everything (the sockets are
//! removed if they are still ours). SIGHUP is logged and changes nothing.
//!
//! One agent per data directory: it holds an exclusive lock on `<data_dir>/sigil-agent.lock` for
//! its whole life, taken before attesting or touching a socket; a second one refuses to start.

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::config::{AgentConfig, Bootstrap};
use crate::node_attestor::{Material, NodeAttestation};
use crate::sync::cache::Cache;
use crate::sync::client::{self, Attested};
use crate::sync::node_api::TonicNodeApi;
use crate::sync::servers::Servers;
use crate::sync::storage::Storage;
use crate::sync::worker::{AgentState, Backoff, Worker};
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil::TrustDomain;

/// The lock file in the data directory that keeps a second agent off it.
pub const LOCK_FILE: &str = "sigil-agent.lock";

/// Seconds of validity a stored agent SVID must have left to be re-used.
const MIN_REMAINING: i64 = 60;

/// SIGTERM and SIGINT, installed once at start-up so they also stop a first attestation that
/// is still waiting for the server.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! { _ = self.term.recv() => "SIGTERM", _ = self.int.recv() => "SIGINT" }
    }
}

/// The first attestation: tried on each server in turn, then retried with exponential back-off
/// and jitter (every failure logged with its error; the delay grows to 30 s) while the failure
/// is transient (server unreachable,
/// restarting, overloaded), until it succeeds or a signal arrives (`Ok(None)`). A refusal
/// (PermissionDenied, InvalidArgument...) ends it with the server's reason.
async fn attest_first(
    method: &NodeAttestation,
    mut material: Material,
    servers: &Servers,
    td: &TrustDomain,
    verification: &ServerVerification,
    signals: &mut Signals,
) -> anyhow::Result<Option<Attested>> {
    let mut backoff = Backoff::default();
    loop {
        // Read for every attempt: the kubelet rotates projected tokens.
        if backoff.failures > 0 && matches!(method, NodeAttestation::K8sPsat(_)) {
            material = method.load()?;
        }
        let addr = servers.current();
        let attempt = async {
            let mut node = client::channel(&addr, verification.clone(), None)?;
            material.attest(&mut node, td).await
        };
        let result = tokio::select! {
            r = attempt => r,
            signal = signals.recv() => {
                tracing::info!(signal, "stopped before attesting to sigil-server");
                return Ok(None);
            }
        };
        match result {
            Ok(attested) => return Ok(Some(attested)),
            Err(e) if !e.is_transient() => {
                return Err(anyhow::Error::new(e).context(method.failed()))
            }
            Err(e) => {
                // The next server, soon; after a round of all of them, with back-off.
                let failover = servers.failed(&addr).await;
                let delay = if failover.wrapped {
                    backoff.delay()
                } else {
                    Backoff::quick()
                };
                tracing::warn!(error = %e, server = %addr, next = %failover.next, attempt = backoff.failures, retry_in_ms = delay.as_millis() as u64, "{}: sigil-server is unreachable or not ready; retrying", method.failed());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    signal = signals.recv() => {
                        tracing::info!(signal, "stopped before attesting to sigil-server");
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let td = cfg.trust_domain.clone();
    tracing::info!(trust_domain = %td, servers = %cfg.server_addresses.join(","), data_dir = %cfg.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "sigil-agent starting");
    // A name with several addresses is one server per address.
    let servers = Arc::new(Servers::new(cfg.server_addresses.clone()));
    servers.resolve().await;
    sigil::signals::keep_running_on_sighup("sigil-agent").context("installing SIGHUP handler")?;
    sigil::limits::raise_open_files_limit_logged();
    let mut signals = Signals::install()?;
    let storage = Storage::open(&cfg.data_dir)?;
    let _lock = sigil::fs::lock_dir(&cfg.data_dir, LOCK_FILE, "sigil-agent")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    let bootstrap_roots = match &cfg.bootstrap {
        Bootstrap::TrustBundle(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading trust bundle {}", path.display()))?;
            Some(
                sigil::x509::parse_pem_certs(&text)
                    .with_context(|| format!("trust bundle {}", path.display()))?,
            )
        }
        Bootstrap::Insecure => None,
    };

    let stored = storage.load_identity(&td)?;
    let (identity, roots) = match stored {
        Some(id) if id.not_after > now + MIN_REMAINING => {
            tracing::info!(spiffe_id = %id.spiffe_id, not_after = id.not_after, "re-using the stored agent SVID (no attestation)");
            let roots = match (storage.load_bundle()?, bootstrap_roots) {
                (Some(r), _) | (None, Some(r)) => r,
                (None, None) => anyhow::bail!(
                    "no stored trust bundle in {}; pass --trust-bundle",
                    cfg.data_dir.display()
                ),
            };
            (id, roots)
        }
        other => {
            if other.is_some() {
                tracing::warn!("the stored agent SVID has expired; attesting again");
            }
            let Some(method) = &cfg.node_attestation else {
                anyhow::bail!(
                    "no usable agent SVID is stored and no attestation method was given: pass --join-token (from `sigil-server token generate`), --x509pop-cert/--x509pop-key or --k8s-psat-cluster"
                );
            };
            // Read before contacting the server, so a bad path fails fast.
            let material = method.load()?;
            let verification = match bootstrap_roots {
                Some(r) => client::verify_server(Arc::new(TrustStore::new(&r)?), &td),
                None => {
                    tracing::warn!("INSECURE BOOTSTRAP: the server is not authenticated for attestation; anyone on the network path could impersonate it. Use --trust-bundle outside demos.");
                    ServerVerification::InsecureBootstrap
                }
            };
            let Some(attested) =
                attest_first(method, material, &servers, &td, &verification, &mut signals).await?
            else {
                return Ok(());
            };
            storage.save_identity(&attested.identity)?;
            storage.save_bundle(&attested.bundle_roots)?;
            tracing::info!(spiffe_id = %attested.identity.spiffe_id, "attested to sigil-server");
            (attested.identity, attested.bundle_roots)
        }
    };

    let tls_identity = Arc::new(IdentityStore::new(
        identity.chain_der.clone(),
        identity.key_pkcs8_der.clone(),
    )?);
    let trust = Arc::new(TrustStore::new(&roots)?);
    let cache = Cache::new();
    let exe_hash_flag = cache.exe_hash_flag();
    let state = Arc::new(AgentState::new(td.clone(), identity.clone()));
    state.metrics.agent_svid_expiry.set(identity.not_after);
    if let Some(t) = crate::health::earliest_not_after(&roots) {
        state.metrics.bundle_expiry.set(t);
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut attestor =
        crate::workload_attestor::WorkloadAttestor::new().with_exe_hash_flag(exe_hash_flag);
    if let Some(k) = &cfg.kubelet {
        tracing::info!(kubelet = %k.pods_url(), ca = %k.ca_path.display(), node = k.node_name.as_deref(), "k8s workload attestor on: pod selectors from the kubelet");
        attestor =
            attestor.with_kubelet(crate::workload_attestor::k8s::KubeletClient::new(k.clone()));
    }
    let attestor = Arc::new(attestor);
    let workload_api = crate::workload_api::WorkloadApi::new(
        state.clone(),
        attestor.clone(),
        crate::workload_api::jwt::NodeLink::new(
            servers.clone(),
            td.clone(),
            tls_identity.clone(),
            trust.clone(),
        ),
        shutdown_rx.clone(),
    );
    let worker = Worker {
        state: state.clone(),
        node: Arc::new(TonicNodeApi::new(
            servers.clone(),
            td.clone(),
            tls_identity.clone(),
            trust.clone(),
        )),
        cache,
        clock: sigil::clock::Clock::system(),
        tls_identity,
        trust,
        storage,
        attestation: cfg.node_attestation.clone(),
    };
    let worker_task = tokio::spawn(worker.run(shutdown_rx.clone()));

    // Admin API on a private socket: directory 0700, socket 0600.
    let (admin_listener, admin_socket_file) = sigil::uds::bind(&cfg.admin_socket, 0o700, 0o600)
        .await
        .with_context(|| format!("binding admin socket {}", cfg.admin_socket.display()))?;
    let admin_task = {
        let mut rx = shutdown_rx.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    sigil::proto::agent_admin::agent_admin_server::AgentAdminServer::new(
                        crate::admin::AgentAdminService::new(state.clone(), attestor.clone()),
                    ),
                )
                .serve_with_incoming_shutdown(
                    sigil::h2_authority::incoming(admin_listener),
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    },
                ),
        )
    };

    // The Workload API: public socket, any local process may connect; attestation decides.
    let (workload_listener, workload_socket_file) = crate::workload_api::bind(&cfg.socket_path)
        .await
        .with_context(|| {
            format!(
                "binding the Workload API socket {}",
                cfg.socket_path.display()
            )
        })?;
    match crate::health::SocketId::of(&cfg.socket_path) {
        Ok(id) => {
            *state
                .workload_socket
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(id)
        }
        Err(e) => {
            tracing::warn!(error = %e, socket = %cfg.socket_path.display(), "cannot stat the Workload API socket just bound; /ready will fail")
        }
    }
    let expiry_task = tokio::spawn(crate::workload_api::expiry::wake_streams_at_expiry(
        state.clone(),
        shutdown_rx.clone(),
    ));
    let limits = crate::workload_api::ConnectionLimits::from_open_files_limit(
        cfg.workload_api_max_connections_per_uid,
    );
    tracing::info!(
        per_uid = limits.per_uid,
        total = limits.total,
        "Workload API connection limits"
    );
    let workload_task = {
        let mut rx = shutdown_rx.clone();
        tokio::spawn(crate::workload_api::serve(
            workload_listener,
            workload_api,
            cfg.sds.clone(),
            limits,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    };

    let health_task = match cfg.health_address {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding health address {addr}"))?;
            tracing::info!(address = %l.local_addr()?, "health endpoint listening (/live, /ready, /metrics)");
            let mut rx = shutdown_rx.clone();
            Some(tokio::spawn(sigil::health::serve(
                l,
                Arc::new(crate::health::Readiness::new(
                    state.clone(),
                    cfg.socket_path.clone(),
                    cfg.ready_max_sync_age,
                )),
                state.metrics.registry(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };

    tracing::info!(spiffe_id = %identity.spiffe_id, servers = %cfg.server_addresses.join(","), admin_socket = %cfg.admin_socket.display(), workload_api = %format!("unix://{}", cfg.socket_path.display()), "sigil-agent ready");
    let signal = signals.recv().await;
    tracing::info!(signal, "shutting down");
    let _ = shutdown_tx.send(true);
    let _ = worker_task.await;
    let _ = expiry_task.await;
    let _ = admin_task.await;
    // Each socket is removed only if it is still the one we bound.
    drop(admin_socket_file);
    // Streams end on the shutdown signal; don't let a stuck client hold the agent up.
    if tokio::time::timeout(std::time::Duration::from_secs(5), workload_task)
        .await
        .is_err()
    {
        tracing::warn!("Workload API clients did not disconnect within 5 s; stopping anyway");
    }
    drop(workload_socket_file);
    if let Some(t) = health_task {
        let _ = t.await;
    }
    tracing::info!("sigil-agent stopped");
    Ok(())
}
