//! The port worker: runs the engine on versions stored in a registry, reading bytes with
//! ranged `ReadBlob` calls and storing merged tensors with blob uploads, and describes
//! the artifacts as files of blob ranges for the registry to verify and record.
//!
//! Architecture invariant: a worker speaks only the gRPC API (`patchport-client`); it
//! holds no database or object-store credentials, so it can run on any GPU host. The
//! lease loop (LeaseJob, Heartbeat, CompleteJob) drives [`port_job`]; this crate never
//! decides what to port, only how.

pub mod cache;
pub mod gate;
mod run;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use patchport_client::{Client, ClientError};
use patchport_core::Digest;
use patchport_core::layout::{ADAPTER_CONFIG, BlobRange, DeclaredFile, FileRef};
use patchport_core::port::{MAX_INLINE_BLOBS, PortDiagnostics, Refusal, ReusedTensor};
use patchport_engine::artifact::{base_prefix, compose_ranges};
use patchport_engine::{ComposedFile, Device, MergedSink, ModelSource, PortOptions};
use patchport_proto::convert::{WireError, parse_field, try_list};
use patchport_proto::v1;
use tokio::runtime::Handle;

pub use run::{DEFAULT_CACHE_BYTES, DEFAULT_LEASE_BATCH, LEASE_AHEAD, WorkerConfig, run};

/// A port attempt in this worker from its lease to its outcome; the name and its
/// description are `patchport-telemetry`'s, so a registry with in-process workers reports
/// it apart from the registry's own port duration.
pub use patchport_telemetry::WORKER_PORT_DURATION as PORT_DURATION;

/// A worker failure (the job is failed and retried; refusals are not failures).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The registry refused or failed a call.
    #[error("registry call failed: {source}")]
    Registry {
        /// The cause.
        #[from]
        source: ClientError,
    },
    /// The job message is not usable.
    #[error("bad job: {message}")]
    BadJob {
        /// What is wrong.
        message: String,
    },
    /// The engine failed (bad bytes, IO).
    #[error("port failed: {source}")]
    Engine {
        /// The cause.
        #[from]
        source: patchport_engine::EngineError,
    },
    /// The blocking task died.
    #[error("port task failed: {message}")]
    Task {
        /// What happened.
        message: String,
    },
}

impl From<WireError> for WorkerError {
    /// A job message whose fields do not parse is a bad job (not retried).
    fn from(e: WireError) -> Self {
        WorkerError::BadJob {
            message: e.to_string(),
        }
    }
}

/// What a port produced, ready for `CompleteJob`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortResult {
    /// Why the patch cannot be ported (empty when it was).
    pub refusals: Vec<Refusal>,
    /// Diagnostics (when ported).
    pub diagnostics: Option<PortDiagnostics>,
    /// The ported adapter's files: the patch's own blobs and the re-pointed config.
    pub adapter_files: Vec<FileRef>,
    /// The merged model's files: whole base blobs, or composed from blob ranges with no
    /// digest (the registry hashes the composed bytes itself).
    pub merged_files: Vec<DeclaredFile>,
    /// Engine wall time.
    pub engine_seconds: f64,
    /// The quality gate's result (set by the lease loop after a successful port).
    pub evaluation: Option<v1::Evaluation>,
    /// Small blobs the files name, sent with the completion instead of uploaded.
    pub inline_blobs: Vec<Bytes>,
}

impl PortResult {
    /// The `CompleteJob` request that reports this result for the attempt holding
    /// `fencing_token`: the one place a port's outcome meets the wire.
    pub fn into_request(self, job_id: String, fencing_token: i64) -> v1::CompleteJobRequest {
        v1::CompleteJobRequest {
            job_id,
            fencing_token,
            refusals: self.refusals.iter().map(Into::into).collect(),
            diagnostics: self.diagnostics.as_ref().map(Into::into),
            adapter_files: self.adapter_files.iter().map(Into::into).collect(),
            merged_files: self.merged_files.iter().map(Into::into).collect(),
            engine_seconds: self.engine_seconds,
            evaluation: self.evaluation,
            inline_blobs: self.inline_blobs,
            ..Default::default()
        }
    }
}

