//! Tests of SPIFFE mTLS over real loopback sockets: verification, rotation, handshake bounds.

use std::io;
use std::net::IpAddr;

use super::connect::{endpoint, server_name};
use super::incoming::{source_of, FloodReport, Handshakes};
use super::*;
use crate::proto::node as pb;
use crate::proto::node::node_client::NodeClient;
use crate::proto::node::node_server::{Node, NodeServer};
use crate::spiffe_id::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const SERVER_ID: &str = "spiffe://example.org/sigil/server";
const AGENT_ID: &str = "spiffe://example.org/sigil/agent/join_token/t1";

struct TestCa {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let cert = p.self_signed(&key).unwrap();
        TestCa {
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    /// An X509-SVID for `id`: (chain, PKCS#8 key).
    fn svid(&self, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().to_vec()], key.serialize_der())
    }

    fn identity(&self, id: &str) -> Arc<IdentityStore> {
        let (chain, key) = self.svid(id);
        Arc::new(IdentityStore::new(chain, key).unwrap())
    }

    fn trust(&self) -> Arc<TrustStore> {
        Arc::new(TrustStore::new(std::slice::from_ref(&self.cert_der)).unwrap())
    }
}

/// Answers RenewAgent with the caller's SVID as `id|serial`, or `none`.
struct Echo;

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Node for Echo {
    type AttestStream = BoxStream<pb::AttestResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        _r: Request<tonic::Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn renew_agent(
        &self,
        r: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let text = match peer_svid(&r) {
            Some(p) => format!("{}|{}", p.spiffe_id, p.serial_hex),
            None => "none".into(),
        };
        Ok(Response::new(pb::RenewAgentResponse {
            svid_chain: text.into_bytes(),
        }))
    }
    async fn sync(
        &self,
        _r: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn batch_sign(
        &self,
        _r: Request<pb::BatchSignRequest>,
    ) -> Result<Response<pb::BatchSignResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn mint_jwt_svid(
        &self,
        _r: Request<pb::JwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
}

struct TestServer {
    addr: String,
    _stop: oneshot::Sender<()>,
}

async fn serve(
    identity: Arc<IdentityStore>,
    trust: Arc<TrustStore>,
    timeout: Duration,
) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Arc::new(server_config(identity, trust).unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(Echo))
            .serve_with_incoming_shutdown(
                incoming_with_timeout(listener, config, timeout),
                async {
                    let _ = rx.await;
                },
            ),
    );
    TestServer { addr, _stop: tx }
}

fn spiffe(ca: &TestCa, expected: &str) -> ServerVerification {
    ServerVerification::Spiffe {
        trust: ca.trust(),
        expected_id: SpiffeId::parse(expected).unwrap(),
    }
}

/// Calls RenewAgent (the echo) over a fresh channel.
async fn echo(
    addr: &str,
    verification: ServerVerification,
    identity: Option<Arc<IdentityStore>>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let config = Arc::new(client_config(verification, identity)?);
    let mut client = NodeClient::new(connect(addr, config).await?);
    let resp = client
        .renew_agent(pb::RenewAgentRequest { csr: vec![] })
        .await?;
    Ok(String::from_utf8(resp.into_inner().svid_chain)?)
}

fn serial_of(identity: &IdentityStore) -> String {
    let key = identity.current().unwrap();
    PeerSvid::from_leaf_der(key.end_entity_cert().unwrap())
        .unwrap()
        .serial_hex
}

#[tokio::test]
async fn mtls_round_trip_passes_the_client_svid_to_handlers() -> TestResult {
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    let agent = ca.identity(AGENT_ID);
    let got = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
    assert_eq!(got, format!("{AGENT_ID}|{}", serial_of(&agent)));
    Ok(())
}

