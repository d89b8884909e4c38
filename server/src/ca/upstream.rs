//! Upstream mode: sign with an intermediate CA issued by another PKI.
//!
//! `cert_chain_path` holds the intermediate first, then any further intermediates;
//! `bundle_path` holds the upstream root(s), which become this trust domain's X.509 bundle.
//! The key must match the intermediate, the intermediate must be a CA valid now, and the chain
//! must verify up to a bundle root (the latter is checked end to end by the start-up self-test,
//! which verifies a probe SVID with `rustls-webpki`).

use std::io::ErrorKind;
use std::path::Path;

use sigil::x509::{parse_pem_certs, spiffe_id_of};

use super::keys;
use super::{check_ca_cert, parse_cert, CaConfig, CaError, SigningMaterial, UpstreamConfig};

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let pem = keys::read_text_file(path)?
        .ok_or_else(|| CaError::io("read", path, std::io::Error::from(ErrorKind::NotFound)))?;
    parse_pem_certs(&pem).map_err(|e| CaError::BadCertFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(crate) fn load(config: &CaConfig, up: &UpstreamConfig) -> Result<SigningMaterial, CaError> {
    let chain = read_certs(&up.cert_chain_path)?;
    let roots = read_certs(&up.bundle_path)?;
    let key = keys::load_key_file(&up.key_path)?.ok_or_else(|| {
        CaError::io(
            "read",
            &up.key_path,
            std::io::Error::from(ErrorKind::NotFound),
        )
    })?;
    let signing_der = chain[0].clone();
    let signing = parse_cert(&signing_der, &up.cert_chain_path)?;
    check_ca_cert(&signing, &key, &up.cert_chain_path, &up.key_path)?;

    // SPIFFE: a signing certificate SHOULD carry the trust domain ID (and MUST NOT have a path).
    match spiffe_id_of(&signing_der) {
        Ok(id) if id.path().is_empty() && id.is_member_of(&config.trust_domain) => {}
        Ok(id) => tracing::warn!(
            cert = %up.cert_chain_path.display(),
            found = %id,
            expected = %config.trust_domain.id_string(),
            "upstream CA certificate carries a different SPIFFE ID than this trust domain's"
        ),
        Err(_) => tracing::debug!(
            cert = %up.cert_chain_path.display(),
            "upstream CA certificate has no SPIFFE ID (allowed)"
        ),
    }

    let mut not_after = signing.validity().not_after.to_datetime();
    let mut tail = Vec::with_capacity(chain.len());
    if !roots.contains(&signing_der) {
        tail.push(signing_der.clone());
    }
    for der in &chain[1..] {
        if roots.contains(der) {
            continue; // Roots travel in the bundle, not in SVID chains.
        }
        let c = parse_cert(der, &up.cert_chain_path)?;
        if !c.is_ca() {
            return Err(CaError::NotACa {
                path: up.cert_chain_path.clone(),
                reason: format!("chain certificate {} is not a CA", c.subject()),
            });
        }
        not_after = not_after.min(c.validity().not_after.to_datetime());
        tail.push(der.clone());
    }
    tracing::info!(
        cert = %up.cert_chain_path.display(),
        bundle = %up.bundle_path.display(),
        intermediates = tail.len(),
        roots = roots.len(),
        "loaded upstream CA"
    );
    Ok(SigningMaterial {
        key,
        cert_der: signing_der,
        chain_tail: tail,
        authorities: roots,
        not_after,
    })
}
