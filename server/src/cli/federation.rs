//! `sigil-server federation create|update|show|list|delete|refresh`: federation relationships
//! with other trust domains, with SPIRE's flags in Rust style (`-bundleEndpointURL` is
//! `--bundle-endpoint-url`, ...).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use sigil::proto::admin as pb;
use sigil::TrustDomain;

use super::bundle::trust_domain_arg;
use super::output::{self, Output};
use super::{connect, status_error, Common};

/// Federation subcommands.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Create a federation relationship: fetch a foreign trust domain's bundle from its endpoint.
    Create(RelationshipArgs),
    /// Replace the endpoint URL and profile of a relationship.
    Update(RelationshipArgs),
    /// Show one relationship, with its refresh status and stored bundle.
    Show(IdArgs),
    /// List the relationships (the datastore's and the config file's).
    List(Common),
    /// Delete a relationship (its federated bundle stays; see `bundle delete`).
    Delete(IdArgs),
    /// Fetch a relationship's bundle now and print the outcome.
    Refresh(IdArgs),
}

impl FederationCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        match self {
            Self::Create(a) | Self::Update(a) => &a.common,
            Self::Show(a) | Self::Delete(a) | Self::Refresh(a) => &a.common,
            Self::List(c) => c,
        }
    }
}

/// Endpoint profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Profile {
    /// Web PKI: the endpoint's certificate chains to the system roots.
    HttpsWeb,
    /// SPIFFE authentication: the endpoint presents --endpoint-spiffe-id.
    HttpsSpiffe,
}

/// Trust domain bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM root certificates.
    Pem,
    /// SPIFFE bundle (JWKS).
    Spiffe,
}

/// `federation create` and `update`.
#[derive(Debug, Args)]
pub struct RelationshipArgs {
    /// The foreign trust domain: `other.org` or `spiffe://other.org`.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    trust_domain: String,
    /// Its bundle endpoint, `https://host[:port][/path]`.
    #[arg(long, value_name = "URL")]
    bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    #[arg(long, value_enum, value_name = "PROFILE")]
    bundle_endpoint_profile: Profile,
    /// The SPIFFE ID the endpoint presents (https_spiffe only).
    #[arg(long, value_name = "SPIFFE_ID")]
    endpoint_spiffe_id: Option<String>,
    /// The foreign trust domain's bundle to start from (`-` = stdin). With https_spiffe it
    /// authenticates the first fetch, unless a bundle is stored already (`bundle set`).
    #[arg(long, value_name = "FILE")]
    trust_domain_bundle_path: Option<PathBuf>,
    /// Format of that file.
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem, requires = "trust_domain_bundle_path")]
    trust_domain_bundle_format: BundleFormat,
    #[command(flatten)]
    common: Common,
}

/// Commands naming one relationship.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The foreign trust domain: `other.org` or `spiffe://other.org`.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    #[command(flatten)]
    common: Common,
}

/// Runs a federation subcommand.
pub async fn run(cmd: FederationCommand) -> anyhow::Result<()> {
    match cmd {
        FederationCommand::Create(a) => create_or_update(a, false).await,
        FederationCommand::Update(a) => create_or_update(a, true).await,
        FederationCommand::Show(a) => show(a).await,
        FederationCommand::List(c) => list(c).await,
        FederationCommand::Delete(a) => delete(a).await,
        FederationCommand::Refresh(a) => refresh(a).await,
    }
}

/// What a create/update sends.
#[derive(Debug)]
struct Request {
    trust_domain: TrustDomain,
    relationship: pb::FederationRelationship,
    /// The initial bundle's content, and whether it is PEM (else a SPIFFE bundle).
    bundle: Option<(bool, String)>,
}

/// The relationship and initial bundle a create/update sends, checked as far as the CLI can.
fn request(a: &RelationshipArgs) -> anyhow::Result<Request> {
    let td = trust_domain_arg("--trust-domain", &a.trust_domain)?;
    let profile = match a.bundle_endpoint_profile {
        Profile::HttpsWeb => "https_web",
        Profile::HttpsSpiffe => "https_spiffe",
    };
    match (a.bundle_endpoint_profile, &a.endpoint_spiffe_id) {
        (Profile::HttpsSpiffe, None) => anyhow::bail!(
            "--bundle-endpoint-profile https_spiffe needs --endpoint-spiffe-id (the SPIFFE ID the \
             endpoint presents, e.g. spiffe://{td}/spire/server)"
        ),
        (Profile::HttpsWeb, Some(_)) => {
            anyhow::bail!("--endpoint-spiffe-id is only for --bundle-endpoint-profile https_spiffe")
        }
        _ => {}
    }
    let bundle = a
        .trust_domain_bundle_path
        .as_ref()
        .map(|p| {
            super::bundle::read_input(p, "--trust-domain-bundle-path")
                .map(|content| (a.trust_domain_bundle_format == BundleFormat::Pem, content))
        })
        .transpose()?;
    Ok(Request {
        relationship: pb::FederationRelationship {
            trust_domain: td.to_string(),
            bundle_endpoint_url: a.bundle_endpoint_url.clone(),
            bundle_endpoint_profile: profile.into(),
            endpoint_spiffe_id: a.endpoint_spiffe_id.clone().unwrap_or_default(),
            ..Default::default()
        },
        trust_domain: td,
        bundle,
    })
}

