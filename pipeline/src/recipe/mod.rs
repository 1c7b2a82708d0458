//! Curriculum recipes: the model's shape and one `[[stage]]` per stage.
//!
//! The format is documented in `recipes/README.md`; `recipes/tiny.toml` and
//! `recipes/longvila-qwen2-7b.toml` are complete examples. Parsing checks
//! syntax and types only; [`Recipe::check`] finds every problem a recipe has
//! on its own, and `plan` adds the checks against shards.

use std::collections::BTreeMap;
use std::path::Path;

use lvpipe_schemas::TrainableModule;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod check;

pub(crate) use check::stage_limits;
pub use check::{MAX_CONTEXT, MAX_GLOBAL_BATCH, MAX_REPEAT};

/// A whole curriculum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelConfig,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

/// The sizes planning needs (and the trainer will build).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Side of the square input image of the vision tower, in pixels.
    pub image_size: u32,
    /// Side of one vision patch, in pixels.
    pub patch_size: u32,
    /// Projector downsampling (2 for VILA's `mlp_downsample`: 2x2 patches per token).
    #[serde(default = "two")]
    pub projector_downsample: u32,
    pub vision_hidden_size: u32,
    pub vision_layers: u32,
    pub vision_heads: u32,
    /// Width of the vision MLP (SigLIP's `intermediate_size`; default 4 x
    /// `vision_hidden_size`).
    #[serde(default)]
    pub vision_intermediate_size: Option<u32>,
    /// The vision tower's hidden state the projector takes (VILA's
    /// `mm_vision_select_layer`: -1 the last layer's output, -2 the one
    /// before, as LongVILA's SigLIP; never the post-LayerNorm).
    #[serde(default = "last_layer")]
    pub mm_vision_select_layer: i32,
    /// LayerNorm epsilon of the vision tower (SigLIP's `layer_norm_eps`).
    #[serde(default = "norm_eps")]
    pub layer_norm_eps: f64,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub vocab_size: u32,
    pub rope_base: f64,
    /// RMSNorm epsilon of the LLM (Qwen2's `rms_norm_eps`).
    #[serde(default = "norm_eps")]
    pub rms_norm_eps: f64,
    /// The context the LLM's positions are made for (Qwen2's
    /// `max_position_embeddings`; written into exported configs).
    #[serde(default = "qwen2_positions")]
    pub max_position_embeddings: u32,
    /// The LM head reuses the token embedding (Hugging Face's
    /// `tie_word_embeddings`, as Qwen2-0.5B and 1.5B have it); no
    /// `lm_head.weight` is stored.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Fresh LLM matrices are drawn from normal(0, this), as Hugging Face's
    /// Qwen2 `initializer_range` (0.02) does; absent, from PyTorch's
    /// uniform(+-1/sqrt(fan_in)), and only the token embedding at 0.02.
    pub initializer_range: Option<f64>,
    /// Per-module std of the normal draw of fresh LLM matrices, by their
    /// Hugging Face module name (`embed_tokens`, `q_proj`, `k_proj`,
    /// `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`, `lm_head`):
    /// overrides `initializer_range` for the modules it names.
    #[serde(default)]
    pub init_std: BTreeMap<String, f64>,
    /// Share of each attention head's dimensions that RoPE rotates (Hugging
    /// Face's `partial_rotary_factor`, as Phi and StableLM have it; default
    /// 1): the rest match keys by content alone, at any distance.
    #[serde(default = "full_rotary")]
    pub partial_rotary_factor: f64,
    /// The chat template the shards must have been tokenized with.
    #[serde(default = "chatml")]
    pub chat_template: String,
}

/// Dimensions of a head of `head_dim` that RoPE rotates under
/// `partial_rotary_factor`: an even count, rounded down (Hugging Face's
/// `int(head_dim * factor)`, kept even so that they pair up).
pub fn rotary_dims(head_dim: usize, factor: f64) -> usize {
    ((head_dim as f64 * factor) as usize).min(head_dim) / 2 * 2
}

/// The default `partial_rotary_factor`: every dimension pair turns.
pub fn full_rotary() -> f64 {
    1.0
}

