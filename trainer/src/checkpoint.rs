//! What a stage's folder holds between and after runs: checkpoints
//! (weights, optimizer moments, trainer state), `config.json`, and the
//! metrics log a resume cuts back to its checkpoint.
//!
//! Every file is written to a temporary name and renamed into place, the
//! state last, and an intermediate checkpoint is a temporary folder renamed
//! to `checkpoints/step-NNNNNN`, so a kill never leaves a half-written one.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use lvpipe_pipeline::LoaderState;
use lvpipe_schemas::StepMetrics;
use serde::{Deserialize, Serialize};

use crate::error::TensorContext;
use crate::model::Config;
use crate::optim::Optimizer;
use crate::{Error, Result};

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
    /// The loss scaling of an f16 run, as it stood after `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::optim::LossScale>,
    /// Processes of the run that wrote this (a resume may use another
    /// number: the loader's batches do not depend on it).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Data-parallel degree: world size / sequence-parallel degree.
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// Sequence-parallel degree (ranks sharing one packed row).
    #[serde(default = "one")]
    pub sequence_parallel: usize,
    /// How sequence-parallel ranks attend (`ulysses` or `ring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sp_mode: Option<String>,
}

fn one() -> usize {
    1
}

impl TrainerState {
    pub const FILE_NAME: &'static str = "trainer_state.json";

    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path,
            message: e.to_string(),
        })
    }
}

/// `config.json`: what loading the weights back needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedConfig {
    pub model: Config,
    pub stage: usize,
    pub stage_name: String,
    pub tokenizer_fingerprint: String,
    /// The chat template the shards were tokenized with (`chatml`, `llama3`).
    #[serde(default = "chatml")]
    pub chat_template: String,
}

fn chatml() -> String {
    lvpipe_sharding::CHAT_TEMPLATE.to_string()
}

impl SavedConfig {
    pub const FILE_NAME: &'static str = "config.json";

    /// Reads `config.json` from a run folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let text = fs_err::read_to_string(&path).map_err(|e| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("not a finished run folder: {e}"),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path,
            message: e.to_string(),
        })
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("config serializes") + "\n";
        write_atomic(&dir.join(Self::FILE_NAME), json.as_bytes())
    }
}

/// blake3 of a model folder's weights (16 hex digits): which weights a
/// stage started from, so that a retrained earlier stage is noticed. A run
/// folder's is its `model.safetensors`'s; a Hugging Face or VILA folder's
/// covers every safetensors file in it, by name.
pub fn weights_fingerprint(dir: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let single = dir.join("model.safetensors");
    if single.exists() && dir.join(SavedConfig::FILE_NAME).exists() && !dir.join("llm").exists() {
        hasher.update_reader(fs_err::File::open(&single)?)?;
        return Ok(hasher.finalize().to_hex()[..16].to_string());
    }
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs_err::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                files.push(path);
            }
        }
    }
    files.sort();
    for file in files {
        hasher.update(
            file.strip_prefix(dir)
                .unwrap_or(&file)
                .to_string_lossy()
                .as_bytes(),
        );
        hasher.update_reader(fs_err::File::open(&file)?)?;
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

/// Whether `dir` holds a finished stage: its final state has all its steps.
pub fn finished(dir: &Path) -> Option<TrainerState> {
    let state = TrainerState::load(dir).ok()?;
    (state.step >= state.steps && dir.join("model.safetensors").exists()).then_some(state)
}

/// The newest complete checkpoint of a run folder and its state.
pub(crate) fn newest_checkpoint(out: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let Some(dir) = checkpoint_dirs(&out.join("checkpoints")).pop() else {
        return Ok(None);
    };
    let state = TrainerState::load(&dir)?;
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

/// Drops the lines of steps after `step` from the metrics log (a resumed run
/// writes them again), and a line a kill cut short.
pub(crate) fn keep_metrics_until(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs_err::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| serde_json::from_str::<StepMetrics>(line).is_ok_and(|m| m.step <= step))
        .flat_map(|line| [line, "\n"])
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// An intermediate checkpoint: a temporary folder renamed to
/// `checkpoints/step-NNNNNN`; older ones beyond the last two are removed.
pub(crate) fn save_intermediate(
    out: &Path,
    vars: &VarMap,
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<()> {
    let root = out.join("checkpoints");
    let tmp = root.join(format!(".tmp-step-{:06}", state.step));
    let _ = fs_err::remove_dir_all(&tmp);
    fs_err::create_dir_all(&tmp)?;
    save_checkpoint(&tmp, vars, opt, state)?;
    let dir = root.join(format!("step-{:06}", state.step));
    let _ = fs_err::remove_dir_all(&dir);
    fs_err::rename(&tmp, &dir)?;
    for dir in checkpoint_dirs(&root).iter().rev().skip(2) {
        fs_err::remove_dir_all(dir)?;
    }
    Ok(())
}

/// Writes weights, optimizer moments and state, each atomically (a
/// temporary file renamed into place), the state last.
pub fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    opt: &Optimizer,
    state: &TrainerState,
) -> Result<()> {
    let tmp = |name: &str| dir.join(format!(".{name}.tmp"));
    vars.save(tmp("model.safetensors"))
        .context("saving model.safetensors")?;
    let moments = opt.state_tensors().context("the optimizer state")?;
    candle_core::safetensors::save(&moments, tmp("optimizer.safetensors"))
        .context("saving optimizer.safetensors")?;
    let json = serde_json::to_string_pretty(state).expect("state serializes") + "\n";
    fs_err::write(tmp(TrainerState::FILE_NAME), json)?;
    for name in [
        "model.safetensors",
        "optimizer.safetensors",
        TrainerState::FILE_NAME,
    ] {
        fs_err::rename(tmp(name), dir.join(name))?;
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// there: a kill leaves the old file or the new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = fs_err::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs_err::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64) -> String {
        let m = StepMetrics {
            step,
            loss: 1.0 / step as f64,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 10,
            loss_tokens: 5.0,
            micro_batches: 1,
            stage: 1,
            rope_base: 1e4,
            source_tokens: Default::default(),
            tokens_per_s: 1.0,
            elapsed_s: step as f64,
            loss_scale: None,
            skipped: false,
        };
        m.to_line() + "\n"
    }

    #[test]
    fn a_resume_keeps_the_metrics_up_to_its_checkpoint_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(StepMetrics::FILE_NAME);
        // Steps 1 to 5, then a line a kill cut short.
        let mut text: String = (1..=5).map(line).collect();
        text.push_str(&line(6)[..20]);
        std::fs::write(&path, &text).unwrap();
        keep_metrics_until(&path, 3).unwrap();
        let kept = StepMetrics::read(&path).unwrap();
        assert_eq!(kept.iter().map(|m| m.step).collect::<Vec<_>>(), [1, 2, 3]);
        // Replaced by a rename: nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(StepMetrics::FILE_NAME)]);
    }

    #[test]
    fn atomic_writes_replace_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        std::fs::write(&path, "old and longer than the new text").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!dir.path().join("run.json.tmp").exists());
    }
}
