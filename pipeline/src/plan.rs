//! `plan`: every problem of a recipe, on its own and against shards, before any training.

use serde::Serialize;

use crate::Result;
use crate::catalog::Catalog;
use crate::mix::plan_stage;
use crate::recipe::Recipe;

/// What a stage will see.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    pub stage: usize,
    pub name: String,
    pub context: u32,
    /// Sample instances (repeats and chunks counted).
    pub samples: u64,
    /// Expanded tokens of one epoch.
    pub tokens: u64,
    pub packs: u64,
    pub steps_per_epoch: u64,
    /// Total optimizer steps (from `steps`, or `epochs` x steps per epoch).
    pub steps: u64,
    /// Epochs those steps cover.
    pub epochs: f64,
    /// Share of packed positions that are padding.
    pub padding: f64,
    /// Samples left out for being longer than the context.
    pub too_long: u64,
}

/// Checks `recipe` alone and against the shards; returns the problems (one
/// line each, empty when the recipe is fine) and, per stage, what it will see.
pub async fn plan(recipe: &Recipe, catalog: &Catalog) -> Result<(Vec<String>, Vec<StagePlan>)> {
    let mut problems = recipe.check();
    let manifest = catalog.manifest()?;
    if manifest.chat_template != recipe.model.chat_template {
        problems.push(format!(
            "model: chat template `{}` but the shards were tokenized with `{}`: rebuild them or fix the recipe",
            recipe.model.chat_template, manifest.chat_template
        ));
    }
    let max_id = catalog
        .query("SELECT max(t) AS m FROM (SELECT unnest(input_ids) AS t FROM samples)")
        .await?;
    let max_id = max_id
        .first()
        .filter(|b| b.num_rows() > 0)
        .and_then(|b| arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::UInt64).ok())
        .and_then(|a| {
            use arrow::array::{Array, AsArray};
            let a = a.as_primitive::<arrow::datatypes::UInt64Type>().clone();
            (!a.is_null(0)).then(|| a.value(0))
        });
    if let Some(max_id) = max_id
        && max_id >= u64::from(recipe.model.vocab_size)
    {
        problems.push(format!(
            "model: vocab_size {} but the shards hold token id {max_id} (tokenizer {}): the embedding would overflow",
            recipe.model.vocab_size, manifest.tokenizer_fingerprint
        ));
    }
    let mut plans = Vec::new();
    for (i, stage) in recipe.stages.iter().enumerate() {
        let at = format!("stage {} ({})", i + 1, stage.name);
        // Queries that do not parse are already reported; plan the rest.
        let mut stage = stage.clone();
        stage
            .sources
            .retain(|s| datafusion::sql::parser::DFParser::parse_sql(&s.sql("sample_id")).is_ok());
        let stage = &stage;
        if !crate::recipe::stage_limits(&at, stage).is_empty() {
            continue; // reported by the recipe's check; planning would not end
        }
        let planned = match plan_stage(catalog, recipe, stage, None).await {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let mut too_long = 0;
        for report in &planned.selection.reports {
            if report.selected == 0 {
                problems.push(format!(
                    "{at}, source {}: the query selects no samples",
                    report.source
                ));
            }
            if report.too_long > 0 {
                problems.push(format!(
                    "{at}, source {}: {} of {} samples are longer than the context {} with media expanded \
                     ({} tokens per image or frame) and would be left out",
                    report.source,
                    report.too_long,
                    report.selected,
                    stage.context,
                    recipe.model.tokens_per_media()
                ));
            }
            too_long += report.too_long;
        }
        let packs = planned.packs.len() as u64;
        let spe = packs / u64::from(stage.global_batch.max(1));
        if packs > 0 && spe == 0 {
            problems.push(format!(
                "{at}: {packs} packs make no full global batch of {}",
                stage.global_batch
            ));
        }
        let steps = stage
            .steps
            .unwrap_or(spe * u64::from(stage.epochs.unwrap_or(0)));
        let capacity = packs * u64::from(stage.context);
        plans.push(StagePlan {
            stage: i + 1,
            name: stage.name.clone(),
            context: stage.context,
            samples: planned.samples() as u64,
            tokens: planned.tokens,
            packs,
            steps_per_epoch: spe,
            steps,
            epochs: if spe == 0 {
                0.0
            } else {
                steps as f64 / spe as f64
            },
            padding: if capacity == 0 {
                0.0
            } else {
                1.0 - planned.tokens as f64 / capacity as f64
            },
            too_long,
        });
    }
    Ok((problems, plans))
}
