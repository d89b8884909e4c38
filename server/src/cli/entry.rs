//! `sigil-server entry create|show|update|delete|count`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use sigil::proto::admin as pb;
use sigil::{Selector, SpiffeId, TrustDomain};

use super::output::{self, EntryJson, Output};
use super::spire_data::{self, DataFormat, FormatArg, SpireImport};
use super::{connect, status_error, Common};

/// Entries per BatchCreateEntries call (well under gRPC's 4 MB message limit).
const CHUNK: usize = 500;

/// Entry subcommands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create one entry from flags, or many from a JSON file (--data).
    Create(CreateArgs),
    /// Show entries, filtered.
    Show(ShowArgs),
    /// Change fields of an entry; only the fields given are changed.
    Update(UpdateArgs),
    /// Delete an entry.
    Delete(DeleteArgs),
    /// Count entries, filtered.
    Count(FilterArgs),
}

impl EntryCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        match self {
            Self::Create(a) => &a.common,
            Self::Show(a) => &a.filter.common,
            Self::Update(a) => &a.common,
            Self::Delete(a) => &a.common,
            Self::Count(a) => &a.common,
        }
    }
}

/// Entry content flags shared by create and update.
#[derive(Debug, Clone, Default, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the entry grants, e.g. spiffe://example.org/web.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// The agent or node alias the entry is registered under.
    #[arg(long, value_name = "ID", conflicts_with = "node")]
    pub parent_id: Option<String>,
    /// Make this a node-alias entry (its parent is the server); its selectors match agents.
    #[arg(long)]
    pub node: bool,
    /// A selector type:value the workload must have, e.g. unix:uid:1000 (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<String>,
    /// X509-SVID TTL, e.g. 1h or 3600 (seconds).
    #[arg(long, value_name = "DURATION", visible_alias = "x509-svid-ttl")]
    pub x509_ttl: Option<String>,
    /// JWT-SVID TTL, e.g. 5m.
    #[arg(long, value_name = "DURATION", visible_alias = "jwt-svid-ttl")]
    pub jwt_ttl: Option<String>,
    /// DNS name to add to the X509-SVID (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Grant admin rights (--admin or --admin=false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub admin: Option<bool>,
    /// The workload is a downstream server (--downstream or --downstream=false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub downstream: Option<bool>,
    /// Trust domain to federate with (repeatable).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    pub federates_with: Vec<String>,
    /// Hint to tell this SVID apart from others the workload gets.
    #[arg(long)]
    pub hint: Option<String>,
}

/// `entry create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    fields: EntryFields,
    /// JSON file of entries to create ("-" for stdin): Sigil's {"entries": [{"spiffe_id": ...,
    /// ...}]}, the output of `spire-server entry show -output json`, or the input of
    /// `spire-server entry create -data` (see --format).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["spiffe_id", "parent_id", "node", "selectors"])]
    data: Option<PathBuf>,
    /// The --data file's format. auto: SPIFFE IDs as {trust_domain, path} objects are SPIRE's
    /// `entry show` output; string IDs are SPIRE's `entry create -data` input when the file
    /// has what only that has (entryExpiry, store_svid, entry_id, revision_number, created_at,
    /// IDs under /spire/), else Sigil's. SPIRE's entries are mapped (parent
    /// spiffe://TD/spire/server → spiffe://TD/sigil/server) and those Sigil cannot honour
    /// are refused, each with its reason, without stopping the others (see --strict).
    #[arg(long, value_enum, default_value_t = FormatArg::Auto, requires = "data")]
    format: FormatArg,
    /// Print what would be created (and, for SPIRE's formats, refused); create nothing.
    #[arg(long)]
    dry_run: bool,
    /// With SPIRE's formats: create nothing if any entry is refused.
    #[arg(long, requires = "data")]
    strict: bool,
    #[command(flatten)]
    common: Common,
}

/// Filters shared by show and count.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long, value_name = "ID")]
    parent_id: Option<String>,
    /// Filter by selector (repeatable); see --match.
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    selectors: Vec<String>,
    /// How --selector filters: entries having all given (superset), exactly these (exact),
    /// only ones among them (subset), or any of them (any).
    #[arg(long = "match", value_enum, default_value_t = MatchArg::Superset)]
    matching: MatchArg,
    #[command(flatten)]
    common: Common,
}

