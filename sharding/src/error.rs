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
    /// The output folder holds a different build, or files of a build that
    /// do not parse.
    #[error("{0}")]
    Conflict(String),
    /// The build's writer stopped taking records because another part of
    /// the build failed; that failure is what the build returns.
    #[error("the build stopped")]
    Stopped,
    /// The build stopped after this many shards, as `fail_after_shards`
    /// asked (a crash, for testing resume).
    #[error("stopped after {0} shards as asked (--fail-after-shards)")]
    StoppedAsAsked(u32),
    /// A file or folder on object storage that cannot be read or written.
    #[error("{url}: {message}")]
    Storage { url: String, message: String },
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

impl Error {
    /// Whether this is a bug in lvpipe rather than bad input or a failing
    /// machine (the CLI exits with 3 for these).
    pub fn is_internal(&self) -> bool {
        matches!(self, Error::Internal(_) | Error::Arrow(_) | Error::Stopped)
    }
}

/// `Result` with the sharding [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
