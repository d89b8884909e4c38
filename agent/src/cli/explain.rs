//! `sigil-agent explain --pid N`: the selectors the agent sees for a process, the entries that
//! match it, and for near misses which selectors are missing — "why does my workload get no
//! SVID?" in one command.

use std::path::PathBuf;

use clap::Args;
use sigil::proto::agent_admin as pb;

/// `explain` flags.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The process to explain.
    #[arg(long)]
    pub pid: i32,
    /// The agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// Asks the agent and prints its answer.
pub async fn run(a: ExplainArgs) -> anyhow::Result<()> {
    let x = match super::admin_client(&a.admin_socket)
        .await?
        .explain(pb::ExplainRequest { pid: a.pid })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(super::admin_error(&a.admin_socket, "explain", s).await),
    };
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&to_json(&x))?);
    } else {
        print!("{}", to_text(&x));
    }
    Ok(())
}

fn to_json(x: &pb::ExplainResponse) -> serde_json::Value {
    serde_json::json!({
        "pid": x.pid,
        "selectors": x.selectors,
        "matches": x.matches.iter().map(|m| serde_json::json!({
            "entry_id": m.entry_id, "spiffe_id": m.spiffe_id, "svid_ready": m.svid_ready,
        })).collect::<Vec<_>>(),
        "near_misses": x.near_misses.iter().map(|n| serde_json::json!({
            "entry_id": n.entry_id, "spiffe_id": n.spiffe_id,
            "missing": n.missing.iter().map(|m| serde_json::json!({
                "selector": m.selector, "process_has": m.process_has,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "entries_held": x.entries_held,
        "synced": x.synced,
    })
}

/// The human-readable report.
pub fn to_text(x: &pb::ExplainResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "Process {}: {} selector(s)", x.pid, x.selectors.len());
    for s in &x.selectors {
        let _ = writeln!(out, "  {s}");
    }
    let _ = writeln!(out);
    if !x.synced {
        let _ = writeln!(
            out,
            "The agent has not received its entries from sigil-server yet: nothing can match."
        );
    }
    if x.matches.is_empty() {
        let _ = writeln!(
            out,
            "No entry matches: this process gets PermissionDenied (\"no identity issued\")."
        );
    } else {
        let _ = writeln!(
            out,
            "Matching entries ({}), default first:",
            x.matches.len()
        );
        for m in &x.matches {
            let state = if m.svid_ready {
                "SVID ready"
            } else {
                "SVID being minted"
            };
            let _ = writeln!(out, "  {}  (entry {}, {state})", m.spiffe_id, m.entry_id);
        }
    }
    if !x.near_misses.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Near misses (entries that need selectors this process lacks):"
        );
        for n in &x.near_misses {
            let _ = writeln!(out, "  {}  (entry {})", n.spiffe_id, n.entry_id);
            for m in &n.missing {
                if m.process_has.is_empty() {
                    let _ = writeln!(out, "      missing {}", m.selector);
                } else {
                    let _ = writeln!(
                        out,
                        "      missing {}  (process has {})",
                        m.selector,
                        m.process_has.join(", ")
                    );
                }
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} entries held by this agent. Entries parented to other agents are not visible here: check `sigil-server entry show` for the parent ID.",
        x.entries_held
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_the_missing_selector_and_what_the_process_has() {
        let x = pb::ExplainResponse {
            pid: 42,
            selectors: vec!["unix:uid:1000".into()],
            matches: vec![],
            near_misses: vec![pb::ExplainNearMiss {
                entry_id: "e1".into(),
                spiffe_id: "spiffe://example.org/db".into(),
                missing: vec![pb::ExplainMissing {
                    selector: "unix:uid:1001".into(),
                    process_has: vec!["unix:uid:1000".into()],
                }],
            }],
            entries_held: 1,
            synced: true,
        };
        let t = to_text(&x);
        assert!(t.contains("No entry matches"), "{t}");
        assert!(
            t.contains("missing unix:uid:1001  (process has unix:uid:1000)"),
            "{t}"
        );
        assert_eq!(
            to_json(&x)["near_misses"][0]["missing"][0]["selector"],
            "unix:uid:1001"
        );
    }
}
