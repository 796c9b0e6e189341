//! `patchport.v1.BlobService`.

use std::pin::Pin;

use bytes::BytesMut;
use futures::{Stream, StreamExt};
use patchport_core::Digest;
use patchport_proto::convert::{WireError, parse_field, parse_list};
use patchport_proto::v1::{self, blob_service_server::BlobService};
use patchport_store::blobs::UploadStart;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Need, Principal};
use crate::error::{ApiError, ApiResult};
use crate::state::Registry;

/// Most digests in one FindMissingBlobs call.
const MAX_DIGESTS: usize = 10_000;
/// Size of the chunks ReadBlob sends.
pub(crate) const READ_CHUNK: usize = 1 << 20;

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

impl Blobs {
    /// Uploads (and the existence checks that go with them) need push somewhere, or
    /// the worker scope.
    async fn uploader(&self, md: &tonic::metadata::MetadataMap) -> ApiResult<Principal> {
        self.registry.auth.check_somewhere(md, Need::Push).await
    }

    /// A blob is readable through any version or port that holds it; an uploader may
    /// also stat blobs (FindMissingBlobs tells it as much).
    async fn reader(
        &self,
        md: &tonic::metadata::MetadataMap,
        digest: &Digest,
        stat: bool,
    ) -> ApiResult<()> {
        let auth = &self.registry.auth;
        let who = auth.principal(md).await?;
        if auth.may_read_blob(&who, &digest.to_string()).await? {
            return Ok(());
        }
        // The caller is resolved once; a stat by an uploader needs no second lookup.
        if stat && auth.may_somewhere(&who, Need::Push) {
            return Ok(());
        }
        // The same refusal whether or not the blob exists.
        Err(match who {
            Principal::Anonymous => ApiError::unauthenticated(format!(
                "a token is required to read blob {digest}: set PATCHPORT_TOKEN"
            )),
            other => ApiError::denied(format!(
                "{} may not read blob {digest}: no version it may read holds it",
                other.actor()
            )),
        })
    }
}

