//! JWT-SVID signing: one ES256 (P-256) key in `jwt.key`, kept across restarts.
//!
//! The `kid` is derived from the public key (base64url of the first 18 bytes of SHA-256 over
//! the uncompressed point), so it is stable across restarts without storing anything else and
//! changes exactly when the key does. Tokens are JWS compact serialization with header
//! `{"alg":"ES256","kid":…,"typ":"JWT"}` and claims `sub`, `aud`, `exp`, `iat`; the signature is
//! the 64-byte r||s JWS requires (ring's `ECDSA_P256_SHA256_FIXED_SIGNING`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::KeyPair;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sigil::bundle::{EcCurve, JwkPublicKey, JwtAuthority};
use sigil::SpiffeId;

use super::{keys, Ca, CaError};

/// Longest JWT-SVID lifetime accepted.
const MAX_JWT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The JWT-SVID signing key, ready to sign.
pub(crate) struct JwtKey {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// base64url of the constant header.
    header_b64: String,
    authority: JwtAuthority,
}

impl JwtKey {
    /// Loads `path`, or creates it (0600, atomically) if missing.
    pub(crate) fn load_or_create(path: &Path) -> Result<Self, CaError> {
        let kp = match keys::load_key_file(path)? {
            Some(kp) => kp,
            None => {
                let kp = KeyPair::generate().map_err(|e| CaError::KeyGeneration(e.to_string()))?;
                keys::write_secret_file(path, kp.serialize_pem().as_bytes())?;
                tracing::info!(path = %path.display(), "created a new JWT-SVID signing key");
                kp
            }
        };
        let bad = |reason: &str| CaError::BadKeyFile {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if kp.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad("the JWT-SVID key must be an EC P-256 key (ES256)"));
        }
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, kp.serialized_der(), &rng)
                .map_err(|_| bad("not a usable P-256 PKCS#8 key"))?;
        let point = key.public_key().as_ref();
        if point.len() != 65 {
            return Err(bad("unexpected P-256 public key length"));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, point);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..18]);
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let authority = JwtAuthority {
            kid,
            key: JwkPublicKey::Ec {
                curve: EcCurve::P256,
                x: point[1..33].to_vec(),
                y: point[33..].to_vec(),
            },
        };
        Ok(Self {
            key,
            rng,
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            authority,
        })
    }

    pub(crate) fn kid(&self) -> &str {
        &self.authority.kid
    }

    pub(crate) fn authority(&self) -> JwtAuthority {
        self.authority.clone()
    }
}

impl Ca {
    /// Mints a JWT-SVID for `id` with audience(s) `audience` (at least one, none empty).
    /// `aud` is a JSON string for one audience, an array for several.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<String, CaError> {
        self.check_id(id)?;
        if audience.is_empty() {
            return Err(CaError::InvalidAudience(
                "at least one audience is required".into(),
            ));
        }
        if audience.iter().any(String::is_empty) {
            return Err(CaError::InvalidAudience(
                "audiences must not be empty strings".into(),
            ));
        }
        let ttl = ttl.unwrap_or(self.default_jwt_svid_ttl);
        if ttl.is_zero() || ttl > MAX_JWT_TTL {
            return Err(CaError::InvalidTtl(format!(
                "JWT-SVID TTL must be between 1 second and 30 days, got {}s",
                ttl.as_secs()
            )));
        }
        // Entries stored before the TTL floor existed keep their value; they get the floor.
        let ttl = ttl.max(sigil::ttl::MIN_JWT_SVID_TTL);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CaError::Signing("system clock is before 1970".into()))?
            .as_secs();
        let aud: Value = match audience {
            [one] => one.as_str().into(),
            many => many.into(),
        };
        let claims = json!({
            "sub": id.to_string(),
            "aud": aud,
            "exp": now + ttl.as_secs(),
            "iat": now,
        });
        let mut token = String::with_capacity(512);
        token.push_str(&self.jwt.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut token);
        let sig = self
            .jwt
            .key
            .sign(&self.jwt.rng, token.as_bytes())
            .map_err(|_| CaError::Signing("ECDSA P-256 signing failed".into()))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }
}
