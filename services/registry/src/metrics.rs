//! Prometheus metrics: the process-wide recorder, the `GET /metrics` endpoint, and the
//! one tower layer that counts and times every RPC by method and gRPC status.
//!
//! Everything is recorded through the `metrics` facade. Without an endpoint (no
//! `--metrics-listen`) no recorder is installed and every call is a no-op. Hot paths (blob
//! chunks) take a handle once per RPC and then only add to an atomic; label values are
//! `&'static str`s (methods are interned once from the descriptor sets, codes are fixed).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `patchport_grpc_requests_total` | counter | `method`, `code` |
//! | `patchport_grpc_request_duration_seconds` | histogram | `method` |
//! | `patchport_push_bytes_total` / `patchport_pull_bytes_total` | counter | |
//! | `patchport_push_duration_seconds` / `patchport_pull_duration_seconds` | histogram | |
//! | `patchport_jobs` | gauge | `state` |
//! | `patchport_port_duration_seconds` | histogram | `outcome` |
//! | `patchport_lease_expiries_total` | counter | |
//! | `patchport_event_lag_seconds` | histogram | |

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Every RPC, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "patchport_grpc_requests_total";
/// Every RPC's time from request to the end of its response, by `method`.
pub const GRPC_DURATION: &str = "patchport_grpc_request_duration_seconds";
/// Blob bytes received by UploadChunks.
pub const PUSH_BYTES: &str = "patchport_push_bytes_total";
/// Blob bytes sent by ReadBlob.
pub const PULL_BYTES: &str = "patchport_pull_bytes_total";
/// One UploadChunks stream.
pub const PUSH_DURATION: &str = "patchport_push_duration_seconds";
/// One ReadBlob stream.
pub const PULL_DURATION: &str = "patchport_pull_duration_seconds";
/// Jobs by `state` (queue depth), refreshed from the store.
pub const JOBS: &str = "patchport_jobs";
/// A port attempt from lease to CompleteJob or FailJob, by `outcome`.
pub const PORT_DURATION: &str = "patchport_port_duration_seconds";
/// Leases requeued by the reaper because they expired.
pub const LEASE_EXPIRIES: &str = "patchport_lease_expiries_total";
/// Time from an event's commit to its delivery to a subscriber.
pub const EVENT_LAG: &str = "patchport_event_lag_seconds";

/// Histogram buckets for every `*_seconds` metric: milliseconds (RPCs) to ten minutes
/// (ports of large models).
const SECONDS_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
/// How often recorded histogram samples are folded into buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be installed (another one was installed in this process
    /// first).
    #[error("cannot install the prometheus recorder: {message}")]
    Recorder {
        /// What went wrong.
        message: String,
    },
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Whether this process records metrics (an endpoint was started): lets callers skip
/// work done only to compute a metric.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the process-wide Prometheus recorder once; later calls get the same handle.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let installed = HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|e| e.to_string())?;
        describe();
        ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(handle)
    });
    match installed {
        Ok(handle) => Ok(handle.clone()),
        Err(message) => Err(MetricsError::Recorder {
            message: message.clone(),
        }),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(GRPC_REQUESTS, "grpc requests by method and status code");
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "grpc request time until the end of the response, by method"
    );
    describe_counter!(
        PUSH_BYTES,
        Unit::Bytes,
        "blob bytes received by UploadChunks"
    );
    describe_counter!(PULL_BYTES, Unit::Bytes, "blob bytes sent by ReadBlob");
    describe_histogram!(PUSH_DURATION, Unit::Seconds, "one UploadChunks stream");
    describe_histogram!(PULL_DURATION, Unit::Seconds, "one ReadBlob stream");
    describe_gauge!(JOBS, "port jobs by state (queue depth)");
    describe_histogram!(
        PORT_DURATION,
        Unit::Seconds,
        "a port attempt from lease to its outcome, by outcome"
    );
    describe_counter!(
        LEASE_EXPIRIES,
        "job leases that expired and were requeued by the reaper"
    );
    describe_histogram!(
        EVENT_LAG,
        Unit::Seconds,
        "time from an event's commit to its delivery to a subscriber"
    );
}

/// A bound `GET /metrics` endpoint (Prometheus text format) over the process recorder.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
    handle: PrometheusHandle,
}

impl MetricsEndpoint {
    /// Installs the recorder (once per process) and binds `addr` (port 0 picks one).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let handle = install()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            addr,
            handle,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` until `stop` is cancelled.
    pub async fn serve(self, stop: CancellationToken) {
        let mut upkeep = tokio::time::interval(UPKEEP);
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                _ = upkeep.tick() => {
                    self.handle.run_upkeep();
                    continue;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a metrics connection failed");
                        continue;
                    }
                },
            };
            let handle = self.handle.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&handle, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let stop = stop.clone();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "metrics connection failed");
                    },
                    () = stop.cancelled() => {}
                }
            });
        }
    }
}

fn respond(
    handle: &PrometheusHandle,
    method: &http::Method,
    path: &str,
) -> Response<http_body_util::Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&http::Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(handle.render()),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"use GET\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"metrics are at /metrics\n"),
        ),
    };
    let mut response = Response::new(http_body_util::Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

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
