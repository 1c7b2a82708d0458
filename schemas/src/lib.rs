//! The Arrow schemas of lvpipe's tables and their validation.
//!
//! Every other crate meets here: `sharding` writes record batches of
//! [`samples_schema`] and [`quarantine_schema`] into Parquet shards and a
//! [`Manifest`] last; `pipeline` registers the same schemas as SQL tables. The
//! schema version and the tokenizer fingerprint travel in the Parquet key-value
//! metadata under the [`meta`] keys, so a reader can refuse shards it does not
//! understand instead of misreading them.
//!
//! ```
//! use lvpipe_schemas::{samples_schema, SampleKind, SCHEMA_VERSION};
//! let schema = samples_schema();
//! assert!(schema.field_with_name("input_ids").is_ok());
//! assert_eq!(SampleKind::VideoQa.as_str(), "video_qa");
//! assert_eq!(SCHEMA_VERSION, "1");
//! ```

mod frames;
mod lock;
mod manifest;
mod mixes;
mod modules;
mod registry;
mod runs;
mod tables;
mod validate;

pub use frames::FramePolicy;
pub use lock::FolderLock;
pub use manifest::{Manifest, ManifestShard, ManifestSource, TableKind};
pub use mixes::{mix_report_schema, mix_samples_schema, packs_schema};
pub use modules::TrainableModule;
pub use registry::{Registry, RegistryEntry, SourceKind};
pub use runs::{StepMetrics, lineage_schema, metrics_schema, source_tokens_schema};
pub use tables::{
    MEDIA_ITEM_FIELDS, MESSAGE_FIELDS, QuarantineReason, SampleKind, manifest_schema,
    quarantine_schema, samples_schema,
};
pub use validate::validate_batch;

/// Version of the shard contract. Bump it when a column is added, removed or
/// changes meaning; readers refuse shards of another version.
pub const SCHEMA_VERSION: &str = "1";

/// Keys of the Parquet key-value metadata that every shard carries.
pub mod meta {
    /// The [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) the file was written with.
    pub const SCHEMA_VERSION: &str = "lvpipe.schema_version";
    /// Which table the file belongs to (`samples` or `quarantine`).
    pub const TABLE: &str = "lvpipe.table";
    /// blake3 of the tokenizer.json bytes the `input_ids` were produced with.
    pub const TOKENIZER_FINGERPRINT: &str = "lvpipe.tokenizer_fingerprint";
    /// The chat template applied before tokenization (e.g. `chatml`).
    pub const CHAT_TEMPLATE: &str = "lvpipe.chat_template";
    /// Hash of the build arguments and inputs; a resumed build must match it.
    pub const BUILD_FINGERPRINT: &str = "lvpipe.build_fingerprint";
    /// First input record (global sequence number) covered by the file.
    pub const RECORD_START: &str = "lvpipe.record_start";
    /// One past the last input record covered by the file.
    pub const RECORD_END: &str = "lvpipe.record_end";
}

/// The chat template's special tokens and the media placeholders, as they
/// appear in text: every tokenizer lvpipe uses has them, and the synthetic
/// tokenizer numbers them in the order of [`tokens::ALL`].
pub mod tokens {
    pub const IM_START: &str = "<|im_start|>";
    pub const IM_END: &str = "<|im_end|>";
    pub const END_OF_TEXT: &str = "<|endoftext|>";
    pub const IMAGE: &str = "<image>";
    pub const VIDEO: &str = "<video>";
    /// Every special token, in the order a trained tokenizer numbers them.
    pub const ALL: [&str; 5] = [END_OF_TEXT, IM_START, IM_END, IMAGE, VIDEO];
}

/// Errors of this crate: a batch or manifest that breaks the contract.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A record batch does not match the table's schema or invariants.
    #[error("{table}: row {row}, column `{column}`: {message}")]
    InvalidRow {
        table: &'static str,
        row: usize,
        column: String,
        message: String,
    },
    /// A record batch has the wrong columns or types.
    #[error("{table}: schema mismatch: {message}")]
    SchemaMismatch {
        table: &'static str,
        message: String,
    },
    /// An unknown enum value (kind, reason code) in a string column or argument.
    #[error("unknown {what} `{value}` (expected one of: {expected})")]
    UnknownValue {
        what: &'static str,
        value: String,
        expected: String,
    },
    /// Another process writes the folder (it holds its [`FolderLock`]).
    #[error(
        "{dir} is being written by another lvpipe process ({what}); wait for it to end, or write elsewhere"
    )]
    Busy {
        dir: std::path::PathBuf,
        what: String,
    },
    /// A file of one of the contract's formats that does not parse.
    #[error("{file}: {message}")]
    Format { file: String, message: String },
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
