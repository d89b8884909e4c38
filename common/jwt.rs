//! JWT-SVID validation (SPIFFE JWT-SVID spec) on [`crate::jose`]: JWS compact serialization,
//! signature checked against the JWT authorities of a [`Bundle`], then `sub`, `aud` and `exp`.
//!
//! Accepted algorithms: ES256, ES384, RS256/384/512, PS256/384/512 and EdDSA (Ed25519); the
//! key named by `kid` must be of the matching type. `none` and HMAC are always rejected.

use serde_json::{Map, Value};

use crate::bundle::Bundle;
use crate::jose::{self, Algorithm, Jws, JwsError, SignatureError, TimeError};
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;
/// Most audiences one JWT-SVID may be minted for (the server's `MintJwtSvid` refuses more, and
/// the agent's FetchJWTSVID before it asks the server).
pub const MAX_AUDIENCES: usize = 32;
/// Most bytes the audiences of one JWT-SVID may take together: the token travels in HTTP
/// headers, which servers commonly cap at 8 KiB.
pub const MAX_AUDIENCE_BYTES: usize = 4_096;

/// Why a JWT-SVID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url JSON parts.
    #[error("token is malformed: {0}")]
    Malformed(#[source] JwsError),
    /// `alg` is missing or not an accepted asymmetric algorithm.
    #[error("token algorithm {0:?} is not accepted (use ES256, ES384, RS256/384/512, PS256/384/512 or EdDSA)")]
    UnsupportedAlg(String),
    /// `typ` is present and neither `JWT` nor `JOSE`.
    #[error("token header typ {0:?} is not \"JWT\" or \"JOSE\"")]
    BadTyp(String),
    /// The header has a `crit` member, which this validator does not understand.
    #[error("token header has critical extensions (\"crit\"), which are not supported")]
    CriticalHeader,
    /// No `kid` in the header.
    #[error("token header has no \"kid\"; JWT-SVIDs must name their signing key")]
    MissingKid,
    /// `kid` is not in the bundle.
    #[error("token key ID {kid:?} is not in the bundle of {trust_domain}; the key may have rotated: refresh the bundle")]
    UnknownKid {
        /// The key ID from the header.
        kid: String,
        /// The bundle that was searched.
        trust_domain: String,
    },
    /// The algorithm does not fit the key type.
    #[error("token algorithm {alg} does not match the type of key {kid:?}")]
    AlgKeyMismatch {
        /// Header `alg`.
        alg: String,
        /// Header `kid`.
        kid: String,
    },
    /// Signature verification failed.
    #[error("token signature does not verify")]
    BadSignature,
    /// A required claim is missing or has the wrong JSON type.
    #[error("token claim {0:?} is missing or of the wrong type")]
    BadClaim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("token subject is not a valid SPIFFE ID: {0}")]
    BadSubject(SpiffeIdError),
    /// `sub` is in another trust domain than the bundle.
    #[error("token subject is in trust domain {token} but the bundle is for {bundle}")]
    WrongTrustDomain {
        /// Trust domain of `sub`.
        token: String,
        /// Trust domain of the bundle.
        bundle: String,
    },
    /// `exp` is not in the future.
    #[error("token expired at {exp} (now {now}, unix seconds)")]
    Expired {
        /// The `exp` claim.
        exp: i64,
        /// The time of validation.
        now: i64,
    },
    /// `nbf` is in the future.
    #[error("token is not valid before {nbf} (now {now}, unix seconds)")]
    NotYetValid {
        /// The `nbf` claim.
        nbf: i64,
        /// The time of validation.
        now: i64,
    },
    /// The validator passed an empty audience.
    #[error("an expected audience is required to validate a JWT-SVID")]
    NoExpectedAudience,
    /// `aud` does not contain the expected audience.
    #[error("token audience {got:?} does not include {expected:?}")]
    AudienceMismatch {
        /// The audience the caller expects.
        expected: String,
        /// The token's audiences.
        got: Vec<String>,
    },
}

