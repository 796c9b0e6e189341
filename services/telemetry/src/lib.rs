//! patchport's metrics plumbing, shared by the registry and the port worker: the
//! process-wide Prometheus recorder, the `GET /metrics` endpoint, and the name of every
//! metric a patchport process records.
//!
//! Everything is recorded through the `metrics` facade. Without an endpoint (no
//! `--metrics-listen`) no recorder is installed and every call is a no-op; [`enabled`]
//! lets callers skip work done only to compute a metric. `patchport serve --workers N`
//! runs the registry and in-process workers in one process behind one endpoint, so the
//! names live here, in one list, and stay apart.
//!
//! | name | type | labels | recorded by |
//! |---|---|---|---|
//! | `patchport_grpc_requests_total` | counter | `method`, `code` | registry |
//! | `patchport_grpc_request_duration_seconds` | histogram | `method` | registry |
//! | `patchport_push_bytes_total` / `patchport_pull_bytes_total` | counter | | registry |
//! | `patchport_push_duration_seconds` / `patchport_pull_duration_seconds` | histogram | | registry |
//! | `patchport_jobs` | gauge | `state` | registry |
//! | `patchport_port_duration_seconds` | histogram | `outcome` | registry |
//! | `patchport_lease_expiries_total` | counter | | registry |
//! | `patchport_event_lag_seconds` | histogram | | registry |
//! | `patchport_composed_bytes_hashed_total` / `patchport_composed_bytes_kept_total` | counter | | registry |
//! | `patchport_worker_port_duration_seconds` | histogram | `outcome` | worker |
//! | `patchport_worker_cache_hits_total` / `patchport_worker_cache_misses_total` | counter | | worker |
//! | `patchport_worker_cache_fetched_bytes_total` / `patchport_worker_cache_evicted_bytes_total` | counter | | worker |
//!
//! Architecture invariant: only metrics plumbing: no gRPC, no storage, no tensor math, and
//! nothing that links a model runtime, so every service can depend on it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every RPC, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "patchport_grpc_requests_total";
/// Every RPC's time from request to the end of its response, by `method`.
pub const GRPC_DURATION: &str = "patchport_grpc_request_duration_seconds";
/// Blob bytes received by UploadChunks.
pub const PUSH_BYTES: &str = "patchport_push_bytes_total";
/// Blob bytes sent by ReadBlob, and with leases (a small patch's files).
pub const PULL_BYTES: &str = "patchport_pull_bytes_total";
/// One UploadChunks stream.
pub const PUSH_DURATION: &str = "patchport_push_duration_seconds";
/// One ReadBlob stream.
pub const PULL_DURATION: &str = "patchport_pull_duration_seconds";
/// Jobs by `state` (queue depth), refreshed from the store.
pub const JOBS: &str = "patchport_jobs";
/// A port attempt from lease to CompleteJob or FailJob, by `outcome` (the registry's
/// view).
pub const PORT_DURATION: &str = "patchport_port_duration_seconds";
/// Leases requeued by the reaper because they expired.
pub const LEASE_EXPIRIES: &str = "patchport_lease_expiries_total";
/// Time from an event's commit to its delivery to a subscriber.
pub const EVENT_LAG: &str = "patchport_event_lag_seconds";
/// Bytes of composed files (merged models) that CompleteJob read and hashed.
pub const COMPOSED_BYTES_HASHED: &str = "patchport_composed_bytes_hashed_total";
/// Bytes of composed files that CompleteJob did not read: a beginning shared with a file
/// hashed before, or hashed ahead while the port ran (PrepareComposed), whose SHA-256
/// state the registry kept.
pub const COMPOSED_BYTES_KEPT: &str = "patchport_composed_bytes_kept_total";
/// A port attempt in a worker from its lease to its outcome (`succeeded`,
/// `incompatible`, `failed`, `released` on shutdown, `lost` when cancelled or fenced).
/// Named apart from [`PORT_DURATION`] so that a registry with in-process workers reports
/// both without mixing them.
pub const WORKER_PORT_DURATION: &str = "patchport_worker_port_duration_seconds";
/// Token records held in the registry's token cache (`kind` `valid` or `miss`): bounded,
/// least recently used first out.
pub const TOKEN_CACHE_ENTRIES: &str = "patchport_token_cache_entries";
/// Streams refused by a per-caller cap, by `limit` (`uploads`, `subscriptions`).
pub const STREAMS_REFUSED: &str = "patchport_streams_refused_total";
/// Streams ended because the client sent nothing for the idle timeout, by `stream`.
pub const STREAMS_IDLE_CLOSED: &str = "patchport_streams_idle_closed_total";

/// Base tensor reads a worker served from its local cache.
pub const WORKER_CACHE_HITS: &str = "patchport_worker_cache_hits_total";
/// Base tensor reads that filled the worker's cache from the registry.
pub const WORKER_CACHE_MISSES: &str = "patchport_worker_cache_misses_total";
/// Bytes a worker's cache fetched from the registry.
pub const WORKER_CACHE_FETCHED_BYTES: &str = "patchport_worker_cache_fetched_bytes_total";
/// Bytes a worker's cache evicted to stay within its bound.
pub const WORKER_CACHE_EVICTED_BYTES: &str = "patchport_worker_cache_evicted_bytes_total";
/// Merged tensors a worker computed and stored (uploaded or sent inline).
pub const WORKER_TENSORS_MERGED: &str = "patchport_worker_tensors_merged_total";
/// Merged tensors a worker took from an earlier port of the same patch: not read, not
/// computed, not uploaded.
pub const WORKER_TENSORS_REUSED: &str = "patchport_worker_tensors_reused_total";