/// What a worker keeps across its jobs: the tensor cache, the tensor indexes of the base
/// versions it has ported against and the leading bytes (headers, small files) of base
/// blobs. Everything here is keyed by digest, so nothing in it goes stale.
#[derive(Debug, Default)]
pub struct WorkerState {
    cache: Option<cache::TensorCache>,
    indexes: Mutex<HashMap<Digest, Arc<TensorIndex>>>,
    prefixes: Mutex<Prefixes>,
    /// The composed beginnings this worker has told the registry about
    /// (`PrepareComposed`), by a digest of the beginning: the registry keeps their
    /// states, so later ports of the same base and targets need not say them again.
    prepared: Mutex<HashSet<Digest>>,
}

/// How many composed beginnings a worker remembers having told the registry about.
const MAX_PREPARED: usize = 1024;

/// A base version's tensor digests, by tensor and by byte range.
#[derive(Debug, Default)]
struct TensorIndex {
    by_name: HashMap<(String, String), Digest>,
    by_range: HashMap<(String, u64, u64), Digest>,
}

/// The leading bytes of base blobs read so far (safetensors headers, configs), bounded.
#[derive(Debug, Default)]
struct Prefixes {
    map: HashMap<Digest, Bytes>,
    bytes: usize,
}

/// The longest leading read of a base blob that is kept in memory.
const MAX_PREFIX: u64 = 16 << 20;
/// What all kept leading reads may take together.
const MAX_PREFIXES: usize = 256 << 20;
/// A patch file up to this size is read whole with one call, then sliced.
const MAX_WHOLE_PATCH_FILE: u64 = 512 << 20;

impl WorkerState {
    /// A state with the tensor cache at `dir` holding at most `max_bytes` (no cache
    /// when `max_bytes` is 0).
    pub fn with_cache(dir: &std::path::Path, max_bytes: u64) -> io::Result<Self> {
        let cache = if max_bytes == 0 {
            None
        } else {
            Some(cache::TensorCache::open(dir, max_bytes)?)
        };
        Ok(Self {
            cache,
            ..Self::default()
        })
    }

    /// The cache, when there is one.
    pub fn cache(&self) -> Option<&cache::TensorCache> {
        self.cache.as_ref()
    }

    /// The base versions this worker holds, most cached tensors first: what a lease
    /// request names so that the queue prefers jobs on them.
    pub fn held_versions(&self) -> Vec<String> {
        let Some(cache) = &self.cache else {
            return Vec::new();
        };
        let indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<(usize, Digest)> = indexes
            .iter()
            .map(|(v, i)| (i.by_name.values().filter(|d| cache.contains(d)).count(), *v))
            .filter(|(n, _)| *n > 0)
            .collect();
        held.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.hex().cmp(&b.1.hex())));
        held.into_iter()
            .take(16)
            .map(|(_, d)| d.to_string())
            .collect()
    }

    /// A base version's tensor index, read once.
    async fn index(
        &self,
        client: &Client,
        name: &str,
        digest: Digest,
    ) -> Result<Arc<TensorIndex>, WorkerError> {
        if let Some(i) = self
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
        {
            return Ok(i.clone());
        }
        let index = client
            .registry()
            .get_tensor_index(v1::GetVersionRequest {
                reference: format!("{name}@{digest}"),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        let mut out = TensorIndex::default();
        for (i, t) in index.tensors.into_iter().enumerate() {
            let d = parse_field(&format!("tensors[{i}].digest"), &t.digest)?;
            out.by_range.insert((t.file.clone(), t.begin, t.end), d);
            out.by_name.insert((t.file, t.name), d);
        }
        let out = Arc::new(out);
        self.indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, out.clone());
        Ok(out)
    }

    fn prefix(&self, blob: &Digest, end: u64) -> Option<Bytes> {
        let p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        p.map
            .get(blob)
            .filter(|b| b.len() as u64 >= end)
            .map(|b| b.slice(..end as usize))
    }

    /// Whether the composed beginning `key` is new to this worker (remembering it).
    fn first_prepare(&self, key: Digest) -> bool {
        let mut p = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= MAX_PREPARED && !p.contains(&key) {
            p.clear();
        }
        p.insert(key)
    }

    fn keep_prefix(&self, blob: Digest, bytes: Bytes) {
        let mut p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        if p.bytes + bytes.len() > MAX_PREFIXES {
            p.map.clear();
            p.bytes = 0;
        }
        p.bytes += bytes.len();
        if let Some(old) = p.map.insert(blob, bytes) {
            p.bytes -= old.len();
        }
    }
}

