//! CA tests: SVIDs checked against the X509-SVID spec with x509-parser and verified with
//! rustls-webpki, key files, restarts, corrupted files, upstream mode, JWT-SVIDs.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil::x509::{check_x509_svid, to_pem_certs};
use sigil::{SpiffeId, TrustDomain};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

use super::*;

type R = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap_or_else(|e| panic!("{e}"))
}

fn id(path: &str) -> Res<SpiffeId> {
    Ok(td().id(path)?)
}

fn config(dir: &Path) -> CaConfig {
    CaConfig::new(td(), dir.join("ca"))
}

/// A fresh leaf key and its SubjectPublicKeyInfo.
fn leaf_spki(alg: &'static rcgen::SignatureAlgorithm) -> Res<(KeyPair, Vec<u8>)> {
    let k = KeyPair::generate_for(alg)?;
    let spki = k.subject_public_key_info();
    Ok((k, spki))
}

/// Verifies a chain with rustls-webpki for both client-auth and server-auth.
fn webpki_verify(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<(), webpki::Error> {
    let roots: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = CertificateDer::from(chain[0].as_slice());
    let inter: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

use sigil::clock::now_unix;

#[test]
fn svid_meets_the_x509_svid_spec() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let want = id("/ns/web")?;
    let dns = vec![
        "web.example.org".to_string(),
        "*.web.example.org".to_string(),
    ];
    let svid = ca.sign_x509_svid(&spki, &want, &dns, None)?;
    assert_eq!(svid.spiffe_id, want);
    assert_eq!(
        svid.chain_der.len(),
        1,
        "self-signed mode: the chain is the leaf alone"
    );
    let (rest, leaf) = X509Certificate::from_der(&svid.chain_der[0])?;
    assert!(rest.is_empty());

    // Exactly one URI SAN, equal to the ID; the DNS SANs.
    let san = leaf.subject_alternative_name()?.ok_or("no SAN")?;
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://example.org/ns/web"]);
    let dnss: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dnss, dns);
    // CN is the first DNS name.
    let cn = leaf
        .subject()
        .iter_common_name()
        .next()
        .ok_or("no CN")?
        .as_str()?;
    assert_eq!(cn, "web.example.org");

    // basicConstraints CA=false, critical.
    let bc = leaf.basic_constraints()?.ok_or("no basicConstraints")?;
    assert!(!bc.value.ca);
    assert!(bc.critical);
    // keyUsage: digitalSignature only, critical.
    let ku = leaf.key_usage()?.ok_or("no keyUsage")?;
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "only digitalSignature: {}", ku.value);
    // EKU: serverAuth and clientAuth.
    let eku = leaf.extended_key_usage()?.ok_or("no EKU")?;
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any);

    // Validity: back-dated NotBefore, NotAfter = now + 1 h (default).
    let now = now_unix();
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(
        nb <= now - 25 && nb >= now - 40,
        "NotBefore {nb} vs now {now}"
    );
    assert!((na - (now + 3600)).abs() <= 5, "NotAfter {na} vs now {now}");
    assert_eq!(na, svid.not_after);

    // Serial: positive, >= 64 bits, as reported.
    assert_eq!(hex::encode(leaf.raw_serial()), svid.serial_hex);
    assert!(leaf.raw_serial().len() >= 9 && leaf.raw_serial()[0] & 0x80 == 0);

    // Key identifiers: SKI present, AKI = the CA's SKI.
    let roots = ca.x509_authorities();
    let (_, root) = X509Certificate::from_der(&roots[0])?;
    let ski_of = |c: &X509Certificate<'_>| {
        c.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
    };
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    assert!(ski_of(&leaf).is_some());
    assert_eq!(aki, ski_of(&root));
    assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
    leaf.verify_signature(Some(root.public_key()))?;
    // The leaf carries the requested public key.
    assert_eq!(leaf.public_key().raw, spki.as_slice());

    assert_eq!(check_x509_svid(&svid.chain_der[0])?, want);
    webpki_verify(&svid.chain_der, &ca.x509_authorities())?;
    Ok(())
}

