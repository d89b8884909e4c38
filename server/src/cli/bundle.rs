//! `sigil-server bundle show [--format pem|spiffe]` (this server's trust bundle) and
//! `bundle set|list|delete` (federated bundles of foreign trust domains, as SPIRE's).

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use sigil::bundle::Bundle;
use sigil::proto::admin as pb;
use sigil::{SpiffeId, TrustDomain};

use super::output::{self, Output};
use super::{connect, status_error, Common};

/// Bundle subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print this server's trust bundle (PEM roots, or the SPIFFE bundle JSON).
    Show(ShowArgs),
    /// Create or replace the bundle of a foreign trust domain (federation).
    Set(SetArgs),
    /// List the bundles of foreign trust domains.
    List(Common),
    /// Delete the bundle of a foreign trust domain.
    Delete(DeleteArgs),
}

impl BundleCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        match self {
            Self::Show(a) => &a.common,
            Self::Set(a) => &a.common,
            Self::List(c) => c,
            Self::Delete(a) => &a.common,
        }
    }
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// PEM root certificates (what `sigil-agent --trust-bundle` reads).
    Pem,
    /// SPIFFE bundle: JWKS with x509-svid and jwt-svid keys.
    Spiffe,
}

/// `bundle show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Bundle format.
    #[arg(long, value_enum, default_value_t = Format::Pem)]
    format: Format,
    #[command(flatten)]
    common: Common,
}

/// `bundle set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The foreign trust domain: `other.org` or `spiffe://other.org`.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// File holding the bundle (`-` = stdin).
    #[arg(long, value_name = "FILE")]
    path: PathBuf,
    /// Format of the file.
    #[arg(long, value_enum, default_value_t = Format::Pem)]
    format: Format,
    #[command(flatten)]
    common: Common,
}

/// `bundle delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The foreign trust domain: `other.org` or `spiffe://other.org`.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    #[command(flatten)]
    common: Common,
}

/// Checks a trust domain flag (`--id`) before anything is sent: a trust domain name or its
/// ID, without a path.
pub(super) fn trust_domain_arg(flag: &str, id: &str) -> anyhow::Result<TrustDomain> {
    if let Ok(parsed) = SpiffeId::parse(id) {
        if !parsed.path().is_empty() {
            anyhow::bail!(
                "invalid {flag} {}: a trust domain has no path; use {}",
                sigil::text::quote_for_display(id),
                parsed.trust_domain().id_string()
            );
        }
    }
    TrustDomain::new(id).map_err(|e| {
        anyhow::anyhow!(
            "invalid {flag} {}: {e} (expected e.g. other.org or spiffe://other.org)",
            sigil::text::quote_for_display(id)
        )
    })
}

/// Reads the file named by `flag` (`-` = stdin).
pub(super) fn read_input(path: &PathBuf, flag: &str) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the bundle from stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {flag} {}", path.display()))
}

/// Number of X.509 roots and JWT keys of a bundle as the server sent it.
pub(super) fn counts(b: &pb::FederatedBundle) -> (usize, usize) {
    TrustDomain::new(&b.trust_domain)
        .ok()
        .and_then(|td| Bundle::from_spiffe_json(td, &b.spiffe_bundle_json).ok())
        .map_or((0, 0), |p| {
            (p.x509_authorities.len(), p.jwt_authorities.len())
        })
}

/// The JSON shape of one federated bundle (the same fields as `bundle show --output json`).
fn federated_json(b: &pb::FederatedBundle) -> anyhow::Result<serde_json::Value> {
    let spiffe: serde_json::Value = serde_json::from_str(&b.spiffe_bundle_json)
        .map_err(|e| anyhow::anyhow!("server sent an invalid SPIFFE bundle: {e}"))?;
    Ok(serde_json::json!({
        "trust_domain": b.trust_domain,
        "sequence_number": b.sequence_number,
        "x509_pem": b.x509_pem,
        "spiffe_bundle": spiffe,
    }))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Runs a bundle subcommand.
pub async fn run(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Show(a) => show(a).await,
        BundleCommand::Set(a) => set(a).await,
        BundleCommand::List(common) => list(common).await,
        BundleCommand::Delete(a) => delete(a).await,
    }
}