/// Reads bytes `[begin, end)` of a blob with one `ReadBlob` call.
async fn read_blob_range(
    client: &Client,
    digest: Digest,
    begin: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    buf.clear();
    if end <= begin {
        return Ok(());
    }
    buf.reserve((end - begin) as usize);
    let mut stream = client
        .blobs()
        .read_blob(v1::ReadBlobRequest {
            digest: digest.to_string(),
            offset: begin,
            length: end - begin,
        })
        .await
        .map_err(io::Error::other)?
        .into_inner();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(io::Error::other)?.data);
    }
    if buf.len() as u64 != end - begin {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read of blob {digest}"),
        ));
    }
    Ok(())
}

/// What a source is: a base (tensors through the cache, headers kept) or a patch (small
/// files read whole).
#[derive(Debug)]
enum SourceKind {
    Base(Arc<TensorIndex>),
    Patch(Mutex<HashMap<String, Bytes>>),
}

/// A version in the registry, read from a blocking thread: base tensors through the
/// worker's cache, anything else with ranged `ReadBlob` calls.
#[derive(Debug)]
struct RemoteSource {
    name: String,
    handle: Handle,
    client: Client,
    files: BTreeMap<String, (Digest, u64)>,
    kind: SourceKind,
    state: Arc<WorkerState>,
}

/// The manifest digest and the files of one of a job's versions (`field`: `patch`,
/// `source_base`, `target_base`).
fn version_files(
    field: &str,
    digest: &str,
    files: &[v1::FileEntry],
) -> Result<(Digest, Vec<FileRef>), WireError> {
    let digest = parse_field("digest", digest).map_err(|e| e.within(field))?;
    let files = try_list("files", files).map_err(|e| e.within(field))?;
    Ok((digest, files))
}

impl RemoteSource {
    /// A base version (its tensor index is read once per worker).
    async fn base(
        client: &Client,
        state: &Arc<WorkerState>,
        name: &str,
        version: &str,
        digest: Digest,
        files: &[FileRef],
    ) -> Result<Self, WorkerError> {
        let index = state.index(client, name, digest).await?;
        Ok(Self::new(
            client,
            state,
            name,
            version,
            files,
            SourceKind::Base(index),
        ))
    }

    /// A patch version (the engine needs no tensor digests of a patch).
    fn patch(
        client: &Client,
        state: &Arc<WorkerState>,
        name: &str,
        version: &str,
        files: &[FileRef],
    ) -> Self {
        let kind = SourceKind::Patch(Mutex::default());
        Self::new(client, state, name, version, files, kind)
    }

    fn new(
        client: &Client,
        state: &Arc<WorkerState>,
        name: &str,
        version: &str,
        files: &[FileRef],
        kind: SourceKind,
    ) -> Self {
        Self {
            name: format!("{name}:{version}"),
            handle: Handle::current(),
            client: client.clone(),
            files: files
                .iter()
                .map(|f| (f.path.clone(), (f.digest, f.size)))
                .collect(),
            kind,
            state: state.clone(),
        }
    }

    /// Holds the patch files' bytes that came with the lease (in the order of `files`),
    /// each only when its digest and size are its file's: those files are then read
    /// without a ReadBlob call. Anything else is read from the registry as usual.
    fn hold_patch_bytes(&self, files: &[FileRef], bytes: &[Bytes]) {
        let SourceKind::Patch(whole) = &self.kind else {
            return;
        };
        if bytes.len() != files.len() {
            return;
        }
        let mut whole = whole.lock().unwrap_or_else(|e| e.into_inner());
        for (f, b) in files.iter().zip(bytes) {
            if b.len() as u64 == f.size && Digest::of(b) == f.digest {
                whole.insert(f.path.clone(), b.clone());
            } else {
                tracing::warn!(path = %f.path, "a patch file that came with the lease does not match its digest; reading it");
            }
        }
    }

    fn file(&self, path: &str) -> io::Result<(Digest, u64)> {
        self.files.get(path).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no file {path}", self.name),
            )
        })
    }

    fn remote(&self, digest: Digest, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        self.handle
            .block_on(read_blob_range(&self.client, digest, begin, end, buf))
    }
}