#[test]
fn root_is_a_spiffe_signing_certificate() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let roots = ca.x509_authorities();
    let (_, root) = X509Certificate::from_der(&roots[0])?;
    let bc = root.basic_constraints()?.ok_or("no bc")?;
    assert!(bc.value.ca && bc.critical);
    let ku = root.key_usage()?.ok_or("no ku")?;
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(
        sigil::x509::spiffe_id_of(&ca.x509_authorities()[0])?.to_string(),
        "spiffe://example.org"
    );
    assert!(root.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::SubjectKeyIdentifier(_)
    )));
    root.verify_signature(None)?;
    let life = root.validity().not_after.timestamp() - now_unix();
    assert!((life - DEFAULT_CA_TTL.as_secs() as i64).abs() < 60);
    assert_eq!(ca.ca_not_after(), root.validity().not_after.timestamp());
    assert_eq!(
        ca.current().signing_cert_der(),
        ca.x509_authorities()[0].as_slice()
    );
    Ok(())
}

#[test]
fn serials_differ_and_ttl_is_capped_at_the_ca() -> R {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.ca_ttl = Duration::from_secs(2 * 3600);
    let ca = Ca::load_or_create(&cfg)?;
    let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let a = ca.sign_x509_svid(&spki, &id("/a")?, &[], None)?;
    let b = ca.sign_x509_svid(&spki, &id("/a")?, &[], None)?;
    assert_ne!(a.serial_hex, b.serial_hex);
    assert_ne!(a.chain_der, b.chain_der);
    let long = ca.sign_x509_svid(&spki, &id("/a")?, &[], Some(Duration::from_secs(10 * 3600)))?;
    assert_eq!(
        long.not_after,
        ca.ca_not_after(),
        "NotAfter must be capped at the CA's NotAfter"
    );
    let (_, leaf) = X509Certificate::from_der(&long.chain_der[0])?;
    assert!(leaf.validity().not_after.timestamp() <= ca.ca_not_after());
    let short = ca.sign_x509_svid(&spki, &id("/a")?, &[], Some(Duration::from_secs(60)))?;
    assert!((short.not_after - (now_unix() + 60)).abs() <= 5);
    // A TTL below the floor (an entry stored before the floor existed) gets the floor.
    let legacy = ca.sign_x509_svid(&spki, &id("/a")?, &[], Some(Duration::from_secs(2)))?;
    assert!((legacy.not_after - (now_unix() + 60)).abs() <= 5);
    let minted = ca.mint_jwt_svid(&id("/a")?, &["a".into()], Some(Duration::from_secs(1)))?;
    let claims = sigil::jwt::validate_jwt_svid(&minted.token, "a", &ca.bundle())?;
    let exp = claims.all["exp"].as_i64().ok_or("exp")?;
    assert!((exp - (now_unix() + 30)).abs() <= 5, "JWT floor: {exp}");
    Ok(())
}

#[test]
fn rejects_bad_requests() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let other = SpiffeId::parse("spiffe://other.org/web")?;
    let e = ca
        .sign_x509_svid(&spki, &other, &[], None)
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(e, CaError::WrongTrustDomain { .. }), "{e}");
    assert!(e.to_string().contains("other.org"), "{e}");
    assert!(matches!(
        ca.mint_jwt_svid(&other, &["a".into()], None),
        Err(CaError::WrongTrustDomain { .. })
    ));
    let root_id = SpiffeId::parse("spiffe://example.org")?;
    assert!(matches!(
        ca.sign_x509_svid(&spki, &root_id, &[], None),
        Err(CaError::IdWithoutPath(_))
    ));
    for bad in [
        "",
        "a..b",
        "-a.example",
        "a b",
        "ex*ample.org",
        "*",
        "*.*.a",
    ] {
        let e = ca.sign_x509_svid(&spki, &id("/w")?, &[bad.to_string()], None);
        assert!(
            matches!(e, Err(CaError::InvalidDnsName(_))),
            "{bad:?}: {e:?}"
        );
    }
    assert!(matches!(
        ca.sign_x509_svid(&spki, &id("/w")?, &[], Some(Duration::ZERO)),
        Err(CaError::InvalidTtl(_))
    ));
    assert!(matches!(
        ca.sign_x509_svid(&spki, &id("/w")?, &[], Some(Duration::MAX)),
        Err(CaError::InvalidTtl(_))
    ));
    for bad_spki in [
        vec![],
        vec![0x30, 0x00],
        spki[..spki.len() - 1].to_vec(),
        [spki.clone(), vec![0]].concat(),
    ] {
        assert!(matches!(
            ca.sign_x509_svid(&bad_spki, &id("/w")?, &[], None),
            Err(CaError::InvalidPublicKey(_))
        ));
    }
    Ok(())
}

#[test]
fn leaf_key_types() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ] {
        let (_k, spki) = leaf_spki(alg)?;
        let svid = ca.sign_x509_svid(&spki, &id("/k")?, &[], None)?;
        webpki_verify(&svid.chain_der, &ca.x509_authorities())?;
    }
    Ok(())
}

