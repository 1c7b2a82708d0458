//! Reading a model folder: which layout it is, its parts' configs, and its
//! tensors under lvpipe's names, checked against the model they load into.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{Map, Value};

use crate::model::{
    Config, FieldError, InitConfig, ProjectorConfig, Qwen2Config, SelectFeature, SiglipVisionConfig,
};
use crate::{Error, Result, SavedConfig};

/// The networks of a VILA model, by their lvpipe name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Llm,
    Vision,
    Projector,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Llm, Part::Vision, Part::Projector];

    /// The prefix of the part's tensors inside lvpipe.
    pub fn prefix(self) -> &'static str {
        match self {
            Part::Llm => "llm.",
            Part::Vision => "vision_tower.",
            Part::Projector => "mm_projector.",
        }
    }

    /// The part's sub-folder in VILA's layout.
    pub fn vila_dir(self) -> &'static str {
        match self {
            Part::Llm => "llm",
            Part::Vision => "vision_tower",
            Part::Projector => "mm_projector",
        }
    }

    fn of(name: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| name.starts_with(p.prefix()))
    }
}

/// A tensor of a folder: where its bytes are, read when it is loaded (so
/// that a model's weights are in memory once, as f32 parameters, not also
/// as the file's and the cast's copies).
pub struct Stored {
    pub file: PathBuf,
    /// Its name in the file.
    name: String,
    pub shape: Vec<usize>,
    dtype: DType,
    /// Byte range of its data in the file.
    start: u64,
    len: usize,
}

impl Stored {
    /// The tensor, in f32.
    pub fn read(&self) -> Result<Tensor> {
        use std::io::{Read, Seek, SeekFrom};
        let fail =
            |e: &dyn std::fmt::Display| bad(&self.file, format!("tensor `{}`: {e}", self.name));
        let mut file = fs_err::File::open(&self.file)?;
        file.seek(SeekFrom::Start(self.start))?;
        let mut bytes = vec![0u8; self.len];
        file.read_exact(&mut bytes).map_err(|e| fail(&e))?;
        Tensor::from_raw_buffer(&bytes, self.dtype, &self.shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| fail(&e))
    }
}

