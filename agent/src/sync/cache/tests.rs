use super::*;
use sigil::proto::admin as apb;
use std::collections::HashSet;

fn held_ids(cache: &Cache) -> HashSet<String> {
    cache.entries.keys().map(|k| k.to_string()).collect()
}

fn entry(id: &str, rev: i64) -> apb::Entry {
    apb::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/w/{id}"),
        parent_id: "spiffe://example.org/sigil/agent/join_token/t".into(),
        selectors: vec![apb::Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }],
        revision_number: rev,
        ..Default::default()
    }
}

fn snapshot(entries: Vec<apb::Entry>, rev: i64) -> pb::SyncResponse {
    pb::SyncResponse {
        upserted: entries,
        full: true,
        snapshot_complete: true,
        revision: rev,
        ..Default::default()
    }
}

#[test]
fn chunked_snapshot_replaces_only_when_complete() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("old", 1)], 1)).unwrap();
    let out = c
        .apply_sync(pb::SyncResponse {
            upserted: vec![entry("a", 2)],
            full: true,
            revision: 3,
            ..Default::default()
        })
        .unwrap();
    assert!(!out.complete);
    assert_eq!(
        held_ids(&c),
        ["old".to_string()].into(),
        "old state kept mid-snapshot"
    );
    let out = c
        .apply_sync(pb::SyncResponse {
            upserted: vec![entry("b", 3)],
            snapshot_complete: true,
            revision: 3,
            ..Default::default()
        })
        .unwrap();
    assert!(out.complete);
    assert_eq!(out.removed, 1);
    assert_eq!(held_ids(&c), ["a".to_string(), "b".to_string()].into());
    assert_eq!(c.revision(), 3);
}

#[test]
fn a_first_snapshot_is_applied_as_its_chunks_arrive_and_a_cut_off_one_is_replaced() {
    let mut c = Cache::new();
    let chunk = |ids: &[&str], full: bool, complete: bool| pb::SyncResponse {
        upserted: ids.iter().map(|id| entry(id, 1)).collect(),
        full,
        snapshot_complete: complete,
        revision: 1,
        ..Default::default()
    };
    let out = c.apply_sync(chunk(&["a", "b"], true, false)).unwrap();
    assert!(!out.complete && out.upserted == 2);
    let out = c.apply_sync(chunk(&["a2"], false, false)).unwrap();
    assert!(
        !out.complete && out.upserted == 3,
        "counted for the snapshot so far"
    );
    c.apply_sync(pb::SyncResponse {
        removed: vec!["a2".into()],
        ..chunk(&[], false, false)
    })
    .unwrap();
    assert_eq!(held_ids(&c), ["a".to_string(), "b".to_string()].into());
    assert!(c.snapshot_in_progress() && !c.has_snapshot());
    assert_eq!(c.resume_point(), (0, Vec::new()), "nothing to resume from");
    // The stream is cut off; the next one sends another set from its start.
    let out = c.apply_sync(chunk(&["b", "c"], true, false)).unwrap();
    assert!(!out.complete);
    assert_eq!(
        held_ids(&c),
        ["a".to_string(), "b".to_string()].into(),
        "held until the replacing snapshot completes"
    );
    let out = c.apply_sync(chunk(&["d"], false, true)).unwrap();
    assert!(
        out.complete && out.removed == 1 && out.upserted == 2,
        "b held unchanged"
    );
    assert_eq!(
        held_ids(&c),
        ["b".to_string(), "c".to_string(), "d".to_string()].into()
    );
    assert!(c.has_snapshot() && !c.snapshot_in_progress());
    // A delta after it is applied as one.
    let out = c.apply_sync(chunk(&["e"], false, false)).unwrap();
    assert!(out.complete && out.upserted == 1 && !c.snapshot_in_progress());
}

#[test]
fn deltas_need_a_snapshot_and_removal_drops_svids() {
    let mut c = Cache::new();
    let delta = pb::SyncResponse {
        upserted: vec![entry("a", 1)],
        revision: 1,
        ..Default::default()
    };
    assert_eq!(c.apply_sync(delta.clone()), Err(CacheError::NoSnapshot));
    c.apply_sync(snapshot(vec![], 0)).unwrap();
    c.apply_sync(delta).unwrap();
    assert_eq!(c.due(0), vec![EntryId::from("a")]);
    let pending = c.make_csrs(&c.due(0)).unwrap().pop().unwrap();
    assert!(c.store_svid(pending, vec![vec![1]], 3600, 0));
    assert!(c.due(0).is_empty());
    c.apply_sync(pb::SyncResponse {
        removed: vec!["a".into()],
        revision: 2,
        ..Default::default()
    })
    .unwrap();
    assert!(c.svid("a").is_none(), "SVID of a deleted entry is dropped");
    assert_eq!(c.revision(), 2);
}

