//! The model's configuration under Hugging Face's `config.json` names:
//! [`Qwen2Config`] (the LLM), [`SiglipVisionConfig`] (the vision tower),
//! [`ProjectorConfig`] (VILA's `mm_projector`), and [`Config`], their VILA
//! composition. Each reads the `config.json` that `transformers` or VILA
//! writes for its part and writes one back; a recipe's `[model]` maps onto
//! them ([`Config::from_recipe`]).
//!
//! Parsing goes through [`Fields`], so a missing or mistyped field is
//! named in the error (`num_hidden_layers: expected an integer, found
//! "2"`), as a user fixing a config.json needs.

use std::collections::BTreeMap;

use lvpipe_pipeline::recipe::ModelConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// A `config.json` field that is missing or of the wrong type.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError(pub String);

type Parsed<T> = std::result::Result<T, FieldError>;

/// Typed access to the fields of a `config.json` object.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    pub fn get<T: serde::de::DeserializeOwned>(&self, name: &str) -> Parsed<Option<T>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
                FieldError(format!(
                    "`{name}`: expected {}, found {v}",
                    std::any::type_name::<T>()
                        .rsplit("::")
                        .next()
                        .unwrap_or("a value")
                ))
            }),
        }
    }

    pub fn required<T: serde::de::DeserializeOwned>(&self, name: &str) -> Parsed<T> {
        self.get(name)?
            .ok_or_else(|| FieldError(format!("`{name}` is missing")))
    }

    pub fn or<T: serde::de::DeserializeOwned>(&self, name: &str, default: T) -> Parsed<T> {
        Ok(self.get(name)?.unwrap_or(default))
    }
}

/// How RoPE positions are stretched beyond the trained context, as Hugging
/// Face's `rope_scaling` (`rope_type` / `type`) defines it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// NTK-aware: the base grows with the sequence once it passes
    /// `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// YaRN: low frequencies interpolated, high ones kept, a ramp between,
    /// and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: Option<usize>,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
    },
}

impl RopeScaling {
    /// Reads a `rope_scaling` (or transformers 5 `rope_parameters`) object;
    /// `None` for the default (unscaled) type.
    fn parse(v: &Map<String, Value>) -> Parsed<Option<Self>> {
        let f = Fields(v);
        let kind: String = match f.get("rope_type")? {
            Some(k) => k,
            None => f.or("type", "default".to_string())?,
        };
        let factor = || f.required::<f64>("factor");
        Ok(Some(match kind.as_str() {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "yarn" => RopeScaling::Yarn {
                factor: factor()?,
                original_max_position_embeddings: f.get("original_max_position_embeddings")?,
                beta_fast: f.or("beta_fast", 32.0)?,
                beta_slow: f.or("beta_slow", 1.0)?,
                attention_factor: f.get("attention_factor")?,
            },
            other => {
                return Err(FieldError(format!(
                    "`rope_scaling`: rope type `{other}` is not supported (linear, dynamic, yarn)"
                )));
            }
        }))
    }

    /// A recipe stage's `rope_scaling`, read as a `config.json` one.
    pub fn from_recipe(spec: &lvpipe_pipeline::recipe::RopeScalingSpec) -> Parsed<Self> {
        let value = serde_json::to_value(spec).expect("the spec serializes");
        let Value::Object(map) = value else {
            unreachable!("a struct serializes as an object")
        };
        // Unset YaRN settings take Hugging Face's defaults, as in config.json.
        let map: Map<String, Value> = map.into_iter().filter(|(_, v)| !v.is_null()).collect();
        Self::parse(&map)?.ok_or_else(|| FieldError("`rope_scaling`: a type is needed".into()))
    }

    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Yarn { factor, .. } => factor,
        }
    }
}

/// Qwen2's `config.json` (`Qwen2ForCausalLM`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Share of each head's dimensions RoPE rotates. Not a Qwen2 setting
    /// (transformers' Qwen2 always rotates all): a model with another value
    /// cannot be exported as Qwen2.
    pub partial_rotary_factor: f64,
}

