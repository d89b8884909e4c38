//! JOSE, the one implementation the token checks build on: JWS compact serialization (RFC 7515),
//! public JWKs (RFC 7517/7518: EC P-256/P-384, RSA, Ed25519), signatures verified and made with
//! `ring`, and the time and audience claims (RFC 7519).
//!
//! Policy stays with the callers: which algorithms they accept, how they find the key for a
//! token and which claims they require. [`crate::jwt`] validates JWT-SVIDs on it, the server's
//! `k8s_psat` attestor Kubernetes service-account tokens, and the server's CA mints JWT-SVIDs
//! with [`Es256Signer`].

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    self, EcdsaKeyPair, KeyPair as _, RsaPublicKeyComponents, UnparsedPublicKey,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Map, Value};

const B64URL_CONFIG: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_encode_padding(false)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent);
/// base64url without padding on output, padding optional on input (JOSE encoding).
pub const B64URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, B64URL_CONFIG);

/// An elliptic curve of an `EC` JWK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EcCurve {
    /// NIST P-256 (ES256).
    P256,
    /// NIST P-384 (ES384).
    P384,
}

impl EcCurve {
    /// The JWK `crv` name.
    pub fn jwk_name(self) -> &'static str {
        match self {
            EcCurve::P256 => "P-256",
            EcCurve::P384 => "P-384",
        }
    }

    /// Byte length of one coordinate.
    pub fn coord_len(self) -> usize {
        match self {
            EcCurve::P256 => 32,
            EcCurve::P384 => 48,
        }
    }
}

/// A public key as carried in a JWK.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwkPublicKey {
    /// `kty: EC`; affine coordinates, big-endian, fixed length.
    Ec {
        /// The curve.
        curve: EcCurve,
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
    /// `kty: RSA`; unsigned big-endian integers without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// `kty: OKP, crv: Ed25519`.
    Ed25519 {
        /// The 32-byte public key.
        x: Vec<u8>,
    },
}

/// Why a JWK's key parameters are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// A required member is absent.
    #[error("\"{0}\" is missing")]
    Missing(&'static str),
    /// A member that must be a string is not.
    #[error("\"{0}\" must be a string")]
    NotString(&'static str),
    /// A key parameter is not base64url.
    #[error("\"{name}\" is not valid base64url: {source}")]
    NotBase64 {
        /// The member.
        name: &'static str,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// EC coordinates of the wrong length for the curve.
    #[error("EC coordinates must be {} bytes for {}", .0.coord_len(), .0.jwk_name())]
    EcCoordinateLength(EcCurve),
    /// An RSA modulus or exponent of zero.
    #[error("RSA modulus and exponent must be non-zero")]
    RsaZero,
    /// An Ed25519 key that is not 32 bytes.
    #[error("Ed25519 \"x\" must be 32 bytes")]
    Ed25519Length,
}

impl JwkPublicKey {
    /// Reads `kty` and the key parameters of a JWK. `Ok(None)` for a key type or curve that
    /// cannot verify JWS signatures here (`oct`, P-521, X25519, ...): callers skip those keys.
    pub fn from_jwk(m: &Map<String, Value>) -> Result<Option<Self>, JwkError> {
        match str_member(m, "kty")? {
            "EC" => {
                let curve = match str_member(m, "crv")? {
                    "P-256" => EcCurve::P256,
                    "P-384" => EcCurve::P384,
                    _ => return Ok(None),
                };
                let x = b64url_member(m, "x")?;
                let y = b64url_member(m, "y")?;
                if x.len() != curve.coord_len() || y.len() != curve.coord_len() {
                    return Err(JwkError::EcCoordinateLength(curve));
                }
                Ok(Some(JwkPublicKey::Ec { curve, x, y }))
            }
            "RSA" => {
                let n = strip_zeros(&b64url_member(m, "n")?);
                let e = strip_zeros(&b64url_member(m, "e")?);
                if n.is_empty() || e.is_empty() {
                    return Err(JwkError::RsaZero);
                }
                Ok(Some(JwkPublicKey::Rsa { n, e }))
            }
            "OKP" => {
                if str_member(m, "crv")? != "Ed25519" {
                    return Ok(None);
                }
                let x = b64url_member(m, "x")?;
                if x.len() != 32 {
                    return Err(JwkError::Ed25519Length);
                }
                Ok(Some(JwkPublicKey::Ed25519 { x }))
            }
            _ => Ok(None),
        }
    }

    /// Writes `kty` and the key parameters into a JWK object.
    pub fn write_jwk(&self, m: &mut Map<String, Value>) {
        match self {
            JwkPublicKey::Ec { curve, x, y } => {
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), curve.jwk_name().into());
                m.insert("x".into(), B64URL.encode(x).into());
                m.insert("y".into(), B64URL.encode(y).into());
            }
            JwkPublicKey::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), B64URL.encode(n).into());
                m.insert("e".into(), B64URL.encode(e).into());
            }
            JwkPublicKey::Ed25519 { x } => {
                m.insert("kty".into(), "OKP".into());
                m.insert("crv".into(), "Ed25519".into());
                m.insert("x".into(), B64URL.encode(x).into());
            }
        }
    }

    /// What kind of key this is, for messages: `EC P-256`, `RSA`, `Ed25519`.
    pub fn kind(&self) -> &'static str {
        match self {
            JwkPublicKey::Ec {
                curve: EcCurve::P256,
                ..
            } => "EC P-256",
            JwkPublicKey::Ec {
                curve: EcCurve::P384,
                ..
            } => "EC P-384",
            JwkPublicKey::Rsa { .. } => "RSA",
            JwkPublicKey::Ed25519 { .. } => "Ed25519",
        }
    }
}

