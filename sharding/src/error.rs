//! The error type of the sharding crate.

use std::path::PathBuf;

/// Errors that stop a build. Bad *records* are not errors: they become
/// quarantine rows (unless the build is `--strict`, where the first one is
/// returned as [`Error::Strict`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or configuration: the user can fix it.
    #[error("{0}")]
    Config(String),
    /// A `--strict` build met a record that would have been quarantined.
    #[error("{origin}: {reason}: {detail} (--strict stops at the first bad record)")]
    Strict {
        origin: String,
        reason: lvpipe_schemas::QuarantineReason,
        detail: String,
    },
    /// A tokenizer file that cannot be loaded or lacks the template's tokens.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The output folder holds a different build.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Schema(#[from] lvpipe_schemas::Error),
    /// A bug in lvpipe.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Result` with the sharding [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
