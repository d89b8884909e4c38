//! gRPC over Unix domain sockets: binding in a directory nobody else controls, and a client channel.
//!
//! A Unix socket is only as trustworthy as the directories above it: whoever can write to the
//! socket's directory can move our socket aside and put their own in its place, and clients
//! (root running `sigil-server bundle show`, workloads fetching their SVID) then talk to them.
//! [`bind`] therefore refuses to serve from a path someone else could change, with the same rule
//! as OpenSSH's `StrictModes`, extended for sticky directories like `/tmp`:
//!
//! - The socket's own directory must be a real directory (a symbolic link there is refused, never
//!   followed), owned by this process's effective uid and writable by nobody else (no group or
//!   other write bit). If it is missing it is created with its final mode (`dir_mode`); the mode
//!   of a directory we did not create is never changed.
//! - Every directory above it must be owned by root or by us, and either writable by its owner
//!   only, or sticky (`/tmp`: others may add entries but cannot rename or remove ours). Missing
//!   ones are created `0755`. Symbolic links on the way are followed, and must themselves be
//!   owned by root or by us (their owner could point them elsewhere).
//! - A socket already at the path is replaced only if nothing answers on it (a stale file from a
//!   crash); if another process serves there, binding fails. Anything else at the path is left
//!   alone and is an error.
//!
//! [`check_client_path`] is the clients' side: they cannot know which uid the server runs as,
//! but refuse a socket in a directory that anybody but its owner can write to.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

/// Mode of the directories above the socket's own that [`bind`] creates.
const ANCESTOR_DIR_MODE: u32 = 0o755;
/// Symbolic links followed on one path before giving up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;
/// How long probing an existing socket may take before it counts as in use.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a socket could not be bound (or, for a client, trusted).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A directory (or symbolic link) on the path is controlled by someone else.
    #[error("refusing {path} (owner uid {uid}, mode {mode:04o}): {problem}; {remedy}")]
    Unsafe {
        /// The offending directory or link.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits (with set-id and sticky bits).
        mode: u32,
        /// What is wrong with it.
        problem: String,
        /// What to do about it.
        remedy: String,
    },
    /// The socket's own directory is a symbolic link.
    #[error("refusing {path}: the socket's directory is a symbolic link, which is never followed; remove the link (or point the socket path at the real directory) and start again")]
    SymlinkDir {
        /// The link.
        path: PathBuf,
    },
    /// A missing directory could not be created.
    #[error("creating {path}: {source}; create it (owned by this user, writable by nobody else) or choose a socket path in a directory this user may write to")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process is serving on the socket.
    #[error("another process is serving on {path}; stop it first, or choose another socket path")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("{path} exists and is not a socket; remove it or choose another path")]
    NotSocket {
        /// The path.
        path: PathBuf,
    },
    /// The path cannot name a socket (no file name, `..` components, link loops).
    #[error("{path}: {reason}")]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn unsafe_dir(
    path: &Path,
    meta: &std::fs::Metadata,
    problem: String,
    remedy: String,
) -> SocketError {
    SocketError::Unsafe {
        path: path.to_path_buf(),
        uid: meta.uid(),
        mode: meta.mode() & 0o7777,
        problem,
        remedy,
    }
}

fn writable_by_others(meta: &std::fs::Metadata) -> bool {
    meta.mode() & 0o022 != 0
}

fn sticky(meta: &std::fs::Metadata) -> bool {
    meta.mode() & 0o1000 != 0
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A socket bound by [`bind`]; dropping it removes the socket file, but only while it is still
/// the one we bound (another process may have replaced it meanwhile, and that one stays).
#[derive(Debug)]
#[must_use = "dropping the SocketFile removes the socket"]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Where the socket is (symbolic links above it resolved).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` is still the socket we bound (same device and inode).
    pub fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .map(|m| m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.is_ours() {
            tracing::debug!(path = %self.path.display(), "socket replaced or gone; not removing it");
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "removing socket");
        }
    }
}