pub(crate) fn str_member<'a>(
    m: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, JwkError> {
    match m.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(JwkError::NotString(name)),
        None => Err(JwkError::Missing(name)),
    }
}

fn b64url_member(m: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, JwkError> {
    B64URL
        .decode(str_member(m, name)?)
        .map_err(|source| JwkError::NotBase64 { name, source })
}

/// `b` without leading zero bytes (JWK integers are minimal big-endian).
pub(crate) fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

/// A JWS signature algorithm (`alg`) this module verifies. `none` and the HMAC algorithms are
/// not among them: every token is checked against a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// EdDSA with Ed25519.
    EdDsa,
}

impl Algorithm {
    /// Every algorithm, in the order messages list them.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::EdDsa,
    ];

    /// The algorithm named `alg` in a JWS header, if it is one of ours.
    pub fn from_name(alg: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == alg)
    }

    /// The `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    /// True when `key` is of the type (and curve) this algorithm signs with.
    pub fn fits(self, key: &JwkPublicKey) -> bool {
        use Algorithm as A;
        match key {
            JwkPublicKey::Ec { curve, .. } => matches!(
                (self, curve),
                (A::Es256, EcCurve::P256) | (A::Es384, EcCurve::P384)
            ),
            JwkPublicKey::Rsa { .. } => matches!(
                self,
                A::Rs256 | A::Rs384 | A::Rs512 | A::Ps256 | A::Ps384 | A::Ps512
            ),
            JwkPublicKey::Ed25519 { .. } => self == A::EdDsa,
        }
    }

    /// Checks `sig` over `msg` with `key`. RSA keys must have 2048 to 8192-bit moduli.
    pub fn verify(self, key: &JwkPublicKey, msg: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        use Algorithm as A;
        if !self.fits(key) {
            return Err(SignatureError::KeyMismatch);
        }
        let ok = match key {
            JwkPublicKey::Ec { x, y, .. } => {
                let alg = match self {
                    A::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => &signature::ECDSA_P256_SHA256_FIXED,
                };
                let point = [&[0x04][..], x, y].concat();
                UnparsedPublicKey::new(alg, point).verify(msg, sig).is_ok()
            }
            JwkPublicKey::Rsa { n, e } => {
                let params = match self {
                    A::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    A::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    A::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    A::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    A::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            JwkPublicKey::Ed25519 { x } => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(msg, sig)
                .is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(SignatureError::Invalid)
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The key is not of the type the algorithm needs (an RSA key for ES256, say).
    #[error("the key is not of the type the token's algorithm needs")]
    KeyMismatch,
    /// The signature does not verify with the key.
    #[error("the signature does not verify")]
    Invalid,
}

/// Why a token is not a JWS in compact serialization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Longer than the caller accepts.
    #[error("longer than {0} bytes")]
    TooLong(usize),
    /// Not `header.claims.signature`.
    #[error("expected three '.'-separated parts (JWS compact serialization)")]
    NotThreeParts,
    /// A part is not base64url.
    #[error("{part} is not base64url: {source}")]
    NotBase64 {
        /// `header`, `claims` or `signature`.
        part: &'static str,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// The header or claims are not JSON.
    #[error("{part} is not JSON: {reason}")]
    NotJson {
        /// `header` or `claims`.
        part: &'static str,
        /// The JSON parser's complaint.
        reason: String,
    },
    /// The header or claims are JSON but not an object.
    #[error("{part} is not a JSON object")]
    NotObject {
        /// `header` or `claims`.
        part: &'static str,
    },
}

/// A token split into its parts; nothing is verified yet.
#[derive(Debug)]
pub struct Jws<'a> {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    /// Splits a JWS compact serialization (`header.claims.signature`) of at most `max_len`
    /// bytes and decodes its header and claims, which must be JSON objects.
    pub fn parse(token: &'a str, max_len: usize) -> Result<Self, JwsError> {
        if token.len() > max_len {
            return Err(JwsError::TooLong(max_len));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::NotThreeParts);
        };
        let header = json_object("header", h)?;
        let claims = json_object("claims", c)?;
        let signature = B64URL.decode(s).map_err(|source| JwsError::NotBase64 {
            part: "signature",
            source,
        })?;
        Ok(Jws {
            header,
            claims,
            signing_input: &token[..h.len() + 1 + c.len()],
            signature,
        })
    }

    /// The header's `alg` ("" when absent or not a string).
    pub fn alg(&self) -> &str {
        self.header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The header's `kid`, when it is a string.
    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    /// True when the header has `crit`: extensions that must be understood, and none are.
    pub fn has_critical_header(&self) -> bool {
        self.header.contains_key("crit")
    }

    /// Checks the signature with `key` under `alg` (the caller has checked `alg` against the
    /// header and its own list of accepted algorithms).
    pub fn verify(&self, alg: Algorithm, key: &JwkPublicKey) -> Result<(), SignatureError> {
        alg.verify(key, self.signing_input.as_bytes(), &self.signature)
    }
}

fn json_object(part: &'static str, b64: &str) -> Result<Map<String, Value>, JwsError> {
    let bytes = B64URL
        .decode(b64)
        .map_err(|source| JwsError::NotBase64 { part, source })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwsError::NotObject { part }),
        Err(e) => Err(JwsError::NotJson {
            part,
            reason: e.to_string(),
        }),
    }
}

