//! SPIRE's registration-entry JSON, read by `sigil-server entry create --data`, and the mapping
//! of SPIRE entries onto Sigil's.
//!
//! A `--data` file is in one of three formats, decided once per file by [`detect`]:
//! - [`DataFormat::Sigil`]: Sigil's own (`cli/entry.rs` reads it);
//! - [`DataFormat::SpireShow`]: the output of `spire-server entry show -output json` (protojson of
//!   SPIRE's `ListEntriesResponse`: SPIFFE IDs as `{trust_domain, path}` objects, 64-bit numbers
//!   as strings, `expires_at`);
//! - [`DataFormat::SpireCreate`]: the input of `spire-server entry create -data` (Go's
//!   `encoding/json` into SPIRE's `common.RegistrationEntries`: string IDs, `entryExpiry`, field
//!   names matched without regard to case).
//!
//! The string-ID SPIRE format overlaps Sigil's (both take `{"entries": [{"spiffe_id": ...,
//! "parent_id": ..., "selectors": [{"type": ..., "value": ...}]}]}` with the same meaning), so a
//! file is read as SPIRE's only when it holds something only SPIRE's has (see [`detect`]).
//!
//! [`read_spire`] turns each SPIRE entry into either a Sigil entry to create or a [`Refusal`]
//! naming what Sigil cannot honour. Mapping of SPIRE's own IDs (SPIRE reserves `/spire/`, Sigil
//! `/sigil/`):
//! - parent `spiffe://<td>/spire/server` (a node alias) → `spiffe://<td>/sigil/server`;
//! - parent `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node UID>` →
//!   `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>` (both name the agent that way);
//! - other SPIRE agent IDs are refused: a join-token agent's ID names a spent SPIRE token, an
//!   x509pop agent's the SHA-1 fingerprint of its certificate (Sigil's: SHA-256), and other
//!   attestors have no Sigil counterpart; anything else under `/spire/` is SPIRE's own.
//!
//! The same mapping applies to `spiffe_id` selector values (join-token node aliases).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use sigil::proto::admin as pb;
use sigil::selector::{Registrable, SelectorError};
use sigil::{Selector, SpiffeId, TrustDomain};

use crate::attestor::AGENT_PATH_PREFIX;

/// What a `--data` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// Sigil's own format.
    Sigil,
    /// `spire-server entry show -output json`.
    SpireShow,
    /// `spire-server entry create -data` input.
    SpireCreate,
}

impl DataFormat {
    /// How the format is named in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Sigil => "Sigil's entry JSON",
            Self::SpireShow => "SPIRE's `entry show -output json`",
            Self::SpireCreate => "SPIRE's `entry create -data` JSON",
        }
    }
}

/// The `--format` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FormatArg {
    /// Decide from the file (see `sigil-server entry create --help`).
    #[default]
    Auto,
    /// Sigil's own format.
    Sigil,
    /// One of SPIRE's: `entry show -output json` or `entry create -data` input (told apart by
    /// the SPIFFE IDs: objects or strings).
    Spire,
}

/// Why a `--data` file cannot be read at all (nothing is created).
#[derive(Debug, thiserror::Error)]
pub enum DataFileError {
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not `{"entries": [...]}` (or a list, for Sigil's format).
    #[error("expected an object with an \"entries\" list, found {0}")]
    NoEntries(&'static str),
    /// An empty entry list.
    #[error("the file holds no entries")]
    Empty,
    /// Forms of two formats in one file.
    #[error(
        "the file mixes formats: {sigil} is Sigil's form, {spire} SPIRE's; pass --format sigil or --format spire to say which it is"
    )]
    Mixed {
        /// Where Sigil's form was seen.
        sigil: String,
        /// Where SPIRE's form was seen.
        spire: String,
    },
}