#[test]
fn csr_path_uses_only_the_public_key() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let key = KeyPair::generate()?;
    // The requester asks for another identity and CA powers: all ignored.
    let mut p = CertificateParams::new(vec!["evil.example".to_string()])?;
    p.subject_alt_names
        .push(SanType::URI("spiffe://evil.org/admin".try_into()?));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "evil");
    let csr = p.serialize_request(&key)?;
    let want = id("/ns/web")?;
    let svid = ca.sign_x509_svid_csr(csr.der(), &want, &[], None)?;
    assert_eq!(check_x509_svid(&svid.chain_der[0])?, want);
    let (_, leaf) = X509Certificate::from_der(&svid.chain_der[0])?;
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert!(leaf.subject().iter_common_name().next().is_none());
    let san = leaf.subject_alternative_name()?.ok_or("no SAN")?;
    assert_eq!(san.value.general_names.len(), 1);
    webpki_verify(&svid.chain_der, &ca.x509_authorities())?;

    // A flipped signature bit, garbage, truncations: InvalidCsr, never a panic.
    let mut tampered = csr.der().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let e = ca
        .sign_x509_svid_csr(&tampered, &want, &[], None)
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(e, CaError::InvalidCsr(_)), "{e}");
    assert!(e.to_string().contains("signature"), "{e}");
    // Tampering with the signed part (the subject) breaks the signature too.
    let der = csr.der().to_vec();
    let pos = der
        .windows(4)
        .position(|w| w == b"evil")
        .ok_or("no CN in CSR")?;
    let mut tampered = der.clone();
    tampered[pos] = b'E';
    assert!(matches!(
        ca.sign_x509_svid_csr(&tampered, &want, &[], None),
        Err(CaError::InvalidCsr(_))
    ));
    for garbage in [
        &b""[..],
        b"garbage",
        &[0x30, 0x82, 0xff, 0xff][..],
        &[der.as_slice(), &[0]].concat(),
    ] {
        assert!(matches!(
            ca.sign_x509_svid_csr(garbage, &want, &[], None),
            Err(CaError::InvalidCsr(_))
        ));
    }
    for end in (0..der.len()).step_by(7) {
        assert!(matches!(
            ca.sign_x509_svid_csr(&der[..end], &want, &[], None),
            Err(CaError::InvalidCsr(_))
        ));
    }
    Ok(())
}

#[test]
fn key_files_are_private_and_restart_reuses_everything() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let first = Ca::load_or_create(&cfg)?;
    let mode = |p: PathBuf| fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(cfg.dir.clone())?, 0o700);
    assert_eq!(mode(cfg.dir.join(ROOT_KEY_FILE))?, 0o600);
    assert_eq!(mode(cfg.dir.join(JWT_KEY_FILE))?, 0o600);
    let key_before = fs::read(cfg.dir.join(ROOT_KEY_FILE))?;
    let second = Ca::load_or_create(&cfg)?;
    assert_eq!(&first.x509_authorities(), &second.x509_authorities());
    assert_eq!(first.jwt_kid(), second.jwt_kid());
    assert_eq!(first.bundle(), second.bundle());
    assert_eq!(fs::read(cfg.dir.join(ROOT_KEY_FILE))?, key_before);
    // What one instance issued verifies against the other's bundle.
    let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    webpki_verify(
        &first
            .sign_x509_svid(&spki, &id("/x")?, &[], None)?
            .chain_der,
        &second.x509_authorities(),
    )?;
    let tok = first.mint_jwt_svid(&id("/x")?, &["a".into()], None)?.token;
    sigil::jwt::validate_jwt_svid(&tok, "a", &second.bundle())?;
    // Only the expected files exist (no temporary leftovers).
    let mut names: Vec<_> = fs::read_dir(&cfg.dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(
        names,
        vec!["authorities.json", "jwt.key", "root.crt", "root.key"]
    );
    // A group-readable key still loads (with a warning).
    fs::set_permissions(
        cfg.dir.join(ROOT_KEY_FILE),
        fs::Permissions::from_mode(0o640),
    )?;
    Ca::load_or_create(&cfg)?;
    Ok(())
}

