//! Selectors (`type:value`) and selector sets.
//!
//! A selector names one observed property of a node or a process, e.g. `unix:uid:1000` is type
//! `unix`, value `uid:1000`: the type ends at the first colon and the value may contain more.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::text::quote_for_display;

/// Maximum length of a selector type.
pub const MAX_TYPE_LEN: usize = 64;
/// Maximum length of a selector value.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No colon at all.
    #[error(
        "selector {} must have the form type:value (e.g. unix:uid:1000)",
        quote_for_display(.0)
    )]
    MissingColon(String),
    /// Nothing before the first colon.
    #[error(
        "selector {} has an empty type; expected type:value (e.g. unix:uid:1000)",
        quote_for_display(.0)
    )]
    EmptyType(String),
    /// Nothing after the first colon.
    #[error(
        "selector {} has an empty value; expected type:value (e.g. unix:uid:1000)",
        quote_for_display(.0)
    )]
    EmptyValue(String),
    /// Type characters outside `[a-zA-Z0-9_-]`.
    #[error(
        "selector type {} may only contain letters, digits, '_' and '-'",
        quote_for_display(.0)
    )]
    BadType(String),
    /// Control characters or whitespace at either end of the value.
    #[error(
        "selector value {} must not contain control characters or leading/trailing whitespace",
        quote_for_display(.0)
    )]
    BadValue(String),
    /// Type or value too long.
    #[error(
        "selector is too long (type at most {MAX_TYPE_LEN} bytes, value at most {MAX_VALUE_LEN})"
    )]
    TooLong,
    /// A type Sigil's attestors produce, with a key none of them produces.
    #[error(
        "selector {}: {kind} has no key {}; {kind} selectors are {known}",
        quote_for_display(selector),
        quote_for_display(key)
    )]
    UnknownKey {
        /// The whole selector.
        selector: String,
        /// Its type.
        kind: String,
        /// The key it names.
        key: String,
        /// The forms this type's selectors take.
        known: String,
    },
    /// A known type and key with a value the attestor never produces (so it would never match).
    #[error("selector {}: {reason}", quote_for_display(selector))]
    InvalidValue {
        /// The whole selector.
        selector: String,
        /// What the value must look like.
        reason: String,
    },
}

/// A validated selector.
///
/// Held as one shared string `type:value` (the type never contains a colon, so the first one
/// splits them): an agent holds several per entry and indexes them, and a clone shares the
/// text instead of copying it.
#[derive(Clone)]
pub struct Selector {
    text: Arc<str>,
}

impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Selector {}

