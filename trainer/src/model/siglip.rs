//! The SigLIP vision tower: patch embedding (a stride-p convolution),
//! learned position embeddings, pre-norm ViT blocks and a final LayerNorm,
//! under `vision_tower.vision_model.*` as in SigLIP checkpoints. VILA takes
//! the hidden state of a chosen layer (`mm_vision_select_layer`), never the
//! post-LayerNorm, so only the layers up to it run.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::init::POSITION_EMBEDDING_STD;
use super::layers::{LayerNorm, Linear};
use super::recompute::Recompute;
use super::{Activation, SiglipVisionConfig};
use crate::attention::{Visible, attention};

/// Pre-norm ViT block (SigLIP's encoder layer).
#[derive(Clone)]
struct VisionBlock {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: usize,
}

impl VisionBlock {
    pub(crate) fn new(vb: &VarBuilder, c: &SiglipVisionConfig) -> Result<Self> {
        let (d, eps, wide) = (c.hidden_size, c.layer_norm_eps, c.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(VisionBlock {
            ln1: LayerNorm::new(&vb.pp("layer_norm1"), d, eps)?,
            q: Linear::new(&a.pp("q_proj"), d, d, true)?,
            k: Linear::new(&a.pp("k_proj"), d, d, true)?,
            v: Linear::new(&a.pp("v_proj"), d, d, true)?,
            o: Linear::new(&a.pp("out_proj"), d, d, true)?,
            ln2: LayerNorm::new(&vb.pp("layer_norm2"), d, eps)?,
            fc1: Linear::new(&vb.pp("mlp").pp("fc1"), d, wide, true)?,
            fc2: Linear::new(&vb.pp("mlp").pp("fc2"), wide, d, true)?,
            act: c.hidden_act,
            heads: c.num_attention_heads,
        })
    }

    fn params(&self) -> Vec<Tensor> {
        let linears = [&self.q, &self.k, &self.v, &self.o, &self.fc1, &self.fc2];
        let mut out: Vec<Tensor> = linears.into_iter().flat_map(Linear::params).collect();
        out.extend(self.ln1.params().into_iter().chain(self.ln2.params()));
        out
    }

    /// `x` is [N, P, D]: each image's patches attend to all of that
    /// image's, through the memory-linear kernel with the images as the
    /// samples of one row.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, p, d) = x.dims3()?;
        let dh = d / self.heads;
        let h = self.ln1.forward(x)?;
        // [N, P, heads * dh] to [heads, N * P, dh].
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((n * p, self.heads, dh))?
                .transpose(0, 1)?
                .contiguous()
        };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let images = (0..n * p).map(|i| (i - i % p) as u32).collect();
        let visible = Arc::new(Visible::bidirectional(images));
        let y = attention(&q, &k, &v, &visible, 1.0 / (dh as f32).sqrt())?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, p, d))?;
        let x = (x + self.o.forward(&y)?)?;
        let h = self
            .act
            .forward(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// The tower: `[N, 3, S, S]` pixels to `[N, P, Dv]` patch features.
pub(crate) struct VisionTower {
    patch_embedding: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    /// The layers up to the selected hidden state.
    blocks: Vec<VisionBlock>,
    /// Loaded and saved with the tower, unused by VILA's feature selection.
    _post_layernorm: LayerNorm,
    patch_size: usize,
    hidden: usize,
    /// Set: each block recomputed in the backward pass.
    pub(crate) recompute: Option<Arc<Recompute>>,
}

impl VisionTower {
    /// `vb` is at `vision_tower.vision_model`.
    pub(crate) fn new(vb: &VarBuilder, c: &SiglipVisionConfig, layers_run: usize) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let p = c.patch_size;
        let fan_in = 3 * p * p;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patch_embedding = emb.pp("patch_embedding").get_with_hints(
            (c.hidden_size, 3, p, p),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let patch_bias =
            emb.pp("patch_embedding")
                .get_with_hints(c.hidden_size, "bias", Init::Const(0.0))?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (c.grid() * c.grid(), c.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: POSITION_EMBEDDING_STD,
            },
        )?;
        // Every layer's parameters exist (a checkpoint has them all); the
        // ones past the selected hidden state never run.
        let mut blocks = (0..c.num_hidden_layers)
            .map(|i| VisionBlock::new(&vb.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        blocks.truncate(layers_run);
        Ok(VisionTower {
            patch_embedding,
            patch_bias,
            position_embedding,
            blocks,
            _post_layernorm: LayerNorm::new(
                &vb.pp("post_layernorm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            patch_size: p,
            recompute: None,
            hidden: c.hidden_size,
        })
    }

    /// The selected hidden state `[N, P, Dv]` of `[N, 3, S, S]` pixels.
    pub(crate) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, _, s, _) = pixels.dims4()?;
        let (p, g) = (self.patch_size, s / self.patch_size);
        // A stride-p convolution as a matmul over flattened patches.
        let patches = pixels
            .reshape((n, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, 3 * p * p))?;
        let like = |t: &Tensor| t.to_dtype(pixels.dtype());
        let w = like(&self.patch_embedding)?.reshape((self.hidden, 3 * p * p))?;
        let mut x = patches
            .broadcast_matmul(&w.t()?)?
            .broadcast_add(&like(&self.patch_bias)?)?
            .broadcast_add(&like(&self.position_embedding)?)?;
        for block in &self.blocks {
            x = match &self.recompute {
                Some(r) => {
                    let b = block.clone();
                    r.apply(&x, block.params(), Arc::new(move |x| b.forward(x)))?
                }
                None => block.forward(&x)?,
            };
        }
        Ok(x)
    }
}
