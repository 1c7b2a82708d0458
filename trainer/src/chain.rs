//! Stage runs as a user starts them: one stage from its mix, a chain of
//! stages mixed from shards (`1-5`), or a resume of a run folder.
//!
//! Every stage folder gets a `run.json` ([`RunSpec`]) with the settings it
//! was started with (absolute paths), which is all a resume needs, and a
//! copy of the tokenizer, so the folder is a self-contained model
//! (config.json, model.safetensors, tokenizer.json) for evaluation.
//!
//! A chain skips finished stages whose recipe, data and start weights are
//! unchanged, retrains those whose inputs changed, and resumes a stage with
//! checkpoints: running the same chain again continues where it stopped.

use std::path::{Path, PathBuf};

use lvpipe_pipeline::{Catalog, Mix, Recipe, build_mix, current_mix};
use lvpipe_schemas::StepMetrics;
use lvpipe_sharding::ChatTokenizer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{TrainerState, finished, weights_fingerprint, write_atomic};
use crate::run::{StageRun, Summary, run_stage};
use crate::{Error, Result};

/// `run.json`: how a stage run was started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub recipe: PathBuf,
    pub stage: usize,
    pub mix: PathBuf,
    pub tokenizer: PathBuf,
    /// The model folders this stage starts from: a finished run's, or
    /// Hugging Face or VILA folders, each for one part or all it has (none:
    /// fresh seeded weights).
    #[serde(default)]
    pub init: Vec<StartFolder>,
    pub steps: Option<u64>,
    pub clip: f64,
    pub save_every: u64,
    /// Activation checkpointing even where the stage does not ask for it.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Where it computes: `cpu`, `cuda`, `cuda:N` ([`crate::device::parse`]).
    #[serde(default = "cpu")]
    pub device: String,
    /// What activations are computed in: `f32`, `bf16` or `f16`
    /// ([`crate::device::parse_dtype`]).
    #[serde(default = "f32")]
    pub dtype: String,
}

fn f32() -> String {
    "f32".to_string()
}

fn cpu() -> String {
    "cpu".to_string()
}

impl RunSpec {
    pub const FILE_NAME: &'static str = "run.json";

    /// Reads the `run.json` of a run folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let text = fs_err::read_to_string(&path).map_err(|e| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("not a run folder: {e}"),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path,
            message: e.to_string(),
        })
    }
}

/// What happens while stages train, for a progress display.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// A stage of a chain is being mixed from the shards.
    Mixing { stage: usize, name: &'a str },
    /// A finished stage whose recipe, data and start are unchanged is kept.
    Skipped {
        stage: usize,
        name: &'a str,
        steps: u64,
    },
    /// A finished stage was trained on other data, another recipe or other
    /// start weights: it is trained again.
    Retraining {
        stage: usize,
        name: &'a str,
        dir: &'a Path,
    },
    /// A resume found the stage finished: nothing to do.
    AlreadyFinished {
        dir: &'a Path,
        state: &'a TrainerState,
    },
    /// A stage planned for sequence parallelism: over `ranks` > 1, each
    /// row is split over `sequence_parallel` of them; one process trains
    /// whole rows.
    SequenceParallel {
        stage: usize,
        name: &'a str,
        sequence_parallel: u32,
        /// `ulysses` or `ring`.
        mode: &'static str,
        ranks: usize,
    },
    /// A stage starts training.
    Started { stage: usize, name: &'a str },
    /// A step is done: its metrics and any checkpoint of it are on disk.
    Step {
        stage: usize,
        metrics: &'a StepMetrics,
        steps: u64,
    },
    /// A stage finished.
    Finished {
        stage: usize,
        name: &'a str,
        summary: &'a Summary,
        dir: &'a Path,
    },
}

/// A chain of stages mixed from shards and trained in order.
pub struct Chain<'a> {
    pub recipe: &'a Path,
    pub shards: &'a Path,
    pub tokenizer: &'a Path,
    /// The folder of the stage folders (`OUT/stage-N`).
    pub out: &'a Path,
    /// Where the stage mixes go (default: OUT/mixes).
    pub mixes: Option<&'a Path>,
    /// First and last stage, 1-based.
    pub stages: (usize, usize),
    pub steps: Option<u64>,
    pub clip: f64,
    pub save_every: u64,
    /// Activation checkpointing in every stage.
    pub gradient_checkpointing: bool,
    /// Where the stages compute (`cpu`, `cuda:N`).
    pub device: String,
    /// What activations are computed in (`f32`, `bf16`, `f16`).
    pub dtype: String,
}