/// `entry show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Show only this entry.
    #[arg(long, value_name = "ID", conflicts_with_all = ["spiffe_id", "parent_id", "selectors"])]
    entry_id: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
}

/// `entry update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The entry to change.
    #[arg(long, value_name = "ID")]
    entry_id: String,
    #[command(flatten)]
    fields: EntryFields,
    #[command(flatten)]
    common: Common,
}

/// `entry delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The entry to delete.
    #[arg(long, value_name = "ID")]
    entry_id: String,
    #[command(flatten)]
    common: Common,
}

/// `--match` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MatchArg {
    /// Entry selectors equal the given ones.
    Exact,
    /// Entry selectors are among the given ones (what a workload with them gets).
    Subset,
    /// Entry has all the given selectors (and maybe more).
    Superset,
    /// Entry has at least one of the given selectors.
    Any,
}

/// One entry in a `--data` file. Selectors may be `"type:value"` strings or
/// `{"type": ..., "value": ...}` objects (SPIRE's form).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataEntry {
    spiffe_id: String,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    node: bool,
    selectors: Vec<DataSelector>,
    #[serde(default, alias = "x509_ttl")]
    x509_svid_ttl: Option<TtlValue>,
    #[serde(default, alias = "jwt_ttl")]
    jwt_svid_ttl: Option<TtlValue>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    hint: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DataSelector {
    Text(String),
    Object {
        #[serde(rename = "type")]
        kind: String,
        value: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TtlValue {
    Seconds(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DataFile {
    Wrapped { entries: Vec<DataEntry> },
    List(Vec<DataEntry>),
}

/// Result line of a create, as printed in JSON.
#[derive(Debug, Serialize)]
struct CreateResultJson {
    status: String,
    message: String,
    entry: EntryJson,
}

/// Runs an entry subcommand.
pub async fn run(cmd: EntryCommand) -> anyhow::Result<()> {
    match cmd {
        EntryCommand::Create(a) => create(a).await,
        EntryCommand::Show(a) => show(a).await,
        EntryCommand::Update(a) => update(a).await,
        EntryCommand::Delete(a) => delete(a).await,
        EntryCommand::Count(a) => count(a).await,
    }
}

fn parse_id(flag: &str, s: &str) -> anyhow::Result<String> {
    SpiffeId::parse(s)
        .map(|id| id.to_string())
        .map_err(|e| anyhow::anyhow!("invalid {flag} {}: {e}", sigil::text::quote_for_display(s)))
}

fn parse_selectors(flag: &str, v: &[String]) -> anyhow::Result<Vec<pb::Selector>> {
    v.iter()
        .map(|s| {
            Selector::parse(s)
                .map(|s| sigil::entry::selector_to_proto(&s))
                .map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))
        })
        .collect()
}

/// Which SVID a TTL is for: each has its floor.
#[derive(Clone, Copy)]
enum SvidKind {
    X509,
    Jwt,
}

impl SvidKind {
    fn check(self, ttl: std::time::Duration) -> Result<(), sigil::ttl::TtlError> {
        match self {
            SvidKind::X509 => sigil::ttl::check_x509_svid_ttl(ttl),
            SvidKind::Jwt => sigil::ttl::check_jwt_svid_ttl(ttl),
        }
    }
}

/// Selectors of an entry being created or updated: parsed, then checked against what Sigil's
/// attestors produce (the server checks the same; checking here names the flag).
fn parse_registration_selectors(flag: &str, v: &[String]) -> anyhow::Result<Vec<pb::Selector>> {
    v.iter()
        .map(|s| {
            let sel = Selector::parse(s).map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))?;
            sel.check_registrable()
                .map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))?;
            Ok(sigil::entry::selector_to_proto(&sel))
        })
        .collect()
}

/// Prints, once per selector type, a warning for the types no Sigil attestor produces: the
/// server accepts them (SPIRE plug-ins add types) but no Sigil agent will ever report them.
fn warn_unknown_selector_types(entries: &[pb::Entry]) {
    let mut seen = std::collections::BTreeSet::new();
    for s in entries.iter().flat_map(|e| &e.selectors) {
        let Ok(sel) = Selector::new(&s.r#type, &s.value) else {
            continue;
        };
        if sel.check_registrable() == Ok(sigil::selector::Registrable::UnknownType)
            && seen.insert(sel.kind().to_string())
        {
            eprintln!("warning: {}", sigil::selector::unknown_type_warning(&sel));
        }
    }
}

