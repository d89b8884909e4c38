//! The client side: gRPC channels over TLS to `host:port`, with connect timeout and keepalive.

use std::io;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

#[cfg(doc)]
use super::client_config;
use super::{TlsError, CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Splits `host:port` (IPv6 as `[addr]:port`) and returns the TLS server name for the host.
pub(super) fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = |reason: &'static str| TlsError::InvalidAddress {
        addr: addr.chars().take(256).collect(),
        reason,
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
    port.parse::<u16>()
        .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("missing HOST"));
    }
    ServerName::try_from(host.to_string())
        .map_err(|_| bad("the host is not a DNS name or IP address"))
}

/// The tonic endpoint for `addr` (checked as [`server_name`] does), with timeouts and keepalive.
pub(super) fn endpoint(addr: &str) -> Result<Endpoint, TlsError> {
    server_name(addr)?;
    // The scheme is `http` because TLS is done by our connector, not by tonic.
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            // Pings keep a quiet connection (an agent's sync stream) honest: a server that died
            // without closing it, or a silent network, is noticed within about a minute.
            e.connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        })
        .map_err(|source| TlsError::InvalidEndpoint {
            addr: addr.chars().take(256).collect(),
            source,
        })
}

/// tower connector for tonic: TCP to the address, then a TLS handshake with the client config.
#[derive(Clone)]
struct TlsConnector {
    addr: Arc<str>,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
            > + Send,
    >,
>;

impl tower::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&*this.addr).await?;
            let _ = tcp.set_nodelay(true);
            let tls = this.tls.connect(this.name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn tls_connector(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<TlsConnector, TlsError> {
    Ok(TlsConnector {
        name: server_name(addr)?,
        addr: addr.into(),
        tls: tokio_rustls::TlsConnector::from(config),
    })
}

/// Connects a gRPC channel to `addr` (`host:port`) over TLS with `config` (from
/// [`client_config`]); fails if the first connection fails.
pub async fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    endpoint(addr)?
        .connect_with_connector(tls_connector(addr, config)?)
        .await
        .map_err(|source| TlsError::Connect {
            addr: addr.chars().take(256).collect(),
            source,
        })
}

/// A gRPC channel to `addr` that connects (and reconnects) on demand.
pub fn connect_lazy(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    Ok(endpoint(addr)?.connect_with_connector_lazy(tls_connector(addr, config)?))
}
