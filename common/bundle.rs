//! Trust bundles: the X.509 roots and JWT signing keys of one trust domain, in PEM, concatenated
//! DER and the SPIFFE bundle format (a JWK Set, SPIFFE Trust Domain and Bundle spec section 4).
//!
//! In the SPIFFE format X.509 authorities are JWKs with `"use":"x509-svid"`, exactly one
//! certificate in `x5c` and no `kid` (X509-SVID spec 6.1); JWT authorities are JWKs with
//! `"use":"jwt-svid"` and a mandatory `kid` (JWT-SVID spec 6). The set carries
//! `spiffe_sequence` and `spiffe_refresh_hint`. Parsing ignores unknown members, key types and
//! uses (as the spec requires) but rejects malformed values of what it does use.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::jose::{str_member, strip_zeros};
pub use crate::jose::{EcCurve, JwkPublicKey};
use crate::spiffe_id::TrustDomain;
use crate::x509::to_pem_certs;

/// JWK `use` of X.509 CA certificates.
pub const USE_X509_SVID: &str = "x509-svid";
/// JWK `use` of JWT-SVID signing keys.
pub const USE_JWT_SVID: &str = "jwt-svid";

const B64STD_CONFIG: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
/// Standard base64 (`x5c` uses it, RFC 7517 4.7), padding optional on input.
const B64STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, B64STD_CONFIG);

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";

/// A DER parse error of `x509-parser`.
type DerError = x509_parser::nom::Err<x509_parser::error::X509Error>;

/// Why bundle material could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not JSON at all.
    #[error("bundle is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Valid JSON but not of the expected shape.
    #[error("bundle JSON is malformed: {0}")]
    Malformed(&'static str),
    /// A field of one key is missing or has a bad value.
    #[error("bundle key #{index}: {source}")]
    BadKey {
        /// Position in `keys` (0-based).
        index: usize,
        /// What is wrong with it.
        #[source]
        source: BundleKeyError,
    },
    /// Two JWT authorities share a `kid`.
    #[error("bundle has two JWT authorities with kid {0:?}; key IDs must be unique")]
    DuplicateKid(String),
    /// A public key of a type a JWK cannot carry here.
    #[error("unsupported public key: {0} (supported: EC P-256/P-384, RSA, Ed25519)")]
    UnsupportedKey(#[source] SpkiError),
    /// An X.509 authority that is not a parseable certificate.
    #[error("X.509 authority #{index} is not a valid certificate: {source}")]
    BadCertificate {
        /// Position in `x509_authorities` (0-based).
        index: usize,
        /// What the parser reported.
        #[source]
        source: DerError,
    },
    /// An X.509 authority with bytes after its certificate.
    #[error(
        "X.509 authority #{index} is not a valid certificate: trailing bytes after the certificate"
    )]
    TrailingBytes {
        /// Position in `x509_authorities` (0-based).
        index: usize,
    },
}

