//! RoPE together with the split of a projection into heads.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::*;

/// Forward: `[T, n * dh]` to rotated heads `[n, T, dh]`. Inverse (the
/// gradient): rotated-head gradients `[n, T, dh]` back to `[T, n * dh]`,
/// rotating by minus the angle.
pub(super) struct RopeHeads {
    pub(super) heads: usize,
    pub(super) rope: Arc<Rope>,
    pub(super) inverse: bool,
}

/// Rotates `src` (one head's `dh` values) into `dst` by the angles whose
/// cos and sin are `cos`/`sin` (`dh / 2` each); `sign` -1 rotates back.
pub(super) fn rotate(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    let (x1, x2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        d1[i] = x1[i] * c - x2[i] * s;
        d2[i] = x2[i] * c + x1[i] * s;
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "rope")?;
        let (n, half) = (self.heads, self.rope.half);
        let dh = 2 * half;
        let t = self.rope.cos.len() / half.max(1);
        if x.len() != t * n * dh {
            bail!(
                "rope: {:?} is not {t} positions of {n} heads of {dh}",
                layout.shape()
            )
        }
        let mut y = vec![0.0f32; x.len()];
        let (cos, sin) = (&self.rope.cos, &self.rope.sin);
        if self.inverse {
            // y[t, h * dh ..] = rotate^-1(x[h, t, ..])
            y.par_chunks_mut(n * dh)
                .enumerate()
                .with_min_len(8)
                .for_each(|(p, row)| {
                    let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                    for (h, dst) in row.chunks_mut(dh).enumerate() {
                        rotate(&x[(h * t + p) * dh..][..dh], dst, c, s, -1.0);
                    }
                });
            return Ok((CpuStorage::F32(y), Shape::from((t, n * dh))));
        }
        // y[h, t, ..] = rotate(x[t, h * dh ..])
        y.par_chunks_mut(dh)
            .enumerate()
            .with_min_len(64)
            .for_each(|(r, dst)| {
                let (h, p) = (r / t, r % t);
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                rotate(&x[p * n * dh + h * dh..][..dh], dst, c, s, 1.0);
            });
        Ok((CpuStorage::F32(y), Shape::from((n, t, dh))))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let inverse = RopeHeads {
            heads: self.heads,
            rope: self.rope.clone(),
            inverse: true,
        };
        grad_res.contiguous()?.apply_op1_no_bwd(&inverse).map(Some)
    }
}
