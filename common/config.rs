//! The error both binaries' configuration loaders return: a TOML file (`--config`) merged with
//! flags. Each message names the key that is wrong and what to do.

use std::borrow::Cow;
use std::path::PathBuf;

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a value of the wrong type.
    #[error("config file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error (it names the key and the line).
        #[source]
        source: toml::de::Error,
    },
    /// A required key is missing.
    #[error("{key} is required: {hint}")]
    Missing {
        /// The key.
        key: Cow<'static, str>,
        /// What it is and how to give it.
        hint: Cow<'static, str>,
    },
    /// A key has a value that breaks a rule.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The key.
        key: Cow<'static, str>,
        /// The value given.
        value: String,
        /// What is wrong and what is expected.
        reason: Cow<'static, str>,
    },
    /// A key's value was refused by its parser; the cause says why (and shows the value).
    #[error("invalid {key}: {source}")]
    Value {
        /// The key.
        key: Cow<'static, str>,
        /// The parser's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A key's value was refused by its parser, which says why.
    #[error("invalid {key} {value:?}: {source}")]
    Unusable {
        /// The key.
        key: Cow<'static, str>,
        /// The value given.
        value: String,
        /// The parser's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A key whose value is not shown (a secret, or an empty value) breaks a rule.
    #[error("invalid {key}: {reason}")]
    Rule {
        /// The key.
        key: Cow<'static, str>,
        /// What is wrong and what is expected.
        reason: Cow<'static, str>,
    },
    /// Keys that cannot be used together, or one that needs another.
    #[error("{0}")]
    Conflict(Cow<'static, str>),
}

impl ConfigError {
    /// [`ConfigError::Value`] for `key` with the parser's error `source`.
    pub fn value(
        key: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Value {
            key: key.into(),
            source: source.into(),
        }
    }

    /// [`ConfigError::Unusable`]: `value` of `key` was refused by its parser with `source`.
    pub fn unusable(
        key: impl Into<Cow<'static, str>>,
        value: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unusable {
            key: key.into(),
            value: value.into(),
            source: source.into(),
        }
    }

    /// [`ConfigError::Invalid`]: `value` of `key` breaks the rule `reason`.
    pub fn invalid(
        key: impl Into<Cow<'static, str>>,
        value: impl Into<String>,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::Invalid {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// [`ConfigError::Missing`]: `key` is required; `hint` says how to give it.
    pub fn missing(key: impl Into<Cow<'static, str>>, hint: impl Into<Cow<'static, str>>) -> Self {
        Self::Missing {
            key: key.into(),
            hint: hint.into(),
        }
    }

    /// [`ConfigError::Rule`]: `key` (its value not shown) breaks the rule `reason`.
    pub fn rule(key: impl Into<Cow<'static, str>>, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Rule {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// [`ConfigError::Conflict`] with its message.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::Conflict(message.into())
    }
}

/// `trust_domain`, the flag before the file: required in both binaries and validated by the
/// SPIFFE-ID rules.
pub fn resolve_trust_domain(
    flag: Option<String>,
    file: Option<String>,
) -> Result<crate::TrustDomain, ConfigError> {
    let td = flag.or(file).ok_or_else(|| {
        ConfigError::missing(
            "trust_domain",
            "set it in the config file or pass --trust-domain",
        )
    })?;
    crate::TrustDomain::new(&td).map_err(|e| ConfigError::unusable("trust_domain", &td, e))
}

/// Reads and parses the TOML file `path` into `T`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        port: Option<u16>,
    }

    #[test]
    fn file_errors_name_the_file_and_keep_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let e = read_toml::<File>(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.toml"), "{e}");
        let io = e.source().and_then(|c| c.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "prot = 1\n").unwrap();
        let e = read_toml::<File>(&bad).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("prot"), "{e}");
        assert!(e
            .source()
            .is_some_and(|c| c.downcast_ref::<toml::de::Error>().is_some()));
    }

    #[test]
    fn value_errors_keep_the_parser_error() {
        let e = ConfigError::value("ready_max_sync_age", crate::ttl::parse("x").unwrap_err());
        assert!(
            e.to_string().starts_with("invalid ready_max_sync_age: "),
            "{e}"
        );
        assert!(e
            .source()
            .is_some_and(|c| c.downcast_ref::<crate::ttl::TtlError>().is_some()));
    }
}
