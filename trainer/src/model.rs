//! The VILA-shaped model: a SigLIP-like vision tower, VILA's `mlp_downsample`
//! projector and a Qwen2-like decoder, built from plain tensor ops so that
//! every layer has gradients on every backend.
//!
//! Parameters live in a [`VarMap`] under Hugging Face names
//! (`vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `mm_projector.layers.1.weight`, `llm.model.layers.0.mlp.gate_proj.weight`,
//! ...) so that a checkpoint is a plain safetensors file and real SigLIP and
//! Qwen2 weights can be mapped in later.
//!
//! A packed row holds several samples: position ids restart at each sample
//! and attention is causal within a sample only (a block-diagonal mask).
//! Each `<image>` placeholder is replaced by the projector's tokens for its
//! image, so the sequence the decoder sees is longer than the token ids.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{D, DType, Device, IndexOp, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use lvpipe_pipeline::recipe::{ModelConfig, rotary_dims};

use crate::attention::attention;
use crate::ops;

/// Sizes of the model, from a recipe's `[model]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub image_size: usize,
    pub patch_size: usize,
    pub downsample: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub rope_base: f64,
    /// The LM head is the token embedding (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Std of the normal draw of fresh LLM matrices (`initializer_range`;
    /// none: uniform(+-1/sqrt(fan_in))).
    #[serde(default)]
    pub initializer_range: Option<f64>,
    /// Per-module std of that draw, by Hugging Face module name
    /// (`init_std`; overrides `initializer_range` for those modules).
    #[serde(default)]
    pub init_std: BTreeMap<String, f64>,
    /// Share of each head's dimensions that RoPE rotates
    /// (`partial_rotary_factor`).
    #[serde(default = "lvpipe_pipeline::recipe::full_rotary")]
    pub partial_rotary_factor: f64,
    pub eps: f64,
    /// The `<image>` token id: placeholders to replace with media tokens.
    pub image_token: u32,
}

impl Config {
    pub fn from_recipe(m: &ModelConfig, image_token: u32) -> Self {
        Config {
            image_size: m.image_size as usize,
            patch_size: m.patch_size as usize,
            downsample: m.projector_downsample.max(1) as usize,
            vision_hidden: m.vision_hidden_size as usize,
            vision_layers: m.vision_layers as usize,
            vision_heads: m.vision_heads as usize,
            hidden: m.hidden_size as usize,
            intermediate: m.intermediate_size as usize,
            layers: m.num_layers as usize,
            heads: m.num_heads as usize,
            kv_heads: m.num_kv_heads as usize,
            vocab: m.vocab_size as usize,
            rope_base: m.rope_base,
            tie_embeddings: m.tie_word_embeddings,
            initializer_range: m.initializer_range,
            init_std: m.init_std.clone(),
            partial_rotary_factor: m.partial_rotary_factor,
            eps: 1e-6,
            image_token,
        }
    }

    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// LLM tokens per image: ceil(grid / downsample)^2.
    pub fn tokens_per_media(&self) -> usize {
        self.grid().div_ceil(self.downsample).pow(2)
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    /// Low-rank adapter (`llm_lora`): `y += scale * x A^T B^T`.
    lora: Option<Lora>,
}

struct Lora {
    /// `[r, in]`, `lora_A.weight` in PEFT's names.
    a: Tensor,
    /// `[out, r]`, `lora_B.weight`; zero at the start, so the adapted model
    /// starts as the base model.
    b: Tensor,
    scale: f64,
}

impl Linear {
    fn new(vb: &VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let w = vb.get_with_hints(
            (out, inp),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(out, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Linear { w, b, lora: None })
    }

    /// `x` is [.., inp].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.broadcast_matmul(&self.w.t()?)?;
        if let Some(l) = &self.lora {
            let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            b: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.w)?.broadcast_add(&self.b)
    }
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            w: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.w, self.eps as f32)
    }
}

/// Pre-norm ViT block (SigLIP's encoder layer).
struct VisionBlock {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VisionBlock {
    fn new(vb: &VarBuilder, c: &Config) -> Result<Self> {
        let d = c.vision_hidden;
        let a = vb.pp("self_attn");
        Ok(VisionBlock {
            ln1: LayerNorm::new(&vb.pp("layer_norm1"), d, c.eps)?,
            q: Linear::new(&a.pp("q_proj"), d, d, true)?,
            k: Linear::new(&a.pp("k_proj"), d, d, true)?,
            v: Linear::new(&a.pp("v_proj"), d, d, true)?,
            o: Linear::new(&a.pp("out_proj"), d, d, true)?,
            ln2: LayerNorm::new(&vb.pp("layer_norm2"), d, c.eps)?,
            fc1: Linear::new(&vb.pp("mlp").pp("fc1"), d, 4 * d, true)?,
            fc2: Linear::new(&vb.pp("mlp").pp("fc2"), 4 * d, d, true)?,
            heads: c.vision_heads,
        })
    }

