//! The HTTP endpoint: `GET /metrics`, `/healthz`, `/readyz` over HTTP/1.1 (hyper).
//!
//! Each connection is served by a task of its own; a scrape encodes on the blocking pool,
//! since it reads the maps with `bpf(2)` calls.

use std::{convert::Infallible, net::SocketAddr};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

use super::Metrics;

/// The OpenMetrics text format, as `prometheus_client::encoding::text` writes it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("--metrics-address {address}: {source}")]
pub struct ServeError {
    address: SocketAddr,
    source: std::io::Error,
}

/// Listen on `address` and serve until the returned task is aborted (or dropped with the
/// runtime). Binding happens now, so a taken port fails the start.
pub async fn serve(address: SocketAddr, metrics: Metrics) -> Result<JoinHandle<()>, ServeError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ServeError { address, source })?;
    let bound = listener.local_addr().unwrap_or(address);
    tracing::info!(address = %bound, "metrics and health endpoints listening");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, metrics.clone()));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics: connection ended with an error");
                }
            });
        }
    }))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn check(result: Result<String, String>) -> Response<Full<Bytes>> {
    match result {
        Ok(text) => reply(StatusCode::OK, TEXT, text),
        Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
    }
}

async fn handle(
    req: Request<Incoming>,
    metrics: Metrics,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => match tokio::task::spawn_blocking(move || metrics.encode()).await {
            Ok(text) => reply(StatusCode::OK, OPENMETRICS, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("encoding failed: {e}\n"),
            ),
        },
        "/healthz" => check(metrics.healthz()),
        "/readyz" => check(metrics.readyz()),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    })
}
