//! The local authorities of one server and their lifecycle (SPIRE's model).
//!
//! Each kind, the X.509 authority that signs X509-SVIDs and the JWT key that signs JWT-SVIDs,
//! has one *active* authority; from ½ of the active one's life a *prepared* one, published in
//! the trust bundle at once so every agent and workload trusts it before it signs anything; at
//! ⅚ the prepared one becomes active and the active one *old*. An old authority stays in the
//! bundle until its NotAfter (no SVID it signed outlives it: SVIDs are capped at the issuing
//! authority's NotAfter), then leaves. An operator may force `prepare` / `activate`, mark an
//! old authority *tainted*, and `revoke` a tainted one (it leaves the bundle at once).
//!
//! **Persistence.** The journal `authorities.json` in the CA directory lists every authority:
//! its slot, its taint and its files. It is the one source of truth and is replaced atomically
//! (`sigil::fs::write_atomic`), so every transition is one rename:
//! - prepare: the new key (0600) and certificate are written under new names
//!   (`x509-<subject key ID>.key|crt`, `jwt-<kid>.key`), then the journal names them. A crash
//!   before the journal write leaves unreferenced files, deleted at the next start; the
//!   schedule prepares again.
//! - activate, taint, revoke, removal of an expired old authority: one journal write (files of
//!   removed authorities are deleted after it). A crash before it leaves the previous state,
//!   which the schedule moves on from at once when it is due.
//!
//! **Upgrade.** A CA directory without a journal (the single `root.key` / `root.crt` /
//! `jwt.key` of earlier versions, or a first start, which creates them) becomes the active
//! authorities of a new journal; the legacy files keep their names.
//!
//! **Upstream mode.** The X.509 authority is the intermediate in the upstream files and the
//! bundle the upstream roots; it is not journaled. At ⅚ of the intermediate's life the files
//! are read again (an operator or the `upstream.command` hook, run at ½, replaced them), and a
//! new valid intermediate becomes active; the previous one is listed as old until it expires.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{Issuer, KeyPair};
use serde::{Deserialize, Serialize};
use sigil::bundle::JwtAuthority;
use sigil::x509::{parse_pem_certs, to_pem_certs};

use super::jwt::JwtKey;
use super::keys;
use super::{
    parse_cert, self_signed, upstream, CaConfig, CaError, SigningMaterial, BACKDATE, JWT_KEY_FILE,
    ROOT_CERT_FILE, ROOT_KEY_FILE,
};

/// The journal file in [`CaConfig::dir`].
pub const JOURNAL_FILE: &str = "authorities.json";
/// Journal format version.
const JOURNAL_VERSION: u32 = 1;
/// In upstream mode, how often the files are read again after the ⅚ point while they still
/// hold the same intermediate, seconds.
pub const UPSTREAM_RELOAD_EVERY: i64 = 30;

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// In the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; in the bundle until its NotAfter (or a revoke).
    Old,
}

impl Slot {
    /// `prepared`, `active` or `old`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Prepared => "prepared",
            Slot::Active => "active",
            Slot::Old => "old",
        }
    }

    fn order(self) -> u8 {
        match self {
            Slot::Active => 0,
            Slot::Prepared => 1,
            Slot::Old => 2,
        }
    }
}

/// Which kind of authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The X.509 authority (X509-SVIDs).
    X509,
    /// The JWT signing key (JWT-SVIDs).
    Jwt,
}

impl Kind {
    /// `X.509` or `JWT`, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::X509 => "X.509",
            Kind::Jwt => "JWT",
        }
    }
}

/// One authority as `localauthority show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// X.509: the subject key ID, lowercase hex; JWT: the `kid`.
    pub id: String,
    /// Its slot.
    pub slot: Slot,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Marked tainted by an operator.
    pub tainted: bool,
}

/// An X.509 authority, ready to sign.
#[derive(Clone)]
pub(crate) struct X509Authority {
    pub id: String,
    pub issuer: Arc<Issuer<'static, KeyPair>>,
    /// The certificate that signs SVIDs (a self-signed root, or the upstream intermediate).
    pub cert_der: Vec<u8>,
    /// Certificates after the leaf in an issued chain (upstream intermediates).
    pub chain_tail: Vec<Vec<u8>>,
    pub not_before: i64,
    /// Where its schedule starts: when it was issued (a self-signed authority's NotBefore is
    /// back-dated by [`BACKDATE`], which would skew ½ and ⅚ of short lives), or the upstream
    /// intermediate's NotBefore.
    pub start: i64,
    /// The earliest NotAfter of the authority's own chain: no SVID outlives it.
    pub not_after: i64,
    pub slot: Slot,
    pub tainted: bool,
    /// File names in the CA directory (self-signed mode only).
    pub files: Option<(String, String)>,
}

