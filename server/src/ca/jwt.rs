//! JWT-SVID signing keys: ES256 (P-256), in `jwt.key` (the first) and `jwt-<kid>.key` (those
//! prepared since; see [`super::authority`]), kept across restarts.
//!
//! The `kid` is derived from the public key ([`Es256Signer::from_pkcs8`]: base64url of the
//! first 18 bytes of SHA-256 over the uncompressed point), so it is stable across restarts
//! without storing anything else and changes exactly when the key does. Tokens are JWS compact
//! serialization with header `{"alg":"ES256","kid":…,"typ":"JWT"}` and claims `sub`, `aud`,
//! `exp`, `iat`, signed by [`sigil::jose`].

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use serde_json::{json, Value};
use sigil::bundle::JwtAuthority;
use sigil::jose::Es256Signer;
use sigil::SpiffeId;

use super::{keys, CaError, Signer};

/// Longest JWT-SVID lifetime accepted.
const MAX_JWT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The JWT-SVID signing key, ready to sign.
pub(crate) struct JwtKey {
    signer: Es256Signer,
    authority: JwtAuthority,
}

impl JwtKey {
    /// Loads `path`, or creates it (0600, atomically) if missing.
    pub(crate) fn load_or_create(path: &Path) -> Result<Self, CaError> {
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let kp = KeyPair::generate().map_err(|e| CaError::KeyGeneration(e.to_string()))?;
        keys::write_secret_file(path, kp.serialize_pem().as_bytes())?;
        tracing::info!(path = %path.display(), "created a new JWT-SVID signing key");
        Self::from_key_pair(&kp, path)
    }

    /// Loads `path`; `Ok(None)` if it does not exist.
    pub(crate) fn load(path: &Path) -> Result<Option<Self>, CaError> {
        match keys::load_key_file(path)? {
            Some(kp) => Self::from_key_pair(&kp, path).map(Some),
            None => Ok(None),
        }
    }

    /// A signing key from a key pair (`path` names it in errors).
    pub(crate) fn from_key_pair(kp: &KeyPair, path: &Path) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        if kp.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad(
                "the JWT-SVID key must be an EC P-256 key (ES256)".into()
            ));
        }
        let signer =
            Es256Signer::from_pkcs8(kp.serialized_der()).map_err(|e| bad(e.to_string()))?;
        let authority = JwtAuthority {
            kid: signer.kid().to_string(),
            key: signer.public_key().clone(),
        };
        Ok(Self { signer, authority })
    }

    pub(crate) fn kid(&self) -> &str {
        &self.authority.kid
    }

    pub(crate) fn authority(&self) -> JwtAuthority {
        self.authority.clone()
    }
}

/// A JWT-SVID just minted, with its expiry (so nobody parses the token to learn it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedJwtSvid {
    /// The token (JWS compact serialization).
    pub token: String,
    /// Its `exp` claim, unix seconds.
    pub expires_at: i64,
}

impl Signer {
    /// Mints a JWT-SVID for `id` with audience(s) `audience` (at least one, none empty).
    /// `aud` is a JSON string for one audience, an array for several. Its `exp` is capped at the
    /// signing key's NotAfter.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<MintedJwtSvid, CaError> {
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
        let expires_at = i64::try_from(now.saturating_add(ttl.as_secs()))
            .map_err(|_| CaError::Signing("the JWT-SVID expiry is out of range".into()))?
            .min(self.jwt_not_after);
        if expires_at <= now as i64 {
            return Err(CaError::CaExpired(format!(
                "JWT key {} (NotAfter {})",
                self.jwt.kid(),
                self.jwt_not_after
            )));
        }
        let claims = json!({
            "sub": id.to_string(),
            "aud": aud,
            "exp": expires_at,
            "iat": now,
        });
        let token = self
            .jwt
            .signer
            .sign(&claims)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(MintedJwtSvid { token, expires_at })
    }
}
