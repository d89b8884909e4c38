//! X.509 helpers both sides need: PEM <-> DER, concatenated-DER splitting, and X509-SVID checks.
//!
//! Parsing is done with `x509-parser`, chain verification with `rustls-webpki`; nothing here
//! decodes ASN.1 by hand. [`check_x509_svid`] enforces the leaf rules of the SPIFFE X509-SVID
//! specification (section 4 and 5.2); [`verify_x509_svid`] adds RFC 5280 path validation against
//! a trust bundle.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// Why certificate material is unusable; each variant names one broken rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// The PEM text contained no `CERTIFICATE` block.
    #[error("no PEM \"CERTIFICATE\" block found; expected -----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----")]
    NoCertificates,
    /// A PEM block could not be decoded.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// The bytes are not a DER X.509 certificate.
    #[error("certificate #{index} is not a valid DER X.509 certificate: {reason}")]
    Der {
        /// Position of the certificate in its input (0-based).
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// The input was empty where at least one certificate was required.
    #[error("no certificate data (input is empty)")]
    Empty,
    /// The certificate has no URI SAN, so it carries no SPIFFE ID.
    #[error("certificate has no URI subject alternative name, so it carries no SPIFFE ID")]
    NoUriSan,
    /// The certificate has more than one URI SAN (X509-SVID spec 5.2 forbids it).
    #[error(
        "certificate has {0} URI subject alternative names; an X509-SVID must have exactly one"
    )]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId {
        /// The URI as found in the certificate.
        uri: String,
        /// The SPIFFE-ID rule it broke.
        reason: SpiffeIdError,
    },
    /// A leaf SVID whose SPIFFE ID has no path (only signing certificates may have that).
    #[error("leaf X509-SVID has SPIFFE ID {0} without a path; leaf SVIDs need a non-root path")]
    RootIdInLeaf(String),
    /// A leaf with `cA=true` in basicConstraints.
    #[error(
        "certificate is a CA (basicConstraints cA=true); an X509-SVID leaf must have cA=false"
    )]
    LeafIsCa,
    /// A leaf without the keyUsage extension.
    #[error("certificate has no keyUsage extension; X509-SVIDs must carry a critical keyUsage")]
    NoKeyUsage,
    /// keyUsage present but not marked critical.
    #[error("keyUsage extension is not marked critical; the X509-SVID spec requires it")]
    KeyUsageNotCritical,
    /// keyUsage lacks digitalSignature.
    #[error("keyUsage lacks digitalSignature, which every leaf X509-SVID must set")]
    NoDigitalSignature,
    /// keyUsage has keyCertSign on a leaf.
    #[error("keyUsage has keyCertSign set; a leaf X509-SVID must not")]
    KeyCertSign,
    /// keyUsage has cRLSign on a leaf.
    #[error("keyUsage has cRLSign set; a leaf X509-SVID must not")]
    CrlSign,
    /// extendedKeyUsage present without both serverAuth and clientAuth.
    #[error(
        "extendedKeyUsage is present but lacks {0}; X509-SVIDs need both serverAuth and clientAuth"
    )]
    MissingEku(&'static str),
    /// Path validation against the bundle failed.
    #[error("certificate chain does not verify against the trust bundle for {usage}: {reason}")]
    Untrusted {
        /// `client-auth` or `server-auth`.
        usage: &'static str,
        /// What the path validator reported.
        reason: String,
    },
}

/// A PEM parse error as a readable sentence: `rustls-pki-types` prints the marker or line it
/// stumbled on as an array of byte values (`[67, 69, 82, …]`).
pub fn pem_error_text(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "a PEM block has no \"-----END {}-----\" line (is the file cut short?)",
            crate::text::truncate_for_display(&String::from_utf8_lossy(end_marker), 64)
        ),
        E::IllegalSectionStart { line } => format!(
            "malformed PEM line {} (expected -----BEGIN <LABEL>-----)",
            crate::text::quote_for_display(&String::from_utf8_lossy(line))
        ),
        E::Base64Decode(why) => format!("a PEM block is not valid base64: {why}"),
        other => other.to_string(),
    }
}

/// A PEM parse error that displays as [`pem_error_text`] does.
///
/// It has no `source()`: the wrapped error's own message shows marker lines as byte arrays, and
/// an error chain printed for users would repeat it. Code that needs it reads [`PemError::get`].
#[derive(Debug)]
pub struct PemError(rustls_pki_types::pem::Error);