/// A JWT signing key, ready to sign.
#[derive(Clone)]
pub(crate) struct JwtKeyAuthority {
    pub key: Arc<JwtKey>,
    pub not_before: i64,
    pub not_after: i64,
    pub slot: Slot,
    pub tainted: bool,
    pub key_file: String,
}

impl JwtKeyAuthority {
    pub(crate) fn kid(&self) -> &str {
        self.key.kid()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    version: u32,
    /// Self-signed mode's X.509 authorities (kept as they are in upstream mode).
    x509: Vec<X509Record>,
    jwt: Vec<JwtRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct X509Record {
    id: String,
    slot: Slot,
    tainted: bool,
    key_file: String,
    cert_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtRecord {
    kid: String,
    slot: Slot,
    tainted: bool,
    key_file: String,
    not_before: i64,
    not_after: i64,
}

/// What a transition changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// The set of published authorities changed (the bundle must be published again).
    pub bundle: bool,
    /// A new X.509 authority became active.
    pub x509_activated: bool,
}

impl Changes {
    fn merge(&mut self, other: Changes) {
        self.bundle |= other.bundle;
        self.x509_activated |= other.x509_activated;
    }
}

/// Where a test stops a transition, as a `kill -9` there would.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// Prepare: the key and certificate are written, the journal is not.
    PrepareBeforeJournal,
}

/// Every authority of this server.
pub(crate) struct Authorities {
    dir: PathBuf,
    upstream: Option<super::UpstreamConfig>,
    /// Self-signed: the journaled authorities; upstream: the intermediates read from files.
    pub x509: Vec<X509Authority>,
    /// Upstream mode: the roots from `bundle_path` (the bundle's X.509 part).
    pub upstream_roots: Vec<Vec<u8>>,
    /// Upstream mode: journaled self-signed records carried through untouched.
    dormant_x509: Vec<X509Record>,
    /// Upstream mode: the intermediate the hook last ran for, and when the files are next read.
    pub upstream_hook_ran_for: Option<String>,
    upstream_next_reload: i64,
    pub jwt: Vec<JwtKeyAuthority>,
    #[cfg(test)]
    pub crash_at: Option<CrashPoint>,
}

fn bad_journal(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Journal {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A file name the journal may name: one plain component.
fn check_file_name(journal: &Path, name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(bad_journal(
            journal,
            format!(
                "file name {:?} is not a plain file name",
                sigil::text::echo(name)
            ),
        ))
    }
}

/// The subject key identifier of a certificate, lowercase hex; SHA-1 of the public key (RFC
/// 5280 method 1, as rcgen writes it... or the key bytes' digest) when it has none.
pub(crate) fn subject_key_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) =
            ext.parsed_extension()
        {
            return hex::encode(ski.0);
        }
    }
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    hex::encode(digest.as_ref())
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// ½ of the life from `start` to `not_after`: when the next authority is prepared.
pub(crate) fn prepare_at(start: i64, not_after: i64) -> i64 {
    start + (not_after - start).max(0) / 2
}

/// ⅚ of the life from `start` to `not_after`: when the prepared authority is activated.
pub(crate) fn activate_at(start: i64, not_after: i64) -> i64 {
    start + (not_after - start).max(0) * 5 / 6
}

