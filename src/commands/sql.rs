//! `lvpipe sql`: a read-only query over shards, mixes and runs.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_pipeline::{Catalog, OutputFormat, default_memory_limit, render};

use super::{location, out, runtime};
use crate::args::{FormatArg, SqlArgs};

pub fn run(args: SqlArgs) -> Result<ExitCode> {
    let format = match args.format {
        FormatArg::Table => OutputFormat::Table,
        FormatArg::Csv => OutputFormat::Csv,
        FormatArg::Json => OutputFormat::Json,
    };
    let limit = args
        .memory_limit
        .map_or_else(default_memory_limit, |bytes| bytes as usize);
    let text = runtime()?.block_on(async {
        let catalog = match &args.shards {
            Some(shards) => {
                let catalog =
                    Catalog::open_on(&location(shards)?, limit, args.cluster.as_deref()).await?;
                if args.verify {
                    catalog.verify()?;
                }
                catalog
            }
            None => Catalog::empty(limit)?,
        };
        if let Some(mixes) = &args.mixes {
            catalog.register_mixes(mixes)?;
        }
        if let Some(runs) = &args.runs {
            catalog.register_runs(runs)?;
        }
        let batches = catalog.query(&args.query).await?;
        render(&batches, format)
    })?;
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}
