//! Running one curriculum stage over its mix: initialize (seeded fresh
//! weights, or the previous stage's), train, record, checkpoint, resume.
//!
//! A stage's folder, when it is done:
//! - `model.safetensors` (HF names, LoRA merged), `optimizer.safetensors`
//!   (`NAME.exp_avg`, `NAME.exp_avg_sq`), `trainer_state.json`,
//!   `config.json` (the model's sizes and RoPE base);
//! - `metrics.jsonl`: one line per optimizer step;
//! - `lineage.parquet`: which samples every step trained on;
//! - `checkpoints/step-NNNNNN/`: the last two intermediate checkpoints
//!   (every `save_every` steps), each written to a temporary folder and
//!   renamed into place, so a kill never leaves a half-written one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use lvpipe_pipeline::{Loader, LoaderState, Mix, Recipe};
use serde::{Deserialize, Serialize};

use crate::model::{Config, Model, Row, init_seeded};
use crate::train::{AdamW, StepRecord, learning_rate, train_step};

/// Errors that stop a training run.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err<E: std::fmt::Display>(context: impl std::fmt::Display) -> impl Fn(E) -> Error {
    move |e| Error(format!("{context}: {e}"))
}

/// What to run.
pub struct StageRun<'a> {
    pub recipe: &'a Recipe,
    /// 1-based stage number.
    pub stage: usize,
    pub mix: Arc<Mix>,
    /// The `<image>` token id of the shards' tokenizer.
    pub image_token: u32,
    pub out: PathBuf,
    /// `model.safetensors` of the stage this one starts from (`None`: fresh
    /// seeded weights, as `init = "base"` without pretrained checkpoints).
    pub init: Option<PathBuf>,
    /// Steps to run instead of the recipe's (the loader continues into
    /// further epochs as needed); the schedule spans them.
    pub steps: Option<u64>,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    /// Intermediate checkpoint every this many steps (0: at the end only).
    pub save_every: u64,
    /// Continue from the newest checkpoint in `out` instead of starting over.
    pub resume: bool,
    /// For crash tests: abort the process right after this step, as a kill
    /// would (no final checkpoint, no clean-up).
    pub abort_after: Option<u64>,
}

/// The JSON trainer state written with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub stage: usize,
    pub stage_name: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the stage runs in all.
    pub steps: u64,
    pub lr: f64,
    /// Where the loader goes on from: its batches are a pure function of the
    /// mix and the step, so this is all a resume needs of it.
    pub loader: LoaderState,
    /// The trainer's randomness: fresh weights and LoRA adapters are drawn
    /// from this seed (the stage's); nothing random runs after that.
    pub seed: u64,
    pub rope_base: f64,
    pub recipe_fingerprint: String,
    pub mix_fingerprint: String,
    /// [`weights_fingerprint`] of the weights the stage started from (empty:
    /// fresh weights). A chain retrains a finished stage whose start changed.
    #[serde(default)]
    pub init_fingerprint: String,
}

/// blake3 of a weights file (16 hex digits): which weights a stage started
/// from, so that a retrained earlier stage is noticed.
pub fn weights_fingerprint(path: &Path) -> Result<String, Error> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(fs_err::File::open(path).map_err(err("hashing the start weights"))?)
        .map_err(err(format!("hashing {}", path.display())))?;
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

/// `config.json`: what loading the weights back needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedConfig {
    pub model: Config,
    pub stage: usize,
    pub stage_name: String,
    pub tokenizer_fingerprint: String,
}

impl SavedConfig {
    pub const FILE_NAME: &'static str = "config.json";

    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(Self::FILE_NAME);
        let text = fs_err::read_to_string(&path).map_err(err("reading the run's config"))?;
        serde_json::from_str(&text).map_err(err(path.display()))
    }
}

/// What a stage run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps done in all (including those before a resume).
    pub steps: u64,
    /// The step this run resumed after, if it resumed.
    pub resumed_from: Option<u64>,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Tokens trained on by this process.
    pub tokens: u64,
    pub seconds: f64,
    pub trainable_params: usize,
}

