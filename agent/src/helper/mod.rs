//! `sigil-agent helper`: keeps a process's SVID in files, for programs that only read PEM files
//! (nginx, PostgreSQL, HAProxy, openssl, …), modelled on SPIRE's spiffe-helper and reading the
//! same configuration keys.
//!
//! The helper is an ordinary Workload API client of the agent (attested like any workload, by
//! its own uid, path, …): it streams its X509-SVIDs, writes the chosen one (the default SVID,
//! or the one with `hint`) as certificate chain, key and bundle, and on each rotation writes the
//! new set and sends `renew_signal` to the program it started (`cmd`) or to the process named in
//! `pid_file_name`. It can also keep JWT-SVIDs (refreshed at half their lifetime) and the JWT
//! bundles in files. With `daemon_mode = false` it writes everything once and exits.
//!
//! - [`config`]: the TOML file and flags.
//! - [`files`]: the writer: every file whole, the certificate, key and bundle switched together
//!   (versioned directory + one symlink rename; the exact guarantee is in its documentation).
//!
//! Behaviour around the edges:
//! - The agent's socket missing or refusing (not running yet, restarting, no entry yet): retried
//!   with back-off (1 s doubling to 30 s), each attempt logged; files already written stay.
//! - A write that fails (disk full, directory made read-only): logged and retried with the same
//!   back-off; the previous files stay complete and current, the child keeps running.
//! - `cmd` starts once every configured file has been written. When it exits, the helper exits
//!   with its status (128 + the signal's number if it was killed) so that a supervisor sees it.
//!   SIGTERM and SIGINT to the helper are passed on to the child, and the helper exits with the
//!   child's status once it has stopped. (spiffe-helper instead restarts an exited child on the
//!   next rotation.)
//! - `renew_signal` follows X509-SVID rotations only (JWT-SVID files are simply replaced).

pub mod config;
pub mod files;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::cli::api::{request, rpc_error};
pub use config::{HelperConfig, HelperFlags};
use files::{OutFile, VersionedDir};