#[test]
fn corrupted_files_give_clear_errors() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    Ca::load_or_create(&cfg)?;
    let key_path = cfg.dir.join(ROOT_KEY_FILE);
    let cert_path = cfg.dir.join(ROOT_CERT_FILE);
    let jwt_path = cfg.dir.join(JWT_KEY_FILE);
    let key = fs::read(&key_path)?;
    let cert = fs::read(&cert_path)?;
    let jwt = fs::read(&jwt_path)?;
    let restore = || -> std::io::Result<()> {
        fs::write(&key_path, &key)?;
        fs::write(&cert_path, &cert)?;
        fs::write(&jwt_path, &jwt)
    };

    // Truncated root key, at several lengths.
    for len in [0, 10, key.len() / 2, key.len() - 30] {
        fs::write(&key_path, &key[..len])?;
        let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
        assert!(matches!(e, CaError::BadKeyFile { .. }), "len {len}: {e}");
        assert!(e.to_string().contains("root.key"), "{e}");
    }
    restore()?;
    // Garbled certificate.
    fs::write(
        &cert_path,
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(
        matches!(e, CaError::BadCertFile { .. }) && e.to_string().contains("root.crt"),
        "{e}"
    );
    fs::write(&cert_path, &cert[..cert.len() / 2])?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::BadCertFile { .. })
    ));
    restore()?;
    // Another key with the certificate.
    fs::write(&key_path, KeyPair::generate()?.serialize_pem())?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(matches!(e, CaError::KeyMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("root.key") && e.to_string().contains("root.crt"),
        "{e}"
    );
    restore()?;
    // Truncated JWT key.
    fs::write(&jwt_path, &jwt[..jwt.len() / 2])?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(
        matches!(e, CaError::BadKeyFile { .. }) && e.to_string().contains("jwt.key"),
        "{e}"
    );
    // A P-384 JWT key is refused (the JWT key is ES256).
    fs::write(
        &jwt_path,
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?.serialize_pem(),
    )?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::BadKeyFile { .. })
    ));
    restore()?;
    // Certificate without key: refuse (a new root would orphan every SVID).
    fs::remove_file(&key_path)?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(matches!(e, CaError::MissingKey { .. }), "{e}");
    restore()?;
    // Key without certificate (crash during first start, before the journal): a new
    // certificate for the same key.
    fs::remove_file(&cert_path)?;
    fs::remove_file(cfg.dir.join(authority::JOURNAL_FILE))?;
    let ca = Ca::load_or_create(&cfg)?;
    let roots = ca.x509_authorities();
    let (_, root) = X509Certificate::from_der(&roots[0])?;
    assert_eq!(
        root.public_key().raw,
        KeyPair::from_pem(std::str::from_utf8(&key)?)?
            .subject_public_key_info()
            .as_slice()
    );
    Ok(())
}

#[test]
fn root_for_another_trust_domain_or_expired_is_refused() -> R {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    Ca::load_or_create(&cfg)?;
    let mut other = cfg.clone();
    other.trust_domain = TrustDomain::new("other.org")?;
    let e = Ca::load_or_create(&other)
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(e, CaError::TrustDomainMismatch { .. }), "{e}");

    // An expired root made with the same key.
    let key = KeyPair::from_pem(&fs::read_to_string(cfg.dir.join(ROOT_KEY_FILE))?)?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into()?)];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = p.self_signed(&key)?;
    fs::write(cfg.dir.join(ROOT_CERT_FILE), old.pem())?;
    // Journaled (the server ran here): an expired active authority is replaced at start, and
    // leaves the bundle (every SVID it signed has expired too).
    let ca = Ca::load_or_create(&cfg)?;
    assert_ne!(ca.x509_authorities(), vec![old.der().to_vec()]);
    assert_eq!(ca.x509_authorities().len(), 1);
    assert_eq!(ca.list(Kind::X509).len(), 1);
    // Without a journal (an upgrade from a single root), it is refused as before.
    fs::remove_file(cfg.dir.join(authority::JOURNAL_FILE))?;
    fs::write(cfg.dir.join(ROOT_KEY_FILE), key.serialize_pem())?;
    fs::write(cfg.dir.join(ROOT_CERT_FILE), old.pem())?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(matches!(e, CaError::CertNotValidNow { .. }), "{e}");
    // A non-CA certificate with the same key (journaled or not).
    p.is_ca = IsCa::ExplicitNoCa;
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    fs::write(cfg.dir.join(ROOT_CERT_FILE), p.self_signed(&key)?.pem())?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::NotACa { .. })
    ));
    Ok(())
}