/// The claims of a compact JWT WITHOUT verifying anything: only for a token this process
/// received from a party it already trusts (its own agent, say) or to pick how to verify it.
pub fn unverified_claims(token: &str, max_len: usize) -> Result<Map<String, Value>, JwsError> {
    Jws::parse(token, max_len).map(|j| j.claims)
}

/// Why the `exp`/`nbf` claims do not admit a token now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// No `exp` claim.
    #[error("the token has no \"exp\" claim")]
    NoExpiry,
    /// `exp` or `nbf` is not an integer.
    #[error("the token's \"{0}\" claim is not a number")]
    NotANumber(&'static str),
    /// `exp` has passed.
    #[error("the token expired at {exp} (now {now}, unix seconds)")]
    Expired {
        /// The `exp` claim.
        exp: i64,
        /// The time of the check.
        now: i64,
    },
    /// `nbf` is still ahead.
    #[error("the token is not valid before {nbf} (now {now}, unix seconds)")]
    NotYetValid {
        /// The `nbf` claim.
        nbf: i64,
        /// The time of the check.
        now: i64,
    },
}

/// Checks `exp` (required) and `nbf` (optional) at `now` (unix seconds) with `leeway` seconds
/// of clock skew either way; returns `exp`.
pub fn check_time(claims: &Map<String, Value>, now: i64, leeway: i64) -> Result<i64, TimeError> {
    let exp = claims
        .get("exp")
        .ok_or(TimeError::NoExpiry)?
        .as_i64()
        .ok_or(TimeError::NotANumber("exp"))?;
    if exp.saturating_add(leeway) <= now {
        return Err(TimeError::Expired { exp, now });
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or(TimeError::NotANumber("nbf"))?;
        if nbf.saturating_sub(leeway) > now {
            return Err(TimeError::NotYetValid { nbf, now });
        }
    }
    Ok(exp)
}

