//! AdamW's in-place updates: the moments, then the parameter, each one
//! pass per tensor.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, bail};
use rayon::prelude::*;

use super::*;

/// AdamW's moment update, in place on the moment: `m = beta * m + (1 -
/// beta) * scale * g`, or with `square`, `v = beta * v + (1 - beta) *
/// (scale * g)^2`. One pass over a parameter's moment and gradient, where the
/// plain ops took four and allocated as many tensors.
pub struct Moment {
    pub beta: f32,
    /// Clipping's factor on the gradient.
    pub scale: f32,
    pub square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let m = f32_slice_mut(ms, ml, "adam moment")?;
        let g = f32_slice(gs, gl, "adam gradient")?;
        if m.len() != g.len() {
            bail!("adam moment: {} moments for {} gradients", m.len(), g.len())
        }
        let (beta, rest, scale) = (self.beta, 1.0 - self.beta, self.scale);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * scale;
                    *m = beta * *m + rest * if self.square { g * g } else { g };
                }
            });
        Ok(())
    }
}

/// AdamW's parameter update, in place on the parameter: `theta = theta *
/// decay - lr * (m / c1) / (sqrt(v / c2) + eps)`, with `c1`, `c2` the bias
/// corrections and `decay` `1 - lr * weight_decay`.
pub struct AdamStep {
    pub lr: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    pub decay: f32,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let theta = f32_slice_mut(ps, pl, "adam parameter")?;
        let m = f32_slice(ms, ml, "adam first moment")?;
        let v = f32_slice(vs, vl, "adam second moment")?;
        if theta.len() != m.len() || theta.len() != v.len() {
            bail!(
                "adam step: {} parameters, {} and {} moments",
                theta.len(),
                m.len(),
                v.len()
            )
        }
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let update = (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
                    *p = *p * self.decay - update * self.lr;
                }
            });
        Ok(())
    }
}