impl Authorities {
    /// Loads the journal (or builds it from the legacy files, creating them on a first start),
    /// deletes unreferenced authority files, and writes the journal if it was new.
    pub(crate) fn load_or_create(config: &CaConfig, now: i64) -> Result<Self, CaError> {
        let journal_path = config.dir.join(JOURNAL_FILE);
        let journal = match keys::read_text_file(&journal_path)? {
            Some(text) => {
                let j: Journal = serde_json::from_str(&text).map_err(|e| {
                    bad_journal(
                        &journal_path,
                        format!(
                            "{e}; restore it from backup (deleting it makes root.crt/root.key \
                             and jwt.key, if present, the only authorities)"
                        ),
                    )
                })?;
                if j.version != JOURNAL_VERSION {
                    return Err(bad_journal(
                        &journal_path,
                        format!(
                            "version {} is not supported (this server reads version {JOURNAL_VERSION})",
                            j.version
                        ),
                    ));
                }
                Some(j)
            }
            None => None,
        };
        let mut me = Authorities {
            dir: config.dir.clone(),
            upstream: config.upstream.clone(),
            x509: Vec::new(),
            upstream_roots: Vec::new(),
            dormant_x509: Vec::new(),
            upstream_hook_ran_for: None,
            upstream_next_reload: 0,
            jwt: Vec::new(),
            #[cfg(test)]
            crash_at: None,
        };
        match (&config.upstream, &journal) {
            (Some(up), _) => {
                let m = upstream::load(config, up)?;
                me.upstream_roots = m.authorities.clone();
                me.x509.push(x509_from_material(
                    m,
                    Slot::Active,
                    None,
                    &up.cert_chain_path,
                )?);
                me.dormant_x509 = journal.as_ref().map(|j| j.x509.clone()).unwrap_or_default();
            }
            (None, Some(j)) if !j.x509.is_empty() => {
                for r in &j.x509 {
                    me.x509.push(load_x509_record(config, &journal_path, r)?);
                }
            }
            (None, _) => {
                // No journal (upgrade, or first start) or none for X.509 (upstream before).
                let m = self_signed::load_or_create(config)?;
                let path = config.dir.join(ROOT_CERT_FILE);
                me.x509.push(x509_from_material(
                    m,
                    Slot::Active,
                    Some((ROOT_KEY_FILE.to_string(), ROOT_CERT_FILE.to_string())),
                    &path,
                )?);
            }
        }
        match journal.as_ref().map(|j| &j.jwt).filter(|j| !j.is_empty()) {
            Some(records) => {
                for r in records {
                    me.jwt.push(load_jwt_record(config, &journal_path, r)?);
                }
            }
            None => {
                let key = JwtKey::load_or_create(&config.dir.join(JWT_KEY_FILE))?;
                let life = i64::try_from(config.ca_ttl.as_secs()).unwrap_or(i64::MAX / 4);
                me.jwt.push(JwtKeyAuthority {
                    key: Arc::new(key),
                    not_before: now,
                    not_after: now.saturating_add(life),
                    slot: Slot::Active,
                    tainted: false,
                    key_file: JWT_KEY_FILE.to_string(),
                });
            }
        }
        me.check_slots(&journal_path)?;
        let fresh = me.journal();
        if journal.as_ref().map(|j| (&j.x509, &j.jwt)) != Some((&fresh.x509, &fresh.jwt)) {
            me.write_journal(&fresh)?;
            if journal.is_none() {
                tracing::info!(journal = %journal_path.display(), "CA authorities journal created");
            }
        }
        me.remove_unreferenced_files();
        Ok(me)
    }

