//! The offline port: local directories in, a ported adapter (and a merged model) out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use patchport_core::layout::ADAPTER_CONFIG;
use patchport_core::port::{METHOD_VERSION, PortDiagnostics, Refusal, ReusedTensor};
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::EngineError;
use crate::plan::{ComposedFile, Piece, preflight};
use crate::port::{MergedSink, Timings, port_planned};
use crate::source::{DirSource, ModelSource};

/// How to port.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortOptions {
    /// Also produce the merged model (`out/merged/` for [`port_dirs`]).
    pub merged: bool,
    /// Where the merge math runs.
    pub device: Device,
    /// `base_model_name_or_path` of the ported adapter; defaults to the new base's
    /// [`ModelSource::name`] (its directory, offline).
    pub new_base_name: Option<String>,
    /// `revision` of the ported adapter (`null` when not given).
    pub new_base_revision: Option<String>,
    /// Merged tensors an earlier port already stored, by base tensor name: [`crate::port`]
    /// neither reads, merges nor hands them to the sink, and takes their diagnostics as
    /// they are (see [`ReusedTensor`]). [`port_dirs`] computes every tensor (it has no
    /// store to take them from) and ignores this.
    pub reuse: BTreeMap<String, ReusedTensor>,
}

/// The verdict of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Ported.
    Ported,
    /// Refused (see the refusals).
    Refused,
}

/// A file the offline port wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFile {
    /// Path relative to the output directory.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// What [`port_dirs`] did, for `--json` and for humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortReport {
    /// `ported` or `refused`.
    pub verdict: Verdict,
    /// The port method (`portllm-1`).
    pub method: String,
    /// Why it was refused.
    pub refusals: Vec<Refusal>,
    /// Per-module and total diagnostics.
    pub diagnostics: PortDiagnostics,
    /// Files written, relative to the output directory.
    pub files: Vec<ReportFile>,
    /// Timings.
    pub timings: Timings,
}

/// Ports the PEFT adapter in `patch` (trained on `old_base`) onto `new_base`, writing
/// into `out`: the ported adapter (`adapter_config.json` re-pointed, every other patch
/// file copied byte for byte) and, with `opts.merged`, the merged model in `out/merged/`
/// (Hugging Face layout, sharded exactly like the new base). A refused port writes
/// nothing and returns the refusals. Every file is written under a temporary name and
/// renamed when complete; merged files are written as their tensors are produced.
pub fn port_dirs(
    old_base: &Path,
    new_base: &Path,
    patch: &Path,
    out: &Path,
    opts: &PortOptions,
) -> Result<PortReport, EngineError> {
    let t0 = Instant::now();
    let old = DirSource::new(old_base)?;
    let new = DirSource::new(new_base)?;
    let patch_src = DirSource::new(patch)?;
    let pre = preflight(&old, &new, &patch_src)?;
    let preflight_s = t0.elapsed().as_secs_f64();
    let report = |verdict, refusals, diagnostics, files, mut timings: Timings| {
        timings.preflight_s = preflight_s;
        timings.total_s = t0.elapsed().as_secs_f64();
        PortReport {
            verdict,
            method: METHOD_VERSION.to_owned(),
            refusals,
            diagnostics,
            files,
            timings,
        }
    };
    if !pre.is_portable() {
        return Ok(report(
            Verdict::Refused,
            pre.refusals,
            PortDiagnostics::default(),
            Vec::new(),
            Timings::default(),
        ));
    }

    let merged_dir = out.join("merged");
    let mut writer = opts
        .merged
        .then(|| ComposedWriter::new(&new, merged_dir.clone(), pre.merged_files.clone()));
    let opts = PortOptions {
        reuse: BTreeMap::new(),
        ..opts.clone()
    };
    let outcome = port_planned(
        &pre,
        &old,
        &new,
        &patch_src,
        &opts,
        writer.as_mut().map(|w| w as &mut dyn MergedSink),
    )?;
    let mut timings = outcome.timings;
    let Some(adapter) = outcome.adapter else {
        return Ok(report(
            Verdict::Refused,
            outcome.refusals,
            PortDiagnostics::default(),
            Vec::new(),
            timings,
        ));
    };

    let t_write = Instant::now();
    let mut files = Vec::new();
    if let Some(mut w) = writer {
        w.finish()?;
        files.extend(w.written.into_iter().map(|(path, bytes)| ReportFile {
            path: format!("merged/{path}"),
            bytes,
        }));
    }
    create_dir(out)?;
    write_atomic(&out.join(ADAPTER_CONFIG), &adapter.config_json)?;
    let mut adapter_files = vec![ReportFile {
        path: ADAPTER_CONFIG.to_owned(),
        bytes: adapter.config_json.len() as u64,
    }];
    for f in &adapter.reused_files {
        let size = patch_src.file_size(f).map_err(|source| EngineError::Io {
            path: patch_src.location(f),
            source,
        })?;
        let plan = ComposedFile {
            path: f.clone(),
            header: Vec::new(),
            pieces: vec![Piece::Source {
                file: f.clone(),
                begin: 0,
                end: size,
            }],
        };
        write_composed(&patch_src, out, &plan, &mut |_, _| {
            Err(io::Error::other("no merged tensors in a copied file"))
        })?;
        adapter_files.push(ReportFile {
            path: f.clone(),
            bytes: size,
        });
    }
    adapter_files.append(&mut files);
    timings.write_s += t_write.elapsed().as_secs_f64();
    Ok(report(
        Verdict::Ported,
        Vec::new(),
        outcome.diagnostics,
        adapter_files,
        timings,
    ))
}

