//! VILA's `mlp_downsample` projector: 2x2 neighbouring patches
//! concatenated (odd grids padded), LayerNorm, Linear, exact GELU, Linear,
//! under `mm_projector.layers.{1,2,4}` as in VILA checkpoints.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::Config;
use super::layers::{LayerNorm, Linear};

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
    pub(crate) fn new(vb: &VarBuilder, c: &Config) -> Result<Self> {
        let d4 = c.vision_hidden * c.downsample * c.downsample;
        Ok(Projector {
            norm: LayerNorm::new(&vb.pp(1), d4, c.eps)?,
            fc1: Linear::new(&vb.pp(2), d4, c.hidden, true)?,
            fc2: Linear::new(&vb.pp(4), c.hidden, c.hidden, true)?,
            grid: c.grid(),
            downsample: c.downsample,
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
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((n, m * m, k * k * d))?;
        let h = self.fc1.forward(&self.norm.forward(&x)?)?.gelu()?;
        self.fc2.forward(&h)
    }
}
