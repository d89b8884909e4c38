//! Federation relationships: with which trust domains this one federates, and how.
//!
//! A relationship names a foreign trust domain, the URL of its bundle endpoint and the
//! endpoint's profile (SPIRE's fields: `bundle_endpoint_url`, `bundle_endpoint_profile`
//! `https_web` or `https_spiffe`, `endpoint_spiffe_id` for `https_spiffe`). The same rules hold
//! wherever one comes from, and each error names the field (the admin API's and the config
//! file's keys have the same names):
//!
//! - the trust domain is valid, has no path, and is not this server's own;
//! - the URL is `https://` with a host (no user info, no fragment);
//! - `https_spiffe` needs `endpoint_spiffe_id`; `https_web` refuses one.
//!
//! Relationships live in two places. Those created through the admin API (`sigil-server
//! federation create`) are stored in the datastore and shared by every server on it. Those in
//! the config file (`[federation.federates_with."other.org"]`) live only in that server's
//! memory, as SPIRE's do: the admin API shows them (source `config`) but refuses to create,
//! update or delete one for their trust domain, and where both name one trust domain the
//! config file's is followed (the stored one is ignored, with a warning).

use std::str::FromStr;

use sigil::bundle::Bundle;
use sigil::{SpiffeId, TrustDomain};

use super::EndpointProfile;
use crate::datastore::FederationRelationship;

/// Profile name of [`EndpointProfile::HttpsWeb`].
pub const HTTPS_WEB: &str = "https_web";
/// Profile name of [`EndpointProfile::HttpsSpiffe`].
pub const HTTPS_SPIFFE: &str = "https_spiffe";

/// Where a relationship is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The datastore (admin API): managed with `sigil-server federation`.
    Datastore,
    /// The server's config file: read only through the admin API.
    Config,
}

impl Source {
    /// `datastore` or `config`, as the admin API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Datastore => "datastore",
            Source::Config => "config",
        }
    }
}

/// A relationship from the config file, with the initial bundle its
/// `trust_domain_bundle_path` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredRelationship {
    /// The relationship (times 0: it is not stored).
    pub relationship: FederationRelationship,
    /// The foreign trust domain's bundle to start from, stored at start-up unless a federated
    /// bundle of that trust domain is stored already (a fetched one is newer).
    pub initial_bundle: Option<Bundle>,
}

/// A relationship field that breaks a rule. [`RelationshipError::field`] names the field.
#[derive(Debug, thiserror::Error)]
pub enum RelationshipError {
    /// No trust domain given.
    #[error("trust_domain is required (e.g. other.org or spiffe://other.org)")]
    MissingTrustDomain,
    /// Not a trust domain name.
    #[error("invalid trust_domain {value:?}: {reason}")]
    InvalidTrustDomain {
        /// What was given (bounded).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// This server's own trust domain.
    #[error(
        "trust_domain {0} is this server's own trust domain; federation relationships are with \
         other trust domains"
    )]
    OwnTrustDomain(TrustDomain),
    /// Not an `https://` URL with a host.
    #[error("invalid bundle_endpoint_url {value:?}: {reason}")]
    InvalidUrl {
        /// What was given (bounded).
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Not `https_web` or `https_spiffe`.
    #[error("invalid bundle_endpoint_profile {0:?}: expected https_web or https_spiffe")]
    UnknownProfile(String),
    /// `https_spiffe` without `endpoint_spiffe_id`.
    #[error(
        "endpoint_spiffe_id is required with bundle_endpoint_profile https_spiffe: the SPIFFE ID \
         the bundle endpoint presents, e.g. spiffe://other.org/spire/server"
    )]
    MissingEndpointId,
    /// `https_web` with `endpoint_spiffe_id`.
    #[error(
        "endpoint_spiffe_id is only for bundle_endpoint_profile https_spiffe; an https_web \
         endpoint is authenticated by its Web PKI certificate"
    )]
    EndpointIdWithWeb,
    /// Not a SPIFFE ID.
    #[error("invalid endpoint_spiffe_id {value:?}: {reason}")]
    InvalidEndpointId {
        /// What was given (bounded).
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Not `pem` or `spiffe`.
    #[error("invalid trust_domain_bundle_format {0:?}: expected pem or spiffe")]
    UnknownBundleFormat(String),
    /// The initial bundle does not parse or is empty.
    #[error("invalid trust domain bundle for {trust_domain}: {reason}")]
    InvalidBundle {
        /// Whose bundle it was meant to be.
        trust_domain: TrustDomain,
        /// Why it is refused.
        reason: String,
    },
}