/// What is wrong with one key of a bundle document ([`BundleError::BadKey`]).
#[derive(Debug, thiserror::Error)]
pub enum BundleKeyError {
    /// The key is not a JSON object.
    #[error("a key must be a JSON object")]
    NotObject,
    /// `x5c` is not an array.
    #[error("\"x5c\" must be an array of base64 strings")]
    X5cNotArray,
    /// An `x5c` entry is not a string.
    #[error("\"x5c\" entries must be base64 strings")]
    X5cNotString,
    /// The `x5c` certificate is not base64.
    #[error("\"x5c\" is not valid base64: {0}")]
    X5cBase64(#[source] base64::DecodeError),
    /// The `x5c` certificate has bytes after it.
    #[error("\"x5c\" certificate has trailing bytes")]
    X5cTrailingBytes,
    /// The `x5c` entry is not a DER certificate.
    #[error("\"x5c\" is not a DER X.509 certificate: {0}")]
    X5cCertificate(#[source] DerError),
    /// A `jwt-svid` key without a string `kid`.
    #[error("jwt-svid keys must have a string \"kid\"")]
    NoKid,
    /// An empty `kid`.
    #[error("\"kid\" must not be empty")]
    EmptyKid,
    /// `use` or a key parameter is missing or malformed.
    #[error("{0}")]
    Jwk(#[source] crate::jose::JwkError),
}

/// Why a SubjectPublicKeyInfo cannot be a JWK here ([`BundleError::UnsupportedKey`]).
#[derive(Debug, thiserror::Error)]
pub enum SpkiError {
    /// Not a DER SubjectPublicKeyInfo.
    #[error("bad SubjectPublicKeyInfo: {0}")]
    Der(#[source] DerError),
    /// Bytes after the SubjectPublicKeyInfo.
    #[error("trailing bytes after SubjectPublicKeyInfo")]
    TrailingBytes,
    /// An EC curve other than P-256 and P-384 (its OID).
    #[error("EC curve {0:?}")]
    EcCurve(String),
    /// An EC point that is compressed or of the wrong size.
    #[error("EC point is not an uncompressed point of the curve's size")]
    EcPoint,
    /// An RSA key that does not parse.
    #[error("malformed RSA public key")]
    Rsa,
    /// An Ed25519 key that is not 32 bytes.
    #[error("Ed25519 key is not 32 bytes")]
    Ed25519Length,
    /// Another key algorithm (its OID).
    #[error("key algorithm {0}")]
    Algorithm(String),
}

impl JwkPublicKey {
    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self, BundleError> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| BundleError::UnsupportedKey(SpkiError::Der(e)))?;
        if !rest.is_empty() {
            return Err(BundleError::UnsupportedKey(SpkiError::TrailingBytes));
        }
        Self::from_spki(&spki)
    }

    /// Reads an already parsed SubjectPublicKeyInfo (EC P-256/P-384 uncompressed points, RSA,
    /// Ed25519), validating the key's shape.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, BundleError> {
        let alg = spki.algorithm.algorithm.to_id_string();
        let unsupported = BundleError::UnsupportedKey;
        match alg.as_str() {
            OID_EC_PUBLIC_KEY => {
                let curve_oid = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                let curve = match curve_oid.as_str() {
                    OID_P256 => EcCurve::P256,
                    OID_P384 => EcCurve::P384,
                    other => return Err(unsupported(SpkiError::EcCurve(other.to_string()))),
                };
                let point = spki.subject_public_key.data.as_ref();
                let n = curve.coord_len();
                if point.len() != 1 + 2 * n || point[0] != 0x04 {
                    return Err(unsupported(SpkiError::EcPoint));
                }
                Ok(JwkPublicKey::Ec {
                    curve,
                    x: point[1..=n].to_vec(),
                    y: point[1 + n..].to_vec(),
                })
            }
            OID_RSA_ENCRYPTION => match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => Ok(JwkPublicKey::Rsa {
                    n: strip_zeros(rsa.modulus),
                    e: strip_zeros(rsa.exponent),
                }),
                _ => Err(unsupported(SpkiError::Rsa)),
            },
            OID_ED25519 => {
                let x = spki.subject_public_key.data.to_vec();
                if x.len() != 32 {
                    return Err(unsupported(SpkiError::Ed25519Length));
                }
                Ok(JwkPublicKey::Ed25519 { x })
            }
            other => Err(unsupported(SpkiError::Algorithm(other.to_string()))),
        }
    }
}

/// A JWT-SVID signing public key with its key ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtAuthority {
    /// The `kid` tokens name in their header.
    pub kid: String,
    /// The public key.
    pub key: JwkPublicKey,
}