#[tokio::test]
async fn no_client_certificate_is_accepted_without_peer_svid() -> TestResult {
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    assert_eq!(
        echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
        "none"
    );
    // An empty store presents nothing either.
    let empty = Arc::new(IdentityStore::empty());
    assert_eq!(
        echo(&server.addr, spiffe(&ca, SERVER_ID), Some(empty)).await?,
        "none"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_server_id_or_untrusted_server_is_refused() -> TestResult {
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    let err = echo(
        &server.addr,
        spiffe(&ca, "spiffe://example.org/not-the-server"),
        None,
    )
    .await
    .err()
    .ok_or("a server with another SPIFFE ID was accepted")?;
    let chain = format!("{err:?}");
    assert!(chain.contains("expected"), "{chain}");
    // A server whose SVID comes from another CA.
    let other = TestCa::new();
    assert!(echo(&server.addr, spiffe(&other, SERVER_ID), None)
        .await
        .is_err());
    // Insecure bootstrap accepts it (demo mode).
    assert_eq!(
        echo(&server.addr, ServerVerification::InsecureBootstrap, None).await?,
        "none"
    );
    Ok(())
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() -> TestResult {
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    let other = TestCa::new();
    let result = echo(
        &server.addr,
        spiffe(&ca, SERVER_ID),
        Some(other.identity(AGENT_ID)),
    )
    .await;
    assert!(
        result.is_err(),
        "foreign client certificate accepted: {result:?}"
    );
    // The server keeps serving others.
    let agent = ca.identity(AGENT_ID);
    assert!(echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent))
        .await?
        .starts_with(AGENT_ID));
    Ok(())
}

#[tokio::test]
async fn identity_rotation_applies_to_new_connections() -> TestResult {
    let ca = TestCa::new();
    let server_identity = ca.identity(SERVER_ID);
    let server = serve(
        server_identity.clone(),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;

    // Server side: a raw TLS connection sees the serial of the current server SVID.
    let server_serial = |config: Arc<rustls::ClientConfig>, addr: String| async move {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name(&addr).unwrap(), tcp)
            .await
            .unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        PeerSvid::from_leaf_der(&leaf).unwrap().serial_hex
    };
    let config = Arc::new(client_config(spiffe(&ca, SERVER_ID), None)?);
    let before = server_serial(config.clone(), server.addr.clone()).await;
    assert_eq!(before, serial_of(&server_identity));
    let (chain, key) = ca.svid(SERVER_ID);
    server_identity.set(chain, key)?;
    let after = server_serial(config, server.addr.clone()).await;
    assert_ne!(before, after);
    assert_eq!(after, serial_of(&server_identity));

    // Client side: the same store, rotated, is what the server sees next.
    let agent = ca.identity(AGENT_ID);
    let first = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
    let (chain, key) = ca.svid(AGENT_ID);
    agent.set(chain, key)?;
    let second = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
    assert_ne!(first, second);
    assert_eq!(second, format!("{AGENT_ID}|{}", serial_of(&agent)));
    Ok(())
}

#[tokio::test]
async fn trust_bundle_swap_applies_to_new_handshakes() -> TestResult {
    let ca = TestCa::new();
    let trust = ca.trust();
    let server = serve(
        ca.identity(SERVER_ID),
        trust.clone(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    let agent = ca.identity(AGENT_ID);
    assert!(
        echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone()))
            .await
            .is_ok()
    );
    let other = TestCa::new();
    trust.set(std::slice::from_ref(&other.cert_der))?;
    assert!(echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent))
        .await
        .is_err());
    Ok(())
}

#[tokio::test]
async fn stalled_handshake_blocks_nobody_and_times_out() -> TestResult {
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        Duration::from_millis(300),
    )
    .await;
    // Connects and says nothing.
    let mut stalled = TcpStream::connect(&server.addr).await?;
    // Garbage instead of a ClientHello.
    let mut garbage = TcpStream::connect(&server.addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n").await?;
    assert_eq!(
        echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
        "none"
    );
    // The stalled connection is closed by the server after the timeout.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await?;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "stalled connection still open: {n:?}"
    );
    assert_eq!(
        echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
        "none"
    );
    Ok(())
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8).
async fn tcp_from(source: &str, addr: &str) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(addr.parse().unwrap()).await
}

/// `n` connections from `source` that never send a byte; stops early if the server stops
/// taking connections (its accept backlog is full).
async fn flood(source: &str, addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), tcp_from(source, addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    held
}

/// Why a client handshake of [`handshake_from`] did not complete.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    /// TCP connect or the TLS handshake failed.
    #[error("handshake from {from} failed: {error}")]
    Failed {
        /// The loopback source address.
        from: String,
        /// What the connect or the handshake reported.
        #[source]
        error: io::Error,
    },
    /// The handshake did not finish in time.
    #[error("handshake from {from} took over {within:?}")]
    TimedOut {
        /// The loopback source address.
        from: String,
        /// The time it had.
        within: Duration,
    },
}

