//! Authority transitions, their refusals, the upgrade from a single root, and restarts after a
//! crash at each step of prepare and activate.

use std::fs;
use std::time::Duration;

use sigil::clock::now_unix;
use sigil::{SpiffeId, TrustDomain};

use super::*;
use crate::ca::{Ca, CaError};

type R = Result<(), Box<dyn std::error::Error>>;

fn config(dir: &Path) -> CaConfig {
    let mut c = CaConfig::new(TrustDomain::new("example.org").unwrap(), dir.join("ca"));
    c.ca_ttl = Duration::from_secs(3600);
    c
}

fn slots(ca: &Ca, kind: Kind) -> Vec<(String, Slot, bool)> {
    ca.list(kind)
        .into_iter()
        .map(|a| (a.id, a.slot, a.tainted))
        .collect()
}

/// Authority files in the CA directory, sorted.
fn authority_files(cfg: &CaConfig) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&cfg.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("x509-") || n.starts_with("jwt-"))
        .collect();
    v.sort();
    v
}

/// The ½ and ⅚ points of the active X.509 authority.
fn points(ca: &Ca) -> (i64, i64, i64) {
    let a = &ca.list(Kind::X509)[0];
    let start = a.not_before + BACKDATE.as_secs() as i64;
    (
        prepare_at(start, a.not_after),
        activate_at(start, a.not_after),
        a.not_after,
    )
}

#[test]
fn a_single_root_ca_dir_becomes_the_active_authority_on_upgrade() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let before = Ca::load_or_create(&cfg)?;
    let (bundle, kid) = (before.bundle(), before.jwt_kid());
    drop(before);
    // As an earlier version left it: root.key, root.crt, jwt.key and no journal.
    fs::remove_file(cfg.dir.join(JOURNAL_FILE))?;
    let root_pem = fs::read_to_string(cfg.dir.join(ROOT_CERT_FILE))?;
    let root = parse_pem_certs(&root_pem)?.remove(0);
    let ca = Ca::load_or_create(&cfg)?;
    assert!(cfg.dir.join(JOURNAL_FILE).exists());
    let (_, cert) = x509_parser::parse_x509_certificate(&root)?;
    assert_eq!(
        slots(&ca, Kind::X509),
        [(subject_key_id(&cert), Slot::Active, false)]
    );
    assert_eq!(ca.bundle(), bundle);
    assert_eq!(ca.jwt_kid(), kid);
    assert_eq!(ca.current().signing_cert_der(), root.as_slice());
    Ok(())
}

#[test]
fn a_crash_during_prepare_restarts_into_a_consistent_state() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let start = now_unix();
    let ca = Ca::load_or_create_at(&cfg, start)?;
    let (half, _, _) = points(&ca);
    let bundle = ca.bundle();
    ca.lock().crash_at = Some(CrashPoint::PrepareBeforeJournal);
    assert!(ca.tick(half).is_err());
    // The new key and certificate are on disk, the journal does not name them, the bundle and
    // the signer are unchanged.
    assert_eq!(
        authority_files(&cfg).len(),
        2,
        "{:?}",
        authority_files(&cfg)
    );
    assert_eq!(ca.bundle(), bundle);
    drop(ca);

    // Restart before ½: the leftovers are deleted, nothing is prepared.
    let ca = Ca::load_or_create_at(&cfg, half - 1)?;
    assert_eq!(authority_files(&cfg), Vec::<String>::new());
    assert_eq!(ca.bundle(), bundle);
    assert_eq!(ca.list(Kind::X509).len(), 1);
    drop(ca);
    // Restart at ½: prepared then, and published.
    let ca = Ca::load_or_create_at(&cfg, half)?;
    let listed = slots(&ca, Kind::X509);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].1, Slot::Prepared);
    assert_eq!(ca.x509_authorities().len(), 2);
    let x509_files: Vec<String> = authority_files(&cfg)
        .into_iter()
        .filter(|f| f.starts_with("x509-"))
        .collect();
    assert_eq!(
        x509_files,
        [
            format!("x509-{}.crt", listed[1].0),
            format!("x509-{}.key", listed[1].0)
        ]
    );
    let mode = fs::metadata(cfg.dir.join(format!("x509-{}.key", listed[1].0)))?;
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    Ok(())
}

