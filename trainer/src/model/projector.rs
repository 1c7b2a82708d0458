//! VILA's `mlp_downsample` projector: 2x2 neighbouring patches
//! concatenated (odd grids padded), LayerNorm, Linear, exact (erf) GELU,
//! Linear, under `mm_projector.layers.{1,2,4}` as in VILA checkpoints. The
//! merged tokens come in VILA's `flat_square` order: block columns outer,
//! block rows inner; within a token, the 2x2 patches row by row.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{LayerNorm, Linear};
use super::{Config, SiglipVisionConfig};

/// `nn.LayerNorm`'s default epsilon, which VILA's projector keeps.
const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

/// `[N, P, Dv]` patch features to `[N, tokens_per_media, H]` LLM tokens.
pub(crate) struct Projector {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    grid: usize,
    downsample: usize,
}

impl Projector {
    /// `vb` is at `mm_projector.layers`.
    pub(crate) fn new(vb: &VarBuilder, c: &Config, vision: &SiglipVisionConfig) -> Result<Self> {
        let k = c.projector.downsample;
        let d4 = vision.hidden_size * k * k;
        let hidden = c.llm.hidden_size;
        Ok(Projector {
            norm: LayerNorm::new(&vb.pp(1), d4, TORCH_LAYER_NORM_EPS)?,
            fc1: Linear::new(&vb.pp(2), d4, hidden, true)?,
            fc2: Linear::new(&vb.pp(4), hidden, hidden, true)?,
            grid: vision.grid(),
            downsample: k,
        })
    }

    pub(crate) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (n, _, d) = features.dims3()?;
        let (g, k) = (self.grid, self.downsample);
        let mut x = features.reshape((n, g, g, d))?;
        let padded = g.div_ceil(k) * k;
        if padded != g {
            x = x.pad_with_zeros(1, 0, padded - g)?;
            x = x.pad_with_zeros(2, 0, padded - g)?;
        }
        let m = padded / k;
        let x = x
            .reshape((n, m, k, m, k, d))?
            // [n, block col, block row, row in block, col in block, d].
            .permute((0, 3, 1, 2, 4, 5))?
            .contiguous()?
            .reshape((n, m * m, k * k * d))?;
        let h = self.fc1.forward(&self.norm.forward(&x)?)?.gelu_erf()?;
        self.fc2.forward(&h)
    }
}
