//! `patchport.v1.BlobService`.
//!
//! A digest is never a read key on its own: every answer about a blob (its bytes, its
//! size, whether it is stored, whether an upload may skip it) comes from what the caller
//! may see ([`crate::auth::Auth::visible_blobs`]). A caller that may not see a stored
//! blob is told it is missing and uploads the bytes itself; that upload is its proof of
//! possession (its namespace is recorded as an owner of the blob), and the bytes are
//! still stored once.
//!
//! Upload streams are capped per caller (`--max-upload-streams`), persist what arrived
//! whenever the client pauses (a stalled stream holds no chunk data in memory) and end
//! after `--stream-idle-seconds` without a chunk.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use patchport_core::layout::{BlobRange, FileRef};
use patchport_core::{AnyRef, Digest};
use patchport_proto::convert::{WireError, parse_field, parse_list};
use patchport_proto::v1::{self, blob_service_server::BlobService};
use patchport_store::blobs::UploadStart;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Need, Principal};
use crate::error::{ApiError, ApiResult};
use crate::limits::StreamKind;
use crate::state::Registry;

/// An upload stream that pauses this long has what it sent so far persisted, so a
/// stalled client pins no chunk data in the registry's memory.
const UPLOAD_PAUSE: Duration = Duration::from_secs(1);

/// Most digests in one FindMissingBlobs call.
const MAX_DIGESTS: usize = 10_000;

/// The refusal of an oversize upload chunk: the limit, and the server flag and
/// environment variable that set it.
fn chunk_limit_message(size: &str, max_chunk: u64) -> String {
    format!(
        "upload chunk of {size}; the limit is {max_chunk} bytes (set by the registry's \
         --max-chunk-bytes / PATCHPORT_MAX_CHUNK_BYTES; StartUpload's max_chunk_size says it)"
    )
}

/// A chunk beyond even the transport's message limit arrives as the transport's
/// OUT_OF_RANGE: answer RESOURCE_EXHAUSTED naming the chunk limit, as for any oversize
/// chunk.
fn transport_limit(status: Status, max_chunk: u64) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        // tonic says `found N bytes`: the message, a chunk plus a few bytes of framing.
        let found = status
            .message()
            .split("found ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .map_or_else(
                || "more than the limit".to_owned(),
                |n| format!("about {n} bytes"),
            );
        ApiError::exhausted(chunk_limit_message(&found, max_chunk)).into()
    } else {
        status
    }
}

/// The blob service.
#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    pub(crate) registry: Registry,
}

/// The digests of a `FindMissingBlobs` request.
#[derive(Debug)]
struct FindMissing(Vec<Digest>);

impl TryFrom<&v1::FindMissingBlobsRequest> for FindMissing {
    type Error = WireError;

    fn try_from(req: &v1::FindMissingBlobsRequest) -> Result<Self, WireError> {
        if req.digests.len() > MAX_DIGESTS {
            return Err(WireError::invalid(
                "digests",
                format!(
                    "{} digests in one request; the limit is {MAX_DIGESTS}",
                    req.digests.len()
                ),
            ));
        }
        parse_list("digests", &req.digests).map(FindMissing)
    }
}

/// A `StartUpload` request.
#[derive(Debug)]
struct StartUpload {
    digest: Digest,
    size: u64,
}

impl TryFrom<&v1::StartUploadRequest> for StartUpload {
    type Error = WireError;

    fn try_from(req: &v1::StartUploadRequest) -> Result<Self, WireError> {
        Ok(StartUpload {
            digest: parse_field("digest", &req.digest)?,
            size: req.size,
        })
    }
}

/// A `ReadBlob` request: a byte range of a blob.
#[derive(Debug)]
struct ReadRange {
    digest: Digest,
    offset: u64,
    /// `None` reads to the end (0 on the wire).
    length: Option<u64>,
}

impl TryFrom<&v1::ReadBlobRequest> for ReadRange {
    type Error = WireError;

    fn try_from(req: &v1::ReadBlobRequest) -> Result<Self, WireError> {
        Ok(ReadRange {
            digest: parse_field("digest", &req.digest)?,
            offset: req.offset,
            length: (req.length > 0).then_some(req.length),
        })
    }
}