/// Binds a Unix socket at `path` (rules in the module docs).
///
/// The socket's directory is created with `dir_mode` if missing (e.g. `0o700` for an admin
/// socket only its owner may reach, `0o755` for a public one nobody else may write into); an
/// existing one must already be ours and writable by nobody else, and keeps its mode. The socket
/// gets `socket_mode`. Keep the returned [`SocketFile`] as long as the listener serves.
pub async fn bind(
    path: &Path,
    dir_mode: u32,
    socket_mode: u32,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let path = std::path::absolute(path).map_err(io_err("resolving", path))?;
    let bad = |reason| SocketError::BadPath {
        path: path.clone(),
        reason,
    };
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad("a socket path must not contain `..`"));
    }
    let name = path.file_name().ok_or_else(|| bad("no socket file name"))?;
    let dir = path.parent().ok_or_else(|| bad("no directory"))?;
    let dir = socket_dir(dir, dir_mode)?;
    let socket = dir.join(name);

    match std::fs::symlink_metadata(&socket) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotSocket { path: socket });
            }
            if probe(&socket).await? {
                return Err(SocketError::InUse { path: socket });
            }
            tracing::info!(path = %socket.display(), "removing the stale socket of an earlier run");
            match std::fs::remove_file(&socket) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing stale socket", &socket)(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", &socket)(e)),
    }
    let listener = UnixListener::bind(&socket).map_err(io_err("binding", &socket))?;
    // From here on a failure must not leave the socket behind: the guard removes it.
    let meta = std::fs::symlink_metadata(&socket).map_err(io_err("inspecting", &socket))?;
    let file = SocketFile {
        path: socket,
        dev: meta.dev(),
        ino: meta.ino(),
    };
    std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(socket_mode))
        .map_err(io_err("setting the mode of", &file.path))?;
    Ok((listener, file))
}

/// Whether something answers on the socket at `path` (`false`: a stale file nobody listens on).
async fn probe(path: &Path) -> Result<bool, SocketError> {
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        // A listener that does not even complete a connection still owns the path.
        Err(_elapsed) => Ok(true),
        Ok(Ok(_stream)) => Ok(true),
        // Nobody listens (ECONNREFUSED), or it vanished meanwhile.
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        // A full backlog (EAGAIN): there is a listener.
        Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Ok(Err(e)) => Err(io_err("checking whether a process serves on", path)(e)),
    }
}

/// Makes sure `dir` is a directory only we control, creating what is missing: returns it with
/// the symbolic links above it resolved.
fn socket_dir(dir: &Path, dir_mode: u32) -> Result<PathBuf, SocketError> {
    let me = euid();
    let (above, name) = match (dir.parent(), dir.file_name()) {
        (Some(above), Some(name)) => (resolve(above, Some(me), true)?, name),
        // The socket directly in `/`.
        _ => (PathBuf::new(), dir.as_os_str()),
    };
    let dir = above.join(name);
    let mut created = false;
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            created = create_dir(&dir, dir_mode)?;
            std::fs::symlink_metadata(&dir).map_err(io_err("inspecting", &dir))?
        }
        Err(e) => return Err(io_err("inspecting", &dir)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(SocketError::SymlinkDir { path: dir });
    }
    if !meta.is_dir() {
        return Err(SocketError::BadPath {
            path: dir,
            reason: "not a directory",
        });
    }
    if meta.uid() != me {
        return Err(unsafe_dir(
            &dir,
            &meta,
            format!("the socket's directory belongs to uid {}, not to this process (uid {me}), so its owner could replace the socket", meta.uid()),
            format!("remove the directory (sigil creates it, mode {dir_mode:04o}) or have it owned by uid {me}, or choose another socket path"),
        ));
    }
    if writable_by_others(&meta) {
        return Err(unsafe_dir(
            &dir,
            &meta,
            "the socket's directory is writable by group or others, who could replace the socket".into(),
            format!("`chmod go-w {}`, or remove it (sigil creates it, mode {dir_mode:04o}), or choose another socket path", dir.display()),
        ));
    }
    if created {
        set_dir_mode(&dir, dir_mode)?;
    }
    Ok(dir)
}

/// Creates the directory `dir` with `mode` (the umask may take bits away; the caller then sets
/// the exact mode). `false` if it appeared meanwhile (then someone else made it: it is checked
/// like any existing directory and its mode is left alone).
fn create_dir(dir: &Path, mode: u32) -> Result<bool, SocketError> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(SocketError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Sets the mode of a directory we just created, through a descriptor opened without following
/// links (it cannot have been swapped for a link: its parent is checked to be safe).
fn set_dir_mode(dir: &Path, mode: u32) -> Result<(), SocketError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(io_err("opening", dir))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", dir))
}

