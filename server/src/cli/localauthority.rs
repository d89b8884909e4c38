//! `sigil-server localauthority x509|jwt show|prepare|activate|taint|revoke`, as SPIRE's
//! `localauthority`: the CA's X.509 authorities and JWT keys (active, prepared, old).

use clap::{Args, Subcommand};
use sigil::proto::admin as pb;

use super::output::{self, Output};
use super::{connect, status_error, Common};

/// Which authorities.
#[derive(Debug, Subcommand)]
pub enum LocalAuthorityCommand {
    /// The X.509 authorities that sign X509-SVIDs (ID: subject key ID, hex).
    #[command(subcommand)]
    X509(AuthorityCommand),
    /// The JWT keys that sign JWT-SVIDs (ID: the key ID, `kid`).
    #[command(subcommand)]
    Jwt(AuthorityCommand),
}

/// What to do with them.
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// List the active, prepared and old authorities.
    Show(Common),
    /// Make a prepared authority now (published in the bundle; signs once activated).
    Prepare(Common),
    /// Activate the prepared authority; the active one becomes old.
    Activate(OptionalId),
    /// Mark an old authority tainted: agents re-mint what it signed.
    Taint(RequiredId),
    /// Remove a tainted, non-active authority from the bundle.
    Revoke(RequiredId),
}

/// `activate`.
#[derive(Debug, Args)]
pub struct OptionalId {
    /// The prepared authority's ID (checked when given).
    #[arg(long, value_name = "ID")]
    authority_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `taint`, `revoke`.
#[derive(Debug, Args)]
pub struct RequiredId {
    /// The authority's ID, as `show` lists it.
    #[arg(long, value_name = "ID")]
    authority_id: String,
    #[command(flatten)]
    common: Common,
}

impl LocalAuthorityCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        let (Self::X509(c) | Self::Jwt(c)) = self;
        match c {
            AuthorityCommand::Show(c) | AuthorityCommand::Prepare(c) => c,
            AuthorityCommand::Activate(a) => &a.common,
            AuthorityCommand::Taint(a) | AuthorityCommand::Revoke(a) => &a.common,
        }
    }
}

fn json(a: &pb::LocalAuthority) -> serde_json::Value {
    serde_json::json!({
        "authority_id": a.authority_id,
        "slot": a.slot,
        "not_before": a.not_before,
        "not_after": a.not_after,
        "tainted": a.tainted,
    })
}

fn row(a: &pb::LocalAuthority) -> Vec<String> {
    vec![
        a.slot.clone(),
        a.authority_id.clone(),
        output::time_text(a.not_after),
        if a.tainted { "yes" } else { "no" }.to_string(),
    ]
}

/// Prints one authority after a change.
fn print_one(out: Output, verb: &str, name: &str, a: Option<&pb::LocalAuthority>) {
    match (out, a) {
        (Output::Json, Some(a)) => output::print_json(&json(a)),
        (Output::Json, None) => output::print_json(&serde_json::Value::Null),
        (Output::Text, Some(a)) => println!(
            "{name} authority {} {verb} (slot {}, not after {}{})",
            a.authority_id,
            a.slot,
            output::time_text(a.not_after),
            if a.tainted { ", tainted" } else { "" }
        ),
        (Output::Text, None) => println!("{name} authority {verb}"),
    }
}

/// Runs a localauthority subcommand.
pub async fn run(cmd: LocalAuthorityCommand) -> anyhow::Result<()> {
    let (kind, name, cmd) = match cmd {
        LocalAuthorityCommand::X509(c) => (pb::AuthorityKind::X509, "X.509", c),
        LocalAuthorityCommand::Jwt(c) => (pb::AuthorityKind::Jwt, "JWT", c),
    };
    let kind = kind as i32;
    match cmd {
        AuthorityCommand::Show(common) => {
            let mut client = connect(&common.admin_socket).await?;
            let s = client
                .get_local_authority_state(pb::GetLocalAuthorityStateRequest { kind })
                .await
                .map_err(|s| status_error(&format!("listing the {name} authorities"), s))?
                .into_inner();
            let all: Vec<&pb::LocalAuthority> = s
                .active
                .iter()
                .chain(s.prepared.iter())
                .chain(s.old.iter())
                .collect();
            match common.output {
                Output::Json => output::print_json(&serde_json::json!({
                    "active": s.active.as_ref().map(json),
                    "prepared": s.prepared.as_ref().map(json),
                    "old": s.old.iter().map(json).collect::<Vec<_>>(),
                })),
                Output::Text => print!(
                    "{}",
                    output::table(
                        &["SLOT", "AUTHORITY ID", "NOT AFTER", "TAINTED"],
                        &all.into_iter().map(row).collect::<Vec<_>>()
                    )
                ),
            }
        }
        AuthorityCommand::Prepare(common) => {
            let mut client = connect(&common.admin_socket).await?;
            let r = client
                .prepare_local_authority(pb::PrepareLocalAuthorityRequest { kind })
                .await
                .map_err(|s| status_error(&format!("preparing a {name} authority"), s))?
                .into_inner();
            print_one(common.output, "prepared", name, r.prepared.as_ref());
        }
        AuthorityCommand::Activate(a) => {
            let mut client = connect(&a.common.admin_socket).await?;
            let r = client
                .activate_local_authority(pb::ActivateLocalAuthorityRequest {
                    kind,
                    authority_id: a.authority_id.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&format!("activating the prepared {name} authority"), s))?
                .into_inner();
            print_one(a.common.output, "activated", name, r.active.as_ref());
        }
        AuthorityCommand::Taint(a) => {
            let mut client = connect(&a.common.admin_socket).await?;
            let r = client
                .taint_local_authority(pb::TaintLocalAuthorityRequest {
                    kind,
                    authority_id: a.authority_id.clone(),
                })
                .await
                .map_err(|s| {
                    status_error(&format!("tainting {name} authority {}", a.authority_id), s)
                })?
                .into_inner();
            print_one(a.common.output, "tainted", name, r.tainted.as_ref());
        }
        AuthorityCommand::Revoke(a) => {
            let mut client = connect(&a.common.admin_socket).await?;
            let r = client
                .revoke_local_authority(pb::RevokeLocalAuthorityRequest {
                    kind,
                    authority_id: a.authority_id.clone(),
                })
                .await
                .map_err(|s| {
                    status_error(&format!("revoking {name} authority {}", a.authority_id), s)
                })?
                .into_inner();
            print_one(
                a.common.output,
                "revoked (removed from the bundle)",
                name,
                r.revoked.as_ref(),
            );
        }
    }
    Ok(())
}
