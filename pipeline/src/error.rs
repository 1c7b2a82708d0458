//! The error type of the pipeline crate.

use std::path::PathBuf;

/// Errors of catalog and query work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement that is not a query (the user can fix it).
    #[error("only queries run here (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); refused: {0}")]
    NotAQuery(String),
    /// A recipe that does not parse or does not fit the data (the user can fix it).
    #[error("recipe: {0}")]
    Recipe(String),
    /// A folder that is not a finished shard build, or of another schema version.
    #[error("{path}: {message}")]
    Shards { path: PathBuf, message: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Schema(#[from] lvpipe_schemas::Error),
}

/// `Result` with the pipeline [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