/// Why one SPIRE entry is not created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an entry of the file's format.
    #[error("not an entry of {format}: {reason}")]
    Malformed {
        /// The file's format.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A SPIFFE ID field missing.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// An invalid SPIFFE ID.
    #[error("{field} {}: {error}", sigil::text::quote_for_display(value))]
    BadId {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// What it held.
        value: String,
        /// Why it is invalid.
        error: sigil::SpiffeIdError,
    },
    /// An ID of another trust domain than the server's.
    #[error("{field} {id} is in trust domain {found}, this server's is {expected}")]
    TrustDomain {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// The ID.
        id: String,
        /// Its trust domain.
        found: String,
        /// The server's.
        expected: String,
    },
    /// A parent (or `spiffe_id` selector) naming a SPIRE-only identity.
    #[error("{what} {id} {why}")]
    SpireId {
        /// "parent_id" or "selector spiffe_id".
        what: &'static str,
        /// The ID.
        id: String,
        /// Why no Sigil identity corresponds, and what to do.
        why: String,
    },
    /// The node-alias entry SPIRE's `token generate -spiffeID` made for a join-token agent.
    #[error(
        "is the node alias SPIRE made for join token {token} (`spire-server token generate -spiffeID`), a spent SPIRE token: on Sigil, `sigil-server token generate --spiffe-id {alias}` makes this alias for the agent attesting with the new token"
    )]
    JoinTokenAlias {
        /// The alias (the entry's SPIFFE ID).
        alias: String,
        /// SPIRE's token.
        token: String,
    },
    /// `store_svid`: SPIRE's SVIDStore plug-ins; Sigil has none.
    #[error(
        "store_svid is set: SPIRE hands the SVID to an SVIDStore plug-in, Sigil has none (serve the workload through the Workload API or `sigil-agent helper` instead)"
    )]
    StoreSvid,
    /// An expiry already past.
    #[error("expired at Unix time {0}: SPIRE no longer serves it")]
    Expired(i64),
    /// An expiry in the future: Sigil entries do not expire.
    #[error(
        "expires at Unix time {0}, and Sigil entries do not expire: create it without the expiry if it should stay"
    )]
    Expiry(i64),
    /// No selectors.
    #[error("has no selectors: it would match nothing")]
    NoSelectors,
    /// A selector Sigil cannot honour.
    #[error("selector {}: {reason}", sigil::text::quote_for_display(selector))]
    Selector {
        /// `type:value`.
        selector: String,
        /// Why.
        reason: String,
    },
    /// A TTL Sigil refuses.
    #[error("{field}: {reason}")]
    Ttl {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An invalid `federates_with` trust domain.
    #[error("federates_with {}: {error}", sigil::text::quote_for_display(value))]
    FederatesWith {
        /// What it held.
        value: String,
        /// Why it is invalid.
        error: sigil::SpiffeIdError,
    },
}

/// A SPIRE entry that maps onto a Sigil entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Position in the file, from 0.
    pub index: usize,
    /// The entry to create.
    pub entry: pb::Entry,
}

/// A SPIRE entry that is not created.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// Position in the file, from 0.
    pub index: usize,
    /// Its SPIFFE ID as written, when it has one.
    pub spiffe_id: Option<String>,
    /// Why.
    pub reason: Refusal,
}

/// A SPIRE file read: what to create and what not.
#[derive(Debug, Clone, PartialEq)]
pub struct SpireImport {
    /// The file's format.
    pub format: DataFormat,
    /// Entries to create, in file order.
    pub planned: Vec<Planned>,
    /// Entries refused, in file order.
    pub refused: Vec<Refused>,
}