#[test]
fn entry_change_or_refresh_time_makes_an_svid_due() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    let pending = c.make_csrs(&["a"]).unwrap().pop().unwrap();
    c.store_svid(pending, vec![vec![1]], 3600, 0);
    let s = c.svid("a").unwrap().clone();
    // Half-life minus up to 10 % jitter: between 1440 s and 1800 s for a 1 h SVID.
    assert!((1440..=1800).contains(&s.refresh_at), "{}", s.refresh_at);
    assert!(c.due(s.refresh_at - 1).is_empty());
    assert_eq!(c.due(s.refresh_at), vec![EntryId::from("a")]);
    assert_eq!(c.next_refresh(), Some(s.refresh_at));
    // An updated entry (new revision) needs a new SVID right away.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![entry("a", 5)],
        revision: 5,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.due(0), vec![EntryId::from("a")]);
}

#[test]
fn jitter_spreads_refresh_times() {
    assert_eq!(refresh_time(0, 3600, 0.0), 1800);
    assert_eq!(refresh_time(0, 3600, 0.1), 1440);
    assert_eq!(refresh_time(0, 3600, 5.0), 1440, "jitter is clamped");
    assert_eq!(
        refresh_time(100, 50, 0.0),
        100,
        "expired input never schedules in the past of issue"
    );
    let mut c = Cache::new();
    c.apply_sync(snapshot(
        (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
        1,
    ))
    .unwrap();
    for p in c.make_csrs(&c.due(0)).unwrap() {
        c.store_svid(p, vec![vec![1]], 3600, 0);
    }
    let distinct: HashSet<i64> = c.svids().map(|(_, s)| s).map(|s| s.refresh_at).collect();
    assert!(
        distinct.len() > 10,
        "50 SVIDs should not all refresh in the same second"
    );
}

/// Runs an agent's signing decisions for `secs` seconds from `start`, one look per second
/// (far more often than the worker wakes): each due entry is signed at once with an SVID
/// valid until `not_after(now)`. Returns how many signings happened.
fn signings_over(c: &mut Cache, start: i64, secs: i64, not_after: impl Fn(i64) -> i64) -> usize {
    let mut n = 0;
    for now in start..start + secs {
        for p in c.make_csrs(&c.due(now)).unwrap() {
            assert!(c.store_svid(p, vec![vec![1]], not_after(now), now));
            n += 1;
        }
    }
    n
}

#[test]
fn short_lifetimes_do_not_cause_signing_storms() {
    // A 2 s TTL (an entry stored before the TTL floor, or any server answer): renewed every
    // MIN_SHORT_REFRESH_INTERVAL, not every second.
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    let n = signings_over(&mut c, 1000, 100, |now| now + 2);
    assert_eq!(
        n as i64,
        100 / MIN_SHORT_REFRESH_INTERVAL,
        "{n} signings in 100 s"
    );
    let s = c.svid("a").unwrap();
    assert_eq!(s.refresh_at, s.issued_at + MIN_SHORT_REFRESH_INTERVAL);
    // 30 s left (an authority in its last sixth): renewed after 15 s, before it expires.
    assert_eq!(refresh_floor(1000, 1030), 15);
    assert_eq!(refresh_floor(1000, 1100), MIN_REFRESH_INTERVAL);

    // A lifetime capped by a CA that expires at 1100: every renewal returns the same
    // NotAfter, so the refresh time would be "now" forever without the floor.
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    let n = signings_over(&mut c, 1000, 200, |_| 1100);
    // Halving what is left down to the short floor, then the floor once expired.
    assert!(n <= 20, "{n} signings in 200 s");

    // An SVID that arrives already expired (skewed clocks) is not asked for again at once.
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    let n = signings_over(&mut c, 1000, 60, |now| now - 5);
    assert_eq!(n, 3, "{n} signings in 60 s");
}

#[test]
fn normal_refresh_is_not_delayed_by_the_floor() {
    // The shortest accepted TTL (60 s) refreshes at 24-30 s: above the floor.
    let mut c = Cache::new();
    c.apply_sync(snapshot(
        (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
        1,
    ))
    .unwrap();
    for p in c.make_csrs(&c.due(1000)).unwrap() {
        c.store_svid(p, vec![vec![1]], 1060, 1000);
    }
    for s in c.svids().map(|(_, s)| s) {
        assert!((1024..=1030).contains(&s.refresh_at), "{}", s.refresh_at);
    }
    assert!(
        c.svids().map(|(_, s)| s).any(|s| s.refresh_at < 1030),
        "jitter kept"
    );
}

#[test]
fn refused_signings_wait_before_asking_again_unless_the_entry_changes() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
        .unwrap();
    assert_eq!(c.next_refresh(), Some(0), "unsigned entries are due now");
    let b = c.make_csrs(&["b"]).unwrap().pop().unwrap();
    c.store_svid(b, vec![vec![1]], 4600, 1000);
    let note = c
        .note_sign_failure_with_jitter("a", 1, "InvalidArgument: bad DNS name", 1000, 0.0)
        .unwrap();
    assert_eq!(note.kind, SignFailureKind::First);
    assert_eq!(note.spiffe_id, "spiffe://example.org/w/a");
    assert_eq!(note.retry.retry_at, 1000 + SIGN_BACKOFF_START);
    assert!(c.due(1000).is_empty());
    assert!(c.due(1000 + SIGN_BACKOFF_START - 1).is_empty());
    // The worker wakes at the retry time: it is part of the next refresh.
    assert_eq!(c.next_refresh(), Some(1000 + SIGN_BACKOFF_START));
    assert_eq!(c.due(1000 + SIGN_BACKOFF_START), vec![EntryId::from("a")]);
    // A renewal refused: the held SVID is not asked for again before the retry time.
    c.note_sign_failure_with_jitter("b", 1, "Unavailable: CA", 2800, 0.0);
    assert!(!c.due(2800).contains(&EntryId::from("b")));
    assert!(c
        .due(2800 + SIGN_BACKOFF_START)
        .contains(&EntryId::from("b")));
    assert_eq!(
        c.svid("b").unwrap().not_after,
        4600,
        "the held SVID is kept"
    );
    // The entry changed (the operator fixed it): due at once, no longer backing off.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![entry("a", 2)],
        revision: 2,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.due(1001), vec![EntryId::from("a")]);
    assert_eq!(c.next_refresh(), Some(0));
    let backing_off: Vec<&str> = c.sign_backoff().map(|(e, _)| e.id.as_str()).collect();
    assert_eq!(backing_off, ["b"]);
    assert!(
        c.sign_failure("a").is_some(),
        "history kept until an outcome"
    );
    // A successful signing clears the failure; a removed entry takes it along.
    let a = c.make_csrs(&["a"]).unwrap().pop().unwrap();
    c.note_sign_failure("a", 2, "x", 1001);
    c.store_svid(a, vec![vec![1]], 4601, 1001);
    assert!(!c.sign_failures.contains_key("a"));
    c.apply_sync(pb::SyncResponse {
        removed: vec!["b".into()],
        revision: 3,
        ..Default::default()
    })
    .unwrap();
    assert!(c.sign_failures.is_empty());
    assert!(c.note_sign_failure("gone", 1, "x", 1001).is_none());
    assert!(
        c.sign_failures.is_empty(),
        "unknown entries are not recorded"
    );
}

