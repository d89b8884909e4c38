//! What "ready" means for the agent (`/ready`, `sigil-agent healthcheck`), and the sync state
//! behind it (also shown by `sigil-agent status`).
//!
//! Ready means the agent can give workloads valid identities now and keeps them fresh:
//! - the server has not refused it, and its own SVID has not expired;
//! - it has received its entries (the first snapshot);
//! - its last successful sync is recent: the sync stream is up (its HTTP/2 connection is
//!   kept alive with pings, so a dead server or a silent network is noticed), or it went down
//!   less than `ready_max_sync_age` ago;
//! - it holds no expired X509-SVID (one it could not renew);
//! - the Workload API socket is still the one it bound (same device and inode at the path) and
//!   accepts connections: a deleted or replaced socket file leaves workloads without a way in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::sync::worker::AgentState;

/// Default `ready_max_sync_age`: how long the agent stays ready after losing its sync stream.
pub const DEFAULT_READY_MAX_SYNC_AGE: Duration = Duration::from_secs(300);
/// How long the readiness probe waits for the Workload API socket to accept a connection.
const SOCKET_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of the agent's sync with the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// The sync stream of the current session has delivered a message and not failed since.
    connected: bool,
    /// When the agent was last known in sync (Unix seconds): the last message received, or the
    /// moment a connected stream failed. `None` before the first message.
    last_sync_at: Option<i64>,
    /// When the current state (connected or not) began.
    since: Option<i64>,
    /// Why the last session failed, while disconnected.
    last_error: Option<String>,
    /// The server of the current (or last) session.
    server: Option<String>,
}

impl SyncStatus {
    /// A sync message arrived at `now`: the stream is up.
    pub fn synced(&mut self, now: i64) {
        if !self.connected {
            self.connected = true;
            self.since = Some(now);
        }
        self.last_sync_at = Some(now);
        self.last_error = None;
    }

    /// The session failed at `now` with `error`.
    pub fn disconnected(&mut self, now: i64, error: &str) {
        if self.connected {
            // The stream was healthy until it failed.
            self.last_sync_at = Some(now);
            self.connected = false;
            self.since = Some(now);
        } else if self.since.is_none() {
            self.since = Some(now);
        }
        self.last_error = Some(error.to_string());
    }

    /// A session with the server at `address` starts.
    pub fn set_server(&mut self, address: &str) {
        self.server = Some(address.to_string());
    }

    /// The server of the current (or last) session.
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// True while the sync stream is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// `connected`, `disconnected`, or `connecting` (no sync yet, no failure either).
    pub fn state_name(&self) -> &'static str {
        match (self.connected, self.last_error.is_some()) {
            (true, _) => "connected",
            (false, true) => "disconnected",
            (false, false) => "connecting",
        }
    }

    /// When the agent was last known in sync: `now` while connected.
    pub fn last_sync_at(&self, now: i64) -> Option<i64> {
        if self.connected {
            Some(now)
        } else {
            self.last_sync_at
        }
    }

    /// When the current state began.
    pub fn since(&self) -> Option<i64> {
        self.since
    }

    /// The last session error while disconnected.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// A bound socket file: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketId {
    dev: u64,
    ino: u64,
}

