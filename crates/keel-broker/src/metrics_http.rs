//! The `/metrics` HTTP listener: a minimal HTTP/1.1 server (hyper) apart from the gRPC port,
//! so that Prometheus scrapes a node without speaking HTTP/2 and a scrape never competes with
//! clients for gRPC streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::broker::Broker;

/// Most scrape connections served at once; more are closed at once. Prometheus keeps one per
/// target, so this leaves room for a few people with curl and bounds what anyone can hold.
const CONNECTIONS_MAX: usize = 16;
/// A connection that has not sent its request headers by then is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts scrape connections until the task is aborted (the node stops).
pub(crate) async fn serve(broker: Broker, listener: tokio::net::TcpListener) {
    let room = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&room).try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing this one");
            continue;
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let broker = broker.clone();
                async move { Ok::<_, Infallible>(answer(&broker, &request).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, error = %e, "metrics connection ended");
            }
            drop(permit);
        });
    }
}

async fn answer(broker: &Broker, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => match broker.metrics_text().await {
            Ok(text) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", e.to_string()),
        },
        (_, "/metrics") => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "use GET\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "Keel serves /metrics here\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
