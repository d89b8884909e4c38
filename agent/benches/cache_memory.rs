//! What the agent's cache holds in memory per entry: entries, indexes and SVIDs, counted by the
//! allocator (dhat's heap statistics) at 100,000 entries shaped like those of the end-to-end
//! bench (`k8s:ns:` 100 values, `k8s:sa:` 5,000, a unique `unix:uid:`, one DNS name, all under
//! one node alias). Each SVID is a P-256 key and a leaf signed the way sigil-server signs one;
//! 1,000 distinct ones, entry i holding its own copy of number i % 1,000 (leaves are held
//! compressed against another leaf of their authority, not against each other, so this costs
//! what 100,000 distinct ones would).
//!
//! `cargo bench -p sigil-agent --bench cache_memory` (BENCHMARKS.md, "Agent cache memory").
//! `SIGIL_BENCH_MEM_ENTRIES` (100000) sets the size; `SIGIL_BENCH_MEM_PROFILE=<file>` also writes
//! dhat's per-allocation-site profile there (open it with dhat's viewer, `dh_view.html`).

#![allow(clippy::unwrap_used, missing_docs)]

use sigil::proto::admin as apb;
use sigil::proto::node as pb;
use sigil_agent::sync::cache::{Cache, PendingCsr};

mod support;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn entry(i: usize) -> apb::Entry {
    let sel = |t: &str, v: String| apb::Selector {
        r#type: t.into(),
        value: v,
    };
    apb::Entry {
        id: format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            i * 2654435761 % (1 << 32),
            i % 65536,
            i
        ),
        spiffe_id: format!("spiffe://example.org/ns-{}/sa-{}/w-{i}", i % 100, i % 5000),
        parent_id: "spiffe://example.org/node-a".into(),
        selectors: vec![
            sel("k8s", format!("ns:ns-{}", i % 100)),
            sel("k8s", format!("sa:sa-{}", i % 5000)),
            sel("unix", format!("uid:{i}")),
        ],
        dns_names: vec![format!("w-{i}.example.org")],
        revision_number: 1,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
        ..Default::default()
    }
}

/// Live heap: (bytes, blocks).
fn live() -> (u64, u64) {
    let s = dhat::HeapStats::get();
    (s.curr_bytes as u64, s.curr_blocks as u64)
}

fn row(what: &str, n: usize, before: (u64, u64), after: (u64, u64)) {
    let bytes = after.0.saturating_sub(before.0);
    let blocks = after.1.saturating_sub(before.1);
    // glibc malloc: an 8-byte header per block, sizes rounded up to 16, 32 at least.
    println!(
        "| {what} | {:.1} MiB | {:.0} B | {:.1} | ~{:.0} B |",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / n as f64,
        blocks as f64 / n as f64,
        (bytes + blocks * 12) as f64 / n as f64,
    );
}

fn main() {
    let n: usize = std::env::var("SIGIL_BENCH_MEM_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let profile = std::env::var("SIGIL_BENCH_MEM_PROFILE").ok();
    let _profiler = match &profile {
        Some(file) => dhat::Profiler::builder().file_name(file).build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let svids = support::keys_and_leaves(1000);
    let leaf_bytes = svids.iter().map(|(_, l)| l.len()).sum::<usize>() / svids.len();
    let key_bytes = svids.iter().map(|(k, _)| k.len()).sum::<usize>() / svids.len();
    let before_messages = live();
    let mut messages: Vec<pb::SyncResponse> = (0..n)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|c| pb::SyncResponse {
            upserted: c.iter().map(|&i| entry(i)).collect(),
            full: c[0] == 0,
            snapshot_complete: c[c.len() - 1] == n - 1,
            revision: 1,
            ..Default::default()
        })
        .collect();

    println!("{n} entries; live heap added by each step (dhat), per entry, and with an estimate of glibc's per-block overhead:\n");
    println!("| step | live heap | per entry | blocks per entry | with malloc overhead |");
    println!("|---|---|---|---|---|");
    let mut cache = Cache::new();
    // The sync messages are dropped as they are applied: counted from before they were built.
    let start = before_messages;
    for m in messages.drain(..) {
        cache.apply_sync(m).unwrap();
        // As the worker does after each message.
        drop(cache.take_changes());
    }
    drop(messages);
    assert_eq!(cache.entry_count(), n);
    let entries = live();
    row(
        "entries, with the selector index and refresh queue",
        n,
        start,
        entries,
    );
    let ids: Vec<String> = cache.entries().map(|e| e.id.clone()).collect();
    let before_svids = live();
    let now = 1_700_000_000;
    for (i, id) in ids.iter().enumerate() {
        let (key, leaf) = &svids[i % svids.len()];
        let p = PendingCsr {
            entry_id: id.clone(),
            entry_revision: 1,
            key_pkcs8_der: key.clone(),
            csr_der: Vec::new(),
        };
        assert!(cache.store_svid(p, vec![leaf.clone()], now + 3600, now));
        drop(cache.take_changes());
    }
    let svids = live();
    row(
        &format!(
            "their X509-SVIDs ({leaf_bytes}-byte leaf, {key_bytes}-byte PKCS#8 key on average)"
        ),
        n,
        before_svids,
        svids,
    );
    drop(ids);
    let held = live();
    row("cache total", n, start, held);
    let snap = cache.snapshot();
    row(
        "a published snapshot (shares the cache's structure)",
        n,
        held,
        live(),
    );
    drop(snap);
    println!(
        "\npeak live heap during the run: {:.1} MiB",
        dhat::HeapStats::get().max_bytes as f64 / (1024.0 * 1024.0)
    );
}
