//! Accepted Workload API connections, with the caller pinned at accept time, and the accept loop
//! that keeps any one local user from exhausting the agent.
//!
//! The kernel records the peer's credentials (SO_PEERCRED: pid, uid, gid) when it connects. The
//! PID is only a number: if the caller exits, the number can be reused by another process. So
//! the process is pinned as soon as the connection is accepted ([`ProcessPin::pin_peer`]: its
//! pidfd where the kernel has one, its PID plus start time, the uid/gid it connected with),
//! attestation reads /proc through that pin, and the pin is checked again before every answer.
//!
//! The socket is open to every local user, so the accept loop bounds what they can hold: at most
//! [`ConnectionLimits::per_uid`] open connections per uid, and [`ConnectionLimits::total`] in all,
//! derived from the open-files limit so that the agent never runs out of descriptors (a full
//! descriptor table would stop every accept, a registered workload's too). A connection over a
//! limit is closed as soon as it is accepted, before any HTTP/2 state exists for it. Accept
//! errors are retried after a growing pause instead of at once (an accept that fails with EMFILE
//! fails again immediately), and their log lines are rate-limited.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::metrics::AgentMetrics;
use crate::workload_attestor::ProcessPin;

/// Default of [`ConnectionLimits::per_uid`] (`workload_api_max_connections_per_uid`): far above
/// what one workload user holds (a connection or two per process), low enough that a single
/// local user cannot take the agent's descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 1_000;
/// Descriptors kept free for the agent's own files and sockets (data files, sigil-server and
/// kubelet connections, /proc reads and executable hashing on up to 512 blocking threads) when
/// the total connection limit is derived from the open-files limit.
pub const FD_HEADROOM: u64 = 1_024;
/// First pause after a failed accept; it doubles with each failure in a row.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two accepts that fail.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval for accept errors, and one for refused connections.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Who is on the other end of a Workload API connection, as the kernel and /proc said at accept.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Effective uid at connect time (kernel-provided).
    pub uid: u32,
    /// Effective gid at connect time (kernel-provided).
    pub gid: u32,
    /// Caller's pid, if the kernel gave one.
    pub pid: Option<i32>,
    /// The pinned process, or why it could not be pinned (the caller already exited, runs as
    /// another user than it connected as, or the kernel gave no pid).
    pub pin: Result<Arc<ProcessPin>, Arc<PinError>>,
}

/// Why the process behind a connection could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The kernel gave no pid (a peer in another PID namespace).
    #[error("the kernel reported no process id for the caller")]
    NoPid,
    /// The process could not be pinned (exited, or changed credentials).
    #[error(transparent)]
    Attest(#[from] crate::workload_attestor::AttestError),
}

/// A Unix stream whose peer was identified when it was accepted. It holds its uid's connection
/// slot until it is dropped (the connection closed).
#[derive(Debug)]
pub struct PeerStream {
    stream: UnixStream,
    info: PeerInfo,
    _slot: Slot,
}

impl PeerStream {
    /// Pins the process behind `stream`, whose peer credentials are `cred`.
    fn new(stream: UnixStream, cred: tokio::net::unix::UCred, slot: Slot) -> Self {
        let pid = cred.pid();
        let pin = match pid {
            Some(pid) if pid > 0 => ProcessPin::pin_peer(&stream, pid, cred.uid(), cred.gid())
                .map(Arc::new)
                .map_err(|e| Arc::new(PinError::from(e))),
            _ => Err(Arc::new(PinError::NoPid)),
        };
        Self {
            stream,
            info: PeerInfo {
                uid: cred.uid(),
                gid: cred.gid(),
                pid,
                pin,
            },
            _slot: slot,
        }
    }
}

/// How many Workload API connections may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Per uid (the caller's effective uid at connect).
    pub per_uid: usize,
    /// In all.
    pub total: usize,
}

impl ConnectionLimits {
    /// `per_uid` per uid, and in all as many as the agent's open-files limit allows
    /// ([`max_connections`]).
    pub fn from_open_files_limit(per_uid: usize) -> Self {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            // Linux's default soft limit, if it cannot be read.
            .unwrap_or(1_024);
        Self {
            per_uid,
            total: max_connections(nofile),
        }
    }
}

