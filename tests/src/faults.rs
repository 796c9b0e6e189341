//! An `ObjectStore` that fails chosen operations on command, to test how the registry
//! behaves when its blob storage breaks.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartId,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use patchport_store::blobs::{BlobStore, MemoryParts};

/// An operation of the wrapped store that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `put` / `put_opts` (session and part records, upload tails, small blobs).
    Put,
    /// Starting a multipart upload (an upload session's start).
    PutMultipart,
    /// Putting a part of a multipart upload (the bytes of an upload).
    PutPart,
    /// Completing a multipart upload (an upload's commit).
    CompleteMultipart,
    /// `head`.
    Head,
    /// A whole-object `get`.
    Get,
    /// A ranged `get` (blob reads, segment reads at commit).
    GetRange,
    /// The body of a `get` breaks off after its first chunk.
    ReadBody,
    /// `copy` / `copy_if_not_exists`.
    Copy,
    /// `list` and `list_with_delimiter`.
    List,
    /// Deletes.
    Delete,
}

/// What a tripped rule makes its call return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    /// `Generic`, what `object_store` returns for network and server failures.
    Failure,
    /// `NotFound`, as for an object deleted under the call.
    NotFound,
}

#[derive(Debug)]
struct Rule {
    op: Op,
    key_contains: String,
    /// Only reads of a range that starts at this byte (`None`: any call of `op`).
    range_start: Option<u64>,
    error: Injected,
    /// Failures left; `None` fails until cleared.
    remaining: Option<usize>,
}

/// The switchboard of a [`FaultyStore`]: which operations fail, and how often they did.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    injected: AtomicUsize,
    ranged_gets: AtomicUsize,
}

impl Faults {
    /// The next `times` calls of `op` fail.
    pub fn fail(&self, op: Op, times: usize) {
        self.add(op, "", Some(times));
    }

    /// Every call of `op` fails until [`clear`](Self::clear).
    pub fn fail_always(&self, op: Op) {
        self.add(op, "", None);
    }

    /// Calls of `op` on keys containing `key_contains` fail (`times` of them, or all).
    pub fn fail_matching(&self, op: Op, key_contains: &str, times: Option<usize>) {
        self.add(op, key_contains, times);
    }

    /// The next `times` reads of a range that starts at byte `start` fail: the GET
    /// (`Op::GetRange`) or its body (`Op::ReadBody`).
    pub fn fail_range(&self, op: Op, start: u64, times: usize) {
        self.push(Rule {
            op,
            key_contains: String::new(),
            range_start: Some(start),
            error: Injected::Failure,
            remaining: Some(times),
        });
    }

    /// The next `times` GETs of a range that starts at byte `start` answer NotFound, as
    /// when the object is deleted under the read.
    pub fn vanish_range(&self, start: u64, times: usize) {
        self.push(Rule {
            op: Op::GetRange,
            key_contains: String::new(),
            range_start: Some(start),
            error: Injected::NotFound,
            remaining: Some(times),
        });
    }

    /// Failures set up but not met yet (rules that fail until cleared not counted).
    pub fn pending(&self) -> usize {
        self.lock().iter().filter_map(|r| r.remaining).sum()
    }

    /// GETs of a range (not heads) so far, failed ones included.
    pub fn ranged_gets(&self) -> usize {
        self.ranged_gets.load(Ordering::SeqCst)
    }

    /// No more failures.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    fn add(&self, op: Op, key_contains: &str, remaining: Option<usize>) {
        self.push(Rule {
            op,
            key_contains: key_contains.to_owned(),
            range_start: None,
            error: Injected::Failure,
            remaining,
        });
    }

    fn push(&self, rule: Rule) {
        self.lock().push(rule);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Consumes a rule that matches a call of `op` on `key` (reading the range that
    /// starts at `range_start`, if a range): the error the call must return, if any.
    fn trip(&self, op: Op, key: &str, range_start: Option<u64>) -> Option<object_store::Error> {
        let mut rules = self.lock();
        let rule = rules.iter_mut().find(|r| {
            r.op == op
                && key.contains(&r.key_contains)
                && r.range_start.is_none_or(|s| Some(s) == range_start)
                && r.remaining != Some(0)
        })?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        Some(match rule.error {
            Injected::Failure => injected(op, key),
            Injected::NotFound => object_store::Error::NotFound {
                path: key.to_owned(),
                source: format!("injected {op:?} fault").into(),
            },
        })
    }

    /// Whether a call of `op` on `key` must fail (consuming the rule that says so).
    fn trips(&self, op: Op, key: &str) -> bool {
        self.trip(op, key, None).is_some()
    }

    fn check(&self, op: Op, key: &Path) -> object_store::Result<()> {
        self.trip(op, key.as_ref(), None).map_or(Ok(()), Err)
    }
}

/// The error a tripped rule returns: `Generic`, what `object_store` returns for network
/// and server failures.
fn injected(op: Op, key: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected {op:?} fault on {key}").into(),
    }
}