/// First retry delay after the agent could not be reached or a write failed.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs `sigil-agent helper`: the process's exit code is the child's when there is one.
pub async fn main(flags: HelperFlags) -> ExitCode {
    let env = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok();
    let cfg = match HelperConfig::load(&flags, env.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = sigil::logging::init(&cfg.log_level, cfg.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(cfg).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Doubling retry delay.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }

    /// The delay to wait now; the next one doubles.
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

/// The agent's Workload API socket.
#[derive(Debug, Clone)]
struct Workload {
    socket: PathBuf,
}

impl Workload {
    /// A connected client, retrying (logged) until the socket answers.
    async fn client(&self, backoff: &mut Backoff) -> SpiffeWorkloadApiClient<Channel> {
        loop {
            match crate::cli::api::connect(&self.socket).await {
                Ok(c) => return c,
                Err(e) => {
                    let d = backoff.step();
                    tracing::warn!(
                        socket = %self.socket.display(),
                        retry_in_secs = d.as_secs(),
                        error = %format!("{e:#}"),
                        "cannot reach the Workload API; retrying"
                    );
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// Something a watcher reports to the main loop.
#[derive(Debug)]
enum Event {
    /// A new X509-SVID message.
    X509(wl::X509svidResponse),
    /// A JWT file (`jwt_svids[i]` or the bundle) was written for the first time.
    FirstWrite(Source),
}

/// What must be written once before `cmd` starts (or one-shot mode ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    X509,
    JwtSvid(usize),
    JwtBundle,
}

/// The files of one X509-SVID, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
struct X509Files {
    files: Vec<OutFile>,
    spiffe_id: String,
    serial: String,
    not_after: i64,
}

/// Builds the certificate, key and bundle files from a Workload API message.
fn render_x509(resp: &wl::X509svidResponse, cfg: &HelperConfig) -> anyhow::Result<X509Files> {
    let names = cfg.x509.as_ref().context("no X509-SVID files configured")?;
    let svid = match &cfg.hint {
        Some(h) => resp.svids.iter().find(|s| &s.hint == h).with_context(|| {
            let have: Vec<String> = resp
                .svids
                .iter()
                .map(|s| format!("{} (hint {:?})", s.spiffe_id, s.hint))
                .collect();
            format!(
                "no X509-SVID has hint {h:?}; this process has {}",
                have.join(", ")
            )
        })?,
        None => resp.svids.first().context("the agent sent no X509-SVID")?,
    };
    let mut chain = sigil::x509::split_der_concat(&svid.x509_svid)
        .with_context(|| format!("SVID {} has a malformed chain", svid.spiffe_id))?;
    let mut roots = sigil::x509::split_der_concat(&svid.bundle)
        .with_context(|| format!("SVID {} has a malformed bundle", svid.spiffe_id))?;
    if cfg.add_intermediates_to_bundle {
        roots.extend(chain.drain(1..));
    }
    if cfg.include_federated_domains {
        let own = sigil::x509::spiffe_id_of(&chain[0])
            .map(|id| id.trust_domain().to_string())
            .unwrap_or_default();
        let federated: BTreeMap<_, _> = resp.federated_bundles.iter().collect();
        for (td, der) in federated {
            if td.trim_start_matches("spiffe://") == own.trim_start_matches("spiffe://") {
                continue;
            }
            roots.extend(
                sigil::x509::split_der_concat(der)
                    .with_context(|| format!("federated bundle {td} is malformed"))?,
            );
        }
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| anyhow::anyhow!("SVID {} leaf: {e}", svid.spiffe_id))?;
    Ok(X509Files {
        files: vec![
            OutFile::new(
                names.svid.clone(),
                sigil::x509::to_pem_certs(&chain),
                cfg.cert_file_mode,
            ),
            OutFile::new(
                names.key.clone(),
                sigil::x509::to_pem("PRIVATE KEY", &svid.x509_svid_key),
                cfg.key_file_mode,
            ),
            OutFile::new(
                names.bundle.clone(),
                sigil::x509::to_pem_certs(&roots),
                cfg.cert_file_mode,
            ),
        ],
        spiffe_id: svid.spiffe_id.clone(),
        serial: hex::encode(leaf.raw_serial()),
        not_after: leaf.validity().not_after.timestamp(),
    })
}

/// Streams X509-SVID messages to `tx`, reconnecting with back-off for as long as the helper runs.
async fn watch_x509(workload: Workload, tx: mpsc::Sender<Event>) {
    let mut backoff = Backoff::new();
    loop {
        let mut client = workload.client(&mut backoff).await;
        match client.fetch_x509svid(request(wl::X509svidRequest {})).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            backoff.reset();
                            if tx.send(Event::X509(m)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("the agent closed the X509-SVID stream; reconnecting");
                            break;
                        }
                        Err(s) => {
                            tracing::warn!(error = %rpc_error("FetchX509SVID stream", s), "X509-SVID stream failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(s) => {
                tracing::warn!(error = %rpc_error("FetchX509SVID", s), "no X509-SVID yet; retrying");
            }
        }
        let d = backoff.step();
        tracing::info!(
            retry_in_secs = d.as_secs(),
            "waiting before asking the agent again"
        );
        tokio::time::sleep(d).await;
    }
}

/// The `exp` claim of a compact JWT, if readable.
fn jwt_expiry(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_i64()
}

use sigil::clock::now_unix;

/// Keeps `jwt_svids[index]` in its file: fetched, written, refreshed at half its lifetime.
async fn keep_jwt_svid(
    workload: Workload,
    cfg: std::sync::Arc<HelperConfig>,
    index: usize,
    tx: mpsc::Sender<Event>,
) {
    let Some(want) = cfg.jwt_svids.get(index).cloned() else {
        return;
    };
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        let mut client = workload.client(&mut backoff).await;
        let req = wl::JwtsvidRequest {
            audience: want.audience.clone(),
            spiffe_id: String::new(),
        };
        let outcome: anyhow::Result<i64> = async {
            let resp = client
                .fetch_jwtsvid(request(req))
                .await
                .map_err(|s| rpc_error("FetchJWTSVID", s))?
                .into_inner();
            let svid = match &cfg.hint {
                Some(h) => resp.svids.iter().find(|s| &s.hint == h).with_context(|| {
                    format!("no JWT-SVID for audience {:?} has hint {h:?}", want.audience)
                })?,
                None => resp.svids.first().context("the agent sent no JWT-SVID")?,
            };
            files::write_single(&cfg.cert_dir, &want.file_name, svid.svid.as_bytes(), cfg.jwt_svid_file_mode)?;
            let exp = jwt_expiry(&svid.svid).unwrap_or_else(|| now_unix() + 60);
            tracing::info!(file = %cfg.cert_dir.join(&want.file_name).display(), spiffe_id = %svid.spiffe_id, audience = ?want.audience, expires = exp, "JWT-SVID written");
            Ok(exp)
        }
        .await;
        match outcome {
            Ok(exp) => {
                backoff.reset();
                if first {
                    first = false;
                    if tx
                        .send(Event::FirstWrite(Source::JwtSvid(index)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let half = u64::try_from((exp - now_unix()) / 2).unwrap_or(0).max(1);
                tokio::time::sleep(Duration::from_secs(half)).await;
            }
            Err(e) => {
                let d = backoff.step();
                tracing::warn!(file = %want.file_name, retry_in_secs = d.as_secs(), error = %format!("{e:#}"), "JWT-SVID not written; retrying");
                tokio::time::sleep(d).await;
            }
        }
    }
}

/// Keeps the JWT bundles in `jwt_bundle_file_name` as spiffe-helper does: a JSON object from
/// trust domain name to the base64 of its JWKS.
async fn keep_jwt_bundle(
    workload: Workload,
    cfg: std::sync::Arc<HelperConfig>,
    tx: mpsc::Sender<Event>,
) {
    use base64::Engine as _;
    let Some(name) = cfg.jwt_bundle.clone() else {
        return;
    };
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        let mut client = workload.client(&mut backoff).await;
        match client
            .fetch_jwt_bundles(request(wl::JwtBundlesRequest {}))
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let m = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(s) => {
                            tracing::warn!(error = %rpc_error("FetchJWTBundles stream", s), "JWT bundle stream failed; reconnecting");
                            break;
                        }
                    };
                    let doc: BTreeMap<String, String> = m
                        .bundles
                        .iter()
                        .map(|(td, jwks)| {
                            (
                                td.trim_start_matches("spiffe://").to_string(),
                                base64::engine::general_purpose::STANDARD.encode(jwks),
                            )
                        })
                        .collect();
                    let text = serde_json::to_string(&doc).unwrap_or_default();
                    match files::write_single(
                        &cfg.cert_dir,
                        &name,
                        text.as_bytes(),
                        cfg.jwt_bundle_file_mode,
                    ) {
                        Ok(()) => {
                            backoff.reset();
                            tracing::info!(file = %cfg.cert_dir.join(&name).display(), trust_domains = doc.len(), "JWT bundle written");
                            if first {
                                first = false;
                                if tx.send(Event::FirstWrite(Source::JwtBundle)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "JWT bundle not written; keeping the previous file until the next update");
                        }
                    }
                }
            }
            Err(s) => {
                tracing::warn!(error = %rpc_error("FetchJWTBundles", s), "no JWT bundle yet; retrying");
            }
        }
        tokio::time::sleep(backoff.step()).await;
    }
}

/// Sends `sig` to the process whose PID is the first line of `pid_file` (nginx writes only the
/// PID; PostgreSQL's `postmaster.pid` has more lines after it).
fn signal_pid_file(pid_file: &Path, sig: Signal) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading pid_file_name {}", pid_file.display()))?;
    let pid: i32 = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| {
            format!(
                "pid_file_name {} does not hold a PID: {:?}",
                pid_file.display(),
                text.trim()
            )
        })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("sending {sig} to PID {pid} from {}", pid_file.display()))?;
    Ok(pid)
}

/// Waits for the child if there is one, else forever.
async fn child_exit(
    child: &mut Option<tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// The helper's exit code for a child's exit status.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        _ => 1,
    }
}

