//! CLI output: aligned text tables for people, stable JSON for scripts.
//!
//! The JSON shapes are a contract: field names are snake_case, TTLs are seconds, times are Unix
//! seconds, selectors are `"type:value"` strings. Add fields, never rename them.

use serde::Serialize;
use sigil::proto::admin as pb;

/// Output format flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned, human-readable text.
    Text,
    /// JSON, stable for scripts.
    Json,
}

/// An entry as printed in JSON.
#[derive(Debug, Serialize)]
pub struct EntryJson {
    /// Entry id.
    pub id: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Parent ID.
    pub parent_id: String,
    /// `type:value` selectors.
    pub selectors: Vec<String>,
    /// Seconds; 0 = server default.
    pub x509_svid_ttl: i64,
    /// Seconds; 0 = server default.
    pub jwt_svid_ttl: i64,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Admin flag.
    pub admin: bool,
    /// Downstream flag.
    pub downstream: bool,
    /// Federated trust domains.
    pub federates_with: Vec<String>,
    /// Hint.
    pub hint: String,
    /// Revision.
    pub revision: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

impl From<&pb::Entry> for EntryJson {
    fn from(e: &pb::Entry) -> Self {
        Self {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            selectors: selectors(&e.selectors),
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names.clone(),
            admin: e.admin,
            downstream: e.downstream,
            federates_with: e.federates_with.clone(),
            hint: e.hint.clone(),
            revision: e.revision_number,
            created_at: e.created_at,
            updated_at: e.updated_at,
        }
    }
}

/// An agent as printed in JSON.
#[derive(Debug, Serialize)]
pub struct AgentJson {
    /// Agent SPIFFE ID.
    pub spiffe_id: String,
    /// Attestation method.
    pub attestation_type: String,
    /// Current SVID serial (hex).
    pub x509_svid_serial: String,
    /// Unix seconds.
    pub x509_svid_expires_at: i64,
    /// Banned flag.
    pub banned: bool,
    /// Node selectors.
    pub selectors: Vec<String>,
}

impl From<&pb::Agent> for AgentJson {
    fn from(a: &pb::Agent) -> Self {
        Self {
            spiffe_id: a.spiffe_id.clone(),
            attestation_type: a.attestation_type.clone(),
            x509_svid_serial: a.x509_svid_serial.clone(),
            x509_svid_expires_at: a.x509_svid_expires_at,
            banned: a.banned,
            selectors: selectors(&a.selectors),
        }
    }
}

/// `type:value` strings.
pub fn selectors(v: &[pb::Selector]) -> Vec<String> {
    v.iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect()
}

/// Prints pretty JSON to stdout.
pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        // Serializing plain structs cannot fail; say so loudly if it ever does.
        Err(e) => eprintln!("error: encoding JSON output: {e}"),
    }
}

/// Formats rows as a table whose columns are padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            s.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Formats `label: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            let v = if v.is_empty() { "(none)" } else { v.as_str() };
            format!("{k:<w$} : {v}\n")
        })
        .collect()
}

/// TTL seconds as shown in text: `default` for 0.
pub fn ttl_text(secs: i64) -> String {
    if secs <= 0 {
        "default".into()
    } else {
        sigil::ttl::format(std::time::Duration::from_secs(secs as u64))
    }
}

/// Unix seconds as RFC 3339 UTC (or the number if out of range).
pub fn time_text(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Table rows for entries.
pub fn entry_table(entries: &[pb::Entry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.spiffe_id.clone(),
                e.parent_id.clone(),
                selectors(&e.selectors).join(","),
                ttl_text(e.x509_svid_ttl),
                ttl_text(e.jwt_svid_ttl),
                e.hint.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ENTRY ID",
            "SPIFFE ID",
            "PARENT ID",
            "SELECTORS",
            "X509 TTL",
            "JWT TTL",
            "HINT",
        ],
        &rows,
    )
}

/// Every field of one entry, aligned.
pub fn entry_detail(e: &pb::Entry) -> String {
    key_values(&[
        ("Entry ID", e.id.clone()),
        ("SPIFFE ID", e.spiffe_id.clone()),
        ("Parent ID", e.parent_id.clone()),
        ("Selectors", selectors(&e.selectors).join(", ")),
        ("X509-SVID TTL", ttl_text(e.x509_svid_ttl)),
        ("JWT-SVID TTL", ttl_text(e.jwt_svid_ttl)),
        ("DNS names", e.dns_names.join(", ")),
        ("Federates with", e.federates_with.join(", ")),
        ("Admin", e.admin.to_string()),
        ("Downstream", e.downstream.to_string()),
        ("Hint", e.hint.clone()),
        ("Revision", e.revision_number.to_string()),
        ("Created", time_text(e.created_at)),
        ("Updated", time_text(e.updated_at)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONG HEADER"],
            &[vec!["wide cell".into(), "x".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A          LONG HEADER");
        assert_eq!(lines[1], "wide cell  x");
    }

    #[test]
    fn ttl_and_time_text() {
        assert_eq!(ttl_text(0), "default");
        assert_eq!(ttl_text(5400), "1h30m");
        assert_eq!(time_text(0), "1970-01-01T00:00:00Z");
    }
}
