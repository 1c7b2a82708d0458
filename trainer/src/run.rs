//! Running one curriculum stage over its mix: initialize (seeded fresh
//! weights, or the previous stage's), resume from a checkpoint, step,
//! record, checkpoint, finish.
//!
//! A stage's folder, when it is done:
//! - `model.safetensors` (HF names, LoRA merged), `optimizer.safetensors`
//!   (`NAME.exp_avg`, `NAME.exp_avg_sq`), `trainer_state.json`,
//!   `config.json` (the model's sizes and RoPE base);
//! - `metrics.jsonl`: one [`StepMetrics`] line per optimizer step;
//! - `lineage.parquet`: which samples every step trained on;
//! - `checkpoints/step-NNNNNN/`: the last two intermediate checkpoints
//!   (every `save_every` steps).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use lvpipe_pipeline::recipe::Stage;
use lvpipe_pipeline::{Batch, Loader, LoaderState, Mix, Recipe};
use lvpipe_schemas::{StepMetrics, TrainableModule};

use crate::checkpoint::{
    SavedConfig, TrainerState, keep_metrics_until, newest_checkpoint, save_checkpoint,
    save_intermediate,
};
use crate::error::TensorContext;
use crate::memory;
use crate::model::{Config, Model, Row, init_seeded};
use crate::optim::Optimizer;
use crate::train::{StepSettings, learning_rate, train_step};
use crate::{Error, Result};