#[test]
fn sign_backoff_grows_is_capped_and_jittered() {
    // Without jitter: 8, 16, 32 ... doubling up to the 5 min cap, and staying there.
    let delays: Vec<i64> = (1..=10).map(|n| sign_backoff_delay(n, 0.0)).collect();
    assert_eq!(delays, [8, 16, 32, 64, 128, 256, 300, 300, 300, 300]);
    assert_eq!(sign_backoff_delay(u32::MAX, 0.0), SIGN_BACKOFF_MAX);
    assert_eq!(sign_backoff_delay(0, 0.0), SIGN_BACKOFF_START);
    // Jitter stays within ±20 % (clamped beyond).
    assert_eq!(sign_backoff_delay(1, 0.2), 10);
    assert_eq!(sign_backoff_delay(1, -0.2), 6);
    assert_eq!(sign_backoff_delay(1, 5.0), 10);
    assert_eq!(sign_backoff_delay(1, -5.0), 6);
    assert_eq!(sign_backoff_delay(20, 0.2), 360);
    assert_eq!(sign_backoff_delay(20, -0.2), 240);
    // With random jitter, through the cache: each delay within the bounds, and spread.
    let mut c = Cache::new();
    c.apply_sync(snapshot(
        (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
        1,
    ))
    .unwrap();
    for n in 1..=12u32 {
        let nominal = (SIGN_BACKOFF_START << (n - 1).min(16)).min(SIGN_BACKOFF_MAX) as f64;
        let mut retry_ats = HashSet::new();
        for i in 0..50 {
            let note = c
                .note_sign_failure(&i.to_string(), 1, "refused", 10_000)
                .unwrap();
            assert_eq!(note.retry.failures, n);
            let delay = (note.retry.retry_at - 10_000) as f64;
            assert!(
                (nominal * 0.8 - 0.5..=nominal * 1.2 + 0.5).contains(&delay),
                "failure {n}: {delay} s"
            );
            retry_ats.insert(note.retry.retry_at);
        }
        assert!(retry_ats.len() > 1, "failure {n}: no jitter");
    }
}

#[test]
fn sign_backoff_resets_on_success_and_on_a_new_revision() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    let fail = |c: &mut Cache, rev, reason: &str, now| {
        c.note_sign_failure_with_jitter("a", rev, reason, now, 0.0)
            .unwrap()
    };
    let n1 = fail(&mut c, 1, "refused", 1000);
    let n2 = fail(&mut c, 1, "refused", n1.retry.retry_at);
    let n3 = fail(&mut c, 1, "other", n2.retry.retry_at);
    assert_eq!(
        [n1.kind, n2.kind, n3.kind],
        [
            SignFailureKind::First,
            SignFailureKind::Repeated,
            SignFailureKind::NewReason
        ]
    );
    assert_eq!(n3.retry.failures, 3);
    assert_eq!(n3.retry.since, 1000);
    assert_eq!(n3.retry.retry_at, n2.retry.retry_at + 32);
    assert_eq!(c.next_refresh(), Some(n3.retry.retry_at));
    // A new revision: due now, and its first failure starts over.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![entry("a", 2)],
        revision: 2,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.due(1100), vec![EntryId::from("a")]);
    assert_eq!(c.sign_backoff().count(), 0);
    let n4 = fail(&mut c, 2, "other", 1100);
    assert_eq!(n4.kind, SignFailureKind::First);
    assert_eq!((n4.retry.failures, n4.retry.since), (1, 1100));
    assert_eq!(n4.retry.retry_at, 1100 + SIGN_BACKOFF_START);
    assert_eq!(c.sign_backoff().count(), 1);
    // A late answer for the old revision does not make the new one wait longer.
    let stale = fail(&mut c, 1, "refused", 1101);
    assert_eq!(stale.kind, SignFailureKind::First);
    assert_eq!(
        c.due(1101),
        vec![EntryId::from("a")],
        "stale failure ignored"
    );
    // Success: the record goes, and the next failure is a first one again.
    let n5 = fail(&mut c, 2, "other", 1102);
    let p = c.make_csrs(&["a"]).unwrap().pop().unwrap();
    assert!(c.store_svid(p, vec![vec![1]], 4700, n5.retry.retry_at));
    assert!(c.sign_failure("a").is_none());
    assert_eq!(c.sign_backoff().count(), 0);
    let n6 = fail(&mut c, 2, "other", 5000);
    assert_eq!((n6.kind, n6.retry.failures), (SignFailureKind::First, 1));
}

