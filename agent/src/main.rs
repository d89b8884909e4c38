//! `sigil-agent`: the node agent. Node attestation, entry sync and the SVID cache arrive with the
//! node-agent issue; the Workload API with the issue after it. Until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!(
        "error: sigil-agent is not implemented yet (node agent: issue 3; Workload API: issue 4)"
    );
    std::process::ExitCode::from(2)
}