/// The most connections an agent with `nofile` open files may hold: all but [`FD_HEADROOM`]
/// descriptors (but at most half of a small limit), at least one.
pub fn max_connections(nofile: u64) -> usize {
    let headroom = FD_HEADROOM.min(nofile / 2);
    usize::try_from(nofile.saturating_sub(headroom))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    PerUid,
    Total,
}

impl Refused {
    fn as_str(self) -> &'static str {
        match self {
            Refused::PerUid => "per-uid",
            Refused::Total => "total",
        }
    }
}

/// Open connections per uid and in all.
#[derive(Debug, Default)]
struct Counts {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

/// Counts open connections against [`ConnectionLimits`].
struct Tracker {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
    metrics: AgentMetrics,
}

impl Tracker {
    fn new(limits: ConnectionLimits, metrics: AgentMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            metrics,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts are plain integers updated in one step: usable even after a panic.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one more connection of `uid`, if both limits allow it.
    fn acquire(self: &Arc<Self>, uid: u32) -> Result<Slot, Refused> {
        let mut c = self.counts();
        if c.total >= self.limits.total {
            return Err(Refused::Total);
        }
        let n = c.per_uid.entry(uid).or_insert(0);
        if *n >= self.limits.per_uid {
            return Err(Refused::PerUid);
        }
        *n += 1;
        c.total += 1;
        self.metrics.workload_connections.inc();
        Ok(Slot {
            tracker: self.clone(),
            uid,
        })
    }

    /// Open connections of `uid`.
    fn open(&self, uid: u32) -> usize {
        self.counts().per_uid.get(&uid).copied().unwrap_or(0)
    }
}

/// One open connection of `uid`, given back on drop.
struct Slot {
    tracker: Arc<Tracker>,
    uid: u32,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("uid", &self.uid).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.tracker.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Uids come and go: keep only those with connections.
                c.per_uid.remove(&self.uid);
            }
        }
        self.tracker.metrics.workload_connections.dec();
    }
}

/// At most one log line per interval; counts the lines it held back.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now, else `None` (and
    /// the line is counted).
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Where the accept loop gets its connections: the Workload API socket (tests use fakes).
pub(crate) trait Listen: Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<UnixStream>> + Send;
}

impl Listen for UnixListener {
    async fn accept(&mut self) -> io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// The accept loop's state.
struct Acceptor<L> {
    listener: L,
    tracker: Arc<Tracker>,
    /// Pause before the next accept after a failure (grows while they fail in a row).
    backoff: Duration,
    accept_log: LogLimiter,
    refused_log: LogLimiter,
}

impl<L: Listen> Acceptor<L> {
    fn new(listener: L, limits: ConnectionLimits, metrics: AgentMetrics) -> Self {
        Self {
            listener,
            tracker: Tracker::new(limits, metrics),
            backoff: ACCEPT_BACKOFF_MIN,
            accept_log: LogLimiter::new(LOG_INTERVAL),
            refused_log: LogLimiter::new(LOG_INTERVAL),
        }
    }

