//! Writing SVID files so that readers never see a half-written file or a certificate with the
//! other version's key: the one writer behind `sigil-agent helper` and `api fetch|watch --write`.
//!
//! A set of files that belong together (certificate chain, key, bundle) is published as a
//! *version*:
//!
//! ```text
//! cert_dir/
//!   .sigil.v7/svid.pem  svid_key.pem  svid_bundle.pem   complete, fsync-ed, never modified again
//!   .sigil.v8/…                                          the version just published
//!   .sigil.current -> .sigil.v8                          switched with one rename(2)
//!   svid.pem        -> .sigil.current/svid.pem           made once, never change
//!   svid_key.pem    -> .sigil.current/svid_key.pem
//!   svid_bundle.pem -> .sigil.current/svid_bundle.pem
//! ```
//!
//! Publishing writes every file of the new version into a fresh `.sigil.v<N>` directory (each
//! file created with its final mode before it has content — a key is never readable by others,
//! not even empty — then written and fsync-ed; then the directory is fsync-ed), points a new
//! symlink at it and renames that over `.sigil.current`, and fsyncs `cert_dir`. The public names
//! are relative symlinks through `.sigil.current`, so the mount path of `cert_dir` may differ
//! between containers.
//!
//! What a reader gets:
//! - Every file is whole: it is complete before any public name leads to it and never changes.
//! - At every instant all public names lead into the same version: one rename switches them all.
//!   A program that reads its files after the helper's `renew_signal` (sent after the switch) —
//!   nginx, PostgreSQL, HAProxy reloading — reads a matching certificate and key.
//! - A reader that opens the certificate and, later, the key by their public names can still
//!   straddle a switch that happens between its two opens (no file-system layout can prevent
//!   that). A reader that must rule it out resolves `.sigil.current` once (`readlink`) and opens
//!   every file under the version directory it names: a version directory stays complete until
//!   two more versions have been published, a full rotation later.
//! - After a crash: either the old or the new version is current, both complete; a version
//!   directory left half-written is never current and is removed by the next publish.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The symlink naming the current version directory.
pub const CURRENT: &str = ".sigil.current";
/// Prefix of version directories (`.sigil.v<N>`).
pub const VERSION_PREFIX: &str = ".sigil.v";
/// Names the writer keeps for itself: public file names must not start with this.
pub const RESERVED_PREFIX: &str = ".sigil.";
/// Mode of version directories: readers of another uid may enter; each file has its own mode.
const VERSION_DIR_MODE: u32 = 0o755;

/// Why files could not be written; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A file-system step failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done (`creating`, `renaming`, …).
        step: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A public file name is not a plain name in the directory.
    #[error("file name {0:?} must be a plain file name (no '/', not '.' or '..', not starting with {RESERVED_PREFIX:?})")]
    BadName(String),
    /// Two files of one version have the same name.
    #[error("file name {0:?} is given twice")]
    DuplicateName(String),
    /// `cert_dir` is not a directory we may write into.
    #[error("cert_dir {} is not writable{who}: {source} (create it writable by this user, or choose another cert_dir)", path.display())]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// ` by uid N`.
        who: String,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a version: its public name, content and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFile {
    /// Plain file name inside the directory.
    pub name: String,
    /// The whole content.
    pub contents: Vec<u8>,
    /// Exact permission bits (the umask does not apply).
    pub mode: u32,
}

impl OutFile {
    /// A file `name` with `contents` and `mode`.
    pub fn new(name: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            name: name.into(),
            contents: contents.into(),
            mode,
        }
    }
}

/// Checks that `name` is a plain file name the writer may use.
pub fn check_name(name: &str) -> Result<(), WriteError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.starts_with(RESERVED_PREFIX);
    if plain {
        Ok(())
    } else {
        Err(WriteError::BadName(name.to_string()))
    }
}