#[test]
fn a_refused_entry_is_asked_for_a_bounded_number_of_times() {
    // Refused at every attempt, looked at every second for 10 min: 8+16+32+64+128+256 s
    // (± 20 %) → at most 7 attempts, while the other entry renews normally.
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("bad", 1), entry("good", 1)], 1))
        .unwrap();
    let (mut attempts, mut good) = (0, 0);
    for now in 1000..1600 {
        for p in c.make_csrs(&c.due(now)).unwrap() {
            if p.entry_id == "bad" {
                attempts += 1;
                c.note_sign_failure(&p.entry_id, p.entry_revision, "refused", now);
            } else {
                good += 1;
                assert!(c.store_svid(p, vec![vec![1]], now + 60, now));
            }
        }
        let next = c.next_refresh().unwrap();
        assert!(next > now, "nothing due right after a pass at {now}");
    }
    assert!((5..=7).contains(&attempts), "{attempts} attempts in 10 min");
    assert!(good >= 600 / 30, "{good} signings of the good entry");
}

#[test]
fn agent_svid_renewal_counts_from_receipt_with_a_floor() {
    // A 1 h SVID received at 1000: renewed at half of it.
    assert_eq!(agent_svid_renew_at(1000, 4600), 2800);
    // A 20 s SVID whose NotBefore is back-dated 30 s: counted from NotBefore its renewal
    // time (995) would be in the past at once; from receipt it is 1010.
    assert!(refresh_time(970, 1020, 0.0) < 1000);
    assert_eq!(agent_svid_renew_at(1000, 1020), 1010);
    // Capped or already expired: still not before the floor.
    assert_eq!(
        agent_svid_renew_at(1000, 1005),
        1000 + MIN_SHORT_REFRESH_INTERVAL
    );
    assert_eq!(agent_svid_renew_at(1000, 1016), 1008);
    assert_eq!(agent_svid_renew_at(1000, 900), 1000 + MIN_REFRESH_INTERVAL);
}

