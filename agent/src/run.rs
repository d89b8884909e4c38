//! `sigil-agent run`: establish the agent's identity, then keep the cache in step with the server.
//!
//! Start-up: a stored, unexpired agent SVID is re-used (no second attestation: join tokens are
//! single-use); otherwise the agent attests (join token, x509pop or k8s_psat) over
//! server-authenticated TLS.
//! Then the worker runs the sync loop, the health endpoint serves `/live`, `/ready` (ready once
//! the first snapshot of entries arrived) and `/metrics`, and SIGTERM/SIGINT stop everything.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::client;
use crate::config::{AgentConfig, Bootstrap};
use crate::storage::Storage;
use crate::worker::{AgentState, Worker};
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};

/// Seconds of validity a stored agent SVID must have left to be re-used.
const MIN_REMAINING: i64 = 60;

struct Readiness(Arc<AgentState>);

#[async_trait]
impl sigil::health::Probe for Readiness {
    async fn ready(&self) -> Result<(), String> {
        if let Some(why) = self.0.refused.read().await.as_ref() {
            return Err(format!("refused by the server: {why}"));
        }
        if !self.0.cache.read().await.has_snapshot() {
            return Err("waiting for the first entry sync".into());
        }
        Ok(())
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let td = cfg.trust_domain.clone();
    tracing::info!(trust_domain = %td, server = %cfg.server_address, data_dir = %cfg.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "sigil-agent starting");
    sigil::limits::raise_open_files_limit_logged();
    let storage = Storage::open(&cfg.data_dir)?;
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
            // Exactly one method is configured (the config refuses two); x509pop files and the
            // k8s_psat token are read before contacting the server so a bad path fails fast.
            let k8s_token = cfg.k8s_psat.as_ref().map(|k| k.load_token()).transpose()?;
            let x509pop = match (&cfg.join_token, &cfg.x509pop, &k8s_token) {
                (Some(_), _, _) | (None, None, Some(_)) => None,
                (None, Some(x), _) => Some(x.load()?),
                (None, None, None) => anyhow::bail!(
                    "no usable agent SVID is stored and no attestation method was given: pass --join-token (from `sigil-server token generate`), --x509pop-cert/--x509pop-key or --k8s-psat-cluster"
                ),
            };
            let verification = match bootstrap_roots {
                Some(r) => client::verify_server(Arc::new(TrustStore::new(&r)?), &td),
                None => {
                    tracing::warn!("INSECURE BOOTSTRAP: the server is not authenticated for attestation; anyone on the network path could impersonate it. Use --trust-bundle outside demos.");
                    ServerVerification::InsecureBootstrap
                }
            };
            let mut node = client::channel(&cfg.server_address, verification, None)?;
            let k8s = cfg.k8s_psat.as_ref().zip(k8s_token.as_deref());
            let attested = match (x509pop, cfg.join_token.as_deref(), k8s) {
                (Some((chain, key)), _, _) => client::attest_x509pop(&mut node, &td, chain, &key)
                    .await
                    .context("x509pop node attestation failed")?,
                (None, Some(token), _) => client::attest_join_token(&mut node, &td, token)
                    .await
                    .context("node attestation with the join token failed")?,
                (None, None, Some((k, token))) => {
                    client::attest_k8s_psat(&mut node, &td, &k.cluster, token)
                        .await
                        .context("k8s_psat node attestation failed")?
                }
                (None, None, None) => anyhow::bail!("no attestation method configured"),
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
    let state = Arc::new(AgentState::new(td.clone(), identity.clone(), Cache::new()));
    state.metrics.agent_svid_expiry.set(identity.not_after);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut attestor = crate::attestor::WorkloadAttestor::new();
    if let Some(k) = &cfg.kubelet {
        tracing::info!(kubelet = %k.pods_url(), ca = %k.ca_path.display(), node = ?k.node_name, "k8s workload attestor on: pod selectors from the kubelet");
        attestor = attestor.with_kubelet(crate::attestor::k8s::KubeletClient::new(k.clone()));
    }
    let attestor = Arc::new(attestor);
    let workload_api = crate::workload_api::WorkloadApi::new(
        state.clone(),
        attestor.clone(),
        crate::workload_api::jwt::NodeLink::new(
            cfg.server_address.clone(),
            td.clone(),
            tls_identity.clone(),
            trust.clone(),
        ),
        shutdown_rx.clone(),
    );
    let worker = Worker {
        state: state.clone(),
        server_address: cfg.server_address.clone(),
        tls_identity,
        trust,
        storage,
        x509pop: cfg.x509pop.clone(),
        k8s_psat: cfg.k8s_psat.clone(),
    };
    let worker_task = tokio::spawn(worker.run(shutdown_rx.clone()));

    // Admin API on a private socket: directory 0700, socket 0600.
    let admin_listener = sigil::uds::bind(&cfg.admin_socket, 0o700, 0o600)
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
                    tokio_stream::wrappers::UnixListenerStream::new(admin_listener),
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    },
                ),
        )
    };

    // The Workload API: public socket, any local process may connect; attestation decides.
    let workload_listener = crate::workload_api::bind(&cfg.socket_path).with_context(|| {
        format!(
            "binding the Workload API socket {}",
            cfg.socket_path.display()
        )
    })?;
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
                Arc::new(Readiness(state.clone())),
                state.metrics.registry(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };

    tracing::info!(spiffe_id = %identity.spiffe_id, server = %cfg.server_address, admin_socket = %cfg.admin_socket.display(), workload_api = %format!("unix://{}", cfg.socket_path.display()), "sigil-agent ready");
    let signal = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" }
    };
    tracing::info!(signal, "shutting down");
    let _ = shutdown_tx.send(true);
    let _ = worker_task.await;
    let _ = admin_task.await;
    let _ = std::fs::remove_file(&cfg.admin_socket);
    // Streams end on the shutdown signal; don't let a stuck client hold the agent up.
    if tokio::time::timeout(std::time::Duration::from_secs(5), workload_task)
        .await
        .is_err()
    {
        tracing::warn!("Workload API clients did not disconnect within 5 s; stopping anyway");
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    if let Some(t) = health_task {
        let _ = t.await;
    }
    tracing::info!("sigil-agent stopped");
    Ok(())
}