/// The LLM modules whose fresh weights `init_std` may set.
pub const INIT_STD_MODULES: [&str; 9] = [
    "embed_tokens",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

fn two() -> u32 {
    2
}

fn last_layer() -> i32 {
    -1
}

fn norm_eps() -> f64 {
    1e-6
}

fn qwen2_positions() -> u32 {
    32_768
}

fn chatml() -> String {
    "chatml".to_string()
}

impl ModelConfig {
    /// Vision patches per image or frame.
    pub fn patches(&self) -> u32 {
        (self.image_size / self.patch_size.max(1)).pow(2)
    }

    /// LLM tokens per image or frame after the projector: ceil(sqrt(P)/d)^2.
    pub fn tokens_per_media(&self) -> u32 {
        let side = self.image_size / self.patch_size.max(1);
        side.div_ceil(self.projector_downsample.max(1)).pow(2)
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Constant,
}

/// What a stage's weights count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightBy {
    #[default]
    Samples,
    Tokens,
}

/// How a row split over a sequence-parallel group attends across its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SpMode {
    /// All-to-all from sequence-split to head-split and back (DeepSpeed
    /// Ulysses): the degree must divide the heads.
    #[default]
    Ulysses,
    /// Key-value blocks passed around the group's ring, combined with an
    /// online softmax: any degree.
    Ring,
}

impl SpMode {
    pub fn is_ulysses(&self) -> bool {
        *self == SpMode::Ulysses
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            SpMode::Ulysses => "ulysses",
            SpMode::Ring => "ring",
        }
    }
}

/// What happens to a sample longer than the stage's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LongSamples {
    /// Leave it out of the mix (and count it in the plan).
    #[default]
    Drop,
    /// Cut text-only samples into context-sized chunks (stage 4); others are dropped.
    Chunk,
}

/// The order in which a stage's samples reach the trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// All sources shuffled together, in a new order every epoch.
    #[default]
    Shuffled,
    /// The sources one after the other, in the order listed (or of their
    /// `part`), each shuffled within; every epoch keeps that order (a
    /// curriculum within the stage).
    Sequential,
}

/// Where a stage's weights start, as a recipe writes it: `"base"` (fresh
/// seeded weights), an earlier stage's name, `"hf:DIR"` (a Hugging Face,
/// VILA or lvpipe model folder: every part it has), or a table of folders
/// per part, `{ llm = "hf:A", vision = "hf:B", projector = "hf:C" }` (parts
/// not named start fresh). Relative folders are relative to the recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StageInit {
    Named(String),
    Parts(BTreeMap<String, String>),
}

/// The parts a per-part `init` table may name.
pub const INIT_PARTS: [&str; 3] = ["llm", "vision", "projector"];

impl StageInit {
    pub fn is_base(&self) -> bool {
        matches!(self, StageInit::Named(n) if n == "base")
    }

    /// The earlier stage this one continues, if it names one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            StageInit::Named(n) if n != "base" && !n.starts_with("hf:") => Some(n),
            _ => None,
        }
    }

    /// The model folders to load, each with the part it is for (`None`:
    /// every part the folder has), relative to `recipe_dir`.
    pub fn folders(&self, recipe_dir: &Path) -> Vec<(Option<String>, std::path::PathBuf)> {
        let path = |s: &str| recipe_dir.join(s.strip_prefix("hf:").unwrap_or(s));
        match self {
            StageInit::Named(n) if n.starts_with("hf:") => vec![(None, path(n))],
            StageInit::Named(_) => vec![],
            StageInit::Parts(parts) => INIT_PARTS
                .iter()
                .filter_map(|p| parts.get(*p).map(|f| (Some(p.to_string()), path(f))))
                .collect(),
        }
    }
}

impl std::fmt::Display for StageInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageInit::Named(n) => f.write_str(n),
            StageInit::Parts(parts) => {
                let list: Vec<String> = parts.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                write!(f, "{{ {} }}", list.join(", "))
            }
        }
    }
}

