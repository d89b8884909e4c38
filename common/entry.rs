//! Registration entries: which SPIFFE ID a workload (or node) with given selectors gets.
//!
//! [`RegistrationEntry`] is the validated model. It is built from the admin/node API's protobuf
//! [`proto::Entry`](crate::proto::admin::Entry) with [`RegistrationEntry::from_proto`], which
//! names the offending field in every error so the CLI can print one clear line.

use crate::proto::admin as pb;
use crate::selector::{Selector, SelectorError, SelectorSet};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use std::time::Duration;

/// Longest accepted hint.
pub const MAX_HINT_LEN: usize = 1024;
/// Most DNS names on one entry.
pub const MAX_DNS_NAMES: usize = 64;

/// An invalid field of an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct EntryError {
    /// The field as the CLI and API name it (`spiffe_id`, `selectors`, ...).
    pub field: &'static str,
    /// What rule was broken.
    pub reason: String,
}

impl EntryError {
    fn new(field: &'static str, reason: impl ToString) -> Self {
        Self {
            field,
            reason: reason.to_string(),
        }
    }
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Server-assigned id (UUID); empty before creation.
    pub id: String,
    /// The identity the entry grants.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) under which the entry applies.
    pub parent_id: SpiffeId,
    /// All of these must be present on the workload for the entry to match.
    pub selectors: SelectorSet,
    /// X.509-SVID TTL; `None` means the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID TTL; `None` means the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs added to the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Grants admin rights (reserved for future admin-over-mTLS).
    pub admin: bool,
    /// The workload is a downstream (nested) server.
    pub downstream: bool,
    /// Trust domains whose bundles the workload also receives.
    pub federates_with: Vec<TrustDomain>,
    /// Operator hint to tell several SVIDs apart.
    pub hint: String,
    /// Revision, incremented on each change (server-set).
    pub revision: i64,
    /// Creation time, Unix seconds (server-set).
    pub created_at: i64,
    /// Last update time, Unix seconds (server-set).
    pub updated_at: i64,
}