/// Trains stage `run.stage` of the recipe over its mix (see the module
/// docs for what it writes). `on_step` sees every step's record and the
/// stage's step count.
pub fn run_stage(
    run: &StageRun,
    on_step: &mut dyn FnMut(&StepRecord, u64),
) -> Result<Summary, Error> {
    let started = Instant::now();
    let stage = run
        .recipe
        .stages
        .get(run.stage.wrapping_sub(1))
        .ok_or_else(|| Error(format!("the recipe has no stage {}", run.stage)))?;
    let device = Device::Cpu;
    let per_epoch = run.mix.steps_per_epoch();
    let planned = stage
        .steps
        .unwrap_or(u64::from(stage.epochs.unwrap_or(1)) * per_epoch);
    let steps = run.steps.unwrap_or(planned);
    let default_base = run.recipe.model.rope_base;
    let mut config = Config::from_recipe(&run.recipe.model, run.image_token);
    config.rope_base = stage.rope_base_at(default_base, 0, steps);
    if config.image_size as u32 != run.mix.meta.image_size {
        return Err(Error(format!(
            "the mix decodes media at {} px but the model takes {} px",
            run.mix.meta.image_size, config.image_size
        )));
    }
    let mix_fingerprint = format!(
        "{}/{}",
        run.mix.meta.shards_build_fingerprint, run.mix.meta.tokenizer_fingerprint
    );
    let vars = VarMap::new();
    let mut model = Model::new(config.clone(), &vars, &device).map_err(err("model"))?;
    init_seeded(&vars, stage.seed, &config).map_err(err("initializing"))?;
    let mut init_fingerprint = String::new();
    if let Some(init) = &run.init {
        init_fingerprint = weights_fingerprint(init)?;
        let mut vars = vars.clone();
        vars.load(init)
            .map_err(err(format!("loading {}", init.display())))?;
    }
    let lora = stage.trainable.iter().any(|m| m == "llm_lora");
    if lora {
        let (r, alpha) = stage.lora();
        model
            .attach_lora(&vars, r, alpha, stage.seed)
            .map_err(err("LoRA adapters"))?;
    }
    let mut opt = AdamW::new(&vars, &stage.trainable).map_err(err("optimizer"))?;
    (opt.beta2, opt.weight_decay) = stage.adamw();
    let trainable_params = {
        let data = vars.data().lock().expect("var map lock");
        opt.names().map(|n| data[n].as_tensor().elem_count()).sum()
    };
    fs_err::create_dir_all(&run.out).map_err(err("output folder"))?;
    let state_for = |step: u64, lr: f64, rope_base: f64| TrainerState {
        stage: run.stage,
        stage_name: stage.name.clone(),
        step,
        steps,
        lr,
        loader: LoaderState {
            stage: run.stage,
            step,
        },
        seed: stage.seed,
        rope_base,
        recipe_fingerprint: run.mix.meta.recipe_fingerprint.clone(),
        mix_fingerprint: mix_fingerprint.clone(),
        init_fingerprint: init_fingerprint.clone(),
    };

    // Resume: weights, adapters, moments and step of the newest checkpoint.
    let mut resumed_from = None;
    if run.resume {
        if let Some((dir, state)) = newest_checkpoint(&run.out)? {
            for (what, ours, theirs) in [
                (
                    "recipe",
                    &run.mix.meta.recipe_fingerprint,
                    &state.recipe_fingerprint,
                ),
                ("mix", &mix_fingerprint, &state.mix_fingerprint),
                ("start", &init_fingerprint, &state.init_fingerprint),
            ] {
                // Checkpoints from before the start was recorded have none.
                if ours != theirs && !(what == "start" && theirs.is_empty()) {
                    return Err(Error(format!(
                        "{}: made with another {what} ({theirs}, now {ours}); start a new run instead of resuming",
                        dir.display()
                    )));
                }
            }
            if state.stage != run.stage || state.steps != steps {
                return Err(Error(format!(
                    "{}: a checkpoint of stage {} with {} steps, not of stage {} with {steps}",
                    dir.display(),
                    state.stage,
                    state.steps,
                    run.stage
                )));
            }
            let mut v = vars.clone();
            v.load(dir.join("model.safetensors"))
                .map_err(err(format!("loading {}/model.safetensors", dir.display())))?;
            let moments =
                candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)
                    .map_err(err(format!(
                        "loading {}/optimizer.safetensors",
                        dir.display()
                    )))?;
            opt.restore(&moments, state.step)
                .map_err(|e| Error(format!("{}: {e}", dir.display())))?;
            resumed_from = Some(state.step);
        }
    }
    let start = resumed_from.unwrap_or(0);
    if resumed_from.is_none() {
        // A fresh start: checkpoints of an earlier run in this folder must
        // not be taken for this run's by a later resume.
        match fs_err::remove_dir_all(run.out.join("checkpoints")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error(format!("removing old checkpoints: {e}")));
            }
            _ => {}
        }
    }
    let metrics_path = run.out.join("metrics.jsonl");
    keep_metrics_until(&metrics_path, start)?;
    let mut metrics = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(err("metrics"))?;

    let loader = Loader::new(run.mix.clone(), 0, 1).map_err(err("loader"))?;
    let micro = stage.micro_batch.map_or(usize::MAX, |m| m.max(1) as usize);
    let (mut first_loss, mut last_loss, mut tokens, mut lr) = (f64::NAN, f64::NAN, 0, 0.0);
    let mut rope_base = config.rope_base;
    let mut last_step_at = Instant::now();
    let stream = Loader::new(run.mix.clone(), 0, 1)
        .map_err(err("loader"))?
        .stream(start, steps.saturating_sub(start), 2);
    for (i, batch) in stream.into_iter().enumerate() {
        let step = start + i as u64;
        let batch = batch.map_err(err("loader"))?;
        lr = learning_rate(stage.lr, stage.schedule, stage.warmup, step, steps);
        let base = stage.rope_base_at(default_base, step, steps);
        if base != rope_base {
            model.set_rope_base(base);
            rope_base = base;
        }
        let rows: Vec<(Row, &[String])> = batch
            .packs
            .iter()
            .map(|p| {
                (
                    Row {
                        input_ids: &p.input_ids,
                        loss_mask: &p.loss_mask,
                        boundaries: &p.boundaries,
                        pixels: &p.pixels,
                    },
                    p.sample_ids.as_slice(),
                )
            })
            .collect();
        let record =
            train_step(&model, &mut opt, &rows, micro, lr, run.clip, &device).map_err(Error)?;
        let mut per_source = BTreeMap::<&str, u64>::new();
        for p in &batch.packs {
            for (k, source) in p.sources.iter().enumerate() {
                *per_source.entry(source).or_default() +=
                    u64::from(p.boundaries[k + 1] - p.boundaries[k]);
            }
        }
        if i == 0 {
            first_loss = record.loss;
        }
        last_loss = record.loss;
        tokens += record.tokens;
        let took = last_step_at.elapsed().as_secs_f64();
        last_step_at = Instant::now();
        let mut line = serde_json::to_value(&record).expect("record serializes");
        line["stage"] = serde_json::json!(run.stage);
        line["rope_base"] = serde_json::json!(rope_base);
        line["source_tokens"] = serde_json::json!(per_source);
        line["tokens_per_s"] = serde_json::json!(record.tokens as f64 / took.max(1e-9));
        line["elapsed_s"] = serde_json::json!(started.elapsed().as_secs_f64());
        writeln!(metrics, "{line}").map_err(err("metrics"))?;
        on_step(&record, steps);
        if run.save_every > 0 && record.step % run.save_every == 0 && record.step < steps {
            save_intermediate(
                &run.out,
                &vars,
                &opt,
                &state_for(record.step, lr, rope_base),
            )?;
        }
        if run.abort_after == Some(record.step) {
            metrics.flush().map_err(err("metrics"))?;
            std::process::abort();
        }
    }
    if lora {
        model.merge_lora(&vars).map_err(err("merging LoRA"))?;
        opt.forget_missing(&vars);
    }
    let lineage =
        lvpipe_pipeline::lineage::lineage(&loader, run.stage, steps).map_err(err("lineage"))?;
    lvpipe_pipeline::lineage::write_parquet(&run.out.join("lineage.parquet"), &lineage)
        .map_err(err("lineage.parquet"))?;
    let saved = SavedConfig {
        model: Config {
            rope_base: stage.final_rope_base(default_base),
            ..config
        },
        stage: run.stage,
        stage_name: stage.name.clone(),
        tokenizer_fingerprint: run.mix.meta.tokenizer_fingerprint.clone(),
    };
    fs_err::write(
        run.out.join(SavedConfig::FILE_NAME),
        serde_json::to_string_pretty(&saved).expect("config serializes") + "\n",
    )
    .map_err(err("config.json"))?;
    save_checkpoint(&run.out, &vars, &opt, &state_for(opt.step, lr, rope_base))?;
    Ok(Summary {
        steps: opt.step,
        resumed_from,
        first_loss,
        last_loss,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        trainable_params,
    })
}