/// The tensors a safetensors file holds, from its header: names, dtypes,
/// shapes and where their data are. A header that does not parse, a dtype
/// that is not floating point, or data past the file's end (a truncated
/// file) is an error naming the file and the tensor.
fn read_header(file: &Path) -> Result<Vec<(String, Stored)>> {
    use std::io::Read;
    let broken = |m: String| bad(file, format!("not a readable safetensors file: {m}"));
    let mut f = fs_err::File::open(file)?;
    let size = f.metadata()?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head)
        .map_err(|_| broken(format!("{size} bytes, no header")))?;
    let header_len = u64::from_le_bytes(head);
    if header_len > 100 << 20 || 8 + header_len > size {
        return Err(broken(format!(
            "a header of {header_len} bytes in a file of {size}"
        )));
    }
    let mut text = vec![0u8; header_len as usize];
    f.read_exact(&mut text).map_err(|e| broken(e.to_string()))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&text).map_err(|e| broken(format!("header: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| entry.get(key).cloned().unwrap_or(Value::Null);
        let dtype_name: String = serde_json::from_value(field("dtype"))
            .map_err(|_| broken(format!("tensor `{name}` has no dtype")))?;
        let (dtype, width) = match dtype_name.as_str() {
            "F32" => (DType::F32, 4),
            "BF16" => (DType::BF16, 2),
            "F16" => (DType::F16, 2),
            "F64" => (DType::F64, 8),
            other => {
                return Err(bad(
                    file,
                    format!("tensor `{name}` is {other}; model weights are F32, BF16, F16 or F64"),
                ));
            }
        };
        let shape: Vec<usize> = serde_json::from_value(field("shape"))
            .map_err(|_| broken(format!("tensor `{name}` has no shape")))?;
        let offsets: [u64; 2] = serde_json::from_value(field("data_offsets"))
            .map_err(|_| broken(format!("tensor `{name}` has no data_offsets")))?;
        let len = shape.iter().product::<usize>() * width;
        if offsets[1] < offsets[0] || (offsets[1] - offsets[0]) as usize != len {
            return Err(broken(format!(
                "tensor `{name}` {shape:?} {dtype_name} takes {len} bytes, not {}",
                offsets[1].saturating_sub(offsets[0])
            )));
        }
        if data_start + offsets[1] > size {
            return Err(broken(format!(
                "tensor `{name}` ends at byte {} of a {size}-byte file (truncated?)",
                data_start + offsets[1]
            )));
        }
        out.push((
            name.clone(),
            Stored {
                file: file.to_path_buf(),
                name,
                shape,
                dtype,
                start: data_start + offsets[0],
                len,
            },
        ));
    }
    Ok(out)
}

/// A model folder, read.
pub struct Folder {
    pub path: PathBuf,
    pub llm: Option<Qwen2Config>,
    pub vision: Option<SiglipVisionConfig>,
    pub projector: Option<ProjectorConfig>,
    /// VILA's `mm_vision_select_layer` / `_feature`, where the folder says.
    pub select_layer: Option<i32>,
    pub select_feature: Option<SelectFeature>,
    /// An lvpipe run folder's `config.json`.
    pub saved: Option<SavedConfig>,
    /// Every tensor under its lvpipe name.
    pub tensors: BTreeMap<String, Stored>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text = fs_err::read_to_string(path)
        .map_err(|e| bad(path, format!("cannot read: {}", e.kind())))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad(path, "not a JSON object")),
        Err(e) => Err(bad(path, format!("not valid JSON: {e}"))),
    }
}

fn field_error(path: &Path) -> impl Fn(FieldError) -> Error + '_ {
    move |e| bad(path, e.0)
}