    /// `x` is [N, P, D].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, p, d) = x.dims3()?;
        let dh = d / self.heads;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((n, p, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let att = ops::softmax_last_dim(&q.matmul(&k.t()?)?, 1.0 / (dh as f32).sqrt())?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, p, d))?;
        let x = (x + self.o.forward(&y)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?.gelu()?;
        x + self.fc2.forward(&h)?
    }
}

/// Qwen2 decoder layer: RMSNorm, grouped-query attention with RoPE, SwiGLU.
struct DecoderLayer {
    ln1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
}

impl DecoderLayer {
    fn new(vb: &VarBuilder, c: &Config) -> Result<Self> {
        let (h, dh) = (c.hidden, c.hidden / c.heads);
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(DecoderLayer {
            ln1: RmsNorm::new(&vb.pp("input_layernorm"), h, c.eps)?,
            q: Linear::new(&a.pp("q_proj"), h, c.heads * dh, true)?,
            k: Linear::new(&a.pp("k_proj"), h, c.kv_heads * dh, true)?,
            v: Linear::new(&a.pp("v_proj"), h, c.kv_heads * dh, true)?,
            o: Linear::new(&a.pp("o_proj"), c.heads * dh, h, false)?,
            ln2: RmsNorm::new(&vb.pp("post_attention_layernorm"), h, c.eps)?,
            gate: Linear::new(&m.pp("gate_proj"), h, c.intermediate, false)?,
            up: Linear::new(&m.pp("up_proj"), h, c.intermediate, false)?,
            down: Linear::new(&m.pp("down_proj"), c.intermediate, h, false)?,
            heads: c.heads,
            kv_heads: c.kv_heads,
        })
    }

    fn attention_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("q_proj", &mut self.q),
            ("k_proj", &mut self.k),
            ("v_proj", &mut self.v),
            ("o_proj", &mut self.o),
        ]
    }

    /// `x` is [T, H]; `rope` holds the positions' angles; query `q` attends
    /// to keys `starts[q] ..= q`.
    fn forward(&self, x: &Tensor, rope: &Arc<ops::Rope>, starts: &Arc<Vec<u32>>) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let dh = hidden / self.heads;
        let h = self.ln1.forward(x)?;
        let q = ops::rope_heads(&self.q.forward(&h)?, self.heads, rope)?;
        let k = ops::rope_heads(&self.k.forward(&h)?, self.kv_heads, rope)?;
        let v = self
            .v
            .forward(&h)?
            .reshape((t, self.kv_heads, dh))?
            .transpose(0, 1)?
            .contiguous()?;
        // Grouped-query attention without copying K and V per query head:
        // the `group` query heads of a KV head (consecutive, as in Qwen2)
        // stack into one [group * T, dh] matrix against that head's keys.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((self.kv_heads, group * t, dh))?;
        let y = attention(&q, &k, &v, starts, 1.0 / (dh as f32).sqrt())?
            .reshape((self.heads, t, dh))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, hidden))?;
        let x = (x + self.o.forward(&y)?)?;
        let h = self.ln2.forward(&x)?;
        let mlp = self.down.forward(&ops::swiglu(
            &self.gate.forward(&h)?,
            &self.up.forward(&h)?,
        )?)?;
        x + mlp
    }
}

/// One packed row as the model takes it.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub input_ids: &'a [u32],
    pub loss_mask: &'a [u8],
    /// Sample boundaries as cumulative offsets into `input_ids` (0 first).
    pub boundaries: &'a [u32],
    /// `[num_media, 3, S, S]` normalized pixels, one image per placeholder.
    pub pixels: &'a [f32],
}

/// The expanded sequence of a row: media placeholders widened to the
/// projector's tokens.
struct Expanded {
    /// Per expanded position: the text token id, or `None` for a media token.
    tokens: Vec<Option<u32>>,
    /// Loss weight of predicting each expanded position's token.
    mask: Vec<f32>,
    positions: Vec<u32>,
    /// Expanded boundaries.
    boundaries: Vec<usize>,
}

impl Expanded {
    fn new(row: &Row, image_token: u32, per_media: usize) -> Self {
        let mut e = Expanded {
            tokens: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
            boundaries: vec![0],
        };
        for w in row.boundaries.windows(2) {
            let start = e.tokens.len();
            for i in w[0] as usize..w[1] as usize {
                let id = row.input_ids[i];
                if id == image_token {
                    for _ in 0..per_media {
                        e.tokens.push(None);
                        e.mask.push(0.0);
                    }
                } else {
                    e.tokens.push(Some(id));
                    e.mask.push(f32::from(row.loss_mask[i]));
                }
            }
            e.positions.extend(0..(e.tokens.len() - start) as u32);
            e.boundaries.push(e.tokens.len());
        }
        e
    }
}

