//! An X509-SVID's private key as the cache holds it.
//!
//! An agent holds a key per entry, 100,000 and more. A P-256 key's PKCS#8 document (138 bytes,
//! the form the Workload API serves) is mostly fixed structure and the public key, which the
//! SVID's leaf certificate carries too: the cache keeps the 32-byte secret and where the public
//! key sits in the leaf, and rebuilds the document when it serves the SVID. The encodings are
//! the `sec1` and `pkcs8` crates'; a key is held this way only when the rebuilt document is
//! byte for byte the one the key was generated as, any other key as its PKCS#8 bytes.

use pkcs8::der::{Decode as _, Encode as _};
use pkcs8::ObjectIdentifier;

/// `id-ecPublicKey` (RFC 5480): the PKCS#8 algorithm of an EC key.
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (P-256).
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// A private key, compact when it can be rebuilt from its secret and its leaf certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum HeldKey {
    /// A P-256 key: the secret scalar, and the offset and length of the public key point in
    /// the leaf certificate it was issued with.
    P256 {
        /// The secret scalar.
        secret: [u8; 32],
        /// Offset of the public key point in the leaf (DER).
        public_at: u16,
        /// Length of the point (65 bytes uncompressed).
        public_len: u8,
        /// The SEC1 structure names its curve too (some encoders add it; ring does not).
        curve_in_sec1: bool,
    },
    /// Any other key, as generated (PKCS#8 DER).
    Pkcs8(Box<[u8]>),
}

impl std::fmt::Debug for HeldKey {
    // Key material stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldKey::P256 { .. } => f.write_str("HeldKey::P256(..)"),
            HeldKey::Pkcs8(_) => f.write_str("HeldKey::Pkcs8(..)"),
        }
    }
}

impl HeldKey {
    /// Holds `pkcs8`, the key of the certificate `leaf` (DER): compact when its PKCS#8
    /// document can be rebuilt exactly from the secret and `leaf`, as given otherwise.
    pub fn new(pkcs8: Vec<u8>, leaf: &[u8]) -> Self {
        match Self::compact(&pkcs8, leaf) {
            Some(held) if held.pkcs8_der(leaf).as_deref() == Some(pkcs8.as_slice()) => held,
            _ => HeldKey::Pkcs8(pkcs8.into_boxed_slice()),
        }
    }

    fn compact(pkcs8: &[u8], leaf: &[u8]) -> Option<Self> {
        let info = pkcs8::PrivateKeyInfo::from_der(pkcs8).ok()?;
        if info.algorithm.oid != ID_EC_PUBLIC_KEY
            || info.algorithm.parameters_oid().ok()? != SECP256R1
            || info.public_key.is_some()
        {
            return None;
        }
        let ec = sec1::EcPrivateKey::from_der(info.private_key).ok()?;
        let secret: [u8; 32] = ec.private_key.try_into().ok()?;
        let curve_in_sec1 = match ec.parameters {
            None => false,
            Some(p) if p.named_curve() == Some(SECP256R1) => true,
            Some(_) => return None,
        };
        let public = ec.public_key?;
        let first = *public.first()?;
        let public_at = leaf
            .windows(public.len())
            .position(|w| w[0] == first && w == public)?;
        Some(HeldKey::P256 {
            secret,
            public_at: u16::try_from(public_at).ok()?,
            public_len: u8::try_from(public.len()).ok()?,
            curve_in_sec1,
        })
    }

    /// The PKCS#8 DER document, given the leaf certificate the key was held with; `None` only
    /// when `leaf` is not that certificate.
    pub fn pkcs8_der(&self, leaf: &[u8]) -> Option<Vec<u8>> {
        match self {
            HeldKey::Pkcs8(der) => Some(der.to_vec()),
            HeldKey::P256 {
                secret,
                public_at,
                public_len,
                curve_in_sec1,
            } => {
                let at = usize::from(*public_at);
                let public = leaf.get(at..at + usize::from(*public_len))?;
                let ec = sec1::EcPrivateKey {
                    private_key: secret,
                    parameters: curve_in_sec1.then_some(sec1::EcParameters::NamedCurve(SECP256R1)),
                    public_key: Some(public),
                };
                let ec_der = ec.to_der().ok()?;
                let info = pkcs8::PrivateKeyInfo {
                    algorithm: pkcs8::AlgorithmIdentifierRef {
                        oid: ID_EC_PUBLIC_KEY,
                        parameters: Some((&SECP256R1).into()),
                    },
                    private_key: &ec_der,
                    public_key: None,
                };
                info.to_der().ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 key as the agent generates one, and a certificate for it.
    fn key_and_leaf() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["w.example.org".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (key.serialize_der(), cert.der().to_vec())
    }

    #[test]
    fn a_p256_key_is_held_as_its_secret_and_rebuilt_exactly() {
        for _ in 0..20 {
            let (pkcs8, leaf) = key_and_leaf();
            let held = HeldKey::new(pkcs8.clone(), &leaf);
            assert!(matches!(held, HeldKey::P256 { .. }), "{held:?}");
            assert_eq!(held.pkcs8_der(&leaf), Some(pkcs8.clone()));
            // What rustls and the SPIFFE clients parse.
            assert!(
                rcgen::KeyPair::try_from(held.pkcs8_der(&leaf).unwrap_or_default().as_slice())
                    .is_ok()
            );
        }
    }

    /// `der` held with `leaf` is kept as given and given back.
    fn assert_held_whole(der: Vec<u8>, leaf: &[u8]) {
        let held = HeldKey::new(der.clone(), leaf);
        assert_eq!(held, HeldKey::Pkcs8(der.clone().into_boxed_slice()));
        assert_eq!(held.pkcs8_der(leaf), Some(der));
    }

    #[test]
    fn a_key_its_leaf_does_not_carry_is_held_whole() {
        let (pkcs8, _) = key_and_leaf();
        let (_, other_leaf) = key_and_leaf();
        assert_held_whole(pkcs8, &other_leaf);
    }

    #[test]
    fn other_keys_and_garbage_are_held_whole() {
        let (_, leaf) = key_and_leaf();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        for der in [
            ed.serialize_der(),
            p384.serialize_der(),
            vec![0x30, 0x03, 0x02, 0x01],
            vec![],
        ] {
            assert_held_whole(der, &leaf);
        }
    }

    #[test]
    fn a_compact_key_needs_its_own_leaf() {
        let (pkcs8, leaf) = key_and_leaf();
        let held = HeldKey::new(pkcs8, &leaf);
        assert_eq!(held.pkcs8_der(&leaf[..10]), None);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let (pkcs8, leaf) = key_and_leaf();
        let held = HeldKey::new(pkcs8, &leaf);
        assert_eq!(format!("{held:?}"), "HeldKey::P256(..)");
    }
}
