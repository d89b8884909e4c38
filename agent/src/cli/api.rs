//! `sigil-agent api …`: a Workload API client for operators — fetch, validate and watch what a
//! process on this node gets, exactly as a workload would (same socket, same attestation).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
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
                "SPIFFE_ENDPOINT_SOCKET={endpoint:?} is not a unix: address (expected unix:///path/to/api.sock)"
            )
        })?;
    if !path.starts_with('/') {
        anyhow::bail!("SPIFFE_ENDPOINT_SOCKET={endpoint:?} must name an absolute path");
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
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509(a)) => fetch_x509(a).await,
        ApiCommand::Fetch(FetchCommand::Jwt(a)) => fetch_jwt(a).await,
        ApiCommand::Validate(ValidateCommand::Jwt(a)) => validate_jwt(a).await,
        ApiCommand::Watch(a) => watch(a).await,
    }
}

async fn client(socket: &SocketArgs) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    connect(&socket.resolve()?).await
}

/// A Workload API client on the socket at `path`, with a clear error when nothing is there.
pub async fn connect(path: &Path) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    if !path.exists() {
        anyhow::bail!(
            "Workload API socket {} does not exist: is sigil-agent running? (use --socket-path or SPIFFE_ENDPOINT_SOCKET)",
            path.display()
        );
    }
    let ch = sigil::uds::connect(path)
        .await
        .with_context(|| format!("connecting to {}", path.display()))?;
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
    let started = Instant::now();
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

async fn watch(a: WatchArgs) -> anyhow::Result<()> {
    let mut c = client(&a.socket).await?;
    let mut stream = c
        .fetch_x509svid(request(wl::X509svidRequest {}))
        .await
        .map_err(|s| rpc_error("FetchX509SVID", s))?
        .into_inner();
    let mut seen = 0u64;
    let mut last_serials: Vec<String> = Vec::new();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|s| rpc_error("FetchX509SVID stream", s))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(resp) = msg else {
            anyhow::bail!("the agent closed the stream");
        };
        seen += 1;
        let views = resp
            .svids
            .iter()
            .map(view)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let serials: Vec<String> = views.iter().map(|v| v.serial.clone()).collect();
        let what = if seen == 1 {
            "received"
        } else if serials != last_serials {
            "rotated"
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
