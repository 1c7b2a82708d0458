//! The error type of the trainer.

use std::path::PathBuf;

/// Errors that stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings that do not fit: a recipe, mix, tokenizer or start that do
    /// not belong together (the user can fix it).
    #[error("{0}")]
    Config(String),
    /// A run folder or checkpoint that cannot be used: missing, written by
    /// another recipe, mix or start, or damaged.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// Training diverged: a loss that is not finite, with the samples of
    /// the micro-batch that produced it.
    #[error("step {step}: loss is {loss}; samples: {samples}")]
    Diverged {
        step: u64,
        loss: f64,
        samples: String,
    },
    /// A tensor operation failed; `context` says which part of the run.
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Pipeline(#[from] lvpipe_pipeline::Error),
    #[error(transparent)]
    Sharding(#[from] lvpipe_sharding::Error),
    #[error(transparent)]
    Schema(#[from] lvpipe_schemas::Error),
}

impl Error {
    /// Whether this is a bug in lvpipe rather than bad input or a failing
    /// machine (the CLI exits with 3 for these).
    pub fn is_internal(&self) -> bool {
        match self {
            Error::Tensor { .. } => true,
            Error::Pipeline(e) => e.is_internal(),
            Error::Sharding(e) => e.is_internal(),
            _ => false,
        }
    }
}

/// `Result` with the trainer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a candle error with what was being done.
pub(crate) trait TensorContext<T> {
    fn context(self, context: impl std::fmt::Display) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn context(self, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|source| Error::Tensor {
            context: context.to_string(),
            source,
        })
    }
}