impl Qwen2Config {
    /// Reads Qwen2's `config.json` object (older top-level `rope_theta` /
    /// `rope_scaling`, or transformers 5's `rope_parameters`).
    pub fn parse(v: &Map<String, Value>) -> Parsed<Self> {
        let f = Fields(v);
        if let Some(kind) = f.get::<String>("model_type")?
            && !matches!(kind.as_str(), "qwen2" | "llama")
        {
            return Err(FieldError(format!(
                "`model_type` is `{kind}`; the LLM must be qwen2"
            )));
        }
        let act: String = f.or("hidden_act", "silu".into())?;
        if act != "silu" {
            return Err(FieldError(format!(
                "`hidden_act` `{act}` is not supported (silu)"
            )));
        }
        let heads: usize = f.required("num_attention_heads")?;
        let hidden: usize = f.required("hidden_size")?;
        if let Some(head_dim) = f.get::<usize>("head_dim")?
            && head_dim * heads != hidden
        {
            return Err(FieldError(format!(
                "`head_dim` {head_dim} is not hidden_size / num_attention_heads ({})",
                hidden / heads.max(1)
            )));
        }
        let params = f.get::<Map<String, Value>>("rope_parameters")?;
        let (rope_theta, rope_scaling) = match &params {
            Some(p) => (
                Fields(p).or("rope_theta", 10_000.0)?,
                RopeScaling::parse(p)?,
            ),
            None => (
                f.or("rope_theta", 10_000.0)?,
                match f.get::<Map<String, Value>>("rope_scaling")? {
                    Some(s) => RopeScaling::parse(&s)?,
                    None => None,
                },
            ),
        };
        Ok(Qwen2Config {
            vocab_size: f.required("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: f.required("intermediate_size")?,
            num_hidden_layers: f.required("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: f.or("num_key_value_heads", heads)?,
            max_position_embeddings: f.or("max_position_embeddings", 32_768)?,
            rms_norm_eps: f.or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.or("tie_word_embeddings", false)?,
            partial_rotary_factor: f.or("partial_rotary_factor", 1.0)?,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The `config.json` transformers' `Qwen2ForCausalLM` loads: the
    /// top-level `rope_theta` / `rope_scaling` form, which transformers 4
    /// reads and 5 converts. Refuses what Qwen2 cannot express.
    pub fn to_hf(&self) -> Parsed<Value> {
        if self.partial_rotary_factor != 1.0 {
            return Err(FieldError(format!(
                "`partial_rotary_factor` {} cannot be expressed by transformers' Qwen2, which rotates every dimension",
                self.partial_rotary_factor
            )));
        }
        let rope_scaling = self.rope_scaling.map(|s| {
            let mut v = serde_json::to_value(s).expect("rope scaling serializes");
            if let Some(o) = v.as_object_mut() {
                o.retain(|_, v| !v.is_null());
                // transformers 4 reads `type`, 5 `rope_type`.
                o.insert("type".into(), o["rope_type"].clone());
            }
            v
        });
        Ok(json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": false,
            "use_cache": true,
            "torch_dtype": "float32",
        }))
    }
}

/// The activation of a vision MLP, by its `hidden_act` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// The exact GELU, `x * Phi(x)` (`gelu`, PyTorch's `nn.GELU()`).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation (`gelu_pytorch_tanh`, SigLIP's).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    pub fn forward(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

/// SigLIP's vision `config.json` (`SiglipVisionModel`; the `vision_config`
/// of a whole SigLIP's is read too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl SiglipVisionConfig {
    pub fn parse(v: &Map<String, Value>) -> Parsed<Self> {
        if let Some(Value::Object(inner)) = v.get("vision_config") {
            return Self::parse(inner);
        }
        let f = Fields(v);
        let act: String = f.or("hidden_act", "gelu_pytorch_tanh".into())?;
        let hidden_act = match act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(FieldError(format!(
                    "`hidden_act` `{other}` is not supported (gelu, gelu_pytorch_tanh)"
                )));
            }
        };
        let channels: usize = f.or("num_channels", 3)?;
        if channels != 3 {
            return Err(FieldError(format!(
                "`num_channels` is {channels}; images have 3"
            )));
        }
        Ok(SiglipVisionConfig {
            hidden_size: f.or("hidden_size", 768)?,
            intermediate_size: f.or("intermediate_size", 3072)?,
            num_hidden_layers: f.or("num_hidden_layers", 12)?,
            num_attention_heads: f.or("num_attention_heads", 12)?,
            image_size: f.or("image_size", 224)?,
            patch_size: f.or("patch_size", 16)?,
            hidden_act,
            layer_norm_eps: f.or("layer_norm_eps", 1e-6)?,
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// What the tower cannot run with this selection: heads that do not
    /// divide the width, patches that do not tile the image, a selected
    /// layer it does not have, a selection that leaves no square grid.
    fn problems(&self, select_layer: i32, feature: SelectFeature) -> Vec<String> {
        let mut problems = Vec::new();
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            problems.push(format!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            problems.push(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        let states = self.num_hidden_layers as i32 + 1;
        if select_layer >= states || select_layer < -states {
            problems.push(format!(
                "mm_vision_select_layer {select_layer} is outside the tower's {states} hidden states"
            ));
        }
        if feature == SelectFeature::Patch {
            problems.push(
                "mm_vision_select_feature `patch` drops a CLS token SigLIP does not have; use cls_patch"
                    .into(),
            );
        }
        problems
    }

    /// The `config.json` transformers' `SiglipVisionModel` loads (without
    /// the pooling head, which VILA does not use).
    pub fn to_hf(&self) -> Value {
        json!({
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "vision_use_head": false,
            "torch_dtype": "float32",
        })
    }
}

/// VILA's projector `config.json` (`mm_projector_type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    /// Patches merged per side into one LLM token: 2 in VILA's
    /// `mlp_downsample`; other values are lvpipe's own.
    pub downsample: usize,
}

impl ProjectorConfig {
    pub fn parse(v: &Map<String, Value>) -> Parsed<Self> {
        let kind: String = Fields(v).required("mm_projector_type")?;
        if kind != "mlp_downsample" {
            return Err(FieldError(format!(
                "`mm_projector_type` `{kind}` is not supported (mlp_downsample)"
            )));
        }
        Ok(ProjectorConfig { downsample: 2 })
    }

    pub fn to_hf(&self) -> Parsed<Value> {
        if self.downsample != 2 {
            return Err(FieldError(format!(
                "a projector downsample of {} cannot be expressed by VILA's mlp_downsample (2)",
                self.downsample
            )));
        }
        Ok(json!({
            "architectures": ["MultimodalProjector"],
            "model_type": "v2l_projector",
            "mm_projector_type": "mlp_downsample",
            "torch_dtype": "float32",
        }))
    }
}

/// Which vision features reach the projector, as VILA's
/// `mm_vision_select_feature` says: `cls_patch` keeps every token (SigLIP
/// has no CLS token), `patch` drops the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectFeature {
    ClsPatch,
    Patch,
}

/// The VILA model's configuration: its three networks and how they meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub llm: Qwen2Config,
    /// None: a text-only LLM (a plain Qwen2 folder); media are refused.
    pub vision: Option<SiglipVisionConfig>,
    pub projector: ProjectorConfig,
    /// The vision tower's hidden state the projector takes, as an index into
    /// its `hidden_states` (embeddings, then each layer's output; -1 the
    /// last layer's, before the post-LayerNorm): VILA's
    /// `mm_vision_select_layer`.
    pub mm_vision_select_layer: i32,
    pub mm_vision_select_feature: SelectFeature,
    /// The `<image>` token id: placeholders to replace with media tokens.
    pub image_token: u32,
    /// How fresh weights are drawn (lvpipe's, not a checkpoint's).
    #[serde(default)]
    pub init: InitConfig,
}

/// The distributions of fresh LLM weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Std of the normal draw of fresh LLM matrices (`initializer_range`;
    /// none: uniform(+-1/sqrt(fan_in))).
    pub initializer_range: Option<f64>,
    /// Per-module std of that draw, by Hugging Face module name (`init_std`;
    /// overrides `initializer_range` for those modules).
    pub init_std: BTreeMap<String, f64>,
}

impl Config {
    /// The configuration a recipe's `[model]` describes.
    pub fn from_recipe(m: &ModelConfig, image_token: u32) -> Self {
        let vision_hidden = m.vision_hidden_size as usize;
        Config {
            llm: Qwen2Config {
                vocab_size: m.vocab_size as usize,
                hidden_size: m.hidden_size as usize,
                intermediate_size: m.intermediate_size as usize,
                num_hidden_layers: m.num_layers as usize,
                num_attention_heads: m.num_heads as usize,
                num_key_value_heads: m.num_kv_heads as usize,
                max_position_embeddings: m.max_position_embeddings as usize,
                rms_norm_eps: m.rms_norm_eps,
                rope_theta: m.rope_base,
                rope_scaling: None,
                tie_word_embeddings: m.tie_word_embeddings,
                partial_rotary_factor: m.partial_rotary_factor,
            },
            vision: Some(SiglipVisionConfig {
                hidden_size: vision_hidden,
                intermediate_size: m
                    .vision_intermediate_size
                    .map_or(4 * vision_hidden, |s| s as usize),
                num_hidden_layers: m.vision_layers as usize,
                num_attention_heads: m.vision_heads as usize,
                image_size: m.image_size as usize,
                patch_size: m.patch_size as usize,
                hidden_act: Activation::GeluTanh,
                layer_norm_eps: m.layer_norm_eps,
            }),
            projector: ProjectorConfig {
                downsample: m.projector_downsample.max(1) as usize,
            },
            mm_vision_select_layer: m.mm_vision_select_layer,
            mm_vision_select_feature: SelectFeature::ClsPatch,
            image_token,
            init: InitConfig {
                initializer_range: m.initializer_range,
                init_std: m.init_std.clone(),
            },
        }
    }

