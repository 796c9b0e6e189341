//! The engine's one error type. A refusal is not an error: it is the outcome of a port
//! that must not happen (see [`patchport_core::port::Refusal`]).

use patchport_core::safetensors::SafetensorsError;

/// Why a port could not be carried out at all (bad input, IO, device).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading a file failed.
    #[error("cannot read {path}")]
    Io {
        /// Where (a local path or a registry location).
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {path}")]
    Write {
        /// The file being written.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A required file is absent.
    #[error("missing {file}: {hint}")]
    MissingFile {
        /// Where it was expected.
        file: String,
        /// What the user should do.
        hint: &'static str,
    },
    /// A safetensors file whose header cannot be read.
    #[error("{file} is not a valid safetensors file")]
    BadSafetensors {
        /// The file.
        file: String,
        /// What is wrong.
        #[source]
        source: SafetensorsError,
    },
    /// A JSON file (`config.json`, `adapter_config.json`, the shard index) that cannot be
    /// used.
    #[error("bad {file}: {message}")]
    BadConfig {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The files of a model do not fit together (a shard index that names a missing
    /// shard, the same tensor in two files, a bad path).
    #[error("bad model layout in {location}: {message}")]
    BadLayout {
        /// The model.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// Tensor bytes that do not match their dtype and shape.
    #[error("tensor {tensor}: {message}")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// The requested device cannot be used.
    #[error("device {device} is not available: {message}")]
    Device {
        /// The device as requested (`cuda:0`).
        device: String,
        /// Why.
        message: String,
    },
    /// A device string that is neither `cpu` nor `cuda:N`.
    #[error("invalid device {input:?}: expected cpu or cuda:N")]
    BadDevice {
        /// What was given.
        input: String,
    },
    /// The merged-tensor sink failed (it stores or writes the merged tensors).
    #[error("storing merged tensor {tensor} failed")]
    Sink {
        /// The tensor being stored.
        tensor: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
