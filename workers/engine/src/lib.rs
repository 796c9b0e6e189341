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
//! [`ComposedFile`]s: the new base's own header and byte ranges for untouched tensors
//! plus the merged tensors, so a registry stores only the merged tensors and an offline
//! `--merged` file is byte-identical to a composed download.
//!
//! Memory: a port holds a few tensors at a time (one target weight of each base, the
//! LoRA factors in f64, and a 256 KiB f64 scratch block per thread); bytes are read with
//! ranged reads into reused buffers, never by mapping whole files, and offline output is
//! written file by file as the tensors are produced.
//!
//! Architecture invariant: pure compute over byte sources. This crate never knows about
//! the network, a database, gRPC, object storage or an async runtime; callers on async
//! threads run it on a blocking thread.

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