/// Every metric name above, for the checks that keep them apart.
pub const ALL: [&str; 22] = [
    GRPC_REQUESTS,
    GRPC_DURATION,
    PUSH_BYTES,
    PULL_BYTES,
    PUSH_DURATION,
    PULL_DURATION,
    JOBS,
    PORT_DURATION,
    LEASE_EXPIRIES,
    EVENT_LAG,
    COMPOSED_BYTES_HASHED,
    COMPOSED_BYTES_KEPT,
    WORKER_PORT_DURATION,
    TOKEN_CACHE_ENTRIES,
    STREAMS_REFUSED,
    STREAMS_IDLE_CLOSED,
    WORKER_CACHE_HITS,
    WORKER_CACHE_MISSES,
    WORKER_CACHE_FETCHED_BYTES,
    WORKER_CACHE_EVICTED_BYTES,
    WORKER_TENSORS_MERGED,
    WORKER_TENSORS_REUSED,
];

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

/// Whether this process records metrics (the recorder is installed): lets callers skip
/// work done only to compute a metric.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Installs the process-wide Prometheus recorder once and describes every patchport
/// metric (the `# HELP` lines; a metric never recorded is not rendered); later calls get
/// the same handle.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let installed = HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|e| e.to_string())?;
        describe();
        ENABLED.store(true, Ordering::Relaxed);
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
    describe_counter!(
        PULL_BYTES,
        Unit::Bytes,
        "blob bytes sent by ReadBlob, and with leases (a small patch's files)"
    );
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
    describe_counter!(
        COMPOSED_BYTES_HASHED,
        Unit::Bytes,
        "bytes of composed files (merged models) CompleteJob read and hashed"
    );
    describe_counter!(
        COMPOSED_BYTES_KEPT,
        Unit::Bytes,
        "bytes of composed files CompleteJob did not read: a beginning hashed before (or ahead), its state kept"
    );
    describe_histogram!(
        WORKER_PORT_DURATION,
        Unit::Seconds,
        "a port attempt in this worker from lease to outcome, by outcome"
    );
    describe_gauge!(
        TOKEN_CACHE_ENTRIES,
        "token records in the registry's bounded token cache, by kind (valid, miss)"
    );
    describe_counter!(
        STREAMS_REFUSED,
        "streams refused by a per-caller cap, by limit (uploads, subscriptions)"
    );
    describe_counter!(
        STREAMS_IDLE_CLOSED,
        "streams ended because the client sent nothing for the idle timeout, by stream"
    );
    describe_counter!(
        WORKER_CACHE_HITS,
        "base tensor reads served from the worker's cache"
    );
    describe_counter!(
        WORKER_CACHE_MISSES,
        "base tensor reads that filled the worker's cache from the registry"
    );
    describe_counter!(
        WORKER_CACHE_FETCHED_BYTES,
        Unit::Bytes,
        "bytes the worker's cache fetched from the registry"
    );
    describe_counter!(
        WORKER_CACHE_EVICTED_BYTES,
        Unit::Bytes,
        "bytes the worker's cache evicted to stay within its bound"
    );
    describe_counter!(
        WORKER_TENSORS_MERGED,
        "merged tensors the worker computed and stored"
    );
    describe_counter!(
        WORKER_TENSORS_REUSED,
        "merged tensors the worker took from an earlier port: not read, computed or uploaded"
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn names_are_distinct_prefixed_and_histograms_are_in_seconds() {
        let unique: HashSet<_> = ALL.iter().collect();
        assert_eq!(unique.len(), ALL.len(), "a metric name is used twice");
        for name in ALL {
            assert!(name.starts_with("patchport_"), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
        for histogram in [
            GRPC_DURATION,
            PUSH_DURATION,
            PULL_DURATION,
            PORT_DURATION,
            EVENT_LAG,
            WORKER_PORT_DURATION,
        ] {
            assert!(
                histogram.ends_with("_seconds"),
                "{histogram} gets no buckets"
            );
        }
    }

    /// One HTTP/1.1 request on its own connection; the status code and the body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {response}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn the_endpoint_serves_what_is_recorded_at_get_metrics_only() {
        let endpoint = MetricsEndpoint::bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("bind");
        assert!(enabled());
        let addr = endpoint.local_addr();
        let stop = CancellationToken::new();
        let served = tokio::spawn(endpoint.serve(stop.clone()));
        metrics::histogram!(WORKER_PORT_DURATION, "outcome" => "succeeded").record(0.2);
        metrics::counter!(LEASE_EXPIRIES).increment(3);

        let (status, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("# HELP patchport_worker_port_duration_seconds"),
            "{body}"
        );
        assert!(
            body.contains(
                "patchport_worker_port_duration_seconds_bucket{outcome=\"succeeded\",le=\"0.25\"} 1"
            ),
            "{body}"
        );
        assert!(body.contains("patchport_lease_expiries_total 3"), "{body}");
        // Described but never recorded: not rendered.
        assert!(!body.contains("patchport_jobs"), "{body}");
        assert_eq!(request(addr, "POST", "/metrics").await.0, 405);
        assert_eq!(request(addr, "GET", "/").await.0, 404);

        // A second bind in the same process shares the recorder.
        let again = MetricsEndpoint::bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("a second endpoint");
        assert_ne!(again.local_addr(), addr);

        stop.cancel();
        served.await.expect("the endpoint stops");
    }
}