impl JwtAuthority {
    /// A JWT authority from a key ID and a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(kid: impl Into<String>, spki_der: &[u8]) -> Result<Self, BundleError> {
        Ok(Self {
            kid: kid.into(),
            key: JwkPublicKey::from_spki_der(spki_der)?,
        })
    }

    /// The JWK object (`"use":"jwt-svid"`, `kid`, key parameters).
    pub fn to_jwk(&self) -> Value {
        let mut m = Map::new();
        m.insert("use".into(), USE_JWT_SVID.into());
        m.insert("kid".into(), self.kid.clone().into());
        self.key.write_jwk(&mut m);
        Value::Object(m)
    }
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Whose bundle this is.
    pub trust_domain: TrustDomain,
    /// X.509 CA certificates (DER), the roots X509-SVIDs chain to.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT-SVID signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: increases whenever the content changes.
    pub sequence_number: u64,
    /// `spiffe_refresh_hint` in seconds, if advertised.
    pub refresh_hint: Option<u64>,
}

impl Bundle {
    /// An empty bundle (sequence 0, no refresh hint).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// The JWT authority with key ID `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }

    /// The X.509 authorities as PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        to_pem_certs(&self.x509_authorities)
    }

    /// The X.509 authorities as concatenated DER (the Workload API's bundle encoding).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The document in the SPIFFE bundle format. Errors only if an X.509 authority is not a
    /// certificate or has a key a JWK cannot represent.
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for (index, der) in self.x509_authorities.iter().enumerate() {
            let (rest, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|source| BundleError::BadCertificate { index, source })?;
            if !rest.is_empty() {
                return Err(BundleError::TrailingBytes { index });
            }
            let key = JwkPublicKey::from_spki(cert.public_key())?;
            let mut m = Map::new();
            m.insert("use".into(), USE_X509_SVID.into());
            key.write_jwk(&mut m);
            m.insert("x5c".into(), json!([B64STD.encode(der)]));
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_authorities.iter().map(JwtAuthority::to_jwk));
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), self.sequence_number.into());
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.into());
        }
        Ok(Value::Object(doc).to_string())
    }

    /// The JWKS of the JWT authorities only: `{"keys":[...]}` as FetchJWTBundles sends it.
    pub fn jwks_json(&self) -> String {
        json!({ "keys": self.jwt_keys() }).to_string()
    }

    /// The JWT authorities as a bare JSON array of JWKs (a storage form).
    pub fn jwt_keys_json(&self) -> String {
        Value::Array(self.jwt_keys()).to_string()
    }

    fn jwt_keys(&self) -> Vec<Value> {
        self.jwt_authorities
            .iter()
            .map(JwtAuthority::to_jwk)
            .collect()
    }

    /// Parses a SPIFFE bundle document for trust domain `td`.
    pub fn from_spiffe_json(td: TrustDomain, json: &str) -> Result<Bundle, BundleError> {
        let doc: Value = serde_json::from_str(json).map_err(BundleError::Json)?;
        let obj = doc
            .as_object()
            .ok_or(BundleError::Malformed("top level must be a JSON object"))?;
        let keys = obj
            .get("keys")
            .ok_or(BundleError::Malformed("missing \"keys\""))?
            .as_array()
            .ok_or(BundleError::Malformed("\"keys\" must be an array"))?;
        let sequence_number = match obj.get("spiffe_sequence") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or(BundleError::Malformed(
                "\"spiffe_sequence\" must be a non-negative integer",
            ))?,
        };
        let refresh_hint = match obj.get("spiffe_refresh_hint") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or(BundleError::Malformed(
                "\"spiffe_refresh_hint\" must be a non-negative integer (seconds)",
            ))?),
        };
        let mut bundle = Bundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number,
            refresh_hint,
        };
        for (index, key) in keys.iter().enumerate() {
            let bad = |source: BundleKeyError| BundleError::BadKey { index, source };
            let m = key
                .as_object()
                .ok_or_else(|| bad(BundleKeyError::NotObject))?;
            match str_member(m, "use").map_err(|e| bad(BundleKeyError::Jwk(e)))? {
                USE_X509_SVID => {
                    if let Some(der) = read_x5c(m).map_err(bad)? {
                        bundle.x509_authorities.push(der);
                    }
                }
                USE_JWT_SVID => {
                    if let Some(auth) = read_jwt_authority(m).map_err(bad)? {
                        push_unique(&mut bundle.jwt_authorities, auth)?;
                    }
                }
                _ => {} // Unknown use: ignored, as the spec requires.
            }
        }
        Ok(bundle)
    }

    /// Parses JWT authorities from a JWKS (`{"keys":[...]}`) or a bare JWK array; keys with
    /// another `use` are ignored.
    pub fn jwt_authorities_from_json(json: &str) -> Result<Vec<JwtAuthority>, BundleError> {
        let doc: Value = serde_json::from_str(json).map_err(BundleError::Json)?;
        let keys = match &doc {
            Value::Array(a) => a,
            Value::Object(o) => o
                .get("keys")
                .and_then(Value::as_array)
                .ok_or(BundleError::Malformed("missing \"keys\" array"))?,
            _ => return Err(BundleError::Malformed("expected a JWKS object or array")),
        };
        let mut out = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let bad = |source: BundleKeyError| BundleError::BadKey { index, source };
            let m = key
                .as_object()
                .ok_or_else(|| bad(BundleKeyError::NotObject))?;
            if m.get("use").and_then(Value::as_str) == Some(USE_JWT_SVID) {
                if let Some(auth) = read_jwt_authority(m).map_err(bad)? {
                    push_unique(&mut out, auth)?;
                }
            }
        }
        Ok(out)
    }
}

