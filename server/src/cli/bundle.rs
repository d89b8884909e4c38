//! `sigil-server bundle show [--format pem|spiffe]`.

use clap::{Args, Subcommand, ValueEnum};
use sigil::proto::admin as pb;

use super::output::{self, Output};
use super::{connect, status_error, Common};

/// Bundle subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle (PEM roots, or the SPIFFE bundle JSON).
    Show(ShowArgs),
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

/// Runs a bundle subcommand.
pub async fn run(cmd: BundleCommand) -> anyhow::Result<()> {
    let BundleCommand::Show(a) = cmd;
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
