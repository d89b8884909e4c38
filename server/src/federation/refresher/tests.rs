//! The refresher on paused tokio time against a scripted [`FetchBundle`] and a real SQLite
//! datastore: refresh at the hint (clamped, default), back-off on failures (bounded, the last
//! good bundle kept), relationship changes picked up at once, forced refreshes, and the trust
//! of an `https_spiffe` endpoint chained across a CA rotation of the other side.

use std::collections::VecDeque;

use async_trait::async_trait;
use sigil::SpiffeId;

use super::*;
use crate::datastore::sqlite::SqliteDatastore;
use crate::federation::FetchedBundle;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// What the scripted endpoint does on one call.
enum Step {
    /// Serves a bundle of `other.org` with these roots and this refresh hint (seconds).
    Serve(Vec<&'static [u8]>, Option<u64>),
    /// Serves a bundle of another trust domain (a failure the refresher detects).
    WrongTrustDomain,
    /// Serves a bundle with nothing in it (a failure too).
    Empty,
    /// Never answers (the fetch times out).
    Hang,
}

/// One call the scripted endpoint saw.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    url: String,
    /// The roots of the trust bundle it was given.
    trust: Option<Vec<Vec<u8>>>,
}

/// A bundle endpoint that follows a script; once the script is over it serves `steady`.
struct Script {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<Call>>,
    count: watch::Sender<usize>,
}

impl Script {
    fn new(steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Self {
            steps: Mutex::new(steps.into()),
            calls: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
        })
    }

    fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Waits (paused time runs on) until `n` calls were made and the refresher has dealt with
    /// the last answer: paused time moves on only once every task (and blocking datastore
    /// call) is idle, so a short sleep ends after the refresher's writes.
    async fn wait_calls(&self, n: usize) -> Vec<Call> {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.calls()
    }
}

fn other() -> TrustDomain {
    TrustDomain::new("other.org").expect("td")
}

fn bundle_of(td: TrustDomain, roots: &[&[u8]]) -> Bundle {
    Bundle {
        x509_authorities: roots.iter().map(|r| r.to_vec()).collect(),
        ..Bundle::new(td)
    }
}

#[async_trait]
impl FetchBundle for Script {
    async fn fetch(
        &self,
        url: &str,
        trust_domain: &TrustDomain,
        _profile: &EndpointProfile,
        trust: Option<&Bundle>,
    ) -> Result<FetchedBundle, FetchError> {
        lock(&self.calls).push(Call {
            at: Instant::now(),
            url: url.to_string(),
            trust: trust.map(|b| b.x509_authorities.clone()),
        });
        self.count.send_modify(|c| *c += 1);
        let step = lock(&self.steps)
            .pop_front()
            .unwrap_or(Step::Serve(vec![b"steady"], None));
        let (bundle, hint) = match step {
            Step::Serve(roots, hint) => (bundle_of(trust_domain.clone(), &roots), hint),
            Step::WrongTrustDomain => (
                bundle_of(TrustDomain::new("third.org").expect("td"), &[b"x"]),
                None,
            ),
            Step::Empty => (Bundle::new(trust_domain.clone()), None),
            Step::Hang => std::future::pending().await,
        };
        Ok(FetchedBundle {
            bundle,
            sequence: None,
            refresh_hint: hint.map(Duration::from_secs),
        })
    }
}

/// A running refresher on a fresh SQLite datastore of `example.org`.
struct Harness {
    federation: Arc<Federation>,
    datastore: Arc<dyn Datastore>,
    script: Arc<Script>,
    events: SyncEvents,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(
        steps: Vec<Step>,
        configured: &[ConfiguredRelationship],
        stored: &[FederationRelationship],
    ) -> TestResult<Self> {
        Self::start_with(steps, configured, stored, true).await
    }

    async fn start_with(
        steps: Vec<Step>,
        configured: &[ConfiguredRelationship],
        stored: &[FederationRelationship],
        with_fetcher: bool,
    ) -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let datastore: Arc<dyn Datastore> =
            Arc::new(SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?);
        for r in stored {
            datastore.create_federation_relationship(r.clone()).await?;
        }
        let federation = Arc::new(Federation::new(
            TrustDomain::new("example.org")?,
            configured,
        ));
        let script = Script::new(steps);
        let events = SyncEvents::new();
        let metrics = Metrics::new();
        let refresher = Refresher {
            federation: federation.clone(),
            datastore: datastore.clone(),
            fetcher: with_fetcher.then(|| script.clone() as Arc<dyn FetchBundle>),
            events: events.clone(),
            metrics: metrics.clone(),
            clock: Clock::following_tokio(1_000_000),
        };
        refresher.store_initial_bundles(configured).await?;
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(refresher.run(shutdown));
        Ok(Self {
            federation,
            datastore,
            script,
            events,
            metrics,
            stop,
            task,
            _dir: dir,
        })
    }

    async fn stored_roots(&self) -> TestResult<Option<Vec<Vec<u8>>>> {
        Ok(self
            .datastore
            .get_federated_bundle(&other())
            .await?
            .map(|b| b.x509_roots))
    }

    async fn stop(self) -> TestResult {
        let _ = self.stop.send(true);
        self.task.await?;
        Ok(())
    }
}

