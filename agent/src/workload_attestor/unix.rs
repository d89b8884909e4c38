//! `unix:` selectors: user and groups, executable path and SHA-256.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use nix::unistd::{Gid, Group, Uid, User};
use sha2::{Digest, Sha256};
use sigil::selector::Selector;

use super::process::{is_gone, proc_path};
use super::{AttestError, HashStep};

/// How many executables' hashes are kept; past that the cache starts over (a node runs far fewer
/// distinct binaries, so this only bounds memory against pathological churn).
const MAX_CACHED_HASHES: usize = 4096;

/// What readlink of `/proc/<pid>/exe` appends when the file was unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Adds `unix:<value>`; a value the selector rules refuse (a control character in a path, a
/// path too long) is skipped: fewer selectors can only match fewer entries.
fn push(out: &mut Vec<Selector>, value: String) {
    match Selector::new("unix", &value) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(%e, "unix selector skipped"),
    }
}

/// `unix:uid`, `unix:gid`, and `unix:user` / `unix:group` when the IDs have names.
pub(crate) fn identity_selectors(uid: u32, gid: u32) -> Vec<Selector> {
    let mut out = Vec::new();
    push(&mut out, format!("uid:{uid}"));
    if let Some(name) = user_name(uid) {
        push(&mut out, format!("user:{name}"));
    }
    push(&mut out, format!("gid:{gid}"));
    if let Some(name) = group_name(gid) {
        push(&mut out, format!("group:{name}"));
    }
    out
}

/// `unix:supplementary_gid` and, when named, `unix:supplementary_group` for each group on the
/// `Groups:` line of `/proc/<pid>/status`.
pub(crate) fn supplementary_selectors(status: &[u8]) -> Vec<Selector> {
    let mut out = Vec::new();
    for gid in supplementary_gids(status) {
        push(&mut out, format!("supplementary_gid:{gid}"));
        if let Some(name) = group_name(gid) {
            push(&mut out, format!("supplementary_group:{name}"));
        }
    }
    out
}

/// The gids on the `Groups:` line of a status file (none if it has no such line).
pub(crate) fn supplementary_gids(status: &[u8]) -> Vec<u32> {
    // Lossy: the Name: line holds the command name, which may be any bytes.
    let text = String::from_utf8_lossy(status);
    text.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_ascii_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// How long a uid/gid → name lookup is re-used: NSS re-reads /etc/passwd and /etc/group on
/// every call, which would otherwise cost each Workload API call ~10 µs.
const NAME_TTL: std::time::Duration = std::time::Duration::from_secs(30);

type NameCache = std::sync::Mutex<
    std::collections::HashMap<(bool, u32), (Option<String>, tokio::time::Instant)>,
>;

/// Cached name of a user (`is_group` false) or group id.
fn cached_name(is_group: bool, id: u32, lookup: fn(u32) -> Option<String>) -> Option<String> {
    static CACHE: std::sync::OnceLock<NameCache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let now = tokio::time::Instant::now();
    {
        let map = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((name, at)) = map.get(&(is_group, id)) {
            if now.duration_since(*at) < NAME_TTL {
                return name.clone();
            }
        }
    }
    let name = lookup(id);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_CACHED_HASHES {
        map.clear();
    }
    map.insert((is_group, id), (name.clone(), now));
    name
}

fn user_name(uid: u32) -> Option<String> {
    cached_name(false, uid, lookup_user_name)
}

fn group_name(gid: u32) -> Option<String> {
    cached_name(true, gid, lookup_group_name)
}

fn lookup_user_name(uid: u32) -> Option<String> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(user) => user.map(|u| u.name),
        Err(e) => {
            tracing::debug!(uid, %e, "user name lookup failed");
            None
        }
    }
}

fn lookup_group_name(gid: u32) -> Option<String> {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(group) => group.map(|g| g.name),
        Err(e) => {
            tracing::debug!(gid, %e, "group name lookup failed");
            None
        }
    }
}

/// Identity of one version of a file: if any of it differs, the content may differ.
///
/// ctime is in the key although mtime is too: a file's owner can set mtime back to its old
/// value after changing the content, but nobody can set ctime (any change moves it to now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// SHA-256s of executables already hashed, so each binary is read once, not per connection.
#[derive(Debug, Default)]
pub(crate) struct ExeHashCache {
    pub(crate) map: Mutex<HashMap<FileKey, String>>,
    /// How many files were read and hashed (cache misses).
    pub(crate) hashed: std::sync::atomic::AtomicU64,
}

impl ExeHashCache {
    fn get(&self, key: &FileKey) -> Option<String> {
        // A panic elsewhere while holding the lock leaves a valid map: keep using it.
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }

    fn put(&self, key: FileKey, hash: String) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED_HASHES {
            map.clear();
        }
        map.insert(key, hash);
    }
}