/// One curriculum stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// Where the stage's weights start: `base`, an earlier stage's name, a
    /// model folder (`hf:DIR`), or model folders per part.
    pub init: StageInit,
    pub trainable: Vec<String>,
    /// Context length in tokens, media expanded.
    pub context: u32,
    /// Overrides the model's RoPE base for this stage (stage 4 raises it):
    /// one base, or several raised progressively over equal parts of the
    /// stage's steps (`rope_base = [40000.0, 160000.0]`).
    pub rope_base: Option<RopeBase>,
    /// Hugging Face's `rope_scaling` for this stage and after it:
    /// `{ rope_type = "linear", factor = 4.0 }` (as the released
    /// LongVILA-1M's, on top of a raised base), `dynamic` (NTK) or `yarn`.
    pub rope_scaling: Option<RopeScalingSpec>,
    /// The positions this stage makes the model for, written as the saved
    /// config's `max_position_embeddings` (default: the model's), as VILA's
    /// merge script writes the extended length. `context` must fit it
    /// times the `rope_scaling` factor.
    pub max_position_embeddings: Option<u32>,
    /// The frame policy the stage is planned for (`uniform:N`,
    /// `fps:F,max:N`), checked against `sequence_parallel`. Frames are
    /// sampled when shards are built (the source's policy); a mix does not
    /// re-sample them.
    pub frames: Option<String>,
    pub lr: f64,
    pub schedule: Schedule,
    /// Warmup as a fraction of the stage's steps.
    #[serde(default)]
    pub warmup: f64,
    /// Packs per optimizer step across all ranks.
    pub global_batch: u32,
    pub epochs: Option<u32>,
    pub steps: Option<u64>,
    pub seed: u64,
    /// Sequence-parallel degree the stage is planned for.
    #[serde(default = "one")]
    pub sequence_parallel: u32,
    /// How a split row attends across its parts (`ulysses` or `ring`).
    #[serde(default, skip_serializing_if = "SpMode::is_ulysses")]
    pub sp_mode: SpMode,
    #[serde(default)]
    pub weight_by: WeightBy,
    #[serde(default)]
    pub long_samples: LongSamples,
    #[serde(default)]
    pub order: Order,
    /// Packs per forward and backward pass on one rank: gradients of the
    /// rank's share of `global_batch` accumulate over micro-batches of this
    /// size before one optimizer step (default: the whole share at once).
    pub micro_batch: Option<u32>,
    /// The optimizer: `adamw` (f32 moments, 8 bytes of state per
    /// parameter), `adamw8bit` (moments in 8 bits per 256-value block, as
    /// bitsandbytes' AdamW8bit: 2 bytes) or `adafactor` (a factored second
    /// moment, as Hugging Face's Adafactor: about 4 (rows + columns) bytes
    /// per matrix).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// AdamW's second-moment decay (default 0.999, as Hugging Face's
    /// `adam_beta2`; 0.95 adapts faster, as LLM pretraining uses).
    pub adam_beta2: Option<f64>,
    /// AdamW's decoupled weight decay (default 0, as LongVILA's stages).
    pub weight_decay: Option<f64>,
    /// Rank of the LoRA adapters of `llm_lora` (default 8).
    pub lora_r: Option<u32>,
    /// LoRA scaling numerator: updates are scaled by `lora_alpha / lora_r`
    /// (default 2 x rank).
    pub lora_alpha: Option<f64>,
    /// Activation checkpointing: each decoder layer and vision block keeps
    /// only its input in the forward pass and is recomputed in the backward
    /// pass (same gradients, memory of one block's activations; costs one
    /// more forward pass).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(rename = "source")]
    pub sources: Vec<StageSource>,
}

/// A stage's `rope_scaling`, with Hugging Face's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScalingSpec {
    /// `linear`, `dynamic` or `yarn`.
    pub rope_type: String,
    pub factor: f64,
    /// YaRN's settings (Hugging Face's defaults where absent).
    pub original_max_position_embeddings: Option<u32>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub attention_factor: Option<f64>,
}

impl RopeScalingSpec {
    pub const TYPES: [&'static str; 3] = ["linear", "dynamic", "yarn"];
}

/// The optimizer a stage trains with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    AdamW,
    #[serde(rename = "adamw8bit")]
    AdamW8bit,
    Adafactor,
}

impl OptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::AdamW8bit => "adamw8bit",
            OptimizerKind::Adafactor => "adafactor",
        }
    }
}

/// A stage's RoPE base: one value, or a progression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeBase {
    One(f64),
    Progressive(Vec<f64>),
}

impl Stage {
    /// The modules this stage trains ([`Recipe::check`] reports unknown ones).
    pub fn modules(&self) -> Result<Vec<TrainableModule>> {
        self.trainable
            .iter()
            .map(|m| {
                TrainableModule::parse(m)
                    .map_err(|e| Error::Recipe(format!("stage `{}`: {e}", self.name)))
            })
            .collect()
    }