impl RegistrationEntry {
    /// A new entry, not yet stored: server-default TTLs, no DNS names, flags, federation or
    /// hint; id, revision and times are assigned by the datastore.
    pub fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: SelectorSet) -> Self {
        Self {
            id: String::new(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: Vec::new(),
            admin: false,
            downstream: false,
            federates_with: Vec::new(),
            hint: String::new(),
            revision: 0,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// Validates a protobuf entry. Server-set fields (id, revision, times) are copied as given.
    pub fn from_proto(e: &pb::Entry) -> Result<Self, EntryError> {
        let spiffe_id =
            SpiffeId::parse(&e.spiffe_id).map_err(|err| EntryError::new("spiffe_id", err))?;
        let parent_id =
            SpiffeId::parse(&e.parent_id).map_err(|err| EntryError::new("parent_id", err))?;
        if spiffe_id.path().is_empty() {
            return Err(EntryError::new(
                "spiffe_id",
                "a registration entry needs a path (spiffe://<td>/<path>), not a bare trust domain",
            ));
        }
        let selectors =
            selectors_from_proto(&e.selectors).map_err(|r| EntryError::new("selectors", r))?;
        if selectors.is_empty() {
            return Err(EntryError::new(
                "selectors",
                "at least one selector is required (e.g. unix:uid:1000)",
            ));
        }
        let x509_svid_ttl =
            ttl_from_proto(e.x509_svid_ttl).map_err(|r| EntryError::new("x509_svid_ttl", r))?;
        let jwt_svid_ttl =
            ttl_from_proto(e.jwt_svid_ttl).map_err(|r| EntryError::new("jwt_svid_ttl", r))?;
        if e.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::new(
                "dns_names",
                format!("at most {MAX_DNS_NAMES} DNS names"),
            ));
        }
        for name in &e.dns_names {
            validate_dns_name(name).map_err(|r| EntryError::new("dns_names", r))?;
        }
        let mut dns_names = e.dns_names.clone();
        dns_names.dedup();
        let mut federates_with = Vec::with_capacity(e.federates_with.len());
        for td in &e.federates_with {
            let td = TrustDomain::new(td).map_err(|err| EntryError::new("federates_with", err))?;
            if td == *spiffe_id.trust_domain() {
                return Err(EntryError::new(
                    "federates_with",
                    format!("{td} is the entry's own trust domain"),
                ));
            }
            if !federates_with.contains(&td) {
                federates_with.push(td);
            }
        }
        if e.hint.len() > MAX_HINT_LEN || e.hint.chars().any(char::is_control) {
            return Err(EntryError::new(
                "hint",
                format!("at most {MAX_HINT_LEN} bytes, no control characters"),
            ));
        }
        Ok(Self {
            id: e.id.clone(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            admin: e.admin,
            downstream: e.downstream,
            federates_with,
            hint: e.hint.clone(),
            revision: e.revision_number,
            created_at: e.created_at,
            updated_at: e.updated_at,
        })
    }

    /// Converts to the protobuf form.
    pub fn to_proto(&self) -> pb::Entry {
        pb::Entry {
            id: self.id.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self.selectors.iter().map(selector_to_proto).collect(),
            x509_svid_ttl: self.x509_svid_ttl.map_or(0, |d| d.as_secs() as i64),
            jwt_svid_ttl: self.jwt_svid_ttl.map_or(0, |d| d.as_secs() as i64),
            dns_names: self.dns_names.clone(),
            admin: self.admin,
            downstream: self.downstream,
            federates_with: self
                .federates_with
                .iter()
                .map(TrustDomain::id_string)
                .collect(),
            hint: self.hint.clone(),
            revision_number: self.revision,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Refuses an X509-SVID TTL below [`crate::ttl::MIN_X509_SVID_TTL`]. Not part of
    /// [`Self::from_proto`]: an entry stored before the floor existed must still sync to agents
    /// (the CA raises its TTL to the floor when signing); only new values are refused.
    pub fn check_x509_svid_ttl_floor(&self) -> Result<(), EntryError> {
        match self.x509_svid_ttl {
            Some(d) => {
                crate::ttl::check_x509_svid_ttl(d).map_err(|e| EntryError::new("x509_svid_ttl", e))
            }
            None => Ok(()),
        }
    }

    /// Refuses a JWT-SVID TTL below [`crate::ttl::MIN_JWT_SVID_TTL`] (see
    /// [`Self::check_x509_svid_ttl_floor`]).
    pub fn check_jwt_svid_ttl_floor(&self) -> Result<(), EntryError> {
        match self.jwt_svid_ttl {
            Some(d) => {
                crate::ttl::check_jwt_svid_ttl(d).map_err(|e| EntryError::new("jwt_svid_ttl", e))
            }
            None => Ok(()),
        }
    }

    /// True when the entry and `other` register the same thing (SPIFFE ID, parent, selectors).
    pub fn same_registration(&self, other: &RegistrationEntry) -> bool {
        self.spiffe_id == other.spiffe_id
            && self.parent_id == other.parent_id
            && self.selectors == other.selectors
    }
}

/// Converts a selector to its protobuf form.
pub fn selector_to_proto(s: &Selector) -> pb::Selector {
    pb::Selector {
        r#type: s.kind().to_string(),
        value: s.value().to_string(),
    }
}

/// Validates protobuf selectors into a set.
pub fn selectors_from_proto(v: &[pb::Selector]) -> Result<SelectorSet, SelectorError> {
    v.iter()
        .map(|s| Selector::new(&s.r#type, &s.value))
        .collect()
}

/// A TTL in a request that is out of range.
#[derive(Debug, thiserror::Error)]
enum BadTtl {
    #[error("{0} is negative; give a positive TTL or 0 for the default")]
    Negative(i64),
    #[error("{0}s is longer than 366 days")]
    TooLong(i64),
}

fn ttl_from_proto(secs: i64) -> Result<Option<Duration>, BadTtl> {
    match secs {
        0 => Ok(None),
        s if s < 0 => Err(BadTtl::Negative(s)),
        s if s as u64 > crate::ttl::MAX.as_secs() => Err(BadTtl::TooLong(s)),
        s => Ok(Some(Duration::from_secs(s as u64))),
    }
}

/// A `dns_names` value that is not a DNS name.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is not a DNS name (letters, digits, '-', '.', optional leading '*.')",
    crate::text::quote_for_display(.0)
)]
struct InvalidDnsName(String);

fn validate_dns_name(name: &str) -> Result<(), InvalidDnsName> {
    let bad = || InvalidDnsName(name.to_string());
    let body = name.strip_prefix("*.").unwrap_or(name);
    if body.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in body.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/abc".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            dns_names: vec!["web.example.org".into(), "*.svc.local".into()],
            federates_with: vec!["spiffe://other.org".into(), "third.org".into()],
            x509_svid_ttl: 600,
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_a_valid_entry() -> Result<(), EntryError> {
        let e = RegistrationEntry::from_proto(&valid())?;
        assert_eq!(e.x509_svid_ttl, Some(Duration::from_secs(600)));
        assert_eq!(e.jwt_svid_ttl, None);
        let back = e.to_proto();
        assert_eq!(
            back.federates_with,
            vec!["spiffe://other.org", "spiffe://third.org"]
        );
        assert_eq!(RegistrationEntry::from_proto(&back)?, e);
        Ok(())
    }

    #[test]
    fn ttl_floors_are_checked_separately_from_parsing() -> Result<(), EntryError> {
        let mut p = valid();
        p.x509_svid_ttl = 20;
        p.jwt_svid_ttl = 5;
        // A stored entry with short TTLs still parses (agents must keep syncing it)...
        let e = RegistrationEntry::from_proto(&p)?;
        // ...but new values below the floors are refused, naming the field.
        let err = e.check_x509_svid_ttl_floor().expect_err("20 s");
        assert_eq!(err.field, "x509_svid_ttl");
        assert!(err.to_string().contains("minimum of 1m"), "{err}");
        let err = e.check_jwt_svid_ttl_floor().expect_err("5 s");
        assert_eq!(err.field, "jwt_svid_ttl");
        assert!(err.to_string().contains("minimum of 30s"), "{err}");
        p.x509_svid_ttl = 60;
        p.jwt_svid_ttl = 0;
        let e = RegistrationEntry::from_proto(&p)?;
        e.check_x509_svid_ttl_floor()?;
        e.check_jwt_svid_ttl_floor()?;
        Ok(())
    }

    #[test]
    fn names_the_bad_field() {
        type Mutation = Box<dyn Fn(&mut pb::Entry)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = "spiffe://example.org/a/".into()),
            ),
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = "spiffe://example.org".into()),
            ),
            ("parent_id", Box::new(|e| e.parent_id = "not-an-id".into())),
            ("selectors", Box::new(|e| e.selectors.clear())),
            (
                "selectors",
                Box::new(|e| {
                    e.selectors[0].r#type = String::new();
                }),
            ),
            ("x509_svid_ttl", Box::new(|e| e.x509_svid_ttl = -1)),
            ("jwt_svid_ttl", Box::new(|e| e.jwt_svid_ttl = i64::MAX)),
            (
                "dns_names",
                Box::new(|e| e.dns_names = vec!["bad name".into()]),
            ),
            ("dns_names", Box::new(|e| e.dns_names = vec!["-a.b".into()])),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["Bad".into()]),
            ),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["example.org".into()]),
            ),
            ("hint", Box::new(|e| e.hint = "a\u{7}".into())),
        ];
        for (field, mutate) in cases {
            let mut e = valid();
            mutate(&mut e);
            let err = RegistrationEntry::from_proto(&e).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let mut e = valid();
        e.dns_names = vec!["bad name".into()];
        let err = RegistrationEntry::from_proto(&e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid dns_names: \"bad name\" is not a DNS name (letters, digits, '-', '.', optional leading '*.')"
        );
    }
}