impl ModelSource for RemoteSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn files(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    fn file_size(&self, path: &str) -> io::Result<u64> {
        Ok(self.file(path)?.1)
    }

    fn read_range(&self, path: &str, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let (digest, size) = self.file(path)?;
        buf.clear();
        if end <= begin {
            return Ok(());
        }
        if end > size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {path} has {size} bytes, {end} asked", self.name),
            ));
        }
        match &self.kind {
            SourceKind::Patch(whole) if size <= MAX_WHOLE_PATCH_FILE => {
                let held = whole
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(path)
                    .cloned();
                let bytes = match held {
                    Some(b) => b,
                    None => {
                        let mut all = Vec::new();
                        self.remote(digest, 0, size, &mut all)?;
                        let all = Bytes::from(all);
                        whole
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(path.to_owned(), all.clone());
                        all
                    }
                };
                buf.extend_from_slice(&bytes[begin as usize..end as usize]);
                Ok(())
            }
            SourceKind::Patch(_) => self.remote(digest, begin, end, buf),
            SourceKind::Base(index) => {
                if let (Some(cache), Some(tensor)) = (
                    &self.state.cache,
                    index.by_range.get(&(path.to_owned(), begin, end)),
                ) {
                    let from = cache::BlobRange {
                        blob: digest,
                        begin,
                        end,
                    };
                    if self
                        .handle
                        .block_on(cache.read(&self.client, *tensor, from, buf))?
                    {
                        return Ok(());
                    }
                }
                if begin == 0 && end <= MAX_PREFIX {
                    if let Some(b) = self.state.prefix(&digest, end) {
                        buf.extend_from_slice(&b);
                        return Ok(());
                    }
                    self.remote(digest, begin, end, buf)?;
                    self.state.keep_prefix(digest, Bytes::copy_from_slice(buf));
                    return Ok(());
                }
                self.remote(digest, begin, end, buf)
            }
        }
    }

    fn tensor_digest(&self, path: &str, tensor: &str) -> Option<Digest> {
        match &self.kind {
            SourceKind::Base(index) => index
                .by_name
                .get(&(path.to_owned(), tensor.to_owned()))
                .copied(),
            SourceKind::Patch(_) => None,
        }
    }
}

/// How many merged tensors are uploaded at once while the engine goes on.
const UPLOADS_IN_FLIGHT: usize = 4;

/// A blob on its way to the registry.
#[derive(Debug)]
enum Outgoing {
    /// Sent with the completion.
    Inline(Digest),
    /// Being uploaded.
    Upload(tokio::task::JoinHandle<Result<Digest, ClientError>>),
}

/// A job's attempt, the target base's files by path and the worker's state: what
/// [`Outbox`] needs to tell the registry how the job's composed files begin.
#[derive(Debug)]
struct Prepare {
    job_id: String,
    fencing_token: i64,
    base_files: HashMap<String, Digest>,
    state: Arc<WorkerState>,
}

/// Where a port's new blobs go: small ones ride with the completion (up to
/// [`MAX_INLINE_BLOBS`] together), the rest are uploaded, a few at a time while the engine
/// goes on.
#[derive(Debug)]
struct Outbox {
    handle: Handle,
    client: Client,
    slots: Arc<tokio::sync::Semaphore>,
    inline: Vec<Bytes>,
    inline_bytes: usize,
    /// Merged tensors by name, with their sizes.
    tensors: Vec<(String, u64, Outgoing)>,
    /// What `PrepareComposed` needs.
    job: Prepare,
    /// The `PrepareComposed` call, awaited before the job completes.
    prepared: Option<tokio::task::JoinHandle<()>>,
}

impl Outbox {
    /// An outbox for `job` that, once the port is planned, tells the registry how the
    /// job's composed files begin (`PrepareComposed`), so it hashes those bytes while the
    /// port runs; only beginnings this worker has not told it about before.
    fn for_job(
        client: &Client,
        job: &v1::Job,
        base_files: &[FileRef],
        state: &Arc<WorkerState>,
    ) -> Self {
        Self {
            handle: Handle::current(),
            client: client.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT)),
            inline: Vec::new(),
            inline_bytes: 0,
            tensors: Vec::new(),
            job: Prepare {
                job_id: job.job_id.clone(),
                fencing_token: job.fencing_token,
                base_files: base_files
                    .iter()
                    .map(|f| (f.path.clone(), f.digest))
                    .collect(),
                state: state.clone(),
            },
            prepared: None,
        }
    }

    /// Keeps `bytes` inline when they fit the budget.
    fn try_inline(&mut self, bytes: &[u8]) -> Option<Digest> {
        if self.inline_bytes + bytes.len() > MAX_INLINE_BLOBS {
            return None;
        }
        self.inline_bytes += bytes.len();
        self.inline.push(Bytes::copy_from_slice(bytes));
        Some(Digest::of(bytes))
    }

    /// Stores a small blob from async code: inline, or uploaded now.
    async fn put(&mut self, bytes: Bytes) -> Result<Digest, ClientError> {
        match self.try_inline(&bytes) {
            Some(d) => Ok(d),
            None => self.client.upload_bytes(bytes).await,
        }
    }

    /// Waits for every upload (and the `PrepareComposed` call): the stored tensors by
    /// name.
    async fn tensors(&mut self) -> Result<HashMap<String, (Digest, u64)>, WorkerError> {
        if let Some(call) = self.prepared.take() {
            // A hint: whatever became of it, CompleteJob hashes what it must.
            let _ = call.await;
        }
        let mut stored = HashMap::new();
        for (name, size, out) in self.tensors.drain(..) {
            let digest = match out {
                Outgoing::Inline(d) => d,
                Outgoing::Upload(task) => task.await.map_err(|e| WorkerError::Task {
                    message: e.to_string(),
                })??,
            };
            stored.insert(name, (digest, size));
        }
        Ok(stored)
    }
}