fn create_dir(dir: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|source| EngineError::Write {
        path: dir.display().to_string(),
        source,
    })
}

/// `dir/.name.partial` for `dir/name`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let tmp = temp_path(path);
    let werr = |source| EngineError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Bytes copied through a buffer at a time when no local file is at hand.
const COPY_CHUNK: u64 = 8 << 20;

/// Copies `[begin, end)` of a source file to `out`: kernel file-to-file copy for a local
/// file, bounded ranged reads otherwise.
fn copy_range(
    src: &dyn ModelSource,
    file: &str,
    begin: u64,
    end: u64,
    out: &mut File,
    buf: &mut Vec<u8>,
) -> Result<(), EngineError> {
    let rerr = |source| EngineError::Io {
        path: src.location(file),
        source,
    };
    if let Some(local) = src.local_path(file) {
        let mut f = File::open(&local).map_err(rerr)?;
        f.seek(SeekFrom::Start(begin)).map_err(rerr)?;
        let n = io::copy(&mut (&mut f).take(end - begin), out).map_err(rerr)?;
        if n != end - begin {
            return Err(rerr(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than expected",
            )));
        }
        return Ok(());
    }
    let mut pos = begin;
    while pos < end {
        let next = (pos + COPY_CHUNK).min(end);
        src.read_range(file, pos, next, buf).map_err(rerr)?;
        out.write_all(buf).map_err(|source| EngineError::Write {
            path: file.to_owned(),
            source,
        })?;
        pos = next;
    }
    Ok(())
}

/// Writes one composed file under `root`, asking `merged` for each merged piece.
fn write_composed(
    src: &dyn ModelSource,
    root: &Path,
    plan: &ComposedFile,
    merged: &mut dyn FnMut(&str, &mut File) -> io::Result<()>,
) -> Result<u64, EngineError> {
    let path = root.join(&plan.path);
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let tmp = temp_path(&path);
    let werr = |source| EngineError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::create(&tmp).map_err(werr)?;
    f.write_all(&plan.header).map_err(werr)?;
    let mut buf = Vec::new();
    for piece in &plan.pieces {
        match piece {
            Piece::Source { file, begin, end } => {
                copy_range(src, file, *begin, *end, &mut f, &mut buf)?;
            }
            Piece::Merged { tensor, .. } => merged(tensor, &mut f).map_err(werr)?,
        }
    }
    drop(f);
    std::fs::rename(&tmp, &path).map_err(werr)?;
    Ok(plan.len())
}