    /// The RoPE base at optimizer step `step` (0-based) of `steps`: the
    /// model's `default` when the stage sets none; with a progression, part
    /// k of k equal parts of the steps uses the k-th base.
    pub fn rope_base_at(&self, default: f64, step: u64, steps: u64) -> f64 {
        match &self.rope_base {
            None => default,
            Some(RopeBase::One(b)) => *b,
            Some(RopeBase::Progressive(bases)) if bases.is_empty() => default,
            Some(RopeBase::Progressive(bases)) => {
                let k = u128::from(step) * bases.len() as u128 / u128::from(steps.max(1));
                bases[(k as usize).min(bases.len() - 1)]
            }
        }
    }

    /// The positions the stage's model is made for.
    pub fn positions(&self, model: &ModelConfig) -> u32 {
        self.max_position_embeddings
            .unwrap_or(model.max_position_embeddings)
    }

    /// The RoPE base the stage ends with (what the next stage inherits).
    pub fn final_rope_base(&self, default: f64) -> f64 {
        match &self.rope_base {
            None => default,
            Some(RopeBase::One(b)) => *b,
            Some(RopeBase::Progressive(bases)) => bases.last().copied().unwrap_or(default),
        }
    }

    /// AdamW's `(beta2, weight_decay)`: the recipe's, or 0.999 and 0.
    pub fn adamw(&self) -> (f64, f64) {
        (
            self.adam_beta2.unwrap_or(0.999),
            self.weight_decay.unwrap_or(0.0),
        )
    }

    pub fn lora(&self) -> (usize, f64) {
        let r = self.lora_r.unwrap_or(8).max(1);
        (r as usize, self.lora_alpha.unwrap_or(2.0 * r as f64))
    }
}

fn one() -> u32 {
    1
}

/// One source of a stage: which samples, and how much of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSource {
    pub name: String,
    /// A WHERE clause over `samples`, or a full query returning `sample_id`.
    pub query: String,
    /// Whole copies of the selection per epoch (VILA's `name*N`).
    pub repeat: Option<u32>,
    /// Share of the stage (by samples or tokens, as the stage says), relative
    /// to the other sources' weights.
    pub weight: Option<f64>,
    /// In a `sequential` stage, the turn this source comes in (default: its
    /// position in the list, from 1): sources of the same part are shuffled
    /// together, parts come in increasing order.
    pub part: Option<u32>,
}

impl StageSource {
    /// The turn of source `index` (0-based) of a `sequential` stage.
    pub fn part(&self, index: usize) -> u32 {
        self.part.unwrap_or(index as u32 + 1)
    }

    /// The query as SQL selecting the rows of `samples` it names.
    pub fn sql(&self, columns: &str) -> String {
        let q = self.query.trim();
        let lower = q.to_ascii_lowercase();
        if lower.starts_with("select") || lower.starts_with("with") {
            format!(
                "SELECT {columns} FROM samples WHERE sample_id IN (SELECT sample_id FROM ({q}))"
            )
        } else {
            format!("SELECT {columns} FROM samples WHERE {q}")
        }
    }
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        Self::parse(&text).map_err(|e| match e {
            Error::Recipe(m) => Error::Recipe(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Recipe(e.to_string()))
    }

    /// blake3 of the canonical recipe (for checkpoints and mixes).
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_string(self).expect("recipe serializes");
        blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
    }

