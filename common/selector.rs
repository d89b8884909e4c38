//! Selectors (`type:value`) and selector sets.
//!
//! A selector names one observed property of a node or a process, e.g. `unix:uid:1000` is type
//! `unix`, value `uid:1000`: the type ends at the first colon and the value may contain more.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Maximum length of a selector type.
pub const MAX_TYPE_LEN: usize = 64;
/// Maximum length of a selector value.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No colon at all.
    #[error("selector {0:?} must have the form type:value (e.g. unix:uid:1000)")]
    MissingColon(String),
    /// Nothing before the first colon.
    #[error("selector {0:?} has an empty type; expected type:value (e.g. unix:uid:1000)")]
    EmptyType(String),
    /// Nothing after the first colon.
    #[error("selector {0:?} has an empty value; expected type:value (e.g. unix:uid:1000)")]
    EmptyValue(String),
    /// Type characters outside `[a-zA-Z0-9_-]`.
    #[error("selector type {0:?} may only contain letters, digits, '_' and '-'")]
    BadType(String),
    /// Control characters or whitespace at either end of the value.
    #[error(
        "selector value {0:?} must not contain control characters or leading/trailing whitespace"
    )]
    BadValue(String),
    /// Type or value too long.
    #[error(
        "selector is too long (type at most {MAX_TYPE_LEN} bytes, value at most {MAX_VALUE_LEN})"
    )]
    TooLong,
}

/// A validated selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type and value, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let whole = || format!("{kind}:{value}");
        if kind.is_empty() {
            return Err(SelectorError::EmptyType(whole()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(whole()));
        }
        if kind.len() > MAX_TYPE_LEN || value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::TooLong);
        }
        if !kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(SelectorError::BadType(kind.to_string()));
        }
        if value.chars().any(char::is_control) || value.trim() != value {
            return Err(SelectorError::BadValue(value.to_string()));
        }
        Ok(Self {
            kind: kind.to_string(),
            value: value.to_string(),
        })
    }

    /// Parses `type:value`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        match s.split_once(':') {
            Some((kind, value)) => Self::new(kind, value),
            None => Err(SelectorError::MissingColon(s.to_string())),
        }
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A sorted, de-duplicated set of selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SelectorSet(BTreeSet<Selector>);

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector; returns false if it was already present.
    pub fn insert(&mut self, s: Selector) -> bool {
        self.0.insert(s)
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True if `s` is in the set.
    pub fn contains(&self, s: &Selector) -> bool {
        self.0.contains(s)
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// True if every selector of `self` is in `other` (how an entry matches a workload).
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        self.0.is_subset(&other.0)
    }

    /// True if every selector of `other` is in `self`.
    pub fn is_superset_of(&self, other: &SelectorSet) -> bool {
        self.0.is_superset(&other.0)
    }

    /// True if the sets share at least one selector.
    pub fn intersects(&self, other: &SelectorSet) -> bool {
        self.0.iter().any(|s| other.0.contains(s))
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::collections::btree_set::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_may_contain_colons() -> Result<(), SelectorError> {
        let s = Selector::parse("k8s:pod-label:app:web")?;
        assert_eq!(s.kind(), "k8s");
        assert_eq!(s.value(), "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
        Ok(())
    }

    #[test]
    fn rejects_bad_selectors() {
        for (input, what) in [
            ("", "form type:value"),
            ("unix", "form type:value"),
            (":uid:0", "empty type"),
            ("unix:", "empty value"),
            ("un ix:uid:0", "letters, digits"),
            ("unix/x:uid:0", "letters, digits"),
            ("unix: uid:0", "whitespace"),
            ("unix:uid:0 ", "whitespace"),
            ("unix:uid\n0", "control"),
        ] {
            let e = Selector::parse(input).expect_err(input);
            assert!(e.to_string().contains(what), "{input:?}: {e}");
        }
        assert_eq!(
            Selector::parse(&format!("unix:{}", "x".repeat(MAX_VALUE_LEN + 1))),
            Err(SelectorError::TooLong)
        );
    }

    #[test]
    fn set_relations() -> Result<(), SelectorError> {
        let set = |v: &[&str]| -> Result<SelectorSet, SelectorError> {
            v.iter().map(|s| Selector::parse(s)).collect()
        };
        let entry = set(&["unix:uid:0", "unix:gid:0"])?;
        let process = set(&["unix:uid:0", "unix:gid:0", "unix:path:/bin/sh"])?;
        assert!(entry.is_subset_of(&process));
        assert!(!process.is_subset_of(&entry));
        assert!(process.is_superset_of(&entry));
        assert!(entry.intersects(&set(&["unix:gid:0", "x:y"])?));
        assert!(!entry.intersects(&set(&["x:y"])?));
        // Duplicates collapse and order is canonical.
        let dup = set(&["b:1", "a:1", "b:1"])?;
        assert_eq!(dup.len(), 2);
        assert_eq!(dup.to_string(), "a:1, b:1");
        Ok(())
    }
}