#[test]
fn a_crash_during_activate_restarts_into_a_consistent_state() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let ca = Ca::load_or_create_at(&cfg, now_unix())?;
    let first = ca.list(Kind::X509)[0].id.clone();
    let (half, five_sixths, _) = points(&ca);
    ca.tick(half)?;
    let prepared = ca.list(Kind::X509)[1].id.clone();
    let journal_before = fs::read(cfg.dir.join(JOURNAL_FILE))?;
    ca.tick(five_sixths)?;
    assert_eq!(ca.current().x509_authority_id(), prepared);
    drop(ca);
    // `kill -9` before the journal's rename: the old journal and a temporary file remain.
    fs::write(cfg.dir.join(JOURNAL_FILE), &journal_before)?;
    fs::write(cfg.dir.join(".authorities.json.tmp.1.0"), b"{\"trunc")?;

    // Restarting before ⅚ (a clock that went back): still prepared, both published.
    let ca = Ca::load_or_create_at(&cfg, five_sixths - 1)?;
    assert_eq!(
        slots(&ca, Kind::X509),
        [
            (first.clone(), Slot::Active, false),
            (prepared.clone(), Slot::Prepared, false)
        ]
    );
    assert_eq!(ca.x509_authorities().len(), 2);
    drop(ca);
    // Restarting at ⅚: activated at start, the previous one old and still published.
    let ca = Ca::load_or_create_at(&cfg, five_sixths)?;
    assert_eq!(
        slots(&ca, Kind::X509),
        [
            (prepared.clone(), Slot::Active, false),
            (first.clone(), Slot::Old, false)
        ]
    );
    assert_eq!(ca.current().x509_authority_id(), prepared);
    assert_eq!(ca.x509_authorities().len(), 2);
    // The SVIDs it issues verify against that bundle.
    let key = rcgen::KeyPair::generate()?;
    let svid = ca.sign_x509_svid(
        &rcgen::PublicKeyData::subject_public_key_info(&key),
        &SpiffeId::parse("spiffe://example.org/w")?,
        &[],
        None,
    )?;
    sigil::x509::verify_x509_svid(
        &svid.chain_der,
        &ca.x509_authorities(),
        std::time::SystemTime::now(),
    )?;
    Ok(())
}

