//! A fake kubelet for the `k8s` workload attestor: `GET /pods` over real HTTPS on loopback (a
//! fresh rcgen CA signs its `127.0.0.1`/`node-1` certificate; rustls), a bearer token required
//! as the kubelet's authenticated port does, answers shaped like the real kubelet's (JSON pod
//! list, plain-text `Unauthorized`, `Forbidden`, `404 page not found`). Or plain HTTP without a
//! token, like the read-only port.
//!
//! [`FakeKubelet`] serves from its own thread and runtime, so sync and async tests can both use
//! it; tests change what it serves while it runs and read what it saw.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// What the fake kubelet serves and what it saw.
#[derive(Debug, Default)]
pub struct State {
    /// Pod list bodies, served in order; the last one is served again and again.
    pub bodies: VecDeque<String>,
    /// The bearer token it accepts (`None`: no authentication, like the read-only port).
    pub token: Option<String>,
    /// Answer every request with this status instead.
    pub status: Option<u16>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// The `Authorization` header of each request, in order.
    pub seen: Vec<Option<String>>,
    /// How many `GET /pods` requests were answered 200.
    pub authorized: usize,
    /// How many were refused for a missing or wrong token.
    pub refused: usize,
}

/// A running fake kubelet; stopped on drop.
pub struct FakeKubelet {
    /// `https://127.0.0.1:<port>` (`http://` for the plain one).
    pub url: String,
    /// Its port.
    pub port: u16,
    /// The CA that signed its serving certificate (PEM).
    pub ca_pem: String,
    /// The served state.
    pub state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA (PEM), and a certificate it signs for `127.0.0.1` and `node-1` (chain, key).
fn pki() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "node-1-ca@1715678400");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("kubelet key");
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "node-1".into()])
        .expect("kubelet certificate params");
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "node-1@1715678400");
    let cert = leaf.signed_by(&key, &issuer).expect("kubelet certificate");
    (
        ca_cert.pem(),
        vec![
            CertificateDer::from(cert.der().to_vec()),
            CertificateDer::from(ca_cert.der().to_vec()),
        ],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

impl FakeKubelet {
    /// An HTTPS kubelet on a free loopback port requiring `Bearer <token>` and serving `bodies`
    /// on `GET /pods`.
    pub fn start(token: &str, bodies: &[&str]) -> FakeKubelet {
        Self::serve(Some(token), bodies)
    }

    /// A plain-HTTP kubelet without authentication (the read-only port) serving `bodies`.
    pub fn start_read_only(bodies: &[&str]) -> FakeKubelet {
        Self::serve(None, bodies)
    }

    fn serve(token: Option<&str>, bodies: &[&str]) -> FakeKubelet {
        let (ca_pem, chain, key) = pki();
        let acceptor = token.map(|_| {
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("kubelet TLS config");
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let state = Arc::new(Mutex::new(State {
            bodies: bodies.iter().map(|b| b.to_string()).collect(),
            token: token.map(str::to_string),
            ..State::default()
        }));
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fake kubelet");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("address").port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fake kubelet runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = accept(listener, acceptor, served) => {}
                    _ = stop_rx => {}
                }
            });
        });
        let scheme = if token.is_some() { "https" } else { "http" };
        FakeKubelet {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            ca_pem,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Changes what it serves.
    pub fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("fake kubelet state"));
    }

    /// The `Authorization` header of each request so far, in order.
    pub fn seen(&self) -> Vec<Option<String>> {
        self.state.lock().expect("fake kubelet state").seen.clone()
    }

    /// How many `GET /pods` requests were answered with the pod list.
    pub fn authorized(&self) -> usize {
        self.state.lock().expect("fake kubelet state").authorized
    }

    /// How many requests were refused for a missing or wrong token.
    pub fn refused(&self) -> usize {
        self.state.lock().expect("fake kubelet state").refused
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = http.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

async fn answer<B>(state: &Mutex<State>, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (status, body, delay) = {
        let mut s = state.lock().expect("fake kubelet state");
        s.seen.push(auth.clone());
        let body = if s.bodies.len() > 1 {
            s.bodies.pop_front().unwrap_or_default()
        } else {
            s.bodies.front().cloned().unwrap_or_default()
        };
        let authorized = match &s.token {
            None => true,
            Some(t) => auth.as_deref() == Some(format!("Bearer {t}").as_str()),
        };
        let status = match s.status {
            Some(st) => st,
            None if req.uri().path() != "/pods" => 404,
            None if !authorized => 401,
            None => 200,
        };
        match status {
            200 => s.authorized += 1,
            401 => s.refused += 1,
            _ => {}
        }
        let body = match status {
            200 => body,
            401 => "Unauthorized".to_string(),
            403 => "Forbidden (user=system:serviceaccount:sigil:sigil-agent, verb=get, resource=nodes, subresource(s)=[proxy])".to_string(),
            _ => "404 page not found".to_string(),
        };
        (status, body, s.delay)
    };
    tokio::time::sleep(delay).await;
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("kubelet response")
}