/// Runs the helper until one-shot mode is done, the child exits, or SIGTERM/SIGINT; returns the
/// exit code. Errors are what makes running impossible (an unwritable `cert_dir`, `cmd` that
/// cannot be started).
pub async fn run(cfg: HelperConfig) -> anyhow::Result<u8> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = std::sync::Arc::new(cfg);
    let mut out = VersionedDir::open(&cfg.cert_dir)?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let workload = Workload {
        socket: cfg.socket.clone(),
    };
    tracing::info!(
        socket = %cfg.socket.display(),
        cert_dir = %cfg.cert_dir.display(),
        daemon_mode = cfg.daemon_mode,
        "sigil-agent helper starting"
    );
    let (tx, mut rx) = mpsc::channel::<Event>(4);
    let mut outstanding = std::collections::HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    if cfg.x509.is_some() {
        outstanding.insert(Source::X509);
        tasks.spawn(watch_x509(workload.clone(), tx.clone()));
    }
    for i in 0..cfg.jwt_svids.len() {
        outstanding.insert(Source::JwtSvid(i));
        tasks.spawn(keep_jwt_svid(workload.clone(), cfg.clone(), i, tx.clone()));
    }
    if cfg.jwt_bundle.is_some() {
        outstanding.insert(Source::JwtBundle);
        tasks.spawn(keep_jwt_bundle(workload.clone(), cfg.clone(), tx.clone()));
    }
    drop(tx);

    let mut child: Option<tokio::process::Child> = None;
    let mut last: Option<Vec<OutFile>> = None;
    let mut pending: Option<X509Files> = None;
    let mut backoff = Backoff::new();
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    loop {
        let mut attempt = false;
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::X509(resp)) => match render_x509(&resp, &cfg) {
                    Ok(r) if last.as_ref() == Some(&r.files) => {
                        tracing::debug!("X509-SVID message without changes to the files");
                    }
                    Ok(r) => {
                        pending = Some(r);
                        backoff.reset();
                        attempt = true;
                    }
                    Err(e) if !cfg.daemon_mode => return Err(e),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot write this X509-SVID update; keeping the previous files"),
                },
                Some(Event::FirstWrite(source)) => {
                    outstanding.remove(&source);
                }
                None => anyhow::bail!("the Workload API watchers stopped"),
            },
            () = &mut retry, if pending.is_some() => attempt = true,
            status = child_exit(&mut child) => {
                let status = status.context("waiting for the child")?;
                tracing::info!(%status, "the child exited; the helper exits with its status");
                return Ok(exit_code(status));
            }
            _ = term.recv() => return stop(child, Signal::SIGTERM).await,
            _ = int.recv() => return stop(child, Signal::SIGINT).await,
        }
        if attempt {
            if let Some(r) = pending.take() {
                match out.publish(&r.files) {
                    Ok(version) => {
                        tracing::info!(
                            spiffe_id = %r.spiffe_id,
                            serial = %r.serial,
                            expires = r.not_after,
                            version = %version.display(),
                            "X509-SVID written"
                        );
                        outstanding.remove(&Source::X509);
                        last = Some(r.files);
                        renew(&cfg, child.as_ref());
                    }
                    Err(e) => {
                        let d = backoff.step();
                        tracing::error!(error = %e, retry_in_secs = d.as_secs(), "writing the X509-SVID files failed; the previous files stay; retrying");
                        retry.as_mut().reset(tokio::time::Instant::now() + d);
                        pending = Some(r);
                    }
                }
            }
        }
        if outstanding.is_empty() {
            if !cfg.daemon_mode {
                tracing::info!("files written; exiting (daemon_mode = false)");
                return Ok(0);
            }
            if child.is_none() {
                if let Some(cmd) = &cfg.cmd {
                    let c = tokio::process::Command::new(&cmd.program)
                        .args(&cmd.args)
                        .spawn()
                        .with_context(|| format!("cannot start cmd {:?}", cmd.program))?;
                    tracing::info!(cmd = %cmd.program, pid = c.id().unwrap_or(0), "child started");
                    child = Some(c);
                }
            }
        }
    }
}