/// What a `ReadFile` request names.
#[derive(Debug)]
enum FileSource {
    /// A file of a base or patch version, or of a port's artifact.
    InVersion {
        reference: AnyRef,
        path: String,
        merged: bool,
    },
    /// A blob.
    Blob(Digest),
}

impl TryFrom<&v1::ReadFileRequest> for FileSource {
    type Error = WireError;

    fn try_from(req: &v1::ReadFileRequest) -> Result<Self, WireError> {
        match (req.reference.is_empty(), req.digest.is_empty()) {
            (false, true) => {
                if req.path.is_empty() {
                    return Err(WireError::invalid(
                        "path",
                        "required with reference: the file's path within the version or port",
                    ));
                }
                Ok(FileSource::InVersion {
                    reference: parse_field("reference", &req.reference)?,
                    path: req.path.clone(),
                    merged: req.merged,
                })
            }
            (true, false) => Ok(FileSource::Blob(parse_field("digest", &req.digest)?)),
            _ => Err(WireError::invalid(
                "reference",
                "set either reference (with path) or digest",
            )),
        }
    }
}

impl Blobs {
    /// Uploads (and the existence checks that go with them) need push somewhere, or
    /// the worker scope.
    async fn uploader(&self, md: &tonic::metadata::MetadataMap) -> ApiResult<Principal> {
        self.registry.auth.check_somewhere(md, Need::Push).await
    }

    /// The next chunk of an upload stream: when the client pauses for [`UPLOAD_PAUSE`]
    /// what is buffered is persisted, and after the idle limit without a chunk the
    /// stream is refused (RESOURCE_EXHAUSTED, naming the flag).
    async fn next_chunk(
        &self,
        stream: &mut Streaming<v1::UploadChunk>,
        writer: &mut patchport_store::blobs::UploadWriter,
    ) -> Result<Option<v1::UploadChunk>, Status> {
        let idle = self.registry.limits.stream_idle;
        let recv = stream.message();
        tokio::pin!(recv);
        if let Ok(next) = tokio::time::timeout(UPLOAD_PAUSE.min(idle), &mut recv).await {
            return next;
        }
        if writer.buffered() > 0 {
            writer
                .persist_buffered()
                .await
                .map_err(|e| Status::from(ApiError::from(e)))?;
        }
        match tokio::time::timeout(idle.saturating_sub(UPLOAD_PAUSE), &mut recv).await {
            Ok(next) => next,
            Err(_) => {
                metrics::counter!(patchport_telemetry::STREAMS_IDLE_CLOSED, "stream" => "upload")
                    .increment(1);
                Err(idle_refusal("upload stream sent no chunk", idle).into())
            }
        }
    }
}

impl Blobs {
    /// The file a `ReadFile` request names, after the read checks of the version or port
    /// (or of the blob): the file, and the blob ranges its bytes are, in order.
    async fn file_of(
        &self,
        md: &tonic::metadata::MetadataMap,
        source: FileSource,
    ) -> ApiResult<(FileRef, Vec<BlobRange>)> {
        let whole = |f: FileRef| {
            let range = BlobRange {
                digest: f.digest,
                offset: 0,
                length: f.size,
            };
            (f, vec![range])
        };
        let (reference, path, merged) =
            match source {
                FileSource::Blob(digest) => {
                    self.registry.auth.require_blob_read(md, &digest).await?;
                    let size =
                        self.registry.blobs.size(&digest).await?.ok_or_else(|| {
                            ApiError::not_found(format!("blob {digest} not found"))
                        })?;
                    return Ok(whole(FileRef {
                        path: String::new(),
                        digest,
                        size,
                    }));
                }
                FileSource::InVersion {
                    reference,
                    path,
                    merged,
                } => (reference, path, merged),
            };
        let auth = &self.registry.auth;
        let who = auth.principal(md).await?;
        let meta = &self.registry.meta;
        let not_found = || ApiError::not_found(format!("no file {path:?} in {reference}"));
        match &reference {
            AnyRef::Version(r) => {
                if merged {
                    return Err(ApiError::invalid(
                        "merged: applies to a port reference (patch@base)",
                    ));
                }
                auth.require(&who, Need::Read, r.name.namespace()).await?;
                let files = if let Some(b) = meta.get_base_version(&r.name, &r.version).await? {
                    b.files
                } else if let Some(p) = meta.get_patch_version(&r.name, &r.version).await? {
                    p.files
                } else {
                    return Err(ApiError::not_found(format!("no base or patch version {r}")));
                };
                let f = files
                    .into_iter()
                    .find(|f| f.path == path)
                    .ok_or_else(not_found)?;
                Ok(whole(f))
            }
            AnyRef::Port(r) => {
                auth.require(&who, Need::Read, r.patch.name.namespace())
                    .await?;
                auth.require(&who, Need::Read, r.base.name.namespace())
                    .await?;
                let port = meta
                    .get_port(
                        &r.patch.name,
                        &r.patch.version,
                        &r.base.name,
                        &r.base.version,
                        patchport_core::port::METHOD_VERSION,
                    )
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("no port {r}")))?;
                let files = if merged {
                    port.merged_files
                } else {
                    port.adapter_files
                };
                let f = files
                    .into_iter()
                    .find(|f| f.file.path == path)
                    .ok_or_else(not_found)?;
                if f.segments.is_empty() {
                    Ok(whole(f.file))
                } else {
                    Ok((f.file, f.segments))
                }
            }
        }
    }
}

