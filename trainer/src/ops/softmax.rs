//! The softmax kernels: a row over its visible keys (shared with the
//! decoder's attention), and the vision tower's full softmax with its
//! gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// Softmax of `scale * row` over `keys`, written to `out` (zero elsewhere).
fn softmax_row(row: &[f32], out: &mut [f32], keys: std::ops::RangeInclusive<usize>, scale: f32) {
    out.fill(0.0);
    let (lo, hi) = (*keys.start(), *keys.end());
    let src = &row[lo..=hi];
    let dst = &mut out[lo..=hi];
    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = ((s - max) * scale).exp();
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// `dx = scale * y * (g - sum(g * y))` per row, over the visible keys only.
fn softmax_grad_row(
    y: &[f32],
    g: &[f32],
    dx: &mut [f32],
    keys: std::ops::RangeInclusive<usize>,
    scale: f32,
) {
    dx.fill(0.0);
    let (lo, hi) = (*keys.start(), *keys.end());
    let (y, g) = (&y[lo..=hi], &g[lo..=hi]);
    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
    for ((d, &yv), &gv) in dx[lo..=hi].iter_mut().zip(y).zip(g) {
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
        .for_each(|(out, row)| softmax_row(row, out, 0..=t - 1, scale));
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
            .for_each(|(d, (y, g))| softmax_grad_row(y, g, d, 0..=t - 1, self.scale));
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}
