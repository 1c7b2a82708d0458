//! `lvpipe plan`: a recipe checked on its own and against shards.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_pipeline::{Catalog, Recipe, StagePlan, default_memory_limit};

use super::{location, out, runtime};
use crate::args::PlanArgs;

pub fn run(args: PlanArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let (problems, stages) = runtime()?.block_on(async {
        let catalog = Catalog::open_at(&location(&args.shards)?, default_memory_limit()).await?;
        lvpipe_pipeline::plan(&recipe, &catalog).await
    })?;
    if args.json {
        let json =
            serde_json::json!({"ok": problems.is_empty(), "problems": problems, "stages": stages});
        out(&(serde_json::to_string_pretty(&json)? + "\n"))?;
    } else {
        out(&table(&stages, &problems))?;
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table(stages: &[StagePlan], problems: &[String]) -> String {
    let mut text = format!(
        "{:<3} {:<24} {:>8} {:>9} {:>12} {:>7} {:>6} {:>7} {:>8}\n",
        "#", "stage", "context", "samples", "tokens", "packs", "steps", "epochs", "padding"
    );
    for s in stages {
        text.push_str(&format!(
            "{:<3} {:<24} {:>8} {:>9} {:>12} {:>7} {:>6} {:>7.2} {:>7.1}%\n",
            s.stage,
            s.name,
            s.context,
            s.samples,
            s.tokens,
            s.packs,
            s.steps,
            s.epochs,
            s.padding * 100.0
        ));
    }
    if problems.is_empty() {
        text.push_str("plan: ok\n");
    } else {
        text.push_str(&format!("plan: {} problem(s):\n", problems.len()));
        for p in problems {
            text.push_str(&format!("  - {p}\n"));
        }
    }
    text
}