/// A [`MergedSink`] that writes the composed files of a merged model incrementally: each
/// merged tensor is written where it belongs, after the pieces before it are copied.
struct ComposedWriter<'a> {
    src: &'a dyn ModelSource,
    root: PathBuf,
    files: Vec<ComposedFile>,
    /// The file being written: its index, open temp file, next piece.
    current: Option<(usize, File, usize)>,
    next_file: usize,
    buf: Vec<u8>,
    written: Vec<(String, u64)>,
}

impl std::fmt::Debug for ComposedWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComposedWriter")
            .field("root", &self.root)
            .field("next_file", &self.next_file)
            .finish_non_exhaustive()
    }
}

impl<'a> ComposedWriter<'a> {
    fn new(src: &'a dyn ModelSource, root: PathBuf, files: Vec<ComposedFile>) -> Self {
        Self {
            src,
            root,
            files,
            current: None,
            next_file: 0,
            buf: Vec::new(),
            written: Vec::new(),
        }
    }

    fn werr(&self, i: usize) -> impl Fn(io::Error) -> EngineError + '_ {
        move |source| EngineError::Write {
            path: self.root.join(&self.files[i].path).display().to_string(),
            source,
        }
    }

    fn open(&mut self, i: usize) -> Result<(), EngineError> {
        let path = self.root.join(&self.files[i].path);
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let mut f = File::create(temp_path(&path)).map_err(self.werr(i))?;
        f.write_all(&self.files[i].header).map_err(self.werr(i))?;
        self.current = Some((i, f, 0));
        Ok(())
    }

    fn close(&mut self, i: usize) -> Result<(), EngineError> {
        self.current = None;
        let path = self.root.join(&self.files[i].path);
        std::fs::rename(temp_path(&path), &path).map_err(self.werr(i))?;
        self.written
            .push((self.files[i].path.clone(), self.files[i].len()));
        Ok(())
    }

    /// Writes source pieces until the next merged piece (returning its tensor name) or
    /// the end of all files (returning `None`).
    fn advance(&mut self) -> Result<Option<String>, EngineError> {
        loop {
            if self.current.is_none() {
                if self.next_file == self.files.len() {
                    return Ok(None);
                }
                let i = self.next_file;
                self.next_file += 1;
                self.open(i)?;
            }
            let Some((i, f, p)) = self.current.as_mut() else {
                continue;
            };
            let i = *i;
            match self.files[i].pieces.get(*p) {
                None => self.close(i)?,
                Some(Piece::Merged { tensor, .. }) => return Ok(Some(tensor.clone())),
                Some(Piece::Source { file, begin, end }) => {
                    copy_range(self.src, file, *begin, *end, f, &mut self.buf)?;
                    *p += 1;
                }
            }
        }
    }

    /// Writes everything after the last merged tensor.
    fn finish(&mut self) -> Result<(), EngineError> {
        match self.advance()? {
            None => Ok(()),
            Some(tensor) => Err(EngineError::Sink {
                tensor,
                source: io::Error::other("the port ended before this merged tensor was produced"),
            }),
        }
    }
}

impl MergedSink for ComposedWriter<'_> {
    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let expected = self.advance().map_err(io::Error::other)?;
        if expected.as_deref() != Some(name) {
            return Err(io::Error::other(format!(
                "merged tensor {name} arrived out of order (expected {expected:?})"
            )));
        }
        let Some((i, f, p)) = self.current.as_mut() else {
            return Err(io::Error::other("no file open"));
        };
        if self.files[*i].pieces[*p].len() != bytes.len() as u64 {
            return Err(io::Error::other(format!(
                "merged tensor {name} has {} bytes, the layout expects {}",
                bytes.len(),
                self.files[*i].pieces[*p].len()
            )));
        }
        f.write_all(bytes)?;
        *p += 1;
        Ok(())
    }
}