/// The tensors of a folder's safetensors, by their names in the files:
/// `model.safetensors`, or the shards `model.safetensors.index.json` lists.
/// A damaged file, a tensor the index lists but no shard holds, or a tensor
/// that is not floating point is an error naming it.
pub fn read_safetensors(dir: &Path) -> Result<Vec<(String, Stored)>> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let (files, listed): (Vec<PathBuf>, Option<BTreeMap<String, String>>) = if index.exists() {
        let o = read_json(&index)?;
        let map: BTreeMap<String, String> = o
            .get("weight_map")
            .cloned()
            .and_then(|m| serde_json::from_value(m).ok())
            .ok_or_else(|| bad(&index, "`weight_map` is missing or not a name-to-file map"))?;
        let files: BTreeSet<&String> = map.values().collect();
        (files.into_iter().map(|f| dir.join(f)).collect(), Some(map))
    } else if single.exists() {
        (vec![single], None)
    } else {
        return Err(bad(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    };
    let mut out = Vec::new();
    for file in files {
        out.extend(read_header(&file)?);
    }
    if let Some(map) = listed {
        let found: BTreeSet<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        let lost: Vec<String> = map
            .iter()
            .filter(|(n, _)| !found.contains(n.as_str()))
            .map(|(n, f)| format!("`{n}` (in {f})"))
            .collect();
        if !lost.is_empty() {
            return Err(bad(
                &index,
                format!("tensors listed but in no shard: {}", lost.join(", ")),
            ));
        }
    }
    Ok(out)
}

/// Whether a folder tensor is one lvpipe does not use and need not load:
/// RoPE caches and SigLIP's pooling head, which VILA drops.
fn unused(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name.starts_with("vision_tower.vision_model.head.")
}

/// Opens a model folder: an lvpipe run folder, a VILA folder, or one Hugging
/// Face part (a Qwen2 LLM, a SigLIP vision model or a VILA projector).
pub fn open(dir: &Path) -> Result<Folder> {
    let mut folder = Folder {
        path: dir.to_path_buf(),
        llm: None,
        vision: None,
        projector: None,
        select_layer: None,
        select_feature: None,
        saved: None,
        tensors: BTreeMap::new(),
    };
    let config_path = dir.join("config.json");
    let is_vila = Part::ALL
        .iter()
        .all(|p| dir.join(p.vila_dir()).join("config.json").exists());
    if is_vila {
        for part in Part::ALL {
            let sub = open(&dir.join(part.vila_dir()))?;
            if !sub.parts().contains(&part) {
                return Err(bad(&sub.path, format!("not a {part:?} folder")));
            }
            match part {
                Part::Llm => folder.llm = sub.llm,
                Part::Vision => folder.vision = sub.vision,
                Part::Projector => folder.projector = sub.projector,
            }
            folder.tensors.extend(sub.tensors);
        }
        // VILA's defaults where its config says nothing.
        let (mut layer, mut feature) = (-2, SelectFeature::Patch);
        if config_path.exists() {
            let top = read_json(&config_path)?;
            let f = crate::model::Fields(&top);
            layer = f
                .or("mm_vision_select_layer", layer)
                .map_err(field_error(&config_path))?;
            let name: String = f
                .or("mm_vision_select_feature", "patch".to_string())
                .map_err(field_error(&config_path))?;
            feature = match name.as_str() {
                "patch" => SelectFeature::Patch,
                "cls_patch" => SelectFeature::ClsPatch,
                other => {
                    return Err(bad(
                        &config_path,
                        format!(
                            "`mm_vision_select_feature` `{other}` is not supported (patch, cls_patch)"
                        ),
                    ));
                }
            };
        }
        folder.select_layer = Some(layer);
        folder.select_feature = Some(feature);
        return Ok(folder);
    }
    if !config_path.exists() {
        return Err(bad(
            dir,
            "no config.json: not a Hugging Face, VILA or lvpipe model folder",
        ));
    }
    let json = read_json(&config_path)?;
    if json.contains_key("model") && json.contains_key("stage") {
        let saved = SavedConfig::load(dir)?;
        let tensors = read_header(&dir.join("model.safetensors"))?;
        folder.llm = Some(saved.model.llm.clone());
        folder.vision = saved.model.vision.clone();
        // A text-only run has no projector, whatever its config's default.
        folder.projector = saved
            .model
            .vision
            .as_ref()
            .map(|_| saved.model.projector.clone());
        folder.select_layer = Some(saved.model.mm_vision_select_layer);
        folder.select_feature = Some(saved.model.mm_vision_select_feature);
        folder.saved = Some(saved);
        folder.tensors.extend(tensors);
        return Ok(folder);
    }
    let model_type: String = crate::model::Fields(&json)
        .or("model_type", String::new())
        .map_err(field_error(&config_path))?;
    let part = match model_type.as_str() {
        "qwen2" | "llama" => {
            folder.llm = Some(Qwen2Config::parse(&json).map_err(field_error(&config_path))?);
            Part::Llm
        }
        "siglip" | "siglip_vision_model" => {
            folder.vision =
                Some(SiglipVisionConfig::parse(&json).map_err(field_error(&config_path))?);
            Part::Vision
        }
        "v2l_projector" => {
            folder.projector =
                Some(ProjectorConfig::parse(&json).map_err(field_error(&config_path))?);
            Part::Projector
        }
        other => {
            return Err(bad(
                &config_path,
                format!(
                    "`model_type` `{other}` is not supported (qwen2, siglip_vision_model, v2l_projector, or a VILA folder)"
                ),
            ));
        }
    };
    for (name, stored) in read_safetensors(dir)? {
        let name = match (part, name.strip_prefix(part.prefix())) {
            (_, Some(_)) => name,
            (Part::Vision, None) if name.starts_with("vision_model.") => {
                format!("{}{name}", part.prefix())
            }
            // transformers 5 saves a SiglipVisionModel without `vision_model.`.
            (Part::Vision, None)
                if ["embeddings.", "encoder.", "post_layernorm.", "head."]
                    .iter()
                    .any(|p| name.starts_with(p)) =>
            {
                format!("{}vision_model.{name}", part.prefix())
            }
            // A whole SigLIP's text tower and logit scale are not VILA's.
            (Part::Vision, None) => continue,
            _ => format!("{}{name}", part.prefix()),
        };
        folder.tensors.insert(name, stored);
    }
    Ok(folder)
}

impl Folder {
    /// The model this folder describes on its own (to generate with): an
    /// lvpipe run's config, a VILA model, or a text-only LLM.
    pub fn config(&self, image_token: Option<u32>) -> Result<Config> {
        if let Some(saved) = &self.saved {
            return Ok(saved.model.clone());
        }
        let Some(llm) = self.llm.clone() else {
            return Err(bad(&self.path, "holds no LLM: nothing to generate with"));
        };
        let vision = match (&self.vision, &self.projector) {
            (Some(v), Some(_)) => Some(v.clone()),
            _ => None,
        };
        Ok(Config {
            llm,
            vision,
            projector: self
                .projector
                .clone()
                .unwrap_or(ProjectorConfig { downsample: 2 }),
            mm_vision_select_layer: self.select_layer.unwrap_or(-2),
            mm_vision_select_feature: self.select_feature.unwrap_or(SelectFeature::ClsPatch),
            image_token: image_token.unwrap_or(u32::MAX),
            init: InitConfig::default(),
        })
    }

    /// The folder narrowed to one part (`llm`, `vision`, `projector`): the
    /// others' configs and tensors dropped. A folder without it is an error.
    pub fn only(mut self, part: &str) -> Result<Folder> {
        let keep = match part {
            "llm" => Part::Llm,
            "vision" => Part::Vision,
            "projector" => Part::Projector,
            other => {
                return Err(bad(
                    &self.path,
                    format!("`{other}` is not a part (llm, vision, projector)"),
                ));
            }
        };
        if !self.parts().contains(&keep) {
            return Err(bad(&self.path, format!("holds no {part}")));
        }
        if keep != Part::Llm {
            self.llm = None;
        }
        if keep != Part::Vision {
            self.vision = None;
            self.select_layer = None;
        }
        if keep != Part::Projector {
            self.projector = None;
        }
        self.saved = None;
        self.tensors
            .retain(|name, _| name.starts_with(keep.prefix()));
        Ok(self)
    }

    /// The parts this folder has: their configs say so, and then every
    /// parameter of theirs must be among its tensors.
    pub fn parts(&self) -> BTreeSet<Part> {
        let mut parts = BTreeSet::new();
        if self.llm.is_some() {
            parts.insert(Part::Llm);
        }
        if self.vision.is_some() {
            parts.insert(Part::Vision);
        }
        if self.projector.is_some() {
            parts.insert(Part::Projector);
        }
        parts
    }
}

/// Copies the folder's tensors of its parts into `vars` (a model's
/// parameters): every parameter of those parts must be there with its
/// shape, and nothing else may be, or the one error lists every problem
/// (name, expected shape, found shape). An embedding or LM head with fewer
/// rows than the model's vocabulary grows, the new rows the mean of the
/// others (as `resize_token_embeddings` does), for the media tokens a stock
/// tokenizer gets. Returns the parts loaded.
pub fn load_into(vars: &VarMap, folder: &Folder) -> Result<BTreeSet<Part>> {
    let parts = folder.parts();
    let data = vars.data().lock().expect("var map lock");
    let expected: BTreeMap<&String, Vec<usize>> = data
        .iter()
        .filter(|(n, _)| !n.contains("lora_") && Part::of(n).is_some_and(|p| parts.contains(&p)))
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let tied = !data.contains_key("llm.lm_head.weight");
    let mut problems = Vec::new();
    let mut assign = Vec::new();
    for (name, stored) in &folder.tensors {
        if unused(name) || (tied && name == "llm.lm_head.weight") {
            continue;
        }
        let found = stored.shape.clone();
        let Some(want) = expected.get(name) else {
            problems.push(format!(
                "unexpected `{name}` {found:?} in {}",
                stored.file.display()
            ));
            continue;
        };
        let vocab_rows = name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight");
        if &found == want {
            assign.push((name, stored, None));
        } else if vocab_rows && found.len() == 2 && found[1] == want[1] && found[0] < want[0] {
            assign.push((name, stored, Some(want[0])));
        } else {
            problems.push(format!(
                "`{name}`: expected shape {want:?}, found {found:?} in {}",
                stored.file.display()
            ));
        }
    }
    for (name, want) in &expected {
        if !folder.tensors.contains_key(*name) {
            problems.push(format!("missing `{name}` {want:?}"));
        }
    }
    if !problems.is_empty() {
        return Err(bad(
            &folder.path,
            format!(
                "does not fit the model ({} problems):\n  {}",
                problems.len(),
                problems.join("\n  ")
            ),
        ));
    }
    // One tensor in memory at a time besides the parameters.
    for (name, stored, rows) in assign {
        let mut tensor = stored.read()?;
        if let Some(rows) = rows {
            tensor = grow_rows(&tensor, rows)
                .map_err(|e| bad(&stored.file, format!("growing `{name}`: {e}")))?;
        }
        let var = &data[name];
        tensor
            .to_device(var.device())
            .and_then(|t| var.set(&t))
            .map_err(|e| bad(&folder.path, format!("`{name}`: {e}")))?;
    }
    Ok(parts)
}

/// Checks that the settings of a folder's parts that are not shapes (norm
/// epsilons, activations, rotary share, feature selection) are the model's:
/// the recipe's `[model]` must say what the checkpoint was trained with.
pub fn check_fits(folder: &Folder, config: &Config) -> Result<()> {
    let mut problems = Vec::new();
    let mut differ = |what: &str, ours: String, theirs: String| {
        if ours != theirs {
            problems.push(format!(
                "{what}: the model has {ours}, the checkpoint {theirs}"
            ));
        }
    };
    if let Some(l) = &folder.llm {
        differ(
            "rms_norm_eps",
            config.llm.rms_norm_eps.to_string(),
            l.rms_norm_eps.to_string(),
        );
        differ(
            "partial_rotary_factor",
            config.llm.partial_rotary_factor.to_string(),
            l.partial_rotary_factor.to_string(),
        );
    }
    if let (Some(v), Some(ours)) = (&folder.vision, &config.vision) {
        differ(
            "vision layer_norm_eps",
            ours.layer_norm_eps.to_string(),
            v.layer_norm_eps.to_string(),
        );
        differ(
            "vision hidden_act",
            format!("{:?}", ours.hidden_act),
            format!("{:?}", v.hidden_act),
        );
    }
    if let Some(layer) = folder.select_layer {
        differ(
            "mm_vision_select_layer",
            config.mm_vision_select_layer.to_string(),
            layer.to_string(),
        );
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(bad(
            &folder.path,
            format!(
                "was trained with other settings than the recipe's [model] ({}); set them in the recipe",
                problems.join("; ")
            ),
        )),
    }
}

/// `t` `[r, d]` with rows appended up to `rows`, each the mean of `t`'s.
fn grow_rows(t: &Tensor, rows: usize) -> candle_core::Result<Tensor> {
    let (r, d) = t.dims2()?;
    let mean = t.mean_keepdim(0)?;
    Tensor::cat(
        &[t.clone(), mean.broadcast_as((rows - r, d))?.contiguous()?],
        0,
    )
}