#[test]
fn expired_svids_and_the_next_expiry() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
        .unwrap();
    let mut ps = c.make_csrs(&["a", "b"]).unwrap();
    let b = ps.pop().unwrap();
    let a = ps.pop().unwrap();
    c.store_svid(a, vec![vec![1]], 1100, 1000);
    c.store_svid(b, vec![vec![2]], 1200, 1000);
    assert_eq!(c.next_expiry_after(1000), Some(1100));
    assert_eq!(c.next_expiry_after(1100), Some(1200));
    assert_eq!(c.next_expiry_after(1200), None);
    assert_eq!(c.expired_svids(1099).count(), 0);
    let expired: Vec<&str> = c.expired_svids(1100).map(|(e, _)| e.id.as_str()).collect();
    assert_eq!(expired, ["a"]);
    assert_eq!(c.expired_svids(1200).count(), 2);
}

#[test]
fn csr_carries_the_spiffe_id_and_a_fresh_key() {
    let (key1, csr1) = make_csr(Some("spiffe://example.org/w/a")).unwrap();
    let (key2, _) = make_csr(Some("spiffe://example.org/w/a")).unwrap();
    assert_ne!(key1, key2, "a new key per CSR");
    let params = rcgen::CertificateSigningRequestParams::from_der(&csr1.into()).unwrap();
    let sans = &params.params.subject_alt_names;
    assert!(matches!(&sans[0], rcgen::SanType::URI(u) if u.as_str() == "spiffe://example.org/w/a"));
}

#[test]
fn exe_hash_flag_follows_the_entries_needing_a_hash() {
    let sha = format!("sha256:{}", "a".repeat(64));
    let sel = |t: &str, v: &str| sigil::proto::admin::Selector {
        r#type: t.into(),
        value: v.into(),
    };
    let with = |id: &str, selectors: Vec<sigil::proto::admin::Selector>| apb::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{id}"),
        parent_id: "spiffe://example.org/agent".into(),
        selectors,
        revision_number: 1,
        ..Default::default()
    };
    let mut c = Cache::new();
    let flag = c.exe_hash_flag();
    let load = || flag.load(std::sync::atomic::Ordering::SeqCst);
    c.apply_sync(snapshot(vec![with("a", vec![sel("unix", "uid:1")])], 1))
        .unwrap();
    assert!(!load());
    // An incremental upsert with unix:sha256 sets it...
    c.apply_sync(pb::SyncResponse {
        upserted: vec![with("b", vec![sel("unix", "uid:1"), sel("unix", &sha)])],
        revision: 2,
        ..Default::default()
    })
    .unwrap();
    assert!(load());
    // ...a half-received snapshot does not change it...
    c.apply_sync(pb::SyncResponse {
        upserted: vec![with("a", vec![sel("unix", "uid:1")])],
        full: true,
        revision: 3,
        ..Default::default()
    })
    .unwrap();
    assert!(load());
    // ...and the completed snapshot without such an entry clears it.
    c.apply_sync(pb::SyncResponse {
        snapshot_complete: true,
        revision: 3,
        ..Default::default()
    })
    .unwrap();
    assert!(!load());
    // A sha256-like value of another type does not count.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![with("c", vec![sel("other", &sha)])],
        revision: 4,
        ..Default::default()
    })
    .unwrap();
    assert!(!load());
}

#[test]
fn invalid_entries_from_the_server_are_refused_whole() {
    let mut c = Cache::new();
    let mut bad = entry("x", 1);
    bad.spiffe_id = "not an id".into();
    let err = c
        .apply_sync(snapshot(vec![entry("ok", 1), bad], 1))
        .unwrap_err();
    assert!(matches!(err, CacheError::InvalidEntry { ref id, .. } if id == "x"));
    assert_eq!(c.entry_count(), 0, "nothing applied from a bad message");
}

fn federated_msg(bundles: &[(&str, u8)]) -> pb::SyncResponse {
    pb::SyncResponse {
        federated_bundles: bundles
            .iter()
            .map(|(td, root)| pb::Bundle {
                trust_domain: (*td).into(),
                x509_roots: vec![*root],
                sequence_number: 1,
                ..Default::default()
            })
            .collect(),
        federated_bundles_set: true,
        ..Default::default()
    }
}