/// Wraps a store; every operation first asks its [`Faults`]. Multipart uploads are kept
/// in memory with S3's checks ([`MemoryParts`]) and completed into the wrapped store.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    parts: MemoryParts,
    faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wraps `inner`; returns the store and its switchboard.
    pub fn new(inner: Arc<dyn ObjectStore>) -> (Self, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Self {
                parts: MemoryParts::new(inner.clone()),
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

#[async_trait::async_trait]
impl MultipartStore for FaultyStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.faults.check(Op::PutMultipart, path)?;
        self.parts.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.faults.check(Op::PutPart, path)?;
        self.parts.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        self.faults.check(Op::CompleteMultipart, path)?;
        self.parts.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.faults.check(Op::Delete, path)?;
        self.parts.abort_multipart(path, id).await
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.faults.check(Op::Put, location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.faults.check(Op::PutMultipart, location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head {
            Op::Head
        } else if options.range.is_some() {
            Op::GetRange
        } else {
            Op::Get
        };
        let key = location.to_string();
        let range_start = match &options.range {
            Some(GetRange::Bounded(r)) => Some(r.start),
            Some(GetRange::Offset(o)) => Some(*o),
            _ => None,
        };
        if op == Op::GetRange {
            self.faults.ranged_gets.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(e) = self.faults.trip(op, &key, range_start) {
            return Err(e);
        }
        let result = self.inner.get_opts(location, options).await?;
        if op == Op::Head || self.faults.trip(Op::ReadBody, &key, range_start).is_none() {
            return Ok(result);
        }
        // The body breaks off halfway through its first chunk.
        let (meta, range, attributes, extensions) = (
            result.meta.clone(),
            result.range.clone(),
            result.attributes.clone(),
            result.extensions.clone(),
        );
        let body = result
            .into_stream()
            .take(1)
            .map_ok(|b| b.slice(..b.len() / 2))
            .chain(futures::stream::once(async move {
                Err(injected(Op::ReadBody, &key))
            }))
            .boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.faults.check(Op::GetRange, location)?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let faults = self.faults.clone();
        let checked = locations
            .map(move |l| {
                let l = l?;
                faults.check(Op::Delete, &l)?;
                Ok(l)
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        if self.faults.trips(Op::List, &key) {
            return futures::stream::once(async move { Err(injected(Op::List, &key)) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        if self.faults.trips(Op::List, &key) {
            return Err(injected(Op::List, &key));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.faults.check(Op::Copy, to)?;
        self.inner.copy_opts(from, to, options).await
    }
}

/// A registry over a fault-injecting store on local files, uploads as multipart uploads
/// (as on S3) of 64 KiB parts, so the fixture's model file (517 KiB) is several parts.
pub async fn faulty_registry() -> (crate::TestRegistry, Arc<Faults>, tempfile::TempDir) {
    faulty_registry_with(|blobs| blobs).await
}

/// A [`faulty_registry`] whose blob store `configure` adjusts first (to read in ranges,
/// say).
pub async fn faulty_registry_with(
    configure: impl FnOnce(BlobStore) -> BlobStore,
) -> (crate::TestRegistry, Arc<Faults>, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let local = object_store::local::LocalFileSystem::new_with_prefix(files.path()).unwrap();
    let (faulty, faults) = FaultyStore::new(Arc::new(local));
    let faulty = Arc::new(faulty);
    let blobs = BlobStore::new_multipart(faulty.clone(), faulty, Path::default())
        .with_segment_size(64 << 10)
        .with_min_part_size(64 << 10);
    let blobs = configure(blobs);
    let reg = crate::TestRegistry::start_with_blobs(crate::Backend::Embedded, blobs)
        .await
        .unwrap();
    (reg, faults, files)
}