/// `unix:path` and `unix:sha256` of the process's executable.
///
/// Both are skipped (not an error) when the agent may not look at the executable (another user's
/// process and the agent is not root) or when it was deleted: its path then names another file
/// or none. `unix:path` is also skipped when the path, in the agent's own view of the file
/// system, is not the very file the process runs: a process in another mount namespace (a
/// container) reports paths inside its own root, which may name a different host file.
/// The hash is read through `/proc/<pid>/exe`, so it is right in any mount namespace.
///
/// With [`HashStep::Skip`] there is no `unix:sha256`; with [`HashStep::CachedOnly`] a hash not
/// in the cache is not computed: `Ok(None)` says hashing is needed (the caller then runs the
/// attestation where blocking is fine).
pub(crate) fn exe_selectors(
    proc_root: &Path,
    pid: i32,
    cache: &ExeHashCache,
    step: HashStep,
) -> Result<Option<Vec<Selector>>, AttestError> {
    let link = proc_path(proc_root, pid, "exe");
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        // No exe link: the process has exited (a zombie or reaped).
        Err(e) if is_gone(&e) => return Err(AttestError::Gone { pid }),
        Err(e) => {
            tracing::debug!(pid, %e, "executable not readable; no unix:path or unix:sha256");
            return Ok(Some(Vec::new()));
        }
    };
    let shown = target.display();
    if target.as_os_str().as_bytes().ends_with(DELETED_SUFFIX) {
        tracing::debug!(pid, path = %shown, "executable deleted; no unix:path or unix:sha256");
        return Ok(Some(Vec::new()));
    }
    // stat through the link (no open: the file is only opened to hash a version not seen yet).
    let meta = match std::fs::metadata(&link) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(pid, %e, "executable not readable; no unix:path or unix:sha256");
            return Ok(Some(Vec::new()));
        }
    };
    // The readlink suffix is only a hint (a file may be named "x (deleted)"); no links is proof.
    if meta.nlink() == 0 || !meta.is_file() {
        tracing::debug!(pid, path = %shown, "exe deleted or not a file; no unix:path/sha256");
        return Ok(Some(Vec::new()));
    }

    let mut out = Vec::new();
    if same_file(&target, &meta) {
        match target.to_str() {
            Some(path) if target.is_absolute() => push(&mut out, format!("path:{path}")),
            _ => tracing::debug!(pid, path = %shown, "exe path not absolute UTF-8; no unix:path"),
        }
    } else {
        // e.g. a process in another mount namespace (a container).
        tracing::debug!(pid, path = %shown, "exe path names another file here; no unix:path");
    }
    match step {
        HashStep::Skip => return Ok(Some(out)),
        HashStep::CachedOnly if cache.get(&FileKey::of(&meta)).is_none() => return Ok(None),
        HashStep::CachedOnly | HashStep::Compute => {}
    }
    match sha256_cached(&link, &meta, cache) {
        Ok(Some(hash)) => push(&mut out, format!("sha256:{hash}")),
        Ok(None) => {
            tracing::debug!(pid, "executable changed while being hashed; no unix:sha256");
        }
        Err(e) => tracing::debug!(pid, %e, "executable not hashable; no unix:sha256"),
    }
    Ok(Some(out))
}

/// True if `path` (as the agent sees it) is the file described by `meta`.
fn same_file(path: &Path, meta: &std::fs::Metadata) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
}

/// The SHA-256 (lowercase hex) of the file at `path` described by `meta`, from the cache when
/// this version was hashed before. None if the file is not that version any more or changed
/// while it was read: the hash would describe another version, or none.
fn sha256_cached(
    path: &Path,
    meta: &std::fs::Metadata,
    cache: &ExeHashCache,
) -> io::Result<Option<String>> {
    let key = FileKey::of(meta);
    if let Some(hash) = cache.get(&key) {
        return Ok(Some(hash));
    }
    let mut file = File::open(path)?;
    cache
        .hashed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    if FileKey::of(&file.metadata()?) != key {
        return Ok(None);
    }
    let hash = hex::encode(hasher.finalize());
    cache.put(key, hash.clone());
    Ok(Some(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line() {
        let status = b"Name:\t\xff\xfe odd name\nUmask:\t0022\nState:\tS (sleeping)\n\
            Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nFDSize:\t256\n\
            Groups:\t4 24 27 30 46 1000 \nNStgid:\t1\n";
        assert_eq!(supplementary_gids(status), [4, 24, 27, 30, 46, 1000]);
        assert_eq!(supplementary_gids(b"Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(supplementary_gids(b"Name:\tx\n"), Vec::<u32>::new());
        assert_eq!(supplementary_gids(b""), Vec::<u32>::new());
        // Junk entries are skipped, the rest kept.
        assert_eq!(
            supplementary_gids(b"Groups:\t5 x -1 99999999999 7\n"),
            [5, 7]
        );
    }

    #[test]
    fn identity_names_resolve_like_nss() {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let got: Vec<String> = identity_selectors(uid, gid)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(got.contains(&format!("unix:uid:{uid}")), "{got:?}");
        assert!(got.contains(&format!("unix:gid:{gid}")), "{got:?}");
        if let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) {
            assert!(got.contains(&format!("unix:user:{}", u.name)), "{got:?}");
        }
        if let Ok(Some(g)) = Group::from_gid(Gid::from_raw(gid)) {
            assert!(got.contains(&format!("unix:group:{}", g.name)), "{got:?}");
        }
        // An ID with no name still gives its number.
        let got: Vec<String> = identity_selectors(4_000_000_123, 4_000_000_321)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["unix:uid:4000000123", "unix:gid:4000000321"]);
    }

    #[test]
    fn cache_is_bounded() {
        let cache = ExeHashCache::default();
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            ctime: 0,
            ctime_nsec: 0,
        };
        for ino in 0..=MAX_CACHED_HASHES as u64 {
            cache.put(key(ino), ino.to_string());
        }
        assert!(cache.map.lock().unwrap().len() <= MAX_CACHED_HASHES);
        assert_eq!(
            cache.get(&key(MAX_CACHED_HASHES as u64)).as_deref(),
            Some(MAX_CACHED_HASHES.to_string().as_str())
        );
    }
}