/// A complete TLS handshake (the client's side, server verified) from `source`, which must
/// finish within `within`.
async fn handshake_from(
    ca: &TestCa,
    source: &str,
    addr: &str,
    within: Duration,
) -> Result<(), HandshakeFailure> {
    let config = Arc::new(client_config(spiffe(ca, SERVER_ID), None).unwrap());
    let attempt = async {
        let tcp = tcp_from(source, addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(server_name(addr).unwrap(), tcp)
            .await
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(HandshakeFailure::Failed {
            from: source.to_string(),
            error,
        }),
        Err(_) => Err(HandshakeFailure::TimedOut {
            from: source.to_string(),
            within,
        }),
    }
}

/// How many of `streams` the server has not closed (a read waits `wait` for EOF).
async fn still_open(streams: Vec<TcpStream>, wait: Duration) -> (usize, Vec<TcpStream>) {
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            let mut buf = [0u8; 1];
            match tokio::time::timeout(wait, s.read(&mut buf)).await {
                Err(_) => Some(s),
                Ok(_) => None,
            }
        });
    }
    let mut open = Vec::new();
    while let Some(r) = tasks.join_next().await {
        open.extend(r.unwrap());
    }
    (open.len(), open)
}

/// Room for `fds` more descriptors in this process (the flood needs thousands).
fn room_for(fds: u64) -> bool {
    let _ = crate::limits::raise_open_files_limit();
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    soft >= fds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_starves_no_other_source() -> TestResult {
    // Thousands of connections that never send a ClientHello, from 127.0.0.1 and
    // 127.0.0.2: more than MAX_CONCURRENT_HANDSHAKES, with the default limits.
    let per_source = [("127.0.0.1", 1500), ("127.0.0.2", 300)];
    assert!(
        room_for(6000),
        "raise the open files limit to run this test"
    );
    let ca = TestCa::new();
    let server = serve(
        ca.identity(SERVER_ID),
        ca.trust(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .await;
    let mut held = Vec::new();
    for (source, n) in per_source {
        let conns = flood(source, &server.addr, n).await;
        assert_eq!(conns.len(), n, "the server stopped accepting from {source}");
        held.push((source, conns));
    }
    // Another address, and the flooding one itself, still get their handshakes done.
    handshake_from(&ca, "127.0.0.5", &server.addr, Duration::from_secs(2)).await?;
    handshake_from(&ca, "127.0.0.1", &server.addr, Duration::from_secs(2)).await?;
    // Each flooding source kept at most its share; the rest was closed by the server.
    for (source, conns) in held {
        let (open, _keep) = still_open(conns, Duration::from_millis(500)).await;
        assert!(
            open <= MAX_HANDSHAKES_PER_SOURCE,
            "{open} unfinished handshakes from {source}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_bound_takes_from_the_heaviest_sources() -> TestResult {
    assert!(
        room_for(2000),
        "raise the open files limit to run this test"
    );
    let ca = TestCa::new();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let config = Arc::new(server_config(ca.identity(SERVER_ID), ca.trust())?);
    let limits = HandshakeLimits {
        // Long: nothing times out during the test, all closing is the bounds' doing.
        timeout: Duration::from_secs(120),
        per_source: 16,
        total: 40,
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(Echo))
            .serve_with_incoming_shutdown(incoming_with_limits(listener, config, limits), async {
                let _ = rx.await;
            }),
    );
    let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut held = Vec::new();
    for source in sources {
        held.push(flood(source, &addr, 100).await);
    }
    let (mut open_by_source, mut keep) = (Vec::new(), Vec::new());
    for conns in held {
        let (open, streams) = still_open(conns, Duration::from_millis(500)).await;
        open_by_source.push(open);
        keep.push(streams);
    }
    let total: usize = open_by_source.iter().sum();
    assert!(total <= limits.total, "{open_by_source:?}");
    // Taken from the heaviest: every source keeps a fair share.
    for open in &open_by_source {
        assert!(
            (12..=limits.per_source).contains(open),
            "{open_by_source:?}"
        );
    }
    // A new source and a flooding one get through.
    handshake_from(&ca, "127.0.0.5", &addr, Duration::from_secs(2)).await?;
    handshake_from(&ca, "127.0.0.3", &addr, Duration::from_secs(2)).await?;
    drop(tx);
    Ok(())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `n` handshakes from `source` at `now`: their ids and cancel receivers.
fn admit_n(
    h: &mut Handshakes,
    source: &str,
    n: usize,
    now: Instant,
) -> Vec<(u64, oneshot::Receiver<()>)> {
    (0..n)
        .map(|_| {
            let (id, rx, _) = h.insert(source_of(ip(source)), now);
            (id, rx)
        })
        .collect()
}

fn cancelled(rx: &mut oneshot::Receiver<()>) -> bool {
    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed))
}

#[test]
fn a_source_at_its_bound_loses_its_own_oldest_handshake() {
    let now = Instant::now();
    let mut h = Handshakes::new(HandshakeLimits {
        per_source: 3,
        total: 100,
        ..HandshakeLimits::default()
    });
    let mut other = admit_n(&mut h, "10.0.0.9", 2, now);
    let mut a = admit_n(&mut h, "10.0.0.1", 3, now);
    assert!(a.iter_mut().all(|(_, rx)| !cancelled(rx)));
    let (_, _rx, dropped) = h.insert(ip("10.0.0.1"), now);
    assert!(dropped);
    assert!(cancelled(&mut a[0].1), "the oldest of that source");
    assert!(!cancelled(&mut a[1].1) && !cancelled(&mut a[2].1));
    assert!(
        other.iter_mut().all(|(_, rx)| !cancelled(rx)),
        "others untouched"
    );
    assert_eq!(h.by_source[&ip("10.0.0.1")].len(), 3);
    assert_eq!(h.live.len(), 5);
    // A finished handshake frees its place.
    h.remove(a[1].0);
    let (_, _rx2, dropped) = h.insert(ip("10.0.0.1"), now);
    assert!(!dropped);
    assert_eq!(h.dropped_per_source, 1);
}

#[test]
fn over_the_total_the_heaviest_source_loses_its_oldest() {
    let now = Instant::now();
    let mut h = Handshakes::new(HandshakeLimits {
        per_source: 100,
        total: 10,
        ..HandshakeLimits::default()
    });
    let mut light = admit_n(&mut h, "10.0.0.2", 2, now);
    let mut heavy = admit_n(&mut h, "10.0.0.1", 8, now);
    // A new source: the heaviest pays, not the light one.
    let (_, mut fresh, dropped) = h.insert(ip("10.0.0.3"), now);
    assert!(dropped);
    assert!(cancelled(&mut heavy[0].1));
    assert!(light.iter_mut().all(|(_, rx)| !cancelled(rx)));
    // The heavy source keeps flooding: it only ever displaces itself.
    let mut more = admit_n(&mut h, "10.0.0.1", 50, now);
    assert!(light.iter_mut().all(|(_, rx)| !cancelled(rx)));
    assert!(!cancelled(&mut fresh));
    assert_eq!(h.live.len(), 10);
    assert_eq!(h.by_source[&ip("10.0.0.1")].len(), 7);
    // Its newest handshakes are the ones alive.
    assert!(more.iter_mut().rev().take(7).all(|(_, rx)| !cancelled(rx)));
    assert_eq!(h.dropped_over_total, 51);
    // Of equal sources, the one whose oldest handshake is oldest pays.
    let mut h = Handshakes::new(HandshakeLimits {
        per_source: 100,
        total: 4,
        ..HandshakeLimits::default()
    });
    let mut first = admit_n(&mut h, "10.0.0.1", 2, now);
    let mut second = admit_n(&mut h, "10.0.0.2", 2, now);
    admit_n(&mut h, "10.0.0.3", 1, now);
    assert!(cancelled(&mut first[0].1));
    assert!(second.iter_mut().all(|(_, rx)| !cancelled(rx)));
}

#[test]
fn ipv6_sources_are_grouped_by_their_64() {
    assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
    assert_eq!(
        source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
        ip("2001:db8:1:2::")
    );
    assert_ne!(source_of(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
    let mut h = Handshakes::new(HandshakeLimits {
        per_source: 2,
        ..HandshakeLimits::default()
    });
    let now = Instant::now();
    let mut first = admit_n(&mut h, "2001:db8::1", 1, now);
    admit_n(&mut h, "2001:db8::2", 1, now);
    admit_n(&mut h, "2001:db8::3", 1, now);
    assert!(cancelled(&mut first[0].1), "one /64, one source");
}

#[test]
fn flood_reports_come_at_most_once_per_interval_with_counts() {
    let t0 = Instant::now();
    let mut h = Handshakes::new(HandshakeLimits {
        per_source: 2,
        total: 100,
        ..HandshakeLimits::default()
    });
    admit_n(&mut h, "10.0.0.1", 2, t0);
    assert_eq!(
        h.flood_report(t0),
        None,
        "nothing dropped, nothing to report"
    );
    // The first drop is reported at once.
    admit_n(&mut h, "10.0.0.1", 3, t0);
    h.timed_out += 1;
    let first = h.flood_report(t0).expect("first report");
    assert_eq!(
        first,
        FloodReport {
            dropped_per_source: 3,
            dropped_over_total: 0,
            timed_out: 1,
            in_flight: 2,
            sources: 1,
            heaviest: Some((ip("10.0.0.1"), 2)),
            since: Duration::ZERO,
        }
    );
    // Further drops within the interval are counted, not reported.
    let t1 = t0 + Duration::from_secs(1);
    admit_n(&mut h, "10.0.0.1", 1000, t1);
    assert_eq!(h.flood_report(t1), None);
    assert_eq!(h.flood_report(t0 + FLOOD_LOG_INTERVAL / 2), None);
    // Once the interval has passed: one line with everything since.
    let t2 = t0 + FLOOD_LOG_INTERVAL;
    let second = h.flood_report(t2).expect("second report");
    assert_eq!(second.dropped_per_source, 1000);
    assert_eq!(second.timed_out, 0);
    assert_eq!(second.since, t2 - t1);
    // A quiet interval reports nothing.
    assert_eq!(h.flood_report(t2 + FLOOD_LOG_INTERVAL * 3), None);
}

#[test]
fn identity_and_trust_material_is_validated() {
    let ca = TestCa::new();
    let (chain, key) = ca.svid(AGENT_ID);
    let (_, other_key) = ca.svid(AGENT_ID);
    assert!(matches!(
        IdentityStore::new(vec![], key.clone()),
        Err(TlsError::EmptyChain)
    ));
    assert!(matches!(
        IdentityStore::new(chain.clone(), other_key),
        Err(TlsError::InvalidKey(_))
    ));
    assert!(matches!(
        IdentityStore::new(chain.clone(), vec![1, 2, 3]),
        Err(TlsError::InvalidKey(_))
    ));
    // A CA certificate is not an SVID.
    assert!(matches!(
        IdentityStore::new(vec![ca.cert_der.clone()], key.clone()),
        Err(TlsError::InvalidSvid(_))
    ));
    let store = IdentityStore::new(chain.clone(), key.clone()).unwrap();
    assert_eq!(store.spiffe_id().unwrap().to_string(), AGENT_ID);
    // A failed set keeps the old identity.
    assert!(store.set(vec![vec![0x30]], key).is_err());
    assert_eq!(store.spiffe_id().unwrap().to_string(), AGENT_ID);
    store.clear();
    assert!(store.current().is_none());
    assert!(!format!("{store:?}").contains("key:"));

    assert!(matches!(TrustStore::new(&[]), Err(TlsError::EmptyBundle)));
    assert!(matches!(
        TrustStore::new(&[vec![1, 2, 3]]),
        Err(TlsError::InvalidRoot { index: 0, .. })
    ));
    // The parsers' errors stay attached as causes.
    let root_err = TrustStore::new(&[vec![1, 2, 3]]).unwrap_err();
    let cause = std::error::Error::source(&root_err).expect("a cause");
    assert!(cause.downcast_ref::<webpki::Error>().is_some(), "{cause:?}");
    let key_err = IdentityStore::new(chain.clone(), vec![1, 2, 3]).unwrap_err();
    let cause = std::error::Error::source(&key_err).expect("a cause");
    assert!(cause.downcast_ref::<rustls::Error>().is_some(), "{cause:?}");
    let trust = ca.trust();
    assert!(trust.set(&[]).is_err());
    assert_eq!(trust.roots_der(), vec![ca.cert_der.clone()]);
}

#[test]
fn server_addresses_parse() {
    for ok in [
        "127.0.0.1:8081",
        "[::1]:8081",
        "sigil.example.org:443",
        "localhost:0",
    ] {
        assert!(server_name(ok).is_ok(), "{ok}");
        assert!(endpoint(ok).is_ok(), "{ok}");
    }
    for bad in ["", "host", ":8081", "host:port", "host:99999", "bad host:1"] {
        assert!(
            matches!(server_name(bad), Err(TlsError::InvalidAddress { .. })),
            "{bad}"
        );
    }
}