/// Parses a TTL and checks it against its floor (the server refuses shorter ones too; this
/// names the flag).
fn parse_ttl(flag: &str, kind: SvidKind, s: &str) -> anyhow::Result<i64> {
    sigil::ttl::parse(s)
        .and_then(|d| kind.check(d).map(|()| d))
        .map(|d| d.as_secs() as i64)
        .map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))
}

/// The node-alias parent: `spiffe://<td>/sigil/server` for the trust domain of `spiffe_id`.
fn node_parent(spiffe_id: &str) -> anyhow::Result<String> {
    let td: TrustDomain = SpiffeId::parse(spiffe_id)
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid --spiffe-id {}: {e}",
                sigil::text::quote_for_display(spiffe_id)
            )
        })?
        .trust_domain()
        .clone();
    Ok(crate::api::server_id(&td).to_string())
}

fn entry_from_fields(f: &EntryFields) -> anyhow::Result<pb::Entry> {
    let spiffe_id = parse_id(
        "--spiffe-id",
        f.spiffe_id.as_deref().context("--spiffe-id is required")?,
    )?;
    let parent_id = match (&f.parent_id, f.node) {
        (Some(p), _) => parse_id("--parent-id", p)?,
        (None, true) => node_parent(&spiffe_id)?,
        (None, false) => bail!("--parent-id is required (or --node for a node-alias entry)"),
    };
    if f.selectors.is_empty() {
        bail!("at least one --selector is required (e.g. --selector unix:uid:1000)");
    }
    Ok(pb::Entry {
        spiffe_id,
        parent_id,
        selectors: parse_registration_selectors("--selector", &f.selectors)?,
        x509_svid_ttl: f
            .x509_ttl
            .as_deref()
            .map(|s| parse_ttl("--x509-ttl", SvidKind::X509, s))
            .transpose()?
            .unwrap_or(0),
        jwt_svid_ttl: f
            .jwt_ttl
            .as_deref()
            .map(|s| parse_ttl("--jwt-ttl", SvidKind::Jwt, s))
            .transpose()?
            .unwrap_or(0),
        dns_names: f.dns_names.clone(),
        admin: f.admin.unwrap_or(false),
        downstream: f.downstream.unwrap_or(false),
        federates_with: f.federates_with.clone(),
        hint: f.hint.clone().unwrap_or_default(),
        ..Default::default()
    })
}

fn entry_from_data(i: usize, d: DataEntry) -> anyhow::Result<pb::Entry> {
    let at = |what: &str| format!("entry {i} of --data: {what}");
    let spiffe_id = parse_id("spiffe_id", &d.spiffe_id).with_context(|| at("spiffe_id"))?;
    let parent_id = match (&d.parent_id, d.node) {
        (Some(p), _) => parse_id("parent_id", p).with_context(|| at("parent_id"))?,
        (None, true) => node_parent(&spiffe_id)?,
        (None, false) => bail!(at("parent_id is required (or \"node\": true)")),
    };
    let selectors: Vec<String> = d
        .selectors
        .into_iter()
        .map(|s| match s {
            DataSelector::Text(t) => t,
            DataSelector::Object { kind, value } => format!("{kind}:{value}"),
        })
        .collect();
    let ttl = |name: &str, kind: SvidKind, v: Option<TtlValue>| -> anyhow::Result<i64> {
        match v {
            None | Some(TtlValue::Seconds(0)) => Ok(0),
            Some(TtlValue::Seconds(s)) if s > 0 => {
                kind.check(std::time::Duration::from_secs(s as u64))
                    .map_err(|e| anyhow::anyhow!("invalid {name}: {e}"))
                    .with_context(|| at(name))?;
                Ok(s)
            }
            Some(TtlValue::Seconds(s)) => bail!(at(&format!("{name} {s} is negative"))),
            Some(TtlValue::Text(t)) => parse_ttl(name, kind, &t).with_context(|| at(name)),
        }
    };
    Ok(pb::Entry {
        spiffe_id,
        parent_id,
        selectors: parse_registration_selectors("selectors", &selectors)
            .with_context(|| at("selectors"))?,
        x509_svid_ttl: ttl("x509_svid_ttl", SvidKind::X509, d.x509_svid_ttl)?,
        jwt_svid_ttl: ttl("jwt_svid_ttl", SvidKind::Jwt, d.jwt_svid_ttl)?,
        dns_names: d.dns_names,
        admin: d.admin,
        downstream: d.downstream,
        federates_with: d.federates_with,
        hint: d.hint,
        ..Default::default()
    })
}

