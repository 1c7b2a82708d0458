//! SwiGLU's `silu(gate) * up` in one pass forward and one backward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::*;

pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (
            f32_slice(a, al, "swiglu gate")?,
            f32_slice(b, bl, "swiglu up")?,
        );
        if al.shape() != bl.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                al.shape(),
                bl.shape()
            )
        }
        let mut y = vec![0.0f32; gate.len()];
        y.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(y, (a, u))| {
                for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
                    *y = a * sigmoid(a) * u;
                }
            });
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes both gradients, d_gate then d_up.
        let both = gate.apply_op3_no_bwd(up, &grad_res.contiguous()?, &SwiGluGrad)?;
        let d_gate = both.get(0)?;
        let d_up = both.get(1)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `d_gate = g * u * silu'(a)`, `d_up = g * silu(a)`, stacked `[2, ..]`.
pub(super) struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_slice(a, al, "swiglu grad gate")?;
        let up = f32_slice(b, bl, "swiglu grad up")?;
        let g = f32_slice(gs, gl, "swiglu grad")?;
        let n = gate.len();
        let mut out = vec![0.0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(
                gate.par_chunks(CHUNK)
                    .zip(up.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((dg, du), ((a, u), g))| {
                for i in 0..a.len() {
                    let s = sigmoid(a[i]);
                    du[i] = g[i] * a[i] * s;
                    dg[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(al.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