    /// The next connection admitted within the limits. Never ends; accept errors are retried.
    async fn next(&mut self) -> PeerStream {
        loop {
            match self.listener.accept().await {
                Ok(stream) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    if let Some(s) = self.admit(stream) {
                        return s;
                    }
                }
                // About one connection that went away before it was accepted: take the next.
                Err(e) if is_connection_error(&e) => {}
                // Out of descriptors or memory: accepting again at once would fail again at
                // once (and spin a core); wait, longer each time, for connections to close.
                Err(e) => {
                    self.tracker.metrics.workload_accept_errors.inc();
                    if let Some(suppressed) = self.accept_log.allow() {
                        tracing::warn!(error = %e, retry_in = ?self.backoff, suppressed, "Workload API: accepting a connection failed; retrying after a pause");
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    /// `stream` as a [`PeerStream`] if its uid and the total are within the limits; else it is
    /// closed here (dropped), before any HTTP/2 state exists for it.
    fn admit(&mut self, stream: UnixStream) -> Option<PeerStream> {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Workload API: cannot read the caller's credentials; connection closed");
                return None;
            }
        };
        match self.tracker.acquire(cred.uid()) {
            Ok(slot) => Some(PeerStream::new(stream, cred, slot)),
            Err(limit) => {
                self.tracker.metrics.workload_connections_refused.inc();
                if let Some(suppressed) = self.refused_log.allow() {
                    let limits = self.tracker.limits;
                    tracing::warn!(
                        uid = cred.uid(),
                        pid = ?cred.pid(),
                        limit = limit.as_str(),
                        open_for_uid = self.tracker.open(cred.uid()),
                        max_per_uid = limits.per_uid,
                        max_total = limits.total,
                        suppressed,
                        "Workload API: too many open connections; connection closed (raise workload_api_max_connections_per_uid if this uid is a legitimate workload)"
                    );
                }
                None
            }
        }
    }
}

/// An accept error about the one connection being accepted (it was reset or aborted before the
/// accept), not about the agent.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The accepted connections of `listener` within `limits`, each with its [`PeerInfo`].
/// Connections over a limit, or whose credentials cannot be read, are closed at once; accept
/// errors are retried after a pause. Counted in `metrics`.
pub fn incoming(
    listener: UnixListener,
    limits: ConnectionLimits,
    metrics: AgentMetrics,
) -> impl Stream<Item = io::Result<PeerStream>> + Send {
    accepted(Acceptor::new(listener, limits, metrics))
}

/// The stream of an [`Acceptor`] (the accept loop runs as the server polls it).
fn accepted<L: Listen>(acceptor: Acceptor<L>) -> impl Stream<Item = io::Result<PeerStream>> + Send {
    futures::stream::unfold(acceptor, |mut a| async move {
        let s = a.next().await;
        Some((Ok(s), a))
    })
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt as _;

    /// A listener that hands out the results sent to it, counting the accepts; it waits while
    /// none is queued.
    struct Script {
        results: tokio::sync::mpsc::UnboundedReceiver<io::Result<UnixStream>>,
        accepts: Arc<AtomicUsize>,
    }

    impl Listen for Script {
        async fn accept(&mut self) -> io::Result<UnixStream> {
            self.accepts.fetch_add(1, Ordering::SeqCst);
            match self.results.recv().await {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    }

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32)
    }

    /// An acceptor over `results` (more can be sent through the returned sender).
    fn acceptor(
        results: Vec<io::Result<UnixStream>>,
        limits: ConnectionLimits,
    ) -> (
        Acceptor<Script>,
        Arc<AtomicUsize>,
        AgentMetrics,
        tokio::sync::mpsc::UnboundedSender<io::Result<UnixStream>>,
    ) {
        let accepts = Arc::new(AtomicUsize::new(0));
        let metrics = AgentMetrics::new();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for r in results {
            tx.send(r).unwrap();
        }
        let a = Acceptor::new(
            Script {
                results: rx,
                accepts: accepts.clone(),
            },
            limits,
            metrics.clone(),
        );
        (a, accepts, metrics, tx)
    }

    /// A connected pair: (the agent's end, the client's end), both in this process.
    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    const WIDE: ConnectionLimits = ConnectionLimits {
        per_uid: 100,
        total: 100,
    };

    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_retried_after_a_growing_pause() {
        const FAILURES: u32 = 12;
        let (server, _client) = pair();
        let mut results: Vec<io::Result<UnixStream>> =
            (0..FAILURES).map(|_| Err(emfile())).collect();
        results.push(Ok(server));
        let (mut a, accepts, metrics, _tx) = acceptor(results, WIDE);
        let started = Instant::now();
        let s = a.next().await;
        assert_eq!(accepts.load(Ordering::SeqCst), FAILURES as usize + 1);
        assert_eq!(metrics.workload_accept_errors.get(), u64::from(FAILURES));
        // 10, 20, ... 640 ms, then 1 s each: not one retry without a pause.
        let want: Duration = (0..FAILURES)
            .map(|i| (ACCEPT_BACKOFF_MIN * 2u32.pow(i)).min(ACCEPT_BACKOFF_MAX))
            .sum();
        assert_eq!(started.elapsed(), want);
        assert!(want > Duration::from_secs(5));
        assert_eq!(s.info.pid, Some(std::process::id() as i32));
        assert!(s.info.pin.is_ok(), "{:?}", s.info.pin);
        // A success starts the pause over.
        assert_eq!(a.backoff, ACCEPT_BACKOFF_MIN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_error_is_skipped_without_a_pause() {
        let (server, _client) = pair();
        let (mut a, accepts, metrics, _tx) = acceptor(
            vec![Err(io::ErrorKind::ConnectionAborted.into()), Ok(server)],
            WIDE,
        );
        let started = Instant::now();
        a.next().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.workload_accept_errors.get(), 0);
    }

    #[tokio::test]
    async fn connections_over_the_per_uid_limit_are_closed_at_once() {
        let limits = ConnectionLimits {
            per_uid: 2,
            total: 10,
        };
        let (s1, _c1) = pair();
        let (s2, _c2) = pair();
        let (s3, mut c3) = pair();
        let (s4, _c4) = pair();
        let (mut a, _, metrics, more) = acceptor(vec![Ok(s1), Ok(s2), Ok(s3)], limits);
        let first = a.next().await;
        let _second = a.next().await;
        assert_eq!(metrics.workload_connections.get(), 2);
        // The third is closed: its client reads end-of-file, and nothing waits for it.
        let accept_fourth = tokio::spawn(async move {
            let s = a.next().await;
            (a, s)
        });
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), c3.read(&mut buf))
            .await
            .expect("the refused connection is closed")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(metrics.workload_connections_refused.get(), 1);
        // Once one closes, the uid may connect again.
        drop(first);
        assert_eq!(metrics.workload_connections.get(), 1);
        more.send(Ok(s4)).unwrap();
        let (a, _fourth) = accept_fourth.await.unwrap();
        assert_eq!(metrics.workload_connections.get(), 2);
        assert_eq!(a.tracker.open(nix::unistd::geteuid().as_raw()), 2);
    }

    #[test]
    fn the_limits_hold_per_uid_and_in_all() {
        let t = Tracker::new(
            ConnectionLimits {
                per_uid: 2,
                total: 3,
            },
            AgentMetrics::new(),
        );
        let a1 = t.acquire(1).unwrap();
        let _a2 = t.acquire(1).unwrap();
        assert_eq!(t.acquire(1).err(), Some(Refused::PerUid));
        // Another uid is not held back by uid 1...
        let b1 = t.acquire(2).unwrap();
        // ...only by the total.
        assert_eq!(t.acquire(3).err(), Some(Refused::Total));
        drop(b1);
        let _c1 = t.acquire(3).unwrap();
        drop(a1);
        assert_eq!(t.open(1), 1);
        assert_eq!(t.metrics.workload_connections.get(), 2);
        let _a3 = t.acquire(1).unwrap();
        assert_eq!(t.acquire(1).err(), Some(Refused::Total));
        drop(_a2);
        drop(_a3);
        assert_eq!(t.open(1), 0);
        assert!(
            !t.counts().per_uid.contains_key(&1),
            "a uid without connections is forgotten"
        );
    }

    #[test]
    fn the_total_leaves_room_for_the_agents_own_files() {
        assert_eq!(max_connections(1_048_576), 1_047_552);
        assert_eq!(max_connections(20_000), 18_976);
        // A small limit: half of it.
        assert_eq!(max_connections(1_024), 512);
        assert_eq!(max_connections(256), 128);
        assert_eq!(max_connections(1), 1);
        assert_eq!(max_connections(0), 1);
        let l = ConnectionLimits::from_open_files_limit(7);
        assert_eq!(l.per_uid, 7);
        assert!(l.total >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_rate_limited() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.allow(), Some(0));
        for _ in 0..1_000 {
            assert_eq!(l.allow(), None);
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(l.allow(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            l.allow(),
            Some(1_001),
            "the next line says how many were held back"
        );
        assert_eq!(l.allow(), None);
    }
}