/// The `--data` file (or stdin) as JSON.
fn read_document(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading entries from stdin")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading --data file {}", path.display()))?
    };
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--data file {} is not valid JSON: {e}", path.display()))
}

/// The entries of a `--data` file in Sigil's format.
fn read_data(path: &std::path::Path, doc: serde_json::Value) -> anyhow::Result<Vec<pb::Entry>> {
    let parsed: DataFile = serde_json::from_value(doc).map_err(|e| {
        anyhow::anyhow!(
            "--data file {} is not valid: {e} (expected {{\"entries\": [{{\"spiffe_id\": ..., \"parent_id\": ..., \"selectors\": [\"unix:uid:1000\"]}}]}})",
            path.display()
        )
    })?;
    let list = match parsed {
        DataFile::Wrapped { entries } | DataFile::List(entries) => entries,
    };
    if list.is_empty() {
        bail!("--data file {} holds no entries", path.display());
    }
    list.into_iter()
        .enumerate()
        .map(|(i, d)| entry_from_data(i, d))
        .collect()
}

async fn create(a: CreateArgs) -> anyhow::Result<()> {
    let entries = match &a.data {
        Some(path) => {
            let doc = read_document(path)?;
            let format = spire_data::detect(&doc, a.format)
                .map_err(|e| anyhow::anyhow!("--data file {}: {e}", path.display()))?;
            if format != DataFormat::Sigil {
                return import_spire(&a, path, &doc, format).await;
            }
            read_data(path, doc)?
        }
        None if a.strict || a.format != FormatArg::Auto => {
            bail!("--strict and --format apply to --data files: give --data FILE")
        }
        None => vec![entry_from_fields(&a.fields)?],
    };
    warn_unknown_selector_types(&entries);
    if a.dry_run {
        print_plan(a.common.output, &entries, None);
        return Ok(());
    }
    let mut client = connect(&a.common.admin_socket).await?;
    let total = entries.len();
    let results = create_batches(&mut client, entries).await?;
    let failed: Vec<&pb::EntryResult> = results.iter().filter(|r| r.code != 0).collect();
    match a.common.output {
        Output::Json => {
            let out: Vec<CreateResultJson> = results.iter().map(CreateResultJson::from).collect();
            output::print_json(&serde_json::json!({ "results": out }));
        }
        Output::Text => {
            let created = created_entries(&results);
            if created.len() == 1 && total == 1 {
                print!("{}", output::entry_detail(&created[0]));
            } else if !created.is_empty() {
                print!("{}", output::entry_table(&created));
            }
        }
    }
    // For a single entry the final error line says it all; batches list each failure first.
    if total > 1 {
        print_failures(&failed);
    }
    match (failed.len(), total) {
        (0, _) => Ok(()),
        (1, 1) => bail!("creating entry: {}", failed[0].message),
        (n, t) => bail!("{n} of {t} entries could not be created"),
    }
}

/// Sends `entries` in [`CHUNK`]s; one result per entry, in order.
async fn create_batches(
    client: &mut sigil::proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    entries: Vec<pb::Entry>,
) -> anyhow::Result<Vec<pb::EntryResult>> {
    let mut results = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(CHUNK) {
        let resp = client
            .batch_create_entries(pb::BatchCreateEntriesRequest {
                entries: chunk.to_vec(),
            })
            .await
            .map_err(|s| status_error("creating entries", s))?
            .into_inner();
        results.extend(resp.results);
    }
    Ok(results)
}

fn created_entries(results: &[pb::EntryResult]) -> Vec<pb::Entry> {
    results
        .iter()
        .filter(|r| r.code == 0)
        .filter_map(|r| r.entry.clone())
        .collect()
}

fn print_failures(failed: &[&pb::EntryResult]) {
    for r in failed {
        let id = r
            .entry
            .as_ref()
            .map(|e| e.spiffe_id.as_str())
            .unwrap_or("?");
        eprintln!(
            "failed to create {id}: {} ({:?})",
            r.message,
            tonic::Code::from(r.code)
        );
    }
}