/// Tells the child (if running) and the `pid_file_name` process about new files.
fn renew(cfg: &HelperConfig, child: Option<&tokio::process::Child>) {
    let Some(sig) = cfg.renew_signal else {
        return;
    };
    if let Some(pid) = child.and_then(|c| c.id()) {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
            Ok(()) => tracing::info!(pid, signal = %sig, "child signalled"),
            Err(e) => tracing::warn!(pid, signal = %sig, error = %e, "cannot signal the child"),
        }
    }
    if let Some(pid_file) = &cfg.pid_file {
        match signal_pid_file(pid_file, sig) {
            Ok(pid) => tracing::info!(pid, signal = %sig, "pid_file_name process signalled"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot signal the pid_file_name process")
            }
        }
    }
}

/// Passes `sig` on to the child and waits for it; exit code: the child's, else 0.
async fn stop(child: Option<tokio::process::Child>, sig: Signal) -> anyhow::Result<u8> {
    let Some(mut c) = child else {
        tracing::info!(signal = %sig, "stopping");
        return Ok(0);
    };
    if let Some(pid) = c.id() {
        tracing::info!(pid, signal = %sig, "passing the signal on to the child and waiting for it");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
    let status = c.wait().await.context("waiting for the child")?;
    tracing::info!(%status, "child stopped");
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..7).map(|_| b.step().as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.step(), BACKOFF_START);
    }

    #[test]
    fn exit_codes_follow_the_child() {
        use std::process::ExitStatus;
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // Killed by SIGTERM (15): 128 + 15, as a shell reports it.
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn pid_files_name_the_process_on_their_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // PostgreSQL's postmaster.pid: the PID, then the data directory and more.
        let pid_file = dir.path().join("postmaster.pid");
        std::fs::write(
            &pid_file,
            format!("{}\n/var/lib/postgresql/data\n5432\n", sleeper.id()),
        )
        .unwrap();
        assert_eq!(
            signal_pid_file(&pid_file, Signal::SIGTERM).unwrap(),
            sleeper.id() as i32
        );
        assert_eq!(
            sleeper.wait().unwrap().signal(),
            Some(Signal::SIGTERM as i32)
        );
        std::fs::write(&pid_file, "not a pid\n").unwrap();
        let err = signal_pid_file(&pid_file, Signal::SIGHUP)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold a PID"), "{err}");
        let err = signal_pid_file(&dir.path().join("missing.pid"), Signal::SIGHUP).unwrap_err();
        assert!(format!("{err:#}").contains("missing.pid"), "{err:#}");
    }

    /// A CA certificate (DER) and its issuer, signed by `parent` (self-signed without one).
    fn ca(
        name: &str,
        parent: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
    ) -> (Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = match parent {
            Some(issuer) => p.signed_by(&key, issuer).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (cert.der().to_vec(), rcgen::Issuer::new(p, key))
    }

    /// An X509-SVID message entry for `id` with `hint`: leaf + `intermediate`, bundle `root`.
    fn svid(
        id: &str,
        hint: &str,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        intermediate: &[u8],
        root: &[u8],
    ) -> wl::X509svid {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let leaf = p.signed_by(&key, issuer).unwrap();
        wl::X509svid {
            spiffe_id: id.into(),
            x509_svid: [leaf.der().to_vec(), intermediate.to_vec()].concat(),
            x509_svid_key: key.serialize_der(),
            bundle: root.to_vec(),
            hint: hint.into(),
        }
    }

    fn certs_in(f: &OutFile) -> Vec<Vec<u8>> {
        sigil::x509::parse_pem_certs(&String::from_utf8_lossy(&f.contents)).unwrap()
    }

    #[test]
    fn rendering_picks_the_svid_and_places_intermediates_and_federated_roots() {
        let (root, root_issuer) = ca("root", None);
        let (inter, inter_issuer) = ca("intermediate", Some(&root_issuer));
        let (other_root, _) = ca("other.org root", None);
        let resp = wl::X509svidResponse {
            svids: vec![
                svid(
                    "spiffe://example.org/a",
                    "internal",
                    &inter_issuer,
                    &inter,
                    &root,
                ),
                svid(
                    "spiffe://example.org/b",
                    "external",
                    &inter_issuer,
                    &inter,
                    &root,
                ),
            ],
            crl: vec![],
            federated_bundles: [
                ("spiffe://other.org".to_string(), other_root.clone()),
                ("spiffe://example.org".to_string(), root.clone()),
            ]
            .into(),
        };
        let flags = HelperFlags {
            cert_dir: Some("/c".into()),
            svid_file_name: Some("svid.pem".into()),
            svid_key_file_name: Some("svid_key.pem".into()),
            svid_bundle_file_name: Some("bundle.pem".into()),
            ..HelperFlags::default()
        };
        let cfg = HelperConfig::resolve(config::FileConfig::default(), &flags, None).unwrap();
        // Default: the first SVID, chain as sent, the SVID's own bundle only.
        let r = render_x509(&resp, &cfg).unwrap();
        assert_eq!(r.spiffe_id, "spiffe://example.org/a");
        assert_eq!(certs_in(&r.files[0]).len(), 2);
        assert_eq!(certs_in(&r.files[2]), std::slice::from_ref(&root));
        assert_eq!(
            r.files[1].contents,
            sigil::x509::to_pem("PRIVATE KEY", &resp.svids[0].x509_svid_key).into_bytes()
        );
        assert_eq!((r.files[0].mode, r.files[1].mode), (0o644, 0o600));
        // By hint, intermediates moved to the bundle, federated roots added (not our own twice).
        let flags = HelperFlags {
            hint: Some("external".into()),
            add_intermediates_to_bundle: true,
            include_federated_domains: true,
            ..flags
        };
        let cfg = HelperConfig::resolve(config::FileConfig::default(), &flags, None).unwrap();
        let r = render_x509(&resp, &cfg).unwrap();
        assert_eq!(r.spiffe_id, "spiffe://example.org/b");
        assert_eq!(certs_in(&r.files[0]).len(), 1);
        assert_eq!(certs_in(&r.files[2]), [root, inter, other_root]);
        // An unknown hint names what there is.
        let flags = HelperFlags {
            hint: Some("missing".into()),
            ..flags
        };
        let cfg = HelperConfig::resolve(config::FileConfig::default(), &flags, None).unwrap();
        let err = format!("{:#}", render_x509(&resp, &cfg).unwrap_err());
        assert!(err.contains("no X509-SVID has hint \"missing\""), "{err}");
        assert!(
            err.contains("spiffe://example.org/b (hint \"external\")"),
            "{err}"
        );
    }

    #[test]
    fn jwt_expiry_is_read_from_the_payload() {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"exp":1700000000,"sub":"x"}"#);
        assert_eq!(jwt_expiry(&format!("h.{payload}.s")), Some(1_700_000_000));
        assert_eq!(jwt_expiry("not a jwt"), None);
    }
}
