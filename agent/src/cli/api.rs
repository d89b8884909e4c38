//! `sigil-agent api …`: a Workload API client for operators — fetch, validate and watch what a
//! process on this node gets, exactly as a workload would (same socket, same attestation).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::socket_api::{Api, Unimplemented};
use tonic::transport::Channel;

use super::time_text;
use crate::workload_api::service::SECURITY_HEADER;

/// Where the Workload API socket is.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET, else the agent's default].
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
}

impl SocketArgs {
    /// The flag, else `SPIFFE_ENDPOINT_SOCKET` (`unix:///path` or `unix:/path`), else the
    /// default.
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.socket_path {
            return Ok(p.clone());
        }
        match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
            Ok(v) if !v.is_empty() => endpoint_to_path(&v),
            _ => Ok(PathBuf::from(crate::config::DEFAULT_SOCKET_PATH)),
        }
    }
}

/// `unix:///run/x.sock` or `unix:/run/x.sock` → `/run/x.sock`.
pub fn endpoint_to_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "SPIFFE_ENDPOINT_SOCKET={} is not a unix: address (expected unix:///path/to/api.sock)",
                sigil::text::quote_for_display(endpoint)
            )
        })?;
    if !path.starts_with('/') {
        anyhow::bail!(
            "SPIFFE_ENDPOINT_SOCKET={} must name an absolute path",
            sigil::text::quote_for_display(endpoint)
        );
    }
    Ok(PathBuf::from(path))
}

/// `api` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch an X509-SVID or JWT-SVID.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate a JWT-SVID through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Stream X509-SVID updates and print each rotation until Ctrl-C.
    Watch(WatchArgs),
}

/// `api fetch …`.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Fetch the caller's X509-SVIDs (and optionally write them to files).
    X509(FetchX509Args),
    /// Fetch JWT-SVIDs for an audience.
    Jwt(FetchJwtArgs),
}

/// `api validate …`.
#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt(ValidateJwtArgs),
}

/// `api fetch x509`.
#[derive(Debug, Args)]
pub struct FetchX509Args {
    #[command(flatten)]
    socket: SocketArgs,
    /// Write svid.pem, svid.key (0600) and bundle.pem (further SVIDs: svid.N.pem/.key) here.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Output format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// `api fetch jwt`.
#[derive(Debug, Args)]
pub struct FetchJwtArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Audience (repeatable; at least one).
    #[arg(long, required = true)]
    audience: Vec<String>,
    /// Only this SPIFFE ID (when the caller has several).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Output format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// `api validate jwt`.
#[derive(Debug, Args)]
pub struct ValidateJwtArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The audience the token must carry.
    #[arg(long)]
    audience: String,
    /// The token (JWT compact form).
    #[arg(long)]
    svid: String,
    /// Output format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// `api watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Also write each update to this directory (like `fetch x509 --write`).
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Exit after this many updates (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
}

/// Runs an `api` subcommand.
pub async fn run(cmd: ApiCommand) -> anyhow::Result<()> {
    let socket = match &cmd {
        ApiCommand::Fetch(FetchCommand::X509(a)) => &a.socket,
        ApiCommand::Fetch(FetchCommand::Jwt(a)) => &a.socket,
        ApiCommand::Validate(ValidateCommand::Jwt(a)) => &a.socket,
        ApiCommand::Watch(a) => &a.socket,
    }
    .resolve();
    let result = match cmd {
        ApiCommand::Fetch(FetchCommand::X509(a)) => fetch_x509(a).await,
        ApiCommand::Fetch(FetchCommand::Jwt(a)) => fetch_jwt(a).await,
        ApiCommand::Validate(ValidateCommand::Jwt(a)) => validate_jwt(a).await,
        ApiCommand::Watch(a) => watch(a).await,
    };
    // Unimplemented: the socket serves another API; say which.
    match (result, socket) {
        (Err(e), Ok(path)) => match e.downcast::<Unimplemented>() {
            Ok(u) => Err(sigil::socket_api::wrong_api(&path, Api::Workload, &u.what)
                .await
                .into()),
            Err(e) => Err(e),
        },
        (result, _) => result,
    }
}

async fn client(socket: &SocketArgs) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    connect(&socket.resolve()?).await
}