    /// Vision patches per side (0 without a tower).
    pub(crate) fn grid(&self) -> usize {
        self.vision.as_ref().map_or(0, SiglipVisionConfig::grid)
    }

    /// LLM tokens per image: ceil(grid / downsample)^2.
    pub fn tokens_per_media(&self) -> usize {
        self.grid().div_ceil(self.projector.downsample).pow(2)
    }

    /// Checks what the networks cannot run: heads that do not divide the
    /// width, a selected layer the tower does not have, a feature selection
    /// that leaves no square grid.
    pub fn check(&self) -> Parsed<()> {
        let l = &self.llm;
        let mut problems = Vec::new();
        if l.num_attention_heads == 0 || !l.hidden_size.is_multiple_of(l.num_attention_heads) {
            problems.push(format!(
                "llm hidden_size {} is not a multiple of num_attention_heads {}",
                l.hidden_size, l.num_attention_heads
            ));
        } else if l.num_key_value_heads == 0
            || !l.num_attention_heads.is_multiple_of(l.num_key_value_heads)
        {
            problems.push(format!(
                "llm num_attention_heads {} is not a multiple of num_key_value_heads {}",
                l.num_attention_heads, l.num_key_value_heads
            ));
        }
        if let Some(v) = &self.vision {
            problems.extend(v.problems(self.mm_vision_select_layer, self.mm_vision_select_feature));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(FieldError(problems.join("; "))),
        }
    }

