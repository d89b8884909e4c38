//! Operator commands of the `sigil-agent` binary beyond `run`.
//!
//! - [`api`]: a Workload API client (`api fetch x509|jwt`, `api validate jwt`, `api watch`).
//! - [`explain`]: `explain --pid N`: selectors, matching entries and near misses of a process.

pub mod api;
pub mod explain;

/// Unix seconds as RFC 3339 (the number itself if out of range).
pub fn time_text(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