/// Whether `dir` holds a finished stage: its final state has all its steps.
pub fn finished(dir: &Path) -> Option<TrainerState> {
    let text = fs_err::read_to_string(dir.join("trainer_state.json")).ok()?;
    let state: TrainerState = serde_json::from_str(&text).ok()?;
    (state.step >= state.steps && dir.join("model.safetensors").exists()).then_some(state)
}

/// The newest complete checkpoint of a run folder and its state.
fn newest_checkpoint(out: &Path) -> Result<Option<(PathBuf, TrainerState)>, Error> {
    let Some(dir) = checkpoint_dirs(&out.join("checkpoints")).pop() else {
        return Ok(None);
    };
    let path = dir.join("trainer_state.json");
    let text = fs_err::read_to_string(&path).map_err(err("checkpoint state"))?;
    let state = serde_json::from_str(&text).map_err(err(path.display()))?;
    Ok(Some((dir, state)))
}

/// The complete checkpoints (`step-NNNNNN`) under `root`, oldest first
/// (none when it does not exist).
fn checkpoint_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs_err::read_dir(root) else {
        return vec![];
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Drops the lines of steps after `step` (a resumed run writes them again).
fn keep_metrics_until(path: &Path, step: u64) -> Result<(), Error> {
    let Ok(text) = fs_err::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    fs_err::write(path, kept).map_err(err("metrics"))
}

/// An intermediate checkpoint: a temporary folder renamed to
/// `checkpoints/step-NNNNNN`; older ones beyond the last two are removed.
fn save_intermediate(
    out: &Path,
    vars: &VarMap,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<(), Error> {
    let root = out.join("checkpoints");
    let tmp = root.join(format!(".tmp-step-{:06}", state.step));
    let _ = fs_err::remove_dir_all(&tmp);
    fs_err::create_dir_all(&tmp).map_err(err("checkpoint folder"))?;
    save_checkpoint(&tmp, vars, opt, state)?;
    let dir = root.join(format!("step-{:06}", state.step));
    let _ = fs_err::remove_dir_all(&dir);
    fs_err::rename(&tmp, &dir).map_err(err("committing the checkpoint"))?;
    for dir in checkpoint_dirs(&root).iter().rev().skip(2) {
        fs_err::remove_dir_all(dir).map_err(err("removing an old checkpoint"))?;
    }
    Ok(())
}

/// Writes weights, optimizer moments and state, each atomically (a
/// temporary file renamed into place), the state last.
pub fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<(), Error> {
    let tmp = |name: &str| dir.join(format!(".{name}.tmp"));
    vars.save(tmp("model.safetensors"))
        .map_err(err("saving model.safetensors"))?;
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &opt.m {
        moments.insert(format!("{name}.exp_avg"), t.clone());
    }
    for (name, t) in &opt.v {
        moments.insert(format!("{name}.exp_avg_sq"), t.clone());
    }
    candle_core::safetensors::save(&moments, tmp("optimizer.safetensors"))
        .map_err(err("saving optimizer.safetensors"))?;
    fs_err::write(
        tmp("trainer_state.json"),
        serde_json::to_string_pretty(state).expect("state serializes") + "\n",
    )
    .map_err(err("saving trainer_state.json"))?;
    for name in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        fs_err::rename(tmp(name), dir.join(name)).map_err(err(format!("committing {name}")))?;
    }
    Ok(())
}
