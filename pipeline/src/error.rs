//! The error type of the pipeline crate.

use std::path::PathBuf;

/// Errors of catalog, recipe, mix and loader work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement that is not a query (the user can fix it).
    #[error("only queries run here (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); refused: {0}")]
    NotAQuery(String),
    /// A recipe that does not parse or does not fit the data (the user can fix it).
    #[error("recipe: {0}")]
    Recipe(String),
    /// Arguments that do not fit the data: a world size that does not
    /// divide the global batch, a query without shards (the user can fix it).
    #[error("{0}")]
    Usage(String),
    /// A shard, mix or run folder (or a file in it) that is missing,
    /// unfinished, of another schema version, or does not parse.
    #[error("{path}: {message}")]
    Folder { path: PathBuf, message: String },
    /// A mix whose stored media do not decode: lvpipe encoded them, so the
    /// file was damaged after it was written.
    #[error("mix sample {sample}: {message} (the mix file is damaged; run `lvpipe mix` again)")]
    CorruptMix { sample: String, message: String },
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
    /// Object storage, and the shard checks the sharding crate does.
    #[error(transparent)]
    Sharding(#[from] lvpipe_sharding::Error),
}

impl Error {
    /// Whether this is a bug in lvpipe rather than bad input or a failing
    /// machine (the CLI exits with 3 for these).
    pub fn is_internal(&self) -> bool {
        match self {
            // Plans and record batches lvpipe built itself; a SQL error in a
            // user's query is a plan error.
            Error::DataFusion(e) => matches!(
                e.find_root(),
                datafusion::error::DataFusionError::Internal(_)
            ),
            Error::Arrow(_) => true,
            Error::Sharding(e) => e.is_internal(),
            _ => false,
        }
    }
}

/// `Result` with the pipeline [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
