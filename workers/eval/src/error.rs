//! The one error enum of the crate boundary.

use std::path::PathBuf;

use patchport_core::evalset::EvalSetError;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The model cannot be evaluated faithfully (no tokenizer, unsupported architecture
    /// or option): the gate says so instead of guessing.
    #[error("not evaluable: {reason}")]
    NotEvaluable {
        /// What is missing or unsupported, in words a user can act on.
        reason: String,
    },
    /// The eval set was refused.
    #[error(transparent)]
    EvalSet(#[from] EvalSetError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A weight file or tensor is unusable (missing tensor, wrong shape, bad file).
    #[error("weights in {path}: {message}")]
    Weights {
        /// The model or adapter directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The adapter cannot be merged for evaluation.
    #[error("adapter in {path}: {message}")]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One item cannot be scored with this model (e.g. a choice that tokenizes to nothing).
    #[error("eval item {index} (line {line}): {message}")]
    Item {
        /// 0-based item index.
        index: usize,
        /// 1-based line of the eval set.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed on an input.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// What the tokenizer said.
        message: String,
    },
    /// Arms that cannot be compared (different item counts or metrics).
    #[error("arms cannot be compared: {message}")]
    Mismatch {
        /// What differs.
        message: String,
    },
    /// A device string that is neither `cpu` nor `cuda:N`, or a device that failed.
    #[error("device: {message}")]
    Device {
        /// What is wrong.
        message: String,
    },
    /// The tensor library failed.
    #[error("candle: {source}")]
    Candle {
        /// The cause.
        #[from]
        source: candle_core::Error,
    },
}

impl EvalError {
    pub(crate) fn not_evaluable(reason: impl Into<String>) -> Self {
        EvalError::NotEvaluable {
            reason: reason.into(),
        }
    }

    /// Whether this is [`EvalError::NotEvaluable`] (a property of the model, not a failure).
    pub fn is_not_evaluable(&self) -> bool {
        matches!(self, EvalError::NotEvaluable { .. })
    }
}