/// The `aud` claim as a list (a single string becomes a one-element list); `None` when it is
/// absent or neither a string nor an array of strings.
pub fn audiences(claims: &Map<String, Value>) -> Option<Vec<String>> {
    match claims.get("aud")? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|v| v.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Why a token could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The key is not an EC P-256 PKCS#8 key.
    #[error("not a usable EC P-256 PKCS#8 key: {0}")]
    BadKey(String),
    /// The signing operation failed.
    #[error("ECDSA P-256 signing failed")]
    Signing,
}

/// Signs JWTs with ES256 (the 64-byte `r||s` signature JWS requires) under a fixed header
/// `{"alg":"ES256","kid":…,"typ":"JWT"}`.
pub struct Es256Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    public: JwkPublicKey,
    /// base64url of the constant header.
    header_b64: String,
}

impl std::fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Es256Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Es256Signer {
    /// A signer for the P-256 key in `pkcs8_der`. The `kid` is base64url of the first 18 bytes
    /// of SHA-256 over the uncompressed public point: stable for a key, new with a new key.
    pub fn from_pkcs8(pkcs8_der: &[u8]) -> Result<Self, SignError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der, &rng)
            .map_err(|e| SignError::BadKey(e.to_string()))?;
        let point = key.public_key().as_ref();
        if point.len() != 65 {
            return Err(SignError::BadKey(
                "unexpected P-256 public key length".into(),
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, point);
        let kid = B64URL.encode(&digest.as_ref()[..18]);
        let public = JwkPublicKey::Ec {
            curve: EcCurve::P256,
            x: point[1..33].to_vec(),
            y: point[33..].to_vec(),
        };
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        Ok(Self {
            key,
            rng,
            header_b64: B64URL.encode(header.to_string()),
            kid,
            public,
        })
    }

    /// The key ID tokens carry in their header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, to publish as a JWK.
    pub fn public_key(&self) -> &JwkPublicKey {
        &self.public
    }

    /// The compact JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, SignError> {
        let mut token = String::with_capacity(512);
        token.push_str(&self.header_b64);
        token.push('.');
        B64URL.encode_string(claims.to_string(), &mut token);
        let sig = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| SignError::Signing)?;
        token.push('.');
        B64URL.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn signer() -> Result<Es256Signer, Box<dyn std::error::Error>> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| "keygen")?;
        Ok(Es256Signer::from_pkcs8(pkcs8.as_ref())?)
    }

    #[test]
    fn signed_tokens_verify_with_the_public_key_only() -> TestResult {
        let s = signer()?;
        let token = s.sign(&json!({"sub": "x", "exp": 10}))?;
        let jws = Jws::parse(&token, 4096)?;
        assert_eq!(jws.alg(), "ES256");
        assert_eq!(jws.kid(), Some(s.kid()));
        assert_eq!(jws.header["typ"], "JWT");
        assert_eq!(jws.claims["sub"], "x");
        jws.verify(Algorithm::Es256, s.public_key())?;
        // Another key, or the right key under another algorithm, does not verify it.
        let other = signer()?;
        assert_eq!(
            jws.verify(Algorithm::Es256, other.public_key()),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            jws.verify(Algorithm::Es384, s.public_key()),
            Err(SignatureError::KeyMismatch)
        );
        assert_eq!(unverified_claims(&token, 4096)?["exp"], 10);
        Ok(())
    }

    #[test]
    fn keys_of_one_kind_never_verify_another_algorithm() -> TestResult {
        let ec = signer()?.public_key().clone();
        let ec384 = JwkPublicKey::Ec {
            curve: EcCurve::P384,
            x: vec![1; 48],
            y: vec![2; 48],
        };
        let rsa = JwkPublicKey::Rsa {
            n: vec![0xc5; 256],
            e: vec![1, 0, 1],
        };
        let ed = JwkPublicKey::Ed25519 { x: vec![3; 32] };
        for alg in Algorithm::ALL {
            for key in [&ec, &ec384, &rsa, &ed] {
                let fits = matches!(
                    (alg, key.kind()),
                    (Algorithm::Es256, "EC P-256")
                        | (Algorithm::Es384, "EC P-384")
                        | (Algorithm::EdDsa, "Ed25519")
                ) || (alg.name().starts_with(['R', 'P']) && key.kind() == "RSA");
                assert_eq!(alg.fits(key), fits, "{alg} with {}", key.kind());
                if !fits {
                    assert_eq!(
                        alg.verify(key, b"m", &[0; 64]),
                        Err(SignatureError::KeyMismatch),
                        "{alg} with {}",
                        key.kind()
                    );
                }
            }
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        }
        for name in ["none", "HS256", "", "es256", "ES512"] {
            assert_eq!(Algorithm::from_name(name), None, "{name}");
        }
        Ok(())
    }

    #[test]
    fn jwk_round_trip_and_refusals() -> TestResult {
        let keys = [
            signer()?.public_key().clone(),
            JwkPublicKey::Rsa {
                n: vec![1, 2, 3],
                e: vec![1, 0, 1],
            },
            JwkPublicKey::Ed25519 { x: vec![7; 32] },
        ];
        for k in keys {
            let mut m = Map::new();
            k.write_jwk(&mut m);
            assert_eq!(JwkPublicKey::from_jwk(&m)?, Some(k));
        }
        let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
        // Leading zeros of RSA integers are dropped.
        let padded = obj(json!({"kty": "RSA", "n": B64URL.encode([0, 0, 9]), "e": "AQAB"}));
        assert_eq!(
            JwkPublicKey::from_jwk(&padded)?,
            Some(JwkPublicKey::Rsa {
                n: vec![9],
                e: vec![1, 0, 1]
            })
        );
        for skipped in [
            json!({"kty": "oct", "k": "AAAA"}),
            json!({"kty": "EC", "crv": "P-521", "x": "", "y": ""}),
            json!({"kty": "OKP", "crv": "X25519", "x": ""}),
        ] {
            assert_eq!(
                JwkPublicKey::from_jwk(&obj(skipped.clone()))?,
                None,
                "{skipped}"
            );
        }
        for (bad, want) in [
            (json!({}), JwkError::Missing("kty")),
            (json!({"kty": 1}), JwkError::NotString("kty")),
            (
                json!({"kty": "EC", "x": "", "y": ""}),
                JwkError::Missing("crv"),
            ),
            (
                json!({"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}),
                JwkError::EcCoordinateLength(EcCurve::P256),
            ),
            (
                json!({"kty": "RSA", "n": "AA", "e": "AQAB"}),
                JwkError::RsaZero,
            ),
            (json!({"kty": "RSA", "n": "AQAB"}), JwkError::Missing("e")),
            (
                json!({"kty": "OKP", "crv": "Ed25519", "x": "AQ"}),
                JwkError::Ed25519Length,
            ),
        ] {
            assert_eq!(
                JwkPublicKey::from_jwk(&obj(bad.clone())),
                Err(want),
                "{bad}"
            );
        }
        let e = JwkPublicKey::from_jwk(&obj(json!({"kty": "RSA", "n": "%%", "e": "AQAB"})))
            .err()
            .ok_or("accepted")?;
        assert!(matches!(e, JwkError::NotBase64 { name: "n", .. }), "{e}");
        Ok(())
    }

    #[test]
    fn malformed_compact_serializations_are_refused() {
        for (t, want) in [
            ("", JwsError::NotThreeParts),
            ("a.b", JwsError::NotThreeParts),
            ("a.b.c.d", JwsError::NotThreeParts),
            ("W10.e30.", JwsError::NotObject { part: "header" }),
            ("e30.W10.", JwsError::NotObject { part: "claims" }),
        ] {
            assert_eq!(Jws::parse(t, 100).err(), Some(want), "{t:?}");
        }
        for (t, part) in [
            ("!!.e30.", "header"),
            ("e30.!!.", "claims"),
            ("e30.e30.!!", "signature"),
        ] {
            assert!(
                matches!(Jws::parse(t, 100), Err(JwsError::NotBase64 { part: p, .. }) if p == part),
                "{t:?}"
            );
        }
        assert!(matches!(
            Jws::parse("YQ.e30.", 100),
            Err(JwsError::NotJson { part: "header", .. })
        ));
        assert_eq!(Jws::parse("e30.e30.", 7).err(), Some(JwsError::TooLong(7)));
        assert!(Jws::parse("e30.e30.", 8).is_ok());
    }

    #[test]
    fn time_window_with_and_without_leeway() {
        let c = |v: Value| v.as_object().cloned().unwrap_or_default();
        let now = 1_700_000_000;
        assert_eq!(check_time(&c(json!({"exp": now + 1})), now, 0), Ok(now + 1));
        assert_eq!(
            check_time(&c(json!({"exp": now})), now, 0),
            Err(TimeError::Expired { exp: now, now })
        );
        assert_eq!(
            check_time(&c(json!({"exp": now - 10})), now, 30),
            Ok(now - 10)
        );
        assert_eq!(check_time(&c(json!({})), now, 30), Err(TimeError::NoExpiry));
        assert_eq!(
            check_time(&c(json!({"exp": "soon"})), now, 30),
            Err(TimeError::NotANumber("exp"))
        );
        assert_eq!(
            check_time(&c(json!({"exp": now + 9, "nbf": now + 1})), now, 0),
            Err(TimeError::NotYetValid { nbf: now + 1, now })
        );
        assert!(check_time(&c(json!({"exp": now + 9, "nbf": now + 1})), now, 1).is_ok());
        assert_eq!(
            check_time(&c(json!({"exp": now + 9, "nbf": null})), now, 0),
            Err(TimeError::NotANumber("nbf"))
        );
        assert_eq!(
            check_time(&c(json!({"exp": i64::MAX, "nbf": i64::MIN})), now, 30),
            Ok(i64::MAX)
        );

        assert_eq!(audiences(&c(json!({"aud": "a"}))), Some(vec!["a".into()]));
        assert_eq!(
            audiences(&c(json!({"aud": ["a", "b"]}))),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(audiences(&c(json!({"aud": ["a", 1]}))), None);
        assert_eq!(audiences(&c(json!({"aud": 1}))), None);
        assert_eq!(audiences(&c(json!({}))), None);
    }
}
