//! The rotation task: drives the authorities' schedule (see [`super::authority`]) on tokio time
//! and publishes every change.
//!
//! Each round it runs the `upstream.command` hook when due (upstream mode, from ½ of the
//! intermediate's life, once per intermediate), makes the transitions due ([`Ca::tick`], on the
//! blocking pool: key generation and fsyncs), then publishes what changed through [`Publish`]:
//! the bundle whenever the published authorities or their taint changed, then the server's own
//! SVID when a new X.509 authority became active. It sleeps until the next transition (at most
//! [`MAX_SLEEP`], so a jumping wall clock is noticed), or until an operator's transition
//! ([`Ca::changed`]). A failed transition or publication is retried after [`RETRY`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sigil::clock::Clock;
use tokio::sync::watch;

use super::{Ca, Signer};

/// Longest sleep between two rounds.
pub const MAX_SLEEP: Duration = Duration::from_secs(600);
/// Wait before retrying a failed transition or publication.
pub const RETRY: Duration = Duration::from_secs(5);
/// Longest run of the upstream hook.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// A publication step failed (the datastore, the trust store, the server SVID).
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct PublishError {
    /// What was being published.
    pub what: &'static str,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where the rotation task sends changes.
#[async_trait]
pub trait Publish: Send + Sync {
    /// The published authorities (or their taint) changed: store and distribute `signer`'s
    /// bundle.
    async fn bundle(&self, signer: Arc<Signer>) -> Result<(), PublishError>;
    /// A new X.509 authority is active: re-issue the server's own SVID from it.
    async fn x509_activated(&self, signer: Arc<Signer>) -> Result<(), PublishError>;
}

/// What was last published, to compare with the current signer.
#[derive(PartialEq)]
struct Published {
    roots: Vec<Vec<u8>>,
    jwt: Vec<sigil::bundle::JwtAuthority>,
    tainted: (Vec<String>, Vec<String>),
}

impl Published {
    fn of(s: &Signer) -> Self {
        let b = s.bundle();
        let (x, j) = s.tainted();
        Published {
            roots: b.x509_authorities,
            jwt: b.jwt_authorities,
            tainted: (x.to_vec(), j.to_vec()),
        }
    }
}

/// Runs the upstream hook `argv` with the upstream paths in its environment.
pub(crate) async fn run_hook(ca: &Ca, argv: &[String]) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    if let Some(up) = &ca.config().upstream {
        cmd.env("SIGIL_UPSTREAM_CERT_CHAIN", &up.cert_chain_path)
            .env("SIGIL_UPSTREAM_KEY", &up.key_path)
            .env("SIGIL_UPSTREAM_BUNDLE", &up.bundle_path);
    }
    cmd.env("SIGIL_TRUST_DOMAIN", ca.trust_domain().to_string());
    tracing::info!(command = %program, "running the upstream CA hook (half of the intermediate's life)");
    match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::info!(command = %program, "upstream CA hook succeeded; the files are read again from ⅚ of the intermediate's life")
        }
        Ok(Ok(status)) => {
            tracing::warn!(command = %program, %status, "upstream CA hook failed; replace the upstream files by hand before the intermediate expires")
        }
        Ok(Err(e)) => {
            tracing::warn!(command = %program, error = %e, "cannot run the upstream CA hook; check ca.upstream.command")
        }
        Err(_) => tracing::warn!(
            command = %program,
            timeout_secs = HOOK_TIMEOUT.as_secs(),
            "upstream CA hook timed out and was killed"
        ),
    }
}

/// Drives the schedule of `ca` until `shutdown` turns true. The bundle is published in the
/// first round (idempotent: the datastore keeps the sequence of an unchanged bundle).
pub async fn run(
    ca: Arc<Ca>,
    clock: Clock,
    publish: Arc<dyn Publish>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut published: Option<Published> = None;
    let mut active_x509 = ca.current().x509_authority_id().to_string();
    loop {
        let now = clock.now_unix();
        let mut retry = false;
        if ca.upstream_hook_due(now) {
            if let Some(argv) = ca
                .config()
                .upstream
                .as_ref()
                .and_then(|u| u.command.clone())
            {
                run_hook(&ca, &argv).await;
            }
            ca.upstream_hook_ran();
        }
        let ca2 = ca.clone();
        match tokio::task::spawn_blocking(move || ca2.tick(now)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                retry = true;
                tracing::error!(error = %e, "CA rotation step failed; retrying");
            }
            Err(e) => {
                retry = true;
                tracing::error!(error = %e, "CA rotation task failed; retrying");
            }
        }
        let signer = ca.current();
        let now_published = Published::of(&signer);
        if published.as_ref() != Some(&now_published) {
            match publish.bundle(signer.clone()).await {
                Ok(()) => published = Some(now_published),
                Err(e) => {
                    retry = true;
                    tracing::warn!(error = %e, "publishing the trust bundle failed; retrying");
                }
            }
        }
        if signer.x509_authority_id() != active_x509 {
            match publish.x509_activated(signer.clone()).await {
                Ok(()) => active_x509 = signer.x509_authority_id().to_string(),
                Err(e) => {
                    retry = true;
                    tracing::warn!(error = %e, "re-issuing the server SVID from the new authority failed; retrying");
                }
            }
        }
        let sleep = if retry {
            RETRY
        } else {
            ca.next_due(now)
                .map_or(MAX_SLEEP, |t| {
                    Duration::from_secs(u64::try_from((t - now).max(1)).unwrap_or(1))
                })
                .min(MAX_SLEEP)
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = ca.changed() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests;