/// The validated claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtClaims {
    /// `sub`.
    pub subject: SpiffeId,
    /// `aud` (a single string is returned as a one-element list).
    pub audience: Vec<String>,
    /// `exp`, unix seconds.
    pub expiry: i64,
    /// `iat`, unix seconds, if present.
    pub issued_at: Option<i64>,
    /// Every claim, as sent (ValidateJWTSVID returns them).
    pub all: Map<String, Value>,
}

fn parse(token: &str) -> Result<Jws<'_>, JwtError> {
    Jws::parse(token, MAX_TOKEN_LEN).map_err(JwtError::Malformed)
}

/// The `sub` of a token WITHOUT verifying anything: only to pick the bundle to validate with.
pub fn jwt_svid_subject_unverified(token: &str) -> Result<SpiffeId, JwtError> {
    let p = parse(token)?;
    let sub = p
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::BadClaim("sub"))?;
    SpiffeId::parse(sub).map_err(JwtError::BadSubject)
}

/// Validates a JWT-SVID against `bundle` for `audience`, at the current time.
pub fn validate_jwt_svid(
    token: &str,
    audience: &str,
    bundle: &Bundle,
) -> Result<JwtClaims, JwtError> {
    let now = crate::clock::now_unix();
    validate_jwt_svid_at(token, audience, bundle, now)
}

/// Validates a JWT-SVID against `bundle` for `audience`, at `now` (unix seconds).
pub fn validate_jwt_svid_at(
    token: &str,
    audience: &str,
    bundle: &Bundle,
    now: i64,
) -> Result<JwtClaims, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::NoExpectedAudience);
    }
    let p = parse(token)?;
    if p.has_critical_header() {
        return Err(JwtError::CriticalHeader);
    }
    let alg = p.alg();
    if let Some(typ) = p.header.get("typ") {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => return Err(JwtError::BadTyp(typ.to_string())),
        }
    }
    let kid = p.kid().ok_or(JwtError::MissingKid)?;
    // Reject unknown algorithms before looking at keys, so `none`/HS256 fail the same way always.
    let verify_alg =
        Algorithm::from_name(alg).ok_or_else(|| JwtError::UnsupportedAlg(alg.to_string()))?;
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.to_string(),
            trust_domain: bundle.trust_domain.to_string(),
        })?;
    p.verify(verify_alg, &authority.key).map_err(|e| match e {
        SignatureError::KeyMismatch => JwtError::AlgKeyMismatch {
            alg: alg.to_string(),
            kid: kid.to_string(),
        },
        SignatureError::Invalid => JwtError::BadSignature,
    })?;
    claims_checked(p.claims, audience, &bundle.trust_domain, now)
}