fn web(url: &str) -> FederationRelationship {
    FederationRelationship {
        trust_domain: other(),
        bundle_endpoint_url: url.into(),
        profile: EndpointProfile::HttpsWeb,
        created_at: 0,
        updated_at: 0,
    }
}

fn gaps(calls: &[Call]) -> Vec<Duration> {
    calls.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(start_paused = true)]
async fn refreshes_at_the_clamped_hint_and_stores_only_changes() -> TestResult {
    let h = Harness::start(
        vec![
            Step::Serve(vec![b"a"], Some(60)),
            Step::Serve(vec![b"a"], None),
            Step::Serve(vec![b"b"], Some(1)),
            Step::Serve(vec![b"b"], Some(36_000)),
        ],
        &[],
        &[web("https://other.org/bundle")],
    )
    .await?;
    let calls = h.script.wait_calls(5).await;
    assert_eq!(
        gaps(&calls),
        vec![
            Duration::from_secs(60),
            DEFAULT_REFRESH,
            MIN_REFRESH,
            MAX_REFRESH
        ]
    );
    assert!(calls.iter().all(|c| c.url == "https://other.org/bundle"));
    // a, a (unchanged), b, b (unchanged), steady: three writes and three announcements.
    let stored = h
        .datastore
        .get_federated_bundle(&other())
        .await?
        .ok_or("a bundle is stored")?;
    assert_eq!(stored.sequence, 3);
    assert_eq!(h.events.current().federated_changes, 3);
    let status = h.federation.status(&other()).ok_or("a status")?;
    assert_eq!(status.last_error, None);
    assert_eq!(status.consecutive_failures, 0);
    assert!(status.last_success_at.is_some() && status.next_attempt_at > status.last_success_at);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &h.metrics.registry())?;
    assert!(
        text.contains(r#"sigil_server_federation_bundle_refreshes_total{trust_domain="other.org",outcome="changed"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(
            "sigil_server_federation_bundle_last_success_seconds{trust_domain=\"other.org\"}"
        ),
        "{text}"
    );
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_within_bounds_and_keep_the_last_good_bundle() -> TestResult {
    let mut steps = vec![Step::Serve(vec![b"good"], Some(60))];
    for i in 0..9 {
        steps.push(if i % 2 == 0 {
            Step::WrongTrustDomain
        } else {
            Step::Empty
        });
    }
    steps.push(Step::Serve(vec![b"good"], Some(120)));
    let h = Harness::start(steps, &[], &[web("https://other.org/b")]).await?;

    let calls = h.script.wait_calls(6).await;
    // Five failures so far: the stored bundle is still the good one.
    assert_eq!(h.stored_roots().await?, Some(vec![b"good".to_vec()]));
    let status = h.federation.status(&other()).ok_or("status")?;
    assert_eq!(status.consecutive_failures, 5);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("empty bundle") || e.contains("third.org")),
        "{status:?}"
    );
    assert!(status.last_success_at.is_some());

    drop(calls);
    let calls = h.script.wait_calls(12).await;
    let g = gaps(&calls);
    assert_eq!(g[0], Duration::from_secs(60), "first refresh at the hint");
    // The nine failures' delays: 5 s doubling, each shortened by at most a fifth, capped.
    for (i, gap) in g[1..10].iter().enumerate() {
        let full = retry_delay(i as u32 + 1);
        assert!(
            *gap <= full && *gap >= full.mul_f64(0.8),
            "retry {}: {gap:?} not within [0.8, 1] x {full:?}",
            i + 1
        );
        assert!(*gap <= MAX_RETRY);
    }
    assert_eq!(retry_delay(9), MAX_RETRY, "the cap is reached");
    // Recovered: the failure count is reset and the next fetch is at the new hint.
    assert_eq!(g[10], Duration::from_secs(120));
    let status = h.federation.status(&other()).ok_or("status")?;
    assert_eq!((status.consecutive_failures, status.last_error), (0, None));
    // Changes: the first fetch, and the 12th (past the script: `steady`).
    assert_eq!(h.events.current().federated_changes, 2);
    assert_eq!(h.stored_roots().await?, Some(vec![b"steady".to_vec()]));
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_times_out_and_no_fetcher_is_an_error() -> TestResult {
    let h = Harness::start(vec![Step::Hang], &[], &[web("https://other.org/b")]).await?;
    h.script.wait_calls(1).await;
    tokio::time::sleep(FETCH_TIMEOUT + Duration::from_secs(1)).await;
    let status = h.federation.status(&other()).ok_or("status")?;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("did not answer within 30s")),
        "{status:?}"
    );
    assert_eq!(status.last_success_at, None);
    let calls = h.script.wait_calls(2).await;
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= FETCH_TIMEOUT + FIRST_RETRY.mul_f64(0.8) && gap <= FETCH_TIMEOUT + FIRST_RETRY,
        "{gap:?}: the timeout, then the first retry"
    );
    h.stop().await?;

    let h = Harness::start_with(vec![], &[], &[web("https://other.org/b")], false).await?;
    let err = h
        .federation
        .refresh(&other())
        .await
        .expect_err("no fetcher");
    assert!(matches!(err, RefreshError::NoFetcher), "{err}");
    let status = h.federation.status(&other()).ok_or("status")?;
    assert!(status.last_error.is_some_and(|e| e.contains("bundle set")));
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn relationship_changes_are_picked_up_at_once() -> TestResult {
    let h = Harness::start(vec![], &[], &[]).await?;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(h.script.calls().is_empty(), "nothing to follow");

    let start = Instant::now();
    h.datastore
        .create_federation_relationship(web("https://one.example/"))
        .await?;
    h.federation.relationships_changed();
    let calls = h.script.wait_calls(1).await;
    assert_eq!(calls[0].at, start, "fetched at once");
    assert_eq!(h.stored_roots().await?, Some(vec![b"steady".to_vec()]));

    // A new URL: fetched at once from it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let changed_at = Instant::now();
    h.datastore
        .update_federation_relationship(web("https://two.example/"))
        .await?;
    h.federation.relationships_changed();
    let calls = h.script.wait_calls(2).await;
    assert_eq!(
        (calls[1].at, calls[1].url.as_str()),
        (changed_at, "https://two.example/")
    );

    // Deleted: no more fetches, no status; the bundle stays.
    h.datastore.delete_federation_relationship(&other()).await?;
    h.federation.relationships_changed();
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(h.script.calls().len(), 2);
    assert_eq!(h.federation.status(&other()), None);
    assert!(h.stored_roots().await?.is_some());
    let err = h.federation.refresh(&other()).await.expect_err("gone");
    assert!(matches!(err, RefreshError::NoRelationship(_)), "{err}");
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_fetches_now_and_returns_its_outcome() -> TestResult {
    let h = Harness::start(
        vec![
            Step::Serve(vec![b"a"], Some(600)),
            Step::Serve(vec![b"b"], Some(600)),
            Step::WrongTrustDomain,
        ],
        &[],
        &[web("https://other.org/b")],
    )
    .await?;
    h.script.wait_calls(1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = Instant::now();
    let outcome = h.federation.refresh(&other()).await?;
    assert_eq!(h.script.calls()[1].at, before, "no wait for the hint");
    assert_eq!(
        outcome,
        RefreshOutcome {
            changed: true,
            sequence: 2,
            next_in: Duration::from_secs(600)
        }
    );
    let err = h.federation.refresh(&other()).await.expect_err("wrong td");
    assert!(
        matches!(err, RefreshError::WrongTrustDomain { .. }),
        "{err}"
    );
    assert_eq!(h.stored_roots().await?, Some(vec![b"b".to_vec()]));
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn https_spiffe_trust_chains_across_a_ca_rotation() -> TestResult {
    let endpoint_spiffe_id = SpiffeId::parse("spiffe://other.org/spire/server")?;
    let rel = FederationRelationship {
        profile: EndpointProfile::HttpsSpiffe { endpoint_spiffe_id },
        ..web("https://other.org:8443")
    };
    // Nothing to authenticate the endpoint with yet: refused without a fetch.
    let h = Harness::start(vec![], &[], std::slice::from_ref(&rel)).await?;
    let err = h.federation.refresh(&other()).await.expect_err("no trust");
    assert!(matches!(err, RefreshError::NoTrustBundle(_)), "{err}");
    assert!(h.script.calls().is_empty());
    h.stop().await?;

    // The config file's initial bundle [old]; the other side prepares [new], then drops [old].
    let configured = ConfiguredRelationship {
        relationship: rel,
        initial_bundle: Some(bundle_of(other(), &[b"old"])),
    };
    let h = Harness::start(
        vec![
            Step::Serve(vec![b"old", b"new"], Some(60)),
            Step::Serve(vec![b"new"], Some(60)),
            Step::Serve(vec![b"new"], Some(60)),
        ],
        &[configured],
        &[],
    )
    .await?;
    let calls = h.script.wait_calls(3).await;
    let trusts: Vec<Option<Vec<Vec<u8>>>> = calls.into_iter().map(|c| c.trust).collect();
    assert_eq!(
        trusts,
        vec![
            Some(vec![b"old".to_vec()]),
            Some(vec![b"old".to_vec(), b"new".to_vec()]),
            Some(vec![b"new".to_vec()]),
        ]
    );
    h.stop().await
}

#[tokio::test(start_paused = true)]
async fn the_config_files_relationship_wins_over_a_stored_one() -> TestResult {
    let configured = ConfiguredRelationship {
        relationship: web("https://from-config.example/"),
        initial_bundle: None,
    };
    let h = Harness::start(
        vec![],
        std::slice::from_ref(&configured),
        &[web("https://from-datastore.example/")],
    )
    .await?;
    let calls = h.script.wait_calls(1).await;
    assert_eq!(calls[0].url, "https://from-config.example/");
    let all = h.federation.relationships(h.datastore.as_ref()).await?;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].1, Source::Config);
    assert_eq!(all[0].0.bundle_endpoint_url, "https://from-config.example/");
    h.stop().await
}