fn push_unique(list: &mut Vec<JwtAuthority>, auth: JwtAuthority) -> Result<(), BundleError> {
    if list.iter().any(|a| a.kid == auth.kid) {
        return Err(BundleError::DuplicateKid(auth.kid));
    }
    list.push(auth);
    Ok(())
}

fn read_x5c(m: &Map<String, Value>) -> Result<Option<Vec<u8>>, BundleKeyError> {
    // X509-SVID spec 6.2: no or empty x5c means the entry is ignored; only the first counts.
    let first = match m.get("x5c") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => match a.first() {
            None => return Ok(None),
            Some(v) => v,
        },
        Some(_) => return Err(BundleKeyError::X5cNotArray),
    };
    let b64 = first.as_str().ok_or(BundleKeyError::X5cNotString)?;
    let der = B64STD.decode(b64).map_err(BundleKeyError::X5cBase64)?;
    match x509_parser::parse_x509_certificate(&der) {
        Ok(([], _)) => Ok(Some(der)),
        Ok(_) => Err(BundleKeyError::X5cTrailingBytes),
        Err(e) => Err(BundleKeyError::X5cCertificate(e)),
    }
}

fn read_jwt_authority(m: &Map<String, Value>) -> Result<Option<JwtAuthority>, BundleKeyError> {
    let kid = str_member(m, "kid").map_err(|_| BundleKeyError::NoKid)?;
    if kid.is_empty() {
        return Err(BundleKeyError::EmptyKid);
    }
    Ok(JwkPublicKey::from_jwk(m)
        .map_err(BundleKeyError::Jwk)?
        .map(|key| JwtAuthority {
            kid: kid.to_string(),
            key,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData as _};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn td() -> Result<TrustDomain, crate::SpiffeIdError> {
        TrustDomain::new("example.org")
    }

    fn ca_der(alg: &'static rcgen::SignatureAlgorithm) -> Result<Vec<u8>, rcgen::Error> {
        let key = KeyPair::generate_for(alg)?;
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(p.self_signed(&key)?.der().to_vec())
    }

    fn sample() -> Result<Bundle, Box<dyn std::error::Error>> {
        let jwt = KeyPair::generate()?;
        let jwt384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
        Ok(Bundle {
            trust_domain: td()?,
            x509_authorities: vec![
                ca_der(&rcgen::PKCS_ECDSA_P256_SHA256)?,
                ca_der(&rcgen::PKCS_ECDSA_P384_SHA384)?,
                ca_der(&rcgen::PKCS_ED25519)?,
            ],
            jwt_authorities: vec![
                JwtAuthority::from_spki_der("k1", &jwt.subject_public_key_info())?,
                JwtAuthority::from_spki_der("k2", &jwt384.subject_public_key_info())?,
            ],
            sequence_number: 7,
            refresh_hint: Some(300),
        })
    }

    #[test]
    fn spiffe_json_round_trip_and_shape() -> TestResult {
        let b = sample()?;
        let json = b.to_spiffe_json()?;
        let back = Bundle::from_spiffe_json(td()?, &json)?;
        assert_eq!(back, b);

        let v: Value = serde_json::from_str(&json)?;
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().ok_or("keys")?;
        assert_eq!(keys.len(), 5);
        for k in &keys[..3] {
            assert_eq!(k["use"], "x509-svid");
            assert!(
                k.get("kid").is_none(),
                "x509-svid JWKs must not have a kid: {k}"
            );
            assert_eq!(k["x5c"].as_array().map(Vec::len), Some(1));
        }
        assert_eq!(keys[0]["kty"], "EC");
        assert_eq!(keys[0]["crv"], "P-256");
        assert_eq!(keys[1]["crv"], "P-384");
        assert_eq!(keys[2]["kty"], "OKP");
        for k in &keys[3..] {
            assert_eq!(k["use"], "jwt-svid");
            assert_eq!(k["kty"], "EC");
            assert!(k["kid"].is_string());
            assert!(k["x"].as_str().is_some_and(|x| !x.contains('=')));
        }
        // jwks_json carries only the JWT keys.
        let jwks: Value = serde_json::from_str(&b.jwks_json())?;
        assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            Bundle::jwt_authorities_from_json(&b.jwks_json())?,
            b.jwt_authorities
        );
        assert_eq!(
            Bundle::jwt_authorities_from_json(&b.jwt_keys_json())?,
            b.jwt_authorities
        );
        Ok(())
    }

    #[test]
    fn pem_and_der_forms() -> TestResult {
        let b = sample()?;
        assert_eq!(
            crate::x509::parse_pem_certs(&b.to_pem())?,
            b.x509_authorities
        );
        assert_eq!(
            crate::x509::split_der_concat(&b.x509_der_concat())?,
            b.x509_authorities
        );
        Ok(())
    }

    #[test]
    fn tolerant_of_unknowns() -> TestResult {
        let b = sample()?;
        let mut v: Value = serde_json::from_str(&b.to_spiffe_json()?)?;
        v["extra"] = json!({"a": 1});
        let keys = v["keys"].as_array_mut().ok_or("keys")?;
        keys.push(json!({"use": "wit-svid", "kty": "EC"}));
        keys.push(json!({"use": "jwt-svid", "kty": "oct", "kid": "sym", "k": "AAAA"}));
        keys.push(json!({"use": "jwt-svid", "kty": "EC", "crv": "P-521", "kid": "p521", "x": "", "y": ""}));
        keys.push(json!({"use": "x509-svid", "kty": "EC", "x5c": []}));
        keys[0]["alg"] = "ES256".into();
        let back = Bundle::from_spiffe_json(td()?, &v.to_string())?;
        assert_eq!(back, b);
        // Minimal document.
        let empty = Bundle::from_spiffe_json(td()?, r#"{"keys":[]}"#)?;
        assert_eq!(empty, Bundle::new(td()?));
        Ok(())
    }

    #[test]
    fn malformed_inputs_are_errors() -> TestResult {
        let good = sample()?.to_spiffe_json()?;
        let v: Value = serde_json::from_str(&good)?;
        let x509_key = v["keys"][0].clone();
        let jwt_key = v["keys"][3].clone();
        let with_key = |k: Value| json!({ "keys": [k] }).to_string();
        let mut bad: Vec<String> = vec![
            String::new(),
            "null".into(),
            "[]".into(),
            "{}".into(),
            r#"{"keys":{}}"#.into(),
            r#"{"keys":[1]}"#.into(),
            r#"{"keys":[],"spiffe_sequence":-1}"#.into(),
            r#"{"keys":[],"spiffe_sequence":"1"}"#.into(),
            r#"{"keys":[],"spiffe_refresh_hint":1.5}"#.into(),
            with_key(json!({"kty": "EC"})),
        ];
        let spoil = |base: &Value, field: &str, val: Value| {
            let mut k = base.clone();
            if val.is_null() {
                k.as_object_mut().map(|o| o.remove(field));
            } else {
                k[field] = val;
            }
            with_key(k)
        };
        bad.push(spoil(&x509_key, "x5c", json!("notarray")));
        bad.push(spoil(&x509_key, "x5c", json!(["!!!"])));
        bad.push(spoil(
            &x509_key,
            "x5c",
            json!([base64::engine::general_purpose::STANDARD.encode([0x30, 0x00])]),
        ));
        bad.push(spoil(&x509_key, "x5c", json!([7])));
        bad.push(spoil(&jwt_key, "kid", Value::Null));
        bad.push(spoil(&jwt_key, "kid", json!("")));
        bad.push(spoil(&jwt_key, "kid", json!(5)));
        bad.push(spoil(&jwt_key, "x", Value::Null));
        bad.push(spoil(&jwt_key, "x", json!("AAAA")));
        bad.push(spoil(&jwt_key, "y", json!("%%%")));
        bad.push(spoil(&jwt_key, "kty", Value::Null));
        bad.push(spoil(&jwt_key, "use", Value::Null));
        bad.push(json!({ "keys": [jwt_key.clone(), jwt_key.clone()] }).to_string());
        for (i, input) in bad.iter().enumerate() {
            assert!(
                Bundle::from_spiffe_json(td()?, input).is_err(),
                "case {i} should fail: {input}"
            );
        }
        // Truncations never panic.
        for end in 0..good.len() {
            let _ = Bundle::from_spiffe_json(td()?, &good[..end]);
        }
        Ok(())
    }

    #[test]
    fn garbage_authority_is_an_error_on_output() -> TestResult {
        let mut b = sample()?;
        b.x509_authorities.push(vec![1, 2, 3]);
        assert!(matches!(
            b.to_spiffe_json(),
            Err(BundleError::BadCertificate { index: 3, .. })
        ));
        let mut b = sample()?;
        let mut long = b.x509_authorities[0].clone();
        long.push(0);
        b.x509_authorities = vec![long];
        assert!(matches!(
            b.to_spiffe_json(),
            Err(BundleError::TrailingBytes { index: 0 })
        ));
        Ok(())
    }

    #[test]
    fn errors_keep_their_causes() -> TestResult {
        use std::error::Error as _;
        let e = Bundle::from_spiffe_json(td()?, "{").unwrap_err();
        assert!(e
            .source()
            .is_some_and(|c| c.downcast_ref::<serde_json::Error>().is_some()));
        let e = Bundle::from_spiffe_json(td()?, r#"{"keys":[{"use":"x509-svid","x5c":["!!!"]}]}"#)
            .unwrap_err();
        assert!(
            matches!(
                &e,
                BundleError::BadKey {
                    index: 0,
                    source: BundleKeyError::X5cBase64(_)
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("\"x5c\" is not valid base64"), "{e}");
        assert!(e
            .source()
            .and_then(|c| c.source())
            .is_some_and(|c| c.downcast_ref::<base64::DecodeError>().is_some()));
        // A missing `use` is named.
        let e = Bundle::from_spiffe_json(td()?, r#"{"keys":[{"kty":"EC"}]}"#).unwrap_err();
        assert!(e.to_string().contains("\"use\" is missing"), "{e}");
        let e = JwkPublicKey::from_spki_der(&[0x30, 0x03, 1, 2, 3]).unwrap_err();
        assert!(
            matches!(e, BundleError::UnsupportedKey(SpkiError::Der(_))),
            "{e}"
        );
        assert!(e.source().and_then(|c| c.source()).is_some());
        Ok(())
    }
}
