//! gRPC over Unix domain sockets: binding with safe permissions, and a client channel.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};

/// Binds a Unix socket at `path`.
///
/// The parent directory is created if missing and set to `dir_mode` (e.g. `0o700` for an
/// admin socket only its owner may reach, `0o755` for a public one nobody else may write
/// into); the socket gets `socket_mode`. A stale socket file from an earlier run is removed,
/// but any other kind of file at `path` is an error rather than silently deleted.
pub fn bind(path: &Path, dir_mode: u32, socket_mode: u32) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; remove it or choose another path",
                        path.display()
                    ),
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
    Ok(listener)
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

    #[test]
    fn bind_sets_modes_and_refuses_to_clobber_files() -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let dir = std::env::temp_dir().join(format!("sigil-uds-test-{}", std::process::id()));
            let sock = dir.join("private").join("admin.sock");
            let l = bind(&sock, 0o700, 0o600)?;
            let dmode = std::fs::metadata(sock.parent().unwrap_or(&dir))?
                .permissions()
                .mode();
            assert_eq!(dmode & 0o777, 0o700);
            assert_eq!(
                std::fs::metadata(&sock)?.permissions().mode() & 0o777,
                0o600
            );
            drop(l);
            // A stale socket is replaced.
            bind(&sock, 0o700, 0o600)?;
            // A regular file is not.
            let file = dir.join("private").join("not-a-socket");
            std::fs::write(&file, b"keep me")?;
            assert!(bind(&file, 0o700, 0o600).is_err());
            assert_eq!(std::fs::read(&file)?, b"keep me");
            std::fs::remove_dir_all(&dir)
        })
    }
}
