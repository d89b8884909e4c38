use super::*;
use crate::sync::cache::Cache;
use crate::sync::worker::testing::TestState;

#[test]
fn claims_become_a_protobuf_struct() {
    let claims: serde_json::Value = serde_json::json!({
        "sub": "spiffe://example.org/a", "aud": ["x", "y"], "exp": 1700000000, "nested": {"ok": true}, "none": null
    });
    let serde_json::Value::Object(map) = claims else {
        panic!("object")
    };
    let s = json_object_to_struct(map);
    use prost_types::value::Kind;
    assert_eq!(
        s.fields["sub"].kind,
        Some(Kind::StringValue("spiffe://example.org/a".into()))
    );
    assert_eq!(
        s.fields["exp"].kind,
        Some(Kind::NumberValue(1_700_000_000.0))
    );
    let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
        panic!("aud list")
    };
    assert_eq!(l.values.len(), 2);
    let Some(Kind::StructValue(n)) = &s.fields["nested"].kind else {
        panic!("nested")
    };
    assert_eq!(n.fields["ok"].kind, Some(Kind::BoolValue(true)));
    assert_eq!(s.fields["none"].kind, Some(Kind::NullValue(0)));
}

/// Agent state over `cache` (the agent's own SVID is a throwaway).
fn state_with(cache: Cache) -> TestState {
    TestState::new(cache)
}

/// A caller with `selectors`, pinned to this test process (alive throughout).
fn caller(selectors: &[&str]) -> Caller {
    let pid = std::process::id() as i32;
    Caller {
        pid,
        selectors: Arc::new(identities::tests::selectors(selectors)),
        pin: Arc::new(ProcessPin::pin(pid).unwrap()),
        uid: 0,
        gid: 0,
        exe_hash_skipped: false,
    }
}

/// The X.509 SVID stream [`WorkloadApi::fetch_x509svid`] opens for `caller`.
async fn x509_stream(
    state: &Arc<AgentState>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    caller: Caller,
) -> Result<WatchStream<wl::X509svidResponse>, Status> {
    x509_stream_with(state, shutdown, caller, Arc::new(WorkloadAttestor::new())).await
}

/// [`x509_stream`] with the given attestor.
async fn x509_stream_with(
    state: &Arc<AgentState>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    caller: Caller,
    attestor: Arc<WorkloadAttestor>,
) -> Result<WatchStream<wl::X509svidResponse>, Status> {
    let roots = state.identity.read().await.chain_der.clone();
    let api = WorkloadApi::new(
        state.clone(),
        attestor,
        // Never dialled: these tests make no JWT calls.
        NodeLink::new(
            Arc::new(crate::sync::servers::Servers::new(vec![
                "127.0.0.1:1".into()
            ])),
            state.trust_domain.clone(),
            Arc::new(sigil::tls::IdentityStore::empty()),
            Arc::new(sigil::tls::TrustStore::new(&roots).unwrap()),
        ),
        shutdown,
    );
    api.watch(caller, "x509_svid", x509_svid_watch).await
}

fn ids(m: &wl::X509svidResponse) -> Vec<String> {
    m.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

#[tokio::test(start_paused = true)]
async fn stream_sends_changes_only_and_ends_when_the_identity_goes() {
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
        .await
        .unwrap();
    assert_eq!(state.metrics.workload_streams.get(), 1);
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(ids(&first), ["spiffe://example.org/w/a"]);

    // A change that leaves this caller's message as it was: nothing is sent.
    state.notify_changed();
    let quiet = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
    assert!(quiet.is_err(), "an unchanged state was re-sent: {quiet:?}");

    // A second matching entry: the next message carries both.
    *state.cache.write().await = cache_with(
        vec![
            entry("a", 1, &["unix:uid:7"], ""),
            entry("b", 2, &["unix:uid:7"], ""),
        ],
        &["a", "b"],
    );
    state.notify_changed();
    let both = s.next().await.unwrap().unwrap();
    assert_eq!(
        ids(&both),
        ["spiffe://example.org/w/a", "spiffe://example.org/w/b"]
    );

    // Every entry gone: PermissionDenied "no identity issued", then the stream ends.
    *state.cache.write().await = cache_with(vec![entry("c", 3, &["unix:uid:8"], "")], &["c"]);
    state.notify_changed();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), NO_IDENTITY);
    assert!(s.next().await.is_none());
    drop(s);
    assert_eq!(state.metrics.workload_streams.get(), 0, "gauge back to 0");
}

