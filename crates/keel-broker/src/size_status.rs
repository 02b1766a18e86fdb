//! Size errors are RESOURCE_EXHAUSTED. Tonic answers a message over its size limit (decoding a
//! request, encoding a response) with OUT_OF_RANGE, which Keel's API reserves for offsets outside
//! the log: a client would take "too large" for "seek elsewhere". These statuses arise inside
//! tonic, before or after a handler runs, so every Keel service is wrapped in [`SizeStatus`],
//! which rewrites them in the response headers (trailers-only answers) and trailers (streams).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// True for tonic's own "message length too large" statuses (its decode and encode limits).
pub fn is_size_limit(status: &Status) -> bool {
    // Tonic has no typed error for these; its messages are the only mark (tonic 0.14,
    // codec/decode.rs and codec/encode.rs).
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

/// `status` with a size limit's OUT_OF_RANGE turned into RESOURCE_EXHAUSTED; others unchanged.
pub fn size_status(status: Status) -> Status {
    if is_size_limit(&status) {
        Status::resource_exhausted(format!("{} (a message size limit)", status.message()))
    } else {
        status
    }
}

fn rewrite(headers: &mut HeaderMap) {
    // Only OUT_OF_RANGE answers are parsed: the common answers pass untouched.
    if headers.get("grpc-status").is_none_or(|v| v.as_bytes() != b"11") {
        return;
    }
    if let Some(status) = Status::from_header_map(headers)
        && is_size_limit(&status)
    {
        // Failing leaves the original status: still an error, only with the wrong code.
        let _ = size_status(status).add_header(headers);
    }
}

/// A gRPC service whose size-limit answers are RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
pub struct SizeStatus<S> {
    inner: S,
}

impl<S> SizeStatus<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> SizeStatus<S> {
        SizeStatus { inner }
    }
}

impl<S: NamedService> NamedService for SizeStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for SizeStatus<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let (mut parts, body) = response.await?.into_parts();
            rewrite(&mut parts.headers);
            Ok(http::Response::from_parts(parts, Body::new(Trailers { inner: body })))
        })
    }
}

/// A response body whose trailers get [`rewrite`].
struct Trailers {
    inner: Body,
}

impl http_body::Body for Trailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match Pin::new(&mut self.get_mut().inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_size_limits_are_rewritten() {
        let decode =
            Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes");
        let encode =
            Status::out_of_range("Error, encoded message length too large: found 9 bytes, the limit is: 4 bytes");
        for s in [decode, encode] {
            assert_eq!(size_status(s).code(), Code::ResourceExhausted);
        }
        let offset = Status::out_of_range("offset 9 is beyond the end 4 of t/0");
        assert_eq!(size_status(offset).code(), Code::OutOfRange, "offsets keep OUT_OF_RANGE");
        let mut headers = HeaderMap::new();
        let _ = Status::out_of_range("Error, decoded message length too large: found 9").add_header(&mut headers);
        rewrite(&mut headers);
        assert_eq!(Status::from_header_map(&headers).map(|s| s.code()), Some(Code::ResourceExhausted));
        let mut headers = HeaderMap::new();
        let _ = Status::out_of_range("offset 9 is beyond the end").add_header(&mut headers);
        rewrite(&mut headers);
        assert_eq!(Status::from_header_map(&headers).map(|s| s.code()), Some(Code::OutOfRange));
    }
}