/// Decides a file's format. `doc` is the whole file.
///
/// - A list at the top is Sigil's (SPIRE's formats are objects).
/// - `spiffe_id` or `parent_id` objects, or `next_page_token` at the top: `entry show` output.
/// - Otherwise the file's forms decide: Sigil's are `"type:value"` selector strings, `node`,
///   TTLs given as text and the `x509_ttl` / `jwt_ttl` names; SPIRE's are `entryExpiry`,
///   `store_svid`, `entry_id`, `revision_number`, `created_at`, field names in other cases (Go
///   matches them case-insensitively) and IDs under `/spire/`. Neither: Sigil's (identical
///   meaning). Both: [`DataFileError::Mixed`].
pub fn detect(doc: &Value, forced: FormatArg) -> Result<DataFormat, DataFileError> {
    let entries = match doc {
        Value::Array(_) => {
            return match forced {
                FormatArg::Spire => Err(DataFileError::NoEntries("a list")),
                _ => Ok(DataFormat::Sigil),
            }
        }
        Value::Object(map) => match map.get("entries") {
            Some(Value::Array(list)) => list,
            Some(other) => return Err(DataFileError::NoEntries(json_kind(other))),
            None => return Err(DataFileError::NoEntries("an object without \"entries\"")),
        },
        other => return Err(DataFileError::NoEntries(json_kind(other))),
    };
    let show = doc.get("next_page_token").is_some()
        || entries.iter().any(|e| {
            ["spiffe_id", "parent_id", "spiffeId", "parentId"]
                .iter()
                .any(|k| e.get(k).is_some_and(Value::is_object))
        });
    match forced {
        FormatArg::Sigil => return Ok(DataFormat::Sigil),
        FormatArg::Spire if show => return Ok(DataFormat::SpireShow),
        FormatArg::Spire => return Ok(DataFormat::SpireCreate),
        FormatArg::Auto if show => return Ok(DataFormat::SpireShow),
        FormatArg::Auto => {}
    }
    let mut sigil_form = None;
    let mut spire_form = None;
    for (i, e) in entries.iter().enumerate() {
        let Value::Object(fields) = e else { continue };
        for (key, value) in fields {
            let at = |what: String| format!("entry {i}: {what}");
            let sigil_ttl =
                matches!(key.as_str(), "x509_svid_ttl" | "jwt_svid_ttl") && value.is_string();
            if sigil_form.is_none()
                && (matches!(key.as_str(), "node" | "x509_ttl" | "jwt_ttl") || sigil_ttl)
            {
                sigil_form = Some(at(format!("\"{key}\"")));
            }
            if key == "selectors"
                && sigil_form.is_none()
                && value
                    .as_array()
                    .is_some_and(|l| l.iter().any(Value::is_string))
            {
                sigil_form = Some(at("a \"type:value\" selector string".into()));
            }
            let lower = key.to_ascii_lowercase();
            let spire_only = matches!(
                lower.as_str(),
                "entryexpiry"
                    | "entry_expiry"
                    | "store_svid"
                    | "entry_id"
                    | "revision_number"
                    | "created_at"
            );
            let other_case = *key != lower && SPIRE_CREATE_FIELDS.contains(&lower.as_str());
            if spire_form.is_none() && (spire_only || other_case) {
                spire_form = Some(at(format!("\"{key}\"")));
            }
            if spire_form.is_none()
                && matches!(lower.as_str(), "spiffe_id" | "parent_id")
                && value.as_str().is_some_and(under_spire)
            {
                spire_form = Some(at(format!("{key} under /spire/")));
            }
        }
    }
    match (sigil_form, spire_form) {
        (Some(sigil), Some(spire)) => Err(DataFileError::Mixed { sigil, spire }),
        (_, Some(_)) => Ok(DataFormat::SpireCreate),
        _ => Ok(DataFormat::Sigil),
    }
}

/// Field names of SPIRE's `common.RegistrationEntry` JSON, lower case.
const SPIRE_CREATE_FIELDS: [&str; 15] = [
    "selectors",
    "parent_id",
    "spiffe_id",
    "x509_svid_ttl",
    "federates_with",
    "entry_id",
    "admin",
    "downstream",
    "entryexpiry",
    "dns_names",
    "revision_number",
    "store_svid",
    "jwt_svid_ttl",
    "hint",
    "created_at",
];