/// Resolves the directory `dir` component by component from `/`, following symbolic links, and
/// checks every directory on the way: with `owner = Some(uid)` (binding) each must belong to root
/// or `uid` and be writable only by its owner unless sticky, links too must belong to root or
/// `uid`; with `None` (a client) ownership is not checked. With `create`, missing directories are
/// created `0755`.
fn resolve(dir: &Path, owner: Option<u32>, create: bool) -> Result<PathBuf, SocketError> {
    let dir = std::path::absolute(dir).map_err(io_err("resolving", dir))?;
    let mut pending: VecDeque<OsString> = components(&dir);
    let mut cur = PathBuf::from("/");
    check_above(&cur, &lstat(&cur)?, owner)?;
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            // `cur` has no links left in it, so its parent is the real one (and checked).
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                if create_dir(&next, ANCESTOR_DIR_MODE)? {
                    let m = lstat(&next)?;
                    if m.is_dir() && m.uid() == euid() {
                        set_dir_mode(&next, ANCESTOR_DIR_MODE)?;
                    }
                }
                lstat(&next)?
            }
            Err(e) => return Err(io_err("inspecting", &next)(e)),
        };
        if meta.file_type().is_symlink() {
            if let Some(me) = owner {
                if meta.uid() != 0 && meta.uid() != me {
                    return Err(unsafe_dir(
                        &next,
                        &meta,
                        format!("this symbolic link on the socket's path belongs to uid {}, who could point it elsewhere", meta.uid()),
                        "use a socket path whose links belong to root or this user".into(),
                    ));
                }
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(SocketError::BadPath {
                    path: dir.to_path_buf(),
                    reason: "too many levels of symbolic links",
                });
            }
            let target = std::fs::read_link(&next).map_err(io_err("reading link", &next))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            for c in components(&target).into_iter().rev() {
                pending.push_front(c);
            }
            continue;
        }
        if !meta.is_dir() {
            return Err(SocketError::BadPath {
                path: next,
                reason: "not a directory",
            });
        }
        check_above(&next, &meta, owner)?;
        cur = next;
    }
    Ok(cur)
}

/// The normal and `..` components of `p` (`/` and `.` dropped): from `/` for an absolute path,
/// from the link's directory for a relative link target.
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn lstat(p: &Path) -> Result<std::fs::Metadata, SocketError> {
    std::fs::symlink_metadata(p).map_err(io_err("inspecting", p))
}

/// The rule for a directory above the socket's own (see [`resolve`]).
fn check_above(
    path: &Path,
    meta: &std::fs::Metadata,
    owner: Option<u32>,
) -> Result<(), SocketError> {
    if let Some(me) = owner {
        if meta.uid() != 0 && meta.uid() != me {
            return Err(unsafe_dir(
                path,
                meta,
                format!("a directory on the socket's path belongs to uid {}, who could replace what is below it", meta.uid()),
                "put the socket below directories owned by root or this user only (the defaults are under /run)".into(),
            ));
        }
    }
    if writable_by_others(meta) && !sticky(meta) {
        return Err(unsafe_dir(
            path,
            meta,
            "a directory on the socket's path is writable by group or others (and not sticky), who could replace what is below it".into(),
            format!("`chmod go-w {}` or choose another socket path", path.display()),
        ));
    }
    Ok(())
}

/// Checks, before a client connects, that the socket at `path` sits in a directory nobody but
/// its owner can write to, below directories that are writable only by their owners or sticky:
/// otherwise anybody could have put a socket there. (The client cannot tell which user the
/// server runs as, so ownership is not checked; the servers' own rule is stricter, see [`bind`].)
pub fn check_client_path(path: &Path) -> Result<(), SocketError> {
    let path = std::path::absolute(path).map_err(io_err("resolving", path))?;
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dir = resolve(dir, None, false)?;
    let meta = lstat(&dir)?;
    if writable_by_others(&meta) {
        return Err(unsafe_dir(
            &dir,
            &meta,
            "the socket's directory is writable by group or others, so anybody could have put this socket there".into(),
            "connect only to a socket in a directory its server controls (`chmod go-w` it if it is yours)".into(),
        ));
    }
    Ok(())
}