impl Registry {
    /// The bytes of a file stored as byte ranges of blobs, in order: the one reading of
    /// composed files (ReadFile streams it; CompleteJob hashes a worker's composed files
    /// with it).
    pub(crate) fn compose(
        &self,
        segments: Vec<BlobRange>,
    ) -> impl Stream<Item = ApiResult<bytes::Bytes>> + Send + 'static {
        let blobs = self.blobs.clone();
        futures::stream::iter(segments)
            .then(move |s| {
                let blobs = blobs.clone();
                async move { blobs.read(&s.digest, s.offset, Some(s.length)).await }
            })
            .map(|opened| match opened {
                Ok(stream) => stream.map(|c| c.map_err(ApiError::from)).left_stream(),
                Err(e) => {
                    futures::stream::once(async move { Err(ApiError::from(e)) }).right_stream()
                }
            })
            .flatten()
    }
}

/// CPU-bound work over a sequence of chunks (hashing, indexing) on a blocking thread,
/// fed from async code: up to four chunks wait in between, so producing the bytes (a
/// read, an upload) and consuming them overlap.
pub(crate) struct BlockingSink<T> {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    worker: tokio::task::JoinHandle<T>,
}

impl<T: Send + 'static> BlockingSink<T> {
    /// Starts `consume`, which gets the chunks in order until [`finish`](Self::finish)
    /// (or returns early: then [`send`](Self::send) says so).
    pub(crate) fn spawn(
        consume: impl FnOnce(&mut dyn Iterator<Item = bytes::Bytes>) -> T + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let worker = tokio::task::spawn_blocking(move || {
            consume(&mut std::iter::from_fn(|| rx.blocking_recv()))
        });
        Self { tx, worker }
    }

    /// Hands `chunk` on, waiting while four are queued; false when `consume` has
    /// returned (it takes no more).
    pub(crate) async fn send(&self, chunk: bytes::Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Ends the input and returns what `consume` made of it.
    pub(crate) async fn finish(self) -> ApiResult<T> {
        drop(self.tx);
        self.worker
            .await
            .map_err(|e| ApiError::internal("a blocking task over a blob's bytes", e))
    }
}

/// Feeds a byte stream to `consume` through a [`BlockingSink`], so reading and the work
/// on the bytes overlap. When `consume` returns early, reading stops. A read error is
/// returned in place of what `consume` made of the bytes before it.
pub(crate) async fn consume_blocking<E, T>(
    mut stream: impl Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    consume: impl FnOnce(&mut dyn Iterator<Item = bytes::Bytes>) -> T + Send + 'static,
) -> ApiResult<T>
where
    ApiError: From<E>,
    T: Send + 'static,
{
    let sink = BlockingSink::spawn(consume);
    let mut read_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if !sink.send(c).await {
                    break;
                }
            }
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    let done = sink.finish().await?;
    match read_error {
        Some(e) => Err(ApiError::from(e)),
        None => Ok(done),
    }
}

