//! `lvpipe mix`: one stage selected, weighed, ordered and packed.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_pipeline::{Catalog, Recipe, build_mix, default_memory_limit, publish_mix};
use lvpipe_sharding::storage::{Location, local_folder};

use super::{cache_dir, location, out, runtime};
use crate::args::MixArgs;

pub fn run(args: MixArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let out_location = location(&args.out)?;
    // A remote mix is made in the cache, then published, mix.json last.
    let local_out = local_folder(&out_location, &cache_dir(None).join("staging"));
    let meta = runtime()?.block_on(async {
        let catalog = Catalog::open_on(
            &location(&args.shards)?,
            default_memory_limit(),
            args.cluster.as_deref(),
        )
        .await?;
        let meta = build_mix(&catalog, &recipe, args.stage, &local_out).await?;
        if let Location::Remote(remote) = &out_location {
            let stage = format!("stage-{}", meta.stage);
            publish_mix(&local_out.join(&stage), &remote.join(&stage)).await?;
        }
        anyhow::Ok(meta)
    })?;
    out(&format!(
        "stage {} ({}): {} samples in {} packs of {} tokens ({:.1}% padding) -> {}\n",
        meta.stage,
        meta.name,
        meta.samples,
        meta.packs,
        meta.context,
        100.0 * meta.padding as f64 / (meta.packs as f64 * meta.context as f64).max(1.0),
        out_location.join(&format!("stage-{}", meta.stage))
    ))?;
    Ok(ExitCode::SUCCESS)
}