#[tokio::test(start_paused = true)]
async fn a_change_wakes_only_the_streams_whose_callers_it_concerns() {
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    let state = state_with(cache_with(
        vec![
            entry("a", 1, &["unix:uid:7"], ""),
            entry("b", 2, &["unix:uid:8"], ""),
        ],
        &["a", "b"],
    ));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut s7 = x509_stream(&state, shutdown.clone(), caller(&["unix:uid:7"]))
        .await
        .unwrap();
    let mut s8 = x509_stream(&state, shutdown, caller(&["unix:uid:8"]))
        .await
        .unwrap();
    let first7 = s7.next().await.unwrap().unwrap();
    assert_eq!(ids(&first7), ["spiffe://example.org/w/a"]);
    s8.next().await.unwrap().unwrap();
    assert_eq!(state.watchers.len(), 2);

    // `b` rotates: only uid 8's stream is woken, and it gets the new SVID.
    {
        let mut cache = state.cache.write().await;
        let now = now_unix();
        let p = cache.make_csrs(&["b".to_string()]).unwrap().pop().unwrap();
        assert!(cache.store_svid(p, vec![b"b-2".to_vec()], now + 3600, now));
    }
    assert_eq!(state.publish(), 1, "one stream woken");
    let m = s8.next().await.unwrap().unwrap();
    assert_eq!(m.svids[0].x509_svid, b"b-2".to_vec());
    let quiet = tokio::time::timeout(Duration::from_secs(60), s7.next()).await;
    assert!(quiet.is_err(), "uid 7's stream sent {quiet:?}");

    // A new bundle concerns both.
    {
        let mut cache = state.cache.write().await;
        cache
            .apply_sync(sigil::proto::node::SyncResponse {
                bundle: Some(sigil::proto::node::Bundle {
                    trust_domain: "example.org".into(),
                    x509_roots: vec![0xBB],
                    sequence_number: 2,
                    ..Default::default()
                }),
                revision: 1,
                ..Default::default()
            })
            .unwrap();
    }
    assert_eq!(state.publish(), 2);
    assert_eq!(
        s7.next().await.unwrap().unwrap().svids[0].bundle,
        vec![0xBB]
    );
    assert_eq!(
        s8.next().await.unwrap().unwrap().svids[0].bundle,
        vec![0xBB]
    );
    drop((s7, s8));
    assert!(
        state.watchers.is_empty(),
        "streams unregister when they end"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_attested_without_the_exe_hash_gets_entries_that_need_it() {
    use crate::workload_attestor::tests::{sha256_hex, FakeProc, EXE_BYTES};
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
    let fake = FakeProc::new();
    // Wired as the agent does: the attestor reads the cache's flag.
    let flag = state.cache.read().await.exe_hash_flag();
    let attestor = Arc::new(fake.attestor().with_exe_hash_flag(flag));
    let pin = Arc::new(fake.pin());
    let a = attestor.attest_async(pin.clone(), 7, 7).await.unwrap();
    assert!(a.exe_hash_skipped, "no entry needs the hash yet");
    let caller = Caller {
        pid: a.pid,
        selectors: Arc::new(a.selectors),
        pin,
        uid: 7,
        gid: 7,
        exe_hash_skipped: true,
    };
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut s = x509_stream_with(&state, shutdown, caller, attestor)
        .await
        .unwrap();
    assert_eq!(
        ids(&s.next().await.unwrap().unwrap()),
        ["spiffe://example.org/w/a"]
    );

    // An entry on the executable's hash arrives (and its SVID): the open stream gets it.
    let sha = format!("unix:sha256:{}", sha256_hex(EXE_BYTES));
    {
        let mut cache = state.cache.write().await;
        cache
            .apply_sync(sigil::proto::node::SyncResponse {
                upserted: vec![entry("b", 2, &["unix:uid:7", &sha], "")],
                revision: 2,
                ..Default::default()
            })
            .unwrap();
        // Valid for an hour from now: an expired SVID is never served.
        let now = now_unix();
        for p in cache.make_csrs(&["b".to_string()]).unwrap() {
            assert!(cache.store_svid(p, vec![b"b".to_vec()], now + 3600, now));
        }
    }
    state.publish();
    let both = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("the stream sent the new entry")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&both),
        ["spiffe://example.org/w/a", "spiffe://example.org/w/b"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_whose_svid_never_arrives_gets_unavailable_after_the_wait() {
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    // The entry matches, but no SVID is minted for it.
    let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &[]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(started.elapsed(), FIRST_SVID_WAIT);
    assert!(s.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn streams_end_quietly_at_shutdown_and_unknown_callers_are_refused() {
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let refused = x509_stream(&state, shutdown.clone(), caller(&["unix:uid:9"])).await;
    let err = refused.err().expect("no identity for uid 9");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(state.metrics.workload_streams.get(), 0);

    let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    stop.send(true).unwrap();
    assert!(s.next().await.is_none(), "ended without an error status");
}

#[tokio::test]
async fn svids_that_expire_unrenewed_end_the_stream_with_unavailable() {
    use identities::tests::{entry, now_unix};
    use tokio_stream::StreamExt as _;
    // An SVID that expires in 2 s and is never renewed (real time: expiry is wall-clock).
    let mut cache = Cache::new();
    cache
        .apply_sync(sigil::proto::node::SyncResponse {
            upserted: vec![entry("a", 1, &["unix:uid:7"], "")],
            full: true,
            snapshot_complete: true,
            revision: 1,
            ..Default::default()
        })
        .unwrap();
    let now = now_unix();
    let p = cache.make_csrs(&["a"]).unwrap().pop().unwrap();
    cache.store_svid(p, vec![b"a".to_vec()], now + 2, now);
    let state = state_with(cache);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let waker = tokio::spawn(super::super::expiry::wake_streams_at_expiry(
        state.clone(),
        shutdown.clone(),
    ));
    let mut s = x509_stream(&state, shutdown.clone(), caller(&["unix:uid:7"]))
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok(), "valid at first");
    let end = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("the stream noticed the expiry")
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert_eq!(end.message(), EXPIRED);
    assert!(s.next().await.is_none());
    // A new call gets Unavailable at once, not an expired SVID.
    let err = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
        .await
        .err()
        .expect("no expired SVID served");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    waker.abort();
}

#[tokio::test(start_paused = true)]
async fn every_message_waits_for_the_connecting_process_to_be_there() {
    use identities::tests::{cache_with, entry};
    use tokio_stream::StreamExt as _;
    // The caller: a child process, pinned with the ids it runs as.
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let mut pin = ProcessPin::pin(pid).unwrap();
    pin.creds = Some(me);
    let caller = Caller {
        pid,
        selectors: Arc::new(identities::tests::selectors(&["unix:uid:7"])),
        pin: Arc::new(pin),
        uid: me.0,
        gid: me.1,
        exe_hash_skipped: false,
    };
    let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut s = x509_stream(&state, shutdown, caller).await.unwrap();
    assert!(s.next().await.unwrap().is_ok());

    // It exits; its stream (held by another process now, say) gets the next change.
    child.kill().unwrap();
    child.wait().unwrap();
    *state.cache.write().await = cache_with(
        vec![
            entry("a", 1, &["unix:uid:7"], ""),
            entry("b", 2, &["unix:uid:7"], ""),
        ],
        &["a", "b"],
    );
    state.notify_changed();
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(&format!("pid {pid}")), "{err:?}");
    assert!(s.next().await.is_none());
}

#[test]
fn header_must_be_exactly_true() {
    let mut r = Request::new(());
    assert_eq!(
        check_header(&r).map_err(|s| s.code()),
        Err(tonic::Code::InvalidArgument)
    );
    r.metadata_mut()
        .insert(SECURITY_HEADER, "false".parse().expect("ascii"));
    assert_eq!(
        check_header(&r).map_err(|s| s.code()),
        Err(tonic::Code::InvalidArgument)
    );
    r.metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().expect("ascii"));
    assert!(check_header(&r).is_ok());
}
