//! What makes a set of files a base version or a patch version: path rules, required
//! files, the sharded-model index, canonical manifest digests, and the streaming tensor
//! indexer that hashes every tensor of a safetensors file in one pass.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::safetensors::{self, Dtype, Header, SafetensorsError, TensorInfo};

/// Longest file path in a version, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// The adapter config of a PEFT directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter weights of a PEFT directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// A base's model config.
pub const MODEL_CONFIG: &str = "config.json";
/// The index of a sharded safetensors model.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// A file set that is not a valid base or patch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A path that is absolute, escapes the root, or has bad characters.
    #[error("invalid file path {path:?}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The same path twice.
    #[error("file {path:?} is listed twice")]
    Duplicate {
        /// The path.
        path: String,
    },
    /// A required file is absent.
    #[error("missing {file}: {hint}")]
    Missing {
        /// The file.
        file: &'static str,
        /// What the user should do.
        hint: &'static str,
    },
    /// The shard index is not valid.
    #[error("bad {SHARD_INDEX}: {message}")]
    BadShardIndex {
        /// What is wrong.
        message: String,
    },
}

/// Checks one relative path: `/`-separated, no empty, `.` or `..` components, no
/// backslashes or control characters.
pub fn validate_path(path: &str) -> Result<(), LayoutError> {
    let bad = |reason| {
        Err(LayoutError::BadPath {
            path: path.chars().take(200).collect(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("longer than 1024 bytes");
    }
    if path.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    if path.chars().any(|c| c == '\\' || c.is_control()) {
        return bad("backslashes and control characters are not allowed");
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("empty, '.' and '..' components are not allowed");
        }
        if part.len() > 255 {
            return bad("a component is longer than 255 bytes");
        }
    }
    Ok(())
}

/// One file of a version, as declared by a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Relative path.
    pub path: String,
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// Validates the paths of a file list and sorts it by path.
pub fn normalize_files(mut files: Vec<FileRef>) -> Result<Vec<FileRef>, LayoutError> {
    for f in &files {
        validate_path(&f.path)?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = files.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(LayoutError::Duplicate {
            path: w[0].path.clone(),
        });
    }
    Ok(files)
}

/// The digest that identifies a version's content: sha256 over its sorted
/// `path\0digest\0size\n` lines (plus the kind, so a base and a patch never collide).
pub fn manifest_digest(kind: &str, files: &[FileRef]) -> Digest {
    let mut h = Hasher::new();
    h.update(b"patchport-manifest-v1\0");
    h.update(kind.as_bytes());
    h.update(b"\n");
    for f in files {
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(f.digest.to_string().as_bytes());
        h.update(b"\0");
        h.update(f.size.to_string().as_bytes());
        h.update(b"\n");
    }
    h.finish()
}

/// True for a safetensors weights file (indexed at push).
pub fn is_safetensors(path: &str) -> bool {
    path.ends_with(".safetensors")
}

/// Checks that a file list is a Hugging Face model directory.
pub fn check_base_files(files: &[FileRef]) -> Result<(), LayoutError> {
    check_base_paths(&files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>())
}

/// Checks that a file list is a PEFT adapter directory.
pub fn check_patch_files(files: &[FileRef]) -> Result<(), LayoutError> {
    check_patch_paths(&files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>())
}

/// [`check_base_files`] on paths alone (a client checks a directory before hashing or
/// sending anything).
pub fn check_base_paths(files: &[&str]) -> Result<(), LayoutError> {
    if !files.contains(&MODEL_CONFIG) {
        return Err(LayoutError::Missing {
            file: MODEL_CONFIG,
            hint: "a base version is a Hugging Face model directory with config.json at its root",
        });
    }
    if !files.iter().any(|f| is_safetensors(f)) {
        return Err(LayoutError::Missing {
            file: "*.safetensors",
            hint: "a base version needs its weights as one or more .safetensors files",
        });
    }
    Ok(())
}

/// [`check_patch_files`] on paths alone.
pub fn check_patch_paths(files: &[&str]) -> Result<(), LayoutError> {
    if !files.contains(&ADAPTER_CONFIG) {
        return Err(LayoutError::Missing {
            file: ADAPTER_CONFIG,
            hint: "a patch is a PEFT adapter directory (save_pretrained output) with adapter_config.json at its root",
        });
    }
    if !files.contains(&ADAPTER_WEIGHTS) {
        return Err(LayoutError::Missing {
            file: ADAPTER_WEIGHTS,
            hint: "a patch needs its weights in adapter_model.safetensors",
        });
    }
    Ok(())
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// Tensor name to shard file.
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Parses the index JSON.
    pub fn parse(bytes: &[u8]) -> Result<Self, LayoutError> {
        #[derive(Deserialize)]
        struct Raw {
            weight_map: BTreeMap<String, String>,
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| LayoutError::BadShardIndex {
            message: e.to_string(),
        })?;
        Ok(Self {
            weight_map: raw.weight_map,
        })
    }

    /// Checks the index against the files and their tensor lists: every named shard is
    /// in the version, and every mapped tensor is in the shard the index names.
    pub fn check(&self, shards: &BTreeMap<String, BTreeSet<String>>) -> Result<(), LayoutError> {
        for (tensor, file) in &self.weight_map {
            let Some(names) = shards.get(file) else {
                return Err(LayoutError::BadShardIndex {
                    message: format!(
                        "tensor {tensor:?} is mapped to {file:?}, which is not among the pushed .safetensors files"
                    ),
                });
            };
            if !names.contains(tensor) {
                return Err(LayoutError::BadShardIndex {
                    message: format!(
                        "tensor {tensor:?} is mapped to {file:?}, which does not contain it"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// One indexed tensor: where it is and what its bytes hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute `[begin, end)` in the file.
    pub begin: u64,
    /// End of the range.
    pub end: u64,
    /// sha256 of the tensor's bytes.
    pub digest: Digest,
    /// Number of NaN or infinite elements (floating dtypes).
    pub non_finite: u64,
}

/// Hashes every tensor of a safetensors file while its bytes stream past, once.
#[derive(Debug)]
pub struct TensorIndexer {
    file_size: u64,
    pos: u64,
    prefix: Vec<u8>,
    header: Option<Header>,
    next: usize,
    hasher: Hasher,
    carry: Vec<u8>,
    non_finite: u64,
    records: Vec<TensorRecord>,
}

impl TensorIndexer {
    /// An indexer for a file of `file_size` bytes.
    pub fn new(file_size: u64) -> Self {
        Self {
            file_size,
            pos: 0,
            prefix: Vec::new(),
            header: None,
            next: 0,
            hasher: Hasher::new(),
            carry: Vec::new(),
            non_finite: 0,
            records: Vec::new(),
        }
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), SafetensorsError> {
        while !bytes.is_empty() {
            let Some(header) = &self.header else {
                // Still reading the prefix and JSON.
                let need = if self.prefix.len() < 8 {
                    8 - self.prefix.len()
                } else {
                    let n = safetensors::json_len(&self.prefix, self.file_size)?;
                    (8 + n as usize) - self.prefix.len()
                };
                let take = need.min(bytes.len());
                self.prefix.extend_from_slice(&bytes[..take]);
                self.pos += take as u64;
                bytes = &bytes[take..];
                if self.prefix.len() >= 8 {
                    let n = safetensors::json_len(&self.prefix, self.file_size)?;
                    if self.prefix.len() as u64 == 8 + n {
                        self.header = Some(safetensors::parse_header(
                            &self.prefix[8..],
                            self.file_size,
                        )?);
                        self.prefix = Vec::new();
                    }
                }
                continue;
            };
            let Some(t) = header.tensors.get(self.next) else {
                // Past the last tensor: parse_header guarantees the file ends here.
                self.pos += bytes.len() as u64;
                return Ok(());
            };
            let take = ((t.end - self.pos) as usize).min(bytes.len());
            let chunk = &bytes[..take];
            let dtype = t.dtype;
            self.hasher.update(chunk);
            self.scan(dtype, chunk);
            self.pos += take as u64;
            bytes = &bytes[take..];
            let Some(t) = self.header.as_ref().and_then(|h| h.tensors.get(self.next)) else {
                continue;
            };
            if self.pos == t.end {
                let t = t.clone();
                self.record(t);
            }
        }
        Ok(())
    }

    /// Closes the current tensor: its digest and non-finite count are complete.
    fn record(&mut self, t: TensorInfo) {
        let hasher = std::mem::take(&mut self.hasher);
        self.records.push(TensorRecord {
            name: t.name,
            dtype: format!("{:?}", t.dtype),
            shape: t.shape,
            begin: t.begin,
            end: t.end,
            digest: hasher.finish(),
            non_finite: std::mem::take(&mut self.non_finite),
        });
        self.carry.clear();
        self.next += 1;
    }

    fn scan(&mut self, dtype: Dtype, chunk: &[u8]) {
        let width = match dtype {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            _ => return,
        };
        let mut chunk = chunk;
        if !self.carry.is_empty() {
            let need = width - self.carry.len();
            let take = need.min(chunk.len());
            self.carry.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.carry.len() == width {
                let carry = std::mem::take(&mut self.carry);
                self.non_finite += count_non_finite(dtype, &carry);
            }
        }
        let whole = chunk.len() / width * width;
        self.non_finite += count_non_finite(dtype, &chunk[..whole]);
        self.carry.extend_from_slice(&chunk[whole..]);
    }

    /// The header and every tensor's record; fails if the file was cut short.
    pub fn finish(mut self) -> Result<(Header, Vec<TensorRecord>), SafetensorsError> {
        // Empty tensors at the very end of the data see no bytes go past: close them here.
        while let Some(t) = self.header.as_ref().and_then(|h| h.tensors.get(self.next)) {
            if t.begin != self.pos || t.end != self.pos {
                break;
            }
            let t = t.clone();
            self.record(t);
        }
        match self.header {
            Some(h) if self.pos == self.file_size && self.next == h.tensors.len() => {
                Ok((h, self.records))
            }
            _ => Err(SafetensorsError::TooShort { size: self.pos }),
        }
    }
}

/// Counts NaN and infinite elements of little-endian floating-point bytes.
pub fn count_non_finite(dtype: Dtype, bytes: &[u8]) -> u64 {
    match dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count() as u64,
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count() as u64,
        Dtype::F32 => bytes
            .chunks_exact(4)
            .filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
            .count() as u64,
        Dtype::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                !f64::from_le_bytes(b).is_finite()
            })
            .count() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_keys_tell_ranges_apart() {
        let r = |d: &[u8], offset, length| BlobRange {
            digest: Digest::of(d),
            offset,
            length,
        };
        let key = BlobRange::run_key;
        let a = key(&[r(b"a", 0, 8), r(b"b", 8, 8)]);
        assert_eq!(a, key(&[r(b"a", 0, 8), r(b"b", 8, 8)]));
        assert_ne!(a, key(&[r(b"a", 0, 8), r(b"b", 8, 9)]));
        assert_ne!(a, key(&[r(b"a", 0, 8), r(b"b", 9, 8)]));
        assert_ne!(a, key(&[r(b"a", 0, 8), r(b"c", 8, 8)]));
        assert_ne!(a, key(&[r(b"a", 0, 8)]));
    }

    fn tiny_file() -> Vec<u8> {
        let tensors = vec![
            ("a".to_owned(), Dtype::F32, vec![3]),
            ("b".to_owned(), Dtype::BF16, vec![2]),
        ];
        let (mut f, _) = safetensors::write_header(&tensors, &BTreeMap::new()).unwrap();
        for v in [1.0f32, f32::NAN, 3.0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&[0x80, 0x3f, 0x80, 0x7f]); // 1.0, +inf in bf16
        f
    }

    #[test]
    fn indexes_in_any_chunking() {
        let f = tiny_file();
        for chunk in [1, 3, 7, 1000] {
            let mut ix = TensorIndexer::new(f.len() as u64);
            for c in f.chunks(chunk) {
                ix.feed(c).unwrap();
            }
            let (h, recs) = ix.finish().unwrap();
            assert_eq!(h.tensors.len(), 2);
            assert_eq!(
                recs[0].digest,
                Digest::of(&f[recs[0].begin as usize..recs[0].end as usize])
            );
            assert_eq!(recs[0].non_finite, 1);
            assert_eq!(recs[1].non_finite, 1);
            assert_eq!(recs[1].dtype, "BF16");
        }
    }

    #[test]
    fn empty_tensors_at_the_end_are_indexed() {
        // Found by fuzzing: no bytes follow an empty last tensor, so it was never closed
        // and a valid file was refused as cut short.
        let tensors = vec![
            ("a".to_owned(), Dtype::F32, vec![1]),
            ("b".to_owned(), Dtype::F32, vec![0]),
        ];
        let (mut with_data, _) = safetensors::write_header(&tensors, &BTreeMap::new()).unwrap();
        with_data.extend_from_slice(&1.0f32.to_le_bytes());
        let (only_empty, _) = safetensors::write_header(&tensors[1..], &BTreeMap::new()).unwrap();
        for f in [with_data, only_empty] {
            let mut ix = TensorIndexer::new(f.len() as u64);
            ix.feed(&f).unwrap();
            let (h, recs) = ix.finish().unwrap();
            assert_eq!(recs.len(), h.tensors.len());
            let last = recs.last().unwrap();
            assert_eq!(
                (last.name.as_str(), last.begin, last.end),
                ("b", f.len() as u64, f.len() as u64)
            );
            assert_eq!(last.digest, Digest::of(b""));
        }
    }

    #[test]
    fn cut_files_fail() {
        let f = tiny_file();
        let mut ix = TensorIndexer::new(f.len() as u64);
        ix.feed(&f[..f.len() - 1]).unwrap();
        assert!(ix.finish().is_err());
    }

    #[test]
    fn paths() {
        for ok in ["config.json", "a/b.safetensors", "tokenizer.model"] {
            validate_path(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a\\b",
            "./a",
            "a\nb",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifest_digest_ignores_order_but_not_kind() {
        let f = |p: &str| FileRef {
            path: p.into(),
            digest: Digest::of(p.as_bytes()),
            size: 1,
        };
        let a = normalize_files(vec![f("b"), f("a")]).unwrap();
        let b = normalize_files(vec![f("a"), f("b")]).unwrap();
        assert_eq!(manifest_digest("base", &a), manifest_digest("base", &b));
        assert_ne!(manifest_digest("base", &a), manifest_digest("patch", &a));
        assert!(normalize_files(vec![f("a"), f("a")]).is_err());
    }

    #[test]
    fn shard_index_names_missing_files() {
        let ix = ShardIndex::parse(br#"{"metadata":{},"weight_map":{"w":"model-1.safetensors"}}"#)
            .unwrap();
        let mut shards = BTreeMap::new();
        assert!(ix.check(&shards).is_err());
        shards.insert(
            "model-1.safetensors".to_owned(),
            BTreeSet::from(["w".to_owned()]),
        );
        ix.check(&shards).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn indexer_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), size in 0u64..400) {
            let mut ix = TensorIndexer::new(size);
            let _ = ix.feed(&bytes);
            let _ = ix.finish();
        }
    }
}

/// A byte range of a stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRange {
    /// The blob.
    pub digest: Digest,
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub length: u64,
}

impl BlobRange {
    /// The whole of a blob holding `bytes` (a composed file's header, say).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self {
            digest: Digest::of(bytes),
            offset: 0,
            length: bytes.len() as u64,
        }
    }

    /// A digest naming a run of ranges (each one's blob digest, offset and length, in
    /// order): stored blobs never change under their digest, so runs with equal keys are
    /// equal bytes. The registry keeps hash states of composed files' beginnings under
    /// it; a worker remembers which beginnings it announced by it.
    pub fn run_key(runs: &[BlobRange]) -> Digest {
        let mut h = Hasher::new();
        for r in runs {
            h.update(r.digest.as_bytes());
            h.update(&r.offset.to_le_bytes());
            h.update(&r.length.to_le_bytes());
        }
        h.finish()
    }
}

/// A file of a port artifact: a whole blob (`segments` empty), or a file *composed* on
/// download from byte ranges of several blobs (a merged model's safetensors file: its
/// header, the new base's bytes for untouched tensors, the merged tensors). `file.digest`
/// and `file.size` always describe the bytes a download produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// Path, digest and size of the (composed) file.
    #[serde(flatten)]
    pub file: FileRef,
    /// The pieces, in order; empty for a plain blob.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<BlobRange>,
}

/// A port artifact file as a worker declares it, before the registry verifies it: a
/// stored blob (its digest and size are the worker's claim, checked against the blob
/// store), or a file composed from blob ranges, whose digest nobody claims: the registry
/// hashes the composed bytes itself and records an [`ArtifactFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclaredFile {
    /// The file is one whole stored blob.
    Blob(FileRef),
    /// The file is composed on download from `segments`, in order.
    Composed {
        /// Relative path.
        path: String,
        /// The composed size the worker planned.
        size: u64,
        /// The pieces.
        segments: Vec<BlobRange>,
    },
}

impl DeclaredFile {
    /// The file's path.
    pub fn path(&self) -> &str {
        match self {
            DeclaredFile::Blob(f) => &f.path,
            DeclaredFile::Composed { path, .. } => path,
        }
    }
}