impl SocketId {
    /// The socket file at `path` (not following a symlink).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Why the Workload API socket fails the readiness check.
#[derive(Debug, thiserror::Error)]
pub enum SocketProblem {
    /// Another file now sits at the socket's path.
    #[error("the Workload API socket {} was replaced by another file; workloads cannot reach this agent: restart it", .0.display())]
    Replaced(PathBuf),
    /// Nothing is at the socket's path any more.
    #[error("the Workload API socket {} is gone (deleted?); workloads cannot reach this agent: restart it", .0.display())]
    Gone(PathBuf),
    /// The path could not be inspected.
    #[error("the Workload API socket {}: {source}", .path.display())]
    Inspect {
        /// The socket's path.
        path: PathBuf,
        /// Why `lstat` failed.
        #[source]
        source: std::io::Error,
    },
    /// Connecting was refused or failed.
    #[error("the Workload API socket {} does not accept connections: {source}", .path.display())]
    Refused {
        /// The socket's path.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// Connecting did not finish in time.
    #[error("the Workload API socket {} did not accept a connection within {} s", .0.display(), SOCKET_CONNECT_TIMEOUT.as_secs())]
    Timeout(PathBuf),
}

/// Checks that `path` is still the socket `bound` and accepts a connection.
pub async fn check_socket(path: &Path, bound: SocketId) -> Result<(), SocketProblem> {
    match SocketId::of(path) {
        Ok(id) if id == bound => {}
        Ok(_) => return Err(SocketProblem::Replaced(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SocketProblem::Gone(path.to_path_buf()))
        }
        Err(source) => {
            return Err(SocketProblem::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match tokio::time::timeout(
        SOCKET_CONNECT_TIMEOUT,
        tokio::net::UnixStream::connect(path),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(SocketProblem::Refused {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Err(SocketProblem::Timeout(path.to_path_buf())),
    }
}

/// What readiness is decided from, besides the socket.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Why the server refused the agent, if it did.
    pub refused: Option<String>,
    /// NotAfter of the agent's own SVID.
    pub agent_svid_not_after: i64,
    /// The first snapshot of entries arrived.
    pub has_snapshot: bool,
    /// The sync state.
    pub sync: SyncStatus,
    /// Longest acceptable time since the last successful sync.
    pub max_sync_age: Duration,
    /// Number of cached X509-SVIDs that have expired, and the SPIFFE ID of one of them.
    pub expired_svids: (usize, Option<String>),
}

/// Why the agent is not ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The server refused the agent (banned, evicted, attestation refused).
    #[error("refused by the server: {0}")]
    Refused(String),
    /// The agent's own SVID expired and renewal failed.
    #[error("the agent SVID expired at {} and could not be renewed", crate::cli::time_text(*.0))]
    AgentSvidExpired(i64),
    /// No snapshot of entries yet.
    #[error("waiting for the first entry sync{}", .last_error.as_ref().map(|e| format!(" (last attempt: {e})")).unwrap_or_default())]
    FirstSync {
        /// Why the last sync attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The last successful sync is older than `ready_max_sync_age`.
    #[error("no successful sync with sigil-server for {age} s (ready_max_sync_age {max_age} s; last sync {}): {error}", .last.map_or_else(|| "never".to_string(), crate::cli::time_text))]
    SyncStale {
        /// Seconds since the last successful sync (0 if never).
        age: i64,
        /// The configured limit, seconds.
        max_age: i64,
        /// When the agent was last in sync (Unix seconds).
        last: Option<i64>,
        /// Why the sync stream is down.
        error: String,
    },
    /// Cached X509-SVIDs expired without renewal.
    #[error("{count} cached X509-SVID(s) expired and could not be renewed (e.g. {}); workloads get none for them: is sigil-server reachable and its CA valid?", .example.as_deref().unwrap_or("?"))]
    ExpiredSvids {
        /// How many.
        count: usize,
        /// The SPIFFE ID of one of them.
        example: Option<String>,
    },
    /// The Workload API socket was never bound.
    #[error("the Workload API socket is not bound yet")]
    SocketNotBound,
    /// The Workload API socket fails its check.
    #[error(transparent)]
    Socket(#[from] SocketProblem),
}

/// The readiness verdict from `facts` at `now`: `Err` says why not ready.
pub fn evaluate(facts: &Facts, now: i64) -> Result<(), NotReady> {
    if let Some(why) = &facts.refused {
        return Err(NotReady::Refused(why.clone()));
    }
    if facts.agent_svid_not_after <= now {
        return Err(NotReady::AgentSvidExpired(facts.agent_svid_not_after));
    }
    if !facts.has_snapshot {
        return Err(NotReady::FirstSync {
            last_error: facts.sync.last_error().map(str::to_string),
        });
    }
    let max_age = facts.max_sync_age.as_secs() as i64;
    let age = facts.sync.last_sync_at(now).map(|t| now - t);
    if age.is_none_or(|a| a > max_age) {
        return Err(NotReady::SyncStale {
            age: age.unwrap_or(0),
            max_age,
            last: facts.sync.last_sync_at(now),
            error: facts
                .sync
                .last_error()
                .unwrap_or("no sync stream")
                .to_string(),
        });
    }
    let (count, example) = &facts.expired_svids;
    if *count > 0 {
        return Err(NotReady::ExpiredSvids {
            count: *count,
            example: example.clone(),
        });
    }
    Ok(())
}

/// The agent's readiness probe.
pub struct Readiness {
    state: Arc<AgentState>,
    socket_path: PathBuf,
    max_sync_age: Duration,
}

impl Readiness {
    /// A probe over the agent's state and its Workload API socket at `socket_path`.
    pub fn new(state: Arc<AgentState>, socket_path: PathBuf, max_sync_age: Duration) -> Self {
        Self {
            state,
            socket_path,
            max_sync_age,
        }
    }

    async fn facts(&self, now: i64) -> Facts {
        let refused = self.state.refused.read().await.clone();
        let agent_svid_not_after = self.state.identity.read().await.not_after;
        let sync = self.state.sync_status();
        let cache = self.state.snapshot();
        let mut expired = cache.expired_svids(now);
        let example = expired.next().map(|(e, _)| e.spiffe_id.to_string());
        let count = example.as_ref().map_or(0, |_| 1 + expired.count());
        Facts {
            refused,
            agent_svid_not_after,
            has_snapshot: cache.has_snapshot(),
            sync,
            max_sync_age: self.max_sync_age,
            expired_svids: (count, example),
        }
    }
}

#[async_trait]
impl sigil::health::Probe for Readiness {
    async fn ready(&self) -> Result<(), sigil::health::NotReady> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        evaluate(&self.facts(now).await, now)?;
        let bound = *self
            .state
            .workload_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match bound {
            Some(id) => Ok(check_socket(&self.socket_path, id).await?),
            None => Err(NotReady::SocketNotBound.into()),
        }
    }
}

/// The earliest NotAfter (Unix seconds) among DER certificates; unparsable ones are skipped.
pub fn earliest_not_after(certs: &[Vec<u8>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        let mut sync = SyncStatus::default();
        sync.synced(1000);
        Facts {
            refused: None,
            agent_svid_not_after: 1_000_000,
            has_snapshot: true,
            sync,
            max_sync_age: Duration::from_secs(60),
            expired_svids: (0, None),
        }
    }

    #[test]
    fn sync_status_tracks_the_last_good_moment() {
        let mut s = SyncStatus::default();
        assert_eq!(s.state_name(), "connecting");
        assert_eq!(s.last_sync_at(10), None);
        s.disconnected(10, "connection refused");
        assert_eq!(s.state_name(), "disconnected");
        assert_eq!(s.last_sync_at(20), None, "never synced");
        s.synced(30);
        assert_eq!(s.state_name(), "connected");
        assert_eq!(s.since(), Some(30));
        // Connected: in sync now, however long ago the last message was.
        assert_eq!(s.last_sync_at(500), Some(500));
        s.synced(600);
        assert_eq!(s.since(), Some(30), "still the same connection");
        s.disconnected(700, "stream reset");
        assert_eq!(s.last_sync_at(900), Some(700), "up until it failed");
        assert_eq!(s.since(), Some(700));
        assert_eq!(s.last_error(), Some("stream reset"));
        s.disconnected(710, "connection refused");
        assert_eq!(s.since(), Some(700), "still down since the first failure");
        assert_eq!(s.last_sync_at(900), Some(700));
        assert_eq!(s.last_error(), Some("connection refused"));
    }

    fn reason(f: &Facts, now: i64) -> String {
        evaluate(f, now)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    async fn socket_reason(path: &Path, bound: SocketId) -> String {
        check_socket(path, bound)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn ready_needs_a_recent_sync() {
        let mut f = healthy();
        assert!(evaluate(&f, 100_000).is_ok(), "connected: age 0");
        f.sync.disconnected(2000, "connection refused");
        assert!(evaluate(&f, 2060).is_ok(), "down for exactly the threshold");
        let why = evaluate(&f, 2061)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            why.contains("no successful sync with sigil-server for 61 s"),
            "{why}"
        );
        assert!(why.contains("connection refused"), "{why}");
        f.sync.synced(2100);
        assert!(evaluate(&f, 2100).is_ok());
    }

    #[test]
    fn not_ready_reasons() {
        let now = 1000;
        let mut f = healthy();
        f.has_snapshot = false;
        assert!(reason(&f, now).contains("first entry sync"));
        let mut f = healthy();
        f.expired_svids = (2, Some("spiffe://example.org/web".into()));
        let why = reason(&f, now);
        assert!(why.contains("2 cached X509-SVID(s) expired"), "{why}");
        assert!(why.contains("spiffe://example.org/web"), "{why}");
        let mut f = healthy();
        f.agent_svid_not_after = now;
        assert!(reason(&f, now).contains("agent SVID expired"));
        let mut f = healthy();
        f.refused = Some("agent is banned".into());
        assert!(reason(&f, now).contains("agent is banned"));
    }

    #[tokio::test]
    async fn the_socket_must_be_ours_and_answer() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path)?;
        let bound = SocketId::of(&path)?;
        assert!(check_socket(&path, bound).await.is_ok());

        // Deleted: gone, even though the listener still runs.
        std::fs::remove_file(&path)?;
        let why = socket_reason(&path, bound).await;
        assert!(why.contains("is gone"), "{why}");

        // Another socket at the path (someone else's): not ours.
        let other = tokio::net::UnixListener::bind(&path)?;
        let why = socket_reason(&path, bound).await;
        assert!(why.contains("replaced"), "{why}");
        drop(other);
        drop(listener);

        // Ours, but nobody listens any more.
        std::fs::remove_file(&path)?;
        let l = std::os::unix::net::UnixListener::bind(&path)?;
        let bound = SocketId::of(&path)?;
        drop(l);
        let why = socket_reason(&path, bound).await;
        assert!(why.contains("does not accept connections"), "{why}");
        Ok(())
    }
}
