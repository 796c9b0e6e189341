//! Where model bytes come from: a local directory now, registry blobs later.
//!
//! Every read is a positioned read of a byte range into a caller-owned buffer, so the
//! memory a port uses is the buffers it holds, never the size of the model (pages of a
//! mapping that a process touches count in its RSS; a ranged read's do not).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use patchport_core::Digest;
use patchport_core::layout::validate_path;
use patchport_core::safetensors::{self, Header};

use crate::error::EngineError;

/// Read access to the files of one model or patch version.
pub trait ModelSource: Send + Sync + std::fmt::Debug {
    /// A name for messages and for re-pointing an adapter (`meta/llama:v2`, or the
    /// directory of a local model).
    fn name(&self) -> String;

    /// Every file, as `/`-separated paths relative to the version's root, sorted.
    fn files(&self) -> Vec<String>;

    /// The size of a file in bytes.
    fn file_size(&self, path: &str) -> io::Result<u64>;

    /// Replaces the contents of `buf` with bytes `[begin, end)` of a file.
    fn read_range(&self, path: &str, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()>;

    /// The sha256 of a tensor's bytes when it is known without reading them (a registry's
    /// tensor index); `None` when it would have to be computed.
    fn tensor_digest(&self, path: &str, tensor: &str) -> Option<Digest> {
        let _ = (path, tensor);
        None
    }

    /// A local file holding the same bytes, when there is one; lets a writer copy with
    /// the kernel's file-to-file copy instead of through a buffer.
    fn local_path(&self, path: &str) -> Option<PathBuf> {
        let _ = path;
        None
    }

    /// Where a file is, for error messages.
    fn location(&self, path: &str) -> String {
        format!("{}/{path}", self.name())
    }
}

/// A model or patch in a local directory.
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
    files: Vec<String>,
}

impl DirSource {
    /// Lists the regular files under `root` (names starting with `.` are skipped).
    pub fn new(root: &Path) -> Result<Self, EngineError> {
        let io_err = |path: &Path, source| EngineError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(root).map_err(|e| io_err(root, e))?;
        if !meta.is_dir() {
            return Err(io_err(
                root,
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        let mut files = Vec::new();
        let mut stack = vec![(root.to_path_buf(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
                let entry = entry.map_err(|e| io_err(&dir, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let rel = format!("{prefix}{name}");
                // Follows symlinks, as a user who points at a directory expects.
                let ft = std::fs::metadata(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
                if ft.is_dir() {
                    stack.push((entry.path(), format!("{rel}/")));
                } else if ft.is_file() && validate_path(&rel).is_ok() {
                    files.push(rel);
                }
            }
        }
        files.sort();
        Ok(Self {
            root: root.to_path_buf(),
            files,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open(&self, path: &str) -> io::Result<File> {
        validate_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        File::open(self.root.join(path))
    }
}

impl ModelSource for DirSource {
    fn name(&self) -> String {
        self.root.display().to_string()
    }

    fn files(&self) -> Vec<String> {
        self.files.clone()
    }

    fn file_size(&self, path: &str) -> io::Result<u64> {
        Ok(self.open(path)?.metadata()?.len())
    }

    fn read_range(&self, path: &str, begin: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = end
            .checked_sub(begin)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad byte range"))?;
        let file = self.open(path)?;
        buf.clear();
        buf.resize(len, 0);
        file.read_exact_at(buf, begin)
    }

    fn local_path(&self, path: &str) -> Option<PathBuf> {
        validate_path(path).ok()?;
        Some(self.root.join(path))
    }

    fn location(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }
}

/// The largest JSON file read whole (configs and shard indexes are kilobytes).
const MAX_JSON_FILE: u64 = 64 << 20;

/// Reads a small file whole.
pub(crate) fn read_small(src: &dyn ModelSource, path: &str) -> Result<Vec<u8>, EngineError> {
    let io_err = |source| EngineError::Io {
        path: src.location(path),
        source,
    };
    let size = src.file_size(path).map_err(io_err)?;
    if size > MAX_JSON_FILE {
        return Err(EngineError::BadConfig {
            file: src.location(path),
            message: format!("{size} bytes is too large for a configuration file"),
        });
    }
    let mut buf = Vec::new();
    src.read_range(path, 0, size, &mut buf).map_err(io_err)?;
    Ok(buf)
}

/// A safetensors file's parsed header and its raw bytes (`[0, data_start)`).
#[derive(Debug, Clone)]
pub(crate) struct FileHeader {
    pub(crate) path: String,
    pub(crate) header: Header,
    pub(crate) raw: Vec<u8>,
}

/// Reads and validates the header of a safetensors file with two ranged reads.
pub(crate) fn read_header(src: &dyn ModelSource, path: &str) -> Result<FileHeader, EngineError> {
    let io_err = |source| EngineError::Io {
        path: src.location(path),
        source,
    };
    let bad = |source| EngineError::BadSafetensors {
        file: src.location(path),
        source,
    };
    let size = src.file_size(path).map_err(io_err)?;
    let mut raw = Vec::new();
    src.read_range(path, 0, size.min(8), &mut raw)
        .map_err(io_err)?;
    let n = safetensors::json_len(&raw, size).map_err(bad)?;
    src.read_range(path, 0, 8 + n, &mut raw).map_err(io_err)?;
    let header = safetensors::parse_header(&raw[8..], size).map_err(bad)?;
    Ok(FileHeader {
        path: path.to_owned(),
        header,
        raw,
    })
}