/// True for a SPIFFE ID string whose path is under SPIRE's reserved `/spire/`.
fn under_spire(s: &str) -> bool {
    SpiffeId::parse(s).is_ok_and(|id| id.path().starts_with("/spire/") || id.path() == "/spire")
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Reads the entries of a SPIRE file (`format` from [`detect`], not [`DataFormat::Sigil`]) for
/// a server of trust domain `td`; `now` (Unix seconds) judges expiries.
pub fn read_spire(
    doc: &Value,
    format: DataFormat,
    td: &TrustDomain,
    now: i64,
) -> Result<SpireImport, DataFileError> {
    let entries = match doc.get("entries") {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(DataFileError::NoEntries(json_kind(other))),
        None => return Err(DataFileError::NoEntries(json_kind(doc))),
    };
    if entries.is_empty() {
        return Err(DataFileError::Empty);
    }
    let mut out = SpireImport {
        format,
        planned: Vec::new(),
        refused: Vec::new(),
    };
    for (index, raw) in entries.iter().enumerate() {
        let parsed = match format {
            DataFormat::SpireShow => ShowEntry::parse(raw),
            _ => CreateEntry::parse(raw),
        };
        let result = parsed
            .map_err(|reason| {
                (
                    raw_spiffe_id(raw),
                    Refusal::Malformed {
                        format: format.describe(),
                        // serde's messages may quote the input: bounded like every echo.
                        reason: sigil::text::echo(&reason).into_owned(),
                    },
                )
            })
            .and_then(|e| {
                let id = e.spiffe_id.clone();
                map_entry(e, td, now).map_err(|r| (id, r))
            });
        match result {
            Ok(entry) => out.planned.push(Planned { index, entry }),
            Err((spiffe_id, reason)) => out.refused.push(Refused {
                index,
                spiffe_id,
                reason,
            }),
        }
    }
    Ok(out)
}

/// The SPIFFE ID of a malformed entry, for the message, if it can be made out.
fn raw_spiffe_id(raw: &Value) -> Option<String> {
    let fields = normalized(raw).ok()?;
    match fields.get("spiffeid")? {
        Value::String(s) => Some(s.clone()),
        v @ Value::Object(_) => IdObject::parse(v).ok().map(|id| id.text()),
        _ => None,
    }
}

/// An entry's fields with names folded (lower case, no `_`), so that SPIRE's names in any
/// case and protojson's camelCase names all match. Two names folding alike are refused.
fn normalized(raw: &Value) -> Result<serde_json::Map<String, Value>, String> {
    let Value::Object(fields) = raw else {
        return Err(format!("expected an object, found {}", json_kind(raw)));
    };
    let mut out = serde_json::Map::new();
    for (k, v) in fields {
        let folded: String = k
            .chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if out.insert(folded, v.clone()).is_some() {
            return Err(format!(
                "field {} is given twice (in another spelling)",
                quote(k)
            ));
        }
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    sigil::text::quote_for_display(s)
}

/// A SPIRE entry in either format, before mapping.
#[derive(Debug, Default)]
struct SpireEntry {
    spiffe_id: Option<String>,
    parent_id: Option<String>,
    selectors: Vec<SpireSelector>,
    x509_svid_ttl: i64,
    jwt_svid_ttl: i64,
    federates_with: Vec<String>,
    admin: bool,
    downstream: bool,
    expiry: i64,
    dns_names: Vec<String>,
    store_svid: bool,
    hint: String,
}

/// `{type, value}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpireSelector {
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

/// An entry's selectors, their field names folded as the entry's are.
fn selectors(list: Vec<Value>) -> Result<Vec<SpireSelector>, String> {
    list.iter()
        .map(|v| {
            serde_json::from_value(Value::Object(normalized(v)?))
                .map_err(|e| format!("selector {}: {e}", quote(&v.to_string())))
        })
        .collect()
}

/// A 64-bit number as protojson writes it (a string) or as a number.
#[derive(Debug, Default, Clone, Copy)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(Int(0)),
            Some(Raw::N(n)) => Ok(Int(n)),
            Some(Raw::S(s)) => s.parse().map(Int).map_err(|_| {
                serde::de::Error::custom(format!("{} is not a whole number", quote(&s)))
            }),
        }
    }
}

/// `null` as the empty value (protojson writes unset message fields as `null`).
fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `{trust_domain, path}`: SPIRE's `types.SPIFFEID`.
#[derive(Debug)]
struct IdObject {
    trust_domain: String,
    path: String,
}

