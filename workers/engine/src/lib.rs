//! patchport's port engine: given a LoRA patch trained on an old base version and a new
//! base version, it decides from metadata alone whether the patch can be ported (typed
//! refusals, never a silent lossy port), then produces the PortLLM port training-free:
//! the ported adapter (the same A/B tensor bytes, config re-pointed at the new base), the
//! merged model `W_new + s·B·A` (f64 accumulation, one rounding to the base dtype; every
//! other tensor byte-identical), and per-module portability diagnostics.
//!
//! Entry points: [`preflight`] (metadata only), [`port`] (any [`ModelSource`], merged
//! tensors handed one at a time to a [`MergedSink`]), and [`port_dirs`] (local
//! directories, the offline `patchport port` command). The merged model is described as
//! [`ComposedFile`]s: a header, byte ranges of the new base for untouched tensors, then
//! the merged tensors (last, so every port of a base shares the file's beginning), so a
//! registry stores only the merged tensors and an offline `--merged` file is
//! byte-identical to a composed download.
//!
//! Memory: a port holds a few tensors at a time: the target weight of the new base (merged
//! in place) and of the old base (for the diagnostics), the LoRA factors in f64, and per
//! kernel thread a packed panel of `R` (`rank × 1024 × 8` bytes). Bytes are read with
//! ranged reads into reused buffers, never by mapping whole files (touched pages of a
//! mapping count in RSS); untouched tensors are never read at all: offline they are
//! copied file-to-file by the kernel (`copy_file_range`), in a registry they are byte
//! ranges of the base's blobs. Offline output is written file by file as the merged
//! tensors are produced, each file under a temporary name renamed when complete.
//!
//! Numerics: `W_new + s·B·A` with `B·A` accumulated in f64 and one rounding to the base's
//! dtype (f32, f16, bf16; f64 kept). bf16 and f16 are rounded from f64 in one step (round
//! to odd, then to nearest even), which `half`'s own f64 conversions do not guarantee.
//!
//! Devices: [`Device::Cpu`] is the fused CPU kernel ([`kernel`]), always built and
//! tested. [`Device::Cuda`] computes `s·B·A` in f64 with candle on the GPU (cargo feature
//! `cuda`, off by default) and rounds on the host with the same code; it is unchecked on
//! a GPU so far (no GPU in this workspace's machines; its candle code is tested on
//! candle's CPU device).
//!
//! Architecture invariant: pure compute over byte sources. This crate never knows about
//! the network, a database, gRPC, object storage or an async runtime; callers on async
//! threads run it on a blocking thread.

pub mod artifact;
mod device;
mod error;
mod gpu;
pub mod kernel;
pub mod numeric;
mod offline;
mod plan;
mod port;
mod source;

pub use device::Device;
pub use error::EngineError;
pub use kernel::{DeltaStats, LowRankDelta, merge_in_place};
pub use offline::{PortOptions, PortReport, ReportFile, Verdict, port_dirs};
pub use plan::{ComposedFile, ModulePlan, Piece, Preflight, preflight};
pub use port::{MergedSink, PortOutcome, PortedAdapter, Timings, port, port_planned};
pub use source::{DirSource, ModelSource};
