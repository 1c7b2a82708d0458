//! The error type of evaluation, the charts and the demo.

use std::path::PathBuf;

/// Errors that stop an evaluation or the demo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input the user can fix: a run folder or corpus that is not what the
    /// evaluation needs, an unknown suite.
    #[error("{0}")]
    Input(String),
    /// A media file of the held-out set that cannot be prepared.
    #[error("{path}: {message}")]
    Media { path: PathBuf, message: String },
    /// A chart that cannot be written.
    #[error("{path}: {source}")]
    Chart {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sharding(#[from] lvpipe_sharding::Error),
    #[error(transparent)]
    Pipeline(#[from] lvpipe_pipeline::Error),
    #[error(transparent)]
    Trainer(#[from] lvpipe_trainer::Error),
    #[error(transparent)]
    Synth(#[from] lvpipe_synth::Error),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Whether this is a bug in lvpipe rather than bad input or a failing
    /// machine (the CLI exits with 3 for these).
    pub fn is_internal(&self) -> bool {
        match self {
            Error::Sharding(e) => e.is_internal(),
            Error::Pipeline(e) => e.is_internal(),
            Error::Trainer(e) => e.is_internal(),
            Error::Candle(_) => true,
            Error::Input(_)
            | Error::Media { .. }
            | Error::Chart { .. }
            | Error::Io(_)
            | Error::Synth(_) => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