#[test]
fn every_root_key_type_works() -> R {
    for kt in KeyType::ALL {
        let dir = tempfile::tempdir()?;
        let mut cfg = config(dir.path());
        cfg.key_type = kt;
        let ca = Ca::load_or_create(&cfg)?;
        let roots = ca.x509_authorities();
        let (_, root) = X509Certificate::from_der(&roots[0])?;
        let alg = root.signature_algorithm.algorithm.to_id_string();
        let want = match kt {
            KeyType::EcP256 => "1.2.840.10045.4.3.2",
            KeyType::EcP384 => "1.2.840.10045.4.3.3",
            KeyType::Rsa2048 => "1.2.840.113549.1.1.11",
        };
        assert_eq!(alg, want, "{kt}");
        if kt == KeyType::Rsa2048 {
            assert_eq!(root.public_key().parsed()?.key_size(), 2048);
        }
        let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let svid = ca.sign_x509_svid(&spki, &id("/kt")?, &[], None)?;
        webpki_verify(&svid.chain_der, &ca.x509_authorities())?;
        // Restart keeps the key type even if the configuration changes.
        cfg.key_type = KeyType::EcP256;
        let again = Ca::load_or_create(&cfg)?;
        assert_eq!(&again.x509_authorities(), &ca.x509_authorities());
    }
    Ok(())
}

/// An upstream PKI made with rcgen: root -> intermediate(s), files in `dir`.
struct Upstream {
    root_der: Vec<u8>,
    cfg: UpstreamConfig,
}

fn ca_params(cn: &str, uri: Option<&str>) -> Res<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into()?)];
    }
    p.use_authority_key_identifier_extension = true;
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(3600);
    p.not_after = now + Duration::from_secs(30 * 24 * 3600);
    Ok(p)
}

/// `depth` intermediates below a fresh root; the chain file lists them leaf-side first.
fn upstream(dir: &Path, depth: usize, alg: &'static rcgen::SignatureAlgorithm) -> Res<Upstream> {
    let root_key = KeyPair::generate_for(alg)?;
    let mut root_p = ca_params("Upstream Root", None)?;
    root_p.use_authority_key_identifier_extension = false;
    let root = root_p.self_signed(&root_key)?;
    let mut issuer = Issuer::new(root_p, root_key);
    let mut chain = Vec::new();
    let mut last_key = None;
    for i in 0..depth {
        let key = KeyPair::generate_for(alg)?;
        let uri = (i + 1 == depth).then_some("spiffe://example.org");
        let p = ca_params(&format!("Upstream Intermediate {i}"), uri)?;
        let cert = p.signed_by(&key, &issuer)?;
        chain.insert(0, cert.der().to_vec());
        last_key = Some(key.serialize_pem());
        issuer = Issuer::new(p, key);
    }
    let cfg = UpstreamConfig {
        cert_chain_path: dir.join("chain.pem"),
        key_path: dir.join("inter.key"),
        bundle_path: dir.join("bundle.pem"),
        command: None,
    };
    fs::write(&cfg.cert_chain_path, to_pem_certs(&chain))?;
    fs::write(&cfg.key_path, last_key.ok_or("depth 0")?)?;
    fs::write(&cfg.bundle_path, to_pem_certs(&[root.der().to_vec()]))?;
    Ok(Upstream {
        root_der: root.der().to_vec(),
        cfg,
    })
}

#[test]
fn upstream_mode_chains_to_the_upstream_root() -> R {
    for (depth, alg) in [
        (1, &rcgen::PKCS_ECDSA_P256_SHA256),
        (2, &rcgen::PKCS_ECDSA_P384_SHA384),
    ] {
        let dir = tempfile::tempdir()?;
        let up = upstream(dir.path(), depth, alg)?;
        let mut cfg = config(dir.path());
        cfg.upstream = Some(up.cfg.clone());
        let ca = Ca::load_or_create(&cfg)?;
        assert_eq!(&ca.x509_authorities(), std::slice::from_ref(&up.root_der));
        let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let svid = ca.sign_x509_svid(&spki, &id("/up")?, &["up.example.org".into()], None)?;
        assert_eq!(
            svid.chain_der.len(),
            1 + depth,
            "leaf + intermediates, no root"
        );
        assert!(!svid.chain_der.contains(&up.root_der));
        webpki_verify(&svid.chain_der, &ca.x509_authorities())?;
        assert_eq!(check_x509_svid(&svid.chain_der[0])?, id("/up")?);
        // The leaf is capped by the intermediate's 30-day life.
        let long = ca.sign_x509_svid(
            &spki,
            &id("/up")?,
            &[],
            Some(Duration::from_secs(90 * 24 * 3600)),
        )?;
        assert_eq!(long.not_after, ca.ca_not_after());
        // The bundle carries the upstream root, and the CA's own JWT key.
        let b = ca.bundle();
        assert_eq!(b.x509_authorities, vec![up.root_der.clone()]);
        assert_eq!(b.jwt_authorities.len(), 1);
        // Not the root of another PKI.
        assert!(webpki_verify(&svid.chain_der, &[upstream(dir.path(), 1, alg)?.root_der]).is_err());
    }
    Ok(())
}