/// Mixes and trains stages `first..=last` into `out/stage-N`; returns the
/// summaries of the stages it trained (finished ones are skipped).
pub fn chain(c: &Chain, on_event: &mut dyn FnMut(TrainEvent)) -> Result<Vec<(usize, Summary)>> {
    let recipe_path = absolute(c.recipe)?;
    let tokenizer = absolute(c.tokenizer)?;
    let recipe = Recipe::load(&recipe_path)?;
    let problems = recipe.check();
    if !problems.is_empty() {
        return Err(Error::Config(format!(
            "{}: {}",
            c.recipe.display(),
            problems.join("; ")
        )));
    }
    let (first, last) = c.stages;
    recipe.stage(last)?;
    let mixes = c
        .mixes
        .map_or_else(|| c.out.join("mixes"), Path::to_path_buf);
    let runtime = runtime()?;
    // Shards on object storage are read where they are.
    let shards = lvpipe_sharding::storage::Location::parse(&c.shards.to_string_lossy())
        .map_err(lvpipe_pipeline::Error::from)?;
    let catalog = runtime.block_on(Catalog::open_at(
        &shards,
        lvpipe_pipeline::default_memory_limit(),
    ))?;
    let mut done = Vec::new();
    for number in first..=last {
        let stage = recipe.stage(number)?;
        let name = stage.name.as_str();
        let dir = c.out.join(format!("stage-{number}"));
        // In a group, rank 0 mixes while the others wait, then they read
        // the mix it wrote.
        let group = crate::dist::group();
        let mut meta = None;
        if group.is_root() {
            meta = Some(match current_mix(&catalog, &recipe, number, &mixes) {
                Some(meta) => meta,
                None => {
                    on_event(TrainEvent::Mixing {
                        stage: number,
                        name,
                    });
                    runtime.block_on(build_mix(&catalog, &recipe, number, &mixes))?
                }
            });
        }
        group.barrier();
        let meta = match meta {
            Some(meta) => meta,
            None => current_mix(&catalog, &recipe, number, &mixes).ok_or_else(|| {
                Error::Config(format!("stage {number}: rank 0 left no current mix"))
            })?,
        };
        let init = start_of(&recipe, &recipe_path, number, c.out)?;
        // The start's weights: a finished stage whose start has been
        // trained again since is stale too.
        let init_fingerprint = start_fingerprint(&init)?;
        if let Some(state) = finished(&dir) {
            if state.recipe_fingerprint == meta.recipe_fingerprint
                && state.mix_fingerprint == meta.data_fingerprint()
                && state.init_fingerprint == init_fingerprint
            {
                on_event(TrainEvent::Skipped {
                    stage: number,
                    name,
                    steps: state.steps,
                });
                continue;
            }
            on_event(TrainEvent::Retraining {
                stage: number,
                name,
                dir: &dir,
            });
            group.barrier();
            if group.is_root() {
                fs_err::remove_dir_all(&dir)?;
            }
        }
        let spec = RunSpec {
            recipe: recipe_path.clone(),
            stage: number,
            mix: absolute(&mixes.join(format!("stage-{number}")))?,
            tokenizer: tokenizer.clone(),
            init,
            steps: c.steps,
            clip: c.clip,
            save_every: c.save_every,
            gradient_checkpointing: c.gradient_checkpointing,
            device: c.device.clone(),
            dtype: c.dtype.clone(),
        };
        let summary = train_stage(&spec, &dir, true, on_event)?;
        done.push((number, summary));
    }
    Ok(done)
}

/// A model folder a stage starts from, and the part it is loaded for
/// (`llm`, `vision`, `projector`; none: every part it has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartFolder {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

impl StartFolder {
    /// A whole folder.
    pub fn all(path: impl Into<PathBuf>) -> Self {
        StartFolder {
            path: path.into(),
            part: None,
        }
    }
}

/// The fingerprint of the weights a stage starts from (empty: fresh).
pub(crate) fn start_fingerprint(init: &[StartFolder]) -> Result<String> {
    let prints = init
        .iter()
        .map(|f| weights_fingerprint(&f.path))
        .collect::<Result<Vec<_>>>()?;
    Ok(prints.join("+"))
}

