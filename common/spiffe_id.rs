//! SPIFFE IDs and trust domains, enforcing the SPIFFE-ID standard.
//!
//! A SPIFFE ID is `spiffe://<trust-domain>/<path>`: the scheme is exactly `spiffe`, the trust
//! domain uses lowercase letters, digits, `.`, `-` and `_`, each path segment uses letters,
//! digits, `.`, `-` and `_` and is neither empty nor `.` / `..`, and there is no trailing slash,
//! query, fragment, port, user info or percent-encoding. The whole ID is at most 2048 bytes.
//! Every rejection names the rule that was broken, because operators type these by hand.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme prefix every SPIFFE ID starts with.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Maximum length in bytes of a whole SPIFFE ID (SPIFFE-ID spec, section 2.3).
pub const MAX_ID_LEN: usize = 2048;
/// Maximum length in bytes of a trust domain name (SPIFFE-ID spec, section 2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>")]
    Empty,
    /// The scheme was not `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\" (lowercase scheme), got {0:?}")]
    WrongScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID is missing its trust domain (spiffe://<trust-domain>/...)")]
    MissingTrustDomain,
    /// A trust-domain character outside `[a-z0-9._-]`.
    #[error("trust domain characters are limited to lowercase letters, digits, '.', '-' and '_'; found {0:?}")]
    BadTrustDomainChar(char),
    /// Trust domain longer than 255 bytes.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A `:port` after the trust domain.
    #[error("SPIFFE ID must not contain a port")]
    Port,
    /// A `user@` before the trust domain.
    #[error("SPIFFE ID must not contain user info ('@')")]
    UserInfo,
    /// A `?query`.
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    /// A `#fragment`.
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    /// `//` in the path.
    #[error("path segments must not be empty ('//')")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path segments must not be '.' or '..'")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// A path character outside `[a-zA-Z0-9._-]`.
    #[error("path characters are limited to letters, digits, '.', '-' and '_'; found {0:?}")]
    BadPathChar(char),
    /// Percent-encoded octets.
    #[error("SPIFFE ID must not be percent-encoded ('%')")]
    PercentEncoded,
    /// Longer than 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A trust domain name such as `example.org`. A clone shares the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a trust domain from a bare name (`example.org`) or its ID (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME_PREFIX) || s.to_ascii_lowercase().starts_with(SCHEME_PREFIX) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                // A trust domain ID has no path; accept it but only keep the domain.
                return Ok(id.trust_domain().clone());
            }
            return Ok(id.td);
        }
        validate_trust_domain(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`, used as bundle map keys.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain from a path such as `/ns/web` (validated).
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    td: TrustDomain,
    /// Empty, or `/seg/seg...`.
    path: Arc<str>,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = match s.strip_prefix(SCHEME_PREFIX) {
            Some(rest) => rest,
            None => {
                let scheme = s.split("://").next().unwrap_or(s);
                return Err(SpiffeIdError::WrongScheme(
                    scheme.chars().take(32).collect(),
                ));
            }
        };
        // Query and fragment are checked first: they may contain '/' that would confuse the split.
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(SpiffeIdError::UserInfo);
        }
        if authority.contains(':') {
            return Err(SpiffeIdError::Port);
        }
        validate_trust_domain(authority)?;
        validate_path(path)?;
        Ok(Self {
            td: TrustDomain(Arc::from(authority)),
            path: Arc::from(path),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Makes this ID hold `td`'s copy of its trust domain name when they are the same trust
    /// domain (a holder of many IDs keeps one copy of the name).
    pub fn share_trust_domain(&mut self, td: &TrustDomain) {
        if self.td == *td {
            self.td = td.clone();
        }
    }

    /// True if this is a member of `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.td == td
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.td.0, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split element is empty and skipped.
    for seg in path.split('/').skip(1) {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://example.org/ns/default/sa/web-1",
            "spiffe://a_b-c.d/UPPER/lower/0.9/x_y-z",
            "spiffe://example.org/...",
            "spiffe://example.org/.hidden",
            "spiffe://1.2.3.4/ip-like",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s, "round trip");
        }
    }

    #[test]
    fn splits_trust_domain_and_path() -> Result<(), SpiffeIdError> {
        let id = SpiffeId::parse("spiffe://example.org/ns/web")?;
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/web");
        assert!(id.is_member_of(&TrustDomain::new("example.org")?));
        assert!(!id.is_member_of(&TrustDomain::new("other.org")?));
        Ok(())
    }

    #[test]
    fn rejects_each_rule_with_its_own_error() {
        use SpiffeIdError::*;
        let long_path = format!("spiffe://example.org/{}", "a".repeat(2048));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://example.org/x", WrongScheme("http".into())),
            ("SPIFFE://example.org/x", WrongScheme("SPIFFE".into())),
            (
                "spiffe:/example.org/x",
                WrongScheme("spiffe:/example.org/x".into()),
            ),
            ("example.org/x", WrongScheme("example.org/x".into())),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/x", BadTrustDomainChar('E')),
            ("spiffe://exa mple.org/x", BadTrustDomainChar(' ')),
            ("spiffe://exämple.org/x", BadTrustDomainChar('ä')),
            ("spiffe://example.org:8080/x", Port),
            ("spiffe://user@example.org/x", UserInfo),
            ("spiffe://user:pw@example.org/x", UserInfo),
            ("spiffe://example.org/x?a=b", Query),
            ("spiffe://example.org/x#frag", Fragment),
            ("spiffe://example.org?x", Query),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org//", TrailingSlash),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/a/./b", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/.", DotSegment),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org/a:b", BadPathChar(':')),
            ("spiffe://example.org/a*b", BadPathChar('*')),
            ("spiffe://example.org/ünïcode", BadPathChar('ü')),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://example.org/a\nb", BadPathChar('\n')),
            (long_path.as_str(), TooLong),
            (long_td.as_str(), TrustDomainTooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn error_messages_name_the_rule() {
        let e = SpiffeId::parse("spiffe://example.org/a/").unwrap_err();
        assert!(e.to_string().contains("must not end with '/'"), "{e}");
        let e = SpiffeId::parse("spiffe://EXAMPLE.org").unwrap_err();
        assert!(e.to_string().contains("lowercase"), "{e}");
    }

    #[test]
    fn max_length_is_inclusive() -> Result<(), SpiffeIdError> {
        let prefix = "spiffe://example.org/";
        let ok = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(ok.len(), MAX_ID_LEN);
        SpiffeId::parse(&ok)?;
        Ok(())
    }

    #[test]
    fn trust_domain_forms() -> Result<(), SpiffeIdError> {
        assert_eq!(TrustDomain::new("example.org")?.name(), "example.org");
        assert_eq!(
            TrustDomain::new("spiffe://example.org")?.name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("example.org")?.id_string(),
            "spiffe://example.org"
        );
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::MissingTrustDomain));
        assert_eq!(
            TrustDomain::new("a/b"),
            Err(SpiffeIdError::BadTrustDomainChar('/'))
        );
        assert_eq!(TrustDomain::new("a:1"), Err(SpiffeIdError::Port));
        let id = TrustDomain::new("example.org")?.id("/sigil/server")?;
        assert_eq!(id.to_string(), "spiffe://example.org/sigil/server");
        Ok(())
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        // A cheap stand-in for fuzzing: every prefix of some hostile strings.
        let hostile = "spiffe://ex\u{0}am%ple.org:/@?#//../\u{fffd}💥/a/b/c";
        for end in 0..=hostile.len() {
            if hostile.is_char_boundary(end) {
                let _ = SpiffeId::parse(&hostile[..end]);
                let _ = TrustDomain::new(&hostile[..end]);
            }
        }
    }
}
