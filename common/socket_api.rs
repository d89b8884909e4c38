//! The client side of Sigil's local gRPC sockets, for the command lines: connecting with an
//! error that says what is wrong and what to do (missing, not ours to open, nobody listening),
//! and, when a socket answers `Unimplemented`, which API it serves instead (the agent's admin
//! socket given to `sigil-server entry show`, the server's to `sigil-agent api fetch`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;

/// How long one probe of [`identify`] may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The gRPC APIs Sigil serves on Unix sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `sigil.admin.v1.Admin`: sigil-server's admin API (`sigil-server entry …`).
    ServerAdmin,
    /// `sigil.agent.v1.AgentAdmin`: sigil-agent's admin API (`status`, `explain`).
    AgentAdmin,
    /// The SPIFFE Workload API (`sigil-agent api …`).
    Workload,
}

impl Api {
    /// What the API is, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::ServerAdmin => "sigil-server's admin API",
            Self::AgentAdmin => "sigil-agent's admin API",
            Self::Workload => "the SPIFFE Workload API",
        }
    }

    /// The socket, for messages.
    fn socket(self) -> &'static str {
        match self {
            Self::ServerAdmin => "sigil-server's admin socket",
            Self::AgentAdmin => "sigil-agent's admin socket",
            Self::Workload => "the Workload API socket",
        }
    }

    /// How the command is pointed at another socket.
    fn flag(self) -> &'static str {
        match self {
            Self::ServerAdmin => "--admin-socket or SIGIL_SERVER_ADMIN_SOCKET",
            Self::AgentAdmin => "--admin-socket",
            Self::Workload => "--socket-path or SPIFFE_ENDPOINT_SOCKET",
        }
    }

    /// The process that serves it.
    fn owner(self) -> &'static str {
        match self {
            Self::ServerAdmin => "sigil-server",
            Self::AgentAdmin | Self::Workload => "sigil-agent",
        }
    }

    /// Who may open the socket, and so what to do after "permission denied".
    fn access_hint(self) -> &'static str {
        match self {
            Self::ServerAdmin => "only the user sigil-server runs as (and root) may use its admin socket (directory 0700, socket 0600): run the command as that user",
            Self::AgentAdmin => "only the user sigil-agent runs as (and root) may use its admin socket (directory 0700, socket 0600): run the command as that user",
            Self::Workload => "sigil-agent makes the socket 0777 in a 0755 directory: check the permissions of the socket and of every directory above it (and, in a container, the mount)",
        }
    }
}

/// Why a socket could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing at the path.
    #[error("{} {} does not exist: is {} running? (use {} to point elsewhere)", .api.socket(), .path.display(), .api.owner(), .api.flag())]
    Missing {
        /// The socket path.
        path: PathBuf,
        /// The API expected there.
        api: Api,
    },
    /// The socket, or a directory above it, may not be opened by this user.
    #[error("permission denied opening {} ({}): {}", .path.display(), .api.socket(), .api.access_hint())]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
        /// The API expected there.
        api: Api,
    },
    /// A socket file nobody listens on.
    #[error("nothing is listening on {} (a socket left behind by a stopped {}?): start {} or use {}", .path.display(), .api.owner(), .api.owner(), .api.flag())]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The API expected there.
        api: Api,
    },
    /// The path is not a socket.
    #[error("{} is not a socket: use {} to name {}", .path.display(), .api.flag(), .api.socket())]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// The API expected there.
        api: Api,
    },
    /// Any other failure.
    #[error("cannot connect to {} at {}: {reason}", .api.socket(), .path.display())]
    Other {
        /// The socket path.
        path: PathBuf,
        /// The API expected there.
        api: Api,
        /// The underlying error, once (not its whole chain, which repeats the OS error).
        reason: String,
    },
}

impl ConnectError {
    fn from_io(path: &Path, api: Api, e: &io::Error) -> Self {
        let path = path.to_path_buf();
        match e.kind() {
            io::ErrorKind::NotFound => Self::Missing { path, api },
            io::ErrorKind::PermissionDenied => Self::PermissionDenied { path, api },
            io::ErrorKind::ConnectionRefused => Self::Refused { path, api },
            _ => Self::Other {
                path,
                api,
                reason: e.to_string(),
            },
        }
    }
}

/// Connects to the socket at `path`, expected to serve `api`.
pub async fn connect(path: &Path, api: Api) -> Result<Channel, ConnectError> {
    use std::os::unix::fs::FileTypeExt;
    // stat first: it tells a missing socket from one we may not reach (Path::exists would call
    // both "does not exist").
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ConnectError::NotASocket {
                path: path.to_path_buf(),
                api,
            })
        }
        Ok(_) => {}
        Err(e) => return Err(ConnectError::from_io(path, api, &e)),
    }
    crate::uds::connect(path)
        .await
        .map_err(|e| match root_io_error(&e) {
            Some(io) => ConnectError::from_io(path, api, io),
            None => ConnectError::Other {
                path: path.to_path_buf(),
                api,
                reason: e.to_string(),
            },
        })
}

/// The innermost `io::Error` of an error's chain.
fn root_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut found = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            found = Some(io);
        }
        cur = err.source();
    }
    found
}

/// A call answered `Unimplemented`: the socket serves another API. Returned by the command
/// lines' status handling so the command can find out which (see [`wrong_api`]).
#[derive(Debug, thiserror::Error)]
#[error("{what}: the socket does not serve this call (Unimplemented)")]
pub struct Unimplemented {
    /// The call, e.g. `listing entries`.
    pub what: String,
}

