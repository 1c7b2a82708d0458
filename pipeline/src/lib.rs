//! The SQL view of lvpipe's data, recipes, mixing and packing, and the loader.
//!
//! This crate sits between the shards and the trainer. [`Catalog`] opens a
//! shard folder as a DataFusion catalog (`samples` and `quarantine` over the
//! Parquet files the manifest lists, and `manifest` itself), and adds the
//! tables of mixes (`mix_report`, `packs`) and runs (`metrics`,
//! `source_tokens`, `lineage`). Only queries run: DDL, DML (INSERT, COPY)
//! and statements (SET) are refused before planning, so auditing cannot
//! change the data it audits. A [`Recipe`] is checked and planned against
//! the catalog ([`plan`]); [`build_mix`] selects, weighs, orders and packs a
//! stage into Arrow IPC files; the [`Loader`] memory-maps them and hands out
//! rank-partitioned, resumable batches.
//!
//! ```no_run
//! # async fn demo() -> lvpipe_pipeline::Result<()> {
//! use lvpipe_pipeline::{Catalog, OutputFormat, render};
//! let catalog = Catalog::open("shards/".as_ref()).await?;
//! let batches = catalog.query("SELECT source, count(*) FROM samples GROUP BY source").await?;
//! print!("{}", render(&batches, OutputFormat::Table)?);
//! # Ok(()) }
//! ```

mod catalog;
mod error;
pub mod lineage;
pub mod loader;
pub mod mix;
mod plan;
pub mod recipe;
mod render;

#[cfg(feature = "cluster")]
pub mod cluster;
pub use catalog::{Catalog, default_memory_limit, meminfo_bytes, process_status_bytes};
pub use error::{Error, Result};
pub use loader::{Batch, Loader, LoaderState, Mix, PackData, splitmix};
pub use mix::{MixFile, MixMeta, build_mix, current_mix, fetch_mix, publish_mix};
pub use plan::{StagePlan, plan};
pub use recipe::Recipe;
pub use render::{OutputFormat, render};
