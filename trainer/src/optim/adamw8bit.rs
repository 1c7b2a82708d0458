//! AdamW with 8-bit moments: each block of a parameter's moments is decoded
//! to f32, stepped as AdamW, and encoded again ([`Quantized`]), in one
//! pass over the parameter, in place on CPU.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var, bail};
use rayon::prelude::*;

use super::AdamStep;
use super::quantized::{BLOCK, Quantized, decode, encode};
use crate::ops::{f32_slice, f32_slice_mut};

/// One AdamW8bit update of `var` with gradient `g` (f32).
pub(super) fn update(
    var: &Var,
    g: &Tensor,
    m: &mut Quantized,
    v: &mut Quantized,
    adam: &AdamStep,
) -> Result<()> {
    let theta = var.as_tensor();
    let op = Step {
        adam,
        moments: Mutex::new((m, v)),
    };
    if theta.device().is_cpu() && theta.dtype() == DType::F32 {
        return theta.inplace_op2(&g.contiguous()?, &op);
    }
    // Other devices and dtypes: the same step on an f32 copy in CPU memory
    // (`copy`: it must share no storage with the variable).
    let cpu = candle_core::Device::Cpu;
    let copy = theta.to_device(&cpu)?.to_dtype(DType::F32)?.copy()?;
    copy.inplace_op2(&g.to_device(&cpu)?.contiguous()?, &op)?;
    var.set(&copy.to_dtype(theta.dtype())?.to_device(theta.device())?)
}

struct Step<'a> {
    adam: &'a AdamStep,
    moments: Mutex<(&'a mut Quantized, &'a mut Quantized)>,
}

impl InplaceOp2 for Step<'_> {
    fn name(&self) -> &'static str {
        "adamw8bit-step"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let theta = f32_slice_mut(ps, pl, "adamw8bit parameter")?;
        let g = f32_slice(gs, gl, "adamw8bit gradient")?;
        let mut moments = self.moments.lock().expect("adamw8bit moments");
        let (m, v) = &mut *moments;
        if theta.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            bail!(
                "adamw8bit: {} parameters, {} gradients, {} and {} moments",
                theta.len(),
                g.len(),
                m.len(),
                v.len()
            )
        }
        let a = self.adam;
        let (b1, b2) = (a.b1 as f32, a.b2 as f32);
        let (scale, lr, c1, c2, eps, decay) = (
            a.scale as f32,
            a.lr as f32,
            a.c1 as f32,
            a.c2 as f32,
            a.eps as f32,
            a.decay as f32,
        );
        let (m_signed, v_signed) = (m.signed, v.signed);
        theta
            .par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .zip(m.codes.par_chunks_mut(BLOCK).zip(m.absmax.par_iter_mut()))
            .zip(v.codes.par_chunks_mut(BLOCK).zip(v.absmax.par_iter_mut()))
            .for_each_init(
                || (vec![0f32; BLOCK], vec![0f32; BLOCK]),
                |(mf, vf), (((p, g), (mc, ma)), (vc, va))| {
                    let n = p.len();
                    let (mf, vf) = (&mut mf[..n], &mut vf[..n]);
                    decode(mc, *ma, m_signed, mf);
                    decode(vc, *va, v_signed, vf);
                    for i in 0..n {
                        let g = g[i] * scale;
                        mf[i] = b1 * mf[i] + (1.0 - b1) * g;
                        vf[i] = b2 * vf[i] + (1.0 - b2) * g * g;
                        let update = (mf[i] / c1) / ((vf[i] / c2).sqrt() + eps);
                        p[i] = p[i] * decay - update * lr;
                    }
                    encode(mf, mc, ma, m_signed);
                    encode(vf, vc, va, v_signed);
                },
            );
        Ok(())
    }
}
