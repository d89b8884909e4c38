//! The server's accept loop: TCP connections turned into finished TLS connections, each
//! handshake in its own task with a timeout, unfinished handshakes bounded per source and in
//! total ([`HandshakeLimits`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

#[cfg(doc)]
use super::peer_svid;
use super::{
    DEFAULT_HANDSHAKE_TIMEOUT, FLOOD_LOG_INTERVAL, MAX_CONCURRENT_HANDSHAKES,
    MAX_HANDSHAKES_PER_SOURCE,
};

/// A TLS connection accepted by [`incoming`]. tonic's `Connected` implementation for it puts a
/// `TlsConnectInfo<TcpConnectInfo>` (with the peer certificates) into each request, which
/// [`peer_svid`] and `Request::peer_certs` read.
pub type TlsConnection = TlsStream<TcpStream>;

/// Accepts TCP connections on `listener` and yields those whose TLS handshake (with `config`)
/// completed, for `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// Uses the default [`HandshakeLimits`]; see [`incoming_with_limits`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    incoming_with_limits(listener, config, HandshakeLimits::default())
}

/// As [`incoming`], with a handshake timeout (and the default bounds).
pub fn incoming_with_timeout(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let limits = HandshakeLimits {
        timeout: handshake_timeout,
        ..HandshakeLimits::default()
    };
    incoming_with_limits(listener, config, limits)
}

/// Bounds on the unfinished TLS handshakes of [`incoming_with_limits`].
///
/// The TLS port is open to anyone (agents attest before they hold a certificate), so a client
/// can open connections and never finish a handshake. The accept loop never stops for that:
/// each connection starts its handshake at once, and when a bound is reached an *older*
/// unfinished handshake is dropped to make room:
/// - a source already at `per_source` loses its own oldest handshake;
/// - when `total` are running, the source with the most loses its oldest one.
///
/// So a flood costs its sources their own handshakes: a source with fewer handshakes than the
/// heaviest one never loses any, and a new connection, from anywhere, always starts its
/// handshake (one from a flooding source survives as long as that source opens fewer than
/// `per_source` connections meanwhile; a real handshake needs milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Longest time a handshake may take.
    pub timeout: Duration,
    /// Most handshakes of one source (an IPv4 address, an IPv6 /64) at once.
    pub per_source: usize,
    /// Most handshakes at once.
    pub total: usize,
}