    /// Exactly one active authority of each kind, at most one prepared.
    fn check_slots(&self, journal: &Path) -> Result<(), CaError> {
        let count = |slots: &mut dyn Iterator<Item = Slot>, want: Slot| {
            slots.filter(|s| *s == want).count()
        };
        for (kind, slots) in [
            (
                Kind::X509,
                self.x509.iter().map(|a| a.slot).collect::<Vec<_>>(),
            ),
            (
                Kind::Jwt,
                self.jwt.iter().map(|a| a.slot).collect::<Vec<_>>(),
            ),
        ] {
            let active = count(&mut slots.iter().copied(), Slot::Active);
            let prepared = count(&mut slots.iter().copied(), Slot::Prepared);
            if active != 1 || prepared > 1 {
                return Err(bad_journal(
                    journal,
                    format!(
                        "it lists {active} active and {prepared} prepared {} authorities \
                         (exactly one active and at most one prepared are allowed); restore it \
                         from backup",
                        kind.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn journal(&self) -> Journal {
        let x509 = if self.upstream.is_some() {
            self.dormant_x509.clone()
        } else {
            self.x509
                .iter()
                .filter_map(|a| {
                    a.files.as_ref().map(|(k, c)| X509Record {
                        id: a.id.clone(),
                        slot: a.slot,
                        tainted: a.tainted,
                        key_file: k.clone(),
                        cert_file: c.clone(),
                    })
                })
                .collect()
        };
        let jwt = self
            .jwt
            .iter()
            .map(|a| JwtRecord {
                kid: a.kid().to_string(),
                slot: a.slot,
                tainted: a.tainted,
                key_file: a.key_file.clone(),
                not_before: a.not_before,
                not_after: a.not_after,
            })
            .collect();
        Journal {
            version: JOURNAL_VERSION,
            x509,
            jwt,
        }
    }

    fn write_journal(&self, j: &Journal) -> Result<(), CaError> {
        let path = self.dir.join(JOURNAL_FILE);
        let text = serde_json::to_string_pretty(j)
            .map_err(|e| bad_journal(&path, format!("cannot encode: {e}")))?;
        keys::write_secret_file(&path, text.as_bytes())
    }

    /// Every file name the journal (as held now) references.
    fn referenced_files(&self) -> HashSet<String> {
        let j = self.journal();
        j.x509
            .iter()
            .flat_map(|r| [r.key_file.clone(), r.cert_file.clone()])
            .chain(j.jwt.iter().map(|r| r.key_file.clone()))
            .collect()
    }

    /// Deletes authority files no journal entry names (left by a crash during prepare, or by a
    /// crash after a removal's journal write).
    fn remove_unreferenced_files(&self) {
        let referenced = self.referenced_files();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = (name.starts_with("x509-")
                && (name.ends_with(".key") || name.ends_with(".crt")))
                || (name.starts_with("jwt-") && name.ends_with(".key"));
            if ours && !referenced.contains(&name) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %name, "removed an authority file the journal does not list (an interrupted prepare or removal)")
                    }
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "cannot remove an unreferenced authority file")
                    }
                }
            }
        }
    }

    /// Commits `next` (journal first, then memory), then deletes files no longer referenced.
    fn commit(
        &mut self,
        x509: Vec<X509Authority>,
        jwt: Vec<JwtKeyAuthority>,
    ) -> Result<(), CaError> {
        let before = self.referenced_files();
        let old_x509 = std::mem::replace(&mut self.x509, x509);
        let old_jwt = std::mem::replace(&mut self.jwt, jwt);
        let j = self.journal();
        if let Err(e) = self.write_journal(&j) {
            self.x509 = old_x509;
            self.jwt = old_jwt;
            return Err(e);
        }
        let after = self.referenced_files();
        for gone in before.difference(&after) {
            let p = self.dir.join(gone);
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a removed authority's file");
            }
        }
        Ok(())
    }

    pub(crate) fn is_upstream(&self) -> bool {
        self.upstream.is_some()
    }

    pub(crate) fn active_x509(&self) -> &X509Authority {
        // check_slots and every transition keep exactly one active.
        self.x509
            .iter()
            .find(|a| a.slot == Slot::Active)
            .unwrap_or(&self.x509[0])
    }

    pub(crate) fn active_jwt(&self) -> &JwtKeyAuthority {
        self.jwt
            .iter()
            .find(|a| a.slot == Slot::Active)
            .unwrap_or(&self.jwt[0])
    }

    /// The bundle's X.509 roots: the upstream roots, or every self-signed authority (active,
    /// prepared, old).
    pub(crate) fn bundle_roots(&self) -> Vec<Vec<u8>> {
        if self.is_upstream() {
            return self.upstream_roots.clone();
        }
        let mut v: Vec<&X509Authority> = self.x509.iter().collect();
        v.sort_by_key(|a| a.slot.order());
        v.into_iter().map(|a| a.cert_der.clone()).collect()
    }

    /// The bundle's JWT keys (active, prepared, old).
    pub(crate) fn bundle_jwt(&self) -> Vec<JwtAuthority> {
        let mut v: Vec<&JwtKeyAuthority> = self.jwt.iter().collect();
        v.sort_by_key(|a| a.slot.order());
        v.into_iter().map(|a| a.key.authority()).collect()
    }

    /// The authorities of `kind`, active first.
    pub(crate) fn list(&self, kind: Kind) -> Vec<AuthorityInfo> {
        let mut v: Vec<AuthorityInfo> = match kind {
            Kind::X509 => self
                .x509
                .iter()
                .map(|a| AuthorityInfo {
                    id: a.id.clone(),
                    slot: a.slot,
                    not_before: a.not_before,
                    not_after: a.not_after,
                    tainted: a.tainted,
                })
                .collect(),
            Kind::Jwt => self
                .jwt
                .iter()
                .map(|a| AuthorityInfo {
                    id: a.kid().to_string(),
                    slot: a.slot,
                    not_before: a.not_before,
                    not_after: a.not_after,
                    tainted: a.tainted,
                })
                .collect(),
        };
        v.sort_by_key(|a| a.slot.order());
        v
    }

    /// Tainted, still published authorities: X.509 subject key IDs and JWT kids.
    pub(crate) fn tainted(&self) -> (Vec<String>, Vec<String>) {
        (
            self.x509
                .iter()
                .filter(|a| a.tainted)
                .map(|a| a.id.clone())
                .collect(),
            self.jwt
                .iter()
                .filter(|a| a.tainted)
                .map(|a| a.kid().to_string())
                .collect(),
        )
    }

    // ---- transitions -------------------------------------------------------------------

    /// Makes a new prepared authority of `kind` now, replacing any prepared one (it signed
    /// nothing).
    pub(crate) fn prepare(
        &mut self,
        config: &CaConfig,
        kind: Kind,
        now: i64,
    ) -> Result<Changes, CaError> {
        match kind {
            Kind::X509 => {
                if self.is_upstream() {
                    return Err(CaError::UpstreamManaged);
                }
                let key = config.key_type.generate()?;
                let der = self_signed::new_root_cert(config, &key, now)?;
                let cert = parse_cert(&der, &self.dir.join("new authority"))?;
                let id = subject_key_id(&cert);
                let not_after = cert.validity().not_after.to_datetime();
                let key_file = format!("x509-{id}.key");
                let cert_file = format!("x509-{id}.crt");
                keys::write_secret_file(&self.dir.join(&key_file), key.serialize_pem().as_bytes())?;
                keys::write_public_file(
                    &self.dir.join(&cert_file),
                    to_pem_certs(std::slice::from_ref(&der)).as_bytes(),
                )?;
                #[cfg(test)]
                if self.crash_at == Some(CrashPoint::PrepareBeforeJournal) {
                    return Err(CaError::Signing(
                        "simulated crash before the journal write".into(),
                    ));
                }
                let material = SigningMaterial {
                    key,
                    cert_der: der,
                    chain_tail: Vec::new(),
                    authorities: Vec::new(),
                    not_after,
                };
                let path = self.dir.join(&cert_file);
                let auth = x509_from_material(
                    material,
                    Slot::Prepared,
                    Some((key_file, cert_file)),
                    &path,
                )?;
                let mut x509: Vec<X509Authority> = self
                    .x509
                    .iter()
                    .filter(|a| a.slot != Slot::Prepared)
                    .cloned()
                    .collect();
                tracing::info!(authority_id = %auth.id, not_after = auth.not_after, "X.509 authority prepared (published in the bundle; signs from its activation)");
                x509.push(auth);
                let jwt = self.jwt.clone();
                self.commit(x509, jwt)?;
            }
            Kind::Jwt => {
                let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| CaError::KeyGeneration(e.to_string()))?;
                let pem = kp.serialize_pem();
                let key = JwtKey::from_key_pair(&kp, &self.dir.join("new JWT key"))?;
                let key_file = format!("jwt-{}.key", key.kid());
                keys::write_secret_file(&self.dir.join(&key_file), pem.as_bytes())?;
                #[cfg(test)]
                if self.crash_at == Some(CrashPoint::PrepareBeforeJournal) {
                    return Err(CaError::Signing(
                        "simulated crash before the journal write".into(),
                    ));
                }
                let life = i64::try_from(config.ca_ttl.as_secs()).unwrap_or(i64::MAX / 4);
                let auth = JwtKeyAuthority {
                    key: Arc::new(key),
                    not_before: now,
                    not_after: now.saturating_add(life),
                    slot: Slot::Prepared,
                    tainted: false,
                    key_file,
                };
                tracing::info!(kid = %auth.kid(), not_after = auth.not_after, "JWT key prepared (published in the bundle; signs from its activation)");
                let mut jwt: Vec<JwtKeyAuthority> = self
                    .jwt
                    .iter()
                    .filter(|a| a.slot != Slot::Prepared)
                    .cloned()
                    .collect();
                jwt.push(auth);
                let x509 = self.x509.clone();
                self.commit(x509, jwt)?;
            }
        }
        Ok(Changes {
            bundle: true,
            x509_activated: false,
        })
    }

    /// Activates the prepared authority of `kind` (if `id` is given, it must be that one); the
    /// active one becomes old.
    pub(crate) fn activate(&mut self, kind: Kind, id: Option<&str>) -> Result<Changes, CaError> {
        if kind == Kind::X509 && self.is_upstream() {
            return Err(CaError::UpstreamManaged);
        }
        let prepared_id = match kind {
            Kind::X509 => self
                .x509
                .iter()
                .find(|a| a.slot == Slot::Prepared)
                .map(|a| a.id.clone()),
            Kind::Jwt => self
                .jwt
                .iter()
                .find(|a| a.slot == Slot::Prepared)
                .map(|a| a.kid().to_string()),
        };
        let Some(prepared_id) = prepared_id else {
            return Err(CaError::NoPreparedAuthority(kind.as_str()));
        };
        if let Some(want) = id.filter(|w| !w.is_empty()) {
            if want != prepared_id {
                return Err(self.not_allowed(
                    kind,
                    want,
                    "only the prepared authority can be activated",
                    &prepared_id,
                ));
            }
        }
        let shift = |slot: Slot| match slot {
            Slot::Prepared => Slot::Active,
            Slot::Active => Slot::Old,
            Slot::Old => Slot::Old,
        };
        let mut x509 = self.x509.clone();
        let mut jwt = self.jwt.clone();
        match kind {
            Kind::X509 => x509.iter_mut().for_each(|a| a.slot = shift(a.slot)),
            Kind::Jwt => jwt.iter_mut().for_each(|a| a.slot = shift(a.slot)),
        }
        self.commit(x509, jwt)?;
        tracing::info!(kind = kind.as_str(), authority_id = %prepared_id, "authority activated; the previous one is old and stays in the bundle until it expires");
        Ok(Changes {
            bundle: true,
            x509_activated: kind == Kind::X509,
        })
    }

    fn not_allowed(&self, kind: Kind, id: &str, reason: &str, hint: &str) -> CaError {
        CaError::AuthorityNotAllowed {
            kind: kind.as_str(),
            id: sigil::text::echo(id).to_string(),
            reason: if hint.is_empty() {
                reason.to_string()
            } else {
                format!("{reason} (the prepared one is {hint})")
            },
        }
    }

    /// The slot and taint of authority `id` of `kind`.
    fn find(&self, kind: Kind, id: &str) -> Result<(Slot, bool), CaError> {
        let found = match kind {
            Kind::X509 => self
                .x509
                .iter()
                .find(|a| a.id == id)
                .map(|a| (a.slot, a.tainted)),
            Kind::Jwt => self
                .jwt
                .iter()
                .find(|a| a.kid() == id)
                .map(|a| (a.slot, a.tainted)),
        };
        found.ok_or_else(|| CaError::UnknownAuthority {
            kind: kind.as_str(),
            id: sigil::text::echo(id).to_string(),
        })
    }

    /// Marks old authority `id` tainted: agents re-mint what it signed; then it can be revoked.
    pub(crate) fn taint(&mut self, kind: Kind, id: &str) -> Result<Changes, CaError> {
        if kind == Kind::X509 && self.is_upstream() {
            return Err(CaError::UpstreamManaged);
        }
        match self.find(kind, id)? {
            (Slot::Active, _) => {
                return Err(self.not_allowed(kind, id, "it is the active authority; prepare and activate a new one first, then taint this one", ""))
            }
            (Slot::Prepared, _) => {
                return Err(self.not_allowed(kind, id, "it is the prepared authority and has signed nothing; only an old authority can be tainted", ""))
            }
            (Slot::Old, true) => {
                return Err(self.not_allowed(kind, id, "it is already tainted", ""))
            }
            (Slot::Old, false) => {}
        }
        let mut x509 = self.x509.clone();
        let mut jwt = self.jwt.clone();
        match kind {
            Kind::X509 => x509
                .iter_mut()
                .filter(|a| a.id == id)
                .for_each(|a| a.tainted = true),
            Kind::Jwt => jwt
                .iter_mut()
                .filter(|a| a.kid() == id)
                .for_each(|a| a.tainted = true),
        }
        self.commit(x509, jwt)?;
        tracing::warn!(kind = kind.as_str(), authority_id = %id, "authority tainted");
        Ok(Changes {
            bundle: true,
            x509_activated: false,
        })
    }

    /// Removes tainted, non-active authority `id` from the bundle.
    pub(crate) fn revoke(&mut self, kind: Kind, id: &str) -> Result<Changes, CaError> {
        if kind == Kind::X509 && self.is_upstream() {
            return Err(CaError::UpstreamManaged);
        }
        match self.find(kind, id)? {
            (Slot::Active, _) => {
                return Err(self.not_allowed(kind, id, "it is the active authority and cannot be revoked", ""))
            }
            (_, false) => {
                return Err(self.not_allowed(kind, id, "it is not tainted; taint it first (`localauthority ... taint`) so agents re-mint what it signed", ""))
            }
            (_, true) => {}
        }
        let mut x509 = self.x509.clone();
        let mut jwt = self.jwt.clone();
        match kind {
            Kind::X509 => x509.retain(|a| a.id != id),
            Kind::Jwt => jwt.retain(|a| a.kid() != id),
        }
        self.commit(x509, jwt)?;
        tracing::warn!(kind = kind.as_str(), authority_id = %id, "authority revoked: removed from the bundle");
        Ok(Changes {
            bundle: true,
            x509_activated: false,
        })
    }

    /// Removes old authorities past their NotAfter.
    fn prune(&mut self, now: i64) -> Result<Changes, CaError> {
        let expired_x509 = self
            .x509
            .iter()
            .any(|a| a.slot == Slot::Old && a.not_after <= now);
        let expired_jwt = self
            .jwt
            .iter()
            .any(|a| a.slot == Slot::Old && a.not_after <= now);
        if !expired_x509 && !expired_jwt {
            return Ok(Changes::default());
        }
        let keep = |slot: Slot, not_after: i64| slot != Slot::Old || not_after > now;
        let x509: Vec<X509Authority> = self
            .x509
            .iter()
            .filter(|a| keep(a.slot, a.not_after))
            .cloned()
            .collect();
        let jwt: Vec<JwtKeyAuthority> = self
            .jwt
            .iter()
            .filter(|a| keep(a.slot, a.not_after))
            .cloned()
            .collect();
        self.commit(x509, jwt)?;
        tracing::info!("expired old authorities removed from the bundle");
        // Upstream intermediates are not in the bundle.
        Ok(Changes {
            bundle: expired_jwt || (expired_x509 && !self.is_upstream()),
            x509_activated: false,
        })
    }

    /// Re-reads the upstream files; a new valid intermediate becomes active.
    fn reload_upstream(&mut self, config: &CaConfig, now: i64) -> Result<Changes, CaError> {
        let Some(up) = self.upstream.clone() else {
            return Ok(Changes::default());
        };
        self.upstream_next_reload = now + UPSTREAM_RELOAD_EVERY;
        let m = upstream::load(config, &up)?;
        let current = self.active_x509();
        if m.cert_der == current.cert_der {
            tracing::warn!(
                cert = %up.cert_chain_path.display(),
                not_after = current.not_after,
                "the upstream intermediate is past ⅚ of its life and the files still hold it; \
                 replace the certificate chain and key (or fix upstream.command)"
            );
            return Ok(Changes::default());
        }
        let roots = m.authorities.clone();
        let probe = x509_from_material(m, Slot::Active, None, &up.cert_chain_path)?;
        if probe.not_after <= current.not_after {
            tracing::warn!(
                cert = %up.cert_chain_path.display(),
                "the upstream files hold a different intermediate that expires no later than the \
                 active one; keeping the active one"
            );
            return Ok(Changes::default());
        }
        super::Signer::verify_material(config, &probe, &roots, Some(&up))?;
        let bundle_changed = roots != self.upstream_roots;
        let mut x509: Vec<X509Authority> = self
            .x509
            .iter()
            .cloned()
            .map(|mut a| {
                a.slot = Slot::Old;
                a
            })
            .collect();
        tracing::info!(authority_id = %probe.id, not_after = probe.not_after, "new upstream intermediate activated");
        x509.push(probe);
        self.x509 = x509;
        self.upstream_roots = roots;
        Ok(Changes {
            bundle: bundle_changed,
            x509_activated: true,
        })
    }

    /// Whether the upstream hook is due at `now`: past ½ of the active intermediate's life and
    /// not yet run for it.
    pub(crate) fn upstream_hook_due(&self, now: i64) -> bool {
        let a = self.active_x509();
        self.is_upstream()
            && now >= prepare_at(a.start, a.not_after)
            && self.upstream_hook_ran_for.as_deref() != Some(a.id.as_str())
    }

    /// Does every transition due at `now`: prepare at ½, activate at ⅚ (or at once when the
    /// active one has expired), remove expired old ones; upstream: re-read the files from ⅚.
    pub(crate) fn tick(&mut self, config: &CaConfig, now: i64) -> Result<Changes, CaError> {
        let mut ch = Changes::default();
        if self.is_upstream() {
            let a = self.active_x509();
            if now >= activate_at(a.start, a.not_after) && now >= self.upstream_next_reload {
                match self.reload_upstream(config, now) {
                    Ok(c) => ch.merge(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "re-reading the upstream CA files failed; keeping the active intermediate")
                    }
                }
            }
        } else {
            let a = self.active_x509();
            let (nb, na) = (a.start, a.not_after);
            let has_prepared = self.x509.iter().any(|a| a.slot == Slot::Prepared);
            if !has_prepared && now >= prepare_at(nb, na) {
                ch.merge(self.prepare(config, Kind::X509, now)?);
            }
            if now >= activate_at(nb, na) {
                ch.merge(self.activate(Kind::X509, None)?);
            }
        }
        let a = self.active_jwt();
        let (nb, na) = (a.not_before, a.not_after);
        let has_prepared = self.jwt.iter().any(|a| a.slot == Slot::Prepared);
        if !has_prepared && now >= prepare_at(nb, na) {
            ch.merge(self.prepare(config, Kind::Jwt, now)?);
        }
        if now >= activate_at(nb, na) {
            ch.merge(self.activate(Kind::Jwt, None)?);
        }
        ch.merge(self.prune(now)?);
        Ok(ch)
    }

    /// The next time (Unix seconds, after `now`) a transition is due, if any.
    pub(crate) fn next_due(&self, now: i64) -> Option<i64> {
        let mut times = Vec::new();
        let a = self.active_x509();
        if self.is_upstream() {
            if self.upstream_hook_ran_for.as_deref() != Some(a.id.as_str()) {
                times.push(prepare_at(a.start, a.not_after));
            }
            times.push(activate_at(a.start, a.not_after).max(self.upstream_next_reload));
        } else if self.x509.iter().any(|a| a.slot == Slot::Prepared) {
            times.push(activate_at(a.start, a.not_after));
        } else {
            times.push(prepare_at(a.start, a.not_after));
        }
        let j = self.active_jwt();
        if self.jwt.iter().any(|a| a.slot == Slot::Prepared) {
            times.push(activate_at(j.not_before, j.not_after));
        } else {
            times.push(prepare_at(j.not_before, j.not_after));
        }
        times.extend(
            self.x509
                .iter()
                .filter(|a| a.slot == Slot::Old)
                .map(|a| a.not_after),
        );
        times.extend(
            self.jwt
                .iter()
                .filter(|a| a.slot == Slot::Old)
                .map(|a| a.not_after),
        );
        // A time already passed is due now (a failed transition is retried by the caller).
        times.into_iter().map(|t| t.max(now)).min()
    }
}

