//! The registry's metrics: the one tower layer that counts and times every RPC by method
//! and gRPC status, and the meters of blob streams. The recorder, the `GET /metrics`
//! endpoint and every metric name are `patchport-telemetry`'s (re-exported here so the
//! services name them as `crate::metrics::*`).
//!
//! Hot paths (blob chunks) take a handle once per RPC and then only add to an atomic;
//! label values are `&'static str`s (methods are interned once from the descriptor sets,
//! codes are fixed).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use metrics::Counter;
pub(crate) use patchport_telemetry::{
    EVENT_LAG, GRPC_DURATION, GRPC_REQUESTS, JOBS, LEASE_EXPIRIES, PORT_DURATION, PULL_BYTES,
    PULL_DURATION, PUSH_BYTES, PUSH_DURATION, enabled,
};
use prost::Message as _;
use tracing::Instrument as _;

/// The label of a request path: the path itself (`/package.Service/Method`) for a method
/// this server has, `unknown` otherwise (so scanners cannot grow the series without end).
fn method_label(path: &str) -> &'static str {
    static METHODS: OnceLock<HashSet<&'static str>> = OnceLock::new();
    let methods = METHODS.get_or_init(|| {
        let mut out: HashSet<&'static str> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .collect();
        if let Ok(set) =
            prost_types::FileDescriptorSet::decode(patchport_proto::FILE_DESCRIPTOR_SET)
        {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        // Leaked once per process: a fixed, small set of names.
                        out.insert(Box::leak(
                            format!("/{}.{}/{}", file.package(), service.name(), method.name())
                                .into_boxed_str(),
                        ));
                    }
                }
            }
        }
        out
    });
    methods.get(path).copied().unwrap_or("unknown")
}

/// The name of a gRPC status code as Prometheus exporters of other gRPC stacks spell it.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .map(|v| code_label(tonic::Code::from_bytes(v.as_bytes())))
}

/// Counts and times every RPC; one span per request. Put on the server with
/// `Server::builder().layer(GrpcMetricsLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GrpcMetricsLayer;

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> tower_service::Service<Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Body + Unpin,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<tracing::instrument::Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let span = tracing::info_span!("grpc", method);
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        MeteredFuture {
            inner: inner.instrument(span),
            meter: Some(Meter {
                method,
                start: Instant::now(),
            }),
        }
    }
}

/// What one request records, once.
#[derive(Debug)]
struct Meter {
    method: &'static str,
    start: Instant,
}

impl Meter {
    fn record(self, code: &'static str) {
        metrics::counter!(GRPC_REQUESTS, "method" => self.method, "code" => code).increment(1);
        metrics::histogram!(GRPC_DURATION, "method" => self.method)
            .record(self.start.elapsed().as_secs_f64());
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetrics`].
    #[derive(Debug)]
    pub(crate) struct MeteredFuture<F> {
        #[pin]
        inner: F,
        meter: Option<Meter>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(meter) = this.meter.take() else {
            // Polled after completion: a contract violation of the caller; record nothing.
            return Poll::Ready(result.map(|r| r.map(MeteredBody::done)));
        };
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (most errors) carries its status in the headers.
                let meter = match grpc_status(response.headers()) {
                    Some(code) => {
                        meter.record(code);
                        None
                    }
                    None => Some(meter),
                };
                Ok(response.map(|inner| MeteredBody { inner, meter }))
            }
            Err(e) => {
                meter.record("Unknown");
                Err(e)
            }
        })
    }
}

/// A response body that records its RPC when the trailers (`grpc-status`) go out, or as
/// `Canceled` when it is dropped before (the client went away).
#[derive(Debug)]
pub(crate) struct MeteredBody<B> {
    inner: B,
    meter: Option<Meter>,
}

impl<B> MeteredBody<B> {
    fn done(inner: B) -> Self {
        Self { inner, meter: None }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if self.meter.is_some() {
            let code = match &polled {
                Some(Ok(frame)) => frame
                    .trailers_ref()
                    .map(|t| grpc_status(t).unwrap_or("Unknown")),
                // A body error is a broken stream, and an end without trailers is not a
                // gRPC status.
                Some(Err(_)) | None => Some("Unknown"),
            };
            if let Some(code) = code
                && let Some(meter) = self.meter.take()
            {
                meter.record(code);
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.record("Canceled");
        }
    }
}

/// Counts the bytes of one ReadBlob stream and records its time when the stream ends or
/// is dropped.
#[derive(Debug)]
pub(crate) struct PullMeter {
    bytes: Counter,
    start: Instant,
}

impl PullMeter {
    pub(crate) fn start() -> Self {
        Self {
            bytes: metrics::counter!(PULL_BYTES),
            start: Instant::now(),
        }
    }

    pub(crate) fn sent(&self, n: usize) {
        self.bytes.increment(n as u64);
    }
}

impl Drop for PullMeter {
    fn drop(&mut self) {
        metrics::histogram!(PULL_DURATION).record(self.start.elapsed().as_secs_f64());
    }
}

/// Counts the bytes of one UploadChunks stream and records its time when dropped.
#[derive(Debug)]
pub(crate) struct PushMeter {
    bytes: Counter,
    start: Instant,
}

impl PushMeter {
    pub(crate) fn start() -> Self {
        Self {
            bytes: metrics::counter!(PUSH_BYTES),
            start: Instant::now(),
        }
    }

    pub(crate) fn received(&self, n: usize) {
        self.bytes.increment(n as u64);
    }
}

impl Drop for PushMeter {
    fn drop(&mut self) {
        metrics::histogram!(PUSH_DURATION).record(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_are_labelled_and_others_are_unknown() {
        assert_eq!(
            method_label("/patchport.v1.BlobService/ReadBlob"),
            "/patchport.v1.BlobService/ReadBlob"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/patchport.v1.BlobService/Nope"), "unknown");
        assert_eq!(method_label("/wp-login.php"), "unknown");
    }

    #[test]
    fn status_codes_come_from_headers_or_trailers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), Some("NotFound"));
        h.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(grpc_status(&h), Some("OK"));
        h.insert("grpc-status", http::HeaderValue::from_static("garbage"));
        assert_eq!(grpc_status(&h), Some("Unknown"));
    }
}