async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.common.admin_socket).await?;
    let b = client
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(|s| status_error("fetching bundle", s))?
        .into_inner();
    match (a.common.output, a.format) {
        (Output::Json, _) => {
            let spiffe: serde_json::Value = serde_json::from_str(&b.spiffe_bundle_json)
                .map_err(|e| anyhow::anyhow!("server sent an invalid SPIFFE bundle: {e}"))?;
            output::print_json(&serde_json::json!({
                "trust_domain": b.trust_domain,
                "sequence_number": b.sequence_number,
                "x509_pem": b.x509_pem,
                "spiffe_bundle": spiffe,
            }));
        }
        (Output::Text, Format::Pem) => print!("{}", b.x509_pem),
        (Output::Text, Format::Spiffe) => println!("{}", b.spiffe_bundle_json),
    }
    Ok(())
}

async fn set(a: SetArgs) -> anyhow::Result<()> {
    use pb::set_federated_bundle_request::Bundle as Input;
    let td = trust_domain_arg("--id", &a.id)?;
    let content = read_input(&a.path, "--path")?;
    let bundle = match a.format {
        Format::Pem => Input::X509Pem(content),
        Format::Spiffe => Input::SpiffeBundleJson(content),
    };
    let mut client = connect(&a.common.admin_socket).await?;
    let stored = client
        .set_federated_bundle(pb::SetFederatedBundleRequest {
            trust_domain: td.to_string(),
            bundle: Some(bundle),
        })
        .await
        .map_err(|s| status_error(&format!("setting the bundle of {td}"), s))?
        .into_inner()
        .bundle
        .ok_or_else(|| anyhow::anyhow!("server returned no bundle"))?;
    match a.common.output {
        Output::Json => output::print_json(&federated_json(&stored)?),
        Output::Text => {
            let (x509, jwt) = counts(&stored);
            println!(
                "Federated bundle of {} set (sequence {}, {}, {})",
                stored.trust_domain,
                stored.sequence_number,
                plural(x509, "X.509 root", "X.509 roots"),
                plural(jwt, "JWT key", "JWT keys")
            );
        }
    }
    Ok(())
}

async fn list(common: Common) -> anyhow::Result<()> {
    let mut client = connect(&common.admin_socket).await?;
    let bundles = client
        .list_federated_bundles(pb::ListFederatedBundlesRequest {})
        .await
        .map_err(|s| status_error("listing federated bundles", s))?
        .into_inner()
        .bundles;
    match common.output {
        Output::Json => {
            let list = bundles
                .iter()
                .map(federated_json)
                .collect::<anyhow::Result<Vec<_>>>()?;
            output::print_json(&serde_json::json!({ "bundles": list }));
        }
        Output::Text => {
            println!(
                "Found {}",
                plural(bundles.len(), "federated bundle", "federated bundles")
            );
            if !bundles.is_empty() {
                let rows: Vec<Vec<String>> = bundles
                    .iter()
                    .map(|b| {
                        let (x509, jwt) = counts(b);
                        vec![
                            b.trust_domain.clone(),
                            x509.to_string(),
                            jwt.to_string(),
                            b.sequence_number.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &["TRUST DOMAIN", "X509 ROOTS", "JWT KEYS", "SEQUENCE"],
                        &rows
                    )
                );
            }
        }
    }
    Ok(())
}

async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let td = trust_domain_arg("--id", &a.id)?;
    let mut client = connect(&a.common.admin_socket).await?;
    client
        .delete_federated_bundle(pb::DeleteFederatedBundleRequest {
            trust_domain: td.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("deleting the bundle of {td}"), s))?;
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({ "deleted": td.to_string() })),
        Output::Text => println!("Federated bundle of {td} deleted"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_accepts_names_and_trust_domain_ids_only() {
        assert_eq!(
            trust_domain_arg("--id", "other.org")
                .map(|t| t.to_string())
                .ok(),
            Some("other.org".into())
        );
        assert_eq!(
            trust_domain_arg("--id", "spiffe://other.org")
                .map(|t| t.to_string())
                .ok(),
            Some("other.org".into())
        );
        let err = trust_domain_arg("--id", "spiffe://other.org/w").expect_err("path");
        assert!(err.to_string().contains("has no path"), "{err}");
        let err = trust_domain_arg("--id", "Other Org").expect_err("bad name");
        assert!(err.to_string().contains("invalid --id"), "{err}");
    }
}