/// A Workload API client on the socket at `path`, with a clear error when nothing is there.
pub async fn connect(path: &Path) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    // What answers is believed (SVIDs, bundles, JWT validation): not in a directory anyone can
    // write to.
    if path.exists() {
        sigil::uds::check_client_path(path)?;
    }
    let ch = sigil::socket_api::connect(path, Api::Workload).await?;
    Ok(SpiffeWorkloadApiClient::new(ch))
}

/// A Workload API request with the required security header.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// A Workload API error with what to check for the common codes.
pub fn rpc_error(what: &str, s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        return anyhow::Error::new(Unimplemented {
            what: what.to_string(),
        });
    }
    if s.message().is_empty() {
        return anyhow::anyhow!("{what}: {:?} ({})", s.code(), s.code().description());
    }
    let hint = match s.code() {
        tonic::Code::PermissionDenied => {
            " — no registration entry matches this process; `sigil-agent explain --pid <pid>` shows why"
        }
        tonic::Code::Unavailable => " — is the agent synced with sigil-server?",
        _ => "",
    };
    anyhow::anyhow!("{what}: {} ({:?}){hint}", s.message(), s.code())
}

/// What one X509-SVID says, for printing.
struct SvidView {
    spiffe_id: String,
    hint: String,
    serial: String,
    not_after: i64,
    chain_len: usize,
}

fn view(svid: &wl::X509svid) -> anyhow::Result<SvidView> {
    let chain = sigil::x509::split_der_concat(&svid.x509_svid)
        .with_context(|| format!("SVID {} has a malformed chain", svid.spiffe_id))?;
    let leaf = chain
        .first()
        .ok_or_else(|| anyhow::anyhow!("SVID {} has an empty chain", svid.spiffe_id))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow::anyhow!("SVID {} leaf: {e}", svid.spiffe_id))?;
    Ok(SvidView {
        spiffe_id: svid.spiffe_id.clone(),
        hint: svid.hint.clone(),
        serial: cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_after: cert.validity().not_after.timestamp(),
        chain_len: chain.len(),
    })
}

/// Writes svid.pem, svid.key (0600), bundle.pem (and svid.N.* for further SVIDs,
/// federated_bundle.<td>.pem) as one version of `dir`: readers never see a certificate with
/// another version's key (see [`crate::helper::files`]).
fn write_files(dir: &Path, resp: &wl::X509svidResponse) -> anyhow::Result<()> {
    use crate::helper::files::{OutFile, VersionedDir};
    let mut files = Vec::new();
    for (i, svid) in resp.svids.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!(".{i}")
        };
        let chain = sigil::x509::split_der_concat(&svid.x509_svid)?;
        files.push(OutFile::new(
            format!("svid{suffix}.pem"),
            sigil::x509::to_pem_certs(&chain),
            0o644,
        ));
        files.push(OutFile::new(
            format!("svid{suffix}.key"),
            sigil::x509::to_pem("PRIVATE KEY", &svid.x509_svid_key),
            0o600,
        ));
        if i == 0 {
            let roots = sigil::x509::split_der_concat(&svid.bundle)?;
            files.push(OutFile::new(
                "bundle.pem",
                sigil::x509::to_pem_certs(&roots),
                0o644,
            ));
        }
    }
    for (td, der) in &resp.federated_bundles {
        let name = td.trim_start_matches("spiffe://");
        let roots = sigil::x509::split_der_concat(der)?;
        files.push(OutFile::new(
            format!("federated_bundle.{name}.pem"),
            sigil::x509::to_pem_certs(&roots),
            0o644,
        ));
    }
    VersionedDir::open(dir)?
        .publish(&files)
        .with_context(|| format!("writing the SVID files in {}", dir.display()))?;
    Ok(())
}