impl PemError {
    /// The parser's error.
    pub fn get(&self) -> &rustls_pki_types::pem::Error {
        &self.0
    }
}

impl From<rustls_pki_types::pem::Error> for PemError {
    fn from(e: rustls_pki_types::pem::Error) -> Self {
        Self(e)
    }
}

impl std::fmt::Display for PemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&pem_error_text(&self.0))
    }
}

impl std::error::Error for PemError {}

/// Parses every `CERTIFICATE` block of a PEM text into DER; other block types are skipped.
///
/// Errors when there is no certificate, a block is not valid base64, or a block is not a
/// parseable X.509 certificate.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut out = Vec::new();
    for (index, item) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let der = item.map_err(|e| X509Error::Pem(pem_error_text(&e)))?;
        parse_one(&der, index)?;
        out.push(der.to_vec());
    }
    if out.is_empty() {
        return Err(X509Error::NoCertificates);
    }
    Ok(out)
}

/// Encodes DER certificates as concatenated PEM `CERTIFICATE` blocks (64-column base64).
pub fn to_pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter().map(|d| to_pem("CERTIFICATE", d)).collect()
}

/// One PEM block with `label` (e.g. `PRIVATE KEY` for PKCS#8), 64-column base64.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    let mut out = format!("-----BEGIN {label}-----\n");
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Splits concatenated DER certificates (the Workload API's bundle and chain encoding).
pub fn split_der_concat(mut der: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    if der.is_empty() {
        return Err(X509Error::Empty);
    }
    let mut out = Vec::new();
    while !der.is_empty() {
        let index = out.len();
        let (rest, _) = x509_parser::parse_x509_certificate(der).map_err(|e| X509Error::Der {
            index,
            reason: e.to_string(),
        })?;
        let used = der.len() - rest.len();
        out.push(der[..used].to_vec());
        der = rest;
    }
    Ok(out)
}

/// Parses exactly one DER certificate, rejecting trailing bytes.
fn parse_one(der: &[u8], index: usize) -> Result<X509Certificate<'_>, X509Error> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| X509Error::Der {
        index,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(X509Error::Der {
            index,
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

/// The SPIFFE ID of a certificate: its single URI SAN, validated.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, X509Error> {
    let cert = parse_one(cert_der, 0)?;
    spiffe_id_of_parsed(&cert)
}

fn spiffe_id_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| X509Error::Der {
            index: 0,
            reason: format!("bad subjectAltName extension: {e}"),
        })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(X509Error::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|reason| X509Error::InvalidSpiffeId {
            uri: uri.chars().take(256).collect(),
            reason,
        }),
        more => Err(X509Error::MultipleUriSans(more.len())),
    }
}