impl IdObject {
    fn parse(v: &Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default, deserialize_with = "or_default")]
            trustdomain: String,
            #[serde(default, deserialize_with = "or_default")]
            path: String,
        }
        let raw: Raw = serde_json::from_value(Value::Object(normalized(v)?))
            .map_err(|e| format!("a SPIFFE ID object: {e}"))?;
        Ok(Self {
            trust_domain: raw.trustdomain,
            path: raw.path,
        })
    }

    fn text(&self) -> String {
        format!("spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// An entry of `spire-server entry show -output json` (SPIRE's `types.Entry`), names folded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowEntry {
    #[serde(default, deserialize_with = "or_default")]
    id: String,
    #[serde(default)]
    spiffeid: Option<Value>,
    #[serde(default)]
    parentid: Option<Value>,
    #[serde(default, deserialize_with = "or_default")]
    selectors: Vec<Value>,
    #[serde(default)]
    x509svidttl: Int,
    #[serde(default)]
    jwtsvidttl: Int,
    #[serde(default, deserialize_with = "or_default")]
    federateswith: Vec<String>,
    #[serde(default, deserialize_with = "or_default")]
    admin: bool,
    #[serde(default, deserialize_with = "or_default")]
    downstream: bool,
    #[serde(default)]
    expiresat: Int,
    #[serde(default, deserialize_with = "or_default")]
    dnsnames: Vec<String>,
    #[serde(default)]
    revisionnumber: Int,
    #[serde(default, deserialize_with = "or_default")]
    storesvid: bool,
    #[serde(default, deserialize_with = "or_default")]
    hint: String,
    #[serde(default)]
    createdat: Int,
}

impl ShowEntry {
    fn parse(raw: &Value) -> Result<SpireEntry, String> {
        let e: ShowEntry =
            serde_json::from_value(Value::Object(normalized(raw)?)).map_err(|e| e.to_string())?;
        let id = |v: &Option<Value>| -> Result<Option<String>, String> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => IdObject::parse(v).map(|o| Some(o.text())),
            }
        };
        // SPIRE's own entry id, revision and creation time have no use here: Sigil assigns its own.
        let _ = (&e.id, e.revisionnumber, e.createdat);
        Ok(SpireEntry {
            spiffe_id: id(&e.spiffeid)?,
            parent_id: id(&e.parentid)?,
            selectors: selectors(e.selectors)?,
            x509_svid_ttl: e.x509svidttl.0,
            jwt_svid_ttl: e.jwtsvidttl.0,
            federates_with: e.federateswith,
            admin: e.admin,
            downstream: e.downstream,
            expiry: e.expiresat.0,
            dns_names: e.dnsnames,
            store_svid: e.storesvid,
            hint: e.hint,
        })
    }
}

/// An entry of `spire-server entry create -data` input (SPIRE's `common.RegistrationEntry`),
/// names folded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEntry {
    #[serde(default, deserialize_with = "or_default")]
    selectors: Vec<Value>,
    #[serde(default)]
    parentid: Option<String>,
    #[serde(default)]
    spiffeid: Option<String>,
    #[serde(default)]
    x509svidttl: Int,
    #[serde(default, deserialize_with = "or_default")]
    federateswith: Vec<String>,
    #[serde(default, deserialize_with = "or_default")]
    entryid: String,
    #[serde(default, deserialize_with = "or_default")]
    admin: bool,
    #[serde(default, deserialize_with = "or_default")]
    downstream: bool,
    #[serde(default)]
    entryexpiry: Int,
    #[serde(default, deserialize_with = "or_default")]
    dnsnames: Vec<String>,
    #[serde(default)]
    revisionnumber: Int,
    #[serde(default, deserialize_with = "or_default")]
    storesvid: bool,
    #[serde(default)]
    jwtsvidttl: Int,
    #[serde(default, deserialize_with = "or_default")]
    hint: String,
    #[serde(default)]
    createdat: Int,
}

impl CreateEntry {
    fn parse(raw: &Value) -> Result<SpireEntry, String> {
        let e: CreateEntry =
            serde_json::from_value(Value::Object(normalized(raw)?)).map_err(|e| e.to_string())?;
        let _ = (&e.entryid, e.revisionnumber, e.createdat);
        Ok(SpireEntry {
            spiffe_id: e.spiffeid.filter(|s| !s.is_empty()),
            parent_id: e.parentid.filter(|s| !s.is_empty()),
            selectors: selectors(e.selectors)?,
            x509_svid_ttl: e.x509svidttl.0,
            jwt_svid_ttl: e.jwtsvidttl.0,
            federates_with: e.federateswith,
            admin: e.admin,
            downstream: e.downstream,
            expiry: e.entryexpiry.0,
            dns_names: e.dnsnames,
            store_svid: e.storesvid,
            hint: e.hint,
        })
    }
}

