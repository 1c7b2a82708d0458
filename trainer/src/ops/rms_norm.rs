//! RMSNorm in one pass forward and one backward, both gradients written in
//! the backward pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::*;

/// `1 / sqrt(mean(row^2) + eps)`.
pub(super) fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

pub(super) struct RmsNorm {
    pub(super) eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(xs, xl, "rms-norm")?,
            f32_slice(ws, wl, "rms-norm weight")?,
        );
        let h = last_dim(xl, w.len(), "rms-norm")?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .with_min_len(16)
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes dx and, as a last row, dw.
        let both =
            x.apply_op3_no_bwd(w, &grad_res.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let rows = both.dim(0)? - 1;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The last dimension of `layout`, checked to be `want`.
pub(super) fn last_dim(layout: &Layout, want: usize, what: &str) -> Result<usize> {
    let h = layout.dims().last().copied().unwrap_or(0);
    if h != want || h == 0 {
        bail!("{what}: last dimension {h}, expected {want}")
    }
    Ok(h)
}

/// Rows of `y = x * r * w`, `r = 1 / rms(x)`: `dx = r * w * g - x * r^3 *
/// sum(g * w * x) / H` and `dw = sum over rows of g * x * r`, as a
/// `[rows + 1, H]` tensor whose last row is `dw`.
pub(super) struct RmsNormGrad {
    pub(super) eps: f32,
}

/// Rows per parallel task of the reductions over rows: fixed, so that the
/// sums, and hence the losses of a resumed run, do not depend on threads.
pub(super) const ROW_BLOCK: usize = 32;

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms-norm grad")?;
        let w = f32_slice(ws, wl, "rms-norm grad weight")?;
        let g = f32_slice(gs, gl, "rms-norm grad")?;
        let h = last_dim(xl, w.len(), "rms-norm grad")?;
        let rows = x.len() / h;
        let mut out = vec![0.0f32; (rows + 1) * h];
        let (dx, dw) = out.split_at_mut(rows * h);
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROW_BLOCK * h)
            .zip(x.par_chunks(ROW_BLOCK * h).zip(g.par_chunks(ROW_BLOCK * h)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0.0f32; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let r = inv_rms(x, self.eps);
                    let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                    let c = r * r * r * dot / h as f32;
                    for i in 0..h {
                        dx[i] = r * w[i] * g[i] - x[i] * c;
                        dw[i] += g[i] * x[i] * r;
                    }
                }
                dw
            })
            .collect();
        for p in partial {
            for (o, v) in dw.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
}