impl Default for HandshakeLimits {
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`], [`MAX_HANDSHAKES_PER_SOURCE`], [`MAX_CONCURRENT_HANDSHAKES`].
    fn default() -> Self {
        Self {
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            per_source: MAX_HANDSHAKES_PER_SOURCE,
            total: MAX_CONCURRENT_HANDSHAKES,
        }
    }
}

/// As [`incoming`], with explicit [`HandshakeLimits`].
///
/// Each handshake runs in its own task; failed or timed-out handshakes are logged at debug level
/// and dropped; handshakes dropped to respect `limits` are counted and reported at warn level, at
/// most once per [`FLOOD_LOG_INTERVAL`]; accept errors (e.g. out of file descriptors) are logged
/// and retried after a short pause. The stream never ends on its own; dropping it (tonic does on
/// shutdown) stops the accept loop and closes the listener.
pub fn incoming_with_limits(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: HandshakeLimits,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(Mutex::new(Handshakes::new(limits)));
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLOOD_LOG_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    report_flood(&handshakes, local);
                    continue;
                }
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (slot, cancelled, dropped) = Handshakes::admit(&handshakes, peer.ip());
            if dropped {
                report_flood(&handshakes, local);
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::select! {
                    r = tokio::time::timeout(limits.timeout, acceptor.accept(tcp)) => r,
                    // Dropped to make room (the sender went away): the connection closes here.
                    _ = cancelled => return,
                };
                match result {
                    Ok(Ok(tls)) => {
                        drop(slot);
                        // The receiver is gone only when the server is shutting down.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log_handshake_failure(peer, &e.to_string()),
                    Err(_) => {
                        slot.timed_out();
                        log_handshake_failure(peer, "timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_handshake_failure(peer: SocketAddr, error: &str) {
    tracing::debug!(peer = %peer, error, "TLS handshake failed; connection dropped");
}

/// Logs the flood counts if a report is due.
fn report_flood(handshakes: &Mutex<Handshakes>, local: Option<SocketAddr>) {
    let Some(r) = lock(handshakes).flood_report(Instant::now()) else {
        return;
    };
    let (heaviest_source, heaviest_handshakes) = r.heaviest.unzip();
    tracing::warn!(
        listener = ?local,
        dropped_per_source = r.dropped_per_source,
        dropped_over_total = r.dropped_over_total,
        timed_out = r.timed_out,
        in_flight = r.in_flight,
        sources = r.sources,
        heaviest_source = ?heaviest_source,
        heaviest_handshakes = ?heaviest_handshakes,
        since_secs = r.since.as_secs(),
        "TLS handshake flood: unfinished handshakes were dropped to keep accepting connections \
         (agents retry); if these sources are not agents, block them in a firewall"
    );
}

/// A poisoned lock only means a handshake task panicked; the counts stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a connection comes from, for [`HandshakeLimits::per_source`]: the IPv4 address, or the
/// /64 of an IPv6 address (a host is usually given a whole /64). IPv4-mapped IPv6 addresses
/// count as IPv4.
pub(super) fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The unfinished handshakes of [`incoming_with_limits`] and the flood counters.
pub(super) struct Handshakes {
    limits: HandshakeLimits,
    next_id: u64,
    /// Every unfinished handshake by id, i.e. oldest first; dropping the sender cancels it.
    pub(super) live: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    /// The ids of each source's unfinished handshakes.
    pub(super) by_source: HashMap<IpAddr, BTreeSet<u64>>,
    pub(super) dropped_per_source: u64,
    pub(super) dropped_over_total: u64,
    pub(super) timed_out: u64,
    /// Since when the counts run, and when the last report was made.
    counting_since: Option<Instant>,
    last_report: Option<Instant>,
}

/// Counts for one flood log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FloodReport {
    pub(super) dropped_per_source: u64,
    pub(super) dropped_over_total: u64,
    pub(super) timed_out: u64,
    pub(super) in_flight: usize,
    pub(super) sources: usize,
    /// The source with the most unfinished handshakes now, and how many.
    pub(super) heaviest: Option<(IpAddr, usize)>,
    /// How long the counts ran.
    pub(super) since: Duration,
}

/// A running handshake's place in [`Handshakes`]; freed on drop.
struct HandshakeSlot {
    id: u64,
    handshakes: Arc<Mutex<Handshakes>>,
}

impl HandshakeSlot {
    /// Counts a timeout (reported with a flood).
    fn timed_out(&self) {
        lock(&self.handshakes).timed_out += 1;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.handshakes).remove(self.id);
    }
}

impl Handshakes {
    pub(super) fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits: HandshakeLimits {
                per_source: limits.per_source.max(1),
                total: limits.total.max(1),
                ..limits
            },
            next_id: 0,
            live: BTreeMap::new(),
            by_source: HashMap::new(),
            dropped_per_source: 0,
            dropped_over_total: 0,
            timed_out: 0,
            counting_since: None,
            last_report: None,
        }
    }

    /// Registers a new handshake from `peer`, first dropping an older one if a bound is reached:
    /// its slot, a receiver that resolves when it is dropped in turn, and whether one was dropped.
    fn admit(
        this: &Arc<Mutex<Self>>,
        peer: IpAddr,
    ) -> (HandshakeSlot, oneshot::Receiver<()>, bool) {
        let mut h = lock(this);
        let (id, rx, dropped) = h.insert(source_of(peer), Instant::now());
        drop(h);
        let slot = HandshakeSlot {
            id,
            handshakes: this.clone(),
        };
        (slot, rx, dropped)
    }

    /// [`Handshakes::admit`] without the slot: the new id, its cancel receiver, whether an older
    /// handshake was dropped.
    pub(super) fn insert(
        &mut self,
        source: IpAddr,
        now: Instant,
    ) -> (u64, oneshot::Receiver<()>, bool) {
        let mut dropped = false;
        let own = self.by_source.get(&source).map_or(0, BTreeSet::len);
        if own >= self.limits.per_source {
            self.drop_oldest_of(source);
            self.dropped_per_source += 1;
            dropped = true;
        } else if self.live.len() >= self.limits.total {
            if let Some(heaviest) = self.heaviest().map(|(s, _)| s) {
                self.drop_oldest_of(heaviest);
                self.dropped_over_total += 1;
                dropped = true;
            }
        }
        if dropped && self.counting_since.is_none() {
            self.counting_since = Some(now);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.live.insert(id, (source, tx));
        self.by_source.entry(source).or_default().insert(id);
        (id, rx, dropped)
    }

    /// The source with the most unfinished handshakes (of equals, the one whose oldest is
    /// oldest), and how many.
    pub(super) fn heaviest(&self) -> Option<(IpAddr, usize)> {
        self.by_source
            .iter()
            .max_by(|a, b| {
                a.1.len()
                    .cmp(&b.1.len())
                    .then_with(|| b.1.first().cmp(&a.1.first()))
            })
            .map(|(s, ids)| (*s, ids.len()))
    }

    fn drop_oldest_of(&mut self, source: IpAddr) {
        if let Some(id) = self
            .by_source
            .get(&source)
            .and_then(|ids| ids.first().copied())
        {
            // Dropping the sender wakes the handshake task, which closes its connection.
            self.remove(id);
        }
    }

    pub(super) fn remove(&mut self, id: u64) {
        let Some((source, _cancel)) = self.live.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    /// The counts since the last report, if handshakes were dropped since and the last report
    /// is at least [`FLOOD_LOG_INTERVAL`] old (or there was none); the counts then restart.
    pub(super) fn flood_report(&mut self, now: Instant) -> Option<FloodReport> {
        let since = self.counting_since?;
        if self
            .last_report
            .is_some_and(|last| now.saturating_duration_since(last) < FLOOD_LOG_INTERVAL)
        {
            return None;
        }
        let report = FloodReport {
            dropped_per_source: self.dropped_per_source,
            dropped_over_total: self.dropped_over_total,
            timed_out: self.timed_out,
            in_flight: self.live.len(),
            sources: self.by_source.len(),
            heaviest: self.heaviest(),
            since: now.saturating_duration_since(since),
        };
        self.dropped_per_source = 0;
        self.dropped_over_total = 0;
        self.timed_out = 0;
        self.counting_since = None;
        self.last_report = Some(now);
        Some(report)
    }
}