impl MergedSink for Outbox {
    fn planned(&mut self, files: &[ComposedFile]) {
        let Prepare {
            job_id,
            fencing_token,
            base_files,
            state,
        } = &self.job;
        let files: Vec<v1::ComposedPrefix> = files
            .iter()
            .filter_map(|c| {
                let ranges = base_prefix(c, |p| base_files.get(p).copied())?;
                // The key the registry keeps the beginning's state under.
                let run: Vec<BlobRange> = std::iter::once(BlobRange::of_bytes(&c.header))
                    .chain(ranges.iter().cloned())
                    .collect();
                state
                    .first_prepare(BlobRange::run_key(&run))
                    .then(|| v1::ComposedPrefix {
                        header: Bytes::from(c.header.clone()),
                        ranges: ranges.iter().map(v1::BlobRange::from).collect(),
                    })
            })
            .collect();
        if files.is_empty() {
            return;
        }
        let request = v1::PrepareComposedRequest {
            job_id: job_id.clone(),
            fencing_token: *fencing_token,
            files,
        };
        let client = self.client.clone();
        self.prepared = Some(self.handle.spawn(async move {
            match client.workers().prepare_composed(request).await {
                Ok(r) => tracing::debug!(
                    bytes = r.get_ref().hashing_bytes,
                    "the registry hashes the composed files' beginnings ahead"
                ),
                Err(e) => tracing::debug!(error = %e, "PrepareComposed failed; CompleteJob hashes everything"),
            }
        }));
    }

    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let out = match self.try_inline(bytes) {
            Some(d) => Outgoing::Inline(d),
            None => {
                let permit = self
                    .handle
                    .block_on(self.slots.clone().acquire_owned())
                    .map_err(io::Error::other)?;
                let (client, data) = (self.client.clone(), Bytes::copy_from_slice(bytes));
                Outgoing::Upload(self.handle.spawn(async move {
                    let r = client.upload_bytes(data).await;
                    drop(permit);
                    r
                }))
            }
        };
        self.tensors
            .push((name.to_owned(), bytes.len() as u64, out));
        Ok(())
    }
}

/// Ports the job's patch onto its target base: reads through the registry, uploads the
/// merged tensors, the re-pointed adapter config and the merged files' headers, and
/// returns what `CompleteJob` needs.
pub async fn port_job(
    client: &Client,
    job: &v1::Job,
    device: Device,
) -> Result<PortResult, WorkerError> {
    port_job_with(client, job, device, &Arc::new(WorkerState::default())).await
}