#[test]
fn upstream_misconfigurations_are_refused() -> R {
    let dir = tempfile::tempdir()?;
    let up = upstream(dir.path(), 1, &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut cfg = config(dir.path());
    cfg.upstream = Some(up.cfg.clone());
    let good_key = fs::read(&up.cfg.key_path)?;
    let good_bundle = fs::read(&up.cfg.bundle_path)?;
    let good_chain = fs::read(&up.cfg.cert_chain_path)?;

    // Mismatched key.
    fs::write(&up.cfg.key_path, KeyPair::generate()?.serialize_pem())?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(matches!(e, CaError::KeyMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("inter.key") && e.to_string().contains("chain.pem"),
        "{e}"
    );
    fs::write(&up.cfg.key_path, &good_key)?;

    // A bundle that is not its root.
    let other = tempfile::tempdir()?;
    let stranger = upstream(other.path(), 1, &rcgen::PKCS_ECDSA_P256_SHA256)?;
    fs::write(&up.cfg.bundle_path, to_pem_certs(&[stranger.root_der]))?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(matches!(e, CaError::UpstreamChain { .. }), "{e}");
    assert!(e.to_string().contains("bundle.pem"), "{e}");
    fs::write(&up.cfg.bundle_path, &good_bundle)?;

    // Missing and garbage files.
    fs::remove_file(&up.cfg.key_path)?;
    let e = Ca::load_or_create(&cfg).err().ok_or("expected an error")?;
    assert!(
        matches!(e, CaError::Io { .. }) && e.to_string().contains("inter.key"),
        "{e}"
    );
    fs::write(&up.cfg.key_path, &good_key)?;
    fs::write(&up.cfg.cert_chain_path, b"not pem")?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::BadCertFile { .. })
    ));
    fs::write(&up.cfg.cert_chain_path, &good_chain)?;
    fs::write(&up.cfg.bundle_path, b"")?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::BadCertFile { .. })
    ));
    fs::write(&up.cfg.bundle_path, &good_bundle)?;

    // An "intermediate" that is not a CA.
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    fs::write(&up.cfg.cert_chain_path, p.self_signed(&key)?.pem())?;
    fs::write(&up.cfg.key_path, key.serialize_pem())?;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::NotACa { .. })
    ));

    // Restored, it works again.
    fs::write(&up.cfg.cert_chain_path, &good_chain)?;
    fs::write(&up.cfg.key_path, &good_key)?;
    Ca::load_or_create(&cfg)?;
    Ok(())
}