impl std::hash::Hash for Selector {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Selector {
    /// By type, then value. Compared as text in one pass (an agent's indexes compare selectors
    /// on every lookup), with the colon that ends a type sorting before any byte a type may
    /// hold: a type never contains a colon, so within the types the first colon is that end.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.text.as_bytes(), other.text.as_bytes());
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        match (a.get(common), b.get(common)) {
            (Some(&x), Some(&y)) if !a[..common].contains(&b':') => {
                let rank = |c: u8| if c == b':' { 0 } else { u16::from(c) + 1 };
                rank(x).cmp(&rank(y))
            }
            (Some(x), Some(y)) => x.cmp(y),
            _ => a.len().cmp(&b.len()),
        }
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("kind", &self.kind())
            .field("value", &self.value())
            .finish()
    }
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
        let mut text = String::with_capacity(kind.len() + 1 + value.len());
        text.push_str(kind);
        text.push(':');
        text.push_str(value);
        Ok(Self {
            text: Arc::from(text),
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
        self.text
            .split_once(':')
            .map_or(&*self.text, |(kind, _)| kind)
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        self.text.split_once(':').map_or("", |(_, value)| value)
    }

    /// The whole selector, `type:value`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Checks a selector being registered (an entry's, a node alias's) against what Sigil's
    /// attestors produce: for a type in [`KNOWN_TYPES`] the key must be one its attestor
    /// reports and the value of the form it reports (`unix:uid:abc`, `unix:path:relative`,
    /// `unix:nosuchkey:1` would never match anything, so they are refused). A type no Sigil
    /// attestor produces is [`Registrable::UnknownType`]: allowed (entries may be shared with
    /// SPIRE, whose plug-ins add types) but worth a warning, as no Sigil agent reports it.
    ///
    /// Not part of [`Selector::new`]: entries already stored, and selectors in filters, are
    /// read whatever they hold.
    pub fn check_registrable(&self) -> Result<Registrable, SelectorError> {
        let Some(keys) = known_keys(self.kind()) else {
            return Ok(Registrable::UnknownType);
        };
        let invalid = |reason: String| SelectorError::InvalidValue {
            selector: self.to_string(),
            reason,
        };
        if self.kind() == "spiffe_id" {
            // The node-alias selector of a join-token agent: the agent's own ID, no key.
            return crate::SpiffeId::parse(self.value())
                .map(|_| Registrable::Known)
                .map_err(|e| invalid(format!("the value must be a SPIFFE ID: {e}")));
        }
        let found = keys.iter().find_map(|(key, rule)| {
            let rest = self.value().strip_prefix(key)?;
            if rest.is_empty() {
                return Some((key, rule, None));
            }
            rest.strip_prefix(':').map(|v| (key, rule, Some(v)))
        });
        let Some((key, rule, rest)) = found else {
            return Err(SelectorError::UnknownKey {
                selector: self.to_string(),
                kind: self.kind().to_string(),
                key: self.named_key(keys),
                known: keys
                    .iter()
                    .map(|(k, r)| format!("{}:{k}:<{}>", self.kind(), r.placeholder()))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let example = || format!("{}:{key}:<{}>", self.kind(), rule.placeholder());
        let Some(rest) = rest else {
            return Err(invalid(format!("{key} needs a value: {}", example())));
        };
        rule.check(rest)
            .map(|()| Registrable::Known)
            .map_err(|why| invalid(format!("{key} {why} ({})", example())))
    }

    /// The key a selector of a known type names, for an error: its first segment, or its first
    /// two when a known key has two (`x509pop:subject:o:x` names `subject:o`).
    fn named_key(&self, keys: &[(&str, ValueRule)]) -> String {
        let mut parts = self.value().splitn(3, ':');
        let first = parts.next().unwrap_or_default();
        let two_level = keys
            .iter()
            .any(|(k, _)| k.split_once(':').is_some_and(|(a, _)| a == first));
        match parts.next() {
            Some(second) if two_level => format!("{first}:{second}"),
            _ => first.to_string(),
        }
    }
}

/// Selector types Sigil's attestors produce: workload (`unix`, `systemd`, `docker`,
/// `container`, `k8s`) and node (`x509pop`, `k8s_psat`, and `spiffe_id` for join-token node
/// aliases).
pub const KNOWN_TYPES: [&str; 8] = [
    "unix",
    "systemd",
    "docker",
    "container",
    "k8s",
    "x509pop",
    "k8s_psat",
    "spiffe_id",
];

/// What [`Selector::check_registrable`] found about a selector it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registrable {
    /// A type and key a Sigil attestor produces, with a value it can produce.
    Known,
    /// A type no Sigil attestor produces: no Sigil agent will report it.
    UnknownType,
}

/// The warning for a selector of a type no Sigil attestor produces.
pub fn unknown_type_warning(s: &Selector) -> String {
    format!(
        "selector {} has type {}, which no Sigil attestor produces ({}): an entry with it matches no workload or node of a Sigil agent (fine if a SPIRE plug-in provides it)",
        quote_for_display(&s.to_string()),
        quote_for_display(s.kind()),
        KNOWN_TYPES.join(", ")
    )
}

/// The form of a selector value after its key.
#[derive(Debug, Clone, Copy)]
enum ValueRule {
    /// A decimal number as the kernel prints it (no sign, no leading zeros), 0 to u32::MAX.
    U32,
    /// Anything but empty.
    NonEmpty,
    /// An absolute path.
    AbsolutePath,
    /// 64 lowercase hex digits (SHA-256, container IDs).
    Hex64,
    /// A systemd service or scope unit name.
    Unit,
    /// A Kubernetes pod UID: a lowercase UUID, or 32 hex digits (static pods).
    PodUid,
    /// `key:value` with a non-empty key (the value may be empty: Kubernetes labels).
    KeyValue,
    /// `Kind:name` with both non-empty.
    KindName,
}

impl ValueRule {
    fn placeholder(self) -> &'static str {
        match self {
            Self::U32 => "number",
            Self::NonEmpty => "name",
            Self::AbsolutePath => "/absolute/path",
            Self::Hex64 => "64 hex digits",
            Self::Unit => "name.service",
            Self::PodUid => "pod UID",
            Self::KeyValue => "key:value",
            Self::KindName => "Kind:name",
        }
    }

    /// `Err` completes "<key> ...": why the value is not of this form.
    fn check(self, v: &str) -> Result<(), &'static str> {
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let ok = match self {
            Self::U32 => v.parse::<u32>().is_ok_and(|n| n.to_string() == v),
            Self::NonEmpty => !v.is_empty(),
            Self::AbsolutePath => v.starts_with('/'),
            Self::Hex64 => v.len() == 64 && hex(v),
            Self::Unit => [".service", ".scope"]
                .iter()
                .any(|suffix| v.strip_suffix(suffix).is_some_and(|stem| !stem.is_empty())),
            Self::PodUid => {
                let dashed = v.len() == 36
                    && v.char_indices().all(|(i, c)| match i {
                        8 | 13 | 18 | 23 => c == '-',
                        _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
                    });
                dashed || (v.len() == 32 && hex(v))
            }
            Self::KeyValue => v.split_once(':').is_some_and(|(k, _)| !k.is_empty()),
            Self::KindName => v
                .split_once(':')
                .is_some_and(|(k, n)| !k.is_empty() && !n.is_empty()),
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Self::U32 => "must be a decimal number from 0 to 4294967295",
            Self::NonEmpty => "must not be empty",
            Self::AbsolutePath => "must be an absolute path (starting with '/')",
            Self::Hex64 => "must be 64 lowercase hex digits",
            Self::Unit => "must be a systemd unit name ending in .service or .scope",
            Self::PodUid => "must be a pod UID: a lowercase UUID or 32 lowercase hex digits",
            Self::KeyValue => "must be key:value with a non-empty key",
            Self::KindName => "must be Kind:name",
        })
    }
}