/// A directory whose file sets are replaced as a whole (see the module documentation).
#[derive(Debug)]
pub struct VersionedDir {
    dir: PathBuf,
    next: u64,
}

impl VersionedDir {
    /// Opens (creating it if missing) `dir` and checks that files can be created in it.
    pub fn open(dir: &Path) -> Result<Self, WriteError> {
        let not_writable = |source: io::Error| WriteError::NotWritable {
            path: dir.to_path_buf(),
            who: format!(" by uid {}", nix::unistd::geteuid()),
            source,
        };
        fs::create_dir_all(dir).map_err(not_writable)?;
        // A probe rather than the mode bits: ACLs, read-only mounts and root all decide too.
        let probe = dir.join(format!("{RESERVED_PREFIX}probe.{}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .map_err(not_writable)?;
        let _ = fs::remove_file(&probe);
        let next = versions(dir)?.into_iter().max().map_or(1, |v| v + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            next,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Publishes `files` as the new current version and returns its directory. On error the
    /// previous version stays current.
    pub fn publish(&mut self, files: &[OutFile]) -> Result<PathBuf, WriteError> {
        let mut names = std::collections::HashSet::new();
        for f in files {
            check_name(&f.name)?;
            if !names.insert(f.name.as_str()) {
                return Err(WriteError::DuplicateName(f.name.clone()));
            }
        }
        let version = self.next;
        self.next += 1;
        let vname = format!("{VERSION_PREFIX}{version}");
        let vdir = self.dir.join(&vname);
        // Left over from a crash (never current: it would have the highest number otherwise
        // taken by a completed publish); start it afresh.
        if fs::symlink_metadata(&vdir).is_ok() {
            fs::remove_dir_all(&vdir).map_err(io_err("removing stale", &vdir))?;
        }
        fs::create_dir(&vdir).map_err(io_err("creating", &vdir))?;
        fs::set_permissions(&vdir, fs::Permissions::from_mode(VERSION_DIR_MODE))
            .map_err(io_err("setting the mode of", &vdir))?;
        let written = (|| {
            for f in files {
                write_new(&vdir.join(&f.name), &f.contents, f.mode)?;
            }
            sync_dir(&vdir)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&vdir);
            return Err(e);
        }
        // The switch: one rename makes every public name lead into the new version.
        replace_symlink(&self.dir, CURRENT, Path::new(&vname))?;
        for f in files {
            let target = Path::new(CURRENT).join(&f.name);
            let link = self.dir.join(&f.name);
            if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                replace_symlink(&self.dir, &f.name, &target)?;
            }
        }
        sync_dir(&self.dir)?;
        // Keep the previous version for readers that resolved `.sigil.current` just before the
        // switch; older ones go. A failure here is only litter, never a wrong file.
        if let Ok(all) = versions(&self.dir) {
            for v in all.into_iter().filter(|v| *v + 1 < version) {
                let old = self.dir.join(format!("{VERSION_PREFIX}{v}"));
                if let Err(e) = fs::remove_dir_all(&old) {
                    tracing::warn!(dir = %old.display(), error = %e, "could not remove an old SVID version");
                }
            }
        }
        Ok(vdir)
    }
}

/// Version numbers of the `.sigil.v<N>` directories in `dir`.
fn versions(dir: &Path) -> Result<Vec<u64>, WriteError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(VERSION_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    Ok(out)
}

/// Creates `path` (which must not exist) with exactly `mode` before writing a byte, then writes
/// and fsyncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    // The umask may have taken bits away; the configured mode is what the operator asked for.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", path))?;
    f.write_all(contents).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("fsync of", path))
}

fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync of directory", dir))
}

/// A temporary name in `dir` for `name`, unique to this process and call.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        "{RESERVED_PREFIX}tmp.{name}.{}.{n}",
        std::process::id()
    ))
}

