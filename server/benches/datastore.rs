//! Datastore-layer benchmarks of the SQLite datastore (no gRPC): entry creation throughput and
//! query latency with 100,000 entries stored. Real files on disk under
//! `target/tmp` (`CARGO_TARGET_TMPDIR`), `synchronous=FULL`, so every commit is an fsync.
//!
//! Run: `cargo bench -p sigil-server --bench datastore` (about a minute on 2 cores).

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId};
use sigil_server::datastore::sqlite::SqliteDatastore;
use sigil_server::datastore::{Datastore, EntryFilter, SelectorMatch};
use tokio::runtime::Runtime;

const TD: &str = "spiffe://example.org";
/// Entries in the query benchmarks' database.
const BIG: usize = 100_000;

fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("{TD}{path}")).expect("bench SPIFFE ID")
}

fn sels(v: &[String]) -> SelectorSet {
    v.iter()
        .map(|s| Selector::parse(s).expect("bench selector"))
        .collect()
}

/// Entry `i` of a synthetic Kubernetes-like population: 100 namespaces, 1,000 nodes (100
/// entries each), 3 selectors per entry (namespace, service account, uid).
fn entry(i: usize) -> RegistrationEntry {
    RegistrationEntry {
        x509_svid_ttl: Some(Duration::from_secs(3600)),
        dns_names: vec![format!("sa-{i}.example.org")],
        ..RegistrationEntry::new(
            id(&format!("/ns/ns-{}/sa/sa-{i}", i % 100)),
            id(&format!("/sigil/agent/join_token/node-{}", i % 1000)),
            sels(&[
                format!("k8s:ns:ns-{}", i % 100),
                format!("k8s:sa:sa-{}", i % 5000),
                format!("unix:uid:{}", i % 2000),
            ]),
        )
    }
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sigil-ds-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("bench temp dir")
}

/// Creates entries `range` in batches of `batch`; panics on any refusal (benches may).
async fn fill(ds: &SqliteDatastore, range: std::ops::Range<usize>, batch: usize) {
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(batch) {
        let results = ds
            .create_entries(chunk.iter().map(|&i| entry(i)).collect())
            .await
            .expect("create_entries");
        assert!(results.iter().all(Result::is_ok), "an entry was refused");
    }
}

fn create(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("datastore/create");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // (entries per iteration, batch size): one transaction (one fsync) per batch.
    for (total, batch) in [(10_000, 1_000), (10_000, 100), (500, 1)] {
        group.throughput(Throughput::Elements(total as u64));
        group.bench_with_input(
            BenchmarkId::new(format!("{total}_entries_batch"), batch),
            &batch,
            |b, &batch| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tmpdir();
                        let ds = SqliteDatastore::open_blocking(&dir.path().join("ds.sqlite3"))
                            .expect("open");
                        let start = Instant::now();
                        rt.block_on(fill(&ds, 0..total, batch));
                        spent += start.elapsed();
                    }
                    spent
                })
            },
        );
    }
    group.finish();
}

fn query(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let dir = tmpdir();
    let path = dir.path().join("ds.sqlite3");
    let ds = SqliteDatastore::open_blocking(&path).expect("open");
    let start = Instant::now();
    rt.block_on(fill(&ds, 0..BIG, 1_000));
    let mib = |p: &std::path::Path| {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0)
    };
    eprintln!(
        "setup: {BIG} entries created in {:.2?} (batches of 1,000); database {:.1} MiB + WAL {:.1} MiB",
        start.elapsed(),
        mib(&path),
        mib(&path.with_extension("sqlite3-wal")),
    );

    let mut group = c.benchmark_group("datastore/query_100k");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    let all = EntryFilter::default();
    group.bench_function("list_page500_unfiltered_first", |b| {
        b.iter(|| {
            let page = rt.block_on(ds.list_entries(&all, 500, None)).expect("list");
            assert_eq!(page.items.len(), 500);
        })
    });
    // A page deep into the table: keyset paging costs the same as the first page.
    let deep = format!("e{}", BIG / 2);
    group.bench_function("list_page500_unfiltered_at_50k", |b| {
        b.iter(|| {
            let page = rt
                .block_on(ds.list_entries(&all, 500, Some(&deep)))
                .expect("list");
            assert_eq!(page.items.len(), 500);
        })
    });
    let by_parent = EntryFilter {
        parent_id: Some(id("/sigil/agent/join_token/node-7")),
        ..Default::default()
    };
    group.bench_function("list_by_parent_id_100_hits", |b| {
        b.iter(|| {
            let page = rt
                .block_on(ds.list_entries(&by_parent, 500, None))
                .expect("list");
            assert_eq!(page.items.len(), BIG / 1000);
        })
    });
    // A workload's selectors: namespace, service account, uid and one no entry uses.
    let workload = sels(&[
        "k8s:ns:ns-7".into(),
        "k8s:sa:sa-7".into(),
        "unix:uid:7".into(),
        "k8s:pod-uid:0b5e".into(),
    ]);
    let subset = EntryFilter {
        selectors: Some((workload.clone(), SelectorMatch::Subset)),
        ..Default::default()
    };
    group.bench_function("list_selector_subset_4_sels_10_hits", |b| {
        b.iter(|| {
            let page = rt
                .block_on(ds.list_entries(&subset, 500, None))
                .expect("list");
            assert_eq!(page.items.len(), BIG / 10_000);
        })
    });
    let ns = EntryFilter {
        selectors: Some((sels(&["k8s:ns:ns-7".into()]), SelectorMatch::Superset)),
        ..Default::default()
    };
    group.bench_function("list_selector_superset_1_sel_page500_of_1000", |b| {
        b.iter(|| {
            let page = rt.block_on(ds.list_entries(&ns, 500, None)).expect("list");
            assert_eq!(page.items.len(), 500);
        })
    });
    group.bench_function("count_all", |b| {
        b.iter(|| {
            let n = rt.block_on(ds.count_entries(&all)).expect("count");
            assert_eq!(n, BIG as u64);
        })
    });
    group.bench_function("count_selector_subset", |b| {
        b.iter(|| {
            let n = rt.block_on(ds.count_entries(&subset)).expect("count");
            assert_eq!(n, (BIG / 10_000) as u64);
        })
    });
    let some_id = rt
        .block_on(ds.list_entries(&all, 1, Some(&deep)))
        .expect("list")
        .items
        .remove(0)
        .id;
    group.bench_function("get_entry_by_id", |b| {
        b.iter(|| {
            let e = rt.block_on(ds.get_entry(&some_id)).expect("get");
            assert!(e.is_some());
        })
    });
    group.bench_function("entry_changes_since_head_minus_100", |b| {
        b.iter(|| {
            let ch = rt
                .block_on(ds.entry_changes_since(BIG as i64 - 100))
                .expect("changes");
            assert_eq!(ch.upserted.len(), 100);
        })
    });
    group.finish();
    drop(ds);
}

criterion_group!(benches, create, query);
criterion_main!(benches);
