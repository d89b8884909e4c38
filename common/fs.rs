//! File writes that survive crashes: whole-or-nothing replacement with the mode set from creation.
//!
//! Keys (CA, JWT, agent and workload SVID keys) are written through [`write_atomic`]: a temporary
//! file in the same directory, created with its final mode (a secret is never world-readable,
//! not even for an instant), fsync-ed, renamed over the target, and the directory fsync-ed. A
//! crash at any point leaves either the old file or the new one, never a truncated key.
//!
//! [`lock_dir`] keeps a second process off a data directory that one is already using.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically replaces `path` with `contents`, created with `mode` (e.g. `0o600` for secrets).
/// Errors name the step and the file.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u32 = rand_u32();
    let tmp = dir.join(format!(".{name}.tmp.{}.{nonce:08x}", std::process::id()));
    let step = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| step("creating", &tmp, e))?;
        f.write_all(contents)
            .map_err(|e| step("writing", &tmp, e))?;
        f.sync_all().map_err(|e| step("fsync of", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| step("renaming into place", path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| step("fsync of directory", dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] with mode 0600.
pub fn write_secret(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// An exclusive lock on a data directory, held until dropped (the kernel also releases it when
/// the process dies, so a crash never leaves the directory locked).
#[derive(Debug)]
pub struct DirLock {
    _file: nix::fcntl::Flock<File>,
}

/// Why [`lock_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened.
    #[error("opening lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: std::path::PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("{dir} is in use by another {program}{}: it holds the lock {path}; stop that one first, or give this one its own data directory", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The lock file.
        path: std::path::PathBuf,
        /// Which program locks it (for the message).
        program: String,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
    },
}

/// Takes an exclusive, non-blocking lock on `<dir>/<name>` (created 0600) for `program` (named in
/// the error), and writes our pid into it for the next one's error message.
pub fn lock_dir(dir: &Path, name: &str, program: &str) -> Result<DirLock, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join(name);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err)?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = io::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                path,
                program: program.to_string(),
                pid,
            });
        }
        Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
    };
    // Only informative: the lock, not the content, decides.
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| io::Seek::rewind(&mut *file))
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(io_err)?;
    Ok(DirLock { _file: file })
}

/// A random suffix for temporary names (collisions are also caught by `create_new`).
fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // ring's system RNG; on failure fall back to the time, uniqueness is still enforced.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_locked_directory_is_refused_until_its_holder_lets_go() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = lock_dir(dir.path(), "test.lock", "sigil-test").expect("first lock");
        let err = lock_dir(dir.path(), "test.lock", "sigil-test").expect_err("second lock");
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("in use by another sigil-test"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        let lock_file = dir.path().join("test.lock");
        assert_eq!(
            fs::metadata(&lock_file)?.permissions().mode() & 0o777,
            0o600
        );
        drop(first);
        let _again = lock_dir(dir.path(), "test.lock", "sigil-test").expect("lock after release");
        Ok(())
    }

    #[test]
    fn secrets_are_0600_and_replaced_whole() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("sigil-fs-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let p = dir.join("k.pem");
        write_secret(&p, b"first")?;
        assert_eq!(fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
        write_secret(&p, b"second")?;
        assert_eq!(fs::read(&p)?, b"second");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir)?.count(), 1);
        // A failed write names the file and leaves nothing.
        let err = write_secret(&dir.join("missing").join("x"), b"x").expect_err("no such dir");
        assert!(err.to_string().contains("missing"), "{err}");
        fs::remove_dir_all(&dir)
    }
}
