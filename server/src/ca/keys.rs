//! CA key types, key generation, and crash-safe key files.
//!
//! Key files are PKCS#8 PEM, created with mode 0600 from the first byte (never chmod-ed after
//! the fact), written to a temporary file in the same directory, fsync-ed and renamed over the
//! target, and the directory is fsync-ed: a crash leaves either the old file or the new one,
//! never a truncated key. A key file readable or writable by group/other is still loaded but
//! logged as a warning naming the file (refusing would turn a permissions slip into an outage,
//! and the key may already have been read anyway); the fix is `chmod 600`.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::str::FromStr;

use rcgen::{KeyPair, SignatureAlgorithm};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::CaError;

/// Largest key or certificate file read, in bytes (a guard against pointing at the wrong file).
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// The kind of key a self-signed CA generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256 (the default: fast and universally supported).
    #[default]
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcP384,
    /// RSA 2048-bit, PKCS#1 v1.5 with SHA-256.
    Rsa2048,
}

impl KeyType {
    /// Every type, in config-string order.
    pub const ALL: [KeyType; 3] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

    /// The configuration name: `ec-p256`, `ec-p384` or `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    /// The rcgen signature algorithm of this key type.
    pub(crate) fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// The key type of a loaded key, if it is one of ours (RSA of any size counts as RSA).
    pub(crate) fn of(alg: &SignatureAlgorithm) -> Option<KeyType> {
        KeyType::ALL.into_iter().find(|t| t.algorithm() == alg)
    }

    /// Generates a new private key of this type.
    pub(crate) fn generate(self) -> Result<KeyPair, CaError> {
        match self {
            KeyType::EcP256 | KeyType::EcP384 => KeyPair::generate_for(self.algorithm())
                .map_err(|e| CaError::KeyGeneration(format!("{}: {e}", self.as_str()))),
            KeyType::Rsa2048 => generate_rsa_2048(),
        }
    }
}

/// ring cannot generate RSA keys: generate with the pure-Rust `rsa` crate, hand the PKCS#8
/// document to rcgen/ring, which does all signing.
fn generate_rsa_2048() -> Result<KeyPair, CaError> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let err = |e: String| CaError::KeyGeneration(format!("rsa-2048: {e}"));
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
        .map_err(|e| err(e.to_string()))?;
    let doc = key.to_pkcs8_der().map_err(|e| err(e.to_string()))?;
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(doc.as_bytes()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .map_err(|e| err(e.to_string()))
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| CaError::InvalidKeyType(s.chars().take(64).collect()))
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; warns if it exists writable by others.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CaError::io("create directory", dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| CaError::io("inspect directory", dir, e))?;
    if !meta.is_dir() {
        return Err(CaError::io(
            "use as CA directory",
            dir,
            std::io::Error::other("not a directory"),
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "CA directory is writable by group/other; run `chmod 700` on it"
        );
    }
    Ok(())
}

/// Atomically writes a secret (mode 0600 from creation).
pub(crate) fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, 0o600)
}

/// Atomically writes a public file such as a certificate (mode 0644).
pub(crate) fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    sigil::fs::write_atomic(path, contents, mode).map_err(|e| CaError::io("write", path, e))
}

/// Reads a (small) text file; `Ok(None)` if it does not exist.
pub(crate) fn read_text_file(path: &Path) -> Result<Option<String>, CaError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CaError::io("inspect", path, e)),
    };
    if meta.len() > MAX_FILE_LEN {
        return Err(CaError::io(
            "read",
            path,
            std::io::Error::other(format!("file is larger than {MAX_FILE_LEN} bytes")),
        ));
    }
    let bytes = fs::read(path).map_err(|e| CaError::io("read", path, e))?;
    String::from_utf8(bytes).map(Some).map_err(|_| {
        CaError::io(
            "read",
            path,
            std::io::Error::other("file is not UTF-8 PEM text"),
        )
    })
}

/// Loads a PKCS#8 PEM private key, warning when the file is readable by group/other.
pub(crate) fn load_key_file(path: &Path) -> Result<Option<KeyPair>, CaError> {
    let Some(pem) = read_text_file(path)? else {
        return Ok(None);
    };
    warn_if_exposed(path);
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(CaError::BadKeyFile {
            path: path.to_path_buf(),
            reason: "no PEM \"PRIVATE KEY\" (PKCS#8) block; encrypted or SEC1/PKCS#1 keys are \
                     not supported, convert with `openssl pkcs8 -topk8 -nocrypt`"
                .into(),
        });
    }
    KeyPair::from_pem(&pem)
        .map(Some)
        .map_err(|e| CaError::BadKeyFile {
            path: path.to_path_buf(),
            reason: format!(
                "not a usable PKCS#8 key ({e}); the file may be truncated or corrupted"
            ),
        })
}

fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key file is accessible by group/other; run `chmod 600` on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn key_type_strings() -> TestResult {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>()?, t);
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(KeyType::default(), KeyType::EcP256);
        let err = "ec-p521"
            .parse::<KeyType>()
            .err()
            .ok_or("expected an error")?
            .to_string();
        assert!(
            err.contains("ec-p521") && err.contains("ec-p256, ec-p384, rsa-2048"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn secret_files_are_0600_and_replace_atomically() -> TestResult {
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("a/b");
        ensure_private_dir(&sub)?;
        assert_eq!(fs::metadata(&sub)?.permissions().mode() & 0o777, 0o700);
        let p = sub.join("k.key");
        write_secret_file(&p, b"one")?;
        assert_eq!(fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
        write_secret_file(&p, b"two")?;
        assert_eq!(fs::read(&p)?, b"two");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&sub)?.count(), 1);
        Ok(())
    }

    #[test]
    fn missing_and_bad_key_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("x.key");
        assert!(load_key_file(&p)?.is_none());
        write_secret_file(&p, b"hello")?;
        let err = load_key_file(&p)
            .err()
            .ok_or("expected an error")?
            .to_string();
        assert!(
            err.contains("x.key") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        Ok(())
    }
}