/// Streams `file`'s bytes (`segments`, in order), one message per chunk the store reads;
/// the first names the file (an empty file is that message alone).
fn stream_file(
    registry: &Registry,
    file: FileRef,
    segments: Vec<BlobRange>,
) -> impl Stream<Item = Result<v1::ReadFileChunk, Status>> + Send + 'static {
    let mut header = Some(v1::FileEntry::from(&file));
    let chunks = sent_chunks(registry.compose(segments), 0).map(move |c| {
        c.map(|(offset, data)| v1::ReadFileChunk {
            file: header.take(),
            offset,
            data,
        })
    });
    let empty = file.size == 0;
    let named = futures::stream::iter(empty.then(|| {
        Ok(v1::ReadFileChunk {
            file: Some(v1::FileEntry::from(&file)),
            offset: 0,
            data: bytes::Bytes::new(),
        })
    }));
    named.chain(chunks)
}

/// A read's chunks as the blob store yields them (each at most
/// [`READ_CHUNK_SIZE`](patchport_store::blobs::READ_CHUNK_SIZE), small ones coalesced), so
/// the bytes go out without another copy, each with its offset from `start` and counted
/// as pulled; nothing follows an error.
fn sent_chunks<E: Into<Status>>(
    inner: impl Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    start: u64,
) -> impl Stream<Item = Result<(u64, bytes::Bytes), Status>> + Send + 'static {
    let meter = crate::metrics::PullMeter::start();
    futures::stream::unfold(
        (Box::pin(inner), start, false, meter),
        |(mut inner, offset, failed, meter)| async move {
            if failed {
                return None;
            }
            match inner.next().await? {
                Ok(data) => {
                    meter.sent(data.len());
                    let next = offset + data.len() as u64;
                    Some((Ok((offset, data)), (inner, next, false, meter)))
                }
                Err(e) => Some((Err(e.into()), (inner, offset, true, meter))),
            }
        },
    )
}

/// The refusal of a stream idle for `idle`.
fn idle_refusal(what: &str, idle: Duration) -> ApiError {
    ApiError::exhausted(format!(
        "{what} for {} s; the limit is --stream-idle-seconds (PATCHPORT_STREAM_IDLE_SECONDS): resume from the committed offset",
        idle.as_secs()
    ))
}