#[test]
fn jwt_svids_mint_and_validate() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let bundle = ca.bundle();
    let who = id("/ns/web")?;
    let minted = ca.mint_jwt_svid(&who, &["db".into()], None)?;
    let tok = minted.token.clone();

    // Header and signature shape.
    let parts: Vec<&str> = tok.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0])?)?;
    assert_eq!(
        header,
        serde_json::json!({"alg": "ES256", "kid": ca.jwt_kid(), "typ": "JWT"})
    );
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[2])?.len(),
        64,
        "ES256 signatures are r||s"
    );

    let claims = sigil::jwt::validate_jwt_svid(&tok, "db", &bundle)?;
    assert_eq!(claims.subject, who);
    assert_eq!(claims.audience, vec!["db"]);
    assert_eq!(claims.all["aud"], "db", "one audience is a JSON string");
    let now = now_unix();
    assert!(
        (claims.expiry - (now + 300)).abs() <= 5,
        "default TTL 5 min"
    );
    assert!(claims.issued_at.is_some_and(|iat| (iat - now).abs() <= 5));
    // The expiry returned with the token is its `exp` claim.
    assert_eq!(minted.expires_at, claims.expiry);

    let multi = ca.mint_jwt_svid(
        &who,
        &["a".into(), "b".into()],
        Some(Duration::from_secs(60)),
    )?;
    let c = sigil::jwt::validate_jwt_svid(&multi.token, "b", &bundle)?;
    assert_eq!(c.audience, vec!["a", "b"]);
    assert_eq!(multi.expires_at, c.expiry);

    use sigil::jwt::JwtError;
    assert!(matches!(
        sigil::jwt::validate_jwt_svid(&tok, "other", &bundle),
        Err(JwtError::AudienceMismatch { .. })
    ));
    assert!(matches!(
        sigil::jwt::validate_jwt_svid_at(&tok, "db", &bundle, claims.expiry),
        Err(JwtError::Expired { .. })
    ));
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2])?;
    sig[0] ^= 0x80;
    let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(
        sigil::jwt::validate_jwt_svid(&tampered, "db", &bundle),
        Err(JwtError::BadSignature)
    );
    let other_dir = tempfile::tempdir()?;
    let other = Ca::load_or_create(&config(other_dir.path()))?;
    assert_ne!(other.jwt_kid(), ca.jwt_kid());
    assert!(matches!(
        sigil::jwt::validate_jwt_svid(&tok, "db", &other.bundle()),
        Err(JwtError::UnknownKid { .. })
    ));

    assert!(matches!(
        ca.mint_jwt_svid(&who, &[], None),
        Err(CaError::InvalidAudience(_))
    ));
    assert!(matches!(
        ca.mint_jwt_svid(&who, &[String::new()], None),
        Err(CaError::InvalidAudience(_))
    ));
    assert!(matches!(
        ca.mint_jwt_svid(&who, &["a".into()], Some(Duration::ZERO)),
        Err(CaError::InvalidTtl(_))
    ));
    Ok(())
}

#[test]
fn bundle_round_trips_through_the_spiffe_format() -> R {
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&config(dir.path()))?;
    let b = ca.bundle();
    assert_eq!(b.sequence_number, 0);
    let back = sigil::bundle::Bundle::from_spiffe_json(td(), &b.to_spiffe_json()?)?;
    assert_eq!(back, b);
    Ok(())
}

#[test]
fn config_is_validated() -> R {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.country = Some("USA".into());
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::InvalidConfig(_))
    ));
    cfg.country = Some("DE".into());
    cfg.default_x509_svid_ttl = Duration::ZERO;
    assert!(matches!(
        Ca::load_or_create(&cfg),
        Err(CaError::InvalidConfig(_))
    ));
    // Below the floors: refused, naming the setting.
    for (x509, jwt, what) in [
        (20, 300, "default_x509_svid_ttl"),
        (60, 10, "default_jwt_svid_ttl"),
    ] {
        cfg.default_x509_svid_ttl = Duration::from_secs(x509);
        cfg.default_jwt_svid_ttl = Duration::from_secs(jwt);
        let e = Ca::load_or_create(&cfg).err().ok_or("below the floor")?;
        assert!(matches!(e, CaError::InvalidConfig(_)), "{e}");
        assert!(e.to_string().contains(what), "{e}");
        assert!(e.to_string().contains("shorter than the minimum"), "{e}");
    }
    cfg.default_jwt_svid_ttl = Duration::from_secs(300);
    cfg.default_x509_svid_ttl = Duration::from_secs(60);
    let ca = Ca::load_or_create(&cfg)?;
    assert_eq!(
        ca.current().default_x509_svid_ttl(),
        Duration::from_secs(60)
    );
    assert_eq!(
        ca.current().default_jwt_svid_ttl(),
        Duration::from_secs(300)
    );
    assert_eq!(ca.trust_domain(), &td());
    let roots = ca.x509_authorities();
    let (_, root) = X509Certificate::from_der(&roots[0])?;
    assert_eq!(
        root.subject()
            .iter_country()
            .next()
            .ok_or("no C")?
            .as_str()?,
        "DE"
    );
    assert_eq!(
        root.subject()
            .iter_organization()
            .next()
            .ok_or("no O")?
            .as_str()?,
        "Sigil"
    );
    // Debug output never contains key material.
    let dbg = format!("{ca:?}");
    assert!(
        !dbg.contains("PRIVATE") && dbg.contains("example.org"),
        "{dbg}"
    );
    Ok(())
}

#[test]
fn ca_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ca>();
}

/// A root and an intermediate for `example.org` valid from an hour ago for `days`.
fn intermediate(root: &Issuer<'_, KeyPair>, days: u64) -> Res<(Vec<u8>, String)> {
    let key = KeyPair::generate()?;
    let mut p = ca_params("Upstream Intermediate", Some("spiffe://example.org"))?;
    p.not_after = ::time::OffsetDateTime::now_utc() + Duration::from_secs(days * 24 * 3600);
    let cert = p.signed_by(&key, root)?;
    Ok((cert.der().to_vec(), key.serialize_pem()))
}

