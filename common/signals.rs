//! Signals both daemons treat alike.
//!
//! SIGTERM and SIGINT stop them (each `run` waits for those itself). SIGHUP, which service
//! managers and terminals send, would otherwise kill the process (its default action) and leave
//! its sockets behind; both read their configuration once at start, so there is nothing to
//! reload: it is logged and the process keeps serving.

use tokio::signal::unix::{signal, SignalKind};

/// Catches SIGHUP from now on for the life of the process, logging each one. Call it first
/// thing in `run`, inside the runtime, so that a SIGHUP during start-up does not kill either.
pub fn keep_running_on_sighup(program: &'static str) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(
                signal = "SIGHUP",
                "SIGHUP received; nothing is reloaded: {program} reads its configuration at start, restart it to apply changes"
            );
        }
    });
    Ok(())
}
