//! `lvpipe train`: one stage, a chain of stages (`--stages 1-5`), or a
//! resume (`--resume DIR`).
//!
//! Every stage folder gets a `run.json` with the settings it was started
//! with (absolute paths), which is all `--resume` needs, and a copy of the
//! tokenizer, so the folder is a self-contained model (config.json,
//! model.safetensors, tokenizer.json) for `lvpipe eval`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lvpipe_pipeline::{Catalog, Mix, Recipe, build_mix, current_mix};
use lvpipe_trainer::run::{
    StageRun, Summary, TrainerState, finished, run_stage, weights_fingerprint,
};
use serde::{Deserialize, Serialize};

use crate::args::TrainArgs;
use crate::commands::{log, runtime};

/// `run.json`: how a stage run was started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub recipe: PathBuf,
    pub stage: usize,
    pub mix: PathBuf,
    pub tokenizer: PathBuf,
    /// The run folder whose weights this stage starts from.
    pub init: Option<PathBuf>,
    pub steps: Option<u64>,
    pub clip: f64,
    pub save_every: u64,
}

impl RunSpec {
    pub const FILE_NAME: &'static str = "run.json";
}

pub fn train(args: TrainArgs) -> Result<std::process::ExitCode> {
    if let Some(dir) = &args.resume {
        let path = dir.join(RunSpec::FILE_NAME);
        let spec: RunSpec = serde_json::from_str(
            &fs_err::read_to_string(&path)
                .with_context(|| format!("{} is not a run folder", dir.display()))?,
        )
        .with_context(|| path.display().to_string())?;
        if let Some(state) = finished(dir) {
            log(&format!(
                "{}: stage {} already finished all {} steps; nothing to resume",
                dir.display(),
                state.stage,
                state.steps
            ));
            return Ok(std::process::ExitCode::SUCCESS);
        }
        train_stage(&spec, dir, true, args.abort_after)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let recipe_path = absolute(args.recipe.as_deref().expect("clap requires it"))?;
    let tokenizer = absolute(args.tokenizer.as_deref().expect("clap requires it"))?;
    let out = args.out.clone().expect("clap requires it");
    if let Some((first, last)) = args.stages {
        let shards = args.shards.as_deref().expect("clap requires it");
        chain(&Chain {
            recipe: &recipe_path,
            shards,
            tokenizer: &tokenizer,
            out: &out,
            mixes: None,
            stages: (first, last),
            steps: args.steps,
            clip: args.clip,
            save_every: args.save_every,
            abort_after: args.abort_after,
        })?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let (Some(stage), Some(mix)) = (args.stage, args.mix.as_deref()) else {
        bail!("give --stage N with --mix DIR, or --stages A-B with --shards DIR");
    };
    let spec = RunSpec {
        recipe: recipe_path,
        stage,
        mix: absolute(mix)?,
        tokenizer,
        init: args.init.as_deref().map(absolute).transpose()?,
        steps: args.steps,
        clip: args.clip,
        save_every: args.save_every,
    };
    train_stage(&spec, &out, false, args.abort_after)?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A chain of stages mixed from shards and trained in order.
pub struct Chain<'a> {
    pub recipe: &'a Path,
    pub shards: &'a Path,
    pub tokenizer: &'a Path,
    pub out: &'a Path,
    /// Where the stage mixes go (default: OUT/mixes).
    pub mixes: Option<&'a Path>,
    pub stages: (usize, usize),
    pub steps: Option<u64>,
    pub clip: f64,
    pub save_every: u64,
    pub abort_after: Option<u64>,
}

/// Mixes and trains stages `first..=last` into `out/stage-N`; returns the
/// summaries of the stages it trained (finished ones are skipped).
pub fn chain(c: &Chain) -> Result<Vec<(usize, Summary)>> {
    let recipe = Recipe::load(c.recipe)?;
    let problems = recipe.check();
    if !problems.is_empty() {
        bail!("{}: {}", c.recipe.display(), problems.join("; "));
    }
    let (first, last) = c.stages;
    recipe.stage(last)?;
    let mixes = c
        .mixes
        .map_or_else(|| c.out.join("mixes"), Path::to_path_buf);
    let catalog = runtime()?.block_on(Catalog::open(c.shards))?;
    let mut done = Vec::new();
    for number in first..=last {
        let stage = recipe.stage(number)?;
        let dir = c.out.join(format!("stage-{number}"));
        let meta = match current_mix(&catalog, &recipe, number, &mixes) {
            Some(meta) => meta,
            None => {
                log(&format!("stage {number} ({}): mixing", stage.name));
                runtime()?.block_on(build_mix(&catalog, &recipe, number, &mixes))?
            }
        };
        let fingerprint = format!(
            "{}/{}",
            meta.shards_build_fingerprint, meta.tokenizer_fingerprint
        );
        let init = if stage.init == "base" {
            None
        } else {
            let k = recipe
                .stages
                .iter()
                .position(|s| s.name == stage.init)
                .with_context(|| {
                    format!(
                        "stage {number} starts from `{}`, which is no stage of the recipe",
                        stage.init
                    )
                })?;
            let from = c.out.join(format!("stage-{}", k + 1));
            if finished(&from).is_none() {
                bail!(
                    "stage {number} starts from stage {} ({}), which has not finished in {}",
                    k + 1,
                    stage.init,
                    from.display()
                );
            }
            Some(absolute(&from)?)
        };
        // The start's weights: a finished stage whose start has been
        // trained again since is stale too.
        let init_fingerprint = match &init {
            Some(from) => weights_fingerprint(&from.join("model.safetensors"))?,
            None => String::new(),
        };
        let same = |state: &TrainerState| {
            state.recipe_fingerprint == meta.recipe_fingerprint
                && state.mix_fingerprint == fingerprint
                && state.init_fingerprint == init_fingerprint
        };
        if let Some(state) = finished(&dir) {
            if same(&state) {
                log(&format!(
                    "stage {number} ({}): finished earlier ({} steps), skipped",
                    stage.name, state.steps
                ));
                continue;
            }
            log(&format!(
                "stage {number} ({}): {} was trained on other data, another recipe or other start weights; training it again",
                stage.name,
                dir.display()
            ));
            fs_err::remove_dir_all(&dir)?;
        }
        let spec = RunSpec {
            recipe: c.recipe.to_path_buf(),
            stage: number,
            mix: absolute(&mixes.join(format!("stage-{number}")))?,
            tokenizer: c.tokenizer.to_path_buf(),
            init,
            steps: c.steps,
            clip: c.clip,
            save_every: c.save_every,
        };
        let summary = train_stage(&spec, &dir, true, c.abort_after)?;
        done.push((number, summary));
    }
    let plots = plot_runs(c.out)?;
    if !plots.is_empty() {
        log(&format!(
            "plots: {}",
            plots
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(done)
}

/// `loss.png` and `lr.png` in `runs`: every stage-N folder's curve on one
/// axis of global steps, stage starts marked.
pub fn plot_runs(runs: &Path) -> Result<Vec<PathBuf>> {
    use crate::plot::{Series, line_chart};
    let dirs = lvpipe_pipeline::lineage::run_dirs(runs)?;
    let (mut loss, mut lr, mut markers) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0u64;
    for dir in dirs.iter().filter(|d| d.as_path() != runs) {
        let text = fs_err::read_to_string(dir.join("metrics.jsonl"))?;
        let mut stage = None;
        let mut last = 0;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let step = v["step"].as_u64().unwrap_or(0);
            stage = stage.or(v["stage"].as_u64());
            let x = (offset + step) as f64;
            loss.push((x, v["loss"].as_f64().unwrap_or(f64::NAN)));
            lr.push((x, v["lr"].as_f64().unwrap_or(f64::NAN)));
            last = last.max(step);
        }
        if let Some(stage) = stage {
            markers.push(((offset + 1) as f64, format!("S{stage}")));
        }
        offset += last;
    }
    if loss.is_empty() {
        return Ok(vec![]);
    }
    let paths = vec![runs.join("loss.png"), runs.join("lr.png")];
    line_chart(
        &paths[0],
        "Training loss across the curriculum",
        "global step",
        "loss",
        &[Series {
            label: "loss".into(),
            points: loss,
        }],
        &markers,
    )?;
    line_chart(
        &paths[1],
        "Learning rate (warmup, then cosine or constant; reset per stage)",
        "global step",
        "lr",
        &[Series {
            label: "lr".into(),
            points: lr,
        }],
        &markers,
    )?;
    Ok(paths)
}

/// Trains one stage as `spec` says into `out` (continuing from its newest
/// checkpoint when `resume`).
pub fn train_stage(
    spec: &RunSpec,
    out: &Path,
    resume: bool,
    abort_after: Option<u64>,
) -> Result<Summary> {
    let recipe = Recipe::load(&spec.recipe)?;
    let mix = Mix::open(&spec.mix)?;
    let tokenizer = lvpipe_sharding::ChatTokenizer::load(&spec.tokenizer)?;
    if tokenizer.fingerprint() != mix.meta.tokenizer_fingerprint {
        bail!(
            "{} is not the tokenizer the mix's shards were built with",
            spec.tokenizer.display()
        );
    }
    fs_err::create_dir_all(out)?;
    fs_err::write(
        out.join(RunSpec::FILE_NAME),
        serde_json::to_string_pretty(spec)? + "\n",
    )?;
    fs_err::copy(&spec.tokenizer, out.join("tokenizer.json"))?;
    let stage_name = recipe.stage(spec.stage)?.name.clone();
    let run = StageRun {
        recipe: &recipe,
        stage: spec.stage,
        mix,
        image_token: tokenizer.special().image,
        out: out.to_path_buf(),
        init: spec.init.as_ref().map(|d| d.join("model.safetensors")),
        steps: spec.steps,
        clip: spec.clip,
        save_every: spec.save_every,
        resume,
        abort_after,
    };
    let bar = crate::progress::steps_bar();
    bar.set_prefix(format!("stage {} {stage_name}", spec.stage));
    let summary = run_stage(&run, &mut |record, total| {
        bar.set_length(total);
        bar.set_position(record.step);
        bar.set_message(format!("loss {:.4} lr {:.2e}", record.loss, record.lr));
    })?;
    bar.finish_and_clear();
    let losses = if summary.first_loss.is_nan() {
        "no steps".to_string()
    } else {
        format!("loss {:.4} -> {:.4}", summary.first_loss, summary.last_loss)
    };
    let resumed = summary
        .resumed_from
        .map(|s| format!(", resumed after step {s}"))
        .unwrap_or_default();
    log(&format!(
        "stage {} ({stage_name}): {} steps{resumed}, {losses}, {} tokens in {:.1} s ({:.0} tokens/s), {} trainable parameters; checkpoint in {}",
        spec.stage,
        summary.steps,
        summary.tokens,
        summary.seconds,
        summary.tokens as f64 / summary.seconds.max(1e-9),
        summary.trainable_params,
        out.display()
    ));
    Ok(summary)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| path.display().to_string())
}