/// What to run.
pub struct StageRun<'a> {
    pub recipe: &'a Recipe,
    /// 1-based stage number.
    pub stage: usize,
    pub mix: Arc<Mix>,
    /// The `<image>` token id of the shards' tokenizer.
    pub image_token: u32,
    pub out: PathBuf,
    /// The model folders this stage starts from (a run's, Hugging Face's or
    /// VILA's, for one part or all; none: fresh seeded weights, as `init =
    /// "base"`).
    pub init: Vec<crate::chain::StartFolder>,
    /// Steps to run instead of the recipe's (the loader continues into
    /// further epochs as needed); the schedule spans them.
    pub steps: Option<u64>,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    /// Intermediate checkpoint every this many steps (0: at the end only).
    pub save_every: u64,
    /// Continue from the newest checkpoint in `out` instead of starting over.
    pub resume: bool,
    /// Activation checkpointing whatever the stage says.
    pub gradient_checkpointing: bool,
    /// Where the stage computes.
    pub device: Device,
    /// What activations are computed in (the weights stay f32).
    pub dtype: candle_core::DType,
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
/// docs for what it writes). `on_step` sees every step's metrics, once they
/// and any checkpoint of that step are on disk, and the stage's step count.
pub fn run_stage(run: &StageRun, on_step: &mut dyn FnMut(&StepMetrics, u64)) -> Result<Summary> {
    let started = Instant::now();
    let mut t = Training::init(run)?;
    let group = crate::dist::group();
    // A stage planned for sequence parallelism splits each row over
    // `sequence_parallel` ranks of a group; one process trains whole rows.
    let degree = match group.size() {
        1 => 1,
        _ => t.stage.sequence_parallel.max(1) as usize,
    };
    let seq = group.set_sequence_parallel(degree)?;
    let ring = t.stage.sp_mode == lvpipe_pipeline::recipe::SpMode::Ring;
    t.model.set_sequence_parallel(seq, ring);
    let resumed_from = if run.resume { t.resume(run)? } else { None };
    if resumed_from.is_none() && group.is_root() {
        // A fresh start: checkpoints of an earlier run in this folder must
        // not be taken for this run's by a later resume.
        match fs_err::remove_dir_all(run.out.join("checkpoints")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let losses = t.step_loop(run, resumed_from.unwrap_or(0), started, on_step)?;
    t.check_same_weights_on_every_rank()?;
    if group.is_root() {
        t.finish(run)?;
    }
    group.barrier();
    Ok(Summary {
        steps: t.opt.step,
        resumed_from,
        first_loss: losses.first,
        last_loss: losses.last,
        tokens: losses.tokens,
        seconds: started.elapsed().as_secs_f64(),
        trainable_params: t.trainable_params,
    })
}

/// A stage being trained: the model and its optimizer, and what the
/// checkpoints record.
struct Training<'a> {
    stage: &'a Stage,
    steps: u64,
    config: Config,
    device: Device,
    vars: VarMap,
    model: Model,
    opt: Optimizer,
    lora: bool,
    trainable_params: usize,
    mix_fingerprint: String,
    init_fingerprint: String,
    rope_base: f64,
    lr: f64,
}

/// The losses and tokens of the steps this process ran.
struct Losses {
    first: f64,
    last: f64,
    tokens: u64,
}

impl<'a> Training<'a> {
    /// The model with seeded fresh weights, or the start's, LoRA adapters
    /// where the stage trains them, and the optimizer.
    fn init(run: &'a StageRun) -> Result<Self> {
        let stage = run.recipe.stage(run.stage)?;
        let device = run.device.clone();
        let planned = stage
            .steps
            .unwrap_or(u64::from(stage.epochs.unwrap_or(1)) * run.mix.steps_per_epoch());
        let steps = run.steps.unwrap_or(planned);
        let mut config = Config::from_recipe(&run.recipe.model, run.image_token);
        config.llm.rope_theta = stage.rope_base_at(run.recipe.model.rope_base, 0, steps);
        config.llm.max_position_embeddings = stage.positions(&run.recipe.model) as usize;
        if let Some(spec) = &stage.rope_scaling {
            config.llm.rope_scaling = Some(
                crate::model::RopeScaling::from_recipe(spec)
                    .map_err(|e| Error::Config(format!("stage `{}`: {}", stage.name, e.0)))?,
            );
        }
        let image_size = config.vision.as_ref().map_or(0, |v| v.image_size);
        if image_size as u32 != run.mix.meta.image_size {
            return Err(Error::Config(format!(
                "the mix decodes media at {} px but the model takes {} px",
                run.mix.meta.image_size, image_size
            )));
        }
        let vars = VarMap::new();
        // Every parameter is seeded (and maybe loaded) next.
        let mut model = Model::unfilled(config.clone(), &vars, &device).context("model")?;
        init_seeded(&vars, stage.seed, &config).context("initializing")?;
        let mut init_fingerprint = String::new();
        if !run.init.is_empty() {
            init_fingerprint = crate::chain::start_fingerprint(&run.init)?;
        }
        for start in &run.init {
            let mut folder = crate::hf::open(&start.path)?;
            if let Some(part) = &start.part {
                folder = folder.only(part)?;
            }
            crate::hf::check_fits(&folder, &config)?;
            crate::hf::load_into(&vars, &folder)?;
        }
        let modules = stage.modules()?;
        let lora = modules.contains(&TrainableModule::LlmLora);
        if lora {
            let (r, alpha) = stage.lora();
            model
                .attach_lora(&vars, r, alpha, stage.seed)
                .context("LoRA adapters")?;
        }
        model
            .set_gradient_checkpointing(stage.gradient_checkpointing || run.gradient_checkpointing);
        model.set_compute_dtype(run.dtype);
        let mut opt = Optimizer::new(&vars, &modules, stage.optimizer).context("optimizer")?;
        (opt.beta2, opt.weight_decay) = stage.adamw();
        opt.loss_scale = crate::optim::LossScale::for_dtype(run.dtype);
        let trainable_params = {
            let data = vars.data().lock().expect("var map lock");
            opt.names().map(|n| data[n].as_tensor().elem_count()).sum()
        };
        fs_err::create_dir_all(&run.out)?;
        Ok(Training {
            stage,
            steps,
            rope_base: config.llm.rope_theta,
            config,
            device,
            vars,
            model,
            opt,
            lora,
            trainable_params,
            mix_fingerprint: run.mix.meta.data_fingerprint(),
            init_fingerprint,
            lr: 0.0,
        })
    }

    /// Weights, adapters, moments and step of the newest checkpoint, if any,
    /// after checking that it was made by this recipe, mix and start.
    fn resume(&mut self, run: &StageRun) -> Result<Option<u64>> {
        let Some((dir, state)) = newest_checkpoint(&run.out)? else {
            return Ok(None);
        };
        let refuse = |message: String| Error::Checkpoint {
            path: dir.clone(),
            message,
        };
        for (what, ours, theirs) in [
            (
                "recipe",
                &run.mix.meta.recipe_fingerprint,
                &state.recipe_fingerprint,
            ),
            ("mix", &self.mix_fingerprint, &state.mix_fingerprint),
            ("start", &self.init_fingerprint, &state.init_fingerprint),
        ] {
            // Checkpoints from before the start was recorded have none.
            if ours != theirs && !(what == "start" && theirs.is_empty()) {
                return Err(refuse(format!(
                    "made with another {what} ({theirs}, now {ours}); start a new run instead of resuming"
                )));
            }
        }
        if state.stage != run.stage || state.steps != self.steps {
            return Err(refuse(format!(
                "a checkpoint of stage {} with {} steps, not of stage {} with {}",
                state.stage, state.steps, run.stage, self.steps
            )));
        }
        let weights = dir.join("model.safetensors");
        let mut vars = self.vars.clone();
        vars.load(&weights).map_err(|e| Error::Checkpoint {
            path: weights.clone(),
            message: e.to_string(),
        })?;
        let file = dir.join("optimizer.safetensors");
        let moments =
            candle_core::safetensors::load(&file, &self.device).map_err(|e| Error::Checkpoint {
                path: file.clone(),
                message: e.to_string(),
            })?;
        self.opt.restore(&moments, state.step, &file)?;
        if self.opt.loss_scale.is_some() {
            self.opt.loss_scale = state.loss_scale.or(self.opt.loss_scale);
        }
        Ok(Some(state.step))
    }

    /// Steps `start..steps`: each a train step over the loader's batch, a
    /// metrics line, and an intermediate checkpoint every `save_every`.
    fn step_loop(
        &mut self,
        run: &StageRun,
        start: u64,
        started: Instant,
        on_step: &mut dyn FnMut(&StepMetrics, u64),
    ) -> Result<Losses> {
        let group = crate::dist::group();
        // Rank 0 writes what the group writes once.
        let mut metrics = match group.is_root() {
            true => {
                let metrics_path = run.out.join(StepMetrics::FILE_NAME);
                keep_metrics_until(&metrics_path, start)?;
                let file = fs_err::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)?;
                Some(file)
            }
            false => None,
        };
        let micro = self
            .stage
            .micro_batch
            .map_or(usize::MAX, |m| m.max(1) as usize);
        let mut losses = Losses {
            first: f64::NAN,
            last: f64::NAN,
            tokens: 0,
        };
        let mut last_step_at = Instant::now();
        // The ranks of a sequence-parallel group train the same rows.
        let (dp_rank, dp_size) = group.data_parallel();
        let loader = Loader::new(run.mix.clone(), dp_rank as u32, dp_size as u32)?;
        let stream = loader.stream(start, self.steps.saturating_sub(start), 2);
        for (i, batch) in stream.into_iter().enumerate() {
            let step = start + i as u64;
            let batch = batch?;
            self.lr = learning_rate(
                self.stage.lr,
                self.stage.schedule,
                self.stage.warmup,
                step,
                self.steps,
            );
            let base = self
                .stage
                .rope_base_at(run.recipe.model.rope_base, step, self.steps);
            if base != self.rope_base {
                self.model.set_rope_base(base);
                self.rope_base = base;
            }
            let rows: Vec<(Row, &[String])> = batch
                .packs
                .iter()
                .map(|p| {
                    let row = Row {
                        input_ids: &p.input_ids,
                        loss_mask: &p.loss_mask,
                        boundaries: &p.boundaries,
                        pixels: &p.pixels,
                    };
                    (row, p.sample_ids.as_slice())
                })
                .collect();
            self.check_memory(run, &rows, micro)?;
            let settings = StepSettings {
                micro_batch: micro,
                ..StepSettings::new(self.lr, run.clip, &self.device, group)
            };
            let record = train_step(&self.model, &mut self.opt, &rows, &settings)?;
            if i == 0 {
                losses.first = record.loss;
            }
            losses.last = record.loss;
            losses.tokens += record.tokens;
            let took = last_step_at.elapsed().as_secs_f64();
            last_step_at = Instant::now();
            let line = StepMetrics {
                step: record.step,
                loss: record.loss,
                lr: record.lr,
                grad_norm: record.grad_norm,
                tokens: record.tokens,
                loss_tokens: record.loss_tokens,
                micro_batches: record.micro_batches,
                stage: run.stage,
                rope_base: self.rope_base,
                source_tokens: source_tokens(&batch),
                tokens_per_s: record.tokens as f64 / took.max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
                loss_scale: record.loss_scale,
                skipped: record.skipped,
            };
            if let Some(metrics) = &mut metrics {
                writeln!(metrics, "{}", line.to_line())?;
            }
            if run.save_every > 0
                && record.step % run.save_every == 0
                && record.step < self.steps
                && group.is_root()
            {
                save_intermediate(
                    &run.out,
                    &self.vars,
                    &self.opt,
                    &self.state(run, record.step),
                )?;
            }
            on_step(&line, self.steps);
        }
        Ok(losses)
    }

    /// Refuses a step whose micro-batches would not fit in the memory left,
    /// by [`memory::step_bytes`], instead of letting an allocation abort it.
    fn check_memory(&self, run: &StageRun, rows: &[(Row, &[String])], micro: usize) -> Result<()> {
        if !self.device.is_cpu() {
            // The estimate is of host memory; a GPU's is not estimated.
            return Ok(());
        }
        let c = &self.config;
        let per_media = c.tokens_per_media() as u64;
        let mut worst = (0u64, Vec::new());
        for chunk in rows.chunks(micro.max(1)) {
            let mut lengths = Vec::new();
            let mut loss = 0u64;
            for (row, _) in chunk {
                for w in row.boundaries.windows(2) {
                    let ids = &row.input_ids[w[0] as usize..w[1] as usize];
                    let media = ids.iter().filter(|&&t| t == c.image_token).count() as u64;
                    lengths.push(ids.len() as u64 + media * per_media.saturating_sub(1));
                    let mask = &row.loss_mask[w[0] as usize..w[1] as usize];
                    loss += mask.iter().map(|&m| u64::from(m)).sum::<u64>();
                }
            }
            let need = memory::step_bytes(c, &lengths, loss, self.model.gradient_checkpointing());
            if need > worst.0 {
                worst = (need, lengths);
            }
        }
        let (need, lengths) = worst;
        match memory::available_bytes() {
            Some(available) if need > available => Err(Error::Config(format!(
                "stage {} ({}): a micro-batch of {} tokens (longest sample {}, context {}) needs about {} \
                 for attention and activations, and {} of memory is available; set the stage's \
                 gradient_checkpointing = true, lower its micro_batch or context, or train on a \
                 machine with more memory",
                run.stage,
                self.stage.name,
                lengths.iter().sum::<u64>(),
                lengths.iter().max().copied().unwrap_or(0),
                self.stage.context,
                memory::gib(need),
                memory::gib(available)
            ))),
            _ => Ok(()),
        }
    }

    /// LoRA merged, lineage, `config.json` and the final checkpoint.
    fn finish(&mut self, run: &StageRun) -> Result<()> {
        if self.lora {
            self.model.merge_lora(&self.vars).context("merging LoRA")?;
            self.opt.forget_missing(&self.vars);
        }
        // Every rank's samples, replayed from the mix (the loader's batches
        // are a function of the mix, the step and the rank).
        let size = crate::dist::group().data_parallel().1 as u32;
        let lineage =
            lvpipe_pipeline::lineage::group_lineage(&run.mix, run.stage, self.steps, size)?;
        lvpipe_pipeline::lineage::write_parquet(&run.out.join("lineage.parquet"), &lineage)?;
        let mut model = self.config.clone();
        model.llm.rope_theta = self.stage.final_rope_base(run.recipe.model.rope_base);
        let saved = SavedConfig {
            model,
            stage: run.stage,
            stage_name: self.stage.name.clone(),
            tokenizer_fingerprint: run.mix.meta.tokenizer_fingerprint.clone(),
            chat_template: run.recipe.model.chat_template.clone(),
        };
        saved.save(&run.out)?;
        save_checkpoint(
            &run.out,
            &self.vars,
            &self.opt,
            &self.state(run, self.opt.step),
        )
    }

    /// Fails unless every rank holds the same weights (a blake3 hash of
    /// them, gathered): data parallelism applies the same update on every
    /// rank, so any difference is a bug, not noise.
    fn check_same_weights_on_every_rank(&self) -> Result<()> {
        let group = crate::dist::group();
        if group.size() == 1 {
            return Ok(());
        }
        let mut hasher = blake3::Hasher::new();
        let data = self.vars.data().lock().expect("var map lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let values: Vec<f32> = data[name]
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .context(name)?;
            hasher.update(name.as_bytes());
            for v in values {
                hasher.update(&v.to_le_bytes());
            }
        }
        let mine = u64::from_le_bytes(hasher.finalize().as_bytes()[..8].try_into().unwrap());
        let all = group.gather_u64(mine)?;
        match all.iter().position(|&h| h != all[0]) {
            None => Ok(()),
            Some(rank) => Err(Error::Config(format!(
                "rank {rank}'s weights differ from rank 0's after step {}",
                self.opt.step
            ))),
        }
    }

    /// The trainer state after `step`.
    fn state(&self, run: &StageRun, step: u64) -> TrainerState {
        TrainerState {
            stage: run.stage,
            stage_name: self.stage.name.clone(),
            step,
            steps: self.steps,
            lr: self.lr,
            loader: LoaderState {
                stage: run.stage,
                step,
            },
            seed: self.stage.seed,
            rope_base: self.rope_base,
            recipe_fingerprint: run.mix.meta.recipe_fingerprint.clone(),
            mix_fingerprint: self.mix_fingerprint.clone(),
            init_fingerprint: self.init_fingerprint.clone(),
            loss_scale: self.opt.loss_scale,
            world_size: crate::dist::group().size(),
            data_parallel: crate::dist::group().data_parallel().1,
            sequence_parallel: crate::dist::group().sequence_parallel().degree,
            sp_mode: (crate::dist::group().sequence_parallel().degree > 1)
                .then(|| self.stage.sp_mode.as_str().to_string()),
        }
    }
}

/// Tokens per source in a batch, from its packs' sample boundaries.
fn source_tokens(batch: &Batch) -> BTreeMap<String, u64> {
    let mut per_source = BTreeMap::<String, u64>::new();
    for p in &batch.packs {
        for (k, source) in p.sources.iter().enumerate() {
            *per_source.entry(source.clone()).or_default() +=
                u64::from(p.boundaries[k + 1] - p.boundaries[k]);
        }
    }
    per_source
}
