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
