use super::*;

#[test]
fn backoff_grows_with_jitter_and_caps() {
    let mut b = Backoff::default();
    let mut prev_cap = Duration::ZERO;
    for i in 0..20 {
        let d = b.delay();
        let cap = (BACKOFF_START * 2u32.saturating_pow(i)).min(BACKOFF_MAX);
        assert!(
            d <= cap && d >= cap / 2,
            "attempt {i}: {d:?} not in [{:?}, {cap:?}]",
            cap / 2
        );
        assert!(cap >= prev_cap);
        prev_cap = cap;
    }
    assert_eq!(b.failures, 20);
    assert!(b.should_warn() == 20u32.is_power_of_two());
    b.reset();
    assert_eq!(b.failures, 0);
    assert!(b.delay() <= BACKOFF_START);
}

#[test]
fn an_unsaved_renewal_is_used_only_in_the_last_tenth_of_the_current_lifetime() {
    // 1 h SVID issued at 1000.
    assert!(!nearly_expired(1000 + 1800, 1000, 4600));
    assert!(!nearly_expired(4600 - 361, 1000, 4600));
    assert!(nearly_expired(4600 - 360, 1000, 4600));
    assert!(nearly_expired(4600 + 5, 1000, 4600));
    // A malformed lifetime never delays the switch.
    assert!(nearly_expired(10, 20, 10));
}

#[test]
fn refusals_say_what_happened() {
    let rpc = |status| ClientError::Rpc {
        what: "sync",
        status,
    };
    let superseded = refusal_message(
        &rpc(AgentRefusal::Superseded.status("agent SVID serial 0a0b is not …")),
        "0a0b",
    );
    assert!(
        superseded.contains("refused our agent SVID serial 0a0b: it is not the current one"),
        "{superseded}"
    );
    assert!(!superseded.contains("evicted") && !superseded.contains("banned"));
    let evicted = refusal_message(&rpc(AgentRefusal::Evicted.status("gone")), "0a");
    assert!(evicted.contains("it was evicted") && !evicted.contains("banned"));
    let banned = refusal_message(&rpc(AgentRefusal::Banned.status("ban")), "0a");
    assert!(banned.contains("has banned this agent") && !banned.contains("evicted"));
    let other = refusal_message(&rpc(tonic::Status::unauthenticated("expired")), "0a");
    assert!(
        other.contains("refused this agent: sync: expired"),
        "{other}"
    );
    assert!(!other.contains("evicted") && !other.contains("banned"));
}

#[test]
fn failed_agent_svid_renewals_back_off_until_a_new_svid() {
    let id = |serial: &str| AgentIdentity {
        spiffe_id: "spiffe://example.org/sigil/agent/join_token/t"
            .parse()
            .unwrap(),
        chain_der: vec![],
        key_pkcs8_der: vec![],
        serial_hex: serial.into(),
        not_before: 970,
        not_after: 4600,
    };
    let mut seen = AgentSvidSeen::default();
    let a = id("0a");
    assert_eq!(seen.renew_at(&a, 1000), 2800);
    // Refused at 2800: not asked again before the back-off, which grows and is capped.
    let mut last = 2800;
    let mut kinds = vec![];
    for n in 1..=12u32 {
        let (r, kind) = seen.note_failure("Unavailable: the CA expired", last);
        kinds.push(kind);
        assert_eq!(r.failures, n);
        assert_eq!(r.since, 2800);
        let delay = r.retry_at - last;
        let nominal = crate::sync::cache::sign_backoff_delay(n, 0.0) as f64;
        assert!(
            (nominal * 0.8 - 0.5..=nominal * 1.2 + 0.5).contains(&(delay as f64)),
            "failure {n}: {delay} s"
        );
        assert_eq!(
            seen.renew_at(&a, last),
            r.retry_at,
            "waits for the retry time"
        );
        last = r.retry_at;
    }
    assert_eq!(kinds[0], SignFailureKind::First);
    assert!(kinds[1..].iter().all(|k| *k == SignFailureKind::Repeated));
    assert_eq!(
        seen.note_failure("Internal: datastore", last).1,
        SignFailureKind::NewReason
    );
    // A new agent SVID (renewed, or attested again): the back-off is gone.
    let b = id("0b");
    assert_eq!(
        seen.renew_at(&b, 5000),
        crate::sync::cache::agent_svid_renew_at(5000, 4600)
    );
    assert!(seen.retry.is_none());
}

