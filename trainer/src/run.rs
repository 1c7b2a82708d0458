//! Running one curriculum stage over its mix: initialize (fresh or from the
//! previous stage's weights), train, record, checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use lvpipe_pipeline::{Loader, LoaderState, Mix, Recipe};
use serde::{Deserialize, Serialize};

use crate::model::{Config, Model, Row};
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
    /// weights, as `init = "base"` without pretrained checkpoints).
    pub init: Option<PathBuf>,
    /// Steps to run instead of the recipe's (the loader continues into
    /// further epochs as needed); the schedule spans them.
    pub steps: Option<u64>,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
}

/// The JSON trainer state written with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub stage: usize,
    pub stage_name: String,
    pub step: u64,
    pub steps: u64,
    pub lr: f64,
    pub loader: LoaderState,
    pub rope_base: f64,
    pub recipe_fingerprint: String,
    pub mix_fingerprint: String,
}

/// What a stage run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub tokens: u64,
    pub seconds: f64,
    pub trainable_params: usize,
}

/// Trains stage `run.stage` of the recipe over its mix, writing
/// `model.safetensors`, `optimizer.safetensors`, `trainer_state.json` and
/// `metrics.jsonl` (one line per step) into `run.out`.
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
    let mut config = Config::from_recipe(&run.recipe.model, run.image_token);
    config.rope_base = stage.rope_base.unwrap_or(run.recipe.model.rope_base);
    if config.image_size as u32 != run.mix.meta.image_size {
        return Err(Error(format!(
            "the mix decodes media at {} px but the model takes {} px",
            run.mix.meta.image_size, config.image_size
        )));
    }
    let vars = VarMap::new();
    let model = Model::new(config.clone(), &vars, &device).map_err(err("model"))?;
    if let Some(init) = &run.init {
        let mut vars = vars.clone();
        vars.load(init)
            .map_err(err(format!("loading {}", init.display())))?;
    }
    let mut opt = AdamW::new(&vars, &stage.trainable).map_err(err("optimizer"))?;
    let trainable_params = {
        let data = vars.data().lock().expect("var map lock");
        opt.names().map(|n| data[n].as_tensor().elem_count()).sum()
    };
    let loader = Loader::new(run.mix.clone(), 0, 1).map_err(err("loader"))?;
    let per_epoch = run.mix.steps_per_epoch();
    let planned = stage
        .steps
        .unwrap_or(u64::from(stage.epochs.unwrap_or(1)) * per_epoch);
    let steps = run.steps.unwrap_or(planned);
    fs_err::create_dir_all(&run.out).map_err(err("output folder"))?;
    let mut metrics =
        fs_err::File::create(run.out.join("metrics.jsonl")).map_err(err("metrics"))?;
    let (mut first_loss, mut last_loss, mut tokens, mut lr) = (f64::NAN, f64::NAN, 0, 0.0);
    for (step, batch) in loader.stream(0, steps, 2).into_iter().enumerate() {
        let batch = batch.map_err(err("loader"))?;
        lr = learning_rate(stage.lr, stage.schedule, stage.warmup, step as u64, steps);
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
        let record = train_step(&model, &mut opt, &rows, lr, run.clip, &device).map_err(Error)?;
        if step == 0 {
            first_loss = record.loss;
        }
        last_loss = record.loss;
        tokens += record.tokens;
        let mut line = serde_json::to_value(&record).expect("record serializes");
        line["stage"] = serde_json::json!(run.stage);
        line["elapsed_s"] = serde_json::json!(started.elapsed().as_secs_f64());
        writeln!(metrics, "{line}").map_err(err("metrics"))?;
        on_step(&record, steps);
    }
    let state = TrainerState {
        stage: run.stage,
        stage_name: stage.name.clone(),
        step: opt.step,
        steps,
        lr,
        loader: LoaderState {
            stage: run.stage,
            step: opt.step,
        },
        rope_base: config.rope_base,
        recipe_fingerprint: run.mix.meta.recipe_fingerprint.clone(),
        mix_fingerprint: format!(
            "{}/{}",
            run.mix.meta.shards_build_fingerprint, run.mix.meta.tokenizer_fingerprint
        ),
    };
    save_checkpoint(&run.out, &vars, &opt, &state)?;
    Ok(Summary {
        steps: opt.step,
        first_loss,
        last_loss,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        trainable_params,
    })
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
    let mut moments = std::collections::HashMap::new();
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