/// The folders stage `number` starts from (none: `init = "base"`): a
/// finished earlier stage's run folder, or the model folders the recipe
/// names (relative to the recipe's folder).
fn start_of(
    recipe: &Recipe,
    recipe_path: &Path,
    number: usize,
    out: &Path,
) -> Result<Vec<StartFolder>> {
    let stage = recipe.stage(number)?;
    let recipe_dir = recipe_path.parent().unwrap_or(Path::new("."));
    let Some(name) = stage.init.stage() else {
        return stage
            .init
            .folders(recipe_dir)
            .into_iter()
            .map(|(part, path)| {
                Ok(StartFolder {
                    path: absolute(&path)?,
                    part,
                })
            })
            .collect();
    };
    let k = recipe
        .stages
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| {
            Error::Config(format!(
                "stage {number} starts from `{name}`, which is no stage of the recipe"
            ))
        })?;
    let from = out.join(format!("stage-{}", k + 1));
    if finished(&from).is_none() {
        return Err(Error::Config(format!(
            "stage {number} starts from stage {} ({}), which has not finished in {}",
            k + 1,
            stage.init,
            from.display()
        )));
    }
    Ok(vec![StartFolder::all(absolute(&from)?)])
}

/// Continues the run in `dir` from its newest checkpoint, as its `run.json`
/// says; a finished run is left as it is.
pub fn resume(dir: &Path, on_event: &mut dyn FnMut(TrainEvent)) -> Result<Option<Summary>> {
    let spec = RunSpec::load(dir)?;
    if let Some(state) = finished(dir) {
        on_event(TrainEvent::AlreadyFinished { dir, state: &state });
        return Ok(None);
    }
    train_stage(&spec, dir, true, on_event).map(Some)
}

/// Trains one stage as `spec` says into `out` (continuing from its newest
/// checkpoint when `resume`). Paths in `spec` are made absolute first.
pub fn train_stage(
    spec: &RunSpec,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<Summary> {
    let spec = RunSpec {
        recipe: absolute(&spec.recipe)?,
        mix: absolute(&spec.mix)?,
        tokenizer: absolute(&spec.tokenizer)?,
        init: spec
            .init
            .iter()
            .map(|f| {
                Ok(StartFolder {
                    path: absolute(&f.path)?,
                    part: f.part.clone(),
                })
            })
            .collect::<Result<_>>()?,
        ..spec.clone()
    };
    let recipe = Recipe::load(&spec.recipe)?;
    let mix = Mix::open(&spec.mix)?;
    let template = lvpipe_sharding::ChatTemplate::parse(&recipe.model.chat_template)?;
    let tokenizer = ChatTokenizer::load_with(&spec.tokenizer, template)?;
    if tokenizer.fingerprint() != mix.meta.tokenizer_fingerprint {
        return Err(Error::Config(format!(
            "{} is not the tokenizer the mix's shards were built with",
            spec.tokenizer.display()
        )));
    }
    if tokenizer.vocab_size() > recipe.model.vocab_size as usize {
        return Err(Error::Config(format!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}; raise vocab_size in the recipe's [model]",
            spec.tokenizer.display(),
            tokenizer.vocab_size(),
            recipe.model.vocab_size
        )));
    }
    fs_err::create_dir_all(out)?;
    // Rank 0 holds the folder and writes it; the other ranks of a group
    // train beside it.
    let group = crate::dist::group();
    let _lock = match group.is_root() {
        true => {
            let lock = lvpipe_schemas::FolderLock::acquire(out, "train")?;
            // Rewritten on every resume: atomically, so a kill keeps the run resumable.
            let json = serde_json::to_string_pretty(&spec).expect("the spec serializes") + "\n";
            write_atomic(&out.join(RunSpec::FILE_NAME), json.as_bytes())?;
            write_atomic(&out.join("tokenizer.json"), tokenizer.json())?;
            Some(lock)
        }
        false => None,
    };
    let stage = recipe.stage(spec.stage)?;
    let name = stage.name.clone();
    let run = StageRun {
        recipe: &recipe,
        stage: spec.stage,
        mix,
        image_token: tokenizer.special().image,
        out: out.to_path_buf(),
        init: spec.init.clone(),
        steps: spec.steps,
        clip: spec.clip,
        save_every: spec.save_every,
        gradient_checkpointing: spec.gradient_checkpointing,
        device: crate::device::parse(&spec.device)?,
        dtype: crate::device::parse_dtype(&spec.dtype)?,
        resume,
    };
    let sequence_parallel = stage.sequence_parallel;
    if sequence_parallel > 1 {
        on_event(TrainEvent::SequenceParallel {
            stage: spec.stage,
            name: &name,
            sequence_parallel,
            mode: stage.sp_mode.as_str(),
            ranks: group.size(),
        });
    }
    on_event(TrainEvent::Started {
        stage: spec.stage,
        name: &name,
    });
    let summary = run_stage(&run, &mut |metrics, steps| {
        on_event(TrainEvent::Step {
            stage: spec.stage,
            metrics,
            steps,
        });
    })?;
    on_event(TrainEvent::Finished {
        stage: spec.stage,
        name: &name,
        summary: &summary,
        dir: out,
    });
    Ok(summary)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(std::path::absolute(path)?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