/// Checks a leaf certificate against the X509-SVID rules and returns its SPIFFE ID.
///
/// Rules: exactly one URI SAN that is a SPIFFE ID with a path; basicConstraints cA=false (or
/// absent); keyUsage present, critical, with digitalSignature and without keyCertSign/cRLSign;
/// extendedKeyUsage, when present, with both serverAuth and clientAuth.
pub fn check_x509_svid(leaf_der: &[u8]) -> Result<SpiffeId, X509Error> {
    let cert = parse_one(leaf_der, 0)?;
    let id = spiffe_id_of_parsed(&cert)?;
    if id.path().is_empty() {
        return Err(X509Error::RootIdInLeaf(id.to_string()));
    }
    let bad_ext = |e: x509_parser::error::X509Error| X509Error::Der {
        index: 0,
        reason: format!("bad extension: {e}"),
    };
    if let Some(bc) = cert.basic_constraints().map_err(bad_ext)? {
        if bc.value.ca {
            return Err(X509Error::LeafIsCa);
        }
    }
    let ku = cert
        .key_usage()
        .map_err(bad_ext)?
        .ok_or(X509Error::NoKeyUsage)?;
    if !ku.critical {
        return Err(X509Error::KeyUsageNotCritical);
    }
    if ku.value.key_cert_sign() {
        return Err(X509Error::KeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(X509Error::CrlSign);
    }
    if !ku.value.digital_signature() {
        return Err(X509Error::NoDigitalSignature);
    }
    if let Some(eku) = cert.extended_key_usage().map_err(bad_ext)? {
        if !eku.value.server_auth {
            return Err(X509Error::MissingEku("serverAuth"));
        }
        if !eku.value.client_auth {
            return Err(X509Error::MissingEku("clientAuth"));
        }
    }
    Ok(id)
}

/// Verifies an X509-SVID chain (leaf first, then intermediates) against trust-bundle roots at
/// `now`, for both client-auth and server-auth use, and checks the leaf rules.
pub fn verify_x509_svid(
    chain_der: &[Vec<u8>],
    roots_der: &[Vec<u8>],
    now: SystemTime,
) -> Result<SpiffeId, X509Error> {
    let (leaf, intermediates) = chain_der.split_first().ok_or(X509Error::Empty)?;
    let id = check_x509_svid(leaf)?;
    let untrusted = |usage: &'static str, reason: String| X509Error::Untrusted { usage, reason };
    let root_certs: Vec<CertificateDer<'_>> = roots_der
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_certs
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| untrusted("any", format!("bundle root is unusable: {e}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| untrusted("any", format!("leaf not accepted: {e}")))?;
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let time = UnixTime::since_unix_epoch(secs);
    for (name, usage) in [
        ("client-auth", webpki::KeyUsage::client_auth()),
        ("server-auth", webpki::KeyUsage::server_auth()),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            time,
            usage,
            None,
            None,
        )
        .map_err(|e| untrusted(name, e.to_string()))?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn uri(s: &str) -> Result<SanType, rcgen::Error> {
        Ok(SanType::URI(s.try_into()?))
    }

    /// A valid SVID's params; tests spoil one property at a time.
    fn good_params() -> Result<CertificateParams, rcgen::Error> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri("spiffe://example.org/web")?];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(p)
    }

    struct TestCa {
        cert_der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn test_ca() -> Result<TestCa, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![uri("spiffe://example.org")?];
        let cert = p.self_signed(&key)?;
        Ok(TestCa {
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        })
    }

    fn sign(p: &CertificateParams, ca: &TestCa) -> Result<Vec<u8>, rcgen::Error> {
        let key = KeyPair::generate()?;
        Ok(p.signed_by(&key, &ca.issuer)?.der().to_vec())
    }

    #[test]
    fn good_leaf_passes_and_verifies() -> TestResult {
        let ca = test_ca()?;
        let leaf = sign(&good_params()?, &ca)?;
        assert_eq!(
            check_x509_svid(&leaf)?.to_string(),
            "spiffe://example.org/web"
        );
        assert_eq!(spiffe_id_of(&leaf)?.to_string(), "spiffe://example.org/web");
        let id = verify_x509_svid(
            std::slice::from_ref(&leaf),
            std::slice::from_ref(&ca.cert_der),
            SystemTime::now(),
        )?;
        assert_eq!(id.path(), "/web");
        // Another root does not verify it.
        let other = test_ca()?;
        let err = verify_x509_svid(&[leaf], &[other.cert_der], SystemTime::now())
            .err()
            .ok_or("expected an error")?;
        assert!(matches!(err, X509Error::Untrusted { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn each_bad_leaf_has_its_own_error() -> TestResult {
        let ca = test_ca()?;
        type Spoil = Box<dyn Fn(&mut CertificateParams) -> Result<(), rcgen::Error>>;
        let cases: Vec<(&str, Spoil, X509Error)> = vec![
            (
                "no URI SAN",
                Box::new(|p| {
                    p.subject_alt_names = vec![SanType::DnsName("a.example".try_into()?)];
                    Ok(())
                }),
                X509Error::NoUriSan,
            ),
            (
                "two URI SANs",
                Box::new(|p| {
                    p.subject_alt_names.push(uri("spiffe://example.org/db")?);
                    Ok(())
                }),
                X509Error::MultipleUriSans(2),
            ),
            (
                "CA=true",
                Box::new(|p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    Ok(())
                }),
                X509Error::LeafIsCa,
            ),
            (
                "keyCertSign",
                Box::new(|p| {
                    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
                    Ok(())
                }),
                X509Error::KeyCertSign,
            ),
            (
                "cRLSign",
                Box::new(|p| {
                    p.key_usages.push(KeyUsagePurpose::CrlSign);
                    Ok(())
                }),
                X509Error::CrlSign,
            ),
            (
                "no keyUsage",
                Box::new(|p| {
                    p.key_usages.clear();
                    Ok(())
                }),
                X509Error::NoKeyUsage,
            ),
            (
                "no digitalSignature",
                Box::new(|p| {
                    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
                    Ok(())
                }),
                X509Error::NoDigitalSignature,
            ),
            (
                "EKU without clientAuth",
                Box::new(|p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                    Ok(())
                }),
                X509Error::MissingEku("clientAuth"),
            ),
            (
                "root ID in leaf",
                Box::new(|p| {
                    p.subject_alt_names = vec![uri("spiffe://example.org")?];
                    Ok(())
                }),
                X509Error::RootIdInLeaf("spiffe://example.org".into()),
            ),
        ];
        for (name, spoil, want) in cases {
            let mut p = good_params()?;
            spoil(&mut p)?;
            let leaf = sign(&p, &ca)?;
            assert_eq!(check_x509_svid(&leaf), Err(want), "case {name}");
        }
        // Non-SPIFFE URI: the exact SpiffeIdError is the SPIFFE-ID module's business.
        let mut p = good_params()?;
        p.subject_alt_names = vec![uri("https://example.org/web")?];
        let err = check_x509_svid(&sign(&p, &ca)?)
            .err()
            .ok_or("expected an error")?;
        assert!(matches!(err, X509Error::InvalidSpiffeId { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn pem_round_trip_and_errors() -> TestResult {
        let a = test_ca()?.cert_der;
        let b = test_ca()?.cert_der;
        let pem = to_pem_certs(&[a.clone(), b.clone()]);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(parse_pem_certs(&pem)?, vec![a.clone(), b.clone()]);
        // A private-key block alongside is skipped.
        let key = KeyPair::generate()?.serialize_pem();
        assert_eq!(parse_pem_certs(&format!("{key}{pem}"))?.len(), 2);
        assert_eq!(parse_pem_certs(""), Err(X509Error::NoCertificates));
        assert_eq!(parse_pem_certs("garbage"), Err(X509Error::NoCertificates));
        assert_eq!(parse_pem_certs(&key), Err(X509Error::NoCertificates));
        let bad_b64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(parse_pem_certs(bad_b64), Err(X509Error::Pem(_))));
        let not_x509 = to_pem_certs(&[vec![0x30, 0x03, 0x02, 0x01, 0x01]]);
        assert!(matches!(
            parse_pem_certs(&not_x509),
            Err(X509Error::Der { index: 0, .. })
        ));
        Ok(())
    }

    #[test]
    fn pem_errors_are_readable_sentences() -> TestResult {
        let pem = to_pem_certs(&[test_ca()?.cert_der]);
        let truncated = &pem[..pem.len() / 2];
        let msg = parse_pem_certs(truncated).unwrap_err().to_string();
        assert_eq!(
            msg,
            "malformed PEM: a PEM block has no \"-----END CERTIFICATE-----\" line (is the file cut short?)"
        );
        let msg = parse_pem_certs("-----BEGIN CERTIFICATE--\nabc\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("malformed PEM line \"-----BEGIN CERTIFICATE--"),
            "{msg}"
        );
        // Never the byte arrays rustls-pki-types prints ([45, 45, 45, ...]).
        assert!(!msg.contains("45, 45"), "{msg}");
        let long = format!("-----BEGIN {}\n", "A".repeat(3000));
        let msg = parse_pem_certs(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
        Ok(())
    }

    #[test]
    fn der_concat_split() -> TestResult {
        let a = test_ca()?.cert_der;
        let b = test_ca()?.cert_der;
        let cat = [a.clone(), b.clone()].concat();
        assert_eq!(split_der_concat(&cat)?, vec![a.clone(), b]);
        assert_eq!(split_der_concat(&[]), Err(X509Error::Empty));
        let mut trailing = a.clone();
        trailing.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            split_der_concat(&trailing),
            Err(X509Error::Der { index: 1, .. })
        ));
        assert!(split_der_concat(&a[..a.len() - 1]).is_err());
        // Every prefix of a certificate fails cleanly (no panic).
        for end in 0..a.len() {
            assert!(split_der_concat(&a[..end]).is_err());
            assert!(check_x509_svid(&a[..end]).is_err());
        }
        Ok(())
    }
}
