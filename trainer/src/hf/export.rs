//! Writing a trained run as folders `transformers` and VILA load: the LLM
//! alone as a Hugging Face Qwen2 folder, or the whole model in VILA's
//! layout. What the target cannot express is refused, never written as a
//! model that computes something else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{Value, json};

use super::load::{Folder, Part, open};
use crate::checkpoint::write_atomic;
use crate::{Error, Result};

/// What `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The LLM as a `Qwen2ForCausalLM` folder.
    Hf,
    /// VILA's `llm/`, `vision_tower/`, `mm_projector/` and top `config.json`.
    Vila,
}

fn refuse(path: &Path, message: String) -> Error {
    Error::Config(format!("{}: cannot export: {message}", path.display()))
}

/// Exports the finished run (or any model folder lvpipe loads) in `run` to
/// `out`, which must not exist or be empty. The folder is written beside it
/// and renamed into place, so a failed export leaves nothing half-written.
/// Returns the files written, relative to `out`.
pub fn export(run: &Path, format: ExportFormat, out: &Path) -> Result<Vec<PathBuf>> {
    let folder = open(run)?;
    let config = folder.config(None)?;
    let llm_json = config.llm.to_hf().map_err(|e| refuse(run, e.0))?;
    if out.exists() && fs_err::read_dir(out)?.next().is_some() {
        return Err(Error::Config(format!(
            "{} exists and is not empty; export into a new folder",
            out.display()
        )));
    }
    let tmp = out.with_file_name(format!(
        ".{}.export-tmp",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("export")
    ));
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    let tokenizer = run.join("tokenizer.json");
    let mut written = Vec::new();
    let mut write_part = |sub: &str, part: Part, config: Value| -> Result<()> {
        let dir = tmp.join(sub);
        fs_err::create_dir_all(&dir)?;
        write_json(&dir.join("config.json"), &config)?;
        save_part(&folder, part, &dir.join("model.safetensors"))?;
        written.push(Path::new(sub).join("config.json"));
        written.push(Path::new(sub).join("model.safetensors"));
        if part == Part::Llm && tokenizer.exists() {
            write_atomic(&dir.join("tokenizer.json"), &fs_err::read(&tokenizer)?)?;
            write_json(
                &dir.join("tokenizer_config.json"),
                &json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"]}),
            )?;
            written.push(Path::new(sub).join("tokenizer.json"));
            written.push(Path::new(sub).join("tokenizer_config.json"));
        }
        Ok(())
    };
    match format {
        ExportFormat::Hf => write_part("", Part::Llm, llm_json)?,
        ExportFormat::Vila => {
            let Some(vision) = &config.vision else {
                return Err(refuse(
                    run,
                    "the model has no vision tower; export it with --format hf".into(),
                ));
            };
            let projector_json = config.projector.to_hf().map_err(|e| refuse(run, e.0))?;
            let vision_json = vision.to_hf();
            let feature =
                serde_json::to_value(config.mm_vision_select_feature).expect("serializes");
            let top = json!({
                "architectures": ["LlavaLlamaModel"],
                "model_type": "llava_llama",
                "llm_cfg": llm_json,
                "vision_tower_cfg": vision_json,
                "mm_projector_cfg": projector_json,
                "mm_vision_select_layer": config.mm_vision_select_layer,
                "mm_vision_select_feature": feature,
                "hidden_size": config.llm.hidden_size,
                "mm_hidden_size": vision.hidden_size,
                "image_aspect_ratio": "resize",
                "model_dtype": "torch.float32",
            });
            write_part("llm", Part::Llm, llm_json.clone())?;
            write_part("vision_tower", Part::Vision, vision_json.clone())?;
            write_part("mm_projector", Part::Projector, projector_json)?;
            fs_err::create_dir_all(&tmp)?;
            write_json(&tmp.join("config.json"), &top)?;
            written.push("config.json".into());
        }
    }
    if out.exists() {
        fs_err::remove_dir(out)?;
    }
    fs_err::rename(&tmp, out)?;
    Ok(written)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serializes") + "\n";
    write_atomic(path, text.as_bytes())
}

/// The part's tensors under its own Hugging Face names (lvpipe's prefix
/// dropped), LoRA adapters refused (a finished run has them merged).
fn save_part(folder: &Folder, part: Part, path: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, stored) in &folder.tensors {
        let Some(local) = name.strip_prefix(part.prefix()) else {
            continue;
        };
        if local.contains("lora_") {
            return Err(refuse(
                &folder.path,
                format!("`{name}` is an unmerged LoRA adapter; export a finished run"),
            ));
        }
        tensors.insert(local.to_string(), stored.read()?);
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| Error::Checkpoint {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    fs_err::rename(&tmp, path)?;
    Ok(())
}