#[tonic::async_trait]
impl BlobService for Blobs {
    type ReadFileStream = Pin<Box<dyn Stream<Item = Result<v1::ReadFileChunk, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(reference = %req.get_ref().reference, path = %req.get_ref().path, digest = %req.get_ref().digest))]
    async fn read_file(
        &self,
        req: Request<v1::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let source = FileSource::try_from(req.get_ref()).map_err(ApiError::from)?;
        let (file, segments) = self.file_of(req.metadata(), source).await?;
        Ok(Response::new(Box::pin(stream_file(
            &self.registry,
            file,
            segments,
        ))))
    }

    #[tracing::instrument(skip_all, fields(count = req.get_ref().digests.len()))]
    async fn find_missing_blobs(
        &self,
        req: Request<v1::FindMissingBlobsRequest>,
    ) -> Result<Response<v1::FindMissingBlobsResponse>, Status> {
        let who = self.uploader(req.metadata()).await?;
        let FindMissing(digests) = req.get_ref().try_into().map_err(ApiError::from)?;
        // A blob the caller may not see is missing to it, stored or not.
        let visible = self.registry.auth.visible_blobs(&who, &digests).await?;
        let seen: Vec<Digest> = digests
            .iter()
            .copied()
            .filter(|d| visible.contains(d))
            .collect();
        let absent: std::collections::HashSet<Digest> = self
            .registry
            .blobs
            .find_missing(&seen)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .collect();
        let mut once = std::collections::HashSet::new();
        let missing = digests
            .iter()
            .filter(|d| !visible.contains(d) || absent.contains(d))
            .filter(|d| once.insert(**d))
            .map(Digest::to_string)
            .collect();
        Ok(Response::new(v1::FindMissingBlobsResponse { missing }))
    }

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest, size = req.get_ref().size))]
    async fn start_upload(
        &self,
        req: Request<v1::StartUploadRequest>,
    ) -> Result<Response<v1::StartUploadResponse>, Status> {
        let who = self.uploader(req.metadata()).await?;
        let max_chunk = self.registry.limits.max_chunk_bytes;
        let req = StartUpload::try_from(req.get_ref()).map_err(ApiError::from)?;
        let auth = &self.registry.auth;
        let sees = auth.may_read_blob(&who, &req.digest).await?;
        let owner = auth.upload_owner(&who);
        let start = self
            .registry
            .blobs
            .start_upload_as(req.digest, req.size, owner.as_deref(), sees)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(match start {
            UploadStart::Exists { .. } => v1::StartUploadResponse {
                upload_id: String::new(),
                committed_offset: req.size,
                already_exists: true,
                max_chunk_size: max_chunk,
            },
            UploadStart::Session(s) => v1::StartUploadResponse {
                upload_id: s.upload_id,
                committed_offset: s.committed,
                already_exists: false,
                max_chunk_size: max_chunk,
            },
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn upload_chunks(
        &self,
        req: Request<Streaming<v1::UploadChunk>>,
    ) -> Result<Response<v1::UploadChunksResponse>, Status> {
        let who = self.uploader(req.metadata()).await?;
        let limits = self.registry.limits.clone();
        let _permit = self.registry.auth.open_stream(
            &who,
            req.remote_addr(),
            StreamKind::Upload,
            limits.max_upload_streams,
        )?;
        let owner = self.registry.auth.upload_owner(&who);
        let max_chunk = limits.max_chunk_bytes;
        let mut stream = req.into_inner();
        let meter = crate::metrics::PushMeter::start();
        let first = match tokio::time::timeout(limits.stream_idle, stream.message()).await {
            Ok(first) => first.map_err(|s| transport_limit(s, max_chunk))?,
            Err(_) => {
                metrics::counter!(patchport_telemetry::STREAMS_IDLE_CLOSED, "stream" => "upload")
                    .increment(1);
                return Err(idle_refusal("upload stream sent no chunk", limits.stream_idle).into());
            }
        };
        let Some(first) = first else {
            return Err(ApiError::invalid("empty upload stream: send at least one chunk").into());
        };
        let upload_id = first.upload_id.clone();
        let mut writer = self
            .registry
            .blobs
            .upload_writer_as(&upload_id, owner.as_deref())
            .await
            .map_err(ApiError::from)?;
        let mut indexer = crate::ingest::StreamIndexer::start(
            &first.data,
            first.offset,
            writer.committed(),
            writer.size(),
            &limits,
        );
        let mut next = Some(first);
        let mut failure: Option<Status> = None;
        while let Some(chunk) = next.take() {
            if chunk.upload_id != upload_id {
                failure = Some(
                    ApiError::invalid("every chunk of one stream must name the same upload_id")
                        .into(),
                );
                break;
            }
            if chunk.data.len() as u64 > max_chunk {
                failure = Some(
                    ApiError::exhausted(chunk_limit_message(
                        &format!("{} bytes", chunk.data.len()),
                        max_chunk,
                    ))
                    .into(),
                );
                break;
            }
            let len = chunk.data.len();
            let kept = indexer.as_ref().map(|_| chunk.data.clone());
            if let Err(e) = writer.write(chunk.offset, chunk.data).await {
                failure = Some(ApiError::from(e).into());
                break;
            }
            if let (Some(ix), Some(data)) = (indexer.as_mut(), kept)
                && !ix.feed(chunk.offset, data).await
            {
                indexer = None;
            }
            meter.received(len);
            match self.next_chunk(&mut stream, &mut writer).await {
                Ok(m) => next = m,
                Err(status) => {
                    // The client went away (keep what arrived so it can resume), or a
                    // chunk exceeded even the transport's limit.
                    failure = Some(transport_limit(status, max_chunk));
                    break;
                }
            }
        }
        let digest = *writer.digest();
        let committed = writer.flush().await.map_err(ApiError::from)?;
        if let Some(status) = failure {
            return Err(status);
        }
        if let Some(ix) = indexer
            && let Some(index) = ix.finish(&limits).await
        {
            self.registry
                .upload_indexes
                .insert(upload_id, digest, index);
        }
        Ok(Response::new(v1::UploadChunksResponse {
            committed_offset: committed,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_upload(
        &self,
        req: Request<v1::GetUploadRequest>,
    ) -> Result<Response<v1::UploadStatus>, Status> {
        let who = self.uploader(req.metadata()).await?;
        let owner = self.registry.auth.upload_owner(&who);
        let s = self
            .registry
            .blobs
            .upload_status_as(&req.into_inner().upload_id, owner.as_deref())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::UploadStatus {
            upload_id: s.upload_id,
            digest: s.digest.to_string(),
            size: s.size,
            committed_offset: s.committed,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn commit_upload(
        &self,
        req: Request<v1::CommitUploadRequest>,
    ) -> Result<Response<v1::CommitUploadResponse>, Status> {
        let who = self.uploader(req.metadata()).await?;
        let auth = &self.registry.auth;
        let owner = auth.upload_owner(&who);
        let upload_id = req.into_inner().upload_id;
        let blobs = &self.registry.blobs;
        let (digest, _) = blobs
            .upload_declared(&upload_id, owner.as_deref())
            .await
            .map_err(ApiError::from)?;
        // A caller that may not see the blob proves it holds the bytes by this upload.
        let must_prove = !auth.may_read_blob(&who, &digest).await?;
        let indexed = self.registry.upload_indexes.take(&upload_id);
        let out = blobs
            .commit_upload_as(&upload_id, owner.as_deref(), must_prove)
            .await
            .map_err(ApiError::from)?;
        // The bytes the stream indexed are the verified blob: its push reads none back.
        if let Some((_, index)) = indexed.filter(|(d, _)| *d == out.digest)
            && let Err(e) = self.registry.meta.put_blob_index(&out.digest, &index).await
        {
            tracing::warn!(digest = %out.digest, error = %e, "storing an upload's tensor index (its push will index it)");
        }
        auth.record_upload(&who, &out.digest).await?;
        Ok(Response::new(v1::CommitUploadResponse {
            digest: out.digest.to_string(),
            size: out.size,
            deduplicated: out.deduplicated,
        }))
    }

    type ReadBlobStream = Pin<Box<dyn Stream<Item = Result<v1::ReadBlobChunk, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
    async fn read_blob(
        &self,
        req: Request<v1::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let range = ReadRange::try_from(req.get_ref()).map_err(ApiError::from)?;
        self.registry
            .auth
            .require_blob_read(req.metadata(), &range.digest)
            .await?;
        let inner = self
            .registry
            .blobs
            .read(&range.digest, range.offset, range.length)
            .await
            .map_err(ApiError::from)?;
        let stream = sent_chunks(inner.map(|c| c.map_err(ApiError::from)), range.offset)
            .map(|c| c.map(|(offset, data)| v1::ReadBlobChunk { offset, data }));
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest))]
    async fn stat_blob(
        &self,
        req: Request<v1::StatBlobRequest>,
    ) -> Result<Response<v1::StatBlobResponse>, Status> {
        let digest: Digest =
            parse_field("digest", &req.get_ref().digest).map_err(ApiError::from)?;
        let auth = &self.registry.auth;
        let who = auth.principal(req.metadata()).await?;
        if !auth.may_read_blob(&who, &digest).await? {
            // An uploader may stat any digest, and is told what FindMissingBlobs tells
            // it: a blob it may not see is not there for it.
            if auth.may_somewhere(&who, Need::Push) {
                return Err(ApiError::not_found(format!("blob {digest} not found")).into());
            }
            return Err(crate::auth::Auth::blob_refusal(&who, &digest).into());
        }
        match self
            .registry
            .blobs
            .size(&digest)
            .await
            .map_err(ApiError::from)?
        {
            Some(size) => Ok(Response::new(v1::StatBlobResponse {
                digest: digest.to_string(),
                size,
            })),
            None => Err(ApiError::not_found(format!("blob {digest} not found")).into()),
        }
    }
}