/// A socket serves another API than the one a command expected.
#[derive(Debug, thiserror::Error)]
pub enum WrongApi {
    /// It serves another of Sigil's APIs.
    #[error("{}: {} serves {}, not {}: use {} to name {}", .what, .path.display(), .found.name(), .expected.name(), .expected.flag(), .expected.socket())]
    Other {
        /// The call that failed.
        what: String,
        /// The socket.
        path: PathBuf,
        /// The API the command needs.
        expected: Api,
        /// The API it serves.
        found: Api,
    },
    /// It serves the expected API, but not this call.
    #[error("{}: {} serves {} but not this call (Unimplemented): is {} an older version than this command?", .what, .path.display(), .expected.name(), .expected.owner())]
    OlderVersion {
        /// The call that failed.
        what: String,
        /// The socket.
        path: PathBuf,
        /// The API the command needs.
        expected: Api,
    },
    /// None of Sigil's APIs answers there.
    #[error("{}: {} does not serve {} (it answered Unimplemented; it serves none of Sigil's APIs): use {} to name {}", .what, .path.display(), .expected.name(), .expected.flag(), .expected.socket())]
    Unknown {
        /// The call that failed.
        what: String,
        /// The socket.
        path: PathBuf,
        /// The API the command needs.
        expected: Api,
    },
}

/// After `what` was answered `Unimplemented` on `path`: which API the socket serves, as an
/// error naming it and the flag to fix.
pub async fn wrong_api(path: &Path, expected: Api, what: &str) -> WrongApi {
    let (what, path_buf) = (what.to_string(), path.to_path_buf());
    match identify(path).await {
        Some(found) if found == expected => WrongApi::OlderVersion {
            what,
            path: path_buf,
            expected,
        },
        Some(found) => WrongApi::Other {
            what,
            path: path_buf,
            expected,
            found,
        },
        None => WrongApi::Unknown {
            what,
            path: path_buf,
            expected,
        },
    }
}

/// Which of Sigil's APIs the socket at `path` serves: asks each a harmless question (the
/// server's health, the agent's status, a Workload API call without its security header, which
/// every Workload API refuses with InvalidArgument before looking at the caller); a service
/// that does not exist there answers `Unimplemented`.
pub async fn identify(path: &Path) -> Option<Api> {
    use crate::proto::agent_admin::agent_admin_client::AgentAdminClient;
    use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let channel = crate::uds::connect(path).await.ok()?;
    let answered = |r: Result<Result<(), tonic::Status>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => true,
        Ok(Err(s)) => s.code() != tonic::Code::Unimplemented,
        Err(_) => false,
    };
    let mut admin = crate::proto::admin::admin_client::AdminClient::new(channel.clone());
    let r = tokio::time::timeout(PROBE_TIMEOUT, async {
        admin
            .health(crate::proto::admin::HealthRequest {})
            .await
            .map(drop)
    })
    .await;
    if answered(r) {
        return Some(Api::ServerAdmin);
    }
    let mut agent = AgentAdminClient::new(channel.clone());
    let r = tokio::time::timeout(PROBE_TIMEOUT, async {
        agent
            .status(crate::proto::agent_admin::StatusRequest::default())
            .await
            .map(drop)
    })
    .await;
    if answered(r) {
        return Some(Api::AgentAdmin);
    }
    let mut workload = SpiffeWorkloadApiClient::new(channel);
    let r = tokio::time::timeout(PROBE_TIMEOUT, async {
        workload
            .fetch_jwt_bundles(crate::proto::workload::JwtBundlesRequest {})
            .await
            .map(drop)
    })
    .await;
    match r {
        Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => Some(Api::Workload),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn connect_errors_say_what_is_wrong_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let e = connect(&missing, Api::ServerAdmin).await.unwrap_err();
        assert!(matches!(e, ConnectError::Missing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("does not exist: is sigil-server running?"),
            "{msg}"
        );

        // A socket file with nobody listening.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let msg = connect(&stale, Api::Workload)
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nothing is listening on"), "{msg}");
        assert_eq!(msg.matches("os error").count(), 0, "{msg}");

        // A regular file.
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let msg = connect(&file, Api::AgentAdmin)
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is not a socket"), "{msg}");
    }

    /// As root, permission checks are bypassed: a child process running as `nobody` tries.
    #[test]
    fn permission_denied_is_not_reported_as_missing() {
        use std::os::unix::process::CommandExt as _;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (to try as another user)"
        );
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = private.join("admin.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // The socket itself readable by nobody, in a directory they may enter.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock2 = open.join("admin.sock");
        let _l2 = std::os::unix::net::UnixListener::bind(&sock2).unwrap();
        std::fs::set_permissions(&sock2, std::fs::Permissions::from_mode(0o600)).unwrap();
        for path in [&sock, &sock2] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "socket_api::tests::connect_as_nobody",
                    "--exact",
                    "--nocapture",
                    "--include-ignored",
                ])
                .env("SIGIL_TEST_CONNECT_AS_NOBODY", path)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.contains("ERROR: permission denied opening"),
                "{}: {stdout}",
                path.display()
            );
            assert!(stdout.contains("run the command as that user"), "{stdout}");
            assert!(!stdout.contains("does not exist"), "{stdout}");
            assert!(!stdout.contains("os error"), "{stdout}");
        }
    }

    /// Run as `nobody` by the test above: prints the connect error.
    #[test]
    #[ignore = "run by permission_denied_is_not_reported_as_missing"]
    fn connect_as_nobody() {
        let Some(path) = std::env::var_os("SIGIL_TEST_CONNECT_AS_NOBODY") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(connect(Path::new(&path), Api::ServerAdmin))
            .unwrap_err();
        println!("ERROR: {e}");
    }
}
