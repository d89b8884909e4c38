//! The health and metrics HTTP endpoint: `GET /live`, `GET /ready`, `GET /metrics`.
//!
//! Kubernetes probes and Prometheus scrape these. `/live` answers 200 while the process serves
//! HTTP at all; `/ready` asks the component ([`Probe::ready`]) and answers 503 with the reason
//! when it is not ready; `/metrics` is the Prometheus text exposition of a registry.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Why a component is not ready: its own error type, shown in the 503 body by its `Display`.
pub type NotReady = Box<dyn std::error::Error + Send + Sync>;

/// What the endpoint asks the component it reports on.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// `Ok` when ready to serve; otherwise why not (shown in the 503 body).
    async fn ready(&self) -> Result<(), NotReady>;
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "health endpoint: accept failed");
                    continue;
                }
            },
        };
        let probe = probe.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let probe = probe.clone();
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(route(req, probe.as_ref(), &registry).await) }
            });
            // Errors here are client disconnects and malformed requests: nothing to act on.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(
    req: Request<Incoming>,
    probe: &dyn Probe,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match probe.ready().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Flag(AtomicBool);

    #[async_trait]
    impl Probe for Flag {
        async fn ready(&self) -> Result<(), NotReady> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("starting".into())
            }
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn live_ready_metrics() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("test_events", "Events", counter.clone());
        counter.inc();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, flag.clone(), Arc::new(registry), async {
            let _ = rx.await;
        }));
        assert!(get(addr, "/live").await?.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/ready").await?;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("starting"),
            "{r}"
        );
        flag.0.store(true, Ordering::SeqCst);
        assert!(get(addr, "/ready").await?.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await?;
        assert!(m.contains("test_events_total 1"), "{m}");
        assert!(get(addr, "/nope").await?.starts_with("HTTP/1.1 404"));
        let _ = tx.send(());
        let _ = server.await;
        Ok(())
    }
}