fn federated_tds(c: &Cache) -> Vec<&str> {
    c.federated_bundles().keys().map(String::as_str).collect()
}

#[test]
fn federated_set_is_replaced_whole_and_changes_reported() {
    let mut c = Cache::new();
    // On a snapshot.
    let mut m = snapshot(vec![entry("a", 1)], 1);
    m.federated_bundles = federated_msg(&[("other.org", 1)]).federated_bundles;
    m.federated_bundles_set = true;
    let out = c.apply_sync(m).unwrap();
    assert!(out.federated_changed && !out.bundle_changed);
    assert_eq!(federated_tds(&c), ["other.org"]);
    assert_eq!(c.federated_bundles()["other.org"].x509_roots, vec![1]);

    // A message without the flag leaves the set alone, even with an empty list.
    let out = c
        .apply_sync(pb::SyncResponse {
            revision: 2,
            ..Default::default()
        })
        .unwrap();
    assert!(!out.federated_changed);
    assert_eq!(federated_tds(&c), ["other.org"]);

    // The same set again: no change reported.
    let out = c.apply_sync(federated_msg(&[("other.org", 1)])).unwrap();
    assert!(!out.federated_changed);

    // Replaced whole: one added, one content change.
    let out = c
        .apply_sync(federated_msg(&[("third.org", 3), ("other.org", 2)]))
        .unwrap();
    assert!(out.federated_changed);
    assert_eq!(federated_tds(&c), ["other.org", "third.org"]);
    assert_eq!(c.federated_bundles()["other.org"].x509_roots, vec![2]);

    // Removed by omission; an empty set clears everything.
    c.apply_sync(federated_msg(&[("third.org", 3)])).unwrap();
    assert_eq!(federated_tds(&c), ["third.org"]);
    assert!(c.apply_sync(federated_msg(&[])).unwrap().federated_changed);
    assert!(c.federated_bundles().is_empty());
    assert_eq!(c.entry_count(), 1, "entries untouched");
}

#[test]
fn invalid_federated_bundles_are_refused_whole() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![], 1)).unwrap();
    c.apply_sync(federated_msg(&[("other.org", 1)])).unwrap();
    let mut bad = federated_msg(&[("third.org", 3), ("NOT A DOMAIN", 4)]);
    bad.upserted = vec![entry("a", 2)];
    let err = c.apply_sync(bad).unwrap_err();
    assert!(
        matches!(err, CacheError::InvalidFederatedBundle { ref trust_domain, .. } if trust_domain == "NOT A DOMAIN")
    );
    assert_eq!(federated_tds(&c), ["other.org"], "nothing applied");
    assert_eq!(c.entry_count(), 0, "nothing applied");
    // A trust domain sent as its ID is held under its bare name.
    c.apply_sync(federated_msg(&[("spiffe://other.org", 9)]))
        .unwrap();
    assert_eq!(federated_tds(&c), ["other.org"]);
}

#[test]
fn bundle_changes_are_reported_once() {
    let mut c = Cache::new();
    let b = pb::Bundle {
        trust_domain: "example.org".into(),
        sequence_number: 2,
        ..Default::default()
    };
    let mut m = snapshot(vec![], 1);
    m.bundle = Some(b.clone());
    assert!(c.apply_sync(m).unwrap().bundle_changed);
    assert_eq!(c.bundle_sequence(), 2);
    let out = c
        .apply_sync(pb::SyncResponse {
            bundle: Some(b),
            revision: 1,
            ..Default::default()
        })
        .unwrap();
    assert!(!out.bundle_changed);
}