/// A lazily connecting gRPC channel to the Unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const NOBODY: u32 = 65534;

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("sigil-uds-test-")
            .tempdir()
            .unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Changing a file's owner needs root (CI runs as root); elsewhere those cases are skipped.
    fn is_root() -> bool {
        let root = euid() == 0;
        if !root {
            eprintln!("not root: skipping the cases that need another uid's files");
        }
        root
    }

    fn chown_nobody(p: &Path) {
        std::os::unix::fs::chown(p, Some(NOBODY), None).unwrap();
    }

    #[tokio::test]
    async fn creates_missing_directories_with_their_modes_and_sets_the_socket_mode() {
        let base = tempdir();
        let sock = base.path().join("run").join("private").join("admin.sock");
        let (_l, file) = bind(&sock, 0o700, 0o600).await.unwrap();
        assert_eq!(mode(&base.path().join("run")), 0o755);
        assert_eq!(mode(&base.path().join("run").join("private")), 0o700);
        assert_eq!(mode(&sock), 0o600);
        assert_eq!(file.path(), sock);
        // The public layout: others may enter and connect, not create files.
        let public = base.path().join("run").join("public").join("api.sock");
        let (_l2, _f2) = bind(&public, 0o755, 0o777).await.unwrap();
        assert_eq!(mode(public.parent().unwrap()), 0o755);
        assert_eq!(mode(&public), 0o777);
    }

    #[tokio::test]
    async fn a_directory_we_did_not_create_keeps_its_mode() {
        let base = tempdir();
        let dir = base.path().join("mine");
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        chmod(&dir, 0o700);
        let (_l, _f) = bind(&dir.join("api.sock"), 0o755, 0o777).await.unwrap();
        assert_eq!(
            mode(&dir),
            0o700,
            "an existing directory must not be chmod-ed"
        );
    }

    #[tokio::test]
    async fn refuses_a_socket_directory_owned_by_another_user() {
        if !is_root() {
            return;
        }
        let base = tempdir();
        let dir = base.path().join("public");
        fs::DirBuilder::new().mode(0o755).create(&dir).unwrap();
        chmod(&dir, 0o755);
        chown_nobody(&dir);
        let err = bind(&dir.join("api.sock"), 0o755, 0o777)
            .await
            .expect_err("another user's directory");
        let text = err.to_string();
        assert!(
            matches!(err, SocketError::Unsafe { uid: NOBODY, .. }),
            "{text}"
        );
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(
            text.contains("uid 65534") && text.contains("0755"),
            "{text}"
        );
        assert!(text.contains("remove the directory"), "{text}");
        assert!(!dir.join("api.sock").exists());
    }

    #[tokio::test]
    async fn refuses_a_socket_directory_writable_by_group_or_others_and_leaves_its_mode() {
        let base = tempdir();
        for m in [0o775, 0o757, 0o1777] {
            let dir = base.path().join(format!("d{m:o}"));
            fs::create_dir(&dir).unwrap();
            chmod(&dir, m);
            let err = bind(&dir.join("admin.sock"), 0o700, 0o600)
                .await
                .expect_err("writable by others");
            let text = err.to_string();
            assert!(text.contains("writable by group or others"), "{text}");
            assert!(text.contains(&format!("{m:04o}")), "{text}");
            assert_eq!(
                mode(&dir),
                m,
                "the mode of a refused directory is left alone"
            );
            assert!(!dir.join("admin.sock").exists());
        }
    }

    #[tokio::test]
    async fn refuses_a_symbolic_link_as_the_socket_directory_and_never_chmods_its_target() {
        let base = tempdir();
        // A private directory of someone else's, e.g. root's secrets.
        let secret = base.path().join("secret");
        fs::DirBuilder::new().mode(0o700).create(&secret).unwrap();
        chmod(&secret, 0o700);
        let link = base.path().join("public");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let err = bind(&link.join("api.sock"), 0o755, 0o777)
            .await
            .expect_err("link as the socket's directory");
        assert!(matches!(err, SocketError::SymlinkDir { .. }), "{err}");
        assert!(
            err.to_string().contains(&link.display().to_string()),
            "{err}"
        );
        assert_eq!(
            mode(&secret),
            0o700,
            "the link's target must not be made 0755"
        );
        assert!(!secret.join("api.sock").exists());
    }

    #[tokio::test]
    async fn ancestors_must_be_writable_only_by_their_owner_unless_sticky() {
        let base = tempdir();
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let err = bind(&open.join("sigil").join("api.sock"), 0o755, 0o777)
            .await
            .expect_err("world-writable ancestor");
        assert!(err.to_string().contains("on the socket's path"), "{err}");
        assert!(
            err.to_string().contains(&open.display().to_string()),
            "{err}"
        );
        assert!(!open.join("sigil").exists(), "nothing is created below it");
        // Like /tmp: others may add entries but not move ours.
        chmod(&open, 0o1777);
        let (_l, _f) = bind(&open.join("sigil").join("api.sock"), 0o755, 0o777)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ancestors_and_links_must_belong_to_root_or_us() {
        if !is_root() {
            return;
        }
        let base = tempdir();
        let theirs = base.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        chmod(&theirs, 0o755);
        chown_nobody(&theirs);
        fs::create_dir(theirs.join("sub")).unwrap();
        let err = bind(&theirs.join("sub").join("api.sock"), 0o700, 0o600)
            .await
            .expect_err("ancestor owned by another user");
        assert!(err.to_string().contains("uid 65534"), "{err}");

        // A link above the socket's directory is followed, if it is root's or ours...
        let real = base.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (_l, f) = bind(&link.join("private").join("a.sock"), 0o700, 0o600)
            .await
            .unwrap();
        assert_eq!(f.path(), real.join("private").join("a.sock"));
        // Relative link targets are taken from the link's directory.
        let rel = base.path().join("rel");
        std::os::unix::fs::symlink("./sub/../real", &rel).unwrap();
        fs::create_dir(base.path().join("sub")).unwrap();
        let (_l, f) = bind(&rel.join("private").join("r.sock"), 0o700, 0o600)
            .await
            .unwrap();
        assert_eq!(f.path(), real.join("private").join("r.sock"));
        // ...but not if someone else could re-point it.
        std::os::unix::fs::lchown(&link, Some(NOBODY), None).unwrap();
        let err = bind(&link.join("other").join("b.sock"), 0o700, 0o600)
            .await
            .expect_err("link owned by another user");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[tokio::test]
    async fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
        let base = tempdir();
        let sock = base.path().join("private").join("admin.sock");
        let (live, file) = bind(&sock, 0o700, 0o600).await.unwrap();
        let err = bind(&sock, 0o700, 0o600).await.expect_err("in use");
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("another process is serving on"),
            "{err}"
        );
        assert!(
            file.is_ours(),
            "the live socket is still the one bound first"
        );
        // Still answering (the probe's connection comes first).
        let accept = tokio::spawn(async move {
            let probe = live.accept().await?;
            let ours = live.accept().await?;
            io::Result::Ok((probe, ours))
        });
        let _client = UnixStream::connect(&sock).await.unwrap();
        accept.await.unwrap().unwrap();

        // A socket file nobody listens on (a crashed run) is replaced.
        drop(file);
        let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(stale);
        assert!(sock.exists());
        let (_l, f) = bind(&sock, 0o700, 0o600).await.unwrap();
        assert!(f.is_ours());
    }

    #[tokio::test]
    async fn other_files_are_never_replaced() {
        let base = tempdir();
        let dir = base.path().join("private");
        let (_l, _f) = bind(&dir.join("admin.sock"), 0o700, 0o600).await.unwrap();
        let file = dir.join("not-a-socket");
        fs::write(&file, b"keep me").unwrap();
        let err = bind(&file, 0o700, 0o600).await.expect_err("a regular file");
        assert!(matches!(err, SocketError::NotSocket { .. }), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn the_socket_is_removed_at_the_end_only_while_it_is_ours() {
        let base = tempdir();
        let sock = base.path().join("private").join("admin.sock");
        let (l, file) = bind(&sock, 0o700, 0o600).await.unwrap();
        drop(l);
        drop(file);
        assert!(!sock.exists(), "our socket is removed");

        let (l, file) = bind(&sock, 0o700, 0o600).await.unwrap();
        drop(l);
        // Someone else's socket took the path meanwhile (ours moved aside): it stays.
        fs::rename(&sock, sock.with_extension("old")).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(!file.is_ours());
        drop(file);
        assert!(sock.exists(), "a socket we did not bind is left alone");
    }

    #[test]
    fn clients_refuse_a_socket_anybody_could_have_put_there() {
        let base = tempdir();
        let ok = base.path().join("ok");
        fs::create_dir(&ok).unwrap();
        chmod(&ok, 0o755);
        check_client_path(&ok.join("api.sock")).unwrap();
        for m in [0o777, 0o1777, 0o775] {
            chmod(&ok, m);
            let err = check_client_path(&ok.join("api.sock")).expect_err("writable dir");
            assert!(
                err.to_string().contains("writable by group or others"),
                "{err}"
            );
            assert!(err.to_string().contains(&ok.display().to_string()), "{err}");
        }
        // A writable, non-sticky directory higher up.
        chmod(&ok, 0o755);
        chmod(base.path(), 0o777);
        let err = check_client_path(&ok.join("api.sock")).expect_err("writable ancestor");
        assert!(
            err.to_string().contains(&base.path().display().to_string()),
            "{err}"
        );
        chmod(base.path(), 0o700);
    }
}