#[test]
fn warnings_are_rate_limited() {
    let mut b = Backoff::default();
    let warned: Vec<u32> = (0..100)
        .filter_map(|_| {
            b.delay();
            b.should_warn().then_some(b.failures)
        })
        .collect();
    assert_eq!(warned, vec![1, 2, 4, 8, 16, 32, 64]);
}

// --- The worker's sessions against a scripted node API, in paused time ----------------------

mod sessions {
    use super::*;
    use crate::sync::client::Attested;
    use crate::sync::node_api::SyncStream;
    use async_trait::async_trait;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Unix time at the start of every test (the clock follows tokio's paused clock from there).
    fn t0() -> i64 {
        sigil::clock::now_unix()
    }

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    /// The CA the fake server signs agent SVIDs with.
    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        der: Vec<u8>,
    }

    impl Ca {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            Self { params, key, der }
        }

        /// An agent SVID valid from `not_before` to `not_after` (Unix seconds).
        fn agent_svid(&self, not_before: i64, not_after: i64) -> AgentIdentity {
            let issuer = rcgen::Issuer::new(self.params.clone(), &self.key);
            let key = rcgen::KeyPair::generate().unwrap();
            let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            leaf.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://example.org/sigil/agent/x509pop/node"
                    .try_into()
                    .unwrap(),
            )];
            leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
            leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            leaf.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
            leaf.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
            let cert = leaf.signed_by(&key, &issuer).unwrap();
            AgentIdentity::new(&td(), vec![cert.der().to_vec()], key.serialize_der()).unwrap()
        }
    }

    /// What the fake server does with a sync call.
    enum SyncPlan {
        /// Refuses the call.
        Refuse(tonic::Status),
        /// Sends these messages, then keeps the stream open.
        Serve(Vec<pb::SyncResponse>),
        /// Sends these messages, then the stream breaks with this status (the server went).
        ServeThenBreak(Vec<pb::SyncResponse>, tonic::Status),
    }

    /// Which entries the fake refuses to sign.
    type RefuseFn = Box<dyn Fn(&str) -> bool + Send>;

    #[derive(Default)]
    struct Calls {
        /// Tokio instants of each call.
        sync: Vec<Instant>,
        renew: Vec<Instant>,
        sign: Vec<Instant>,
        attest: Vec<Instant>,
        /// The server of each sync call.
        sync_servers: Vec<String>,
        /// The entry ids of each BatchSign call.
        sign_ids: Vec<Vec<String>>,
        /// BatchSign calls in flight now, and the most at once.
        signing: usize,
        max_signing: usize,
    }

    struct Script {
        /// Each sync call takes the next plan; with none left, Unavailable.
        syncs: VecDeque<SyncPlan>,
        /// Renewals: Ok → a new SVID for an hour; Err → this status.
        renew: Result<(), tonic::Status>,
        refuse_sign: RefuseFn,
        /// Attestations: Ok → a new SVID for an hour; Err → this status.
        attest: Result<(), tonic::Status>,
        /// The servers (addresses) the fake stands for, and the current one.
        servers: Vec<String>,
        current: usize,
        calls: Calls,
        /// When set, each BatchSign call waits for a permit (taken for good) before answering.
        sign_gate: Option<Arc<tokio::sync::Semaphore>>,
        /// BatchSign calls (by their index) that fail as a whole with this status.
        fail_sign_call: Box<dyn Fn(usize) -> Option<tonic::Status> + Send>,
    }

    /// A scripted sigil-server.
    struct FakeNode {
        ca: Ca,
        clock: Clock,
        script: Arc<Mutex<Script>>,
    }

    impl FakeNode {
        fn new(clock: Clock) -> Arc<Self> {
            Arc::new(Self {
                ca: Ca::new(),
                clock,
                script: Arc::new(Mutex::new(Script {
                    syncs: VecDeque::new(),
                    renew: Ok(()),
                    refuse_sign: Box::new(|_| false),
                    attest: Ok(()),
                    servers: vec!["server-a:8081".into()],
                    current: 0,
                    calls: Calls::default(),
                    sign_gate: None,
                    fail_sign_call: Box::new(|_| None),
                })),
            })
        }

        fn script(&self) -> std::sync::MutexGuard<'_, Script> {
            self.script.lock().unwrap()
        }

        /// An X509-SVID for the CSR, valid for an hour.
        fn sign_csr(&self, csr: &[u8]) -> Vec<u8> {
            let now = self.clock.now_unix();
            let mut req =
                rcgen::CertificateSigningRequestParams::from_der(&csr.to_vec().into()).unwrap();
            req.params.not_before = time::OffsetDateTime::from_unix_timestamp(now - 30).unwrap();
            req.params.not_after = time::OffsetDateTime::from_unix_timestamp(now + 3600).unwrap();
            let issuer = rcgen::Issuer::new(self.ca.params.clone(), &self.ca.key);
            req.signed_by(&issuer).unwrap().der().to_vec()
        }

        fn fresh_svid(&self) -> AgentIdentity {
            let now = self.clock.now_unix();
            self.ca.agent_svid(now - 30, now + 3600)
        }
    }

    struct FakeSession {
        node: Arc<FakeNode>,
    }

    struct FakeStream(VecDeque<pb::SyncResponse>, Option<tonic::Status>);

    #[async_trait]
    impl SyncStream for FakeStream {
        async fn message(&mut self) -> Result<Option<pb::SyncResponse>, ClientError> {
            match (self.0.pop_front(), self.1.take()) {
                (Some(m), end) => {
                    self.1 = end;
                    Ok(Some(m))
                }
                (None, Some(status)) => Err(rpc("sync", &status)),
                (None, None) => std::future::pending().await,
            }
        }
    }

    fn rpc(what: &'static str, status: &tonic::Status) -> ClientError {
        ClientError::Rpc {
            what,
            status: tonic::Status::with_metadata(
                status.code(),
                status.message(),
                status.metadata().clone(),
            ),
        }
    }

    #[async_trait]
    impl NodeSession for FakeSession {
        async fn sync(
            &mut self,
            _request: pb::SyncRequest,
        ) -> Result<Box<dyn crate::sync::node_api::SyncStream>, ClientError> {
            let mut s = self.node.script();
            s.calls.sync.push(Instant::now());
            let server = s.servers[s.current].clone();
            s.calls.sync_servers.push(server);
            match s.syncs.pop_front() {
                Some(SyncPlan::Serve(msgs)) => Ok(Box::new(FakeStream(msgs.into(), None))),
                Some(SyncPlan::ServeThenBreak(msgs, status)) => {
                    Ok(Box::new(FakeStream(msgs.into(), Some(status))))
                }
                Some(SyncPlan::Refuse(status)) => Err(rpc("sync", &status)),
                None => Err(rpc("sync", &tonic::Status::unavailable("server down"))),
            }
        }

        async fn batch_sign(
            &self,
            requests: Vec<pb::SignRequest>,
        ) -> Result<Vec<pb::SignResult>, ClientError> {
            let (call, gate) = {
                let mut s = self.node.script();
                s.calls.sign.push(Instant::now());
                s.calls
                    .sign_ids
                    .push(requests.iter().map(|r| r.entry_id.clone()).collect());
                s.calls.signing += 1;
                s.calls.max_signing = s.calls.max_signing.max(s.calls.signing);
                (s.calls.sign.len() - 1, s.sign_gate.clone())
            };
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let mut s = self.node.script();
            s.calls.signing -= 1;
            if let Some(status) = (s.fail_sign_call)(call) {
                return Err(rpc("batch signing", &status));
            }
            let now = self.node.clock.now_unix();
            Ok(requests
                .iter()
                .map(|r| {
                    if (s.refuse_sign)(&r.entry_id) {
                        pb::SignResult {
                            entry_id: r.entry_id.clone(),
                            code: tonic::Code::FailedPrecondition as i32,
                            message: "not authorised".into(),
                            ..Default::default()
                        }
                    } else {
                        pb::SignResult {
                            entry_id: r.entry_id.clone(),
                            svid_chain: self.node.sign_csr(&r.csr),
                            expires_at: now + 3600,
                            ..Default::default()
                        }
                    }
                })
                .collect())
        }

        async fn renew(&mut self) -> Result<AgentIdentity, ClientError> {
            let result = {
                let mut s = self.node.script();
                s.calls.renew.push(Instant::now());
                s.renew.clone()
            };
            match result {
                Ok(()) => Ok(self.node.fresh_svid()),
                Err(status) => Err(rpc("agent SVID renewal", &status)),
            }
        }
    }

    #[async_trait]
    impl NodeApi for Arc<FakeNode> {
        fn session(&self) -> Result<Box<dyn NodeSession>, ClientError> {
            Ok(Box::new(FakeSession { node: self.clone() }))
        }

        async fn attest(&self, _method: &NodeAttestation) -> Result<Attested, ClientError> {
            let result = {
                let mut s = self.script();
                s.calls.attest.push(Instant::now());
                s.attest.clone()
            };
            match result {
                Ok(()) => Ok(Attested {
                    identity: self.fresh_svid(),
                    bundle_roots: vec![self.ca.der.clone()],
                }),
                Err(status) => Err(rpc("attestation", &status)),
            }
        }

        fn server(&self) -> String {
            let s = self.script();
            s.servers[s.current].clone()
        }

        async fn server_failed(&self, address: &str) -> crate::sync::node_api::Failover {
            let mut s = self.script();
            if s.servers[s.current] == address {
                s.current = (s.current + 1) % s.servers.len();
            }
            crate::sync::node_api::Failover {
                next: s.servers[s.current].clone(),
                wrapped: s.current == 0,
            }
        }
    }

    /// A running worker and what the test looks at.
    struct Running {
        state: Arc<AgentState>,
        node: Arc<FakeNode>,
        dir: tempfile::TempDir,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        first_serial: String,
    }

    impl Running {
        async fn stop(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the worker stops at shutdown")
                .unwrap();
        }

        fn stored_serial(&self) -> Option<String> {
            Storage::open(self.dir.path())
                .unwrap()
                .load_identity(&td())
                .unwrap()
                .map(|id| id.serial_hex)
        }
    }

    /// Starts a worker whose agent SVID was received now and lives `life` seconds, against
    /// `node` scripted by `script`.
    fn start(
        life: i64,
        attestation: Option<NodeAttestation>,
        script: impl FnOnce(&mut Script),
    ) -> Running {
        let clock = Clock::following_tokio(t0());
        let node = FakeNode::new(clock);
        script(&mut node.script());
        let now = clock.now_unix();
        let id = node.ca.agent_svid(now - 30, now + life);
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        storage.save_identity(&id).unwrap();
        let state = Arc::new(AgentState::new(td(), id.clone()));
        let worker = Worker {
            state: state.clone(),
            node: Arc::new(node.clone()),
            cache: Cache::new(),
            clock,
            tls_identity: Arc::new(
                IdentityStore::new(id.chain_der.clone(), id.key_pkcs8_der.clone()).unwrap(),
            ),
            trust: Arc::new(TrustStore::new(std::slice::from_ref(&node.ca.der)).unwrap()),
            storage,
            attestation,
        };
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(worker.run(shutdown));
        Running {
            state,
            node,
            dir,
            stop,
            task,
            first_serial: id.serial_hex,
        }
    }

    fn snapshot(entries: &[&str]) -> pb::SyncResponse {
        pb::SyncResponse {
            upserted: entries
                .iter()
                .map(|id| sigil::proto::admin::Entry {
                    id: id.to_string(),
                    spiffe_id: format!("spiffe://example.org/w/{id}"),
                    parent_id: "spiffe://example.org/sigil/agent/x509pop/node".into(),
                    selectors: vec![sigil::proto::admin::Selector {
                        r#type: "unix".into(),
                        value: "uid:7".into(),
                    }],
                    revision_number: 1,
                    ..Default::default()
                })
                .collect(),
            full: true,
            snapshot_complete: true,
            revision: 1,
            ..Default::default()
        }
    }

    /// Seconds between `start` and each of `calls`.
    fn secs_since(start: Instant, calls: &[Instant]) -> Vec<u64> {
        calls.iter().map(|c| (*c - start).as_secs()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_agent_svid_is_renewed_at_half_life_saved_and_used_at_once() {
        let started = Instant::now();
        let w = start(3600, None, |s| {
            s.syncs = [
                SyncPlan::Serve(vec![snapshot(&["a"])]),
                SyncPlan::Serve(vec![]),
            ]
            .into();
        });
        // Synced and the entry's SVID signed at once; no renewal before half the life.
        tokio::time::sleep(Duration::from_secs(1799)).await;
        {
            let s = w.node.script();
            assert_eq!(s.calls.sync.len(), 1);
            assert!(!s.calls.sign.is_empty(), "the entry's SVID signed");
            assert!(s.calls.renew.is_empty(), "renewed early");
        }
        assert_eq!(w.state.snapshot().svid_count(), 1);
        assert!(w.state.sync_status().is_connected());
        tokio::time::sleep(Duration::from_secs(2)).await;
        {
            let s = w.node.script();
            assert_eq!(secs_since(started, &s.calls.renew), [1800]);
            // The session ended and the next one connected at once with the new SVID.
            assert_eq!(secs_since(started, &s.calls.sync), [0, 1800]);
        }
        let serial = w.state.identity.read().await.serial_hex.clone();
        assert_ne!(serial, w.first_serial);
        assert_eq!(w.stored_serial().as_deref(), Some(serial.as_str()), "saved");
        // The next renewal is half the new SVID's life later.
        tokio::time::sleep(Duration::from_secs(1800)).await;
        assert_eq!(
            secs_since(started, &w.node.script().calls.renew),
            [1800, 3600]
        );
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn refused_renewals_back_off_and_the_session_goes_on() {
        let started = Instant::now();
        let w = start(24 * 3600, None, |s| {
            s.syncs = [SyncPlan::Serve(vec![snapshot(&[])])].into();
            s.renew = Err(tonic::Status::unavailable("the CA cannot sign"));
        });
        // Half life is 12 h; watch the next 30 min of refusals.
        tokio::time::sleep(Duration::from_secs(12 * 3600 + 1800)).await;
        let calls = secs_since(started, &w.node.script().calls.renew);
        // 8, 16, 32, 64, 128, 256, 300, 300... s (± 20 %) after 12 h: a bounded rate.
        assert_eq!(calls[0], 12 * 3600);
        assert!(
            (9..=13).contains(&calls.len()),
            "{} renewals: {calls:?}",
            calls.len()
        );
        for (n, pair) in calls.windows(2).enumerate() {
            let nominal = crate::sync::cache::sign_backoff_delay(n as u32 + 1, 0.0) as f64;
            let gap = (pair[1] - pair[0]) as f64;
            assert!(
                (nominal * 0.8 - 1.0..=nominal * 1.2 + 1.0).contains(&gap),
                "renewal {n}: {gap} s after the previous one (nominal {nominal})"
            );
        }
        let retry = w
            .state
            .agent_svid_renewal()
            .expect("status shows the back-off");
        assert_eq!(retry.failures as usize, calls.len());
        // The session itself stayed up: one sync, still connected, the first SVID in use.
        assert_eq!(w.node.script().calls.sync.len(), 1);
        assert!(w.state.sync_status().is_connected());
        assert_eq!(w.state.identity.read().await.serial_hex, w.first_serial);
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_server_is_replaced_by_the_next_one_at_once_with_the_same_svid_and_cache() {
        let w = start(24 * 3600, None, |s| {
            s.servers = vec!["server-a:8081".into(), "server-b:8081".into()];
            s.syncs = [
                SyncPlan::ServeThenBreak(
                    vec![snapshot(&["e1", "e2"])],
                    tonic::Status::unavailable("connection reset by peer"),
                ),
                SyncPlan::Serve(vec![snapshot(&["e1", "e2"])]),
            ]
            .into();
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        {
            let s = w.node.script();
            assert_eq!(s.calls.sync_servers, ["server-a:8081", "server-b:8081"]);
            // Moved within the quick delay, not after a back-off.
            let gap = s.calls.sync[1] - s.calls.sync[0];
            assert!(gap <= BACKOFF_START, "moved after {gap:?}");
            // No attestation; the SVIDs minted on A are kept: nothing signed again on B.
            assert!(s.calls.attest.is_empty());
            assert_eq!(s.calls.sign.len(), 1, "signed once, on the first server");
        }
        assert_eq!(w.state.snapshot().svid_count(), 2);
        assert_eq!(w.state.identity.read().await.serial_hex, w.first_serial);
        assert_eq!(w.stored_serial().as_deref(), Some(w.first_serial.as_str()));
        let status = w.state.sync_status();
        assert!(status.is_connected());
        assert_eq!(status.server(), Some("server-b:8081"));
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn servers_all_down_are_tried_in_turn_and_each_round_backs_off() {
        let started = Instant::now();
        let w = start(24 * 3600, None, |s| {
            s.servers = vec!["a:1".into(), "b:1".into(), "c:1".into()];
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        {
            let s = w.node.script();
            let n = s.calls.sync.len();
            assert!(n >= 9, "{n} attempts");
            // Round robin.
            for (i, server) in s.calls.sync_servers.iter().enumerate() {
                assert_eq!(server, ["a:1", "b:1", "c:1"][i % 3], "attempt {i}");
            }
            // Within a round the next server is tried at once; between rounds the delay grows.
            let gaps: Vec<Duration> = s.calls.sync.windows(2).map(|p| p[1] - p[0]).collect();
            for (i, gap) in gaps.iter().enumerate() {
                if i % 3 == 2 {
                    let round = (i / 3) as u32;
                    let cap = (BACKOFF_START * 2u32.saturating_pow(round)).min(BACKOFF_MAX);
                    assert!(*gap >= cap / 2, "round {round}: {gap:?}");
                } else {
                    assert!(*gap <= BACKOFF_START, "attempt {i}: {gap:?}");
                }
            }
            assert!(s.calls.sync[0] - started < Duration::from_millis(1));
        }
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_server_is_retried_with_growing_capped_back_off() {
        let started = Instant::now();
        let w = start(24 * 3600, None, |_| {});
        tokio::time::sleep(Duration::from_secs(300)).await;
        let calls: Vec<Instant> = w.node.script().calls.sync.clone();
        let gaps: Vec<Duration> = calls.windows(2).map(|p| p[1] - p[0]).collect();
        // Each delay in [cap/2, cap], the cap doubling from 250 ms to 30 s.
        for (i, gap) in gaps.iter().enumerate() {
            let cap = (BACKOFF_START * 2u32.saturating_pow(i as u32)).min(BACKOFF_MAX);
            assert!(
                *gap >= cap / 2 && *gap <= cap + Duration::from_millis(1),
                "attempt {i}: {gap:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        // About 8 attempts to reach the 30 s cap, then one per 15-30 s: bounded.
        assert!((12..=30).contains(&calls.len()), "{} attempts", calls.len());
        assert!(calls[0] - started < Duration::from_millis(1));
        let status = w.state.sync_status();
        assert_eq!(status.state_name(), "disconnected");
        assert!(status.last_error().unwrap().contains("server down"));
        assert_eq!(w.state.metrics.sync_failures.get() as usize, calls.len());
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_agent_attests_again_and_resumes() {
        let started = Instant::now();
        let evicted = sigil::proto::AgentRefusal::Evicted.status("agent not found");
        let method = NodeAttestation::X509Pop(crate::config::X509PopConfig {
            cert: "/unused/in/this/test.pem".into(),
            key: "/unused/in/this/test.key".into(),
        });
        let w = start(3600, Some(method), |s| {
            s.syncs = [
                SyncPlan::Refuse(evicted),
                SyncPlan::Serve(vec![snapshot(&["a"])]),
            ]
            .into();
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        {
            let s = w.node.script();
            assert_eq!(s.calls.attest.len(), 1, "attested again once");
            let delay = s.calls.attest[0] - started;
            assert!(
                delay <= BACKOFF_START,
                "after the first back-off: {delay:?}"
            );
            assert_eq!(s.calls.sync.len(), 2, "then synced with the new SVID");
            assert_eq!(s.calls.sign.len(), 1);
        }
        let serial = w.state.identity.read().await.serial_hex.clone();
        assert_ne!(serial, w.first_serial);
        assert_eq!(w.stored_serial().as_deref(), Some(serial.as_str()));
        assert!(w.state.refused.read().await.is_none());
        assert_eq!(w.state.snapshot().svid_count(), 1);
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_attestation_gives_up_and_serves_the_cache() {
        let method = NodeAttestation::X509Pop(crate::config::X509PopConfig {
            cert: "/unused.pem".into(),
            key: "/unused.key".into(),
        });
        let w = start(3600, Some(method), |s| {
            s.syncs = [SyncPlan::Serve(vec![snapshot(&["a"])])].into();
            s.attest = Err(tonic::Status::permission_denied("node certificate revoked"));
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(w.state.snapshot().svid_count(), 1);
        // The server now refuses the agent: at the renewal, then on reconnecting.
        {
            let mut s = w.node.script();
            s.renew = Err(sigil::proto::AgentRefusal::Banned.status("banned"));
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let refused = w.state.refused.read().await.clone().expect("gave up");
        assert!(refused.contains("node certificate revoked"), "{refused}");
        {
            let s = w.node.script();
            assert_eq!(s.calls.renew.len(), 1);
            assert_eq!(s.calls.attest.len(), 1, "no retry after a refusal");
            assert_eq!(s.calls.sync.len(), 1, "no reconnect after giving up");
        }
        assert_eq!(w.stored_serial(), None, "the refused SVID is removed");
        // The cache is still served.
        assert_eq!(w.state.snapshot().svid_count(), 1);
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_join_token_agent_gives_up_at_once() {
        let evicted = sigil::proto::AgentRefusal::Evicted.status("agent not found");
        let w = start(3600, Some(NodeAttestation::JoinToken("t".into())), |s| {
            s.syncs = [SyncPlan::Refuse(evicted)].into()
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        let refused = w.state.refused.read().await.clone().expect("gave up");
        assert!(refused.contains("it was evicted"), "{refused}");
        {
            let s = w.node.script();
            assert_eq!(s.calls.sync.len(), 1, "no retry loop");
            assert!(s.calls.attest.is_empty(), "a join token is single-use");
        }
        assert_eq!(w.stored_serial(), None);
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_the_server_refuses_to_sign_is_asked_for_at_a_bounded_rate() {
        let started = Instant::now();
        let w = start(24 * 3600, None, |s| {
            s.syncs = [SyncPlan::Serve(vec![snapshot(&["bad", "good"])])].into();
            s.refuse_sign = Box::new(|id| id == "bad");
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        let snap = w.state.snapshot();
        assert!(snap.svid("good").is_some() && snap.svid("bad").is_none());
        let failure = snap.sign_failure("bad").expect("backing off");
        // 8+16+32+64+128+256 s (± 20 %): at most 7 attempts in 10 min; "good" renews at
        // half its hour, so no other call.
        assert!((5..=7).contains(&failure.failures), "{failure:?}");
        let calls = secs_since(started, &w.node.script().calls.sign);
        assert_eq!(calls.len() as u32, failure.failures, "{calls:?}");
        assert_eq!(w.state.metrics.svid_sign_backoff_entries.get(), 1);
        w.stop().await;
    }

    /// Polls (in paused time) until `done` holds for the fake's calls, at most `rounds` times.
    async fn until(node: &FakeNode, rounds: usize, done: impl Fn(&Calls) -> bool) {
        for _ in 0..rounds {
            if done(&node.script().calls) {
                return;
            }
            // Key generation runs on the blocking pool in real time: let it go on.
            tokio::task::spawn_blocking(std::thread::yield_now)
                .await
                .unwrap();
        }
        panic!("the fake never saw the expected calls");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_pipelined_with_a_bounded_number_in_flight() {
        // Three batches: 500, 500 and 1 entries.
        let ids: Vec<String> = (0..2 * SIGN_BATCH + 1)
            .map(|i| format!("e{i:05}"))
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let w = start(24 * 3600, None, |s| {
            s.syncs = [SyncPlan::Serve(vec![snapshot(&refs)])].into();
            s.sign_gate = Some(gate.clone());
            // The second call fails as a whole (the server could not answer it).
            s.fail_sign_call =
                Box::new(|call| (call == 1).then(|| tonic::Status::unavailable("answer lost")));
        });
        // The second batch is sent while the first is still being signed.
        until(&w.node, 200_000, |c| c.sign.len() >= 2).await;
        assert_eq!(
            w.node.script().calls.signing,
            2,
            "two calls in flight at once"
        );
        assert_eq!(w.state.snapshot().svid_count(), 0, "nothing answered yet");
        // Answer them all; the third batch follows.
        gate.add_permits(3);
        until(&w.node, 200_000, |_| {
            w.state.snapshot().svid_count() == SIGN_BATCH + 1
                && w.state.snapshot().sign_backoff().count() == SIGN_BATCH
        })
        .await;
        {
            let s = w.node.script();
            assert_eq!(s.calls.max_signing, SIGN_IN_FLIGHT, "never more in flight");
            // Batches in due order, each entry asked for once (a later call, blocked at the
            // gate, can only be the failed batch's retry).
            assert_eq!(s.calls.sign_ids[..3].concat(), ids);
            for retry in &s.calls.sign_ids[3..] {
                assert_eq!(retry[..], ids[SIGN_BATCH..2 * SIGN_BATCH]);
            }
        }
        // The failed call's entries back off; the others have their SVIDs.
        let snap = w.state.snapshot();
        for (i, id) in ids.iter().enumerate() {
            let in_failed_batch = (SIGN_BATCH..2 * SIGN_BATCH).contains(&i);
            assert_eq!(snap.svid(id).is_some(), !in_failed_batch, "{id}");
            assert_eq!(snap.sign_failure(id).is_some(), in_failed_batch, "{id}");
        }
        assert_eq!(w.state.metrics.svids_minted.get(), (SIGN_BATCH + 1) as u64);
        w.stop().await;
    }
}