/// The whole model.
pub struct Model {
    pub config: Config,
    patch_embedding: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    vision_blocks: Vec<VisionBlock>,
    post_layernorm: LayerNorm,
    proj_norm: LayerNorm,
    proj_fc1: Linear,
    proj_fc2: Linear,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope_base: f64,
}

impl Model {
    /// Creates the parameters in `vars` (randomly initialized where absent)
    /// and the model over them.
    pub fn new(config: Config, vars: &VarMap, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_varmap(vars, DType::F32, device);
        let c = &config;
        let vm = vb.pp("vision_tower").pp("vision_model");
        let emb = vm.pp("embeddings");
        let p = c.patch_size;
        let fan_in = 3 * p * p;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patch_embedding = emb.pp("patch_embedding").get_with_hints(
            (c.vision_hidden, 3, p, p),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let patch_bias =
            emb.pp("patch_embedding")
                .get_with_hints(c.vision_hidden, "bias", Init::Const(0.0))?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (c.grid() * c.grid(), c.vision_hidden),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: POSITION_EMBEDDING_STD,
            },
        )?;
        let vision_blocks = (0..c.vision_layers)
            .map(|i| VisionBlock::new(&vm.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(&vm.pp("post_layernorm"), c.vision_hidden, c.eps)?;
        let d4 = c.vision_hidden * c.downsample * c.downsample;
        let pj = vb.pp("mm_projector").pp("layers");
        let proj_norm = LayerNorm::new(&pj.pp(1), d4, c.eps)?;
        let proj_fc1 = Linear::new(&pj.pp(2), d4, c.hidden, true)?;
        let proj_fc2 = Linear::new(&pj.pp(4), c.hidden, c.hidden, true)?;
        let lm = vb.pp("llm");
        let embed = lm.pp("model").pp("embed_tokens").get_with_hints(
            (c.vocab, c.hidden),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let layers = (0..c.layers)
            .map(|i| DecoderLayer::new(&lm.pp("model").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&lm.pp("model").pp("norm"), c.hidden, c.eps)?;
        let lm_head = if c.tie_embeddings {
            // One tensor in two places: both uses' gradients add up on it.
            Linear {
                w: embed.clone(),
                b: None,
                lora: None,
            }
        } else {
            Linear::new(&lm.pp("lm_head"), c.hidden, c.vocab, false)?
        };
        Ok(Model {
            rope_base: c.rope_base,
            config,
            patch_embedding,
            patch_bias,
            position_embedding,
            vision_blocks,
            post_layernorm,
            proj_norm,
            proj_fc1,
            proj_fc2,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Adds rank-`r` LoRA adapters to the q, k, v and o projections of every
    /// decoder layer, as `...q_proj.lora_A.weight` / `lora_B.weight` in
    /// `vars` (kept if already there, as when resuming). Updates are scaled
    /// by `alpha / r`.
    pub fn attach_lora(&mut self, vars: &VarMap, r: usize, alpha: f64, seed: u64) -> Result<()> {
        let device = self.embed.device().clone();
        let vb = VarBuilder::from_varmap(vars, DType::F32, &device);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = vb.pp(format!("llm.model.layers.{i}.self_attn"));
            for (name, lin) in layer.attention_mut() {
                let (out, inp) = lin.w.dims2()?;
                let p = a.pp(name);
                let fresh = !vars
                    .data()
                    .lock()
                    .expect("var map lock")
                    .contains_key(&format!(
                        "llm.model.layers.{i}.self_attn.{name}.lora_A.weight"
                    ));
                let la = p
                    .pp("lora_A")
                    .get_with_hints((r, inp), "weight", Init::Const(0.0))?;
                let lb = p
                    .pp("lora_B")
                    .get_with_hints((out, r), "weight", Init::Const(0.0))?;
                lin.lora = Some(Lora {
                    a: la,
                    b: lb,
                    scale: alpha / r as f64,
                });
                if fresh {
                    // A as PEFT initializes it (Kaiming-uniform), B zero.
                    let name = format!("llm.model.layers.{i}.self_attn.{name}.lora_A.weight");
                    reinit_one(vars, &name, seed, None)?;
                }
            }
        }
        Ok(())
    }

    /// Folds the adapters into the base weights (`W += scale * B A`) and
    /// removes them from `vars`: what is saved afterwards has the base
    /// model's names only.
    pub fn merge_lora(&mut self, vars: &VarMap) -> Result<()> {
        let mut data = vars.data().lock().expect("var map lock");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, lin) in layer.attention_mut() {
                let Some(l) = lin.lora.take() else {
                    continue;
                };
                let base = format!("llm.model.layers.{i}.self_attn.{name}");
                let var = data
                    .get(&format!("{base}.weight"))
                    .expect("the base weight exists");
                let merged = (var.as_tensor() + (l.b.matmul(&l.a)? * l.scale)?)?;
                var.set(&merged)?;
                data.remove(&format!("{base}.lora_A.weight"));
                data.remove(&format!("{base}.lora_B.weight"));
            }
        }
        Ok(())
    }

    /// Changes the RoPE base (stage 4 raises it for longer contexts).
    pub fn set_rope_base(&mut self, base: f64) {
        self.rope_base = base;
    }

    /// Vision tower: `[N, 3, S, S]` pixels to `[N, P, Dv]` patch features.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (n, _, s, _) = pixels.dims4()?;
        let (p, g) = (c.patch_size, s / c.patch_size);
        // A stride-p convolution as a matmul over flattened patches.
        let patches = pixels
            .reshape((n, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, 3 * p * p))?;
        let w = self.patch_embedding.reshape((c.vision_hidden, 3 * p * p))?;
        let mut x = patches
            .broadcast_matmul(&w.t()?)?
            .broadcast_add(&self.patch_bias)?
            .broadcast_add(&self.position_embedding)?;
        for block in &self.vision_blocks {
            x = block.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }

    /// Projector (`mlp_downsample`): `[N, P, Dv]` to `[N, tokens_per_media, H]`:
    /// 2x2 neighbours concatenated (odd grids padded), LayerNorm, Linear,
    /// GELU, Linear.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (n, _, d) = features.dims3()?;
        let (g, k) = (c.grid(), c.downsample);
        let mut x = features.reshape((n, g, g, d))?;
        let padded = g.div_ceil(k) * k;
        if padded != g {
            x = x.pad_with_zeros(1, 0, padded - g)?;
            x = x.pad_with_zeros(2, 0, padded - g)?;
        }
        let m = padded / k;
        let x = x
            .reshape((n, m, k, m, k, d))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((n, m * m, k * k * d))?;
        let h = self
            .proj_fc1
            .forward(&self.proj_norm.forward(&x)?)?
            .gelu()?;
        self.proj_fc2.forward(&h)
    }

    /// How many tokens of `row` carry loss (what [`Model::row_loss`] counts),
    /// without running the model.
    pub fn loss_tokens(&self, row: &Row) -> f32 {
        let c = &self.config;
        let e = Expanded::new(row, c.image_token, c.tokens_per_media());
        e.boundaries
            .windows(2)
            .flat_map(|w| w[0] + 1..w[1])
            .filter(|&j| e.tokens[j].is_some())
            .map(|j| e.mask[j])
            .sum()
    }

    /// The projected media tokens of a row's images, `[N, tokens, H]`.
    fn media(&self, row: &Row, device: &Device) -> Result<Option<Tensor>> {
        let c = &self.config;
        let n_media = row
            .input_ids
            .iter()
            .filter(|&&t| t == c.image_token)
            .count();
        if n_media == 0 {
            return Ok(None);
        }
        let s = c.image_size;
        let px = Tensor::from_slice(
            &row.pixels[..n_media * 3 * s * s],
            (n_media, 3, s, s),
            device,
        )?;
        Ok(Some(self.project(&self.encode_images(&px)?)?))
    }

    /// Final hidden states `[T, H]` (normed) of an expanded row whose media
    /// tokens are `media`.
    fn hidden(&self, e: &Expanded, media: Option<&Tensor>, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let per_media = c.tokens_per_media();
        // Embeddings: runs of text tokens gathered at once, media spliced in.
        let mut parts = Vec::new();
        let (mut i, mut m) = (0, 0);
        while i < e.tokens.len() {
            if e.tokens[i].is_none() {
                let media = media.expect("placeholders imply media");
                parts.push(media.i(m)?);
                m += 1;
                i += per_media;
                continue;
            }
            let start = i;
            while i < e.tokens.len() && e.tokens[i].is_some() {
                i += 1;
            }
            let ids: Vec<u32> = e.tokens[start..i]
                .iter()
                .map(|t| t.expect("text"))
                .collect();
            parts.push(
                self.embed
                    .index_select(&Tensor::new(ids.as_slice(), device)?, 0)?,
            );
        }
        let mut x = Tensor::cat(&parts, 0)?;
        let head_dim = c.hidden / c.heads;
        let rope = Arc::new(rope_tables(
            &e.positions,
            head_dim,
            rotary_dims(head_dim, c.partial_rotary_factor),
            self.rope_base,
        ));
        let starts = Arc::new(sample_starts(&e.boundaries));
        for layer in &self.layers {
            x = layer.forward(&x, &rope, &starts)?;
        }
        self.norm.forward(&x)
    }

    /// Negative log-likelihoods of the positions of a row that carry loss:
    /// position j predicts expanded position j + 1 within its sample, and
    /// only positions with a non-zero loss weight are scored (the LM head
    /// and softmax over the vocabulary are the largest cost of a step, and
    /// in SFT most positions have none). Returns the losses, their weights
    /// and their positions (ascending), and the expanded row.
    fn nll(&self, row: &Row, device: &Device) -> Result<(Tensor, Vec<f32>, Vec<usize>, Expanded)> {
        let c = &self.config;
        let e = Expanded::new(row, c.image_token, c.tokens_per_media());
        let media = self.media(row, device)?;
        let hidden = self.hidden(&e, media.as_ref(), device)?;
        let (mut targets, mut weights, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for w in e.boundaries.windows(2) {
            for j in w[0]..w[1] - 1 {
                if let Some(next) = e.tokens[j + 1] {
                    if e.mask[j + 1] > 0.0 {
                        targets.push(next);
                        weights.push(e.mask[j + 1]);
                        positions.push(j);
                    }
                }
            }
        }
        if positions.is_empty() {
            return Ok((Tensor::zeros(0, DType::F32, device)?, weights, positions, e));
        }
        let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let picked_hidden = hidden.index_select(&Tensor::new(index.as_slice(), device)?, 0)?;
        let nll = ops::cross_entropy(
            &self.lm_head.forward(&picked_hidden)?,
            &Tensor::new(targets.as_slice(), device)?,
        )?;
        Ok((nll, weights, positions, e))
    }

    /// Per-token losses of one packed row: (sum of masked cross-entropy,
    /// number of masked tokens), and the per-sample sums for tests.
    pub fn row_loss(&self, row: &Row, device: &Device) -> Result<(Tensor, f32, Vec<Tensor>)> {
        let (nll, weights, positions, e) = self.nll(row, device)?;
        let count = weights.iter().sum();
        if positions.is_empty() {
            let zero = Tensor::zeros((), DType::F32, device)?;
            let per_sample = vec![zero.clone(); e.boundaries.len() - 1];
            return Ok((zero, count, per_sample));
        }
        let weights_t = Tensor::new(weights.as_slice(), device)?;
        let nll = (nll * &weights_t)?;
        let per_sample = e
            .boundaries
            .windows(2)
            .map(|w| {
                let from = positions.partition_point(|&p| p < w[0]);
                let to = positions.partition_point(|&p| p < w[1]);
                if to > from {
                    nll.narrow(0, from, to - from)?.sum_all()
                } else {
                    Tensor::zeros((), DType::F32, device)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((nll.sum_all()?, count, per_sample))
    }

    /// Negative log-likelihood of each text token of a one-sample row given
    /// the tokens before it: entry k is the loss of token k + 1 (media
    /// placeholders must not occur; for perplexity of documents).
    pub fn token_nll(&self, ids: &[u32], device: &Device) -> Result<Vec<f32>> {
        let mask = vec![1u8; ids.len()];
        let bounds = [0, ids.len() as u32];
        let row = Row {
            input_ids: ids,
            loss_mask: &mask,
            boundaries: &bounds,
            pixels: &[],
        };
        let (nll, _, _, _) = self.nll(&row, device)?;
        nll.to_vec1()
    }

    /// Greedy decoding: the prompt `ids` (with `<image>` placeholders for
    /// `pixels`, as a sample), then up to `max_new` tokens, stopping after
    /// any of `stop`. Returns the new tokens. Media are encoded once.
    pub fn generate(
        &self,
        ids: &[u32],
        pixels: &[f32],
        max_new: usize,
        stop: &[u32],
        device: &Device,
    ) -> Result<Vec<u32>> {
        let c = &self.config;
        let mut seq = ids.to_vec();
        let mask = vec![0u8; ids.len() + max_new];
        let prompt_row = Row {
            input_ids: ids,
            loss_mask: &mask[..ids.len()],
            boundaries: &[0, ids.len() as u32],
            pixels,
        };
        let media = self.media(&prompt_row, device)?;
        let mut out = Vec::new();
        for _ in 0..max_new {
            let bounds = [0, seq.len() as u32];
            let row = Row {
                input_ids: &seq,
                loss_mask: &mask[..seq.len()],
                boundaries: &bounds,
                pixels,
            };
            let e = Expanded::new(&row, c.image_token, c.tokens_per_media());
            let h = self.hidden(&e, media.as_ref(), device)?;
            let last = h.narrow(0, h.dim(0)? - 1, 1)?;
            let logits = self.lm_head.forward(&last)?.squeeze(0)?;
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
            seq.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }
}

/// Re-initializes every parameter of `vars` from `seed`, with the
/// distributions [`Model::new`] uses (candle draws those from the thread
/// RNG): a fresh model is then the same on every run, so a stage started
/// from `base` is reproducible. The LLM's normal draws follow the config's
/// `initializer_range` and `init_std`.
pub fn init_seeded(vars: &VarMap, seed: u64, config: &Config) -> Result<()> {
    let mut names: Vec<String> = vars
        .data()
        .lock()
        .expect("var map lock")
        .keys()
        .cloned()
        .collect();
    names.sort();
    for name in names {
        reinit_one(vars, &name, seed, normal_std(config, &name))?;
    }
    Ok(())
}

/// The std of the normal draw of fresh parameter `name`, or none for
/// PyTorch's uniform(+-1/sqrt(fan_in)): the vision position embedding at
/// [`POSITION_EMBEDDING_STD`]; an LLM module named in `init_std` at its
/// value; the token embedding at Qwen2's 0.02 and every other LLM matrix
/// only with `initializer_range` (Hugging Face's Qwen2 draws them all from
/// it).
fn normal_std(config: &Config, name: &str) -> Option<f64> {
    if name.contains("position_embedding") {
        return Some(POSITION_EMBEDDING_STD);
    }
    if !name.starts_with("llm.") || name.contains("lora_") || !name.ends_with(".weight") {
        return None;
    }
    let module = name.trim_end_matches(".weight").rsplit('.').next();
    if let Some(std) = module.and_then(|m| config.init_std.get(m)) {
        return Some(*std);
    }
    match name.contains("embed_tokens") {
        true => Some(config.initializer_range.unwrap_or(0.02)),
        false => config.initializer_range,
    }
}

/// Standard deviation of the vision position embedding's entries at init:
/// 0.5, not SigLIP's 1/sqrt(width) (0.125 at the tiny recipe's width 64). A
/// tower trained from scratch behind the LLM did not learn where the shapes
/// are with SigLIP's: held-out position accuracy after stage 3 was 25% at
/// 0.125 (chance 20%), 99% at 1.0 and 98% at 0.5, and 0.5 kept colour (47%
/// at 1.0, 94% at 0.5; docs/trainer.md, "Learning rate").
const POSITION_EMBEDDING_STD: f64 = 0.5;

/// Draws parameter `name` afresh from a generator keyed by the seed and the
/// name (so adding parameters does not shift the others): from
/// normal(0, `normal_std`) when given, otherwise uniform(+-1/sqrt(fan_in));
/// biases and LoRA's B at 0, norm gains at 1.
fn reinit_one(vars: &VarMap, name: &str, seed: u64, normal_std: Option<f64>) -> Result<()> {
    let data = vars.data().lock().expect("var map lock");
    let var = &data[name];
    let dims = var.dims().to_vec();
    let n: usize = dims.iter().product();
    let mut state = seed
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let mut uniform = move || {
        let z = lvpipe_pipeline::splitmix(state);
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = if name.ends_with(".bias") || name.contains("lora_B") {
        vec![0.0; n]
    } else if name.contains("norm") || name == "mm_projector.layers.1.weight" {
        // Norm gains (the projector's LayerNorm is `layers.1`).
        vec![1.0; n]
    } else if let Some(std) = normal_std {
        (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n)
            .map(|_| ((uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    var.set(&Tensor::from_vec(values, dims, var.device())?)
}

/// cos and sin tables `[T, dh/2]` of the given positions' RoPE angles.
/// Only the first `rotated / 2` dimension pairs turn, at the frequencies of a
/// `rotated`-wide head; the rest keep angle 0 (partial rotary: Phi's layout
/// up to a fixed permutation of the head's dimensions).
fn rope_tables(positions: &[u32], dh: usize, rotated: usize, base: f64) -> ops::Rope {
    let half = dh / 2;
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    let freqs: Vec<f64> = (0..half)
        .map(|i| match 2 * i < rotated {
            true => 1.0 / base.powf(2.0 * i as f64 / rotated as f64),
            false => 0.0,
        })
        .collect();
    for &p in positions {
        for &freq in &freqs {
            let a = f64::from(p) * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    ops::Rope { cos, sin, half }
}

/// The first position of the sample each position of a packed row belongs
/// to: query `q` attends to keys `starts[q] ..= q`.
fn sample_starts(boundaries: &[usize]) -> Vec<u32> {
    let mut starts = Vec::with_capacity(*boundaries.last().unwrap_or(&0));
    for w in boundaries.windows(2) {
        starts.extend(std::iter::repeat_n(w[0] as u32, w[1] - w[0]));
    }
    starts
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny() -> Config {
        Config {
            image_size: 12,
            patch_size: 4,
            downsample: 2,
            vision_hidden: 8,
            vision_layers: 1,
            vision_heads: 2,
            hidden: 16,
            intermediate: 24,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 40,
            rope_base: 10000.0,
            tie_embeddings: false,
            initializer_range: None,
            init_std: BTreeMap::new(),
            partial_rotary_factor: 1.0,
            eps: 1e-6,
            image_token: 39,
        }
    }

    #[test]
    fn projector_token_count_is_ceil_half_grid_squared() {
        let device = Device::Cpu;
        // A 3x3 grid (odd) pads to 4x4 and becomes 2x2 = 4 tokens.
        let config = tiny();
        assert_eq!(config.tokens_per_media(), 4);
        let vars = VarMap::new();
        let model = Model::new(config.clone(), &vars, &device).unwrap();
        let px = Tensor::zeros((2, 3, 12, 12), DType::F32, &device).unwrap();
        let out = model.project(&model.encode_images(&px).unwrap()).unwrap();
        assert_eq!(out.dims(), &[2, 4, 16]);
        assert_eq!(
            config.tokens_per_media(),
            crate::tokens_per_media((config.grid() * config.grid()) as u32) as usize
        );
    }

    /// Deterministic parameter values (VarMap initializes from the thread
    /// RNG): norms near 1, everything else small.
    pub(crate) fn seed_vars(vars: &VarMap, seed: u64) {
        let data = vars.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut state = seed;
        for name in names {
            let var = &data[name];
            let n = var.as_tensor().elem_count();
            let norm = name.contains("norm") && name.ends_with("weight");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    if norm { 1.0 + 0.1 * u } else { 0.2 * u }
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn sample(rng: &mut u64, len: usize, media: bool) -> (Vec<u32>, Vec<u8>) {
        let mut next = || {
            *rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*rng >> 33) as u32
        };
        let mut ids: Vec<u32> = (0..len).map(|_| next() % 38).collect();
        if media {
            ids[1] = 39;
        }
        let mask = (0..len).map(|i| u8::from(i > len / 2)).collect();
        (ids, mask)
    }

    #[test]
    fn a_packed_row_gives_the_same_per_sample_losses_as_samples_alone() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let model = Model::new(tiny(), &vars, &device).unwrap();
        seed_vars(&vars, 5);
        let mut rng = 7;
        let samples = [
            sample(&mut rng, 9, true),
            sample(&mut rng, 6, false),
            sample(&mut rng, 11, true),
        ];
        let pixel_len = 3 * 12 * 12;
        let pixels: Vec<f32> = (0..2 * pixel_len)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        // Alone.
        let mut alone = Vec::new();
        let mut media_at = 0;
        for (ids, mask) in &samples {
            let n = ids.iter().filter(|&&t| t == 39).count();
            let row = Row {
                input_ids: ids,
                loss_mask: mask,
                boundaries: &[0, ids.len() as u32],
                pixels: &pixels[media_at * pixel_len..(media_at + n) * pixel_len],
            };
            media_at += n;
            let (_, _, per) = model.row_loss(&row, &device).unwrap();
            alone.push(per[0].to_scalar::<f32>().unwrap());
        }
        // Packed.
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut bounds = vec![0u32];
        for (i, m) in &samples {
            ids.extend_from_slice(i);
            mask.extend_from_slice(m);
            bounds.push(ids.len() as u32);
        }
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &bounds,
            pixels: &pixels,
        };
        let (total, count, per) = model.row_loss(&row, &device).unwrap();
        for (a, p) in alone.iter().zip(&per) {
            let p = p.to_scalar::<f32>().unwrap();
            assert!(
                (a - p).abs() < 1e-4 * a.abs().max(1.0),
                "alone {a} vs packed {p}"
            );
        }
        assert!((total.to_scalar::<f32>().unwrap() - alone.iter().sum::<f32>()).abs() < 1e-3);
        assert!(count > 0.0);
    }

    #[test]
    fn initializer_range_and_init_std_draw_the_llm_matrices_from_normals() {
        let device = Device::Cpu;
        let std_of = |vars: &VarMap, name: &str| -> (f64, f64) {
            let data = vars.data().lock().unwrap();
            let v: Vec<f32> = data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
            let var = v
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / n;
            let max = v.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
            (var.sqrt(), max)
        };
        let mut config = tiny();
        config.hidden = 64;
        config.intermediate = 96;
        let uniform_std = 1.0 / (64f64).sqrt() / 3f64.sqrt();
        for range in [None, Some(0.02)] {
            config.initializer_range = range;
            let vars = VarMap::new();
            Model::new(config.clone(), &vars, &device).unwrap();
            init_seeded(&vars, 3, &config).unwrap();
            for name in [
                "llm.model.layers.0.self_attn.q_proj.weight",
                "llm.model.layers.1.mlp.gate_proj.weight",
                "llm.lm_head.weight",
            ] {
                let (std, max) = std_of(&vars, name);
                let want = range.unwrap_or(uniform_std);
                assert!(
                    (std / want - 1.0).abs() < 0.1,
                    "{name}: std {std}, want {want}"
                );
                if range.is_none() {
                    assert!(max <= 1.0 / 8.0, "{name}: {max} beyond the uniform bound");
                }
            }
            let (std, _) = std_of(&vars, "llm.model.embed_tokens.weight");
            assert!((std / 0.02 - 1.0).abs() < 0.15, "embedding std {std}");
            // The vision tower keeps its own initialization.
            let (_, max) = std_of(
                &vars,
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            );
            assert!(max <= 1.0 / 8f64.sqrt(), "vision fc1 {max}");
        }
        // `init_std` sets the modules it names; the others keep the range.
        config.initializer_range = Some(0.02);
        config.init_std = BTreeMap::from([("embed_tokens".into(), 0.05), ("q_proj".into(), 0.01)]);
        let vars = VarMap::new();
        Model::new(config.clone(), &vars, &device).unwrap();
        init_seeded(&vars, 3, &config).unwrap();
        for (name, want) in [
            ("llm.model.embed_tokens.weight", 0.05),
            ("llm.model.layers.1.self_attn.q_proj.weight", 0.01),
            ("llm.model.layers.1.self_attn.k_proj.weight", 0.02),
            ("llm.lm_head.weight", 0.02),
        ] {
            let (std, _) = std_of(&vars, name);
            assert!(
                (std / want - 1.0).abs() < 0.1,
                "{name}: std {std}, want {want}"
            );
        }
    }

    #[test]
    fn partial_rotary_turns_only_the_first_pairs_at_a_narrower_heads_frequencies() {
        let (dh, base) = (8, 100.0);
        let full = rope_tables(&[0, 7], dh, dh, base);
        let half = rope_tables(&[0, 7], dh, dh / 2, base);
        let angle = |r: &ops::Rope, pair: usize| r.sin[4 + pair].atan2(r.cos[4 + pair]);
        // Position 7: a full head's pairs turn at 1, 100^-1/4, 100^-1/2,
        // 100^-3/4 per position; a half-rotary head's first two pairs at 1
        // and 100^-1/2, and the other two not at all.
        assert!((angle(&half, 0) - angle(&full, 0)).abs() < 1e-6);
        assert!((angle(&half, 1) - 0.7).abs() < 1e-6);
        assert!((angle(&full, 2) - 0.7).abs() < 1e-6);
        for pair in 2..4 {
            assert_eq!((half.cos[4 + pair], half.sin[4 + pair]), (1.0, 0.0));
        }
    }

    /// Central finite differences of the loss against autograd, for a few
    /// coordinates of every parameter tensor.
    #[test]
    fn gradients_match_finite_differences_in_every_layer() {
        check_gradients(false);
    }

    /// With the LM head tied to the token embedding, the embedding's
    /// gradient is the sum of both uses, and there is no LM head weight.
    #[test]
    fn tied_embeddings_get_both_gradients() {
        check_gradients(true);
    }

    fn check_gradients(tie_embeddings: bool) {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let mut config = tiny();
        config.layers = 1;
        config.tie_embeddings = tie_embeddings;
        let model = Model::new(config, &vars, &device).unwrap();
        seed_vars(&vars, 11);
        let mut rng = 3;
        let (ids, mask) = sample(&mut rng, 10, true);
        let pixels: Vec<f32> = (0..3 * 12 * 12)
            .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
            .collect();
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &[0, 4, 10],
            pixels: &pixels,
        };
        let loss = |m: &Model| -> f64 {
            let (sum, n, _) = m.row_loss(&row, &device).unwrap();
            f64::from(sum.to_scalar::<f32>().unwrap() / n)
        };
        let (sum, n, _) = model.row_loss(&row, &device).unwrap();
        let grads = (sum / f64::from(n)).unwrap().backward().unwrap();
        let data = vars.data().lock().unwrap();
        assert_eq!(
            data.contains_key("llm.lm_head.weight"),
            !tie_embeddings,
            "an LM head weight exists exactly when untied"
        );
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut checked = 0;
        for name in names {
            let var = &data[name];
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let flat_g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // The largest-gradient coordinate: the one finite differences resolve best.
            let (idx, &analytic) = flat_g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-3f32;
            let set = |v: f32| {
                let mut changed = values.clone();
                changed[idx] = v;
                var.set(&Tensor::from_vec(changed, var.shape(), &device).unwrap())
                    .unwrap();
            };
            set(values[idx] + eps);
            let up = loss(&model);
            set(values[idx] - eps);
            let down = loss(&model);
            set(values[idx]);
            let numeric = (up - down) / (2.0 * f64::from(eps));
            let err = (numeric - f64::from(analytic)).abs();
            assert!(
                err <= 2e-2 * numeric.abs().max(f64::from(analytic.abs())) + 2e-3,
                "{name}[{idx}]: autograd {analytic}, finite differences {numeric}"
            );
            checked += 1;
        }
        assert!(checked > 30, "{checked} tensors");
    }
}
