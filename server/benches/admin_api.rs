//! Admin API benchmark: real gRPC over a real Unix socket into the real SQLite datastore.
//!
//! Measures entry creation throughput (batched, as `entry create --data` sends, and one entry
//! per call) and list/filter/count latency with 100,000 entries stored. Prints a table; run with
//! `cargo bench -p sigil-server --bench admin_api`. Set `SIGIL_BENCH_ENTRIES` to change the
//! 100,000 fill (e.g. a quick smoke run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil::bundle::Bundle;
use sigil::proto::admin as pb;
use sigil::proto::admin::admin_client::AdminClient;
use sigil::proto::admin::admin_server::AdminServer;
use sigil::TrustDomain;
use sigil_server::api::admin::{AdminService, AdminState};
use sigil_server::datastore::sqlite::SqliteDatastore;
use sigil_server::metrics::Metrics;
use tokio::sync::RwLock;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

const PARENTS: usize = 1000;

fn entry(i: usize) -> pb::Entry {
    pb::Entry {
        spiffe_id: format!("spiffe://example.org/svc/{i}"),
        parent_id: format!(
            "spiffe://example.org/sigil/agent/join_token/node-{}",
            i % PARENTS
        ),
        selectors: vec![
            pb::Selector {
                r#type: "unix".into(),
                value: format!("uid:{}", i % 5000),
            },
            pb::Selector {
                r#type: "unix".into(),
                value: format!("gid:{}", i % 50),
            },
            pb::Selector {
                r#type: "k8s".into(),
                value: format!("ns:ns-{}", i % 200),
            },
        ],
        ..Default::default()
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

async fn batch_create(client: &mut AdminClient<Channel>, from: usize, to: usize, batch: usize) {
    let mut i = from;
    while i < to {
        let end = (i + batch).min(to);
        let resp = client
            .batch_create_entries(pb::BatchCreateEntriesRequest {
                entries: (i..end).map(entry).collect(),
            })
            .await
            .expect("batch create")
            .into_inner();
        assert!(
            resp.results.iter().all(|r| r.code == 0),
            "batch create failed"
        );
        i = end;
    }
}

async fn latency<F, Fut>(name: &str, iterations: usize, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut samples = Vec::with_capacity(iterations);
    let mut returned = 0;
    for _ in 0..iterations {
        let t = Instant::now();
        returned = f().await;
        samples.push(t.elapsed());
    }
    let p50 = percentile(&mut samples, 0.5);
    let p99 = percentile(&mut samples, 0.99);
    println!(
        "| {name} | {returned} | {:.2} ms | {:.2} ms |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

fn main() {
    let fill: usize = std::env::var("SIGIL_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let ds = Arc::new(
            SqliteDatastore::open(&dir.path().join("bench.sqlite3"))
                .await
                .expect("open datastore"),
        );
        let td = TrustDomain::new("example.org").expect("td");
        let state = Arc::new(AdminState {
            trust_domain: td.clone(),
            datastore: ds,
            bundle: RwLock::new(Bundle::new(td.clone())),
            metrics: Metrics::new(),
            events: sigil_server::sync::SyncEvents::new(),
            ca_not_after: std::sync::atomic::AtomicI64::new(i64::MAX),
            ca: None,
            federation: std::sync::Arc::new(sigil_server::federation::refresher::Federation::new(
                td.clone(),
                &[],
            )),
            started: std::sync::atomic::AtomicBool::new(true),
        });
        let sock = dir.path().join("admin.sock");
        let (listener, _socket_file) = sigil::uds::bind(&sock, 0o700, 0o600).await.expect("bind");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(AdminService::new(state)))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        let mut client = AdminClient::new(sigil::uds::connect(&sock).await.expect("connect"));

        println!("| operation | entries | time | entries/s |");
        println!("|---|---|---|---|");
        let t = Instant::now();
        batch_create(&mut client, 0, 10_000, 500).await;
        let e = t.elapsed();
        println!(
            "| create 10,000 (BatchCreateEntries x500) | 10000 | {:.2} s | {:.0} |",
            e.as_secs_f64(),
            10_000.0 / e.as_secs_f64()
        );

        let t = Instant::now();
        for i in 10_000..11_000 {
            client
                .create_entry(pb::CreateEntryRequest {
                    entry: Some(entry(i)),
                })
                .await
                .expect("create");
        }
        let e = t.elapsed();
        println!(
            "| create 1,000 (CreateEntry, one per call) | 1000 | {:.2} s | {:.0} |",
            e.as_secs_f64(),
            1_000.0 / e.as_secs_f64()
        );

        let t = Instant::now();
        batch_create(&mut client, 11_000, fill.max(11_000), 5_000).await;
        println!(
            "\nfilled to {} entries in {:.1} s\n",
            fill.max(11_000),
            t.elapsed().as_secs_f64()
        );

        println!(
            "| query at {} entries | results | p50 | p99 |",
            fill.max(11_000)
        );
        println!("|---|---|---|---|");
        let list = |filter: Option<pb::EntryFilter>, page_size: u32| {
            let mut c = client.clone();
            async move {
                c.list_entries(pb::ListEntriesRequest {
                    filter,
                    page_size,
                    page_token: String::new(),
                })
                .await
                .expect("list")
                .into_inner()
                .entries
                .len()
            }
        };
        latency("list first page (500), no filter", 50, || list(None, 500)).await;
        latency("filter by parent_id", 50, || {
            list(
                Some(pb::EntryFilter {
                    parent_id: "spiffe://example.org/sigil/agent/join_token/node-7".into(),
                    ..Default::default()
                }),
                0,
            )
        })
        .await;
        latency("filter by spiffe_id", 50, || {
            list(
                Some(pb::EntryFilter {
                    spiffe_id: "spiffe://example.org/svc/4242".into(),
                    ..Default::default()
                }),
                0,
            )
        })
        .await;
        let workload = vec![
            pb::Selector {
                r#type: "unix".into(),
                value: "uid:42".into(),
            },
            pb::Selector {
                r#type: "unix".into(),
                value: "gid:42".into(),
            },
            pb::Selector {
                r#type: "k8s".into(),
                value: "ns:ns-42".into(),
            },
            pb::Selector {
                r#type: "unix".into(),
                value: "path:/usr/bin/app".into(),
            },
        ];
        latency("selector subset (a workload's 4 selectors)", 50, || {
            list(
                Some(pb::EntryFilter {
                    selectors: workload.clone(),
                    selector_match: pb::SelectorMatch::Subset as i32,
                    ..Default::default()
                }),
                0,
            )
        })
        .await;
        latency("selector superset (unix:gid:7)", 20, || {
            list(
                Some(pb::EntryFilter {
                    selectors: vec![pb::Selector {
                        r#type: "unix".into(),
                        value: "gid:7".into(),
                    }],
                    selector_match: pb::SelectorMatch::Superset as i32,
                    ..Default::default()
                }),
                0,
            )
        })
        .await;
        latency("count all", 20, || {
            let mut c = client.clone();
            async move {
                c.count_entries(pb::CountEntriesRequest { filter: None })
                    .await
                    .expect("count")
                    .into_inner()
                    .count as usize
            }
        })
        .await;
    });
}
