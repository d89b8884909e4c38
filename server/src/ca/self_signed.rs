//! Self-signed mode: `root.key` + `root.crt` in the CA directory, created on first start.
//!
//! Crash safety: the key is written (atomically) before the certificate. A key without a
//! certificate gets a fresh self-signed certificate; a certificate without its key is an error,
//! because silently minting a new root would invalidate every issued SVID.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use sigil::x509::{parse_pem_certs, to_pem_certs};
use time::OffsetDateTime;

use super::keys::{self, KeyType};
use super::x509_svid::random_serial;
use super::{
    check_ca_cert, check_trust_domain_uri, parse_cert, CaConfig, CaError, SigningMaterial,
    BACKDATE, ROOT_CERT_FILE, ROOT_KEY_FILE,
};

pub(crate) fn load_or_create(config: &CaConfig) -> Result<SigningMaterial, CaError> {
    let key_path = config.dir.join(ROOT_KEY_FILE);
    let cert_path = config.dir.join(ROOT_CERT_FILE);
    let key = keys::load_key_file(&key_path)?;
    let cert_pem = keys::read_text_file(&cert_path)?;
    let (key, cert_der) = match (key, cert_pem) {
        (None, None) => {
            let key = config.key_type.generate()?;
            keys::write_secret_file(&key_path, key.serialize_pem().as_bytes())?;
            let der = new_root_cert(config, &key, sigil::clock::now_unix())?;
            keys::write_public_file(
                &cert_path,
                to_pem_certs(std::slice::from_ref(&der)).as_bytes(),
            )?;
            tracing::info!(
                key_type = %config.key_type,
                cert = %cert_path.display(),
                "created a new self-signed root CA"
            );
            (key, der)
        }
        (Some(key), None) => {
            tracing::warn!(
                cert = %cert_path.display(),
                "root key exists without its certificate (interrupted first start?); \
                 issuing a new self-signed certificate for the existing key"
            );
            let der = new_root_cert(config, &key, sigil::clock::now_unix())?;
            keys::write_public_file(
                &cert_path,
                to_pem_certs(std::slice::from_ref(&der)).as_bytes(),
            )?;
            (key, der)
        }
        (None, Some(_)) => {
            return Err(CaError::MissingKey {
                cert: cert_path,
                key: key_path,
            })
        }
        (Some(key), Some(pem)) => {
            let bad = |reason: String| CaError::BadCertFile {
                path: cert_path.clone(),
                reason,
            };
            let mut certs = parse_pem_certs(&pem).map_err(|e| bad(e.to_string()))?;
            if certs.len() != 1 {
                return Err(bad(format!(
                    "expected exactly one certificate, found {}",
                    certs.len()
                )));
            }
            (key, certs.remove(0))
        }
    };

    let cert = parse_cert(&cert_der, &cert_path)?;
    check_ca_cert(&cert, &key, &cert_path, &key_path)?;
    check_trust_domain_uri(config, &cert_der, &cert_path)?;
    match KeyType::of(key.algorithm()) {
        Some(t) if t == config.key_type => {}
        found => tracing::warn!(
            configured = %config.key_type,
            found = found.map_or("other", KeyType::as_str),
            key = %key_path.display(),
            "the existing root key is not of the configured key type; keeping it \
             (the key type only applies when a new root is created)"
        ),
    }
    let validity = cert.validity();
    let not_after = validity.not_after.to_datetime();
    let life = not_after - validity.not_before.to_datetime();
    if not_after - OffsetDateTime::now_utc() < life / 10 {
        tracing::warn!(
            cert = %cert_path.display(),
            not_after = %not_after,
            "the self-signed root CA expires soon; SVIDs are capped at its expiry"
        );
    }
    Ok(SigningMaterial {
        key,
        cert_der: cert_der.clone(),
        chain_tail: Vec::new(),
        authorities: vec![cert_der],
        not_after,
    })
}

/// A self-signed root: CA=true (critical), keyCertSign+cRLSign (critical), the trust domain ID as
/// URI SAN, SKI, random serial, NotBefore `now` back-dated, NotAfter `now` + `ca_ttl`.
pub(crate) fn new_root_cert(
    config: &CaConfig,
    key: &KeyPair,
    now: i64,
) -> Result<Vec<u8>, CaError> {
    let now = OffsetDateTime::from_unix_timestamp(now)
        .map_err(|e| CaError::Signing(format!("time out of range: {e}")))?;
    let mut p = CertificateParams::default();
    let mut dn = config.base_dn()?;
    let cn = format!("{} CA", config.trust_domain);
    dn.push(
        DnType::CommonName,
        if cn.len() <= 64 {
            cn
        } else {
            "Sigil CA".to_string()
        },
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let uri = config
        .trust_domain
        .id_string()
        .try_into()
        .map_err(|e| CaError::InvalidConfig(format!("trust domain ID as URI SAN: {e}")))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.not_before = now - BACKDATE;
    p.not_after = now + config.ca_ttl;
    p.serial_number = Some(random_serial().into());
    let cert = p
        .self_signed(key)
        .map_err(|e| CaError::Signing(format!("self-signed root: {e}")))?;
    Ok(cert.der().to_vec())
}