    /// Stage by 1-based number.
    pub fn stage(&self, number: usize) -> Result<&Stage> {
        self.stages.get(number.wrapping_sub(1)).ok_or_else(|| {
            Error::Recipe(format!(
                "no stage {number}: the recipe has stages 1 to {}",
                self.stages.len()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_that_would_exhaust_memory_are_problems() {
        let stage: Stage = toml::from_str(
            "name = 's'\ninit = 'base'\ntrainable = ['llm']\ncontext = 4294967295\nlr = 1.0\n\
             schedule = 'constant'\nglobal_batch = 4000000000\nsteps = 9\nseed = 0\n\
             [[source]]\nname = 'a'\nquery = \"kind = 'text'\"\nrepeat = 4000000000\n",
        )
        .unwrap();
        let problems = super::stage_limits("stage 1 (s)", &stage);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("context 4294967295 is over the limit of 16777216"));
        assert!(problems[2].contains("source a repeat"));
    }

    #[test]
    fn a_rope_progression_splits_the_steps_evenly() {
        let mut stage: Stage = toml::from_str(
            "name = 's'\ninit = 'base'\ntrainable = ['llm']\ncontext = 8\nlr = 1.0\n\
             schedule = 'constant'\nglobal_batch = 1\nsteps = 9\nseed = 0\n\
             rope_base = [1.0, 2.0, 3.0]\nsource = []",
        )
        .unwrap();
        let at: Vec<f64> = (0..9).map(|s| stage.rope_base_at(7.0, s, 9)).collect();
        assert_eq!(at, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
        assert_eq!(stage.final_rope_base(7.0), 3.0);
        stage.rope_base = Some(RopeBase::One(5.0));
        assert_eq!(
            (stage.rope_base_at(7.0, 4, 9), stage.final_rope_base(7.0)),
            (5.0, 5.0)
        );
        stage.rope_base = None;
        assert_eq!(stage.final_rope_base(7.0), 7.0);
    }

    #[test]
    fn adamw_settings_default_to_hugging_faces() {
        let stage = |extra: &str| -> Stage {
            toml::from_str(&format!(
                "name = 's'\ninit = 'base'\ntrainable = ['llm']\ncontext = 8\nlr = 1.0\n\
                 schedule = 'constant'\nglobal_batch = 1\nsteps = 9\nseed = 0\n{extra}source = []"
            ))
            .unwrap()
        };
        assert_eq!(stage("").adamw(), (0.999, 0.0));
        assert_eq!(
            stage("adam_beta2 = 0.95\nweight_decay = 0.1\n").adamw(),
            (0.95, 0.1)
        );
    }

    use super::*;

    /// A stage's context must fit its positions times the scaling factor;
    /// the scaling's type and factor are checked by name.
    #[test]
    fn rope_scaling_and_positions_are_checked_against_the_context() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/tiny.toml");
        let mut recipe = Recipe::load(&path).unwrap();
        recipe.model.max_position_embeddings = 1024;
        let long = recipe
            .stages
            .iter()
            .position(|s| s.context == 2048)
            .unwrap();
        let at = |r: &Recipe| {
            r.check()
                .into_iter()
                .filter(|p| p.contains("positions") || p.contains("rope_scaling"))
                .collect::<Vec<_>>()
        };
        let problems = at(&recipe);
        assert!(!problems.is_empty(), "2048 tokens over 1024 positions pass");
        assert!(
            problems[0].contains("context 2048") && problems[0].contains("1024"),
            "{problems:?}"
        );
        // Linear x2 makes 2048 fit, as does the stage's own length.
        let spec: RopeScalingSpec = toml::from_str("rope_type = 'linear'\nfactor = 2.0").unwrap();
        for s in recipe.stages.iter_mut().filter(|s| s.context == 2048) {
            s.rope_scaling = Some(spec.clone());
        }
        assert_eq!(at(&recipe), Vec::<String>::new());
        for s in recipe.stages.iter_mut().filter(|s| s.context == 2048) {
            s.rope_scaling = None;
            s.max_position_embeddings = Some(2048);
        }
        assert_eq!(at(&recipe), Vec::<String>::new());
        recipe.stages[long].rope_scaling = Some(RopeScalingSpec {
            rope_type: "ntk".into(),
            factor: 0.5,
            ..spec
        });
        let problems = at(&recipe);
        assert!(
            problems.iter().any(|p| p.contains("type `ntk`")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("factor 0.5")),
            "{problems:?}"
        );
    }

    #[test]
    fn shipped_recipes_parse_and_check_clean() {
        for file in ["tiny.toml", "longvila-qwen2-7b.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../recipes")
                .join(file);
            let recipe = Recipe::load(&path).unwrap();
            assert_eq!(recipe.stages.len(), 5, "{file}");
            assert_eq!(recipe.check(), Vec::<String>::new(), "{file}");
        }
    }

    #[test]
    fn media_tokens_follow_vila() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/longvila-qwen2-7b.toml");
        let recipe = Recipe::load(&path).unwrap();
        // SigLIP-so400m at 384 px, 14 px patches: 27x27 patches -> 196 tokens.
        assert_eq!(recipe.model.patches(), 729);
        assert_eq!(recipe.model.tokens_per_media(), 196);
    }

    #[test]
    fn where_clauses_and_full_queries_become_selections() {
        let s = |query: &str| StageSource {
            name: "a".into(),
            query: query.into(),
            repeat: None,
            weight: None,
            part: None,
        };
        assert_eq!(
            s("kind = 'text'").sql("sample_id"),
            "SELECT sample_id FROM samples WHERE kind = 'text'"
        );
        assert!(
            s("SELECT sample_id FROM samples LIMIT 3")
                .sql("x")
                .contains("IN (SELECT sample_id FROM (SELECT")
        );
    }
}