async fn create_or_update(a: RelationshipArgs, update: bool) -> anyhow::Result<()> {
    let Request {
        trust_domain: td,
        relationship,
        bundle,
    } = request(&a)?;
    let mut client = connect(&a.common.admin_socket).await?;
    let stored = if update {
        use pb::update_federation_relationship_request::TrustDomainBundle as B;
        client
            .update_federation_relationship(pb::UpdateFederationRelationshipRequest {
                relationship: Some(relationship),
                trust_domain_bundle: bundle.map(|(pem, c)| {
                    if pem {
                        B::X509Pem(c)
                    } else {
                        B::SpiffeBundleJson(c)
                    }
                }),
            })
            .await
            .map_err(|s| status_error(&format!("updating the relationship with {td}"), s))?
            .into_inner()
            .relationship
    } else {
        use pb::create_federation_relationship_request::TrustDomainBundle as B;
        client
            .create_federation_relationship(pb::CreateFederationRelationshipRequest {
                relationship: Some(relationship),
                trust_domain_bundle: bundle.map(|(pem, c)| {
                    if pem {
                        B::X509Pem(c)
                    } else {
                        B::SpiffeBundleJson(c)
                    }
                }),
            })
            .await
            .map_err(|s| status_error(&format!("creating the relationship with {td}"), s))?
            .into_inner()
            .relationship
    }
    .ok_or_else(|| anyhow::anyhow!("server returned no relationship"))?;
    match a.common.output {
        Output::Json => output::print_json(&relationship_json(&stored)),
        Output::Text => {
            println!(
                "Federation relationship with {} {}",
                stored.trust_domain,
                if update { "updated" } else { "created" }
            );
            print!("{}", describe(&stored));
        }
    }
    Ok(())
}

async fn show(a: IdArgs) -> anyhow::Result<()> {
    let td = trust_domain_arg("--id", &a.id)?;
    let mut client = connect(&a.common.admin_socket).await?;
    let r = client
        .get_federation_relationship(pb::GetFederationRelationshipRequest {
            trust_domain: td.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("showing the relationship with {td}"), s))?
        .into_inner()
        .relationship
        .ok_or_else(|| anyhow::anyhow!("server returned no relationship"))?;
    match a.common.output {
        Output::Json => output::print_json(&relationship_json(&r)),
        Output::Text => print!("{}", describe(&r)),
    }
    Ok(())
}

async fn list(common: Common) -> anyhow::Result<()> {
    let mut client = connect(&common.admin_socket).await?;
    let all = client
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
        .await
        .map_err(|s| status_error("listing federation relationships", s))?
        .into_inner()
        .relationships;
    match common.output {
        Output::Json => output::print_json(&serde_json::json!({
            "relationships": all.iter().map(relationship_json).collect::<Vec<_>>(),
        })),
        Output::Text => {
            let n = all.len();
            println!(
                "Found {n} federation relationship{}",
                if n == 1 { "" } else { "s" }
            );
            if n > 0 {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|r| {
                        vec![
                            r.trust_domain.clone(),
                            r.bundle_endpoint_url.clone(),
                            r.bundle_endpoint_profile.clone(),
                            r.source.clone(),
                            refresh_summary(r),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &[
                            "TRUST DOMAIN",
                            "BUNDLE ENDPOINT URL",
                            "PROFILE",
                            "SOURCE",
                            "REFRESH"
                        ],
                        &rows
                    )
                );
            }
        }
    }
    Ok(())
}

async fn delete(a: IdArgs) -> anyhow::Result<()> {
    let td = trust_domain_arg("--id", &a.id)?;
    let mut client = connect(&a.common.admin_socket).await?;
    client
        .delete_federation_relationship(pb::DeleteFederationRelationshipRequest {
            trust_domain: td.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("deleting the relationship with {td}"), s))?;
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({ "deleted": td.to_string() })),
        Output::Text => println!(
            "Federation relationship with {td} deleted (its federated bundle stays: `bundle delete --id {td}` removes it)"
        ),
    }
    Ok(())
}

