//! Raw training data to Parquet shards.
//!
//! This is the first step of lvpipe's data flow: it reads sources in the
//! formats VILA users have (LLaVA JSON/JSONL, text JSONL, WebDataset tar,
//! MMC4-style interleaved JSONL), decodes and resizes media, applies the ChatML
//! template, tokenizes with a Hugging Face `tokenizer.json`, computes the loss
//! mask, and writes zstd Parquet shards of the `samples` table, a `quarantine`
//! table for every input that could not become a sample, and a manifest last.
//!
//! ```no_run
//! use lvpipe_sharding::{BuildSettings, SourceSpec, build_shards};
//! # fn main() -> lvpipe_sharding::Result<()> {
//! let settings = BuildSettings::new("shards/", "raw/tokenizer.json")
//!     .with_sources(vec![SourceSpec::parse("llava:raw/sft.json", None)?]);
//! let summary = build_shards(&settings, &|_event| {})?;
//! println!("{} samples in {} shards", summary.samples, summary.shards);
//! # Ok(()) }
//! ```
//!
//! The build is a bounded pipeline: one reader thread per build walks the
//! sources in order and numbers every record; chunks of records are processed
//! in parallel with rayon; one writer thread receives them in order and cuts
//! shards. Bounded channels between the stages keep memory flat whatever the
//! input size, and the global record numbers make shards reproducible and a
//! crashed build resumable.

mod build;
mod chat;
mod error;
pub mod media;
mod readers;
mod source;
pub mod storage;
pub mod verify;
pub mod video;
mod writer;

pub use build::{
    BuildEvent, BuildSettings, BuildSummary, ImageAspect, Partition, build_shards, finalize,
};
pub use chat::{CHAT_TEMPLATE, ChatTemplate, ChatTokenizer, Segment, SpecialTokens};
pub use error::{Error, Result};
pub use media::{ImageLimits, ImageSettings, ProcessedImage, process_image};
pub use source::{Registry, SourceKind, SourceSpec};
