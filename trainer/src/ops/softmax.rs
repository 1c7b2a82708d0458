//! The vision tower's full softmax with its gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// Softmax of `scale * row`, written to `out`.
fn softmax_row(row: &[f32], out: &mut [f32], scale: f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (d, &s) in out.iter_mut().zip(row) {
        *d = ((s - max) * scale).exp();
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in out.iter_mut() {
        *d *= inv;
    }
}

/// `dx = scale * y * (g - sum(g * y))` of one row.
fn softmax_grad_row(y: &[f32], g: &[f32], dx: &mut [f32], scale: f32) {
    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
    for ((d, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
        *d = scale * yv * (gv - dot);
    }
}

/// Row-wise softmax of `scale * x` over the last dimension.
pub(super) fn softmax_fwd(
    storage: &CpuStorage,
    layout: &Layout,
    scale: f32,
) -> Result<(CpuStorage, Shape)> {
    let x = f32_slice(storage, layout, "softmax")?;
    let t = layout.dims()[layout.dims().len() - 1];
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .for_each(|(out, row)| softmax_row(row, out, scale));
    Ok((CpuStorage::F32(y), layout.shape().clone()))
}

pub(super) struct FullSoftmax {
    pub(super) scale: f32,
}

impl CustomOp1 for FullSoftmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        softmax_fwd(storage, layout, self.scale)
    }

    fn bwd(&self, _: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        res.contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxGrad { scale: self.scale })
            .map(Some)
    }
}

pub(super) struct SoftmaxGrad {
    pub(super) scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (
            f32_slice(ys, yl, "softmax")?,
            f32_slice(gs, gl, "softmax grad")?,
        );
        let t = yl.dims()[yl.dims().len() - 1];
        let mut dx = vec![0.0f32; y.len()];
        dx.par_chunks_mut(t)
            .zip(y.par_chunks(t).zip(g.par_chunks(t)))
            .for_each(|(d, (y, g))| softmax_grad_row(y, g, d, self.scale));
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}