#[test]
fn the_selector_index_finds_exactly_what_a_scan_finds_across_changes() {
    let sel = |s: &str| {
        let (t, v) = s.split_once(':').unwrap();
        apb::Selector {
            r#type: t.into(),
            value: v.into(),
        }
    };
    let with = |id: &str, rev: i64, sels: &[&str]| apb::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/w/{id}"),
        parent_id: "spiffe://example.org/agent".into(),
        selectors: sels.iter().map(|s| sel(s)).collect(),
        revision_number: rev,
        ..Default::default()
    };
    // Namespaces shared by many entries, service accounts by few.
    let mut entries: Vec<apb::Entry> = (0..60)
        .map(|i| {
            with(
                &format!("e{i}"),
                1,
                &[
                    &format!("k8s:ns:ns-{}", i % 3),
                    &format!("k8s:sa:sa-{}", i % 20),
                ],
            )
        })
        .collect();
    entries.push(with("ns-only", 1, &["k8s:ns:ns-1"]));
    let mut c = Cache::new();
    c.apply_sync(snapshot(entries, 1)).unwrap();
    let callers: Vec<sigil::selector::SelectorSet> = (0..20)
        .map(|j| {
            [format!("k8s:ns:ns-{}", j % 3), format!("k8s:sa:sa-{j}")]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect()
        })
        .chain(std::iter::once(
            ["k8s:ns:ns-1".parse().unwrap()].into_iter().collect(),
        ))
        .collect();
    let check = |c: &Cache| {
        for caller in &callers {
            let mut by_index: Vec<&str> =
                c.matching(caller).iter().map(|e| e.id.as_str()).collect();
            let mut by_scan: Vec<&str> = c
                .entries()
                .filter(|e| !e.selectors.is_empty() && e.selectors.is_subset_of(caller))
                .map(|e| e.id.as_str())
                .collect();
            by_index.sort();
            by_scan.sort();
            assert_eq!(by_index, by_scan, "caller {caller}");
        }
    };
    check(&c);
    assert_eq!(c.matching(&callers[1]).len(), 2, "e1 and ns-only");
    // An entry moves to other selectors, one gets another one, one goes.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![
            with("e1", 2, &["k8s:ns:ns-2", "k8s:sa:sa-5"]),
            with("e2", 2, &["k8s:ns:ns-2", "k8s:sa:sa-2", "unix:uid:7"]),
        ],
        removed: vec!["e3".into()],
        revision: 2,
        ..Default::default()
    })
    .unwrap();
    check(&c);
    // A full snapshot with fewer entries.
    c.apply_sync(snapshot(
        vec![with("e5", 3, &["k8s:ns:ns-2", "k8s:sa:sa-5"])],
        3,
    ))
    .unwrap();
    check(&c);
    let indexed: usize = c
        .view
        .by_selector
        .values()
        .map(|ids| ids.iter().count())
        .sum();
    assert!(indexed == 1 && c.selector_counts.len() == 2);
    // The entry's selectors are the cache's shared copies.
    let e5 = c.entry("e5").unwrap();
    for s in &e5.selectors {
        let (shared, _) = c.selector_counts.get_key_value(s).unwrap();
        assert!(std::ptr::eq(shared.as_str(), s.as_str()));
    }
}

#[test]
fn svids_of_a_tainted_authority_are_due_at_once() {
    // Two roots; the leaf of entry "a" is issued by the first, of "b" by the second.
    let root = |cn: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        let ski = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(hex::encode(k.0))
                }
                _ => None,
            })
            .unwrap();
        (rcgen::Issuer::new(p, key), ski)
    };
    let leaf = |issuer: &rcgen::Issuer<'_, rcgen::KeyPair>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.use_authority_key_identifier_extension = true;
        p.signed_by(&key, issuer).unwrap().der().to_vec()
    };
    let (old, old_ski) = root("old");
    let (new, _) = root("new");
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
        .unwrap();
    let now = 1000;
    let mut pending = c.make_csrs(&c.due(now)).unwrap();
    pending.sort_by(|x, y| x.entry_id.cmp(&y.entry_id));
    let mut it = pending.into_iter();
    assert!(c.store_svid(it.next().unwrap(), vec![leaf(&old)], now + 3600, now));
    assert!(c.store_svid(it.next().unwrap(), vec![leaf(&new)], now + 3600, now));
    assert!(c.due(now + 1).is_empty());
    assert_eq!(
        authority_key_id(&c.svid("a").unwrap().leaf_der()),
        Some(old_ski.clone())
    );

    let mut m = pb::SyncResponse {
        revision: 1,
        ..Default::default()
    };
    m.bundle = Some(pb::Bundle {
        trust_domain: "example.org".into(),
        sequence_number: 2,
        tainted_x509_authorities: vec![old_ski],
        ..Default::default()
    });
    let out = c.apply_sync(m).unwrap();
    assert_eq!(out.tainted_svids, 1);
    assert_eq!(c.due(now + 1), [EntryId::from("a")]);
    assert!(c.issued_by_tainted(&c.svid("a").unwrap().leaf_der()));
    assert!(!c.issued_by_tainted(&c.svid("b").unwrap().leaf_der()));
}

