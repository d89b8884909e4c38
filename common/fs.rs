//! File writes that survive crashes: whole-or-nothing replacement with the mode set from creation.
//!
//! Keys (CA, JWT, agent and workload SVID keys) are written through [`write_atomic`]: a temporary
//! file in the same directory, created with its final mode (a secret is never world-readable,
//! not even for an instant), fsync-ed, renamed over the target, and the directory fsync-ed. A
//! crash at any point leaves either the old file or the new one, never a truncated key.

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