fn claims_checked(
    all: Map<String, Value>,
    audience: &str,
    td: &TrustDomain,
    now: i64,
) -> Result<JwtClaims, JwtError> {
    let sub = all
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::BadClaim("sub"))?;
    let subject = SpiffeId::parse(sub).map_err(JwtError::BadSubject)?;
    if subject.trust_domain() != td {
        return Err(JwtError::WrongTrustDomain {
            token: subject.trust_domain().to_string(),
            bundle: td.to_string(),
        });
    }
    let expiry = jose::check_time(&all, now, 0).map_err(|e| match e {
        TimeError::NoExpiry | TimeError::NotANumber("exp") => JwtError::BadClaim("exp"),
        TimeError::NotANumber(_) => JwtError::BadClaim("nbf"),
        TimeError::Expired { exp, now } => JwtError::Expired { exp, now },
        TimeError::NotYetValid { nbf, now } => JwtError::NotYetValid { nbf, now },
    })?;
    let issued_at = match all.get("iat") {
        None => None,
        Some(v) => Some(v.as_i64().ok_or(JwtError::BadClaim("iat"))?),
    };
    let aud = jose::audiences(&all).ok_or(JwtError::BadClaim("aud"))?;
    if aud.is_empty() {
        return Err(JwtError::BadClaim("aud"));
    }
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            expected: audience.to_string(),
            got: aud,
        });
    }
    Ok(JwtClaims {
        subject,
        audience: aud,
        expiry,
        issued_at,
        all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{EcCurve, JwkPublicKey, JwtAuthority};
    use crate::jose::B64URL;
    use base64::Engine as _;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
    use serde_json::json;

    type TestResult = Result<(), Box<dyn std::error::Error>>;
    const NOW: i64 = 1_700_000_000;

    struct Signer {
        key: EcdsaKeyPair,
        kid: String,
    }

    fn signer(kid: &str) -> Result<Signer, Box<dyn std::error::Error>> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "keygen")?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| e.to_string())?;
        Ok(Signer {
            key,
            kid: kid.into(),
        })
    }

    impl Signer {
        fn authority(&self) -> JwtAuthority {
            let p = self.key.public_key().as_ref();
            JwtAuthority {
                kid: self.kid.clone(),
                key: JwkPublicKey::Ec {
                    curve: EcCurve::P256,
                    x: p[1..33].to_vec(),
                    y: p[33..].to_vec(),
                },
            }
        }
        fn token(
            &self,
            header: Value,
            claims: Value,
        ) -> Result<String, Box<dyn std::error::Error>> {
            let input = format!(
                "{}.{}",
                B64URL.encode(header.to_string()),
                B64URL.encode(claims.to_string())
            );
            let sig = self
                .key
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(|_| "sign")?;
            Ok(format!("{input}.{}", B64URL.encode(sig.as_ref())))
        }
        fn good(&self, claims: Value) -> Result<String, Box<dyn std::error::Error>> {
            self.token(
                json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}),
                claims,
            )
        }
    }

    fn claims() -> Value {
        json!({"sub": "spiffe://example.org/web", "aud": ["db", "cache"], "exp": NOW + 300, "iat": NOW})
    }

    fn bundle(s: &Signer) -> Result<Bundle, Box<dyn std::error::Error>> {
        let mut b = Bundle::new(TrustDomain::new("example.org")?);
        b.jwt_authorities.push(s.authority());
        Ok(b)
    }

    #[test]
    fn valid_token_passes() -> TestResult {
        let s = signer("k1")?;
        let b = bundle(&s)?;
        let c = validate_jwt_svid_at(&s.good(claims())?, "db", &b, NOW)?;
        assert_eq!(c.subject.to_string(), "spiffe://example.org/web");
        assert_eq!(c.audience, vec!["db", "cache"]);
        assert_eq!(c.expiry, NOW + 300);
        assert_eq!(c.issued_at, Some(NOW));
        // Single-string audience.
        let mut one = claims();
        one["aud"] = "db".into();
        validate_jwt_svid_at(&s.good(one)?, "db", &b, NOW)?;
        assert_eq!(
            jwt_svid_subject_unverified(&s.good(claims())?)?.to_string(),
            "spiffe://example.org/web"
        );
        Ok(())
    }

    #[test]
    fn a_key_of_another_kind_is_refused_whatever_the_signature() -> TestResult {
        let s = signer("k1")?;
        let mut b = bundle(&s)?;
        b.jwt_authorities.push(JwtAuthority {
            kid: "rsa".into(),
            key: JwkPublicKey::Rsa {
                n: vec![0xc5; 256],
                e: vec![1, 0, 1],
            },
        });
        b.jwt_authorities.push(JwtAuthority {
            kid: "ed".into(),
            key: JwkPublicKey::Ed25519 { x: vec![3; 32] },
        });
        for (alg, kid) in [
            ("RS256", "k1"),
            ("PS256", "k1"),
            ("EdDSA", "k1"),
            ("ES256", "rsa"),
            ("ES256", "ed"),
            ("RS256", "ed"),
            ("EdDSA", "rsa"),
        ] {
            let t = s.token(json!({"alg": alg, "kid": kid}), claims())?;
            assert_eq!(
                validate_jwt_svid_at(&t, "db", &b, NOW),
                Err(JwtError::AlgKeyMismatch {
                    alg: alg.into(),
                    kid: kid.into()
                }),
                "{alg} with key {kid}"
            );
        }
        Ok(())
    }

    #[test]
    fn each_defect_is_rejected() -> TestResult {
        let s = signer("k1")?;
        let b = bundle(&s)?;
        let tok = s.good(claims())?;
        let check = |t: &str, aud: &str, now: i64| validate_jwt_svid_at(t, aud, &b, now);

        assert!(matches!(
            check(&tok, "other", NOW),
            Err(JwtError::AudienceMismatch { .. })
        ));
        assert_eq!(check(&tok, "", NOW), Err(JwtError::NoExpectedAudience));
        assert!(matches!(
            check(&tok, "db", NOW + 300),
            Err(JwtError::Expired { .. })
        ));
        let other = signer("k2")?;
        assert!(matches!(
            check(&other.good(claims())?, "db", NOW),
            Err(JwtError::UnknownKid { .. })
        ));
        // Same kid, other key: signature fails.
        let impostor = signer("k1")?;
        assert_eq!(
            check(&impostor.good(claims())?, "db", NOW),
            Err(JwtError::BadSignature)
        );
        // Tampered claims with the original signature.
        let parts: Vec<&str> = tok.split('.').collect();
        let mut evil = claims();
        evil["sub"] = "spiffe://example.org/admin".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64URL.encode(evil.to_string()),
            parts[2]
        );
        assert_eq!(check(&tampered, "db", NOW), Err(JwtError::BadSignature));
        // Flipped signature byte.
        let mut sig = B64URL.decode(parts[2])?;
        sig[10] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(sig));
        assert_eq!(check(&flipped, "db", NOW), Err(JwtError::BadSignature));
        // alg none / HS256 / missing kid / bad typ / crit.
        let none = s.token(json!({"alg": "none", "kid": "k1"}), claims())?;
        assert!(matches!(
            check(&none, "db", NOW),
            Err(JwtError::UnsupportedAlg(_))
        ));
        let hs = s.token(json!({"alg": "HS256", "kid": "k1"}), claims())?;
        assert!(matches!(
            check(&hs, "db", NOW),
            Err(JwtError::UnsupportedAlg(_))
        ));
        let es384 = s.token(json!({"alg": "ES384", "kid": "k1"}), claims())?;
        assert!(matches!(
            check(&es384, "db", NOW),
            Err(JwtError::AlgKeyMismatch { .. })
        ));
        let nokid = s.token(json!({"alg": "ES256"}), claims())?;
        assert_eq!(check(&nokid, "db", NOW), Err(JwtError::MissingKid));
        let typ = s.token(
            json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
            claims(),
        )?;
        assert!(matches!(check(&typ, "db", NOW), Err(JwtError::BadTyp(_))));
        let crit = s.token(
            json!({"alg": "ES256", "kid": "k1", "crit": ["x"]}),
            claims(),
        )?;
        assert_eq!(check(&crit, "db", NOW), Err(JwtError::CriticalHeader));
        // Claims problems (validly signed).
        let mut c = claims();
        c["sub"] = "spiffe://other.org/web".into();
        assert!(matches!(
            check(&s.good(c)?, "db", NOW),
            Err(JwtError::WrongTrustDomain { .. })
        ));
        let mut c = claims();
        c["sub"] = "https://example.org/web".into();
        assert!(matches!(
            check(&s.good(c)?, "db", NOW),
            Err(JwtError::BadSubject(_))
        ));
        for field in ["sub", "exp", "aud"] {
            let mut c = claims();
            c.as_object_mut().map(|o| o.remove(field));
            assert!(
                matches!(check(&s.good(c)?, "db", NOW), Err(JwtError::BadClaim(_))),
                "{field}"
            );
        }
        let mut c = claims();
        c["aud"] = json!([]);
        assert_eq!(
            check(&s.good(c)?, "db", NOW),
            Err(JwtError::BadClaim("aud"))
        );
        let mut c = claims();
        c["nbf"] = (NOW + 60).into();
        assert!(matches!(
            check(&s.good(c)?, "db", NOW),
            Err(JwtError::NotYetValid { .. })
        ));
        // Structure.
        for bad in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "!.!.!",
            &format!("{}.{}", parts[0], parts[1]),
        ] {
            assert!(
                matches!(check(bad, "db", NOW), Err(JwtError::Malformed(_))),
                "{bad:?}"
            );
        }
        for end in 0..tok.len() {
            assert!(check(&tok[..end], "db", NOW).is_err());
        }
        Ok(())
    }
}