#[test]
fn resume_point_follows_complete_rounds_and_resumed_streams_apply_as_changes() {
    let mut c = Cache::new();
    // Nothing held, or a server that sends no roots: nothing to resume from.
    assert_eq!(c.resume_point(), (0, Vec::new()));
    let resumed = pb::SyncResponse {
        resumed: true,
        revision: 1,
        roots: vec![1],
        ..Default::default()
    };
    assert_eq!(c.apply_sync(resumed), Err(CacheError::NoSnapshot));
    c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
    assert_eq!(c.resume_point(), (0, Vec::new()));
    c.apply_sync(pb::SyncResponse {
        roots: vec![7; 32],
        ..snapshot(vec![entry("a", 1), entry("b", 2)], 2)
    })
    .unwrap();
    assert_eq!(c.resume_point(), (2, vec![7; 32]));

    // A round cut off after its first message: the set is at no revision.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![entry("c", 3)],
        revision: 4,
        more_follows: true,
        roots: vec![7; 32],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.resume_point(), (0, Vec::new()));
    // A snapshot cut off does not spoil the set held; a resumed stream drops the partial one.
    c.apply_sync(pb::SyncResponse {
        upserted: vec![entry("x", 5)],
        full: true,
        revision: 5,
        more_follows: true,
        ..Default::default()
    })
    .unwrap();
    let out = c
        .apply_sync(pb::SyncResponse {
            upserted: vec![entry("d", 5)],
            removed: vec!["a".into()],
            resumed: true,
            revision: 5,
            roots: vec![8; 32],
            ..Default::default()
        })
        .unwrap();
    assert!(out.resumed && out.complete);
    assert_eq!((out.upserted, out.removed), (1, 1));
    assert_eq!(
        held_ids(&c),
        HashSet::from(["b".to_string(), "c".to_string(), "d".to_string()])
    );
    assert_eq!(c.resume_point(), (5, vec![8; 32]));
    // The cut-off snapshot is not completed by a later chunk.
    c.apply_sync(pb::SyncResponse {
        snapshot_complete: true,
        revision: 6,
        roots: vec![8; 32],
        ..Default::default()
    })
    .unwrap();
    assert!(!held_ids(&c).contains("x"));
}

#[test]
fn entries_share_their_parent_id_and_trust_domain_name() {
    let mut c = Cache::new();
    c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
        .unwrap();
    let (a, b) = (c.entry("a").unwrap(), c.entry("b").unwrap());
    assert_eq!(a.parent_id, b.parent_id);
    assert!(std::ptr::eq(a.parent_id.path(), b.parent_id.path()));
    let names = |e: &RegistrationEntry| e.spiffe_id.trust_domain().name().as_ptr();
    assert_eq!(names(a), names(b));
    assert_eq!(names(a), a.parent_id.trust_domain().name().as_ptr());
}

/// A server-signed-like SVID for `key` under one CA: (leaf DER, CA DER).
fn leaf_for(key: &rcgen::KeyPair, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, id: &str) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::new(vec![format!("{id}.example.org")]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        format!("spiffe://example.org/w/{id}").try_into().unwrap(),
    ));
    p.use_authority_key_identifier_extension = true;
    p.signed_by(key, issuer).unwrap().der().to_vec()
}

#[test]
fn svids_are_held_compactly_and_served_as_received() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_der = ca.self_signed(&ca_key).unwrap().der().to_vec();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let ids = ["a", "b", "c"];
    let mut c = Cache::new();
    c.apply_sync(snapshot(ids.iter().map(|id| entry(id, 1)).collect(), 1))
        .unwrap();
    let mut sent = Vec::new();
    for p in c.make_csrs(&ids).unwrap() {
        let key = rcgen::KeyPair::try_from(p.key_pkcs8_der.as_slice()).unwrap();
        let leaf = leaf_for(&key, &issuer, &p.entry_id);
        sent.push((p.entry_id.clone(), p.key_pkcs8_der.clone(), leaf.clone()));
        // An intermediate after the leaf, as an upstream authority sends.
        assert!(c.store_svid(p, vec![leaf, ca_der.clone()], 2000, 1000));
    }
    for (id, key, leaf) in &sent {
        let s = c.svid(id).unwrap();
        assert_eq!(&*s.leaf_der(), leaf.as_slice());
        assert_eq!(*s.chain_der(), [leaf.as_slice(), &ca_der].concat());
        assert_eq!(s.certs_der(), vec![leaf.clone(), ca_der.clone()]);
        assert_eq!(&s.key_pkcs8_der(), key);
        assert!(matches!(s.key, HeldKey::P256 { .. }), "{:?}", s.key);
    }
    // The first chain is the dictionary; the others compress against it.
    let packed = c.svid("c").unwrap();
    let HeldChain::Packed { bytes, len, .. } = &packed.chain else {
        panic!("held as received: {:?}", packed.chain);
    };
    assert!(bytes.len() * 2 < *len as usize, "{:?}", packed.chain);
}