impl From<&pb::EntryResult> for CreateResultJson {
    fn from(r: &pb::EntryResult) -> Self {
        CreateResultJson {
            status: format!("{:?}", tonic::Code::from(r.code)),
            message: r.message.clone(),
            entry: r
                .entry
                .as_ref()
                .map(EntryJson::from)
                .unwrap_or_else(|| EntryJson::from(&pb::Entry::default())),
        }
    }
}

/// A refused SPIRE entry, as printed in JSON.
#[derive(Debug, Serialize)]
struct RefusedJson {
    /// Position in the file, from 0.
    index: usize,
    /// SPIFFE ID as written ("" when it has none).
    spiffe_id: String,
    reason: String,
}

fn refused_json(import: Option<&SpireImport>) -> Vec<RefusedJson> {
    import
        .map(|i| {
            i.refused
                .iter()
                .map(|r| RefusedJson {
                    index: r.index,
                    spiffe_id: r.spiffe_id.clone().unwrap_or_default(),
                    reason: r.reason.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One line per refused entry, on stderr.
fn print_refused(import: &SpireImport) {
    for r in &import.refused {
        let id = r
            .spiffe_id
            .as_deref()
            .map(sigil::text::quote_for_display)
            .unwrap_or_else(|| "(no SPIFFE ID)".into());
        eprintln!("refused entry {} {id}: {}", r.index, r.reason);
    }
}

/// `--dry-run`: what would be created, and what refused (SPIRE's formats).
fn print_plan(out: Output, entries: &[pb::Entry], import: Option<&SpireImport>) {
    match out {
        Output::Json => {
            let list: Vec<EntryJson> = entries.iter().map(EntryJson::from).collect();
            let mut doc = serde_json::json!({ "dry_run": true, "would_create": list });
            if let Some(i) = import {
                doc["format"] = serde_json::json!(i.format.describe());
                doc["refused"] = serde_json::json!(refused_json(Some(i)));
            }
            output::print_json(&doc);
        }
        Output::Text => {
            if let Some(i) = import {
                println!(
                    "Read {} entries of {}",
                    i.planned.len() + i.refused.len(),
                    i.format.describe()
                );
            }
            let n = entries.len();
            println!(
                "Would create {n} {}{}",
                if n == 1 { "entry" } else { "entries" },
                if n == 0 { "" } else { ":" }
            );
            if n > 0 {
                print!("{}", output::entry_table(entries));
            }
            if let Some(i) = import.filter(|i| !i.refused.is_empty()) {
                println!("Would refuse {}:", i.refused.len());
                for r in &i.refused {
                    let id = r
                        .spiffe_id
                        .as_deref()
                        .map(sigil::text::quote_for_display)
                        .unwrap_or_else(|| "(no SPIFFE ID)".into());
                    println!("  entry {} {id}: {}", r.index, r.reason);
                }
            }
        }
    }
}

/// `entry create --data` with a file in one of SPIRE's formats: each entry mapped or refused
/// with its reason, the mapped ones created (none with `--strict` if any is refused).
async fn import_spire(
    a: &CreateArgs,
    path: &std::path::Path,
    doc: &serde_json::Value,
    format: DataFormat,
) -> anyhow::Result<()> {
    let mut client = connect(&a.common.admin_socket).await?;
    let td = client
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(|s| status_error("reading the server's trust domain", s))?
        .into_inner()
        .trust_domain;
    let td = TrustDomain::new(&td)
        .map_err(|e| anyhow::anyhow!("the server reports an invalid trust domain: {e}"))?;
    let import = spire_data::read_spire(doc, format, &td, sigil::clock::now_unix())
        .map_err(|e| anyhow::anyhow!("--data file {}: {e}", path.display()))?;
    let total = import.planned.len() + import.refused.len();
    let entries: Vec<pb::Entry> = import.planned.iter().map(|p| p.entry.clone()).collect();
    if a.dry_run {
        print_plan(a.common.output, &entries, Some(&import));
        if a.strict && !import.refused.is_empty() {
            bail!(
                "{} of {total} entries would be refused; with --strict nothing would be created",
                import.refused.len()
            );
        }
        return Ok(());
    }
    if a.common.output == Output::Text {
        print_refused(&import);
    }
    if a.strict && !import.refused.is_empty() {
        bail!(
            "{} of {total} entries refused (above); --strict: nothing created",
            import.refused.len()
        );
    }
    let results = if entries.is_empty() {
        Vec::new()
    } else {
        create_batches(&mut client, entries).await?
    };
    let failed: Vec<&pb::EntryResult> = results.iter().filter(|r| r.code != 0).collect();
    let created = created_entries(&results);
    match a.common.output {
        Output::Json => {
            let out: Vec<CreateResultJson> = results.iter().map(CreateResultJson::from).collect();
            output::print_json(&serde_json::json!({
                "format": format.describe(),
                "results": out,
                "refused": refused_json(Some(&import)),
            }));
        }
        Output::Text => {
            if !created.is_empty() {
                print!("{}", output::entry_table(&created));
            }
            print_failures(&failed);
        }
    }
    eprintln!(
        "{}: {total} entries of {}: {} created, {} refused, {} failed",
        path.display(),
        format.describe(),
        created.len(),
        import.refused.len(),
        failed.len()
    );
    if import.refused.is_empty() && failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {total} entries not created (reasons above)",
            import.refused.len() + failed.len()
        )
    }
}

fn filter_from(a: &FilterArgs) -> anyhow::Result<pb::EntryFilter> {
    Ok(pb::EntryFilter {
        spiffe_id: a
            .spiffe_id
            .as_deref()
            .map(|s| parse_id("--spiffe-id", s))
            .transpose()?
            .unwrap_or_default(),
        parent_id: a
            .parent_id
            .as_deref()
            .map(|s| parse_id("--parent-id", s))
            .transpose()?
            .unwrap_or_default(),
        selectors: parse_selectors("--selector", &a.selectors)?,
        selector_match: match a.matching {
            MatchArg::Exact => pb::SelectorMatch::Exact,
            MatchArg::Subset => pb::SelectorMatch::Subset,
            MatchArg::Superset => pb::SelectorMatch::Superset,
            MatchArg::Any => pb::SelectorMatch::Any,
        } as i32,
    })
}

async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let common = &a.filter.common;
    let mut client = connect(&common.admin_socket).await?;
    if let Some(id) = &a.entry_id {
        let e = client
            .get_entry(pb::GetEntryRequest { id: id.clone() })
            .await
            .map_err(|s| status_error("showing entry", s))?
            .into_inner()
            .entry
            .context("server returned no entry")?;
        match common.output {
            Output::Json => {
                output::print_json(&serde_json::json!({ "entries": [EntryJson::from(&e)] }))
            }
            Output::Text => print!("{}", output::entry_detail(&e)),
        }
        return Ok(());
    }
    let filter = filter_from(&a.filter)?;
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_entries(pb::ListEntriesRequest {
                filter: Some(filter.clone()),
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await
            .map_err(|s| status_error("listing entries", s))?
            .into_inner();
        entries.extend(resp.entries);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    match common.output {
        Output::Json => {
            let list: Vec<EntryJson> = entries.iter().map(EntryJson::from).collect();
            output::print_json(&serde_json::json!({ "entries": list }));
        }
        Output::Text => {
            println!(
                "Found {} {}",
                entries.len(),
                if entries.len() == 1 {
                    "entry"
                } else {
                    "entries"
                }
            );
            if !entries.is_empty() {
                print!("{}", output::entry_table(&entries));
            }
        }
    }
    Ok(())
}

async fn count(a: FilterArgs) -> anyhow::Result<()> {
    let filter = filter_from(&a)?;
    let mut client = connect(&a.common.admin_socket).await?;
    let n = client
        .count_entries(pb::CountEntriesRequest {
            filter: Some(filter),
        })
        .await
        .map_err(|s| status_error("counting entries", s))?
        .into_inner()
        .count;
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({ "count": n })),
        Output::Text => println!(
            "{n} registration {}",
            if n == 1 { "entry" } else { "entries" }
        ),
    }
    Ok(())
}

async fn update(a: UpdateArgs) -> anyhow::Result<()> {
    let f = &a.fields;
    let mut entry = pb::Entry {
        id: a.entry_id.clone(),
        ..Default::default()
    };
    let mut mask = pb::EntryMask::default();
    if let Some(s) = &f.spiffe_id {
        entry.spiffe_id = parse_id("--spiffe-id", s)?;
        mask.spiffe_id = true;
    }
    if let Some(p) = &f.parent_id {
        entry.parent_id = parse_id("--parent-id", p)?;
        mask.parent_id = true;
    }
    if f.node {
        let id = f
            .spiffe_id
            .as_deref()
            .context("--node with update needs --spiffe-id to know the trust domain")?;
        entry.parent_id = node_parent(id)?;
        mask.parent_id = true;
    }
    if !f.selectors.is_empty() {
        entry.selectors = parse_registration_selectors("--selector", &f.selectors)?;
        mask.selectors = true;
    }
    if let Some(t) = &f.x509_ttl {
        entry.x509_svid_ttl = parse_ttl("--x509-ttl", SvidKind::X509, t)?;
        mask.x509_svid_ttl = true;
    }
    if let Some(t) = &f.jwt_ttl {
        entry.jwt_svid_ttl = parse_ttl("--jwt-ttl", SvidKind::Jwt, t)?;
        mask.jwt_svid_ttl = true;
    }
    if !f.dns_names.is_empty() {
        entry.dns_names = f.dns_names.clone();
        mask.dns_names = true;
    }
    if let Some(b) = f.admin {
        entry.admin = b;
        mask.admin = true;
    }
    if let Some(b) = f.downstream {
        entry.downstream = b;
        mask.downstream = true;
    }
    if !f.federates_with.is_empty() {
        entry.federates_with = f.federates_with.clone();
        mask.federates_with = true;
    }
    if let Some(h) = &f.hint {
        entry.hint = h.clone();
        mask.hint = true;
    }
    if mask == pb::EntryMask::default() {
        bail!(
            "nothing to update: give at least one field flag (e.g. --selector, --x509-ttl, --hint)"
        );
    }
    warn_unknown_selector_types(std::slice::from_ref(&entry));
    let mut client = connect(&a.common.admin_socket).await?;
    let updated = client
        .update_entry(pb::UpdateEntryRequest {
            entry: Some(entry),
            mask: Some(mask),
        })
        .await
        .map_err(|s| status_error("updating entry", s))?
        .into_inner()
        .entry
        .context("server returned no entry")?;
    match a.common.output {
        Output::Json => {
            output::print_json(&serde_json::json!({ "entry": EntryJson::from(&updated) }))
        }
        Output::Text => print!("{}", output::entry_detail(&updated)),
    }
    Ok(())
}

async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.common.admin_socket).await?;
    client
        .delete_entry(pb::DeleteEntryRequest {
            id: a.entry_id.clone(),
        })
        .await
        .map_err(|s| status_error("deleting entry", s))?;
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({ "deleted": a.entry_id })),
        Output::Text => println!("Deleted entry {}", a.entry_id),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: serde_json::Value) -> anyhow::Result<pb::Entry> {
        entry_from_data(0, serde_json::from_value(json)?)
    }

    #[test]
    fn ttls_below_the_floors_are_refused_naming_the_flag() {
        assert_eq!(parse_ttl("--x509-ttl", SvidKind::X509, "1m").ok(), Some(60));
        assert_eq!(parse_ttl("--jwt-ttl", SvidKind::Jwt, "30s").ok(), Some(30));
        let err = parse_ttl("--x509-ttl", SvidKind::X509, "20s").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "invalid --x509-ttl: X509-SVID TTL 20s is shorter than the minimum of 1m"
            ),
            "{err}"
        );
        let err = parse_ttl("--jwt-ttl", SvidKind::Jwt, "5s").unwrap_err();
        assert!(err.to_string().contains("minimum of 30s"), "{err}");

        let base = serde_json::json!({"spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/p", "selectors": ["unix:uid:1"]});
        let with = |k: &str, v: serde_json::Value| {
            let mut d = base.clone();
            d[k] = v;
            d
        };
        for (k, v) in [
            ("x509_svid_ttl", serde_json::json!(20)),
            ("x509_svid_ttl", serde_json::json!("2s")),
            ("jwt_svid_ttl", serde_json::json!(10)),
            ("jwt_svid_ttl", serde_json::json!("29s")),
        ] {
            let err = data(with(k, v.clone())).expect_err(k);
            let text = format!("{err:#}");
            assert!(
                text.contains(k) && text.contains("shorter than the minimum"),
                "{k}={v}: {text}"
            );
        }
        let ok = data(with("x509_svid_ttl", serde_json::json!(60))).map(|e| e.x509_svid_ttl);
        assert_eq!(ok.ok(), Some(60));
        let default = data(with("jwt_svid_ttl", serde_json::json!(0))).map(|e| e.jwt_svid_ttl);
        assert_eq!(default.ok(), Some(0), "0 still means the server default");
    }
}