impl RelationshipError {
    /// The field (admin API) or key (config file, under `federation.federates_with."<td>"`)
    /// that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            RelationshipError::MissingTrustDomain
            | RelationshipError::InvalidTrustDomain { .. }
            | RelationshipError::OwnTrustDomain(_) => "trust_domain",
            RelationshipError::InvalidUrl { .. } => "bundle_endpoint_url",
            RelationshipError::UnknownProfile(_) => "bundle_endpoint_profile",
            RelationshipError::MissingEndpointId
            | RelationshipError::EndpointIdWithWeb
            | RelationshipError::InvalidEndpointId { .. } => "endpoint_spiffe_id",
            RelationshipError::UnknownBundleFormat(_) => "trust_domain_bundle_format",
            RelationshipError::InvalidBundle { .. } => "trust_domain_bundle",
        }
    }
}

/// The foreign trust domain of a relationship: a bare name or its ID `spiffe://name` (without
/// a path), and never `own`.
pub fn parse_trust_domain(own: &TrustDomain, s: &str) -> Result<TrustDomain, RelationshipError> {
    if s.is_empty() {
        return Err(RelationshipError::MissingTrustDomain);
    }
    // TrustDomain::new would quietly drop a path; a workload ID here is a mistake.
    if let Ok(id) = SpiffeId::parse(s) {
        if !id.path().is_empty() {
            return Err(RelationshipError::InvalidTrustDomain {
                value: sigil::text::echo(s).into_owned(),
                reason: format!(
                    "a trust domain has no path; use {}",
                    id.trust_domain().id_string()
                ),
            });
        }
    }
    let td = TrustDomain::new(s).map_err(|e| RelationshipError::InvalidTrustDomain {
        value: sigil::text::echo(s).into_owned(),
        reason: e.to_string(),
    })?;
    if &td == own {
        return Err(RelationshipError::OwnTrustDomain(td));
    }
    Ok(td)
}

/// Checks a bundle endpoint URL: `https://` with a host, no user info, no fragment.
pub fn check_url(s: &str) -> Result<(), RelationshipError> {
    let bad = |reason| RelationshipError::InvalidUrl {
        value: sigil::text::echo(s).into_owned(),
        reason,
    };
    if s.contains('#') {
        return Err(bad("a bundle endpoint URL has no fragment"));
    }
    let uri: hyper::Uri = s
        .parse()
        .map_err(|_| bad("not a URL; expected e.g. https://other.org:8443"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "the scheme must be https (bundle endpoints are served over TLS)",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("the URL has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("user info (user@host) is not allowed in the URL"));
    }
    if authority.host().is_empty() {
        return Err(bad("the URL has no host"));
    }
    Ok(())
}

/// The profile named `name` (`https_web`, `https_spiffe`) with its endpoint SPIFFE ID (empty or
/// `None`: not given).
pub fn parse_profile(
    name: &str,
    endpoint_spiffe_id: Option<&str>,
) -> Result<EndpointProfile, RelationshipError> {
    let endpoint_spiffe_id = endpoint_spiffe_id.filter(|s| !s.is_empty());
    match name {
        HTTPS_WEB => match endpoint_spiffe_id {
            None => Ok(EndpointProfile::HttpsWeb),
            Some(_) => Err(RelationshipError::EndpointIdWithWeb),
        },
        HTTPS_SPIFFE => {
            let s = endpoint_spiffe_id.ok_or(RelationshipError::MissingEndpointId)?;
            let id = SpiffeId::parse(s).map_err(|e| RelationshipError::InvalidEndpointId {
                value: sigil::text::echo(s).into_owned(),
                reason: e.to_string(),
            })?;
            Ok(EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: id,
            })
        }
        other => Err(RelationshipError::UnknownProfile(
            sigil::text::echo(other).into_owned(),
        )),
    }
}

/// The profile's name and endpoint SPIFFE ID (empty for `https_web`), as shown.
pub fn profile_fields(p: &EndpointProfile) -> (&'static str, String) {
    match p {
        EndpointProfile::HttpsWeb => (HTTPS_WEB, String::new()),
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            (HTTPS_SPIFFE, endpoint_spiffe_id.to_string())
        }
    }
}

/// A relationship from its fields, each checked by the rules above (times 0: the datastore
/// sets them).
pub fn relationship(
    own: &TrustDomain,
    trust_domain: &str,
    bundle_endpoint_url: &str,
    profile: &str,
    endpoint_spiffe_id: Option<&str>,
) -> Result<FederationRelationship, RelationshipError> {
    let trust_domain = parse_trust_domain(own, trust_domain)?;
    check_url(bundle_endpoint_url)?;
    let profile = parse_profile(profile, endpoint_spiffe_id)?;
    Ok(FederationRelationship {
        trust_domain,
        bundle_endpoint_url: bundle_endpoint_url.to_string(),
        profile,
        created_at: 0,
        updated_at: 0,
    })
}

/// The formats of a trust domain bundle given by hand (as `bundle set` reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BundleFormat {
    /// PEM `CERTIFICATE` blocks: X.509 roots only.
    #[default]
    Pem,
    /// A SPIFFE bundle document (JWKS).
    Spiffe,
}