#[tokio::test]
async fn upstream_mode_activates_a_replaced_intermediate_from_five_sixths() -> R {
    let dir = tempfile::tempdir()?;
    let root_key = KeyPair::generate()?;
    let mut root_p = ca_params("Upstream Root", None)?;
    root_p.use_authority_key_identifier_extension = false;
    root_p.not_after = ::time::OffsetDateTime::now_utc() + Duration::from_secs(365 * 24 * 3600);
    let root = root_p.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_p, root_key);
    let (a, a_key) = intermediate(&root_issuer, 30)?;
    let up = UpstreamConfig {
        cert_chain_path: dir.path().join("chain.pem"),
        key_path: dir.path().join("inter.key"),
        bundle_path: dir.path().join("bundle.pem"),
        command: None,
    };
    fs::write(&up.cert_chain_path, to_pem_certs(std::slice::from_ref(&a)))?;
    fs::write(&up.key_path, &a_key)?;
    fs::write(&up.bundle_path, to_pem_certs(&[root.der().to_vec()]))?;
    let mut cfg = config(dir.path());
    cfg.upstream = Some(up.clone());
    let ca = Ca::load_or_create(&cfg)?;
    let first = ca.list(Kind::X509)[0].clone();
    let half = authority::prepare_at(first.not_before, first.not_after);
    let five_sixths = authority::activate_at(first.not_before, first.not_after);
    // The hook is due once per intermediate, from ½.
    assert!(!ca.upstream_hook_due(half - 1));
    assert!(ca.upstream_hook_due(half));
    ca.upstream_hook_ran();
    assert!(!ca.upstream_hook_due(half));
    // No prepare / activate / taint by hand in upstream mode.
    assert!(matches!(
        ca.prepare(Kind::X509, half),
        Err(CaError::UpstreamManaged)
    ));
    // At ⅚ with the same files: nothing changes (and a warning says what to do). (The JWT
    // key, on its own one-hour schedule, rotates here.)
    assert!(!ca.tick(five_sixths)?.x509_activated);
    assert_eq!(ca.current().signing_cert_der(), a.as_slice());
    // Replaced files: activated at the next read; the root stays the bundle.
    let (b, b_key) = intermediate(&root_issuer, 60)?;
    fs::write(&up.cert_chain_path, to_pem_certs(std::slice::from_ref(&b)))?;
    fs::write(&up.key_path, &b_key)?;
    assert_eq!(
        ca.tick(five_sixths + 1)?,
        Changes::default(),
        "not read again yet"
    );
    let ch = ca.tick(five_sixths + authority::UPSTREAM_RELOAD_EVERY)?;
    assert!(ch.x509_activated && !ch.bundle, "{ch:?}");
    assert_eq!(ca.current().signing_cert_der(), b.as_slice());
    assert_eq!(ca.x509_authorities(), vec![root.der().to_vec()]);
    let listed: Vec<Slot> = ca.list(Kind::X509).iter().map(|a| a.slot).collect();
    assert_eq!(listed, [Slot::Active, Slot::Old]);
    let (_k, spki) = leaf_spki(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let svid = ca.sign_x509_svid(&spki, &id("/up")?, &[], None)?;
    assert_eq!(svid.chain_der[1], b);
    webpki_verify(&svid.chain_der, &ca.x509_authorities())?;
    // The old intermediate is listed until it expires.
    ca.tick(first.not_after)?;
    assert_eq!(ca.list(Kind::X509).len(), 1);

    // The hook: run with the paths in its environment; here it writes intermediate C.
    let (c, c_key) = intermediate(&root_issuer, 90)?;
    fs::write(
        dir.path().join("c.pem"),
        to_pem_certs(std::slice::from_ref(&c)),
    )?;
    fs::write(dir.path().join("c.key"), &c_key)?;
    let script = format!(
        "cp {0}/c.pem \"$SIGIL_UPSTREAM_CERT_CHAIN\" && cp {0}/c.key \"$SIGIL_UPSTREAM_KEY\"",
        dir.path().display()
    );
    rotation::run_hook(&ca, &["/bin/sh".into(), "-c".into(), script]).await;
    assert_eq!(
        fs::read(&up.cert_chain_path)?,
        to_pem_certs(&[c]).into_bytes()
    );
    Ok(())
}