/// Parses an ID field and checks its trust domain.
fn own_id(field: &'static str, value: Option<&str>, td: &TrustDomain) -> Result<SpiffeId, Refusal> {
    let value = value.ok_or(Refusal::Missing(field))?;
    let id = SpiffeId::parse(value).map_err(|error| Refusal::BadId {
        field,
        value: value.to_string(),
        error,
    })?;
    if id.trust_domain() != td {
        return Err(Refusal::TrustDomain {
            field,
            id: id.to_string(),
            found: id.trust_domain().to_string(),
            expected: td.to_string(),
        });
    }
    Ok(id)
}

/// The Sigil ID for a SPIRE ID: unchanged outside `/spire/`, mapped or refused under it.
fn map_spire_id(what: &'static str, id: SpiffeId) -> Result<SpiffeId, Refusal> {
    let Some(rest) = id.path().strip_prefix("/spire/") else {
        if id.path() == "/spire" {
            return Err(spire_only(
                what,
                &id,
                "is under SPIRE's reserved /spire path",
            ));
        }
        return Ok(id);
    };
    let td = id.trust_domain().clone();
    if rest == "server" {
        return Ok(crate::api::server_id(&td));
    }
    let Some(agent) = rest.strip_prefix("agent/") else {
        return Err(spire_only(
            what,
            &id,
            "is under SPIRE's reserved /spire path: no Sigil identity corresponds",
        ));
    };
    let (kind, name) = agent.split_once('/').unwrap_or((agent, ""));
    match kind {
        "k8s_psat" if name.split('/').count() == 2 && !name.split('/').any(str::is_empty) => td
            .id(&format!("{AGENT_PATH_PREFIX}k8s_psat/{name}"))
            .map_err(|e| spire_only(what, &id, &format!("cannot be mapped to a Sigil agent ID: {e}"))),
        "join_token" => Err(spire_only(
            what,
            &id,
            "is a SPIRE join-token agent: its ID names a token SPIRE spent, and no Sigil agent will have it; give the node a Sigil join token for its alias (`sigil-server token generate --spiffe-id <alias>`) and register the workloads under that alias",
        )),
        "x509pop" => Err(spire_only(
            what,
            &id,
            "is a SPIRE x509pop agent, named by the SHA-1 fingerprint of its certificate (Sigil names x509pop agents by the SHA-256 one): register the workloads under a node alias (parent spiffe://<td>/spire/server) with x509pop:subject:cn or x509pop:san:dns selectors",
        )),
        _ => Err(spire_only(
            what,
            &id,
            &format!(
                "is a SPIRE agent attested with {}, which Sigil has no node attestor for (Sigil has join_token, x509pop, k8s_psat)",
                quote(kind)
            ),
        )),
    }
}

fn spire_only(what: &'static str, id: &SpiffeId, why: &str) -> Refusal {
    Refusal::SpireId {
        what,
        id: id.to_string(),
        why: why.to_string(),
    }
}