async fn fetch_x509(a: FetchX509Args) -> anyhow::Result<()> {
    let mut c = client(&a.socket).await?;
    // Real elapsed time, printed for the operator.
    #[allow(clippy::disallowed_types)]
    let started = std::time::Instant::now();
    let mut stream = c
        .fetch_x509svid(request(wl::X509svidRequest {}))
        .await
        .map_err(|s| rpc_error("FetchX509SVID", s))?
        .into_inner();
    let resp = stream
        .message()
        .await
        .map_err(|s| rpc_error("FetchX509SVID", s))?
        .ok_or_else(|| anyhow::anyhow!("the agent closed the stream without an SVID"))?;
    let elapsed = started.elapsed();
    let views = resp
        .svids
        .iter()
        .map(view)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(dir) = &a.write {
        write_files(dir, &resp)?;
    }
    if a.output == "json" {
        let svids: Vec<serde_json::Value> = views
            .iter()
            .map(|v| {
                serde_json::json!({"spiffe_id": v.spiffe_id, "hint": v.hint, "serial": v.serial,
                    "not_after": v.not_after, "chain_length": v.chain_len})
            })
            .collect();
        let doc = serde_json::json!({
            "svids": svids,
            "federated_trust_domains": resp.federated_bundles.keys().collect::<Vec<_>>(),
            "written_to": a.write.as_ref().map(|d| d.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "Received {} SVID(s) after {:.1} ms",
        views.len(),
        elapsed.as_secs_f64() * 1e3
    );
    for v in &views {
        println!();
        println!("SPIFFE ID : {}", v.spiffe_id);
        if !v.hint.is_empty() {
            println!("Hint      : {}", v.hint);
        }
        println!("Serial    : {}", v.serial);
        println!("Expires   : {}", time_text(v.not_after));
        println!("Chain     : {} certificate(s)", v.chain_len);
    }
    for td in resp.federated_bundles.keys() {
        println!("Federated : {td}");
    }
    if let Some(dir) = &a.write {
        println!();
        println!(
            "Written to {} (svid.pem, svid.key, bundle.pem)",
            dir.display()
        );
    }
    Ok(())
}

async fn fetch_jwt(a: FetchJwtArgs) -> anyhow::Result<()> {
    let mut c = client(&a.socket).await?;
    let resp = c
        .fetch_jwtsvid(request(wl::JwtsvidRequest {
            audience: a.audience.clone(),
            spiffe_id: a.spiffe_id.clone().unwrap_or_default(),
        }))
        .await
        .map_err(|s| rpc_error("FetchJWTSVID", s))?
        .into_inner();
    if a.output == "json" {
        let svids: Vec<serde_json::Value> = resp
            .svids
            .iter()
            .map(|s| serde_json::json!({"spiffe_id": s.spiffe_id, "hint": s.hint, "token": s.svid}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "svids": svids }))?
        );
        return Ok(());
    }
    for s in &resp.svids {
        println!("token({}):", s.spiffe_id);
        println!("\t{}", s.svid);
    }
    Ok(())
}

async fn validate_jwt(a: ValidateJwtArgs) -> anyhow::Result<()> {
    let mut c = client(&a.socket).await?;
    let resp = c
        .validate_jwtsvid(request(wl::ValidateJwtsvidRequest {
            audience: a.audience.clone(),
            svid: a.svid.clone(),
        }))
        .await
        .map_err(|s| rpc_error("ValidateJWTSVID", s))?
        .into_inner();
    let claims = resp
        .claims
        .map(struct_to_json)
        .unwrap_or(serde_json::Value::Null);
    if a.output == "json" {
        let doc = serde_json::json!({"spiffe_id": resp.spiffe_id, "claims": claims});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("SVID is valid.");
    println!("SPIFFE ID : {}", resp.spiffe_id);
    println!("Claims    : {claims}");
    Ok(())
}

/// First reconnect delay of `api watch`.
const WATCH_RETRY_START: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest reconnect delay of `api watch` (an agent restart takes a few seconds).
const WATCH_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The reconnect delay after `failures` failed attempts: doubling from [`WATCH_RETRY_START`]
/// up to [`WATCH_RETRY_MAX`], randomised in its upper half so restarted workloads spread out.
fn watch_retry_delay(failures: u32) -> std::time::Duration {
    use rand::Rng as _;
    let d = WATCH_RETRY_START
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(WATCH_RETRY_MAX);
    d / 2 + (d / 2).mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// Opens the FetchX509SVID stream.
async fn open_x509_stream(
    socket: &SocketArgs,
) -> Result<tonic::Streaming<wl::X509svidResponse>, WatchError> {
    let mut c = client(socket).await.map_err(WatchError::Connect)?;
    c.fetch_x509svid(request(wl::X509svidRequest {}))
        .await
        .map(tonic::Response::into_inner)
        .map_err(WatchError::Rpc)
}

/// Why a watch stream could not be (re)opened or ended.
enum WatchError {
    /// The socket is missing or refuses connections (the agent is restarting).
    Connect(anyhow::Error),
    /// The agent answered with an error status.
    Rpc(tonic::Status),
}

impl WatchError {
    /// A malformed request will not get better (SPIFFE clients retry everything else, as
    /// go-spiffe does: an agent just restarted answers Unavailable or PermissionDenied until
    /// it has synced).
    fn is_final(&self) -> bool {
        matches!(self, WatchError::Rpc(s) if s.code() == tonic::Code::InvalidArgument)
    }

    fn into_error(self) -> anyhow::Error {
        match self {
            WatchError::Connect(e) => e,
            WatchError::Rpc(s) => rpc_error("FetchX509SVID", s),
        }
    }
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchError::Connect(e) => write!(f, "{e:#}"),
            WatchError::Rpc(s) => write!(f, "{} ({:?})", s.message(), s.code()),
        }
    }
}

/// Streams X509-SVID updates. The first connection must succeed (a wrong socket path is an
/// error); afterwards a lost stream (agent restart, socket briefly gone) is reopened with
/// back-off and jitter until it works again or Ctrl-C, with a line on each side.
async fn watch(a: WatchArgs) -> anyhow::Result<()> {
    let mut stream = open_x509_stream(&a.socket)
        .await
        .map_err(WatchError::into_error)?;
    let mut seen = 0u64;
    let mut last_serials: Vec<String> = Vec::new();
    let mut reconnected = false;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let why = match msg {
            Ok(Some(resp)) => {
                seen += 1;
                let views = resp
                    .svids
                    .iter()
                    .map(view)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let serials: Vec<String> = views.iter().map(|v| v.serial.clone()).collect();
                let again = std::mem::take(&mut reconnected);
                let what = if seen == 1 {
                    "received"
                } else if serials != last_serials {
                    "rotated"
                } else if again {
                    "received again"
                } else {
                    "updated (bundle)"
                };
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                for v in &views {
                    println!(
                        "{} {what}: {} serial {} expires {}",
                        time_text(now),
                        v.spiffe_id,
                        v.serial,
                        time_text(v.not_after)
                    );
                }
                last_serials = serials;
                if let Some(dir) = &a.write {
                    write_files(dir, &resp)?;
                }
                if a.count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
                continue;
            }
            Ok(None) => "the agent closed the stream".to_string(),
            Err(s) => {
                let e = WatchError::Rpc(s);
                if e.is_final() {
                    return Err(e.into_error());
                }
                e.to_string()
            }
        };
        let now = || time_text(time::OffsetDateTime::now_utc().unix_timestamp());
        eprintln!("{} Workload API stream lost: {why}; reconnecting", now());
        let mut failures = 0u32;
        stream = loop {
            let delay = watch_retry_delay(failures);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            match open_x509_stream(&a.socket).await {
                Ok(s) => break s,
                Err(e) if e.is_final() => return Err(e.into_error()),
                Err(e) => {
                    failures += 1;
                    // 1st, 2nd, 4th, 8th... failure: an agent down for long costs a few lines.
                    if failures.is_power_of_two() {
                        eprintln!("{} still reconnecting ({failures} attempts): {e}", now());
                    }
                }
            }
        };
        println!("{} reconnected to the Workload API", now());
        reconnected = true;
    }
}

/// A protobuf `Struct` as JSON.
fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => {
            // Claims such as exp are integers; print them as such.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                (n as i64).into()
            } else {
                n.into()
            }
        }
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_reconnects_back_off_with_jitter_up_to_a_cap() {
        for failures in 0..40 {
            let cap = WATCH_RETRY_START
                .saturating_mul(2u32.saturating_pow(failures.min(16)))
                .min(WATCH_RETRY_MAX);
            let d = watch_retry_delay(failures);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} vs {cap:?}");
        }
    }

    #[test]
    fn endpoint_addresses() {
        assert_eq!(
            endpoint_to_path("unix:///run/sigil/api.sock").unwrap(),
            PathBuf::from("/run/sigil/api.sock")
        );
        assert_eq!(
            endpoint_to_path("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(endpoint_to_path("tcp://127.0.0.1:1").is_err());
        assert!(endpoint_to_path("unix:relative.sock").is_err());
    }
}