/// The keys of a known type and the form of their values, as the attestors report them
/// (agent/src/attestor, server/src/attestor). `None` for a type Sigil does not produce.
fn known_keys(kind: &str) -> Option<&'static [(&'static str, ValueRule)]> {
    use ValueRule::*;
    Some(match kind {
        "unix" => &[
            ("uid", U32),
            ("user", NonEmpty),
            ("gid", U32),
            ("group", NonEmpty),
            ("supplementary_gid", U32),
            ("supplementary_group", NonEmpty),
            ("path", AbsolutePath),
            ("sha256", Hex64),
        ],
        "systemd" => &[("id", Unit)],
        "docker" | "container" => &[("id", Hex64)],
        "k8s" => &[
            ("ns", NonEmpty),
            ("sa", NonEmpty),
            ("pod-name", NonEmpty),
            ("pod-uid", PodUid),
            ("pod-label", KeyValue),
            ("pod-owner", KindName),
            ("pod-owner-uid", KindName),
            ("node-name", NonEmpty),
            ("container-name", NonEmpty),
            ("container-id", Hex64),
            ("container-image", NonEmpty),
            ("pod-image", NonEmpty),
            ("pod-init-image", NonEmpty),
            ("pod-image-count", U32),
            ("pod-init-image-count", U32),
        ],
        "x509pop" => &[
            ("subject:cn", NonEmpty),
            ("ca:fingerprint", Hex64),
            ("san:dns", NonEmpty),
        ],
        "k8s_psat" => &[
            ("cluster", NonEmpty),
            ("agent_ns", NonEmpty),
            ("agent_sa", NonEmpty),
            ("agent_pod_name", NonEmpty),
            ("agent_pod_uid", NonEmpty),
            ("agent_pod_label", KeyValue),
            ("agent_node_name", NonEmpty),
            ("agent_node_uid", NonEmpty),
            ("agent_node_label", KeyValue),
        ],
        "spiffe_id" => &[],
        _ => return None,
    })
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A sorted, de-duplicated set of selectors.
///
/// A sorted vector: sets are small (a handful for an entry, a few dozen for a workload), and an
/// agent holds one per entry, where a tree would spend a whole node on three selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SelectorSet(Vec<Selector>);

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector; returns false if it was already present.
    pub fn insert(&mut self, s: Selector) -> bool {
        match self.0.binary_search(&s) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, s);
                true
            }
        }
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
        self.0.binary_search(s).is_ok()
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.0.iter()
    }

    /// True if every selector of `self` is in `other` (how an entry matches a workload).
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        if self.0.len() > other.0.len() {
            return false;
        }
        // Both sorted: one pass over `other`.
        let mut theirs = other.0.iter();
        self.0.iter().all(|s| theirs.by_ref().any(|o| o == s))
    }

    /// True if every selector of `other` is in `self`.
    pub fn is_superset_of(&self, other: &SelectorSet) -> bool {
        other.is_subset_of(self)
    }

    /// True if the sets share at least one selector.
    pub fn intersects(&self, other: &SelectorSet) -> bool {
        self.0.iter().any(|s| other.contains(s))
    }

    /// The same set with each selector replaced by what `f` returns for it (an equal selector,
    /// e.g. a shared copy).
    pub fn map_equal(&mut self, mut f: impl FnMut(&Selector) -> Selector) {
        for s in &mut self.0 {
            let shared = f(s);
            debug_assert!(shared == *s);
            *s = shared;
        }
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        let mut v: Vec<Selector> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
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
    fn selectors_order_by_type_then_value_and_compare_whole() -> Result<(), SelectorError> {
        // By type first: `a` before `a-b`, although `a:` sorts after `a-` as text.
        let a = Selector::parse("a:zzz")?;
        let ab = Selector::parse("a-b:aaa")?;
        assert!(a < ab);
        assert_eq!(a.kind(), "a");
        assert_eq!(ab.value(), "aaa");
        assert_eq!(a.as_str(), "a:zzz");
        assert_eq!(a, Selector::new("a", "zzz")?);
        assert_ne!(a, Selector::parse("a:zz")?);
        Ok(())
    }

    #[test]
    fn the_order_is_by_type_then_value_for_any_pair() -> Result<(), SelectorError> {
        let texts = [
            "a:x",
            "a:x:y",
            "a:xy",
            "a:x-",
            "a-b:a",
            "a_b:a",
            "a0:a",
            "ab:a",
            "A:a",
            "a:A",
            "a:x:",
            "a:x:a",
            "a:x-a",
            "b:a",
            "k8s:ns:a",
            "k8s:ns:a:b",
            "k8s:ns-a",
            "k8s-x:ns",
            "unix:uid:1",
            "unix:uid:10",
            "unix:uid:1:0",
            "unix:uid:1-0",
        ];
        let all = texts
            .iter()
            .map(|t| Selector::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        for a in &all {
            for b in &all {
                assert_eq!(
                    a.cmp(b),
                    (a.kind(), a.value()).cmp(&(b.kind(), b.value())),
                    "{a} vs {b}"
                );
                assert_eq!(a.cmp(b) == std::cmp::Ordering::Equal, a == b, "{a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn selector_sets_stay_sorted_and_deduplicated() -> Result<(), SelectorError> {
        let p = |s: &str| Selector::parse(s);
        let mut set: SelectorSet = [p("unix:uid:1")?, p("k8s:ns:a")?, p("unix:uid:1")?]
            .into_iter()
            .collect();
        assert_eq!(set.len(), 2);
        assert!(set.insert(p("k8s:sa:x")?));
        assert!(!set.insert(p("k8s:ns:a")?));
        let order: Vec<&str> = set.iter().map(Selector::as_str).collect();
        assert_eq!(order, ["k8s:ns:a", "k8s:sa:x", "unix:uid:1"]);
        assert!(set.contains(&p("k8s:sa:x")?) && !set.contains(&p("k8s:sa:y")?));
        let entry: SelectorSet = [p("unix:uid:1")?, p("k8s:sa:x")?].into_iter().collect();
        assert!(entry.is_subset_of(&set) && set.is_superset_of(&entry));
        assert!(!set.is_subset_of(&entry));
        let other: SelectorSet = [p("k8s:sa:y")?, p("unix:uid:1")?].into_iter().collect();
        assert!(!other.is_subset_of(&set) && other.intersects(&set));
        assert!(SelectorSet::new().is_subset_of(&set));
        Ok(())
    }

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

    fn registrable(s: &str) -> Result<Registrable, SelectorError> {
        Selector::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .check_registrable()
    }

    #[test]
    fn selectors_as_the_attestors_produce_them_are_registrable() {
        let hex = "a".repeat(64);
        for ok in [
            "unix:uid:0".to_string(),
            "unix:uid:4294967295".into(),
            "unix:gid:1000".into(),
            "unix:user:root".into(),
            "unix:group:wheel".into(),
            "unix:supplementary_gid:27".into(),
            "unix:supplementary_group:sudo".into(),
            "unix:path:/usr/bin/nginx".into(),
            format!("unix:sha256:{hex}"),
            "systemd:id:nginx.service".into(),
            "systemd:id:session-3.scope".into(),
            format!("docker:id:{hex}"),
            format!("container:id:{hex}"),
            "k8s:ns:default".into(),
            "k8s:sa:web".into(),
            "k8s:pod-name:web-0".into(),
            "k8s:pod-uid:dd1bf9d1-241d-47f5-8e25-12de83135812".into(),
            "k8s:pod-uid:187bff14cccb94f179e943eacce55bb3".into(),
            "k8s:pod-label:app:web".into(),
            "k8s:pod-label:empty:".into(),
            "k8s:pod-owner:ReplicaSet:web-5d4f".into(),
            "k8s:pod-owner-uid:ReplicaSet:0b7e3c3e-1111-2222-3333-444455556666".into(),
            "k8s:node-name:node-1".into(),
            "k8s:container-name:app".into(),
            format!("k8s:container-id:{hex}"),
            "k8s:container-image:docker.io/library/nginx:1.27".into(),
            "k8s:pod-image:nginx@sha256:abc".into(),
            "k8s:pod-init-image:busybox".into(),
            "k8s:pod-image-count:2".into(),
            "k8s:pod-init-image-count:0".into(),
            "x509pop:subject:cn:node-1.example.org".into(),
            format!("x509pop:ca:fingerprint:{hex}"),
            "x509pop:san:dns:node-1.example.org".into(),
            "k8s_psat:cluster:prod".into(),
            "k8s_psat:agent_ns:sigil".into(),
            "k8s_psat:agent_sa:sigil-agent".into(),
            "k8s_psat:agent_pod_name:sigil-agent-x".into(),
            "k8s_psat:agent_pod_uid:0b7e3c3e-1111-2222-3333-444455556666".into(),
            "k8s_psat:agent_pod_label:app:sigil".into(),
            "k8s_psat:agent_node_name:node-1".into(),
            "k8s_psat:agent_node_uid:0b7e3c3e-1111-2222-3333-444455556666".into(),
            "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a".into(),
            "spiffe_id:spiffe://example.org/sigil/agent/join_token/abc".into(),
        ] {
            assert_eq!(registrable(&ok), Ok(Registrable::Known), "{ok}");
        }
    }

    #[test]
    fn values_no_attestor_produces_are_refused() {
        for (bad, why) in [
            ("unix:uid:abc", "uid must be a decimal number"),
            ("unix:uid:-1", "uid must be a decimal number"),
            ("unix:uid:", "uid must be a decimal number"),
            ("unix:uid", "uid needs a value: unix:uid:<number>"),
            ("unix:uid:4294967296", "uid must be a decimal number"),
            ("unix:uid:007", "uid must be a decimal number"),
            ("unix:uid:+7", "uid must be a decimal number"),
            ("unix:gid:x", "gid must be a decimal number"),
            ("unix:supplementary_gid:1.5", "supplementary_gid must be"),
            ("unix:user:", "user must not be empty"),
            ("unix:group:", "group must not be empty"),
            ("unix:path:relative", "path must be an absolute path"),
            ("unix:path:", "path must be an absolute path"),
            ("unix:sha256:abc", "sha256 must be 64 lowercase hex digits"),
            ("systemd:id:nginx", "must be a systemd unit name"),
            ("systemd:id:.service", "must be a systemd unit name"),
            ("docker:id:abc", "id must be 64 lowercase hex digits"),
            ("container:id:XYZ", "id must be 64 lowercase hex digits"),
            ("k8s:pod-uid:not-a-uid", "must be a pod UID"),
            ("k8s:container-id:short", "64 lowercase hex digits"),
            ("k8s:pod-label:nolabelvalue", "key:value"),
            ("k8s:pod-label::v", "key:value"),
            ("k8s:pod-owner:ReplicaSet", "Kind:name"),
            ("k8s:pod-image-count:two", "decimal number"),
            ("x509pop:ca:fingerprint:abc", "64 lowercase hex digits"),
            ("x509pop:subject:cn:", "must not be empty"),
            ("k8s_psat:cluster:", "must not be empty"),
            ("k8s_psat:agent_node_label:", "key:value"),
            ("spiffe_id:example.org/x", "must be a SPIFFE ID"),
        ] {
            let e = registrable(bad).expect_err(bad);
            assert!(
                matches!(e, SelectorError::InvalidValue { .. }),
                "{bad}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(
                msg.contains(&format!("{bad:?}")),
                "names the selector: {msg}"
            );
        }
        let upper = format!("unix:sha256:{}", "A".repeat(64));
        assert!(registrable(&upper).is_err());
    }

    #[test]
    fn unknown_keys_of_known_types_are_refused() {
        for (bad, key, listed) in [
            ("unix:nosuchkey:1", "\"nosuchkey\"", "unix:uid:<number>"),
            ("unix:UID:1", "\"UID\"", "unix:sha256:<64 hex digits>"),
            (
                "systemd:fragment_path:/x",
                "\"fragment_path\"",
                "systemd:id:<name.service>",
            ),
            ("docker:label:a:b", "\"label\"", "docker:id:<64 hex digits>"),
            ("k8s:namespace:default", "\"namespace\"", "k8s:ns:<name>"),
            (
                "x509pop:subject:o:Acme",
                "\"subject:o\"",
                "x509pop:subject:cn:<name>",
            ),
            (
                "x509pop:serialnumber:1",
                "\"serialnumber\"",
                "x509pop:san:dns:<name>",
            ),
            (
                "k8s_psat:agent_ns_x:a",
                "\"agent_ns_x\"",
                "k8s_psat:agent_ns:<name>",
            ),
        ] {
            let e = registrable(bad).expect_err(bad);
            assert!(
                matches!(e, SelectorError::UnknownKey { .. }),
                "{bad}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("has no key {key}")), "{bad}: {msg}");
            assert!(msg.contains(listed), "{bad}: {msg}");
        }
    }

    #[test]
    fn unknown_types_are_allowed_with_a_warning() {
        for s in ["nosuchtype:x", "aws_iid:tag:name:web", "t:1", "Unix:uid:1"] {
            assert_eq!(registrable(s), Ok(Registrable::UnknownType), "{s}");
        }
        let w = unknown_type_warning(&Selector::parse("nosuchtype:x").unwrap());
        assert!(w.contains("\"nosuchtype\""), "{w}");
        assert!(w.contains("unix, systemd, docker"), "{w}");
    }

    #[test]
    fn long_inputs_are_not_echoed_whole() {
        let long = format!("unix:path:{}", "a".repeat(1000));
        let msg = registrable(&long).unwrap_err().to_string();
        assert!(msg.len() < 400, "{msg}");
        assert!(msg.contains("(1010 bytes)"), "{msg}");
        let msg = Selector::parse(&"x".repeat(3000)).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains("(3000 bytes)"), "{msg}");
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