impl FromStr for BundleFormat {
    type Err = RelationshipError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pem" => Ok(BundleFormat::Pem),
            "spiffe" => Ok(BundleFormat::Spiffe),
            other => Err(RelationshipError::UnknownBundleFormat(
                sigil::text::echo(other).into_owned(),
            )),
        }
    }
}

/// Parses the bundle of `td` in `format`, refusing one with no X.509 root and no JWT key (it
/// would authenticate nothing) and one that cannot be shown as a SPIFFE bundle (agents could
/// not serve it).
pub fn parse_bundle(
    td: &TrustDomain,
    format: BundleFormat,
    content: &str,
) -> Result<Bundle, RelationshipError> {
    let bad = |reason: String| RelationshipError::InvalidBundle {
        trust_domain: td.clone(),
        reason,
    };
    let bundle = match format {
        BundleFormat::Pem => Bundle {
            x509_authorities: sigil::x509::parse_pem_certs(content)
                .map_err(|e| bad(format!("PEM: {e}")))?,
            ..Bundle::new(td.clone())
        },
        BundleFormat::Spiffe => Bundle::from_spiffe_json(td.clone(), content)
            .map_err(|e| bad(format!("SPIFFE bundle: {e}")))?,
    };
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(bad("it has no X.509 roots and no JWT keys".into()));
    }
    bundle.to_spiffe_json().map_err(|e| bad(e.to_string()))?;
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> TrustDomain {
        TrustDomain::new("example.org").expect("td")
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
            ("", "https://o.org", HTTPS_WEB, None, "trust_domain"),
            ("Bad Name", "https://o.org", HTTPS_WEB, None, "trust_domain"),
            (
                "spiffe://o.org/w",
                "https://o.org",
                HTTPS_WEB,
                None,
                "trust_domain",
            ),
            (
                "example.org",
                "https://o.org",
                HTTPS_WEB,
                None,
                "trust_domain",
            ),
            (
                "o.org",
                "http://o.org",
                HTTPS_WEB,
                None,
                "bundle_endpoint_url",
            ),
            ("o.org", "https://", HTTPS_WEB, None, "bundle_endpoint_url"),
            ("o.org", "o.org:443", HTTPS_WEB, None, "bundle_endpoint_url"),
            (
                "o.org",
                "https://u@o.org",
                HTTPS_WEB,
                None,
                "bundle_endpoint_url",
            ),
            (
                "o.org",
                "https://o.org/#x",
                HTTPS_WEB,
                None,
                "bundle_endpoint_url",
            ),
            (
                "o.org",
                "https://o.org",
                "https",
                None,
                "bundle_endpoint_profile",
            ),
            (
                "o.org",
                "https://o.org",
                HTTPS_SPIFFE,
                None,
                "endpoint_spiffe_id",
            ),
            (
                "o.org",
                "https://o.org",
                HTTPS_SPIFFE,
                Some("o.org/x"),
                "endpoint_spiffe_id",
            ),
            (
                "o.org",
                "https://o.org",
                HTTPS_WEB,
                Some("spiffe://o.org/s"),
                "endpoint_spiffe_id",
            ),
        ];
        for (td, url, profile, id, field) in cases {
            let err = relationship(&own(), td, url, profile, *id)
                .expect_err(&format!("{td} {url} {profile} {id:?} should be refused"));
            assert_eq!(err.field(), *field, "{td} {url} {profile} {id:?}: {err}");
        }
    }

    #[test]
    fn valid_relationships_keep_their_fields() {
        let r = relationship(
            &own(),
            "spiffe://other.org",
            "https://other.org:8443/bundle",
            HTTPS_SPIFFE,
            Some("spiffe://other.org/spire/server"),
        )
        .expect("valid");
        assert_eq!(r.trust_domain.name(), "other.org");
        assert_eq!(
            profile_fields(&r.profile),
            (HTTPS_SPIFFE, "spiffe://other.org/spire/server".to_string())
        );
        let w = relationship(
            &own(),
            "other.org",
            "https://127.0.0.1:1/",
            HTTPS_WEB,
            Some(""),
        )
        .expect("an empty endpoint ID is no endpoint ID");
        assert_eq!(w.profile, EndpointProfile::HttpsWeb);
    }

    #[test]
    fn bundles_must_parse_and_hold_something() {
        let td = TrustDomain::new("other.org").expect("td");
        let err = parse_bundle(&td, BundleFormat::Spiffe, r#"{"keys":[]}"#).expect_err("empty");
        assert!(err.to_string().contains("no X.509 roots"), "{err}");
        let err = parse_bundle(&td, BundleFormat::Pem, "not pem").expect_err("not pem");
        assert_eq!(err.field(), "trust_domain_bundle");
        assert!("json".parse::<BundleFormat>().is_err());
        assert_eq!(
            "spiffe".parse::<BundleFormat>().ok(),
            Some(BundleFormat::Spiffe)
        );
    }
}
