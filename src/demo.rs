//! The training half of `lvpipe demo`: the recipe's stages chained over the
//! demo's shards, evaluated after stages 1, 3 and the last, reported in
//! Markdown with the plots.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use lvpipe_pipeline::Recipe;
use serde_json::Value;

use crate::commands::log;
use crate::eval::{EvalSettings, evaluate};
use crate::training::{Chain, chain};

pub struct DemoTraining<'a> {
    pub out: &'a Path,
    /// The recipe file, and the recipe it holds.
    pub recipe_path: &'a Path,
    pub recipe: &'a Recipe,
    pub shards: &'a Path,
    pub mixes: &'a Path,
    /// The synthetic corpus (answers and the held-out set).
    pub raw: &'a Path,
    pub steps: Option<u64>,
    pub eval_limit: usize,
}

/// Trains every stage, evaluates, and returns the report's section.
pub fn train_and_evaluate(d: &DemoTraining) -> Result<String> {
    let started = Instant::now();
    let runs = d.out.join("runs");
    let (recipe, stages) = (d.recipe, d.recipe.stages.len());
    log(&format!(
        "lvpipe demo: training stages 1 to {stages} into {}",
        runs.display()
    ));
    let recipe_abs = std::path::absolute(d.recipe_path)?;
    let tokenizer = std::path::absolute(d.raw.join("tokenizer.json"))?;
    let trained = chain(&Chain {
        recipe: &recipe_abs,
        shards: d.shards,
        tokenizer: &tokenizer,
        out: &runs,
        mixes: Some(d.mixes),
        stages: (1, stages),
        steps: d.steps,
        clip: 1.0,
        save_every: 50,
        abort_after: None,
    })?;
    let train_seconds = started.elapsed().as_secs_f64();
    let mut text = format!(
        "\n## Training\n\n{} stages in {train_seconds:.0} s on CPU.\n\n\
         | stage | steps | loss (first -> last) | tokens | seconds | tokens/s | trainable parameters |\n\
         |---|---|---|---|---|---|---|\n",
        trained.len()
    );
    for (number, s) in &trained {
        text.push_str(&format!(
            "| {number} {} | {} | {:.3} -> {:.3} | {} | {:.1} | {:.0} | {} |\n",
            recipe.stages[number - 1].name,
            s.steps,
            s.first_loss,
            s.last_loss,
            s.tokens,
            s.seconds,
            s.tokens as f64 / s.seconds.max(1e-9),
            s.trainable_params
        ));
    }
    text.push_str("\n![loss](runs/loss.png)\n\n![learning rate](runs/lr.png)\n");

    // Needles at the short-SFT context and at four times it.
    let short = recipe
        .stages
        .get(2)
        .or(recipe.stages.last())
        .map_or(512, |s| s.context) as usize;
    let lengths = vec![short, 4 * short];
    let mut evals: Vec<(usize, Value)> = Vec::new();
    let mut points = vec![(1, vec!["vqa"])];
    if stages >= 3 {
        points.push((3, vec!["vqa", "niah_text", "ppl"]));
    }
    if stages > 3 {
        points.push((stages, vec!["vqa", "niah_text", "niah_video", "ppl"]));
    }
    for (stage, suites) in points {
        let out = d.out.join(format!("eval/stage-{stage}"));
        log(&format!(
            "lvpipe demo: evaluating stage {stage} ({})",
            suites.join(", ")
        ));
        let report = evaluate(
            &EvalSettings {
                run: runs.join(format!("stage-{stage}")),
                data: d.raw.to_path_buf(),
                suites: suites.iter().map(|s| s.to_string()).collect(),
                out,
                limit: d.eval_limit,
                niah_lengths: lengths.clone(),
                niah_depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
                // A short evaluation (tests) asks one needle per cell.
                niah_trials: if d.eval_limit > 0 && d.eval_limit < 20 {
                    1
                } else {
                    4
                },
                video_frames: vec!["fps:2,max:64".into()],
                clip_frames: "uniform:8".into(),
            },
            &mut |_| {},
        )?;
        evals.push((stage, report));
    }
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0))
    };
    let at = |r: &Value, length: usize| {
        r["niah_text"]["by_length"]
            .as_array()
            .and_then(|rows| rows.iter().find(|x| x["length"] == length))
            .map_or("-".to_string(), |x| pct(&x["accuracy"]))
    };
    text.push_str(&format!(
        "\n## Evaluation (held-out synthetic set)\n\n\
         | after stage | VQA | VQA chance | needle @{} | needle @{} | video needle | perplexity |\n\
         |---|---|---|---|---|---|---|\n",
        lengths[0], lengths[1]
    ));
    for (stage, r) in &evals {
        text.push_str(&format!(
            "| {stage} | {} | {} | {} | {} | {} | {} |\n",
            pct(&r["vqa"]["accuracy"]),
            pct(&r["vqa"]["chance"]),
            at(r, lengths[0]),
            at(r, lengths[1]),
            pct(&r["niah_video"]["accuracy"]),
            r["ppl"]["perplexity"]
                .as_f64()
                .map_or("-".to_string(), |p| format!("{p:.2}")),
        ));
    }
    for (stage, r) in &evals {
        if let Some(rows) = r["vqa"]["table"].as_array() {
            text.push_str(&format!(
                "\nVQA after stage {stage}, by question:\n\n| modality | attribute | n | accuracy | chance |\n|---|---|---|---|---|\n"
            ));
            for row in rows {
                text.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    row["modality"].as_str().unwrap_or(""),
                    row["attribute"].as_str().unwrap_or(""),
                    row["n"],
                    pct(&row["accuracy"]),
                    pct(&row["chance"]),
                ));
            }
        }
        for plot in ["niah_text.png", "niah_video.png"] {
            if d.out.join(format!("eval/stage-{stage}/{plot}")).exists() {
                text.push_str(&format!(
                    "\n![{plot} after stage {stage}](eval/stage-{stage}/{plot})\n"
                ));
            }
        }
    }
    text.push_str(&format!(
        "\nGoals (issue 5): VQA >= 95% after stage 3; needle >= 90% at {} tokens after stage {}, \
         against < 30% after stage 3. Training and evaluation took {:.0} s.\n",
        lengths[1],
        stages,
        started.elapsed().as_secs_f64()
    ));
    Ok(text)
}