/// An authority from loaded signing material.
fn x509_from_material(
    m: SigningMaterial,
    slot: Slot,
    files: Option<(String, String)>,
    path: &Path,
) -> Result<X509Authority, CaError> {
    let cert = parse_cert(&m.cert_der, path)?;
    let id = subject_key_id(&cert);
    let not_before = unix(cert.validity().not_before.to_datetime());
    let issuer = Issuer::from_ca_cert_der(&m.cert_der.as_slice().into(), m.key).map_err(|e| {
        CaError::NotACa {
            path: path.to_path_buf(),
            reason: format!("its subject name cannot be used as an issuer name: {e}"),
        }
    })?;
    let not_after = unix(m.not_after);
    // Self-signed authorities (with files) were issued BACKDATE after their NotBefore.
    let start = if files.is_some() {
        (not_before + BACKDATE.as_secs() as i64).min(not_after)
    } else {
        not_before
    };
    Ok(X509Authority {
        id,
        issuer: Arc::new(issuer),
        cert_der: m.cert_der,
        chain_tail: m.chain_tail,
        not_before,
        start,
        not_after,
        slot,
        tainted: false,
        files,
    })
}

/// Loads one journaled self-signed authority: the key must match the certificate, which must be
/// a CA of this trust domain (it may have expired: an expired old one is then removed).
fn load_x509_record(
    config: &CaConfig,
    journal: &Path,
    r: &X509Record,
) -> Result<X509Authority, CaError> {
    check_file_name(journal, &r.key_file)?;
    check_file_name(journal, &r.cert_file)?;
    let key_path = config.dir.join(&r.key_file);
    let cert_path = config.dir.join(&r.cert_file);
    let key = keys::load_key_file(&key_path)?.ok_or_else(|| CaError::MissingKey {
        cert: cert_path.clone(),
        key: key_path.clone(),
    })?;
    let pem = keys::read_text_file(&cert_path)?.ok_or_else(|| {
        bad_journal(
            journal,
            format!("it lists {} but the file is missing", cert_path.display()),
        )
    })?;
    let bad = |reason: String| CaError::BadCertFile {
        path: cert_path.clone(),
        reason,
    };
    let mut certs = parse_pem_certs(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.len() != 1 {
        return Err(bad(format!(
            "expected exactly one certificate, found {}",
            certs.len()
        )));
    }
    let der = certs.remove(0);
    let cert = parse_cert(&der, &cert_path)?;
    super::check_ca_cert_at(&cert, &key, &cert_path, &key_path, false)?;
    super::check_trust_domain_uri(config, &der, &cert_path)?;
    let not_after = cert.validity().not_after.to_datetime();
    let a = x509_from_material(
        SigningMaterial {
            key,
            cert_der: der,
            chain_tail: Vec::new(),
            authorities: Vec::new(),
            not_after,
        },
        r.slot,
        Some((r.key_file.clone(), r.cert_file.clone())),
        &cert_path,
    )?;
    if a.id != r.id {
        return Err(bad_journal(
            journal,
            format!(
                "it lists authority {} in {}, whose subject key ID is {}",
                r.id, r.cert_file, a.id
            ),
        ));
    }
    Ok(X509Authority {
        tainted: r.tainted,
        ..a
    })
}

fn load_jwt_record(
    _config: &CaConfig,
    journal: &Path,
    r: &JwtRecord,
) -> Result<JwtKeyAuthority, CaError> {
    check_file_name(journal, &r.key_file)?;
    let path = _config.dir.join(&r.key_file);
    let key = JwtKey::load(&path)?.ok_or_else(|| {
        bad_journal(
            journal,
            format!(
                "it lists JWT key {} but the file is missing",
                path.display()
            ),
        )
    })?;
    if key.kid() != r.kid {
        return Err(bad_journal(
            journal,
            format!(
                "it lists JWT key {} in {}, whose kid is {}",
                r.kid,
                r.key_file,
                key.kid()
            ),
        ));
    }
    Ok(JwtKeyAuthority {
        key: Arc::new(key),
        not_before: r.not_before,
        not_after: r.not_after,
        slot: r.slot,
        tainted: r.tainted,
        key_file: r.key_file.clone(),
    })
}

#[cfg(test)]
mod tests;