/// [`port_job`] with what the worker keeps across jobs (its tensor cache, indexes and
/// headers).
pub async fn port_job_with(
    client: &Client,
    job: &v1::Job,
    device: Device,
    state: &Arc<WorkerState>,
) -> Result<PortResult, WorkerError> {
    let missing = |what: &str| WorkerError::BadJob {
        message: format!("job {} has no {what}", job.job_id),
    };
    let patch = job.patch.as_ref().ok_or_else(|| missing("patch"))?;
    let source = job
        .source_base
        .as_ref()
        .ok_or_else(|| missing("source base"))?;
    let target = job
        .target_base
        .as_ref()
        .ok_or_else(|| missing("target base"))?;
    let (source_digest, source_files) =
        version_files("source_base", &source.digest, &source.files)?;
    let (target_digest, target_files) =
        version_files("target_base", &target.digest, &target.files)?;
    let (_, patch_files) = version_files("patch", &patch.digest, &patch.files)?;
    let (old, new) = futures::try_join!(
        RemoteSource::base(
            client,
            state,
            &source.name,
            &source.version,
            source_digest,
            &source_files,
        ),
        RemoteSource::base(
            client,
            state,
            &target.name,
            &target.version,
            target_digest,
            &target_files,
        ),
    )?;
    let adapter = RemoteSource::patch(client, state, &patch.name, &patch.version, &patch_files);
    adapter.hold_patch_bytes(&patch_files, &job.patch_file_bytes);
    // Merged tensors an earlier port of this patch already stored (only a merged port
    // can name them in its files).
    let reuse: Vec<ReusedTensor> = try_list("reused_tensors", &job.reused_tensors)?;
    let opts = PortOptions {
        merged: job.merged,
        device,
        new_base_name: Some(format!("{}:{}", target.name, target.version)),
        new_base_revision: Some(target_digest.to_string()),
        reuse: if job.merged {
            reuse.into_iter().map(|r| (r.tensor.clone(), r)).collect()
        } else {
            BTreeMap::new()
        },
    };
    let reuse = opts.reuse.clone();
    let mut sink = Outbox::for_job(client, job, &target_files, state);
    let (outcome, sink) = tokio::task::spawn_blocking(move || {
        let sink_ref = if opts.merged {
            Some(&mut sink as &mut dyn MergedSink)
        } else {
            None
        };
        let outcome = patchport_engine::port(&old, &new, &adapter, &opts, sink_ref);
        (outcome, sink)
    })
    .await
    .map_err(|e| WorkerError::Task {
        message: e.to_string(),
    })?;
    let mut sink = sink;
    let mut stored = sink.tensors().await?;
    let outcome = outcome?;
    let computed = stored.len();
    metrics::counter!(patchport_telemetry::WORKER_TENSORS_MERGED).increment(computed as u64);
    if !outcome.reused.is_empty() {
        let mut bytes = 0;
        for t in &outcome.reused {
            let r = &reuse[t];
            bytes += r.size;
            stored.insert(t.clone(), (r.digest, r.size));
        }
        metrics::counter!(patchport_telemetry::WORKER_TENSORS_REUSED)
            .increment(outcome.reused.len() as u64);
        tracing::info!(
            job_id = %job.job_id,
            reused = outcome.reused.len(),
            computed,
            bytes,
            "merged tensors reused from an earlier port"
        );
    }
    let mut result = PortResult {
        refusals: outcome.refusals,
        engine_seconds: outcome.timings.total_s,
        ..PortResult::default()
    };
    let Some(ported) = &outcome.adapter else {
        return Ok(result);
    };
    result.diagnostics = Some(outcome.diagnostics);
    // The re-pointed config and the merged files' headers.
    let config = Bytes::from(ported.config_json.clone());
    let config_digest = sink.put(config.clone()).await?;
    let merged = outcome.merged.as_deref().unwrap_or_default();
    let mut headers = Vec::with_capacity(merged.len());
    for c in merged {
        headers.push(if c.header.is_empty() {
            None
        } else {
            Some(sink.put(Bytes::from(c.header.clone())).await?)
        });
    }
    for mut f in patch_files {
        if f.path == ADAPTER_CONFIG {
            f.digest = config_digest;
            f.size = config.len() as u64;
        }
        result.adapter_files.push(f);
    }
    let base_files: HashMap<&str, Digest> = target_files
        .iter()
        .map(|f| (f.path.as_str(), f.digest))
        .collect();
    result.inline_blobs = std::mem::take(&mut sink.inline);
    for (c, header) in merged.iter().zip(headers) {
        let segments = compose_ranges(c, header, |p| base_files.get(p).copied(), &stored)
            .map_err(|message| WorkerError::BadJob { message })?;
        // A file that is one whole base blob is that blob; anything else is composed.
        let whole = match segments.as_slice() {
            [s] if s.offset == 0 => target_files
                .iter()
                .find(|f| f.digest == s.digest && f.size == s.length),
            _ => None,
        };
        result.merged_files.push(match whole {
            Some(f) => DeclaredFile::Blob(FileRef {
                path: c.path.clone(),
                digest: f.digest,
                size: f.size,
            }),
            None => DeclaredFile::Composed {
                path: c.path.clone(),
                size: c.len(),
                segments,
            },
        });
    }
    Ok(result)
}
