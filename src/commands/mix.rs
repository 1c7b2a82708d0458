//! `lvpipe mix`: one stage selected, weighed, ordered and packed.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_pipeline::{Catalog, Recipe, build_mix};

use super::{out, runtime};
use crate::args::MixArgs;

pub fn run(args: MixArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let meta = runtime()?.block_on(async {
        let catalog = Catalog::open(&args.shards).await?;
        build_mix(&catalog, &recipe, args.stage, &args.out).await
    })?;
    out(&format!(
        "stage {} ({}): {} samples in {} packs of {} tokens ({:.1}% padding) -> {}\n",
        meta.stage,
        meta.name,
        meta.samples,
        meta.packs,
        meta.context,
        100.0 * meta.padding as f64 / (meta.packs as f64 * meta.context as f64).max(1.0),
        args.out.join(format!("stage-{}", meta.stage)).display()
    ))?;
    Ok(ExitCode::SUCCESS)
}