    /// How many of the tower's layers run: those up to the selected hidden
    /// state.
    pub(crate) fn vision_layers_run(&self) -> usize {
        let layers = self.vision.as_ref().map_or(0, |v| v.num_hidden_layers);
        let states = layers as i32 + 1;
        let index = match self.mm_vision_select_layer {
            i if i < 0 => states + i,
            i => i,
        };
        index.clamp(0, states - 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn qwen2_reads_old_and_transformers5_rope_fields_alike() {
        let base = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1});
        let mut old = obj(base.clone());
        old.insert("rope_theta".into(), json!(5e5));
        old.insert(
            "rope_scaling".into(),
            json!({"type": "linear", "factor": 4.0}),
        );
        let mut new = obj(base);
        new.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}),
        );
        let (a, b) = (
            Qwen2Config::parse(&old).unwrap(),
            Qwen2Config::parse(&new).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
        assert_eq!(a.rope_theta, 5e5);
        // Written back in the old form, it reads the same.
        let back = Qwen2Config::parse(a.to_hf().unwrap().as_object().unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let bad = obj(json!({"vocab_size": 10, "hidden_size": "8", "num_attention_heads": 2}));
        let err = Qwen2Config::parse(&bad).unwrap_err().0;
        assert!(
            err.contains("`hidden_size`") && err.contains("\"8\""),
            "{err}"
        );
        let missing = obj(json!({"vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2}));
        let err = Qwen2Config::parse(&missing).unwrap_err().0;
        assert!(err.contains("`intermediate_size` is missing"), "{err}");
        let yarn = obj(json!({"rope_type": "longrope", "factor": 2.0}));
        let err = RopeScaling::parse(&yarn).unwrap_err().0;
        assert!(err.contains("longrope"), "{err}");
    }

    #[test]
    fn partial_rotary_is_refused_by_the_qwen2_export() {
        let mut c = Qwen2Config::parse(&obj(json!({"vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2})))
        .unwrap();
        c.partial_rotary_factor = 0.5;
        let err = c.to_hf().unwrap_err().0;
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }

    #[test]
    fn a_whole_siglip_config_yields_its_vision_part() {
        let full = obj(
            json!({"model_type": "siglip", "text_config": {"hidden_size": 5},
            "vision_config": {"hidden_size": 32, "image_size": 28, "patch_size": 14,
                "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}}),
        );
        let v = SiglipVisionConfig::parse(&full).unwrap();
        assert_eq!((v.hidden_size, v.grid(), v.num_hidden_layers), (32, 2, 3));
        assert_eq!(v.hidden_act, Activation::GeluTanh);
    }
}