#[test]
fn taint_and_revoke_refuse_what_would_lose_trust_and_persist() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let now = now_unix();
    let ca = Ca::load_or_create_at(&cfg, now)?;
    for kind in [Kind::X509, Kind::Jwt] {
        let first = ca.list(kind)[0].id.clone();
        let refused = |e: CaError| matches!(e, CaError::AuthorityNotAllowed { .. });
        // Active: neither taint nor revoke.
        assert!(refused(ca.taint(kind, &first).unwrap_err()));
        let e = ca.revoke(kind, &first).unwrap_err();
        assert!(e.to_string().contains("active authority"), "{e}");
        // Unknown IDs.
        let e = ca.taint(kind, "00ff").unwrap_err();
        assert!(matches!(e, CaError::UnknownAuthority { .. }), "{e}");
        assert!(e.to_string().contains("00ff"), "{e}");
        // Nothing to activate.
        assert!(matches!(
            ca.activate(kind, None).unwrap_err(),
            CaError::NoPreparedAuthority(_)
        ));
        ca.prepare(kind, now)?;
        let second = ca.list(kind)[1].id.clone();
        // Prepared: not taintable; activate names only it.
        assert!(refused(ca.taint(kind, &second).unwrap_err()));
        assert!(refused(ca.activate(kind, Some(&first)).unwrap_err()));
        ca.activate(kind, Some(&second))?;
        // Old but not tainted: not revocable.
        let e = ca.revoke(kind, &first).unwrap_err();
        assert!(e.to_string().contains("not tainted"), "{e}");
        let bundle = ca.bundle();
        assert_eq!(
            slots(&ca, kind),
            [
                (second.clone(), Slot::Active, false),
                (first.clone(), Slot::Old, false)
            ],
            "refusals changed nothing"
        );
        ca.taint(kind, &first)?;
        assert!(refused(ca.taint(kind, &first).unwrap_err()), "twice");
        assert_eq!(
            ca.current().tainted().0.len() + ca.current().tainted().1.len(),
            1
        );
        assert_eq!(ca.bundle(), bundle, "a taint keeps the authority published");
        ca.revoke(kind, &first)?;
        assert_eq!(slots(&ca, kind), [(second.clone(), Slot::Active, false)]);
        match kind {
            Kind::X509 => assert_eq!(ca.x509_authorities().len(), 1),
            Kind::Jwt => assert_eq!(ca.bundle().jwt_authorities.len(), 1),
        }
        assert!(matches!(
            ca.revoke(kind, &first).unwrap_err(),
            CaError::UnknownAuthority { .. }
        ));
    }
    let (x, j) = (slots(&ca, Kind::X509), slots(&ca, Kind::Jwt));
    let bundle = ca.bundle();
    drop(ca);
    // The journal kept it all; the revoked authorities' files are gone.
    let ca = Ca::load_or_create_at(&cfg, now)?;
    assert_eq!(
        (slots(&ca, Kind::X509), slots(&ca, Kind::Jwt)),
        (x.clone(), j.clone())
    );
    assert_eq!(ca.bundle(), bundle);
    assert!(!cfg.dir.join(ROOT_KEY_FILE).exists());
    assert!(!cfg.dir.join(JWT_KEY_FILE).exists());
    assert_eq!(
        authority_files(&cfg),
        [
            format!("jwt-{}.key", j[0].0),
            format!("x509-{}.crt", x[0].0),
            format!("x509-{}.key", x[0].0)
        ]
    );
    Ok(())
}

#[test]
fn svids_are_capped_and_old_jwt_keys_keep_validating() -> R {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.ca_ttl = Duration::from_secs(120);
    let ca = Ca::load_or_create(&cfg)?;
    let id = SpiffeId::parse("spiffe://example.org/w")?;
    // Asked for the 5 min default: capped at the key's NotAfter.
    let jwt = ca.mint_jwt_svid(&id, &["a".to_string()], None)?;
    assert_eq!(jwt.expires_at, ca.current().jwt_not_after());
    let key = rcgen::KeyPair::generate()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let svid = ca.sign_x509_svid(&spki, &id, &[], None)?;
    assert_eq!(svid.not_after, ca.ca_not_after());
    // After a JWT rotation the old key still validates what it signed.
    ca.prepare(Kind::Jwt, now_unix())?;
    ca.activate(Kind::Jwt, None)?;
    assert_ne!(ca.jwt_kid(), ca.list(Kind::Jwt)[1].id);
    sigil::jwt::validate_jwt_svid(&jwt.token, "a", &ca.bundle())?;
    let new = ca.mint_jwt_svid(&id, &["a".to_string()], None)?;
    sigil::jwt::validate_jwt_svid(&new.token, "a", &ca.bundle())?;
    Ok(())
}

#[test]
fn a_corrupt_journal_is_refused_naming_the_file() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    Ca::load_or_create(&cfg)?;
    let path = cfg.dir.join(JOURNAL_FILE);
    let good = fs::read_to_string(&path)?;
    fs::write(&path, &good[..good.len() / 2])?;
    let e = Ca::load_or_create(&cfg).unwrap_err();
    assert!(
        matches!(e, CaError::Journal { .. }) && e.to_string().contains(JOURNAL_FILE),
        "{e}"
    );
    fs::write(&path, good.replace("\"active\"", "\"old\""))?;
    let e = Ca::load_or_create(&cfg).unwrap_err();
    assert!(e.to_string().contains("0 active"), "{e}");
    fs::write(&path, good.replace("root.key", "../root.key"))?;
    let e = Ca::load_or_create(&cfg).unwrap_err();
    assert!(e.to_string().contains("not a plain file name"), "{e}");
    fs::write(&path, &good)?;
    Ca::load_or_create(&cfg)?;
    Ok(())
}