/// A SPIRE selector as Sigil registers it, or why not.
fn map_selector(s: &SpireSelector) -> Result<pb::Selector, Refusal> {
    let whole = format!("{}:{}", s.kind, s.value);
    let refuse = |reason: String| Refusal::Selector {
        selector: whole.clone(),
        reason,
    };
    let mut sel = Selector::new(&s.kind, &s.value).map_err(|e| refuse(e.to_string()))?;
    if sel.kind() == "spiffe_id" {
        let id = SpiffeId::parse(sel.value())
            .map_err(|e| refuse(format!("the value must be a SPIFFE ID: {e}")))?;
        let mapped = map_spire_id("selector spiffe_id", id)?;
        sel = Selector::new("spiffe_id", &mapped.to_string()).map_err(|e| refuse(e.to_string()))?;
    }
    if sel.kind() == "x509pop" && sel.value().starts_with("san:") {
        // Same spelling, another property: SPIRE's come from `x509pop://<td>/<key>/<value>` URI
        // SANs, Sigil's `x509pop:san:dns` from DNS SANs.
        return Err(refuse(
            "SPIRE's x509pop:san selectors come from x509pop:// URI SANs, Sigil's x509pop:san:dns from DNS SANs: the same spelling would match other nodes; use x509pop:subject:cn or Sigil's x509pop:san:dns for the node's DNS name".into(),
        ));
    }
    match sel.check_registrable() {
        Ok(Registrable::Known) => Ok(sigil::entry::selector_to_proto(&sel)),
        Ok(Registrable::UnknownType) => Err(refuse(format!(
            "no Sigil attestor produces type {} (Sigil's: {})",
            quote(sel.kind()),
            sigil::selector::KNOWN_TYPES.join(", ")
        ))),
        Err(SelectorError::InvalidValue { .. })
            if sel.kind() == "x509pop"
                && sel
                    .value()
                    .strip_prefix("ca:fingerprint:")
                    .is_some_and(|v| v.len() == 40) =>
        {
            Err(refuse(
                "SPIRE's x509pop:ca:fingerprint is the SHA-1 of the CA certificate, Sigil's the SHA-256 (64 hex digits): compute it with `openssl x509 -in ca.pem -outform DER | sha256sum`".into(),
            ))
        }
        Err(SelectorError::UnknownKey { kind, key, known, .. }) => Err(refuse(format!(
            "Sigil's {kind} attestor has no key {} (it produces {known})",
            quote(&key)
        ))),
        Err(SelectorError::InvalidValue { reason, .. }) => Err(refuse(reason)),
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// Checks a SPIRE TTL (seconds, 0 = the server default) against Sigil's floors.
fn map_ttl(field: &'static str, secs: i64, x509: bool) -> Result<i64, Refusal> {
    let refuse = |reason: String| Refusal::Ttl { field, reason };
    if secs < 0 {
        return Err(refuse(format!("{secs} is negative")));
    }
    if secs == 0 {
        return Ok(0);
    }
    let d = std::time::Duration::from_secs(secs.unsigned_abs());
    let checked = if x509 {
        sigil::ttl::check_x509_svid_ttl(d)
    } else {
        sigil::ttl::check_jwt_svid_ttl(d)
    };
    checked.map(|()| secs).map_err(|e| refuse(e.to_string()))
}

/// Maps one SPIRE entry onto the Sigil entry to create for trust domain `td`.
fn map_entry(e: SpireEntry, td: &TrustDomain, now: i64) -> Result<pb::Entry, Refusal> {
    let spiffe_id = own_id("spiffe_id", e.spiffe_id.as_deref(), td)?;
    let parent_id = own_id("parent_id", e.parent_id.as_deref(), td)?;
    if let Some(token) = parent_id.path().strip_prefix("/spire/agent/join_token/") {
        let only_selector_is_parent = matches!(
            e.selectors.as_slice(),
            [s] if s.kind == "spiffe_id" && s.value == parent_id.to_string()
        );
        if only_selector_is_parent {
            return Err(Refusal::JoinTokenAlias {
                alias: spiffe_id.to_string(),
                token: token.to_string(),
            });
        }
    }
    let parent_id = map_spire_id("parent_id", parent_id)?;
    if e.store_svid {
        return Err(Refusal::StoreSvid);
    }
    match e.expiry {
        0 => {}
        t if t <= now => return Err(Refusal::Expired(t)),
        t => return Err(Refusal::Expiry(t)),
    }
    if e.selectors.is_empty() {
        return Err(Refusal::NoSelectors);
    }
    let mut selectors = Vec::with_capacity(e.selectors.len());
    for s in &e.selectors {
        selectors.push(map_selector(s)?);
    }
    for value in &e.federates_with {
        TrustDomain::new(value).map_err(|error| Refusal::FederatesWith {
            value: value.clone(),
            error,
        })?;
    }
    // Duplicated selectors mean the same set; keep the first of each.
    let mut seen = BTreeMap::new();
    selectors.retain(|s| {
        seen.insert((s.r#type.clone(), s.value.clone()), ())
            .is_none()
    });
    Ok(pb::Entry {
        spiffe_id: spiffe_id.to_string(),
        parent_id: parent_id.to_string(),
        selectors,
        x509_svid_ttl: map_ttl("x509_svid_ttl", e.x509_svid_ttl, true)?,
        jwt_svid_ttl: map_ttl("jwt_svid_ttl", e.jwt_svid_ttl, false)?,
        dns_names: e.dns_names,
        admin: e.admin,
        downstream: e.downstream,
        federates_with: e.federates_with,
        hint: e.hint,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