async fn refresh(a: IdArgs) -> anyhow::Result<()> {
    let td = trust_domain_arg("--id", &a.id)?;
    let mut client = connect(&a.common.admin_socket).await?;
    let r = client
        .refresh_bundle(pb::RefreshBundleRequest {
            trust_domain: td.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("refreshing the bundle of {td}"), s))?
        .into_inner();
    let rel = r
        .relationship
        .ok_or_else(|| anyhow::anyhow!("server returned no relationship"))?;
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({
            "changed": r.changed,
            "relationship": relationship_json(&rel),
        })),
        Output::Text => {
            let sequence = rel.bundle.as_ref().map_or(0, |b| b.sequence_number);
            if r.changed {
                println!("Bundle of {td} refreshed: changed (sequence {sequence})");
            } else {
                println!("Bundle of {td} refreshed: unchanged (sequence {sequence})");
            }
        }
    }
    Ok(())
}

/// `ok`, `failing (N)`, or `pending` for the list's REFRESH column.
fn refresh_summary(r: &pb::FederationRelationship) -> String {
    match &r.status {
        None => "pending".into(),
        Some(s) if !s.last_error.is_empty() => format!("failing ({})", s.consecutive_failures),
        Some(s) if s.last_success_at > 0 => "ok".into(),
        Some(_) => "pending".into(),
    }
}

/// A Unix time as RFC 3339, or `never` for 0.
fn time(t: i64) -> String {
    if t == 0 {
        return "never".into();
    }
    output::time_text(t)
}

/// The text form of one relationship.
fn describe(r: &pb::FederationRelationship) -> String {
    let mut pairs = vec![
        ("Trust domain", r.trust_domain.clone()),
        ("Bundle endpoint URL", r.bundle_endpoint_url.clone()),
        ("Bundle endpoint profile", r.bundle_endpoint_profile.clone()),
    ];
    if !r.endpoint_spiffe_id.is_empty() {
        pairs.push(("Endpoint SPIFFE ID", r.endpoint_spiffe_id.clone()));
    }
    pairs.push(("Source", r.source.clone()));
    pairs.push((
        "Bundle",
        match &r.bundle {
            Some(b) => {
                let (x509, jwt) = super::bundle::counts(b);
                format!(
                    "sequence {}, {x509} X.509 root(s), {jwt} JWT key(s)",
                    b.sequence_number
                )
            }
            None => "none stored yet".into(),
        },
    ));
    match &r.status {
        None => pairs.push(("Last refresh", "not attempted yet".into())),
        Some(s) => {
            pairs.push(("Last refresh", time(s.last_attempt_at)));
            pairs.push(("Last success", time(s.last_success_at)));
            if !s.last_error.is_empty() {
                pairs.push((
                    "Last error",
                    format!(
                        "{} ({} failure(s) in a row)",
                        s.last_error, s.consecutive_failures
                    ),
                ));
            }
            pairs.push(("Next attempt", time(s.next_attempt_at)));
        }
    }
    output::key_values(&pairs)
}

/// The JSON shape of one relationship (stable field names, SPIRE's where it has them).
fn relationship_json(r: &pb::FederationRelationship) -> serde_json::Value {
    let bundle = r.bundle.as_ref().map(|b| {
        let (x509, jwt) = super::bundle::counts(b);
        serde_json::json!({
            "sequence_number": b.sequence_number,
            "x509_roots": x509,
            "jwt_keys": jwt,
        })
    });
    let status = r.status.as_ref().map(|s| {
        serde_json::json!({
            "last_attempt_at": s.last_attempt_at,
            "last_success_at": s.last_success_at,
            "last_error": s.last_error,
            "next_attempt_at": s.next_attempt_at,
            "consecutive_failures": s.consecutive_failures,
        })
    });
    serde_json::json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "bundle_endpoint_profile": r.bundle_endpoint_profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "source": r.source,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "bundle": bundle,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(profile: Profile, id: Option<&str>) -> RelationshipArgs {
        RelationshipArgs {
            trust_domain: "other.org".into(),
            bundle_endpoint_url: "https://other.org".into(),
            bundle_endpoint_profile: profile,
            endpoint_spiffe_id: id.map(str::to_string),
            trust_domain_bundle_path: None,
            trust_domain_bundle_format: BundleFormat::Pem,
            common: Common {
                admin_socket: PathBuf::from("/nonexistent"),
                output: Output::Text,
            },
        }
    }

    #[test]
    fn profile_and_endpoint_id_go_together() {
        let err = request(&args(Profile::HttpsSpiffe, None)).expect_err("no id");
        assert!(
            err.to_string().contains("needs --endpoint-spiffe-id"),
            "{err}"
        );
        let err = request(&args(Profile::HttpsWeb, Some("spiffe://other.org/s"))).expect_err("id");
        assert!(err.to_string().contains("only for"), "{err}");
        let r = request(&args(Profile::HttpsSpiffe, Some("spiffe://other.org/s"))).expect("valid");
        assert_eq!(r.relationship.bundle_endpoint_profile, "https_spiffe");
        assert!(r.bundle.is_none());
    }
}