#[tonic::async_trait]
impl BlobService for Blobs {
    #[tracing::instrument(skip_all, fields(count = req.get_ref().digests.len()), err)]
    async fn find_missing_blobs(
        &self,
        req: Request<v1::FindMissingBlobsRequest>,
    ) -> Result<Response<v1::FindMissingBlobsResponse>, Status> {
        self.uploader(req.metadata()).await?;
        let FindMissing(digests) = req.get_ref().try_into().map_err(ApiError::from)?;
        let missing = self
            .registry
            .blobs
            .find_missing(&digests)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::FindMissingBlobsResponse {
            missing: missing.iter().map(Digest::to_string).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest, size = req.get_ref().size), err)]
    async fn start_upload(
        &self,
        req: Request<v1::StartUploadRequest>,
    ) -> Result<Response<v1::StartUploadResponse>, Status> {
        self.uploader(req.metadata()).await?;
        let max_chunk = self.registry.limits.max_chunk_bytes;
        let req = StartUpload::try_from(req.get_ref()).map_err(ApiError::from)?;
        let start = self
            .registry
            .blobs
            .start_upload(req.digest, req.size)
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

    #[tracing::instrument(skip_all, err)]
    async fn upload_chunks(
        &self,
        req: Request<Streaming<v1::UploadChunk>>,
    ) -> Result<Response<v1::UploadChunksResponse>, Status> {
        self.uploader(req.metadata()).await?;
        let max_chunk = self.registry.limits.max_chunk_bytes;
        let mut stream = req.into_inner();
        let meter = crate::metrics::PushMeter::start();
        let Some(first) = stream.message().await? else {
            return Err(ApiError::invalid("empty upload stream: send at least one chunk").into());
        };
        let upload_id = first.upload_id.clone();
        let mut writer = self
            .registry
            .blobs
            .upload_writer(&upload_id)
            .await
            .map_err(ApiError::from)?;
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
                    ApiError::exhausted(format!(
                        "chunk of {} bytes; the limit is {max_chunk} (--max-chunk-bytes)",
                        chunk.data.len()
                    ))
                    .into(),
                );
                break;
            }
            let len = chunk.data.len();
            if let Err(e) = writer.write(chunk.offset, chunk.data).await {
                failure = Some(ApiError::from(e).into());
                break;
            }
            meter.received(len);
            match stream.message().await {
                Ok(m) => next = m,
                Err(status) => {
                    // The client went away: keep what arrived so it can resume.
                    failure = Some(status);
                    break;
                }
            }
        }
        let committed = writer.flush().await.map_err(ApiError::from)?;
        if let Some(status) = failure {
            return Err(status);
        }
        Ok(Response::new(v1::UploadChunksResponse {
            committed_offset: committed,
        }))
    }

    #[tracing::instrument(skip_all, err)]
    async fn get_upload(
        &self,
        req: Request<v1::GetUploadRequest>,
    ) -> Result<Response<v1::UploadStatus>, Status> {
        self.uploader(req.metadata()).await?;
        let s = self
            .registry
            .blobs
            .upload_status(&req.into_inner().upload_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::UploadStatus {
            upload_id: s.upload_id,
            digest: s.digest.to_string(),
            size: s.size,
            committed_offset: s.committed,
        }))
    }

    #[tracing::instrument(skip_all, err)]
    async fn commit_upload(
        &self,
        req: Request<v1::CommitUploadRequest>,
    ) -> Result<Response<v1::CommitUploadResponse>, Status> {
        self.uploader(req.metadata()).await?;
        let out = self
            .registry
            .blobs
            .commit_upload(&req.into_inner().upload_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::CommitUploadResponse {
            digest: out.digest.to_string(),
            size: out.size,
            deduplicated: out.deduplicated,
        }))
    }

    type ReadBlobStream = Pin<Box<dyn Stream<Item = Result<v1::ReadBlobChunk, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest), err)]
    async fn read_blob(
        &self,
        req: Request<v1::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let range = ReadRange::try_from(req.get_ref()).map_err(ApiError::from)?;
        self.reader(req.metadata(), &range.digest, false).await?;
        let inner = self
            .registry
            .blobs
            .read(&range.digest, range.offset, range.length)
            .await
            .map_err(ApiError::from)?;
        let start = range.offset;
        // Re-chunk to READ_CHUNK-sized messages whatever the backend's chunking.
        let meter = crate::metrics::PullMeter::start();
        let stream = futures::stream::unfold(
            (inner, BytesMut::new(), start, false, meter),
            |(mut inner, mut buf, mut offset, done, meter)| async move {
                if done {
                    return None;
                }
                loop {
                    if buf.len() >= READ_CHUNK {
                        let data = buf.split_to(READ_CHUNK).freeze();
                        let msg = v1::ReadBlobChunk {
                            offset,
                            data: data.clone(),
                        };
                        offset += data.len() as u64;
                        meter.sent(data.len());
                        return Some((Ok(msg), (inner, buf, offset, false, meter)));
                    }
                    match inner.next().await {
                        Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                        Some(Err(e)) => {
                            let status: Status = ApiError::from(e).into();
                            return Some((Err(status), (inner, buf, offset, true, meter)));
                        }
                        None => {
                            if buf.is_empty() {
                                return None;
                            }
                            let data = buf.split().freeze();
                            let msg = v1::ReadBlobChunk {
                                offset,
                                data: data.clone(),
                            };
                            offset += data.len() as u64;
                            meter.sent(data.len());
                            return Some((Ok(msg), (inner, buf, offset, true, meter)));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(digest = %req.get_ref().digest), err)]
    async fn stat_blob(
        &self,
        req: Request<v1::StatBlobRequest>,
    ) -> Result<Response<v1::StatBlobResponse>, Status> {
        let digest: Digest =
            parse_field("digest", &req.get_ref().digest).map_err(ApiError::from)?;
        self.reader(req.metadata(), &digest, true).await?;
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
