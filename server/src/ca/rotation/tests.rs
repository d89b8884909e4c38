//! The rotation schedule on paused tokio time: prepare at ½, activate at ⅚, the old authority
//! removed after its NotAfter, each change published once.

use std::sync::Mutex;

use sigil::clock::now_unix;
use sigil::TrustDomain;

use super::*;
use crate::ca::authority::{activate_at, prepare_at};
use crate::ca::{CaConfig, Kind, Slot, BACKDATE};

/// What the task published, at which (clock) time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Bundle {
        at: i64,
        roots: usize,
        jwt_keys: usize,
    },
    Activated {
        at: i64,
        id: String,
    },
}

struct Recorder {
    clock: Clock,
    events: Mutex<Vec<Event>>,
}

#[async_trait]
impl Publish for Recorder {
    async fn bundle(&self, signer: Arc<Signer>) -> Result<(), PublishError> {
        let b = signer.bundle();
        self.events.lock().unwrap().push(Event::Bundle {
            at: self.clock.now_unix(),
            roots: b.x509_authorities.len(),
            jwt_keys: b.jwt_authorities.len(),
        });
        Ok(())
    }
    async fn x509_activated(&self, signer: Arc<Signer>) -> Result<(), PublishError> {
        self.events.lock().unwrap().push(Event::Activated {
            at: self.clock.now_unix(),
            id: signer.x509_authority_id().to_string(),
        });
        Ok(())
    }
}

fn slots(ca: &Ca, kind: Kind) -> Vec<Slot> {
    ca.list(kind).iter().map(|a| a.slot).collect()
}

#[tokio::test(start_paused = true)]
async fn prepare_at_half_activate_at_five_sixths_old_leaves_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CaConfig::new(TrustDomain::new("example.org").unwrap(), dir.path());
    cfg.ca_ttl = Duration::from_secs(3600);
    let start = now_unix();
    let clock = Clock::following_tokio(start);
    let ca = Arc::new(Ca::load_or_create_at(&cfg, start).unwrap());
    let first = ca.list(Kind::X509)[0].clone();
    let first_jwt = ca.list(Kind::Jwt)[0].clone();
    // Self-signed authorities' schedules start when they were issued (NotBefore is back-dated).
    let (nb, na) = (
        first.not_before + BACKDATE.as_secs() as i64,
        first.not_after,
    );
    let recorder = Arc::new(Recorder {
        clock,
        events: Mutex::new(Vec::new()),
    });
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run(ca.clone(), clock, recorder.clone(), rx));

    let until = |t: i64| {
        let d = u64::try_from(t - clock.now_unix()).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(d) + Duration::from_millis(500))
    };
    // Published once at start; nothing due before ½.
    until(prepare_at(nb, na) - 1).await;
    assert_eq!(slots(&ca, Kind::X509), [Slot::Active]);
    until(prepare_at(nb, na)).await;
    assert_eq!(slots(&ca, Kind::X509), [Slot::Active, Slot::Prepared]);
    let prepared = ca.list(Kind::X509)[1].clone();
    assert_eq!(
        prepared.not_before,
        prepare_at(nb, na) - BACKDATE.as_secs() as i64
    );
    // Prepared: in the bundle, not signing.
    assert_eq!(ca.x509_authorities().len(), 2);
    assert_eq!(ca.current().x509_authority_id(), first.id);

    until(activate_at(nb, na) - 1).await;
    assert_eq!(ca.current().x509_authority_id(), first.id);
    until(activate_at(nb, na)).await;
    assert_eq!(ca.current().x509_authority_id(), prepared.id);
    assert_eq!(slots(&ca, Kind::X509), [Slot::Active, Slot::Old]);
    // SVIDs of the new authority are capped at its NotAfter.
    assert_eq!(ca.x509_authorities().len(), 2);

    // The old one stays until its NotAfter, then leaves the bundle.
    let listed = |id: &str| ca.list(Kind::X509).iter().any(|a| a.id == id);
    until(na - 1).await;
    assert!(listed(&first.id));
    until(na).await;
    assert!(!listed(&first.id), "{:?}", ca.list(Kind::X509));
    assert_eq!(ca.list(Kind::X509)[0].id, prepared.id);

    // The JWT key followed the same schedule on its own times.
    let jwt = ca.list(Kind::Jwt);
    assert_eq!(
        jwt[0].not_before,
        prepare_at(first_jwt.not_before, first_jwt.not_after)
    );
    assert!(
        !jwt.iter().any(|a| a.id == first_jwt.id),
        "old JWT key left after its NotAfter"
    );

    let _ = stop.send(true);
    task.await.unwrap();
    let events = recorder.events.lock().unwrap().clone();
    let jp = prepare_at(first_jwt.not_before, first_jwt.not_after);
    let ja = activate_at(first_jwt.not_before, first_jwt.not_after);
    // Every change published at the second it was due, and nothing else.
    let bundles: Vec<(i64, usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Bundle {
                at,
                roots,
                jwt_keys,
            } => Some((*at, *roots, *jwt_keys)),
            Event::Activated { .. } => None,
        })
        .collect();
    let (xp, xa) = (prepare_at(nb, na), activate_at(nb, na));
    // One publication per second something was due (an activation reorders the bundle), with
    // the prepared authorities counted from their preparation.
    let mut times = vec![start, xp, jp, xa, ja];
    times.sort();
    times.dedup();
    let expected: Vec<(i64, usize, usize)> = times
        .into_iter()
        .map(|t| (t, 1 + usize::from(t >= xp), 1 + usize::from(t >= jp)))
        .collect();
    let early: Vec<_> = bundles.into_iter().filter(|b| b.0 <= ja).collect();
    assert_eq!(early, expected, "{events:?}");
    let activations: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Activated { .. }))
        .collect();
    assert_eq!(
        activations,
        [&Event::Activated {
            at: activate_at(nb, na),
            id: prepared.id.clone()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn an_operators_transition_is_published_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CaConfig::new(TrustDomain::new("example.org").unwrap(), dir.path());
    let start = now_unix();
    let clock = Clock::following_tokio(start);
    let ca = Arc::new(Ca::load_or_create_at(&cfg, start).unwrap());
    let recorder = Arc::new(Recorder {
        clock,
        events: Mutex::new(Vec::new()),
    });
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run(ca.clone(), clock, recorder.clone(), rx));
    tokio::time::sleep(Duration::from_secs(10)).await;
    ca.prepare(Kind::X509, clock.now_unix()).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    ca.activate(Kind::X509, None).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let _ = stop.send(true);
    task.await.unwrap();
    let events = recorder.events.lock().unwrap().clone();
    let id = ca.current().x509_authority_id().to_string();
    assert_eq!(
        events,
        [
            Event::Bundle {
                at: start,
                roots: 1,
                jwt_keys: 1
            },
            Event::Bundle {
                at: start + 10,
                roots: 2,
                jwt_keys: 1
            },
            Event::Bundle {
                at: start + 10,
                roots: 2,
                jwt_keys: 1
            },
            Event::Activated { at: start + 10, id },
        ]
    );
}