/// Atomically makes `dir/name` a symlink to `target` (whatever was there before).
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<(), WriteError> {
    let tmp = temp_name(dir, name);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("creating symlink", &tmp))?;
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        WriteError::Io {
            step: "renaming a symlink into place at",
            path: dest,
            source: e,
        }
    })
}

/// Atomically replaces the single file `dir/name` with `contents` at exactly `mode` (temporary
/// file in the same directory created with that mode, fsync, rename, directory fsync). For files
/// that stand alone, such as JWT-SVIDs and the JWT bundle.
pub fn write_single(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    check_name(name)?;
    let tmp = temp_name(dir, name);
    let dest = dir.join(name);
    let result = write_new(&tmp, contents, mode).and_then(|()| {
        fs::rename(&tmp, &dest).map_err(io_err("renaming into place at", &dest))?;
        sync_dir(dir)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("sigil-files-")
            .tempdir()
            .unwrap()
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn layout_modes_and_old_versions() {
        let d = tempdir();
        let dir = d.path().join("certs");
        let mut w = VersionedDir::open(&dir).unwrap();
        // A plain file from an earlier writer is taken over.
        fs::write(dir.join("svid.pem"), b"old plain file").unwrap();
        for round in 1..=4u8 {
            let v = w
                .publish(&[
                    OutFile::new("svid.pem", vec![b'c', round], 0o644),
                    OutFile::new("svid_key.pem", vec![b'k', round], 0o600),
                    OutFile::new("bundle.pem", vec![b'b', round], 0o640),
                ])
                .unwrap();
            assert_eq!(v, dir.join(format!(".sigil.v{round}")));
            assert_eq!(fs::read(dir.join("svid.pem")).unwrap(), vec![b'c', round]);
            assert_eq!(
                fs::read(dir.join("svid_key.pem")).unwrap(),
                vec![b'k', round]
            );
            assert_eq!(
                fs::read_link(dir.join("svid_key.pem")).unwrap(),
                Path::new(".sigil.current/svid_key.pem")
            );
            assert_eq!(
                fs::read_link(dir.join(CURRENT)).unwrap(),
                Path::new(&format!(".sigil.v{round}"))
            );
        }
        // Exact modes despite the umask, through the links.
        assert_eq!(mode_of(&dir.join("svid.pem")), 0o644);
        assert_eq!(mode_of(&dir.join("svid_key.pem")), 0o600);
        assert_eq!(mode_of(&dir.join("bundle.pem")), 0o640);
        // The current and the previous version are kept, nothing else is left behind.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".sigil.current",
                ".sigil.v3",
                ".sigil.v4",
                "bundle.pem",
                "svid.pem",
                "svid_key.pem"
            ]
        );
        // A new writer on the same directory continues the numbering.
        let mut again = VersionedDir::open(&dir).unwrap();
        let v = again
            .publish(&[OutFile::new("svid.pem", "x", 0o644)])
            .unwrap();
        assert_eq!(v, dir.join(".sigil.v5"));
    }

    #[test]
    fn bad_names_and_unwritable_dirs_are_refused() {
        let d = tempdir();
        let mut w = VersionedDir::open(d.path()).unwrap();
        for bad in ["", ".", "..", "a/b", ".sigil.current", ".sigil.v1"] {
            let err = w.publish(&[OutFile::new(bad, "x", 0o644)]).expect_err(bad);
            assert!(err.to_string().contains("plain file name"), "{err}");
        }
        let err = w
            .publish(&[OutFile::new("a", "x", 0o644), OutFile::new("a", "y", 0o644)])
            .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        // Nothing was published.
        assert!(fs::symlink_metadata(d.path().join(CURRENT)).is_err());
        // A cert_dir below a regular file cannot be created.
        let file = d.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = VersionedDir::open(&file.join("certs")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is not writable"), "{text}");
        assert!(text.contains("certs"), "{text}");
    }

    #[test]
    fn single_files_are_replaced_whole_with_their_mode() {
        let d = tempdir();
        write_single(d.path(), "jwt.token", b"first", 0o600).unwrap();
        write_single(d.path(), "jwt.token", b"second", 0o640).unwrap();
        assert_eq!(fs::read(d.path().join("jwt.token")).unwrap(), b"second");
        assert_eq!(mode_of(&d.path().join("jwt.token")), 0o640);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// A certificate and its PKCS#8 key, both PEM.
    fn pair(i: usize) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![format!("v{i}.test")]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Whether `key_pem` is the private key of the certificate in `cert_pem`.
    fn matches(cert_pem: &[u8], key_pem: &[u8]) -> bool {
        let Ok(key) = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(key_pem)) else {
            return false;
        };
        let Ok(ders) = sigil::x509::parse_pem_certs(&String::from_utf8_lossy(cert_pem)) else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&ders[0]) else {
            return false;
        };
        cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
    }

    /// Readers race many rotations. A reader that opens cert, key and cert again by their
    /// public names, and sees the same cert twice, must have read that cert's key in between
    /// (no switch can have happened, versions never repeat); a reader that resolves
    /// `.sigil.current` once always reads a matching pair. Writing the files in place one after
    /// the other (even each atomically) fails the first reader.
    #[test]
    fn readers_never_see_a_certificate_with_the_other_key() {
        const ROTATIONS: usize = 150;
        let d = tempdir();
        let dir = d.path().to_path_buf();
        let pairs: Vec<(String, String)> = (0..ROTATIONS).map(pair).collect();
        let mut w = VersionedDir::open(&dir).unwrap();
        let publish = |w: &mut VersionedDir, (cert, key): &(String, String)| {
            w.publish(&[
                OutFile::new("svid.pem", cert.as_bytes(), 0o644),
                OutFile::new("svid_key.pem", key.as_bytes(), 0o600),
                OutFile::new("svid_bundle.pem", cert.as_bytes(), 0o644),
            ])
            .unwrap();
        };
        publish(&mut w, &pairs[0]);
        let done = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for pinned in [false, true] {
            let (dir, done, checked) = (dir.clone(), done.clone(), checked.clone());
            readers.push(std::thread::spawn(move || {
                let mut mismatches = 0usize;
                // This writer publishes far faster than the agent rotates: a version can
                // be removed (two publishes later) while a reader is still on its way in.
                let read = |p: PathBuf| match fs::read(&p) {
                    Ok(b) => Some(b),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => panic!("reading {}: {e}", p.display()),
                };
                while !done.load(Ordering::Relaxed) {
                    if pinned {
                        let v = dir.join(fs::read_link(dir.join(CURRENT)).unwrap());
                        let (Some(cert), Some(key)) =
                            (read(v.join("svid.pem")), read(v.join("svid_key.pem")))
                        else {
                            continue;
                        };
                        if !matches(&cert, &key) {
                            mismatches += 1;
                        }
                    } else {
                        let (Some(cert), Some(key), Some(again)) = (
                            read(dir.join("svid.pem")),
                            read(dir.join("svid_key.pem")),
                            read(dir.join("svid.pem")),
                        ) else {
                            continue;
                        };
                        if cert == again && !matches(&cert, &key) {
                            mismatches += 1;
                        }
                        // Every file is whole.
                        let text = String::from_utf8_lossy(&cert);
                        assert!(sigil::x509::parse_pem_certs(&text).is_ok(), "{text}");
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                mismatches
            }));
        }
        for p in &pairs[1..] {
            publish(&mut w, p);
            // Let the readers run between switches as well as across them.
            std::thread::yield_now();
        }
        done.store(true, Ordering::Relaxed);
        for (r, what) in readers.into_iter().zip(["by path", "pinned"]) {
            assert_eq!(
                r.join().unwrap(),
                0,
                "reader {what} saw a cert with another key"
            );
        }
        assert!(checked.load(Ordering::Relaxed) > 0);
    }
}
